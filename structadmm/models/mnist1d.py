"""MNIST-1D, generated offline: a procedural 1-D digits task that small networks do not saturate.

The data set comes from the ``mnist1d`` package's ``make_dataset`` with a fixed configuration
and seed, so it is the same on every machine and nothing is downloaded (the package's own
``download`` is never called). Each sample is a length-40 signal with one channel (1x40),
10 classes. Splits are fixed and disjoint:

* train 10,000, validation 5,000 (for every choice of hyperparameters), test 10,000 (read
  once per final configuration, see ``benchmarks/accuracy_vs_baselines.py``).

``make_dataset`` standardises the signals with the mean and standard deviation of all
samples it generates (labels are not involved); the splits are taken after that.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ..errors import StructADMMError

SEQ_LENGTH = 40
TRAIN, VAL, TEST = 10_000, 5_000, 10_000
SEED = 42  # the package's own default seed


@lru_cache(maxsize=1)
def _arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise StructADMMError("--data mnist1d needs the mnist1d package: pip install mnist1d") from None
    args = get_dataset_args()
    args.num_samples = TRAIN + VAL + TEST
    args.train_split = (TRAIN + VAL) / args.num_samples
    args.seed = SEED
    data = make_dataset(args)
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)
    y = np.concatenate([data["y"], data["y_test"]]).astype(np.int64)
    return x, y


def load_mnist1d_splits() -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """(train, validation, test) datasets of 1x40 float signals and integer labels."""
    x, y = _arrays()
    x_t, y_t = torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y)
    cuts = [0, TRAIN, TRAIN + VAL, TRAIN + VAL + TEST]
    return tuple(TensorDataset(x_t[a:b].clone(), y_t[a:b].clone()) for a, b in zip(cuts, cuts[1:]))

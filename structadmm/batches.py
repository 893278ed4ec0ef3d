"""Batches: what the library accepts as data, and how a batch splits into inputs and labels.

Training, evaluation, calibration and the ONNX checks all read data the same way: a torch
``Dataset``, a ``DataLoader`` or an ``(x, y)`` tensor pair; a batch is ``x`` or ``(x, y, ...)``,
and ``x`` is one tensor or a tuple of tensors for a model with several inputs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .errors import StructADMMError

__all__ = ["Data", "Inputs", "batch_inputs", "first_batch", "make_loader", "run_model", "split_batch"]

Data = Dataset | DataLoader | tuple
Inputs = torch.Tensor | tuple[torch.Tensor, ...]  # one batch's model inputs


def make_loader(data: Data, batch_size: int, *, shuffle: bool, seed: int = 0) -> DataLoader:
    """A DataLoader over a Dataset, an ``(x, y)`` tensor pair, or an existing DataLoader."""
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, tuple):
        data = TensorDataset(*(torch.as_tensor(t) for t in data))
    if not isinstance(data, Dataset):
        raise StructADMMError(
            f"training data must be a torch Dataset, a DataLoader or an (x, y) pair, not {type(data).__name__}"
        )
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator)


def split_batch(batch: Any) -> tuple[Inputs, torch.Tensor | None]:
    """A batch as (inputs, labels): labels are None for a batch of inputs alone."""
    if isinstance(batch, (tuple, list)):
        return batch_inputs(batch[0]), (batch[1] if len(batch) > 1 else None)
    return batch, None


def batch_inputs(x: Any) -> Inputs:
    """A batch's inputs: one tensor, or a tuple of tensors for a model with several inputs
    (samples given as ``((a, b), label)``)."""
    return tuple(x) if isinstance(x, (tuple, list)) else x


def run_model(model: nn.Module, x: Inputs, device: str | None = None) -> Any:
    """``model`` called on one batch's inputs (a tensor or a tuple of tensors), moved to ``device``."""
    items = x if isinstance(x, tuple) else (x,)
    if device is not None:
        items = tuple(t.to(device) for t in items)
    return model(*items)


def first_batch(loader: DataLoader, n: int | None = None) -> Inputs:
    """The inputs of the loader's first batch (at most ``n`` of them): real example inputs."""
    x, _ = split_batch(next(iter(loader)))
    if isinstance(x, tuple):
        return tuple(t[:n] for t in x) if n is not None else x
    return x[:n] if n is not None else x

"""Refuse data the model cannot learn from, before any work: the one home of the data checks.

:func:`check_data` reads the training and held-out data once, batch by batch (nothing is kept
but one count per class), whatever the source: a Dataset (image folders included), a
DataLoader, or an ``(x, y)`` pair. It raises :class:`StructADMMError`, naming the split and the
sample (an image by its file), for

* a split with no samples,
* inputs that are not all finite (NaN or inf),
* training data without labels, labels that are not integers, or labels outside
  ``0..classes-1``, where ``classes`` is the width of the model's output (the model is run once
  on two training samples, in eval mode without gradients; its modes, weights and BatchNorm
  statistics are left as they were),
* data that cannot be read (an unreadable image, an error in the user's dataset code);

and warns (:class:`StructADMMWarning`) when some of the model's classes have no training sample.

Labels are checked where a run learns from them. ``labels=False`` is for a run that does not
(the dense model as teacher, inputs alone): no label is needed or checked and the model's output
may be anything (a detector's boxes, several tensors), but the model must still run on two
training samples, and every input must be finite. ``labels=None`` checks labels where the
training data has them and skips them where it has none (samples ``(inputs,)``).

Samples are numbered as the user knows them: a split taken out of a bigger data set with
``Subset`` (the seeded hold-out split) is numbered by its place in that data set, so sample 537
of an ``.npz`` file is ``x[537]``. A DataLoader that reads its whole data set is read again in
order, with its own batch size, collate function and workers; any other DataLoader (a custom
sampler) is read as given and numbered in the order it yields, with its random generators put
back afterwards so the run's shuffles are unchanged.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from torch.utils.data import (
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    TensorDataset,
)
from torch.utils.data._utils.collate import default_collate

from ..errors import StructADMMError, StructADMMWarning, one_line
from .data import ImageFiles, format_shape

_NO_LABELS = ("the {split} data has no labels; give (input, label) pairs, or compress without labels, with the "
              "dense model as teacher")
BATCH_SIZE = 256  # samples read at a time where the data does not set its own batch size


def check_data(model: nn.Module, train: Any, val: Any | None, *, model_name: str | None = None,
               labels: bool | None = True) -> None:
    """Raise a one-line :class:`StructADMMError` when ``model`` cannot learn from this data.

    ``train``/``val``: a Dataset, a DataLoader or an ``(x, y)`` tensor pair (``val`` may be None,
    and may lack labels). ``labels``: True where the run learns from labels (they are required
    and checked), False where it does not (none are checked), None to check them where the
    training data has them. See the module docstring for what is checked.
    """
    name = model_name or type(model).__name__
    generators = [*_generators(train), *_generators(val)]
    states = [g.get_state() for g in generators]
    try:
        with torch.random.fork_rng(devices=[]):  # reading data must not move the caller's random state
            _check(model, train, val, name, labels)
    finally:
        for generator, state in zip(generators, states):
            generator.set_state(state)


def _check(model: nn.Module, train: Any, val: Any | None, name: str, labels: bool | None) -> None:
    source = _source(train, "training")
    batches = source.batches()
    first = next(batches, None)
    if first is None:
        raise StructADMMError("the training data is empty; give it samples")
    _check_inputs(first, source)
    if labels is False or (labels is None and first.y is None):
        _run(model, first.x, name)
        _check_split(source, itertools.chain([first], batches), 0, name, needs_labels=False)
        if val is not None:
            held_out = _source(val, "held-out")
            _check_split(held_out, held_out.batches(), 0, name, needs_labels=False)
        return
    if first.y is None:
        raise StructADMMError(_NO_LABELS.format(split="training"))
    classes = _classes(model, first.x, name)
    counts = _check_split(source, itertools.chain([first], batches), classes, name, needs_labels=True)
    missing = torch.nonzero(counts == 0).flatten().tolist()
    if missing:
        listed = ", ".join(map(str, missing[:10])) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        what = f"classes {listed}" if len(missing) > 1 else f"class {listed}"
        warnings.warn(StructADMMWarning(
            f"the training data has no samples of {what} (of the {classes} that {name} scores); "
            f"the model cannot learn {'them' if len(missing) > 1 else 'it'}"
        ), stacklevel=3)
    if val is not None:
        held_out = _source(val, "held-out")
        _check_split(held_out, held_out.batches(), classes, name, needs_labels=False)


# --- one split -----------------------------------------------------------------------------------


@dataclass
class _Batch:
    start: int  # position of the batch's first sample in the order the split is read
    x: Any
    y: Any


@dataclass
class _Source:
    """One split, read batch by batch, and how to name its sample at a position."""

    split: str  # "training" or "held-out"
    read: Callable[[], Iterable[Any]]
    where: Callable[[int], str]

    def batches(self) -> Iterator[_Batch]:
        start, batches = 0, iter(self.read())
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as exc:  # the user's data code, an unreadable file
                what = f"the {self.split} data" + (f" after sample {start}" if start else "")
                reason = one_line(exc)
                raise StructADMMError(
                    reason if isinstance(exc, StructADMMError) else f"cannot read {what}: {reason}"
                ) from exc
            x, y = (batch[0], batch[1] if len(batch) > 1 else None) if isinstance(batch, (tuple, list)) else (batch, None)
            yield _Batch(start, x, y)
            lead = x[0] if isinstance(x, (tuple, list)) and x else x  # several inputs: the first one's count
            start += len(lead) if isinstance(lead, torch.Tensor) and lead.dim() else 1


def _check_split(source: _Source, batches: Iterable[_Batch], classes: int, name: str, *,
                 needs_labels: bool) -> torch.Tensor:
    """Check every batch of one split; the number of samples of each class."""
    counts = torch.zeros(classes, dtype=torch.int64)
    seen = 0
    for batch in batches:
        _check_inputs(batch, source)
        first = batch.x[0] if isinstance(batch.x, (tuple, list)) else batch.x
        seen += len(first) if first.dim() else 1
        if batch.y is None or not classes:  # classes 0: labels are not used
            if needs_labels and batch.y is None:
                raise StructADMMError(_NO_LABELS.format(split=source.split))
            continue
        counts += _check_labels(batch, source, classes, name)
    if not seen:
        raise StructADMMError(f"the {source.split} data is empty; give it samples"
                              + (", or no held-out data at all" if source.split == "held-out" else ""))
    return counts


def _check_inputs(batch: _Batch, source: _Source) -> None:
    if isinstance(batch.x, (tuple, list)) and batch.x and all(isinstance(t, torch.Tensor) for t in batch.x):
        for x in batch.x:  # a model with several inputs: each is checked alike
            _check_tensor(x, batch, source)
        return
    _check_tensor(batch.x, batch, source)


def _check_tensor(x: Any, batch: _Batch, source: _Source) -> None:
    if not isinstance(x, torch.Tensor):
        raise StructADMMError(
            f"the {source.split} data gives {type(x).__name__} inputs, not tensors; convert them "
            "(e.g. with a ToTensor transform)"
        )
    if not (x.is_floating_point() or x.is_complex()) or x.numel() == 0:
        return
    rows = x.reshape(len(x), -1) if x.dim() else x.reshape(1, -1)
    finite = torch.isfinite(rows).all(dim=1)
    if bool(finite.all()):
        return
    i = int(torch.nonzero(~finite)[0])
    kind = "NaN" if bool(torch.isnan(rows[i]).any()) else "inf"
    raise StructADMMError(
        f"{source.where(batch.start + i)} has {kind} in its inputs; fix or drop that sample "
        "(nothing can be learnt from inputs that are not finite)"
    )


def _check_labels(batch: _Batch, source: _Source, classes: int, name: str) -> torch.Tensor:
    y = batch.y
    if not isinstance(y, torch.Tensor):
        raise StructADMMError(
            f"the {source.split} data's labels are {type(y).__name__}, not integer class indices 0..{classes - 1}"
        )
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise StructADMMError(
            f"the {source.split} data's labels are {str(y.dtype).removeprefix('torch.')}; they must be integer "
            f"class indices 0..{classes - 1} (convert them with .long()); samples (a, b) are (inputs, labels), "
            "so give several inputs without labels as ((a, b),)"
        )
    rows = (y.reshape(len(y), -1) if y.dim() else y.reshape(1, -1)).cpu()
    outside = ((rows < 0) | (rows >= classes)).any(dim=1)
    if bool(outside.any()):
        i = int(torch.nonzero(outside)[0])
        label = int(rows[i][(rows[i] < 0) | (rows[i] >= classes)][0])
        raise StructADMMError(
            f"{source.where(batch.start + i)} has label {label}, but {name} gives {classes} class scores, so labels "
            f"must be 0..{classes - 1}; relabel the data or give a model with one output per class"
        )
    return torch.bincount(rows.reshape(-1), minlength=classes)


# --- the model's classes -------------------------------------------------------------------------


def _sample_shapes(x: Any) -> str:
    items = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    return " and ".join(format_shape(t.shape[1:]) for t in items)


def _classes(model: nn.Module, x: Any, name: str) -> int:
    """The width of the model's output on two training samples (eval mode, no gradients, modes kept)."""
    out = _run(model, x, name)
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        got = f"a tensor of shape {format_shape(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise StructADMMError(
            f"{name} returns {got}, not class scores (batch x classes); it is trained with cross-entropy, "
            "so return the logits"
        )
    return int(out.shape[1])


def _run(model: nn.Module, x: Any, name: str) -> Any:
    """The model's output on two training samples (eval mode, no gradients, modes kept)."""
    modes = {module: module.training for module in model.modules()}
    device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    try:
        model.eval()
        with torch.no_grad():
            items = tuple(x) if isinstance(x, (tuple, list)) else (x,)
            out = model(*(t[:2].to(device) for t in items))
    except StructADMMError:
        raise
    except Exception as exc:
        raise StructADMMError(
            f"{name} cannot run on the training data's {_sample_shapes(x)} samples: {one_line(exc)}"
        ) from exc
    finally:
        for module, training in modes.items():
            module.training = training
    return out


# --- reading the sources -------------------------------------------------------------------------


def _source(data: Any, split: str) -> _Source:
    if isinstance(data, tuple):
        return _dataset_source(TensorDataset(*(torch.as_tensor(t) for t in data)), split)
    if isinstance(data, DataLoader):
        if _reads_whole_dataset(data):
            return _dataset_source(data.dataset, split, batch_size=data.batch_size, collate_fn=data.collate_fn,
                                   num_workers=data.num_workers)
        return _Source(split, lambda: data, lambda i: f"{split} sample {i} (counted in the order its DataLoader yields)")
    if isinstance(data, IterableDataset):
        return _Source(split, lambda: DataLoader(data, batch_size=BATCH_SIZE),
                       lambda i: f"{split} sample {i} (counted in the order the data set yields)")
    if isinstance(data, Dataset):
        return _dataset_source(data, split)
    raise StructADMMError(
        f"the {split} data must be a torch Dataset, a DataLoader or an (x, y) pair, not {type(data).__name__}"
    )


def _reads_whole_dataset(loader: DataLoader) -> bool:
    """Whether the loader reads every sample of its map-style data set once, in batches of its batch size."""
    sampler = loader.sampler
    if isinstance(loader.dataset, IterableDataset) or loader.batch_size is None:
        return False
    if isinstance(sampler, SequentialSampler):
        return True
    return (isinstance(sampler, RandomSampler) and not sampler.replacement
            and sampler.num_samples == len(loader.dataset))


def _dataset_source(dataset: Dataset, split: str, *, batch_size: int = BATCH_SIZE,
                    collate_fn: Callable | None = None, num_workers: int = 0) -> _Source:
    root, index = _root(dataset)
    if isinstance(root, TensorDataset) and collate_fn in (None, default_collate):
        def read() -> Iterator[tuple[torch.Tensor, ...]]:  # slices, not one sample at a time
            for start in range(0, len(dataset), batch_size):
                rows = index[start:start + batch_size] if index is not None else slice(start, start + batch_size)
                yield tuple(t[rows] for t in root.tensors)
    else:
        def read() -> DataLoader:
            return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                              **({"collate_fn": collate_fn} if collate_fn is not None else {}))

    def where(i: int) -> str:
        at = int(index[i]) if index is not None else i
        if isinstance(root, ImageFiles):
            return f"{split} image {root.files[at]}"
        if index is None:
            return f"{split} sample {i}"
        return f"{split} sample {i} (sample {at} of the data it was split from)"

    return _Source(split, read, where)


def _root(dataset: Dataset) -> tuple[Dataset, torch.Tensor | None]:
    """The data set under any ``Subset`` wrappers, and the positions in it of ``dataset``'s samples."""
    index = None
    while isinstance(dataset, Subset):
        positions = torch.as_tensor(dataset.indices, dtype=torch.int64)
        index = positions if index is None else positions[index]
        dataset = dataset.dataset
    return dataset, index


def _generators(data: Any) -> list[torch.Generator]:
    """The random generators a DataLoader's shuffling draws from (read back after checking)."""
    if not isinstance(data, DataLoader):
        return []
    found = [data.generator, getattr(data.sampler, "generator", None),
             getattr(getattr(data.batch_sampler, "sampler", None), "generator", None)]
    unique: list[torch.Generator] = []
    for generator in found:
        if isinstance(generator, torch.Generator) and all(generator is not g for g in unique):
            unique.append(generator)
    return unique



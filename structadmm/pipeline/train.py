"""The built-in trainer: data loading, SGD epochs (optionally with the ADMM penalty), accuracy.

It is deliberately plain (SGD with momentum, cosine learning rate, cross-entropy) so the
pruning method, not the trainer, decides the results. Users with their own loop call
``ADMM.penalty()`` / ``ADMM.update()`` / ``apply_masks`` themselves and skip this module.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ..errors import StructADMMError

Data = Dataset | DataLoader | tuple


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


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def train_epochs(
    model: nn.Module,
    loader: DataLoader,
    epochs: int,
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    penalty: Callable[[], torch.Tensor] | None = None,
    after_step: Callable[[], None] | None = None,
    after_epoch: Callable[[int], None] | None = None,
    device: str = "cpu",
    progress: Progress | None = None,
    description: str = "training",
) -> list[float]:
    """SGD with a cosine learning rate over ``epochs``; returns the mean loss of each epoch.

    ``penalty`` is added to the task loss at every step (the ADMM W-step); ``after_step``
    runs after every optimizer step (e.g. to re-apply masks) and ``after_epoch`` after each
    epoch (e.g. an ADMM Z/U round).
    """
    if epochs <= 0:
        return []
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    total = epochs * len(loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    task = progress.add_task(description, total=total) if progress is not None else None
    losses = []
    for epoch in range(epochs):
        running, batches = 0.0, 0
        for batch in loader:
            x, y = _split_batch(batch)
            if y is None:
                raise StructADMMError("training data has no labels: give (input, label) pairs")
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            if penalty is not None:
                loss = loss + penalty()
            if not torch.isfinite(loss):
                raise StructADMMError(
                    f"the loss became {float(loss)} during {description} (epoch {epoch + 1}); "
                    "lower the learning rate or rho"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if after_step is not None:
                after_step()
            running += loss.item()
            batches += 1
            if task is not None:
                progress.advance(task)
        losses.append(running / max(batches, 1))
        if after_epoch is not None:
            after_epoch(epoch)
    if task is not None:
        progress.remove_task(task)
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: str = "cpu") -> float | None:
    """Top-1 accuracy in [0, 1]; None when the data has no labels."""
    was_training = model.training
    model.to(device).eval()
    correct = seen = 0
    try:
        for batch in loader:
            x, y = _split_batch(batch)
            if y is None:
                return None
            pred = model(x.to(device)).argmax(dim=1)
            correct += int((pred == y.to(device)).sum())
            seen += len(y)
    finally:
        model.train(was_training)
    return correct / seen if seen else None


def first_batch(loader: DataLoader, n: int | None = None) -> torch.Tensor:
    """The inputs of the loader's first batch (at most ``n`` of them): real example inputs."""
    x, _ = _split_batch(next(iter(loader)))
    return x[:n] if n is not None else x

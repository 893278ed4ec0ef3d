"""The built-in trainer: data loading, SGD epochs (optionally with the ADMM penalty), accuracy.

It is deliberately plain (SGD with momentum, cosine learning rate, cross-entropy) so the
pruning method, not the trainer, decides the results. Two options serve the ADMM recipe: the
cosine can restart every ``restart_every`` epochs (one cosine per ADMM round), and a dense
``teacher`` adds knowledge distillation (Hinton et al.) to the loss during masked retraining. It runs under torchrun as well (DDP,
sharded batches: see :mod:`.distributed`) and can continue a phase from a checkpoint. Users
with their own loop call ``ADMM.penalty()`` / ``ADMM.update()`` / ``apply_masks`` themselves
and skip this module.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from rich.progress import Progress
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from ..errors import StructADMMError
from ..batches import run_model, split_batch
from ..layers import eval_mode
from . import distributed
from .objective import Objective, objective_of

# where a phase of train_epochs stopped: {"epoch": epochs finished, "optimizer": state_dict,
# "schedule": state_dict}; optimizer and schedule are None before the first epoch
TrainerState = dict[str, Any]


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
    resume: TrainerState | None = None,
    on_epoch_end: Callable[[TrainerState], None] | None = None,
    epoch_offset: int = 0,
    restart_every: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    teacher: nn.Module | None = None,
    distill: float = 0.0,
    temperature: float = 4.0,
    objective: Objective | None = None,
    as_deployed: bool = False,
    grad_clip: float | None = None,
) -> list[float]:
    """SGD with a cosine learning rate over ``epochs``; returns the mean loss of each epoch run.

    ``penalty`` is added to the task loss at every step (the ADMM W-step); ``after_step``
    runs after every optimizer step (e.g. to re-apply masks) and ``after_epoch`` after each
    epoch (e.g. an ADMM Z/U round).

    Resuming: ``on_epoch_end`` gets a :data:`TrainerState` (epochs finished, optimizer and
    learning-rate schedule) after every epoch; passing one back as ``resume`` continues the
    same ``epochs`` after the epoch it records. ``epoch_offset`` is added to the epoch given
    to a DistributedSampler's ``set_epoch``, so that consecutive calls over one loader see
    different shuffles.

    ``restart_every``: the cosine restarts from ``lr`` every that many epochs (warm restarts).
    ``should_stop`` is asked after every epoch (after ``after_epoch``); True ends the phase
    early. ``objective`` is what each step minimises (:mod:`.objective`; cross-entropy on the
    labels by default). ``as_deployed``: every layer but the normalisation layers trains in eval mode,
    as it is deployed: dropout is off, and a layer that answers differently in training (a
    detector's head) answers as deployed, so a student distilled from its dense copy returns
    what the teacher returns, output for output. BatchNorm layers still train as in training
    (batch statistics, running statistics updated): a pruned layer changes what the layers after
    it see, and their statistics must follow. ``grad_clip``: the gradient's global
    norm is clipped to it before every step. ``teacher`` with ``distill`` = a in (0, 1] is the shorthand for
    :class:`~.objective.Distillation`: ``(1 - a) * CE + a * T^2 * KL(teacher_T || student_T)`` at
    ``temperature`` T, the teacher in eval mode.

    Under torchrun (see :mod:`.distributed`) the model is wrapped in DDP, the loader is
    sharded over the ranks (``loader.batch_size`` is the global batch) and the loss reported
    and checked for finiteness is the mean over the ranks. Without an initialised process
    group, one is created from the torchrun environment and left for the caller to destroy
    (``torch.distributed.destroy_process_group()``; :func:`.compress` does it itself).
    """
    if epochs <= 0:
        return []
    ctx = distributed.setup(device)
    device = distributed.rank_device(device, ctx)
    loader = distributed.shard(loader, ctx)
    model.to(device).train(not as_deployed)
    if as_deployed:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._NormBase):
                module.train()
    net = distributed.wrap(model, ctx, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    total = epochs * len(loader)
    period = (restart_every if restart_every else epochs) * len(loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(
        math.pi * (step % period if restart_every else step) / period)))
    if teacher is not None:
        teacher.to(device).eval()
    start = 0
    if resume is not None:
        start = int(resume["epoch"])
        if resume["optimizer"] is not None:
            optimizer.load_state_dict(resume["optimizer"])
            schedule.load_state_dict(resume["schedule"])
    task = (progress.add_task(description, total=total, completed=start * len(loader))
            if progress is not None else None)
    if objective is None:
        objective = objective_of("labels", teacher, distill=distill, temperature=temperature)
    step = _Step(net, optimizer, schedule, objective, penalty, after_step, device, description, ctx, grad_clip)
    losses = []
    for epoch in range(start, epochs):
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch_offset + epoch)
        running, batches = 0.0, 0
        for batch in loader:
            running += step(batch, epoch)
            batches += 1
            if task is not None:
                progress.advance(task)
        losses.append(running / max(batches, 1))
        if after_epoch is not None:
            after_epoch(epoch)
        if on_epoch_end is not None:
            on_epoch_end({"epoch": epoch + 1, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()})
        if should_stop is not None and should_stop():
            break
    if task is not None:
        progress.remove_task(task)
    return losses


class _Step:
    """One SGD step of :func:`train_epochs`; returns the (all-rank mean) loss."""

    def __init__(self, net: nn.Module, optimizer: torch.optim.Optimizer, schedule: Any, objective: Objective,
                 penalty: Callable[[], torch.Tensor] | None, after_step: Callable[[], None] | None,
                 device: str, description: str, ctx: distributed.DistContext, grad_clip: float | None = None):
        self.net, self.optimizer, self.schedule, self.objective = net, optimizer, schedule, objective
        self.penalty, self.after_step = penalty, after_step
        self.device, self.description, self.ctx, self.grad_clip = device, description, ctx, grad_clip

    def __call__(self, batch: Any, epoch: int) -> float:
        x, y = split_batch(batch)
        x = tuple(t.to(self.device) for t in x) if isinstance(x, tuple) else x.to(self.device)
        loss = self.objective(run_model(self.net, x), y.to(self.device) if y is not None else None, x)
        if self.penalty is not None:
            # the same on every rank, so DDP's gradient average leaves its gradient exact
            loss = loss + self.penalty()
        # one value for all ranks, so that all stop together rather than wait for each other
        value = distributed.mean_over_ranks(loss.detach(), self.ctx)
        if not torch.isfinite(value):
            raise StructADMMError(
                f"the loss became {float(value)} during {self.description} (epoch {epoch + 1}); "
                "lower the learning rate or rho"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.grad_clip)
        self.optimizer.step()
        self.schedule.step()
        if self.after_step is not None:
            self.after_step()
        return value.item()


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: str = "cpu") -> float | None:
    """Top-1 accuracy in [0, 1]; None when the data has no labels."""
    model.to(device)
    correct = seen = 0
    with eval_mode(model):
        for batch in loader:
            x, y = split_batch(batch)
            if y is None:
                return None
            pred = run_model(model, x, device).argmax(dim=1)
            correct += int((pred == y.to(device)).sum())
            seen += len(y)
    return correct / seen if seen else None

"""Multi-process training under ``torchrun``: the process group, DDP, sharded data, rank-0 work.

``torchrun`` starts one process per worker and sets RANK, WORLD_SIZE and LOCAL_RANK (and
MASTER_ADDR/MASTER_PORT); :func:`setup` joins that process group (gloo on CPU, nccl on CUDA)
or uses one the caller initialised already. Without that environment (or with WORLD_SIZE=1)
every helper here is a no-op for rank 0 of 1, so a single process runs exactly as before.

What this module owns: which device a rank trains on, the DistributedDataParallel wrapper of
the W-steps, the DistributedSampler that gives each rank a disjoint shard of every global
batch, the cross-rank mean of the loss, the check that state which must be identical on
every rank (ADMM's Z and U, the masks) really is, and :func:`on_main` — work that only rank 0
does (files, evaluation, surgery, export, benchmark) with its outcome, or its failure, passed
to every rank so that no rank waits forever for one that gave up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterable, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler

from ..errors import StructADMMError

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job: rank ``rank`` of ``world_size``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised the process group, so we destroy it

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current() -> DistContext:
    """The initialised process group, or a single process when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    rank = dist.get_rank()
    return DistContext(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)))


def setup(device: str = "cpu") -> DistContext:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA) unless one exists already.

    ``owns_group`` is true only when this call created the group; :func:`teardown` then
    destroys it. A process with no torchrun environment stays a single process.
    """
    if dist.is_available() and dist.is_initialized():
        return current()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    if not dist.is_available():
        raise StructADMMError("WORLD_SIZE > 1 asks for multi-process training, but this torch has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)


def teardown(ctx: DistContext) -> None:
    """Destroy the process group if :func:`setup` created it (every rank calls this)."""
    if ctx.owns_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank_device(device: str, ctx: DistContext) -> str:
    """The device this rank trains on: one GPU per local rank under torchrun."""
    if ctx.active and device == "cuda":
        return f"cuda:{ctx.local_rank}"
    return device


def wrap(model: nn.Module, ctx: DistContext, device: str) -> nn.Module:
    """``model`` in DistributedDataParallel when there are several ranks, else itself.

    DDP broadcasts rank 0's parameters and buffers when it is built and rank 0's buffers
    (BatchNorm statistics) before every forward, and averages gradients in backward.
    """
    if not ctx.active or isinstance(model, DistributedDataParallel):  # the caller wrapped it already
        return model
    device_ids = [torch.device(device).index] if device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=device_ids)


def shard(loader: DataLoader, ctx: DistContext, *, seed: int | None = None) -> DataLoader:
    """A loader whose every global batch of ``loader.batch_size`` is split over the ranks.

    Each rank gets ``batch_size / world_size`` samples of every batch from a seeded
    DistributedSampler (disjoint shards whose union is the batch a single process with the
    same sampler would see); the trainer calls ``set_epoch`` on it. A loader that already
    has a DistributedSampler for this world size is kept.
    """
    sampler = loader.sampler
    if not ctx.active or (isinstance(sampler, DistributedSampler) and sampler.num_replicas == ctx.world_size):
        return loader
    if isinstance(loader.dataset, IterableDataset) or loader.batch_size is None:
        raise StructADMMError(
            "multi-process training needs a map-style Dataset batched by the DataLoader (no IterableDataset "
            "or custom batch_sampler), so that each rank can take its own shard; give the Dataset instead"
        )
    if loader.batch_size % ctx.world_size:
        raise StructADMMError(
            f"batch_size {loader.batch_size} does not split evenly over {ctx.world_size} processes; "
            f"choose a multiple of {ctx.world_size}"
        )
    if isinstance(sampler, DistributedSampler):
        shuffle, seed = sampler.shuffle, sampler.seed
    else:
        shuffle = isinstance(sampler, RandomSampler)
        seed = seed if seed is not None else (loader.generator.initial_seed() if loader.generator else 0)
    return DataLoader(
        loader.dataset, batch_size=loader.batch_size // ctx.world_size,
        sampler=DistributedSampler(loader.dataset, ctx.world_size, ctx.rank, shuffle=shuffle, seed=seed),
        collate_fn=loader.collate_fn, num_workers=loader.num_workers, pin_memory=loader.pin_memory,
        drop_last=loader.drop_last, generator=torch.Generator().manual_seed(seed),
    )


def mean_over_ranks(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The mean of a scalar over the ranks: every rank sees the same number (e.g. the loss)."""
    if not ctx.active:
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total / ctx.world_size


def check_identical(tensors: Iterable[torch.Tensor], ctx: DistContext, what: str) -> None:
    """Fail on every rank unless ``tensors`` are bit-for-bit rank 0's.

    Z, U and the masks are computed on each rank from weights DDP keeps in sync, so they
    must agree exactly; a difference would mean ranks prune different channels.
    """
    tensors = list(tensors)
    if not ctx.active or not tensors:
        return
    local = torch.cat([t.detach().flatten().double() for t in tensors])
    reference = local.clone()
    dist.broadcast(reference, src=0)
    differ = torch.tensor([0.0 if torch.equal(local, reference) else 1.0], device=local.device)
    dist.all_reduce(differ)
    if differ.item():
        raise RuntimeError(f"{what} differ between ranks; the ranks' weights are out of sync")


def on_main(fn: Callable[[], T], ctx: DistContext) -> T:
    """``fn()`` on rank 0 only; every rank returns its value or raises its error.

    The value must be picklable (it is broadcast); a failure on rank 0 reaches the other
    ranks as a StructADMMError with rank 0's message, so they stop instead of waiting.
    """
    if not ctx.active:
        return fn()
    payload: list[object] = [None]
    if ctx.is_main:
        try:
            value = fn()
        except BaseException as exc:
            payload[0] = ("error", _describe(exc))
            dist.broadcast_object_list(payload, src=0)
            raise
        payload[0] = ("ok", value)
    dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if status == "error":
        raise StructADMMError(value)
    return value


def _describe(exc: BaseException) -> str:
    if isinstance(exc, StructADMMError):
        return str(exc)
    return f"rank 0 failed: {type(exc).__name__}: {exc}"

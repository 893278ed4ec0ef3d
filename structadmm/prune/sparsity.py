"""Sparsity types and their Euclidean projections.

A *projection* maps a weight tensor onto the set "at most k groups are non-zero" for one
group type. For a single group type the exact Euclidean projection keeps the k groups of
largest L2 norm and zeroes the rest: every candidate point of the set is "the weight with
some groups zeroed", and the squared distance to it is the summed squared norm of the
zeroed groups, which is smallest when those are the smallest groups.

Group types for a weight of shape [F, C, *k] (Linear is [F, C]):

* ``filter``    a group is W[f, ...]                (coupled across layers: see graph.py)
* ``channel``   a group is W[:, c, ...]             (coupled across layers: see graph.py)
* ``shape``     a group is W[:, c, i, j], one column of the [F, C*kh*kw] GEMM matrix
* ``irregular`` a group is a single weight
"""

from __future__ import annotations

import itertools
from enum import Enum
from typing import Callable

import torch

from ..errors import StructADMMError


class Sparsity(str, Enum):
    FILTER = "filter"
    CHANNEL = "channel"
    SHAPE = "shape"
    IRREGULAR = "irregular"


#: Order in which combined projections are applied: structures that remove whole channels
#: first, then columns of what is left, then single weights of what is left.
PROJECTION_ORDER = (Sparsity.FILTER, Sparsity.CHANNEL, Sparsity.SHAPE, Sparsity.IRREGULAR)


def parse_sparsity(text: str) -> tuple[Sparsity, ...]:
    """Parse ``"filter"`` or a combination such as ``"filter+shape"`` (order-insensitive)."""
    names = [part.strip().lower() for part in str(text).split("+") if part.strip()]
    valid = ", ".join(s.value for s in Sparsity)
    if not names:
        raise StructADMMError(f"empty sparsity type; use one of {valid} or a combination like filter+shape")
    try:
        kinds = {Sparsity(name) for name in names}
    except ValueError:
        bad = next(n for n in names if n not in {s.value for s in Sparsity})
        raise StructADMMError(
            f"unknown sparsity type {bad!r}; use one of {valid} or a combination like filter+shape"
        ) from None
    return tuple(s for s in PROJECTION_ORDER if s in kinds)


def check_ratio(ratio: float, what: str = "ratio") -> float:
    """A pruning ratio is the fraction of groups removed: strictly between 0 and 1."""
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise StructADMMError(f"{what} must be a number in (0, 1), got {ratio!r}") from None
    if not 0.0 < value < 1.0:
        raise StructADMMError(f"{what} must be in (0, 1) (the fraction of groups removed), got {ratio!r}")
    return value


def keep_count(alive: int, ratio: float, multiple: int = 1) -> int:
    """How many of ``alive`` groups survive pruning a fraction ``ratio`` of them (at least one).

    With ``multiple`` > 1 the count is rounded up to a multiple of it (at most ``alive``): CPU
    kernels work on channel blocks (ONNX Runtime's NCHWc layout uses blocks of 8 with AVX2 and
    16 with AVX-512), so a count between two multiples pays for the padding anyway, and a
    layer narrower than one block leaves the fast path. Measured on MobileNetV2 at 50 %
    (ORT CPU, 2 threads): exact counts 2.03x / 2.63x faster than dense at batch 1 / 8,
    multiples of 16 2.65x / 3.22x, although they remove fewer MACs. The price: no group is
    pruned below one block, so high ratios on narrow layers are not reached.
    """
    keep = max(1, min(alive, int(round(alive * (1.0 - ratio)))))
    return min(alive, -(-keep // multiple) * multiple)


def topk_mask(scores: torch.Tensor, k: int, alive: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of the ``k`` largest ``scores`` (ties broken by index, deterministically).

    Groups where ``alive`` is False are never kept, so sequential projections only choose
    among what earlier ones left.
    """
    flat = scores.detach().flatten().to(torch.float64)
    if alive is not None:
        flat = torch.where(alive.flatten(), flat, torch.full_like(flat, -1.0))
    # stable sort on the negated scores: equal scores keep index order, so results are reproducible
    order = torch.sort(-flat, stable=True).indices[:k]
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[order] = True
    if alive is not None:
        keep &= alive.flatten()
    return keep.view_as(scores)


def balance_blocks(keep: torch.Tensor, constraints: list[list[torch.Tensor]], target: Callable[[list[int]], int],
                   scores: torch.Tensor | None = None, alive: torch.Tensor | None = None,
                   passes: int | None = None) -> torch.Tensor:
    """``keep`` changed so that the blocks of every constraint keep equal numbers of channels.

    ``constraints``: each a list of blocks (index tensors into ``keep``) that must keep equal
    counts (a grouped conv's groups, a chunk's pieces). Per constraint whose counts differ, every
    block keeps ``target(counts)`` channels: its highest ``scores`` (never one where ``alive`` is
    False), or without ``scores`` the channels it keeps now first, then the rest in index order.
    Constraints can share channels, so passes repeat until one changes nothing (at most ``passes``).
    This is the one balancing loop of the method: plans even out their top-k with it, surgery the
    channels it may remove.
    """
    keep = keep.clone()
    for _ in range(passes) if passes is not None else itertools.count():
        changed = False
        for blocks in constraints:
            counts = [int(keep[b].sum()) for b in blocks]
            if len(set(counts)) == 1:
                continue
            n = target(counts)
            for b in blocks:
                allowed = alive[b] if alive is not None else None
                priority = scores[b] if scores is not None else keep[b].to(torch.float64)
                chosen = topk_mask(priority, min(n, len(b) if allowed is None else int(allowed.sum())), allowed)
                if not torch.equal(chosen, keep[b]):
                    keep[b] = chosen
                    changed = True
        if not changed:
            break
    return keep


def column_scores(weight: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of every GEMM column W[:, c, *k]: a tensor of shape [C, *k]."""
    return weight.detach().pow(2).sum(dim=0)


def irregular_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().pow(2)


def project_columns(weight: torch.Tensor, ratio: float, alive: torch.Tensor | None = None) -> torch.Tensor:
    """Mask (same shape as ``weight``) of the Euclidean projection onto shape-wise sparsity."""
    scores = column_scores(weight)
    n_alive = int(alive.sum()) if alive is not None else scores.numel()
    keep = topk_mask(scores, keep_count(n_alive, ratio), alive)
    return keep.unsqueeze(0).expand_as(weight)


def project_irregular(weight: torch.Tensor, ratio: float, alive: torch.Tensor | None = None) -> torch.Tensor:
    """Mask of the Euclidean projection onto "at most k non-zero weights"."""
    scores = irregular_scores(weight)
    n_alive = int(alive.sum()) if alive is not None else scores.numel()
    return topk_mask(scores, keep_count(n_alive, ratio), alive)

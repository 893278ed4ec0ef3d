"""Structural surgery: physically remove the channels that pruning zeroed.

A channel of a prunable group is removable when every layer that reads it has zero weights
for it: whatever the channel carries is then ignored, so dropping it (the producer's filter
and bias, the normalisation entries, the consumers' input columns) leaves the model's
function unchanged. :func:`compact` builds the smaller model and checks exactly that on
the example inputs; it never trusts itself.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ParityError, StructADMMError
from ..layers import CONVS, eval_mode, flat_outputs, is_depthwise
from .graph import ChannelGraph, ChannelGroup, Slice, trace
from .lowering import MIN_GAIN, lower_convs
from .plan import slice_groups


@dataclass(frozen=True)
class GroupCut:
    """What surgery did to one channel group."""

    group: str
    channels: int
    kept: int


def removable_channels(graph: ChannelGraph, group: ChannelGroup) -> torch.Tensor:
    """Boolean [size]: channels of ``group`` whose every reader has all-zero weights.

    Where the group must keep equal counts per block (grouped convs, chunks), removable
    channels of the smaller blocks are kept (keeping a channel is always exact).
    """
    dead = torch.ones(group.size, dtype=torch.bool)
    for s, pos, local in graph.slices_of(group):
        if s.role == "in":
            read = (s.norms(graph.tensor(s))[torch.from_numpy(pos)] > 0).numpy()
            dead[torch.from_numpy(local[read])] = False
    constraints = graph.blocks_in(group)
    # every layer keeps at least one output, every constrained block at least one channel ...
    for block in graph.producer_blocks(group):
        if dead[block].all():
            dead[block[0]] = False
    for blocks in constraints:
        if any(dead[b].all() for b in blocks):
            for b in blocks:
                dead[b[0]] = False
    # ... and blocks that must match keep equal counts; only reviving, so the above still holds
    changed = True
    while changed:
        changed = False
        for blocks in constraints:
            target = max(int((~dead[b]).sum()) for b in blocks)
            for b in blocks:
                revive = b[dead[b].nonzero().flatten()[: target - int((~dead[b]).sum())]]
                if len(revive):
                    dead[revive] = False
                    changed = True
    return dead


def compact(model: nn.Module, example_inputs: Any, *, lower: bool = True, min_gain: float = MIN_GAIN,
            verify: bool = True, atol: float = 1e-4, rtol: float = 1e-4) -> nn.Module:
    """A new, physically smaller copy of ``model`` without its removable channels.

    Channels whose readers all have zero weights are removed; then, with ``lower``, every
    convolution with enough zero GEMM columns (shape-wise sparsity; MAC gain >= ``min_gain``)
    is rewritten as a :class:`~structadmm.pipeline.lowering.LoweredConv` that does only its
    kept columns' work. The result computes the same function as ``model`` (checked on
    ``example_inputs`` in eval mode when ``verify``; :class:`ParityError` otherwise).
    ``model`` is not modified.
    """
    small, _ = compact_with_report(model, example_inputs, lower=lower, min_gain=min_gain, verify=verify,
                                   atol=atol, rtol=rtol)
    return small


def compact_with_report(model: nn.Module, example_inputs: Any, *, lower: bool = True, min_gain: float = MIN_GAIN,
                        verify: bool = True, atol: float = 1e-4, rtol: float = 1e-4) -> tuple[nn.Module, list[GroupCut]]:
    """:func:`compact`, also returning the channels kept per group."""
    small, cuts = _remove_channels(copy.deepcopy(model), example_inputs)
    # removing a layer's outputs can leave channels it alone read with no reader: repeat to a fixed point
    while cuts:
        small, more = _remove_channels(small, example_inputs)
        if not more:
            break
        first = {cut.group: cut.channels for cut in cuts}
        cuts = [c for c in cuts if c.group not in {m.group for m in more}] + [
            GroupCut(m.group, first.get(m.group, m.channels), m.kept) for m in more]
    if lower:
        small, _ = lower_convs(small, min_gain=min_gain)
    if verify:
        check_same_function(model, small, example_inputs, atol=atol, rtol=rtol, what="surgery")
    return small, cuts


def _remove_channels(small: nn.Module, example_inputs: Any) -> tuple[nn.Module, list[GroupCut]]:
    """One pass of channel removal, in place on ``small``."""
    graph = trace(small, example_inputs)
    keep: dict[int, torch.Tensor] = {}
    cuts: list[GroupCut] = []
    for group in graph.prunable_groups():
        dead = removable_channels(graph, group)
        if dead.any():
            keep[group.id] = ~dead
            cuts.append(GroupCut(group.name, group.size, int((~dead).sum())))
    plans = _selections(graph, keep)
    while plans is None:  # a grouped conv's blocks would keep unequal columns: leave one group whole
        unbalanced = _unbalanced_groups(graph, keep)
        keep = {gid: k for gid, k in keep.items() if gid not in unbalanced}
        cuts = [c for c in cuts if c.group not in {graph.groups[g].name for g in unbalanced}]
        plans = _selections(graph, keep)
    resized: dict[str, nn.Module] = {}
    with torch.no_grad():
        for (module_name, tensor_name), selections in plans.items():
            module = graph.modules[module_name]
            tensor = getattr(module, tensor_name)
            new = tensor.detach()
            for s, keep_pos in sorted(selections, key=lambda sel: sel[0].role == "in"):
                new = s.select(new, keep_pos)
            new = new.clone()
            if isinstance(tensor, nn.Parameter):
                setattr(module, tensor_name, nn.Parameter(new, requires_grad=tensor.requires_grad))
            else:
                setattr(module, tensor_name, new)
            resized[module_name] = module
    for module in resized.values():
        _fix_sizes(module)
    return small, cuts


def _positions_kept(graph: ChannelGraph, s: Slice, keep: dict[int, torch.Tensor]) -> torch.Tensor:
    atoms = graph.atom_of[s.entries]
    groups = slice_groups(graph, s)
    keep_pos = torch.ones(len(s.entries), dtype=torch.bool)
    for gid in np.unique(groups).tolist():
        if gid in keep:
            where = np.nonzero(groups == gid)[0]
            keep_pos[torch.from_numpy(where)] = keep[gid][torch.from_numpy(graph.local_of[atoms[where]])]
    return keep_pos


def _is_unbalanced(s: Slice, keep_pos: torch.Tensor) -> bool:
    """Positions of a grouped conv's input must stay equal per group (tied channels can differ)."""
    if s.role != "in" or s.groups == 1:
        return False
    counts = keep_pos.view(s.groups, -1).sum(1)
    return bool((counts != counts[0]).any())


def _selections(graph: ChannelGraph, keep: dict[int, torch.Tensor]) -> dict[tuple[str, str], list] | None:
    """Per tensor, the position selections to apply (outputs before inputs); None if unbalanced."""
    plans: dict[tuple[str, str], list[tuple[Slice, torch.Tensor]]] = {}
    for s in graph.slices:
        keep_pos = _positions_kept(graph, s, keep)
        if _is_unbalanced(s, keep_pos):
            return None
        if not keep_pos.all():
            plans.setdefault((s.module, s.tensor), []).append((s, keep_pos))
    return plans


def _unbalanced_groups(graph: ChannelGraph, keep: dict[int, torch.Tensor]) -> set[int]:
    for s in graph.slices:
        if _is_unbalanced(s, _positions_kept(graph, s, keep)):
            touched = set(np.unique(slice_groups(graph, s)).tolist()) & set(keep)
            return {min(touched)}
    return set()


def _fix_sizes(module: nn.Module) -> None:
    """Make a resized module's size attributes agree with its new tensors."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, CONVS):
        depthwise = is_depthwise(module)
        multiplier = module.out_channels // module.in_channels if depthwise else 1
        module.out_channels = module.weight.shape[0]
        if depthwise:
            module.in_channels = module.groups = module.out_channels // multiplier
        else:
            module.in_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.GroupNorm):
        group_size = module.num_channels // module.num_groups
        module.num_channels = module.weight.shape[0]
        module.num_groups = module.num_channels // group_size
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        tensors = [t for t in (module.weight, module.running_mean) if t is not None]
        module.num_features = tensors[0].shape[0]
    elif isinstance(module, nn.PReLU):
        module.num_parameters = module.weight.shape[0]


def check_same_function(reference: nn.Module, candidate: nn.Module, example_inputs: Any, *,
                        atol: float, rtol: float, what: str) -> float:
    """Max abs difference of the two models' outputs in eval mode; ParityError past tolerance."""
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    with eval_mode(reference, candidate), torch.no_grad():
        expected = flat_outputs(reference(*inputs))
        got = flat_outputs(candidate(*inputs))
    if len(expected) != len(got) or any(e.shape != g.shape for e, g in zip(expected, got)):
        raise ParityError(f"{what} changed the model's output shapes: {[tuple(e.shape) for e in expected]} "
                          f"became {[tuple(g.shape) for g in got]}")
    diff = max((float((e - g).abs().max()) for e, g in zip(expected, got) if e.numel()), default=0.0)
    limit = max((atol + rtol * float(e.abs().max()) for e in expected if e.numel()), default=atol)
    if not diff <= limit:
        raise ParityError(f"{what} changed the model's outputs: max abs diff {diff:.3g} > tolerance {limit:.3g}")
    return diff

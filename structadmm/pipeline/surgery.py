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

import torch
from torch import nn

from ..errors import ParityError
from .graph import ChannelGraph, ChannelGroup, trace
from .plan import _channel_view


@dataclass(frozen=True)
class GroupCut:
    """What surgery did to one channel group."""

    group: str
    channels: int
    kept: int


def removable_channels(graph: ChannelGraph, group: ChannelGroup) -> torch.Tensor:
    """Boolean [size]: channels of ``group`` whose every reader has all-zero weights."""
    dead = torch.ones(group.size, dtype=torch.bool)
    for s in group.slices:
        if s.role == "in":
            weight = graph.modules[s.module].weight.detach()
            dead &= ~_channel_view(weight, s, group.size).ne(0).any(1)
    return dead


def compact(model: nn.Module, example_inputs: Any, *, verify: bool = True, atol: float = 1e-4,
            rtol: float = 1e-4) -> nn.Module:
    """A new, physically smaller copy of ``model`` without its removable channels.

    The result computes the same function as ``model`` (checked on ``example_inputs`` in
    eval mode when ``verify``; :class:`ParityError` otherwise). ``model`` is not modified.
    """
    small, _ = compact_with_report(model, example_inputs, verify=verify, atol=atol, rtol=rtol)
    return small


def compact_with_report(model: nn.Module, example_inputs: Any, *, verify: bool = True, atol: float = 1e-4,
                        rtol: float = 1e-4) -> tuple[nn.Module, list[GroupCut]]:
    """:func:`compact`, also returning the channels kept per group."""
    small = copy.deepcopy(model)
    graph = trace(small, example_inputs)
    keep_out: dict[str, torch.Tensor] = {}  # module -> bool over dim 0 (outputs / per-channel)
    keep_in: dict[str, torch.Tensor] = {}  # module -> bool over weight dim 1 (inputs)
    cuts: list[GroupCut] = []
    for group in graph.prunable_groups():
        dead = removable_channels(graph, group)
        if dead.all():  # keep one channel so every tensor keeps a non-empty shape
            dead[0] = False
        if not dead.any():
            continue
        cuts.append(GroupCut(group.name, group.size, int((~dead).sum())))
        for s in group.slices:
            module = graph.modules[s.module]
            if s.role == "in":
                mask = keep_in.setdefault(s.module, torch.ones(module.weight.shape[1], dtype=torch.bool))
                mask[s.offset: s.offset + group.size * s.factor] &= ~dead.repeat_interleave(s.factor)
            else:
                mask = keep_out.setdefault(s.module, torch.ones(_channels_of(module), dtype=torch.bool))
                mask[s.offset: s.offset + group.size] &= ~dead
    for name in sorted(set(keep_out) | set(keep_in)):
        _shrink(graph.modules[name], keep_out.get(name), keep_in.get(name))
    if verify:
        check_same_function(model, small, example_inputs, atol=atol, rtol=rtol, what="surgery")
    return small, cuts


def _channels_of(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features
    return module.out_channels


@torch.no_grad()
def _shrink(module: nn.Module, out: torch.Tensor | None, inp: torch.Tensor | None) -> None:
    """Slice every per-channel tensor of ``module`` in place and fix its size attributes."""
    out_idx = out.nonzero().flatten() if out is not None else None
    in_idx = inp.nonzero().flatten() if inp is not None else None
    for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        if tensor is None or tensor.ndim == 0:  # e.g. BatchNorm's num_batches_tracked
            continue
        new = tensor
        if out_idx is not None:
            new = new.index_select(0, out_idx)
        if in_idx is not None and name == "weight" and new.ndim >= 2:
            new = new.index_select(1, in_idx)
        new = new.clone()
        if isinstance(tensor, nn.Parameter):
            setattr(module, name, nn.Parameter(new, requires_grad=tensor.requires_grad))
        else:
            setattr(module, name, new)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.num_features = int(out_idx.numel())
    else:  # convolutions
        depthwise = module.groups > 1
        module.out_channels = module.weight.shape[0]
        module.in_channels = module.out_channels if depthwise else module.weight.shape[1]
        if depthwise:
            module.groups = module.out_channels


def check_same_function(reference: nn.Module, candidate: nn.Module, example_inputs: Any, *,
                        atol: float, rtol: float, what: str) -> float:
    """Max abs difference of the two models' outputs in eval mode; ParityError past tolerance."""
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    modes = reference.training, candidate.training
    reference.eval(), candidate.eval()
    try:
        with torch.no_grad():
            expected = _flat_outputs(reference(*inputs))
            got = _flat_outputs(candidate(*inputs))
    finally:
        reference.train(modes[0]), candidate.train(modes[1])
    diff = max(float((e - g).abs().max()) for e, g in zip(expected, got))
    limit = max(atol + rtol * float(e.abs().max()) for e in expected)
    if len(expected) != len(got) or any(e.shape != g.shape for e, g in zip(expected, got)) or not diff <= limit:
        raise ParityError(f"{what} changed the model's outputs: max abs diff {diff:.3g} > tolerance {limit:.3g}")
    return diff


def _flat_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in _flat_outputs(o)]

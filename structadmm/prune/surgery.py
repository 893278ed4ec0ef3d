"""Structural surgery: physically remove the channels that pruning zeroed.

A channel of a prunable group is removable when every layer that reads it has zero weights
for it: whatever the channel carries is then ignored, so dropping it (the producer's filter
and bias, the normalisation entries, the consumers' input columns) leaves the model's
function unchanged. :func:`compact` builds the smaller model and checks exactly that on
the example inputs; it never trusts itself.

Surgery works on an :func:`independent_copy` of the model: it shares no tensor with the
caller's model and carries none of its hooks, so the caller's model (its weights, its
``MaskGuard``, its own hooks) is never touched and the result exports on its own.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from torch.nn.parameter import is_lazy
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from ..errors import ParityError, StructADMMError, StructADMMWarning, one_line
from ..graph.channels import ChannelGraph, ChannelGroup, Slice, slice_groups
from ..graph.heads import heads_attention
from ..graph.norms import keep_statistics
from ..graph.resize import fix_sizes, sync_config
from ..graph.trace import trace
from ..layers import eval_mode, flat_outputs, train_mode_trial
from .lowering import lower_convs
from .sparsity import balance_blocks


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
    # a LayerNorm's statistics read every channel of a residual stream: there a channel must
    # also be zero itself (every producer and every added parameter), not only unread
    roles = ("in", "out", "through") if group.id in graph.normalised else ("in",)
    for s, pos, local in graph.slices_of(group):
        if s.role in roles:
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
    return ~balance_blocks(~dead, constraints, max)


def compact(model: nn.Module, example_inputs: Any, *, lower: bool = True, min_gain: float | None = None,
            verify: bool = True, atol: float = 1e-4, rtol: float = 1e-4) -> nn.Module:
    """A new, physically smaller copy of ``model`` without its removable channels.

    Channels whose readers all have zero weights are removed; then, with ``lower``, every
    convolution with enough zero GEMM columns (shape-wise sparsity; MAC gain >= ``min_gain``, by
    default :func:`~structadmm.prune.lowering.min_gain_for` its filter count) is rewritten as a
    :class:`~structadmm.prune.lowering.LoweredConv` that does only its kept columns' work. The result
    computes the same function as ``model`` (checked on ``example_inputs`` in eval mode when
    ``verify``; :class:`ParityError` otherwise).

    ``model`` is not modified, and the result is independent of it (:func:`independent_copy`):
    it shares no tensors with ``model`` and has no hooks. A ``MaskGuard`` or hooks of your own
    on ``model`` stay there and keep working; they are not carried over to the result, whose
    channel counts they were not written for (register them again on it if you need them).
    """
    small, _ = compact_with_report(model, example_inputs, lower=lower, min_gain=min_gain, verify=verify,
                                   atol=atol, rtol=rtol)
    return small


def compact_with_report(model: nn.Module, example_inputs: Any, *, lower: bool = True, min_gain: float | None = None,
                        verify: bool = True, atol: float = 1e-4, rtol: float = 1e-4) -> tuple[nn.Module, list[GroupCut]]:
    """:func:`compact`, also returning the channels kept per group."""
    small, cuts = _remove_channels(heads_attention(independent_copy(model)), example_inputs)
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
    if cuts:  # a transformers model's config must describe what surgery left (save_pretrained)
        stale = sync_config(small)
        if stale is not None:
            warnings.warn(StructADMMWarning(f"{stale}; save_pretrained/from_pretrained will not rebuild it "
                                            "(the compacted model itself runs and exports)"), stacklevel=3)
    if verify:
        try:
            check_same_function(model, small, example_inputs, atol=atol, rtol=rtol, what="surgery")
        except ParityError as exc:
            hooked = _hooked_modules(model)
            if hooked:  # the likelier cause: a hook that changes outputs, which the copy does not have
                raise ParityError(f"{exc}; forward hooks on {', '.join(hooked[:3])} may change the model's outputs, "
                                  "and the compacted model has no hooks: remove them before compacting") from None
            raise
        _check_trains(model, small, example_inputs)
    return small, cuts


def _check_trains(model: nn.Module, small: nn.Module, example_inputs: Any) -> None:
    """Raise unless ``small`` runs in train mode on ``example_inputs`` wherever ``model`` does: a
    branch only training runs (an auxiliary classifier) is not in the eval-mode trace, and the
    channels it reads must not have been cut. Neither model's state changes."""
    if _train_error(small, example_inputs) is None:
        return
    if _train_error(model, example_inputs) is None:
        raise StructADMMError(f"the compacted model no longer runs in train mode ({_train_error(small, example_inputs)}): "
                              "a branch only training runs reads channels surgery removed; leave its layers whole")


def _train_error(model: nn.Module, example_inputs: Any) -> str | None:
    """Why ``model`` fails in train mode on the example (no gradients; its modes, buffers and the
    random state are as they were afterwards); None when it runs."""
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    try:
        with train_mode_trial(model), torch.no_grad():
            model(*inputs)
        return None
    except Exception as exc:  # noqa: BLE001  (any failure is the answer)
        return one_line(exc)


# a module's hooks, by the attribute torch keeps them in (forward, backward and state-dict hooks)
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_state_dict_pre_hooks",
               "_state_dict_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
# hooks that are torch's own reparametrizations of a weight: folded into a plain weight in the copy
_REPARAMETRIZATIONS = (BasePruningMethod, WeightNorm, SpectralNorm)


def independent_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that shares no tensor with it and carries no hooks.

    The hooks of every module (forward, backward, state-dict, and the gradient hooks of
    parameters) are neither copied nor run: copying them would copy closures that still point
    at ``model`` (a ``MaskGuard``'s, or the user's own). torch's hook-based reparametrizations
    (``torch.nn.utils.prune``, ``weight_norm``, ``spectral_norm``) are folded into plain
    weights of the value the model computes, as ``prune.remove`` and friends do. ``model`` is
    not modified.
    """
    lazy = [name for name, p in model.named_parameters() if is_lazy(p)]
    if lazy:
        raise StructADMMError(f"{lazy[0]} is not initialised yet (a lazy module); run the model once on an "
                              "example input before compacting it")
    memo: dict[int, Any] = {}
    for module in model.modules():
        for attr in _HOOK_DICTS:
            hooks = module.__dict__.get(attr)
            if hooks is not None:
                memo[id(hooks)] = type(hooks)()  # deepcopy takes these empty dicts for the hook dicts
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, _REPARAMETRIZATIONS):  # its computed weight is no leaf: not copied, refolded
                derived = module.__dict__.get(getattr(hook, "_tensor_name", None) or hook.name)
                memo[id(derived)] = None
    small = copy.deepcopy(model, memo)
    copies = dict(small.named_modules(remove_duplicate=False))
    for name, module in model.named_modules(remove_duplicate=False):
        copies[name]._is_full_backward_hook = None
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, _REPARAMETRIZATIONS):
                hook.remove(copies[name])  # reads the hook's settings only; writes the copy
    return small


def _hooked_modules(model: nn.Module) -> list[str]:
    return [name or type(model).__name__ for name, module in model.named_modules()
            if module._forward_pre_hooks or module._forward_hooks]


def _remove_channels(small: nn.Module, example_inputs: Any) -> tuple[nn.Module, list[GroupCut]]:
    """One pass of channel removal, in place on ``small``."""
    graph = trace(small, example_inputs)
    keep: dict[int, torch.Tensor] = {}
    for group in graph.prunable_groups():
        dead = removable_channels(graph, group)
        if dead.any():
            keep[group.id] = ~dead
    fixed = _fixed_size_groups(small, example_inputs, graph, [graph.groups[g] for g in keep])
    keep = {gid: k for gid, k in keep.items() if gid not in fixed}
    plans = _selections(graph, keep)
    while plans is None:  # a grouped conv's blocks would keep unequal columns: leave one group whole
        unbalanced = _unbalanced_groups(graph, keep)
        keep = {gid: k for gid, k in keep.items() if gid not in unbalanced}
        plans = _selections(graph, keep)
    _cut(graph.modules, plans)
    return small, [GroupCut(graph.groups[g].name, graph.groups[g].size, int(k.sum())) for g, k in keep.items()]


def _cut(modules: dict[str, nn.Module], plans: dict[tuple[str, str], list]) -> None:
    """Apply the position selections of :func:`_selections` to ``modules``' tensors, in place."""
    before: dict[str, torch.Size] = {}
    with torch.no_grad():
        for (module_name, tensor_name), selections in plans.items():
            module = modules[module_name]
            tensor = getattr(module, tensor_name)
            before[f"{module_name}.{tensor_name}" if module_name else tensor_name] = tensor.shape
            new = tensor.detach()
            for s, keep_pos in sorted(selections, key=lambda sel: sel[0].role == "in"):
                new = s.select(new, keep_pos)
            new = new.clone()
            if isinstance(tensor, nn.Parameter):
                setattr(module, tensor_name, nn.Parameter(new, requires_grad=tensor.requires_grad))
            else:
                setattr(module, tensor_name, new)
    fix_sizes(modules[""], before)
    keep_statistics(modules[""], before)


def freeze_fixed_sizes(model: nn.Module, example_inputs: Any, graph: ChannelGraph) -> None:
    """Freeze the groups whose channel count the model's code writes down as a number.

    An exported graph states every size as a number, so whether ``x.view(b, 64, -1)`` came
    from ``x.size(1)`` or from a literal 64 cannot be read from it. For each prunable group
    that reaches such an op, a copy of ``model`` loses one of the group's channels and runs:
    if it fails or its outputs change shape, the group is frozen with the reason.
    """
    for gid in _fixed_size_groups(model, example_inputs, graph, graph.prunable_groups()):
        group = graph.groups[gid]
        group.frozen = f"{graph.sized[gid]} gives these channels a fixed count (hard-coded in forward())"
        graph.notes.append(f"{group.frozen}: channels of {group.name} are not pruned")


def _fixed_size_groups(model: nn.Module, example_inputs: Any, graph: ChannelGraph,
                       groups: list[ChannelGroup]) -> set[int]:
    probed = [g for g in groups if g.id in graph.sized]
    if not probed:
        return set()
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    reference = [tuple(t.shape) for t in _eval_outputs(model, inputs)]
    fixed = set()
    for group in probed:
        keep = {group.id: _one_fewer(graph, group)}
        plans = None if keep[group.id] is None else _selections(graph, keep)
        if plans is None:
            continue
        trial = heads_attention(independent_copy(model))
        _cut(dict(trial.named_modules()), plans)
        try:
            shapes = [tuple(t.shape) for t in _eval_outputs(trial, inputs)]
        except Exception:
            shapes = None
        if shapes != reference:
            fixed.add(group.id)
    return fixed


def _one_fewer(graph: ChannelGraph, group: ChannelGroup) -> torch.Tensor | None:
    """A keep mask for ``group`` with its last channel removed, and as many more as the blocks
    that must keep equal counts need; None where no such mask leaves every layer an output."""
    keep = torch.ones(group.size, dtype=torch.bool)
    keep[-1] = False
    keep = balance_blocks(keep, graph.blocks_in(group), min, passes=group.size)  # only removing
    if not keep.any() or any(not keep[b].any() for b in graph.producer_blocks(group)):
        return None
    return keep


def _eval_outputs(model: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    with eval_mode(model), torch.no_grad():
        return flat_outputs(model(*inputs))


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
        keep_pos = graph.positions_kept(s, keep)
        if _is_unbalanced(s, keep_pos):
            return None
        if not keep_pos.all():
            plans.setdefault((s.module, s.tensor), []).append((s, keep_pos))
    return plans


def _unbalanced_groups(graph: ChannelGraph, keep: dict[int, torch.Tensor]) -> set[int]:
    for s in graph.slices:
        if _is_unbalanced(s, graph.positions_kept(s, keep)):
            touched = set(np.unique(slice_groups(graph, s)).tolist()) & set(keep)
            return {min(touched)}
    return set()


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

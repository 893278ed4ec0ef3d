"""Pruning plans: which groups of which parameters to prune, and how many.

A plan is a list of *units*, each one constraint set S_i of the method: a coupled channel
group (``filter`` / ``channel`` sparsity, see graph.py), or one weight tensor with shape-wise
or irregular sparsity. Every unit knows how to project parameter values onto its set, so
the same plan drives ADMM's Z-step, the hard prune and one-shot magnitude pruning.

Combined types (``filter+shape``) are applied in sequence: channels first, then columns of
what is left, then single weights of what is left. Each step is the exact Euclidean
projection for its own type given the previous steps; the sequence as a whole is the usual
heuristic for an intersection of sets and is not claimed to be the exact joint projection.

In a coupled graph, filter ``c`` of a layer and channel ``c`` of the layers reading it are
one removal. Both types therefore select whole channel groups, scored by the L2 norm over
every coupled slice; they differ only in how a per-layer plan names the group: ``filter``
by the layer that produces the channels, ``channel`` by a layer that reads them.
"""

from __future__ import annotations


import dataclasses
import fnmatch
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from ..errors import StructADMMError
from ..files import read_toml
from ..graph.channels import ChannelGraph, ChannelGroup, Slice
from ..graph.trace import trace
from ..layers import CONVS, is_depthwise
from .sparsity import (
    PROJECTION_ORDER,
    Sparsity,
    balance_blocks,
    check_ratio,
    keep_count,
    parse_sparsity,
    project_columns,
    project_irregular,
    topk_mask,
)
from .surgery import freeze_fixed_sizes

Masks = dict[str, torch.Tensor]
"""Parameter name -> float mask of the parameter's shape (1 keeps a weight, 0 prunes it)."""

_WEIGHTED = (*CONVS, nn.Linear)


@dataclass(frozen=True)
class KeepDecision:
    """Which channels of one group a projection keeps, and how the count came about, step by step."""

    keep: torch.Tensor  # bool [size]: the channels kept
    target: float  # size * (1 - ratio): the exact count the ratio asks for
    whole: int  # the nearest whole count, at least one (keep_count without a multiple)
    rounded: int  # rounded up to a multiple of the unit's ``multiple`` (at most size)
    alive: int  # channels still alive in the masks the projection started from
    balanced: int  # after the equal-count blocks (grouped convs, chunks) are evened out
    kept: int  # after every producing layer has kept at least one channel


@dataclass
class ChannelUnit:
    """Keep at most k channels of a coupled group; scored over all its slices.

    k counts from the group's full size (``keep_count(size, ratio, multiple)``), so a plan
    projected within masks that already removed channels (:meth:`PruningPlan.masks_for`'s
    ``within``) keeps the same count as from scratch, chosen among the channels still alive.
    """

    group: ChannelGroup
    kind: Sparsity
    ratio: float
    graph: ChannelGraph
    multiple: int = 1  # kept channels rounded up to a multiple of this (see keep_count)

    @property
    def name(self) -> str:
        return self.group.name

    def params(self) -> list[str]:
        return sorted({s.name for s, _, _ in self._slices()})

    def _slices(self) -> list[tuple[Slice, np.ndarray, np.ndarray]]:
        if not hasattr(self, "_cache"):
            self._cache = [(s, torch.from_numpy(pos), torch.from_numpy(local))
                           for s, pos, local in self.graph.slices_of(self.group)
                           if isinstance(self.graph.tensor(s), nn.Parameter)]
        return self._cache

    def keep(self, values: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Boolean [size]: which channels survive the projection of ``values``."""
        return self.decide(values, masks).keep

    def alive(self, masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Boolean [size]: the channels ``masks`` have not removed (some slice of theirs is non-zero)."""
        alive = torch.zeros(self.group.size, dtype=torch.bool)
        for s, pos, local in self._slices():
            alive.index_fill_(0, local[s.norms(masks[s.name])[pos] > 0], True)
        return alive

    def decide(self, values: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> KeepDecision:
        """The channels kept (as :meth:`keep`) and each step that set their number."""
        size = self.group.size
        scores = torch.zeros(size, dtype=torch.float64)
        for s, pos, local in self._slices():
            scores.index_add_(0, local, s.norms(values[s.name])[pos])
        alive = self.alive(masks)
        n_alive = int(alive.sum())
        rounded = keep_count(size, self.ratio, self.multiple)
        keep = constrained_topk(scores, min(rounded, n_alive), alive, self.graph.blocks_in(self.group))
        balanced = int(keep.sum())
        for block in self.graph.producer_blocks(self.group):
            if not keep[block].any() and alive[block].any():
                keep[block[torch.argmax(torch.where(alive[block], scores[block], -1.0))]] = True
        return KeepDecision(keep, size * (1.0 - self.ratio), keep_count(size, self.ratio), rounded, n_alive,
                            balanced, int(keep.sum()))

    def project(self, values: Mapping[str, torch.Tensor], masks: Masks) -> None:
        self.apply(self.keep(values, masks), values, masks)

    def apply(self, keep: torch.Tensor, values: Mapping[str, torch.Tensor], masks: Masks) -> None:
        """Zero the masks of every channel of the group that ``keep`` does not keep."""
        for s, pos, local in self._slices():
            keep_pos = self.graph.positions_kept(s, {self.group.id: keep})
            masks[s.name] = masks[s.name] * s.mask(values[s.name].shape, keep_pos)


def channel_multiple(graph: ChannelGraph, group: ChannelGroup, multiple: int) -> int:
    """``multiple`` counts a layer's output rows; a channel that is several rows of its layer
    (a head: head_dim rows each of q, k and v) needs only ``multiple / gcd(multiple, rows)``."""
    rows = [len(pos) // len(np.unique(local)) for s, pos, local in graph.slices_of(group) if s.role == "out" and s.weight]
    return multiple // math.gcd(multiple, min(rows)) if rows else multiple


def constrained_topk(scores: torch.Tensor, k: int, alive: torch.Tensor, blocks: list[list[torch.Tensor]]) -> torch.Tensor:
    """Top-k channels, then every block of a constraint re-chosen to keep the same count.

    For one constraint whose blocks partition the group (a grouped conv, a chunk) this is
    the exact projection: the best ``k / n_blocks`` channels of every block.
    """
    return balance_blocks(topk_mask(scores, k, alive), blocks, lambda counts: max(1, round(sum(counts) / len(counts))),
                          scores, alive, passes=4)


@dataclass
class TensorUnit:
    """Shape-wise (GEMM column) or irregular sparsity of one weight tensor."""

    param: str
    kind: Sparsity
    ratio: float

    @property
    def name(self) -> str:
        return self.param.rsplit(".", 1)[0]

    def params(self) -> list[str]:
        return [self.param]

    def project(self, values: Mapping[str, torch.Tensor], masks: Masks) -> None:
        mask = masks[self.param]
        weight = values[self.param].detach() * mask
        if self.kind is Sparsity.SHAPE:
            alive = mask.bool().any(0)
            new = project_columns(weight, self.ratio, alive)
        else:
            new = project_irregular(weight, self.ratio, mask.bool())
        masks[self.param] = mask * new.to(mask.dtype)


Unit = ChannelUnit | TensorUnit

#: Frozen-group reasons of channels no plan can remove: the model's own input and output channels.
NOT_PRUNABLE = ("model input", "model output")


@dataclass(frozen=True)
class LeftWhole:
    """A channel group a rule of the plan asked to prune that the plan keeps whole, and why."""

    group: ChannelGroup
    ratio: float  # what the rule asked
    reason: str
    by_choice: bool = False  # the plan's own policy (keep_ends), not a limit of the graph: no shortfall


class PruningPlan:
    """What to prune in one model: a list of units plus what was left alone and why.

    ``left_whole``: the channel groups a rule named (at the rule's ratio) that the plan keeps
    whole: frozen groups with the graph's reason, the ends kept whole (``keep_ends``). The
    model's own input and output channels are not among them: no plan can remove those.
    """

    def __init__(self, graph: ChannelGraph, units: list[Unit], skipped: list[tuple[str, str]],
                 left_whole: list[LeftWhole] | None = None):
        self.graph = graph
        self.units = sorted(units, key=lambda u: PROJECTION_ORDER.index(u.kind))
        self.skipped = skipped
        self.left_whole = list(left_whole or [])

    # -- construction ------------------------------------------------------------------
    @classmethod
    def uniform(cls, model: nn.Module, example_inputs: Any, sparsity: str = "filter", ratio: float = 0.5, *,
                multiple: int = 1, keep_ends: bool = False, residual: bool = False) -> "PruningPlan":
        """The same sparsity type(s) and ratio for every layer that can take them.

        ``multiple``: round every group's kept channel count up to a multiple of it.
        ``keep_ends``: leave the first layer and the classifier whole (see :meth:`from_dict`).
        """
        return cls.from_dict(model, example_inputs, {"*": {"sparsity": sparsity, "ratio": ratio}}, multiple=multiple,
                             keep_ends=keep_ends, residual=residual)

    @classmethod
    def from_file(cls, model: nn.Module, example_inputs: Any, path: str | Path, *, multiple: int = 1,
                  keep_ends: bool = False, residual: bool = False) -> "PruningPlan":
        """A TOML plan: ``[layers."<glob>"]`` tables with ``sparsity`` and ``ratio`` keys."""
        data = read_toml(path, "plan file")
        unknown = set(data) - {"layers"}
        if unknown or not isinstance(data.get("layers"), dict):
            raise StructADMMError(
                f"plan file {path} must hold only [layers.\"<pattern>\"] tables with sparsity and ratio"
            )
        return cls.from_dict(model, example_inputs, data["layers"], multiple=multiple, keep_ends=keep_ends,
                             residual=residual)

    @classmethod
    def from_dict(cls, model: nn.Module, example_inputs: Any, layers: Mapping[str, Any], *,
                  multiple: int = 1, keep_ends: bool = False, residual: bool = False) -> "PruningPlan":
        """Per-layer plan: ``{"conv1": {"sparsity": "filter", "ratio": 0.5}, "layer*.conv2": ...}``.

        Keys are layer names or glob patterns; the most specific match (an exact name beats
        a pattern, a longer pattern beats a shorter one) decides a layer's setting.

        ``keep_ends``: the first Conv/Linear layer the input reaches (its filters, also when a
        reader names them as channels) and the last one, the classifier, are left whole unless
        the plan names them exactly, as the reference implementations do: both are small and
        the accuracy depends on them most.

        ``residual``: also prune the channels a LayerNorm normalises over (a transformer's residual
        stream, one group across all its blocks); otherwise that group is left whole.
        """
        graph = trace(model, example_inputs)
        if not residual:
            for gid, where in graph.normalised.items():
                group = graph.groups[gid]
                if group.prunable:
                    group.frozen = f"{where}: a residual stream, pruned only when asked (prune_residual = true; residual=True)"
                    graph.notes.append(f"{group.frozen}: channels of {group.name} are not pruned")
        freeze_fixed_sizes(model, example_inputs, graph)
        units: list[Unit] = []
        skipped: list[tuple[str, str]] = []
        weighted = {name for name, m in graph.modules.items() if isinstance(m, _WEIGHTED)} | {
            s.module for s in graph.slices if s.weight}
        rules = _parse_rules(layers)
        for pattern in rules:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in weighted):
                raise StructADMMError(
                    f"plan names {pattern!r}, which matches no Conv or Linear layer of the model "
                    f"(layers: {', '.join(sorted(weighted)[:8])}{', ...' if len(weighted) > 8 else ''})"
                )
        per_layer = {name: rule for name in weighted if (rule := _match(name, rules)) is not None}
        protected: dict[int, str] = {}  # group id -> why it is kept whole
        wanted: dict[int, LeftWhole] = {}  # groups a rule asked for that stay whole (unless another rule prunes them)
        if keep_ends:
            order = list(dict.fromkeys(s.module for s in graph.slices if s.module in weighted))
            ends = {order[0]: "first layer", order[-1]: "classifier"} if order else {}
            for layer, role in ends.items():
                if layer in rules:
                    continue  # named exactly: the user asked for it
                rule = per_layer.pop(layer, None)
                if role == "first layer":  # its outputs, unless they are the residual stream asked for
                    protected.update({g.id: f"{layer} is the first layer, kept whole (keep_ends)"
                                      for g in graph.groups_of(layer, "out")
                                      if not (residual and g.id in graph.normalised)})
                skipped.append((layer, f"{role}, kept whole (keep_ends)"))
                for kind in (rule[0] if rule else ()):
                    if kind in (Sparsity.FILTER, Sparsity.CHANNEL):
                        for group in graph.groups_of(layer, "out" if kind is Sparsity.FILTER else "in"):
                            if group.frozen not in NOT_PRUNABLE:
                                why = f"{role}, kept whole (keep_ends; prune_ends = true prunes it)"
                                wanted.setdefault(group.id, LeftWhole(group, rule[1], why, by_choice=True))

        claimed: dict[int, ChannelUnit] = {}
        for layer, (kinds, ratio) in sorted(per_layer.items()):
            for kind in kinds:
                if kind in (Sparsity.FILTER, Sparsity.CHANNEL):
                    role = "out" if kind is Sparsity.FILTER else "in"
                    groups = graph.groups_of(layer, role)
                    if not groups and is_depthwise(graph.modules.get(layer)):
                        continue  # its channels are its input's: pruned with the layer that feeds it
                    if not groups:  # the trace never saw this layer's weight used as a layer's weight
                        notes = sorted((n for n in graph.notes if f"'{layer}'" in n), key=lambda n: "computed" not in n)
                        why = next((note.split(": channels reaching")[0] for note in notes),
                                   "the trace does not see this layer's weight used as a Conv or Linear weight")
                        skipped.append((f"{layer} ({kind.value})", why))
                    for group in groups:
                        if not group.prunable:
                            skipped.append((f"{layer} ({kind.value})", group.frozen))
                            if group.frozen not in NOT_PRUNABLE:
                                wanted.setdefault(group.id, LeftWhole(group, ratio, f"frozen: {group.frozen}"))
                        elif group.id in protected:
                            skipped.append((f"{layer} ({kind.value})", protected[group.id]))
                            wanted.setdefault(group.id, LeftWhole(group, ratio, protected[group.id], by_choice=True))
                        elif group.id in claimed:
                            # a residual stage names one group from several layers: keep the larger ratio
                            claimed[group.id].ratio = max(claimed[group.id].ratio, ratio)
                        else:
                            claimed[group.id] = ChannelUnit(group, kind, ratio, graph,
                                                            channel_multiple(graph, group, multiple))
                else:
                    tensor = next((s.tensor for s in graph.slices if s.module == layer and s.weight), "weight")
                    units.append(TensorUnit(f"{layer}.{tensor}" if layer else tensor, kind, ratio))
        units.extend(claimed.values())
        return cls(graph, units, skipped, [w for gid, w in sorted(wanted.items()) if gid not in claimed])

    # -- use -------------------------------------------------------------------------
    def param_names(self) -> list[str]:
        return sorted({p for u in self.units for p in u.params()})

    def masks_for(self, values: Mapping[str, torch.Tensor], within: Masks | None = None) -> Masks:
        """Masks of the projection of ``values`` (parameter name -> tensor) onto the plan (on the CPU).

        ``within``: masks of an earlier pruning (the plan's parameters); what they removed stays
        removed, and the plan's kept channels are chosen among the rest (the masks returned are
        contained in them).
        """
        return self._projection(values, within)[0]

    def channel_decisions(self, values: Mapping[str, torch.Tensor],
                          within: Masks | None = None) -> dict[int, KeepDecision]:
        """Per channel group the plan prunes (group id): what :meth:`masks_for` keeps of it, and why that many."""
        return self._projection(values, within)[1]

    def _projection(self, values: Mapping[str, torch.Tensor],
                    within: Masks | None) -> tuple[Masks, dict[int, KeepDecision]]:
        values = {p: values[p].detach().cpu() for p in self.param_names()}
        masks: Masks = {p: (within[p].detach().cpu().float().clone() if within is not None
                            else torch.ones_like(values[p], dtype=torch.float32)) for p in self.param_names()}
        decisions: dict[int, KeepDecision] = {}
        for unit in self.units:
            if isinstance(unit, ChannelUnit):
                decision = decisions[unit.group.id] = unit.decide(values, masks)
                unit.apply(decision.keep, values, masks)
            else:
                unit.project(values, masks)
        return masks, decisions

    def at_ratio(self, ratio: float) -> "PruningPlan":
        """The same units, every one at ``ratio`` (a stage of progressive pruning)."""
        check_ratio(ratio)
        return PruningPlan(self.graph, [dataclasses.replace(u, ratio=ratio) for u in self.units], self.skipped,
                           [dataclasses.replace(w, ratio=ratio) for w in self.left_whole])

    def project(self, model: nn.Module) -> Masks:
        """One-shot magnitude pruning: zero the model's pruned weights in place, return masks."""
        params = dict(model.named_parameters())
        masks = self.masks_for({p: params[p].detach() for p in self.param_names()})
        with torch.no_grad():
            for name, mask in masks.items():
                params[name].mul_(mask.to(params[name].dtype))
        return masks

    def on_the_way(self, progress: float) -> "PruningPlan":
        """The same plan a fraction of the way to its ratios, for progressive pruning.

        Every unit keeps ``(1 - ratio) ** progress`` of its groups: at ``progress`` 1 that is
        the plan itself, and equal steps in ``progress`` remove equal *fractions* of what is
        left (0.9375 in four steps: keep 1/2, 1/4, 1/8, 1/16).
        """
        if not 0 < progress <= 1:
            raise ValueError(f"progress must be in (0, 1], got {progress}")
        if progress == 1:
            return self
        units = [dataclasses.replace(u, ratio=1 - (1 - u.ratio) ** progress) for u in self.units]
        return PruningPlan(self.graph, units, self.skipped, self.left_whole)

    def to_state(self) -> dict[str, Any]:
        """The plan as plain numbers and strings (what a checkpoint stores): every unit, exactly."""
        units = []
        for u in self.units:
            if isinstance(u, ChannelUnit):
                units.append({"group": u.group.id, "name": u.name, "channels": u.group.size,
                              "sparsity": u.kind.value, "ratio": u.ratio, "multiple": u.multiple})
            else:
                units.append({"param": u.param, "sparsity": u.kind.value, "ratio": u.ratio})
        left_whole = [{"group": w.group.id, "name": w.group.name, "channels": w.group.size, "ratio": w.ratio,
                       "reason": w.reason, "by_choice": w.by_choice} for w in self.left_whole]
        return {"units": units, "skipped": [[layer, why] for layer, why in self.skipped], "left_whole": left_whole}

    @classmethod
    def from_state(cls, graph: ChannelGraph, state: Mapping[str, Any]) -> "PruningPlan":
        """The plan :meth:`to_state` wrote, on ``graph`` (a trace of the same model); its groups must match."""
        groups = {g.id: g for g in graph.groups}

        def group_of(row: Mapping[str, Any]) -> ChannelGroup:
            group = groups.get(row["group"])
            if group is None or (group.name, group.size) != (row["name"], row["channels"]):
                raise StructADMMError(f"the saved plan's channel group {row['name']} ({row['channels']} channels) "
                                      "is not in this model's channel graph")
            return group

        units: list[Unit] = []
        for row in state["units"]:
            kind = Sparsity(row["sparsity"])
            if "group" not in row:
                units.append(TensorUnit(row["param"], kind, row["ratio"]))
                continue
            units.append(ChannelUnit(group_of(row), kind, row["ratio"], graph, row["multiple"]))
        left_whole = [LeftWhole(group_of(row), row["ratio"], row["reason"], row.get("by_choice", False))
                      for row in state.get("left_whole", [])]
        return cls(graph, units, [(layer, why) for layer, why in state["skipped"]], left_whole)

    def summary(self) -> list[dict[str, Any]]:
        """One row per unit: name, sparsity, ratio and group size (channels) or weights."""
        rows = []
        for u in self.units:
            size = u.group.size if isinstance(u, ChannelUnit) else None
            rows.append({"unit": u.name, "sparsity": u.kind.value, "ratio": u.ratio, "channels": size})
        return rows


def _parse_rules(layers: Mapping[str, Any]) -> dict[str, tuple[tuple[Sparsity, ...], float]]:
    if not isinstance(layers, Mapping) or not layers:
        raise StructADMMError("a plan needs at least one layer entry: {'<layer or glob>': {'sparsity': ..., 'ratio': ...}}")
    rules = {}
    for pattern, entry in layers.items():
        if not isinstance(entry, Mapping):
            raise StructADMMError(f"plan entry {pattern!r} must be a table with sparsity and ratio")
        extra = set(entry) - {"sparsity", "ratio"}
        if extra:
            raise StructADMMError(f"plan entry {pattern!r} has unknown keys {sorted(extra)}; allowed: sparsity, ratio")
        if "ratio" not in entry:
            raise StructADMMError(f"plan entry {pattern!r} needs a ratio")
        kinds = parse_sparsity(entry.get("sparsity", "filter"))
        rules[str(pattern)] = (kinds, check_ratio(entry["ratio"], f"ratio of {pattern!r}"))
    return rules


def _match(name: str, rules: Mapping[str, tuple]) -> tuple | None:
    if name in rules:
        return rules[name]
    hits = [p for p in rules if fnmatch.fnmatchcase(name, p)]
    return rules[max(hits, key=len)] if hits else None

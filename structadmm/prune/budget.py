"""Budget-targeted plans: per-layer ratios chosen to meet a global MAC or latency target.

Instead of one ratio everywhere, every channel group gets its own ratio from a grid. Two
measurements drive the choice:

* **sensitivity** — for every group and grid ratio, the drop of a short accuracy probe when
  only that group is magnitude-pruned (no retraining): how much the layer minds;
* **cost** — dense MACs of every layer (:func:`~structadmm.exporters.counting.count_torch`),
  and for every group how much of each layer's input and output it makes up, so the MACs of
  any assignment of ratios follow, exactly, without running the model.

A greedy search then raises, one grid step at a time, the ratio of the group that saves the
most MACs per unit of sensitivity, until the MAC target is met. A latency target (a
speedup over dense on ONNX Runtime CPU) is met by searching over MAC targets with real
measurements of the compacted, exported candidate: latency is measured, not modelled. Each
measurement is made long enough to tell whether the candidate meets the target: the 95 %
confidence interval of its speedup (median of the per-round ratios) must exclude the target, else it
is measured again for twice as long, up to ``max_seconds``. Every measurement, with its interval,
is kept in :attr:`BudgetResult.measurements`.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from ..errors import StructADMMError
from ..exporters.counting import count_torch
from ..graph.channels import ChannelGraph, slice_groups
from .plan import PruningPlan

#: Ratios a group may take (0 = untouched).
GRID = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 0.9375)


@dataclass
class BudgetResult:
    plan: PruningPlan
    ratios: dict[str, float]  # group name -> ratio
    mac_ratio: float  # predicted dense MACs / pruned MACs
    speedup: float | None = None  # measured, for latency targets
    measurements: list[dict[str, Any]] = field(default_factory=list)  # latency targets: every candidate timed


@dataclass(frozen=True)
class Speedup:
    """A measured speedup over dense and the 95 % confidence interval of it."""

    speedup: float
    low: float
    high: float


class MacModel:
    """MACs of the model as a function of the channels each group keeps.

    A layer's MACs scale with the share of its outputs kept (its weight's *out* slices, or the
    *through* slice of a depthwise kernel, whose outputs are its inputs) times the share of its
    inputs kept (*in* slices). A group's channels can be spread unevenly over the layers it
    spans (a concat, a shuffle), so the figure follows *which* channels are kept, not only how
    many; given those, it is exact. The MACs themselves come from
    :func:`~structadmm.exporters.counting.count_torch`, the counter held to ONNX's.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, graph: ChannelGraph):
        cost = count_torch(model, example_inputs)
        self.base: dict[str, float] = {name: float(macs) for name, macs in cost.layers.items()}
        self.dense = float(cost.macs)
        self.fixed = self.dense - sum(self.base.values())  # done outside any layer: no channel of ours scales it
        # per layer, for its outputs and inputs: the number of positions, and per group the
        # group-local channel index at each of the positions it holds
        self.sides: dict[str, dict[str, tuple[int, list[tuple[int, np.ndarray]]]]] = {}
        for s in graph.slices:
            if not s.weight or s.module not in self.base:
                continue
            atoms = graph.atom_of[s.entries]
            groups = slice_groups(graph, s)
            locals_ = [(gid, graph.local_of[atoms[groups == gid]]) for gid in np.unique(groups).tolist()]
            self.sides.setdefault(s.module, {})["in" if s.role == "in" else "out"] = (len(groups), locals_)

    def expected_macs(self, ratios: Mapping[int, float]) -> float:
        """Total MACs when group ``g`` loses exactly the fraction ``ratios[g]`` of its channels at every
        position it holds (fractions of a channel allowed: what a ratio asks, before any rounding)."""
        total = self.fixed
        for module, base in self.base.items():
            factor = 1.0
            for positions, locals_ in self.sides.get(module, {}).values():
                removed = sum(ratios[gid] * len(local) for gid, local in locals_ if gid in ratios)
                factor *= (positions - removed) / positions
            total += base * factor
        return total

    def macs(self, keep: Mapping[int, Any]) -> float:
        """Total MACs when group ``g`` keeps the channels where ``keep[g]`` (a boolean vector over the
        group's channels) is true; groups not in ``keep`` keep every channel."""
        keep = {gid: np.asarray(k, dtype=bool) for gid, k in keep.items()}
        total = self.fixed
        for module, base in self.base.items():
            factor = 1.0
            for positions, locals_ in self.sides.get(module, {}).values():
                removed = sum(int((~keep[gid][local]).sum()) for gid, local in locals_ if gid in keep)
                factor *= (positions - removed) / positions
            total += base * factor
        return total


def plan_for_macs(model: nn.Module, example_inputs: Any, target: float, *,
                  probe: Callable[[nn.Module], float] | None = None, sparsity: str = "filter",
                  grid: tuple[float, ...] = GRID, multiple: int = 1) -> BudgetResult:
    """Per-group ratios so that dense MACs / pruned MACs >= ``target`` (e.g. 4.0).

    ``probe(model) -> score`` (higher is better, e.g. accuracy on a few hundred held-out
    samples) measures sensitivity; without it every group is equally sensitive and the
    search is purely MAC-driven.
    """
    return _Search(model, example_inputs, probe, sparsity, grid, multiple).run(target)


class _Search:
    """The measurements (costs, sensitivities) once, then searches for any MAC target."""

    def __init__(self, model: nn.Module, example_inputs: Any, probe: Callable[[nn.Module], float] | None,
                 sparsity: str, grid: tuple[float, ...], multiple: int = 1):
        if sparsity not in ("filter", "channel"):
            raise StructADMMError(f"budget targets choose channel ratios: use sparsity filter or channel, not {sparsity!r}")
        self.grid, self.multiple = grid, multiple
        self.base = PruningPlan.uniform(model, example_inputs, sparsity, 0.5, multiple=multiple)
        self.units = {u.group.id: u for u in self.base.units}
        if not self.units:
            raise StructADMMError("nothing in the model can be pruned, so no budget target can be met")
        self.cost = MacModel(model, example_inputs, self.base.graph)
        self.keeps = _keeps(model, self.base, grid)
        self.sensitivity = _sensitivity(model, self.base, probe, grid)

    def macs(self, steps: dict[int, int]) -> float:
        return self.cost.macs({gid: self.keeps[gid][s] for gid, s in steps.items() if s > 0})

    def run(self, target: float) -> BudgetResult:
        if not target > 1.0:
            raise StructADMMError(f"a MAC reduction target must be > 1 (e.g. 4 for 4x fewer MACs), got {target}")
        step = {gid: 0 for gid in self.units}
        goal, current = self.cost.dense / target, self.cost.dense
        while current > goal:
            best, best_value = None, -1.0
            for gid in self.units:
                # the next grid step that keeps fewer channels (rounding can make steps equal)
                for nxt in range(step[gid] + 1, len(self.grid)):
                    saved = current - self.macs({**step, gid: nxt})
                    if saved > 0:
                        break
                else:
                    continue
                sens = self.sensitivity[gid]
                value = saved / (max(sens[nxt] - sens[step[gid]], 0.0) + 1e-3)
                if value > best_value:
                    best, best_value, best_step = gid, value, nxt
            if best is None:
                raise StructADMMError(f"a {target:g}x MAC reduction is out of reach: at most "
                                      f"{self.cost.dense / current:.2f}x with the groups that can be pruned")
            step[best] = best_step
            current = self.macs(step)
        units = []
        for gid, s in step.items():
            if s > 0:
                units.append(_with_ratio(self.units[gid], self.grid[s]))
        plan = PruningPlan(self.base.graph, units, self.base.skipped)
        return BudgetResult(plan, {u.name: u.ratio for u in units}, self.cost.dense / current)


def _with_ratio(unit: Any, ratio: float) -> Any:
    twin = copy.copy(unit)
    twin.ratio = ratio
    return twin


def _keeps(model: nn.Module, plan: PruningPlan, grid: tuple[float, ...]) -> dict[int, list[np.ndarray | None]]:
    """Per group and grid ratio, the channels the group keeps when pruned alone (None: all of them)."""
    params = dict(model.named_parameters())
    result: dict[int, list[np.ndarray | None]] = {}
    for unit in plan.units:
        values = {p: params[p].detach() for p in unit.params()}
        fresh = {p: torch.ones_like(v) for p, v in values.items()}
        result[unit.group.id] = [None] + [_with_ratio(unit, r).keep(values, fresh).numpy() for r in grid[1:]]
    return result


def _sensitivity(model: nn.Module, plan: PruningPlan,
                 probe: Callable[[nn.Module], float] | None, grid: tuple[float, ...]) -> dict[int, list[float]]:
    """Score drop per group and grid ratio when only that group is pruned (one shot)."""
    if probe is None:
        return {u.group.id: [0.0] * len(grid) for u in plan.units}
    reference = probe(model)
    params = dict(model.named_parameters())
    result: dict[int, list[float]] = {}
    for unit in plan.units:
        drops = [0.0]
        original = {p: params[p].detach().clone() for p in unit.params()}
        for ratio in grid[1:]:
            masks = {p: torch.ones_like(v) for p, v in original.items()}
            _with_ratio(unit, ratio).project(original, masks)
            with torch.no_grad():
                for p, mask in masks.items():
                    params[p].copy_(original[p] * mask)
            drops.append(max(drops[-1], reference - probe(model)))  # monotone: more pruning never helps
        with torch.no_grad():
            for p, value in original.items():
                params[p].copy_(value)
        result[unit.group.id] = drops
    return result


def plan_for_latency(model: nn.Module, example_inputs: Any, speedup: float, *,
                     probe: Callable[[nn.Module], float] | None = None, sparsity: str = "filter",
                     batch: int = 8, threads: int = 2, min_seconds: float = 1.0, max_seconds: float = 8.0,
                     multiple: int = 1,
                     measure: Callable[[nn.Module, nn.Module, float], Speedup] | None = None) -> BudgetResult:
    """Per-group ratios so that the compacted model runs ``speedup`` times faster than dense.

    Searches over MAC targets (bisection on the log scale), measuring each candidate's
    speedup with ``measure(dense, small, seconds)`` — by default ONNX Runtime CPU, dense and
    candidate interleaved in this process for ``seconds`` (run-by-run pairs give an interval that
    narrows as the measurement grows; a fresh process per round would not). A measurement whose
    interval contains the target is repeated for twice as long, up to ``max_seconds``; if it still
    cannot tell, the point estimate decides and the record says ``"resolved": False``.
    """
    if not speedup > 1.0:
        raise StructADMMError(f"a latency target is a speedup over dense and must be > 1, got {speedup}")
    if not 0 < min_seconds <= max_seconds:
        raise StructADMMError(f"need 0 < min_seconds <= max_seconds, got {min_seconds} and {max_seconds}")
    search = _Search(model, example_inputs, probe, sparsity, GRID, multiple)
    measure = measure or (lambda dense, small, seconds: ort_speedup(dense, small, example_inputs, batch, threads,
                                                                     seconds))
    weak, strong, ceiling = 1.0, None, None  # MAC targets: too weak; meets the speedup; unreachable
    best: BudgetResult | None = None
    records: list[dict[str, Any]] = []
    target = speedup
    for _ in range(8):
        try:
            candidate = search.run(target)
        except StructADMMError:
            ceiling = target
        else:
            small = _compact_copy(model, example_inputs, candidate.plan)
            seconds = min_seconds
            while True:
                measured = measure(model, small, seconds)
                resolved = not measured.low <= speedup <= measured.high
                if resolved or seconds * 2 > max_seconds:
                    break
                seconds *= 2
            candidate.speedup = measured.speedup
            records.append({"mac_target": target, "mac_ratio": candidate.mac_ratio, "speedup": measured.speedup,
                            "low": measured.low, "high": measured.high, "seconds": seconds, "resolved": resolved})
            if candidate.speedup >= speedup:
                best, strong = candidate, target
            else:
                weak = target
        upper = strong or ceiling
        if strong is not None and strong / weak < 1.05:
            break
        last = records[-1]["speedup"] if records else 1.0
        target = (weak * upper) ** 0.5 if upper else target * max(1.25, speedup / max(last, 1e-6))
    if best is None:
        raise StructADMMError(f"a {speedup:g}x speedup was not reached (best measured: "
                              f"{max((r['speedup'] for r in records), default=1.0):.2f}x); ask for less, "
                              "or use a larger batch")
    best.measurements = records
    return best


def _compact_copy(model: nn.Module, example_inputs: Any, plan: PruningPlan) -> nn.Module:
    from .surgery import compact

    probe_model = copy.deepcopy(model)
    params = dict(probe_model.named_parameters())
    masks = plan.masks_for({p: params[p].detach() for p in plan.param_names()})
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)
    return compact(probe_model, example_inputs)


def ort_speedup(dense: nn.Module, small: nn.Module, example_inputs: Any, batch: int, threads: int,
                 min_seconds: float) -> Speedup:
    from ..bench import benchmark
    from ..exporters import export_onnx

    example = example_inputs[0] if isinstance(example_inputs, tuple) else example_inputs
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"dense": Path(tmp) / "dense.onnx", "pruned": Path(tmp) / "pruned.onnx"}
        export_onnx(dense, example, paths["dense"])
        export_onnx(small, example, paths["pruned"])
        report = benchmark(paths, batch_sizes=(batch,), threads=threads, min_seconds=min_seconds, min_runs=20,
                           isolate=False)
    row = report.to_rows(dense="dense", pruned="pruned")[0]
    return Speedup(float(row["speedup_per_round"]), float(row["speedup_low"]), float(row["speedup_high"]))

"""Whether a plan reaches the pruning ratio it was asked for and, where it does not, why.

A ratio is a request: the plan keeps what its own rules allow. Per channel group a rule names,
the request is ``size * (1 - ratio)`` kept channels, and what the plan keeps is what its
projection keeps on the model's weights (:meth:`PruningPlan.channel_decisions`), or every
channel of a group the plan leaves whole (:attr:`PruningPlan.left_whole`). Overall, the same
summed over those groups, and in MACs (:class:`~.budget.MacModel`): requested = every group
losing exactly its ratio of channels, reached = the channels the plan keeps.

A group reaches its ratio when it keeps at most half a channel or 5 % (:data:`TOLERANCE`)
more than asked (the nearest whole count is no shortfall); the plan as a whole when its kept
channels and its kept MACs are within 5 % of what was asked. Where it falls short, every group
that keeps more than asked gets the plan's own reasons, from the steps that set its count
(:class:`~.plan.KeepDecision`) or from why it was left whole: a count rounded up to a multiple
of ``channel_multiple``, at least one channel kept, equal-count blocks, one channel per
producing layer, a frozen group (the graph's reason). The ends ``keep_ends`` keeps whole are
the plan's default policy, not a shortfall: they count as asked to stay whole.
Shape-wise and irregular units are exact up to one column or weight and are not checked.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .budget import MacModel
from .plan import ChannelUnit, KeepDecision, PruningPlan

TOLERANCE = 0.05  # a kept count or kept MACs up to 5 % above the request still reach it

WHOLE_CHANNELS = "rounded to whole channels"
AT_LEAST_ONE = "at least one channel kept"
BLOCKS = "equal-count blocks (a grouped conv, split or chunk keeps the same count in every block)"
PRODUCERS = "every producing layer keeps at least one channel"


def multiple_reason(multiple: int) -> str:
    return f"rounded up to a multiple of channel_multiple = {multiple}"


@dataclass
class GroupReach:
    """One channel group: the channels a rule asked to keep, those the plan keeps, and why more."""

    group: str
    channels: int
    requested_ratio: float
    requested_kept: float
    kept: int
    reasons: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return 1.0 - self.kept / self.channels

    @property
    def reached(self) -> bool:
        return self.kept <= max(self.requested_kept + 0.5, self.requested_kept * (1 + TOLERANCE)) + 1e-9


@dataclass
class Reach:
    """The request against the plan: per group, overall in channels and in MACs."""

    ratio: float | None  # the one ratio asked of every group (None: a plan file's or a budget's own ratios)
    groups: list[GroupReach]
    dense_macs: float
    requested_macs: float
    macs: float

    @property
    def channels(self) -> int:
        return sum(g.channels for g in self.groups)

    @property
    def requested_kept(self) -> float:
        return sum(g.requested_kept for g in self.groups)

    @property
    def kept(self) -> int:
        return sum(g.kept for g in self.groups)

    @property
    def reached(self) -> bool:
        channels_ok = self.kept <= self.requested_kept * (1 + TOLERANCE) + 0.5
        macs_ok = self.macs <= self.requested_macs * (1 + TOLERANCE)
        return channels_ok and macs_ok

    def short_groups(self) -> list[GroupReach]:
        """The groups that keep more than asked, with their reasons (all of them when the plan falls short)."""
        return [g for g in self.groups if g.reasons and (not g.reached or not self.reached)]

    def message(self) -> str:
        """One line: requested against reached, overall, then the groups short of it by reason."""
        asked = f"ratio {self.ratio:g}" if self.ratio is not None else "the plan's ratios"
        removed, requested = 1 - self.kept / max(self.channels, 1), 1 - self.requested_kept / max(self.channels, 1)
        by_reason: dict[str, list[str]] = {}
        for g in self.short_groups():
            for reason in g.reasons:
                by_reason.setdefault(reason, []).append(g.group)
        why = "; ".join(f"{reason}: {_names(groups)}" for reason, groups in by_reason.items())
        return (f"{asked} not reached: {removed:.3f} of the channels removed ({requested:.3f} asked), "
                f"{self.dense_macs / max(self.macs, 1):.2f}x fewer MACs "
                f"({self.dense_macs / max(self.requested_macs, 1):.2f}x asked); {why}")

    def to_dict(self) -> dict[str, Any]:
        channels = max(self.channels, 1)
        return {
            "reached": self.reached, "ratio": self.ratio, "tolerance": TOLERANCE, "message": self.message(),
            "channels": {"total": self.channels, "requested_kept": self.requested_kept, "kept": self.kept,
                         "requested_removed": 1 - self.requested_kept / channels,
                         "removed": 1 - self.kept / channels},
            "macs": {"dense": self.dense_macs, "requested": self.requested_macs, "reached": self.macs,
                     "requested_reduction": self.dense_macs / max(self.requested_macs, 1),
                     "reduction": self.dense_macs / max(self.macs, 1)},
            "groups": [{**asdict(g), "ratio": g.ratio, "reached": g.reached} for g in self.groups],
        }


def check_reach(model: nn.Module, example_inputs: Any, plan: PruningPlan, ratio: float | None = None) -> Reach:
    """Compare what ``plan`` keeps of ``model`` (its current weights) with what its rules asked.

    ``ratio``: the one ratio the plan was made with (a uniform plan), for the message; the
    per-group requests are the plan's own either way.
    """
    params = dict(model.named_parameters())
    decisions = plan.channel_decisions({p: params[p].detach() for p in plan.param_names()})
    units = {u.group.id: u for u in plan.units if isinstance(u, ChannelUnit)}
    groups: list[GroupReach] = []
    requested: dict[int, float] = {}
    for gid, unit in units.items():
        decision = decisions[gid]
        requested[gid] = unit.ratio
        groups.append(GroupReach(unit.name, unit.group.size, unit.ratio, decision.target, decision.kept,
                                 _reasons(decision, unit.multiple)))
    for whole in plan.left_whole:
        asked = 0.0 if whole.by_choice else whole.ratio  # an end kept whole by default was never requested
        requested[whole.group.id] = asked
        size = whole.group.size
        groups.append(GroupReach(whole.group.name, size, asked, size * (1 - asked), size,
                                 [whole.reason] if asked > 0 else []))
    cost = MacModel(model, example_inputs, plan.graph)
    macs = cost.macs({gid: decisions[gid].keep.numpy() for gid in units})
    return Reach(ratio, groups, cost.dense, cost.expected_macs(requested), macs)


def _reasons(d: KeepDecision, multiple: int) -> list[str]:
    """Each step of the plan that kept more channels than the ratio asked for."""
    reasons = []
    if d.whole > d.target + 0.5:
        reasons.append(AT_LEAST_ONE)
    elif d.whole > d.target + 1e-9 and d.kept == d.whole:
        reasons.append(WHOLE_CHANNELS)
    if d.rounded > d.whole:
        reasons.append(multiple_reason(multiple))
    if d.balanced > min(d.rounded, d.alive):
        reasons.append(BLOCKS)
    if d.kept > d.balanced:
        reasons.append(PRODUCERS)
    return reasons if d.kept > d.target + 1e-9 else []


def _names(groups: list[str], limit: int = 6) -> str:
    shown = ", ".join(groups[:limit])
    return shown + (f" and {len(groups) - limit} more" if len(groups) > limit else "")


def kept_channels(plan: PruningPlan, masks: dict[str, torch.Tensor]) -> dict[str, int]:
    """Per channel group the plan prunes: how many channels ``masks`` keep (group name -> count)."""
    return {u.name: int(u.alive(masks).sum()) for u in plan.units if isinstance(u, ChannelUnit)}

"""Budget-targeted plans: the MAC model is exact (depthwise convs included, on every zoo model and
on random graphs), targets are met, sensitivity steers ratios."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from archs import ARCHS
from random_nets import RandomNet
from zoo_cases import zoo_case, zoo_params
from structadmm.errors import StructADMMError
from structadmm.exporters.counting import count_torch
from structadmm.models import DigitsCNN
from structadmm.prune.budget import MacModel, Speedup, plan_for_latency, plan_for_macs
from structadmm.prune.plan import PruningPlan
from structadmm.prune.surgery import compact, removable_channels


def _compacted_macs(model: nn.Module, x: torch.Tensor, plan: PruningPlan) -> float:
    pruned = copy.deepcopy(model)
    params = dict(pruned.named_parameters())
    with torch.no_grad():
        for name, mask in plan.masks_for({p: params[p].detach() for p in plan.param_names()}).items():
            params[name].mul_(mask)
    return count_torch(compact(pruned, x), x).macs


def _prediction_and_truth(model: nn.Module, x: torch.Tensor, ratio: float = 0.5) -> tuple[float, int]:
    """The MAC model's figure for the channels surgery removes, and the compacted model's MACs."""
    plan = PruningPlan.uniform(model, x, "filter", ratio)
    cost = MacModel(model, x, plan.graph)
    plan.project(model)
    keep = {g.id: (~removable_channels(plan.graph, g)).numpy() for g in plan.graph.prunable_groups()}
    keep = {gid: k for gid, k in keep.items() if not k.all()}
    assert keep, "nothing was pruned: the check would compare the dense model with itself"
    return cost.macs(keep), count_torch(compact(model, x, lower=False), x).macs


class MBConv(nn.Module):
    """MobileNetV2's inverted residual: 1x1 expand, depthwise 3x3, 1x1 project, residual."""

    def __init__(self, c: int = 16, expand: int = 6) -> None:
        super().__init__()
        hidden = c * expand
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU6())
        self.expand = nn.Sequential(nn.Conv2d(c, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
                                nn.BatchNorm2d(hidden), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(hidden, c, 1, bias=False), nn.BatchNorm2d(c))
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x)))
        return self.fc(x.mean((2, 3)))


def test_mac_model_counts_depthwise_convs() -> None:
    torch.manual_seed(0)
    model, x = MBConv().eval(), torch.randn(2, 3, 16, 16)
    predicted, measured = _prediction_and_truth(model, x)
    assert predicted == pytest.approx(measured, rel=1e-9)
    assert MacModel(model, x, PruningPlan.uniform(model, x).graph).dense == count_torch(model, x).macs


def test_mac_target_prediction_is_what_compaction_gives_with_depthwise_convs() -> None:
    torch.manual_seed(0)
    model, x = MBConv(8).eval(), torch.randn(2, 3, 16, 16)
    result = plan_for_macs(model, x, 3.0)
    assert "expand.0" in result.ratios  # the group the depthwise conv passes through is pruned
    measured = count_torch(model, x).macs / _compacted_macs(model, x, result.plan)
    assert measured == pytest.approx(result.mac_ratio, rel=1e-9) and measured >= 3.0


@pytest.mark.parametrize("name", zoo_params())
def test_mac_model_is_exact_on_the_zoo(name: str) -> None:
    predicted, measured = _prediction_and_truth(*zoo_case(name))
    assert predicted == pytest.approx(measured, rel=1e-9)


@pytest.mark.parametrize("seed", range(12))
def test_mac_model_is_exact_on_random_graphs(seed: int) -> None:
    torch.manual_seed(seed)
    model = RandomNet(seed).eval()
    predicted, measured = _prediction_and_truth(model, model.example_input(), ratio=0.6)
    assert predicted == pytest.approx(measured, rel=1e-9)


@pytest.mark.parametrize("name", ["resnext", "inception", "densenet", "r3d"])
def test_mac_model_predicts_the_compacted_model(name: str) -> None:
    build, shape = ARCHS[name]
    model, x = build().eval(), torch.randn(shape)
    plan = PruningPlan.uniform(model, x, "filter", 0.5)
    cost = MacModel(model, x, plan.graph)
    values = dict(model.named_parameters())
    fresh = {p: torch.ones_like(values[p]) for p in plan.param_names()}
    kept = {unit.group.id: unit.keep(values, fresh) for unit in plan.units}
    assert cost.macs(kept) == pytest.approx(_compacted_macs(model, x, plan), rel=1e-9)
    assert cost.macs({}) == pytest.approx(cost.dense)


@pytest.mark.parametrize("target", [2.0, 4.0, 8.0])
def test_mac_target_is_met(target: float) -> None:
    model, x = DigitsCNN().eval(), torch.randn(4, 1, 16, 16)
    result = plan_for_macs(model, x, target)
    dense = count_torch(model, x).macs
    measured = dense / _compacted_macs(model, x, result.plan)
    assert measured >= target * 0.999
    assert measured == pytest.approx(result.mac_ratio, rel=1e-6)
    assert measured < target * 1.6  # no gross overshoot


def test_sensitive_layers_are_pruned_less() -> None:
    """A probe that only cares about features.7's channels protects them."""
    model, x = DigitsCNN().eval(), torch.randn(4, 1, 16, 16)
    reference = model.features[7].weight.detach().abs().sum()

    def probe(net: nn.Module) -> float:
        return float(net.features[7].weight.detach().abs().sum() / reference)

    result = plan_for_macs(model, x, 3.0, probe=probe)
    assert "features.7" not in result.ratios or result.ratios["features.7"] < min(
        r for name, r in result.ratios.items() if name != "features.7")
    # the probe must leave the model as it found it
    assert float(model.features[7].weight.detach().abs().sum()) == pytest.approx(float(reference))


def test_latency_target_searches_with_measurements() -> None:
    model, x = DigitsCNN().eval(), torch.randn(4, 1, 16, 16)
    dense_macs = count_torch(model, x).macs

    def fake_measure(dense: nn.Module, small: nn.Module, seconds: float) -> Speedup:  # speed tracks MACs^0.8
        value = (dense_macs / count_torch(small, x).macs) ** 0.8
        return Speedup(value, value, value)

    result = plan_for_latency(model, x, 3.0, measure=fake_measure)
    assert result.speedup >= 3.0 and result.mac_ratio >= 3.0 ** (1 / 0.8) * 0.999
    assert result.measurements and all(r["resolved"] and r["seconds"] == 1.0 for r in result.measurements)


def test_latency_search_measures_longer_until_the_target_is_resolved() -> None:
    model, x = DigitsCNN().eval(), torch.randn(4, 1, 16, 16)
    dense_macs = count_torch(model, x).macs
    asked: list[float] = []

    def noisy_measure(dense: nn.Module, small: nn.Module, seconds: float) -> Speedup:
        asked.append(seconds)  # the interval halves with every doubling: +-1.6 at 1 s ... +-0.2 at 8 s
        value = (dense_macs / count_torch(small, x).macs) ** 0.8
        return Speedup(value, value - 1.6 / seconds, value + 1.6 / seconds)

    result = plan_for_latency(model, x, 3.0, measure=noisy_measure, min_seconds=1.0, max_seconds=8.0)
    assert set(asked) > {1.0} and max(asked) <= 8.0
    for record in result.measurements:
        spread = record["high"] - record["low"]
        assert spread == pytest.approx(3.2 / record["seconds"])
        # resolved: the interval excludes the target; else it ran as long as allowed
        assert record["resolved"] == (not record["low"] <= 3.0 <= record["high"])
        assert record["resolved"] or record["seconds"] == 8.0
    assert any(record["seconds"] > 1.0 for record in result.measurements)
    with pytest.raises(StructADMMError, match="min_seconds <= max_seconds"):
        plan_for_latency(model, x, 3.0, measure=noisy_measure, min_seconds=2.0, max_seconds=1.0)


def test_unreachable_and_bad_targets_are_clear_errors() -> None:
    model, x = DigitsCNN().eval(), torch.randn(4, 1, 16, 16)
    with pytest.raises(StructADMMError, match="out of reach"):
        plan_for_macs(model, x, 10_000.0)
    with pytest.raises(StructADMMError, match="must be > 1"):
        plan_for_macs(model, x, 0.5)
    with pytest.raises(StructADMMError, match="filter or channel"):
        plan_for_macs(model, x, 2.0, sparsity="shape")


def test_default_latency_measure_gives_the_per_round_speedup_and_its_interval() -> None:
    from structadmm.prune.budget import ort_speedup

    model, x = DigitsCNN().eval(), torch.randn(4, 1, 16, 16)
    measured = ort_speedup(model, model, x, batch=4, threads=1, min_seconds=0.05)
    assert isinstance(measured, Speedup)
    assert 0 < measured.low <= measured.speedup <= measured.high

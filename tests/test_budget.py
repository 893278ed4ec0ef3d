"""Budget-targeted plans: the MAC model is exact, targets are met, sensitivity steers ratios."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from archs import ARCHS
from structadmm.errors import StructADMMError
from structadmm.models import DigitsCNN
from structadmm.pipeline.budget import MacModel, Speedup, _layer_macs, plan_for_latency, plan_for_macs
from structadmm.pipeline.plan import PruningPlan
from structadmm.pipeline.surgery import compact


def _compacted_macs(model: nn.Module, x: torch.Tensor, plan: PruningPlan) -> float:
    pruned = copy.deepcopy(model)
    params = dict(pruned.named_parameters())
    with torch.no_grad():
        for name, mask in plan.masks_for({p: params[p].detach() for p in plan.param_names()}).items():
            params[name].mul_(mask)
    return sum(_layer_macs(compact(pruned, x), x).values())


@pytest.mark.parametrize("name", ["resnext", "inception", "densenet", "r3d"])
def test_mac_model_predicts_the_compacted_model(name: str) -> None:
    build, shape = ARCHS[name]
    model, x = build().eval(), torch.randn(shape)
    plan = PruningPlan.uniform(model, x, "filter", 0.5)
    cost = MacModel(model, x, plan.graph)
    kept = {}
    values = dict(model.named_parameters())
    fresh = {p: torch.ones_like(values[p]) for p in plan.param_names()}
    for unit in plan.units:
        keep = unit.keep(values, fresh)
        kept[unit.group.id] = float(keep.sum()) / unit.group.size
    assert cost.macs(kept) == pytest.approx(_compacted_macs(model, x, plan), rel=1e-6)
    assert cost.macs({}) == pytest.approx(cost.dense)


@pytest.mark.parametrize("target", [2.0, 4.0, 8.0])
def test_mac_target_is_met(target: float) -> None:
    model, x = DigitsCNN().eval(), torch.randn(4, 1, 16, 16)
    result = plan_for_macs(model, x, target)
    dense = sum(_layer_macs(model, x).values())
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
    dense_macs = sum(_layer_macs(model, x).values())

    def fake_measure(dense: nn.Module, small: nn.Module, seconds: float) -> Speedup:  # speed tracks MACs^0.8
        value = (dense_macs / sum(_layer_macs(small, x).values())) ** 0.8
        return Speedup(value, value, value)

    result = plan_for_latency(model, x, 3.0, measure=fake_measure)
    assert result.speedup >= 3.0 and result.mac_ratio >= 3.0 ** (1 / 0.8) * 0.999
    assert result.measurements and all(r["resolved"] and r["seconds"] == 1.0 for r in result.measurements)


def test_latency_search_measures_longer_until_the_target_is_resolved() -> None:
    model, x = DigitsCNN().eval(), torch.randn(4, 1, 16, 16)
    dense_macs = sum(_layer_macs(model, x).values())
    asked: list[float] = []

    def noisy_measure(dense: nn.Module, small: nn.Module, seconds: float) -> Speedup:
        asked.append(seconds)  # the interval halves with every doubling: +-1.6 at 1 s ... +-0.2 at 8 s
        value = (dense_macs / sum(_layer_macs(small, x).values())) ** 0.8
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
    from structadmm.pipeline.budget import _ort_speedup

    model, x = DigitsCNN().eval(), torch.randn(4, 1, 16, 16)
    measured = _ort_speedup(model, model, x, batch=4, threads=1, min_seconds=0.05)
    assert isinstance(measured, Speedup)
    assert 0 < measured.low <= measured.speedup <= measured.high

"""The model zoo: every model builds, runs, traces with torch.fx, matches torchvision's size, and prunes,
compacts and exports to exactly the expected channel and column counts."""

from __future__ import annotations

import pytest
import torch
import torch.fx

import structadmm.models.zoo  # noqa: F401  (registers the zoo)
from structadmm.layers import CONVS
from structadmm.models.registry import get_spec

ZOO = [
    "lenet5", "alexnet-cifar", "alexnet", "vgg16", "resnet18", "resnet50",
    "resnet20", "resnet56", "mobilenetv2", "c3d-small", "mnist1d-cnn",
]  # fmt: skip

# Equal counts to torchvision's models prove the layouts are the same layer for layer.
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
    "vgg16": 138_365_992,  # vgg16_bn
    "mobilenetv2": 3_504_872,  # mobilenet_v2
    "alexnet": 61_100_840,
}

# Paper (option-A) sizes; option-B shortcuts add a few 1x1 convs, so allow 10%.
CIFAR_RESNET_PARAMS = {"resnet20": 0.27e6, "resnet56": 0.85e6}


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ZOO)
def test_forward_and_fx_trace(name: str) -> None:
    spec = get_spec(name)
    torch.manual_seed(0)
    model = spec.build().eval()
    x = spec.example_input(batch=1)
    with torch.no_grad():
        out = model(x)
        traced = torch.fx.symbolic_trace(model)
        traced_out = traced(x)
    assert out.shape == (1, spec.num_classes)
    assert torch.allclose(out, traced_out)


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_torchvision_param_counts(name: str) -> None:
    assert _num_params(get_spec(name).build()) == TORCHVISION_PARAMS[name]


@pytest.mark.parametrize("name", sorted(CIFAR_RESNET_PARAMS))
def test_cifar_resnet_param_counts(name: str) -> None:
    expected = CIFAR_RESNET_PARAMS[name]
    assert abs(_num_params(get_spec(name).build()) - expected) <= 0.1 * expected


def test_build_is_fresh_and_seeded() -> None:
    spec = get_spec("resnet20")
    torch.manual_seed(0)
    a = spec.build()
    torch.manual_seed(0)
    b = spec.build()
    assert a is not b
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_only_standard_modules() -> None:
    allowed = (
        *CONVS, torch.nn.BatchNorm1d, torch.nn.BatchNorm2d,
        torch.nn.BatchNorm3d, torch.nn.ReLU, torch.nn.ReLU6, torch.nn.MaxPool1d, torch.nn.MaxPool2d,
        torch.nn.MaxPool3d, torch.nn.AdaptiveAvgPool1d, torch.nn.AdaptiveAvgPool2d, torch.nn.AdaptiveAvgPool3d,
        torch.nn.Dropout, torch.nn.Flatten,
        torch.nn.Linear,
    )  # fmt: skip
    for name in ZOO:
        traced = torch.fx.symbolic_trace(get_spec(name).build())
        leaves = {n.target for n in traced.graph.nodes if n.op == "call_module"}
        for target in leaves:
            assert isinstance(traced.get_submodule(target), allowed), (name, target)


FAST_ZOO = ["lenet5", "resnet20", "alexnet-cifar", "c3d-small", "mnist1d-cnn"]


def _nonzero(model: torch.nn.Module) -> int:
    return sum(int(p.count_nonzero()) for p in model.parameters())


def _prune_compact_export(name: str, sparsity: str, tmp_path) -> None:
    from structadmm.exporters import export_onnx
    from structadmm.prune import PruningPlan
    from structadmm.prune.sparsity import keep_count
    from structadmm.prune.surgery import compact_with_report

    spec = get_spec(name)
    torch.manual_seed(0)
    model = spec.build().eval()
    x = spec.example_input(2)
    plan = PruningPlan.uniform(model, x, sparsity, 0.5)
    masks = plan.project(model)
    small, cuts = compact_with_report(model, x)  # parity with the masked model is checked inside
    result = export_onnx(small, x, tmp_path / f"{name}.onnx")  # and ONNX Runtime against torch
    assert result.max_abs_diff is not None
    assert plan.units
    if sparsity == "filter":  # every channel group kept exactly what the plan asked for; the rest is gone
        kept = {cut.group: cut.kept for cut in cuts}
        assert {u.name: kept.get(u.name) for u in plan.units} == {
            u.name: keep_count(u.group.size, 0.5) for u in plan.units}
        assert _num_params(small) < _num_params(model)
        assert _nonzero(small) == _nonzero(model)  # surgery removed zeros only: every non-zero weight is kept
    else:  # every pruned weight kept exactly half of its GEMM columns (surgery may then drop outputs nobody reads)
        for param, mask in masks.items():
            columns = mask.flatten(1).any(0)
            assert int(columns.sum()) == keep_count(columns.numel(), 0.5), param


@pytest.mark.parametrize("sparsity", ["filter", "shape"])
@pytest.mark.parametrize("name", FAST_ZOO)
def test_small_zoo_models_prune_compact_and_export(name: str, sparsity: str, tmp_path) -> None:
    _prune_compact_export(name, sparsity, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("sparsity", ["filter", "shape"])
@pytest.mark.parametrize("name", sorted(set(ZOO) - set(FAST_ZOO)))
def test_large_zoo_models_prune_compact_and_export(name: str, sparsity: str, tmp_path) -> None:
    _prune_compact_export(name, sparsity, tmp_path)

"""Real-zoo patterns: every architecture prunes, compacts exactly and exports with parity."""

from __future__ import annotations

import pytest
import torch

from archs import ARCHS
from nets import randomize_bn
from structadmm.exporters import export_onnx
from structadmm.prune.plan import PruningPlan
from structadmm.prune.sparsity import keep_count
from structadmm.prune.surgery import compact_with_report


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(ARCHS))
@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_arch_compacts_exactly_and_exports(name: str, ratio: float, tmp_path) -> None:
    build, shape = ARCHS[name]
    model = randomize_bn(build()).eval()
    x = torch.randn(shape)
    plan = PruningPlan.uniform(model, x, "filter", ratio)
    assert plan.units, plan.skipped
    plan.project(model)
    small, cuts = compact_with_report(model, x)  # raises ParityError on any difference
    assert cuts and _params(small) < _params(model)
    kept = {cut.group: cut.kept for cut in cuts}
    for unit in plan.units:
        if not plan.graph.blocks_in(unit.group):  # equal-count blocks may round the count
            assert kept[unit.name] == keep_count(unit.group.size, unit.ratio)
    result = export_onnx(small, x, tmp_path / f"{name}.onnx")
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4


EXPECTED_LEFT_ALONE = {
    "convnext": ("block.pwconv2", "layer norm over the channel axis in 'block.norm'"),
    "spatial-attention": ("conv1.0", "'mean' over the channel axis"),
    "hard-coded-view": ("conv2.0", "'view' at node 'view' gives these channels a fixed count"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_LEFT_ALONE))
def test_what_cannot_be_pruned_is_named_and_the_rest_is_pruned(name: str) -> None:
    build, shape = ARCHS[name]
    plan = PruningPlan.uniform(build(), torch.randn(shape), "filter", 0.5)
    layer, reason = EXPECTED_LEFT_ALONE[name]
    assert any(skipped.startswith(layer) and reason in why for skipped, why in plan.skipped), plan.skipped
    assert plan.units  # the rest of the model is still pruned
    assert any(reason in note for note in plan.graph.notes)


def test_shufflenet_ties_the_shuffled_halves() -> None:
    build, shape = ARCHS["shufflenet"]
    plan = PruningPlan.uniform(build(), torch.randn(shape), "filter", 0.5)
    trunk = next(u for u in plan.units if "stem.0" in u.group.producers)
    # the stem, and both units' transformed halves, feed one shuffled trunk of 16 channels
    assert set(trunk.group.producers) == {"stem.0", "units.0.branch.5", "units.1.branch.5"}
    assert trunk.group.size == 16


def test_grouped_conv_keeps_equal_channels_per_group() -> None:
    build, shape = ARCHS["resnext"]
    model = randomize_bn(build()).eval()
    x = torch.randn(shape)
    plan = PruningPlan.from_dict(model, x, {"reduce.0": {"sparsity": "filter", "ratio": 0.6},
                                            "grouped.0": {"sparsity": "filter", "ratio": 0.3}})
    plan.project(model)
    small, _ = compact_with_report(model, x)
    grouped = small.grouped[0]
    assert grouped.groups == 4
    assert grouped.in_channels % 4 == 0 and grouped.out_channels % 4 == 0
    assert grouped.in_channels < 16 and grouped.out_channels < 16


@pytest.mark.parametrize("sparsity", ["shape", "irregular", "filter+shape", "channel+irregular"])
def test_every_sparsity_type_projects_every_arch(sparsity: str) -> None:
    for name, (build, shape) in sorted(ARCHS.items()):
        model = build()
        x = torch.randn(shape)
        masks = PruningPlan.uniform(model, x, sparsity, 0.5).project(model)
        params = dict(model.named_parameters())
        assert masks, name
        for pname, mask in masks.items():
            assert torch.all(params[pname][mask == 0] == 0), (name, pname)
            if sparsity == "shape":  # exactly half of every weight's GEMM columns survive
                columns = mask.flatten(1).any(0)
                assert int(columns.sum()) == keep_count(columns.numel(), 0.5), (name, pname)
            elif sparsity == "irregular":  # exactly half of every weight's entries survive
                assert int(mask.sum()) == keep_count(mask.numel(), 0.5), (name, pname)
        assert all(bool((mask == 0).any()) for mask in masks.values()), name  # nothing left unpruned

"""Surgery removes exactly the pruned channels and keeps the masked model's function."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nets import NETS, randomize_bn
from structadmm.errors import ParityError
from structadmm.exporters.counting import count_torch
from structadmm.prune.plan import ChannelUnit, PruningPlan
from structadmm.prune.sparsity import keep_count
from structadmm.prune.surgery import check_same_function, compact, compact_with_report


@pytest.mark.parametrize("name", sorted(NETS))
@pytest.mark.parametrize("seed", range(4))
def test_random_masks_compact_exactly(name: str, seed: int) -> None:
    build, shape = NETS[name]
    torch.manual_seed(seed)
    model = randomize_bn(build(), seed)
    x = torch.randn(shape)
    gen = torch.Generator().manual_seed(seed)
    ratio = float(torch.empty(1).uniform_(0.2, 0.8, generator=gen))
    plan = PruningPlan.uniform(model, x, "filter", ratio)
    dense_macs = count_torch(model, x).macs
    plan.project(model)
    small, cuts = compact_with_report(model, x)
    with torch.no_grad():
        diff = (model.eval()(x) - small.eval()(x)).abs().max()
    assert diff <= 1e-4
    # every unit kept exactly keep_count channels
    kept = {c.group: c.kept for c in cuts}
    for unit in plan.units:
        assert kept[unit.name] == keep_count(unit.group.size, unit.ratio)
    assert count_torch(small, x).macs < dense_macs
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def test_macs_shrink_by_the_expected_amount_on_a_chain() -> None:
    model = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 8, 1))
    x = torch.randn(1, 4, 6, 6)
    PruningPlan.uniform(model, x, "filter", 0.5).project(model)
    small = compact(model, x)
    assert [m.out_channels for m in small if isinstance(m, nn.Conv2d)] == [8, 8, 8]
    assert count_torch(small, x).macs == 36 * (8 * 4 * 9 + 8 * 8 * 9 + 8 * 8)


def test_surgery_keeps_unpruned_model_intact() -> None:
    model = NETS["residual"][0]()
    x = torch.randn(2, 3, 8, 8)
    small, cuts = compact_with_report(model, x)
    assert cuts == []
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in model.parameters())


def test_producer_zeroed_but_read_channel_is_not_removed() -> None:
    """A zero filter after BN still emits beta: removing it would change the function."""
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)))
    with torch.no_grad():
        model[0].weight[1] = 0
        model[1].bias[1] = 1.0
    x = torch.randn(1, 3, 6, 6)
    small = compact(model, x)
    assert small[0].out_channels == 4


def test_parity_error_names_the_stage() -> None:
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    with pytest.raises(ParityError, match="surgery changed"):
        check_same_function(a, b, torch.randn(4, 3), atol=1e-4, rtol=1e-4, what="surgery")


def test_channel_plan_names_groups_by_consumer() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Conv2d(6, 2, 1))
    x = torch.randn(1, 3, 8, 8)
    plan = PruningPlan.from_dict(model, x, {"2": {"sparsity": "channel", "ratio": 0.5}})
    assert [u.name for u in plan.units] == ["0"]  # conv 2's input channels are conv 0's filters
    assert isinstance(plan.units[0], ChannelUnit)
    plan.project(model)
    small = compact(model, x)
    assert small[0].out_channels == 4 and small[2].in_channels == 4 and small[2].out_channels == 6


def test_plan_multiple_rounds_kept_channels() -> None:
    model = nn.Sequential(nn.Conv2d(3, 48, 3), nn.ReLU(), nn.Conv2d(48, 4, 1))
    x = torch.randn(1, 3, 6, 6)
    PruningPlan.uniform(model, x, "filter", 0.5, multiple=16).project(model)
    assert compact(model, x)[0].out_channels == 32  # 24 rounded up to a multiple of 16

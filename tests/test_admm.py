"""ADMM: penalty and updates follow the method, the residual falls, hard prune is exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from structadmm.prune.admm import ADMM
from structadmm.prune.masks import apply_masks
from structadmm.prune.plan import PruningPlan
from structadmm.prune.sparsity import keep_count
from structadmm.batches import make_loader
from structadmm.pipeline.train import train_epochs


def small_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 16, 10),
    )


def test_penalty_and_update_follow_the_formulas() -> None:
    net = small_net()
    x = torch.randn(2, 1, 16, 16)
    plan = PruningPlan.uniform(net, x, "filter", 0.5)
    admm = ADMM(net, plan, rho=0.3, rho_growth=2.0, rho_max=1.0)
    W = {n: p.detach().clone() for n, p in admm.params.items()}
    Z0 = {n: W[n] * plan.masks_for(W)[n] for n in W}
    expected = 0.15 * sum(float((W[n] - Z0[n]).pow(2).sum()) for n in W)
    assert float(admm.penalty().detach()) == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():
        for p in admm.params.values():
            p.add_(0.01)
    W1 = {n: p.detach().clone() for n, p in admm.params.items()}
    record = admm.update()
    Z1 = {n: W1[n] * plan.masks_for(W1)[n] for n in W1}  # U was zero, so Z = Proj(W)
    for n in W1:
        assert torch.allclose(admm.Z[n], Z1[n])
        # U = U + W - Z, then rescaled by rho_old / rho_new so rho * U is unchanged
        assert torch.allclose(admm.U[n], (W1[n] - Z1[n]) * 0.3 / 0.6)
    assert record.rho == 0.3 and admm.rho == 0.6
    admm.update()
    assert admm.rho == 1.0  # capped


def test_admm_drives_the_residual_down_and_hard_prune_is_exact(digits) -> None:
    train, _ = digits
    net = small_net()
    loader = make_loader(train, 64, shuffle=True)
    train_epochs(net, loader, 1, lr=0.05)
    plan = PruningPlan.uniform(net, train.tensors[0][:4], "filter", 0.75)
    admm = ADMM(net, plan, rho=0.5, rho_growth=2.0, rho_max=8.0)
    train_epochs(net, loader, 6, lr=0.01, penalty=admm.penalty, after_epoch=lambda e: admm.update())
    residuals = [r.primal_residual for r in admm.history]
    assert residuals[-1] < 0.1 and residuals[-1] < residuals[0] / 3
    masks = admm.hard_prune()
    params = dict(net.named_parameters())
    for unit in plan.units:
        producer = params[f"{unit.group.producers[0]}.weight"]
        alive = producer.detach().flatten(1).ne(0).any(1)
        assert int(alive.sum()) == keep_count(unit.group.size, unit.ratio)
    for name, mask in masks.items():
        assert torch.all(params[name][mask == 0] == 0)


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2),
    lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=1e-2),
    lambda ps: torch.optim.AdamW(ps, lr=0.01),
])
def test_masks_survive_momentum_and_weight_decay(make_opt) -> None:
    net = small_net()
    x, y = torch.randn(16, 1, 16, 16), torch.randint(0, 10, (16,))
    opt = make_opt(net.parameters())
    for _ in range(3):  # build up optimizer state before the mask exists
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    masks = PruningPlan.uniform(net, x, "filter", 0.5).project(net)
    apply_masks(net, masks)
    params = dict(net.named_parameters())
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        for name, mask in masks.items():  # gradients of pruned weights are zero
            assert torch.all(params[name].grad[mask == 0] == 0)
        opt.step()
        net(x)  # a forward pass between steps changes nothing
        for name, mask in masks.items():
            assert torch.all(params[name][mask == 0] == 0)


def test_mask_guard_remove_releases_the_hooks() -> None:
    net = small_net()
    x = torch.randn(2, 1, 16, 16)
    masks = PruningPlan.uniform(net, x, "filter", 0.5).project(net)
    guard = apply_masks(net, masks)
    guard.remove()
    with torch.no_grad():
        net[0].weight.fill_(1.0)
    net(x)
    assert torch.all(net[0].weight == 1.0)


def _kept_filters(admm: ADMM, name: str) -> int:
    return int((admm.Z[name].flatten(1).abs().sum(1) > 0).sum())


def test_progressive_targets_step_to_the_ratio_and_the_hard_prune_uses_it() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(),
                        nn.Flatten(), nn.LazyLinear(10))
    x = torch.randn(2, 1, 8, 8)
    net(x)
    plan = PruningPlan.uniform(net, x, "filter", 0.9375)
    admm = ADMM(net, plan, ramp_rounds=4)
    kept = [_kept_filters(admm, "0.weight")]
    for _ in range(5):
        admm.update()
        kept.append(_kept_filters(admm, "0.weight"))
    assert kept == [16, 8, 4, 2, 2, 2]  # keep 1/2, 1/4, 1/8, then the plan's 1/16 of 32
    assert _kept_filters(admm, "2.weight") == 4
    masks = admm.hard_prune()
    assert int(masks["0.weight"].flatten(1)[:, 0].sum()) == 2
    # without a ramp the first target is the plan itself
    assert _kept_filters(ADMM(net, plan), "0.weight") == 2


def test_a_plan_on_the_way_keeps_a_power_of_what_the_plan_keeps() -> None:
    net = small_net()
    plan = PruningPlan.uniform(net, torch.randn(2, 1, 16, 16), "filter", 0.75)
    half = plan.on_the_way(0.5)
    assert [u.ratio for u in half.units] == pytest.approx([0.5] * len(plan.units))
    assert plan.on_the_way(1.0) is plan and [u.ratio for u in plan.units] == [0.75] * len(plan.units)
    with pytest.raises(ValueError):
        plan.on_the_way(0.0)

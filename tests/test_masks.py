"""Masks hold pruned weights at exactly zero under any training loop, and never act in forward."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nets import Residual, randomize_bn
from structadmm.errors import StructADMMError
from structadmm.prune import masks as masks_module
from structadmm.prune.admm import ADMM
from structadmm.prune.masks import apply_masks
from structadmm.prune.plan import PruningPlan
from structadmm.batches import make_loader
from structadmm.pipeline.train import train_epochs

OPTIMIZERS = {
    "sgd-momentum-wd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=1e-1),
}


def _net() -> nn.Module:
    return randomize_bn(Residual())  # residual adds, BatchNorm, a Linear head of 4 classes


def _random_masks(net: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Irregular masks on every weight: unlike whole filters, their weights still get gradients."""
    gen = torch.Generator().manual_seed(seed)
    return {n: (torch.rand(p.shape, generator=gen) > 0.5).float() for n, p in net.named_parameters() if p.dim() > 1}


def _assert_exact(net: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    params = dict(net.named_parameters())
    for name, mask in masks.items():
        assert torch.all(params[name][mask == 0] == 0), name


def _warm_optimizer(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """Optimizer state (momentum, Adam moments) built up before any mask exists."""
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_several_forwards_before_one_backward_keep_masks_exact(optimizer: str) -> None:
    torch.manual_seed(0)
    net, teacher = _net(), _net().eval()
    x1, x2, y = torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    opt = OPTIMIZERS[optimizer](net.parameters())
    _warm_optimizer(net, opt, x1, y)
    masks = _random_masks(net)
    apply_masks(net, masks)  # the guard is not kept: the masks still hold
    params = dict(net.named_parameters())
    for step in range(4):
        opt.zero_grad()
        # siamese pair and distillation: three forward passes of the student before backward
        a, b = net(x1), net(x2)
        with torch.no_grad():
            soft = teacher(x1).softmax(1)
        loss = F.cross_entropy(a, y) + F.mse_loss(a, b) + F.kl_div(net(x1).log_softmax(1), soft, reduction="batchmean")
        loss.backward()
        for name, mask in masks.items():
            assert torch.all(params[name].grad[mask == 0] == 0)
        # and gradient accumulation: a second forward/backward before the step
        F.cross_entropy(net(x2), y).backward()
        opt.step()
        _assert_exact(net, masks)  # right after the step, before any forward
    assert any(bool(p.ne(0).any()) for p in params.values())


def test_a_forward_pass_never_writes_the_weights() -> None:
    net = _net()
    x = torch.randn(2, 3, 8, 8)
    masks = PruningPlan.uniform(net, x, "filter", 0.5).project(net)
    apply_masks(net, masks)
    versions = {name: p._version for name, p in net.named_parameters()}
    net(x)
    net(x)
    assert {name: p._version for name, p in net.named_parameters()} == versions


def test_optimizers_made_later_and_the_builtin_trainer_with_admm_keep_masks_exact(digits) -> None:
    torch.manual_seed(0)
    train, _ = digits
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    loader = make_loader((train.tensors[0][:256], train.tensors[1][:256]), 64, shuffle=True)
    plan = PruningPlan.uniform(net, train.tensors[0][:4], "filter", 0.5)
    admm = ADMM(net, plan, rho=0.5)
    train_epochs(net, loader, 1, lr=0.05, penalty=admm.penalty, after_epoch=lambda e: admm.update())
    masks = admm.hard_prune()
    guard = apply_masks(net, masks)
    # the trainer's own SGD (momentum, weight decay), made after the guard, with the ADMM penalty still on
    train_epochs(net, loader, 2, lr=0.05, momentum=0.9, weight_decay=5e-2, penalty=admm.penalty)
    _assert_exact(net, masks)
    guard.remove()


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_remove_releases_both_hooks(optimizer: str) -> None:
    torch.manual_seed(0)
    net = _net()
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    opt = OPTIMIZERS[optimizer](net.parameters())
    _warm_optimizer(net, opt, x, y)
    masks = _random_masks(net)
    guard = apply_masks(net, masks)
    guard.remove()
    opt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    params = dict(net.named_parameters())
    grads_of_pruned = [params[n].grad[m == 0] for n, m in masks.items() if params[n].grad is not None]
    assert any(bool(g.ne(0).any()) for g in grads_of_pruned)  # no gradient hook any more
    opt.step()
    moved = [params[n][m == 0] for n, m in masks.items()]
    assert any(bool(w.ne(0).any()) for w in moved)  # and no post-step hook


def test_the_guard_leaves_other_optimizers_alone() -> None:
    net, other = _net(), nn.Linear(4, 4)
    x = torch.randn(2, 3, 8, 8)
    masks = PruningPlan.uniform(net, x, "filter", 0.5).project(net)
    guard = apply_masks(net, masks)
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    name = next(iter(masks))
    param = dict(net.named_parameters())[name]
    with torch.no_grad():
        param.fill_(1.0)  # an edit made without this model's optimizer
    other(torch.randn(1, 4)).sum().backward()
    opt.step()
    assert bool(param.eq(1.0).all())  # another model's step did not touch this one
    guard.enforce()
    _assert_exact(net, masks)
    guard.remove()


def test_a_dropped_model_is_freed_and_its_hook_swept() -> None:
    from torch.optim.optimizer import _global_optimizer_post_hooks

    net = _net()
    x = torch.randn(2, 3, 8, 8)
    apply_masks(net, PruningPlan.uniform(net, x, "filter", 0.5).project(net))
    entry = masks_module._registered[-1]
    ref = weakref.ref(next(net.parameters()))
    del net
    gc.collect()
    assert ref() is None and not entry.alive()  # the global optimizer hook does not keep the model alive
    other = _net()
    guard = apply_masks(other, PruningPlan.uniform(other, x, "filter", 0.5).project(other))
    assert entry not in masks_module._registered and entry.handle.id not in _global_optimizer_post_hooks
    guard.remove()
    assert guard._masked not in masks_module._registered
    assert guard._masked.handle.id not in _global_optimizer_post_hooks


def test_masks_must_fit_the_model() -> None:
    net = _net()
    with pytest.raises(StructADMMError, match="does not have"):
        apply_masks(net, {"nope.weight": torch.ones(3)})
    name, param = next(iter(net.named_parameters()))
    with pytest.raises(StructADMMError, match="shapes"):
        apply_masks(net, {name: torch.ones(param.numel() + 1)})

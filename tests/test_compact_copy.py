"""compact returns an independent model: no hooks, no shared tensors, the caller's model untouched."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.utils import prune, weight_norm

import structadmm as sa
from nets import Residual, randomize_bn
from structadmm.errors import ParityError, StructADMMError
from structadmm.prune.plan import PruningPlan

HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks",
              "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    for k, v in snapshot.items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), k  # bit for bit


def _storages(model: nn.Module) -> set[int]:
    tensors = [*model.parameters(), *model.buffers()]
    return {t.untyped_storage().data_ptr() for t in tensors if t.numel()}


def _assert_independent(small: nn.Module, model: nn.Module) -> None:
    for name, module in small.named_modules():
        for attr in HOOK_DICTS:
            assert not getattr(module, attr), f"{name}.{attr}"
    for name, p in small.named_parameters():
        assert not p._backward_hooks, name
    assert not _storages(small) & _storages(model)


def test_a_guarded_torchvision_model_compacts_exports_and_is_left_alone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    masks = PruningPlan.uniform(model, x, "filter", 0.5).project(model)
    sa.apply_masks(model, masks)  # the README's flow: the guard stays attached
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()  # momentum built up while masked
    before = _snapshot(model)

    small = sa.compact(model, x)
    _assert_independent(small, model)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters()) / 2
    small.train()
    F.cross_entropy(small(x), y).backward()  # running and training the copy ...
    torch.optim.SGD(small.parameters(), lr=0.1).step()
    sa.export_onnx(small, x, tmp_path / "pruned.onnx")  # ... and exporting it
    _assert_same(model, before)  # ... leave the caller's model as it was, bit for bit

    for _ in range(2):  # and the caller's guard still holds its masks
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert torch.all(params[name][mask == 0] == 0)


class _Recorder:
    """A user's hook object holding what cannot be copied (a lock), as loggers and writers do."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls = 0

    def __call__(self, module, inputs, output=None) -> None:
        with self.lock:
            self.calls += 1


def test_user_hooks_stay_on_the_model_and_do_not_travel(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = randomize_bn(Residual())
    x = torch.randn(2, 3, 8, 8)
    masks = PruningPlan.uniform(model, x, "filter", 0.5, multiple=1).project(model)
    sa.apply_masks(model, masks)
    pre, post, kw, back = _Recorder(), _Recorder(), _Recorder(), _Recorder()
    model.stem.register_forward_pre_hook(pre)
    model.b.register_forward_hook(post)
    model.a1.register_forward_hook(lambda m, args, kwargs, out: kw(m, args), with_kwargs=True)
    model.head.register_full_backward_hook(lambda m, gin, gout: back(m, gin))
    model.register_state_dict_post_hook(lambda *args: None)
    before = _snapshot(model)

    small = sa.compact(model, x)
    _assert_independent(small, model)
    calls = (pre.calls, post.calls, kw.calls, back.calls)
    small(x).sum().backward()
    assert (pre.calls, post.calls, kw.calls, back.calls) == calls  # the copy runs none of them
    sa.export_onnx(small, x, tmp_path / "pruned.onnx")
    _assert_same(model, before)
    model(x).sum().backward()
    assert (pre.calls, post.calls, kw.calls, back.calls) == tuple(c + 1 for c in calls)  # the model runs all
    before = _snapshot(model)
    sa.export_onnx(model, x, tmp_path / "dense.onnx")  # the guarded, hooked model itself exports too
    _assert_same(model, before)


def test_a_hook_that_changes_the_outputs_is_named_in_the_parity_error() -> None:
    model = randomize_bn(Residual())
    x = torch.randn(2, 3, 8, 8)
    PruningPlan.uniform(model, x, "filter", 0.5, multiple=1).project(model)
    model.b.register_forward_hook(lambda m, args, out: out * 2)
    with pytest.raises(ParityError, match="hooks on b"):
        sa.compact(model, x)


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
def test_torch_prune_and_weight_norm_are_folded_into_the_copy() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    x = torch.randn(2, 3, 8, 8)
    weight_norm(model[0])
    prune.ln_structured(model[2], "weight", amount=0.5, n=2, dim=1)  # half of conv 2's input channels
    before = _snapshot(model)
    small = sa.compact(model, x)  # checks the outputs against the reparametrized model
    _assert_independent(small, model)
    assert small[0].weight.shape[0] == 8 and small[2].weight.shape[1] == 8
    assert {n for n, _ in small.named_parameters()} == {"0.weight", "0.bias", "2.weight", "2.bias", "6.weight", "6.bias"}
    assert prune.is_pruned(model) and hasattr(model[0], "weight_g")  # the model keeps its own
    _assert_same(model, before)


def test_an_uninitialised_lazy_module_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(StructADMMError, match="lazy"):
        sa.compact(model, torch.randn(1, 3, 8, 8))

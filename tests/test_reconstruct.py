"""Layer-wise reconstruction (prune/reconstruct.py): each kept layer refitted by least squares to the
dense layer's output. Checked: the fit is the least-squares optimum, a model equal to its dense self
is a fixed point for every conv geometry (the patches are gathered as the conv reads them), masked
weights stay zero and pruned rows untouched, irregular masks are skipped with a reason, and held-out
fidelity of a hard-pruned network improves; through the pipeline, a run that distils reconstructs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from structadmm.pipeline import CompressConfig, compress
from structadmm.prune import PruningPlan, reconstruct


def test_a_linear_layer_gets_the_least_squares_weights() -> None:
    torch.manual_seed(0)
    layer, dense = nn.Linear(6, 3), nn.Linear(6, 3)
    x = torch.randn(200, 6)
    (refit,) = reconstruct(layer, dense, x, samples=200, ridge=1e-9)
    a = torch.cat([x, torch.ones(200, 1)], dim=1).double()
    want = torch.linalg.lstsq(a, dense(x).detach().double()).solution.T
    got = torch.cat([layer.weight, layer.bias[:, None]], dim=1).detach().double()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert refit.error_after < 1e-5 < refit.error_before


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 6, 3, padding=1),
    nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
    nn.Conv2d(4, 8, 3, padding=1, groups=2),
    nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),  # depthwise
    nn.Conv1d(4, 6, 5, stride=2, padding=2),
    nn.Conv3d(4, 6, 3, padding="valid"),
], ids=["3x3", "strided-dilated", "grouped", "depthwise", "conv1d", "conv3d"])
def test_a_layer_equal_to_its_dense_self_is_a_fixed_point(conv: nn.Module) -> None:
    # the exact fit of the dense output from the dense input is the dense weights: this holds only if each
    # sampled output position is regressed on exactly the input patch the conv reads there
    torch.manual_seed(0)
    model, dense = copy.deepcopy(conv), copy.deepcopy(conv)
    with torch.no_grad():
        model.weight.add_(0.1 * torch.randn_like(model.weight))  # start away from the answer
    spatial = {nn.Conv1d: (40,), nn.Conv2d: (12, 12), nn.Conv3d: (6, 7, 7)}[type(conv)]
    x = torch.randn(16, 4, *spatial)
    (refit,) = reconstruct(model, dense, x, ridge=1e-9)
    assert not refit.skipped
    torch.testing.assert_close(model.weight, dense.weight, atol=1e-4, rtol=1e-4)
    assert refit.error_after < 1e-4


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1, groups=4), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1, groups=64),
                         nn.ReLU(), nn.Conv2d(64, 16, 1), nn.Flatten(), nn.Linear(16 * 8 * 8, 10))


def test_hard_pruned_network_follows_its_dense_self_again_on_held_out_inputs() -> None:
    torch.manual_seed(0)
    net = _net()
    dense = copy.deepcopy(net)
    masks = PruningPlan.uniform(net, torch.randn(2, 3, 16, 16), "filter", 0.5).project(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    held = torch.randn(64, 3, 16, 16)

    def error() -> float:
        with torch.no_grad():
            return float((net(held) - dense(held)).norm() / dense(held).norm())

    pruned_error = error()
    teacher = {k: v.clone() for k, v in dense.state_dict().items()}
    refits = reconstruct(net, dense, torch.randn(128, 3, 16, 16), masks)
    assert [r.name for r in refits] == ["0", "2", "4", "6", "8", "10"]  # the order the forward pass ran them
    assert error() < 0.5 * pruned_error
    state = net.state_dict()
    for name, mask in masks.items():
        assert not state[name][~mask.bool()].any(), name  # pruned weights stay exactly zero
    # a pruned filter's row is left as it was, its bias included (surgery decides what a dead channel becomes)
    dead = ~masks["0.weight"].flatten(1).any(dim=1)
    assert dead.any() and torch.equal(state["0.bias"][dead], before["0.bias"][dead])
    assert all(torch.equal(v, teacher[k]) for k, v in dense.state_dict().items())  # the teacher is only read


def test_a_non_structured_mask_is_skipped_with_its_reason() -> None:
    torch.manual_seed(0)
    layer, dense = nn.Linear(8, 4), nn.Linear(8, 4)
    mask = (torch.rand(4, 8) > 0.5).float()
    with torch.no_grad():
        layer.weight.mul_(mask)
    weights = layer.weight.clone()
    (refit,) = reconstruct(layer, dense, torch.randn(32, 8), {"weight": mask})
    assert refit.skipped.startswith("irregular mask") and refit.error_after is None
    assert torch.equal(layer.weight, weights)


def test_a_run_with_reconstruct_refits_and_reports_it(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 6))
    data = torch.utils.data.TensorDataset(torch.randn(64, 1, 8, 8))
    settings = dict(ratio=0.5, channel_multiple=1, admm_rounds=1, admm_epochs=1, retrain_epochs=0, batch_size=16,
                    bench_batches=[1], bench_min_runs=2, bench_min_seconds=0.0, reconstruct_samples=32)
    reports = {}
    for mode in ("on", "off"):
        result = compress(copy.deepcopy(net), data, data, CompressConfig(reconstruct=mode == "on", **settings),
                          out_dir=tmp_path / mode)
        reports[mode] = json.loads((result.run_dir / "report.json").read_text())
    done = reports["on"]["reconstruction"]
    assert reports["on"]["objective"]["mode"] == "distill" and reports["off"]["reconstruction"] is None
    assert done["samples"] == 32 and done["layers"] == 3 and done["error_after"] < done["error_before"]
    assert "refitted to the dense model's layer outputs" in (tmp_path / "on" / "report.md").read_text()
    assert "refitted" not in (tmp_path / "off" / "report.md").read_text()
    # one epoch of distillation after it (the least a one-shot run trains): the gap is the reconstruction
    error = {m: r["fidelity"]["outputs"][0]["rel_error"] for m, r in reports.items()}
    assert error["on"] < error["off"]


def test_a_weight_tied_to_another_module_is_left_alone() -> None:
    # a language model's head shares its weight with the embedding: refitting it would change the inputs too
    torch.manual_seed(0)

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.mid, self.head = nn.Embedding(12, 8), nn.Linear(8, 8), nn.Linear(8, 12, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.mid(self.embed(ids))))

    model = Tied()
    dense = copy.deepcopy(model)
    with torch.no_grad():
        model.mid.weight.mul_(0.5)
    embedding = model.embed.weight.clone()
    refits = {r.name: r for r in reconstruct(model, dense, torch.randint(0, 12, (16, 5)))}
    assert refits["head"].skipped == "weight shared with another module"
    assert not refits["mid"].skipped and refits["mid"].error_after < 0.01 * refits["mid"].error_before
    assert torch.equal(model.embed.weight, embedding)

"""Distillation from the dense model: the objective's terms, what ``auto`` chooses, and runs with no
labels at all (a classifier, a model with several non-class outputs, an ONNX file as the teacher,
the caller's own loss and metric)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from structadmm.errors import StructADMMError
from structadmm.exporters import export_onnx
from structadmm.exporters.onnx_module import OnnxModule
from structadmm.models import get_spec
from structadmm.pipeline import CompressConfig, compress
from structadmm.pipeline.objective import TeacherMatching, choose_objective
from structadmm.pipeline.train import evaluate, train_epochs

FAST = dict(dense_epochs=0, admm_rounds=3, admm_epochs=1, retrain_epochs=2, rho=0.5, rho_growth=2.0,
            bench_batches=[1], bench_min_runs=3, bench_min_seconds=0.0, bench_isolate=False, channel_multiple=1)


class TwoHeads(nn.Module):
    """A small dense-prediction net, untrained: a map output [B, 3, H, W] and a vector [B, 5]."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.map = nn.Conv2d(32, 3, 1)
        self.vector = nn.Linear(32 * 16, 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        # outputs of very different scales
        return self.map(h) * 100.0, self.vector(nn.functional.avg_pool2d(h, 2).flatten(1))


def _fixed(module: nn.Module) -> nn.Module:
    return module.eval().requires_grad_(False)


# -- the objective's terms ---------------------------------------------------------------------------

def test_matching_is_zero_on_the_teacher_and_weighs_outputs_by_their_spread() -> None:
    torch.manual_seed(0)
    teacher = _fixed(TwoHeads())
    x = torch.randn(8, 1, 8, 8)
    objective = TeacherMatching(teacher)
    assert float(objective(teacher(x), None, x)) == pytest.approx(0.0, abs=1e-6)
    a, b = teacher(x)
    assert a.abs().mean() > 100 * b.abs().mean()
    # noise at a tenth of each channel's spread (root mean square) costs 0.01 per output, whatever its scale
    noisy_a = a + 0.1 * a.square().mean(dim=(0, 2, 3), keepdim=True).sqrt() * torch.randn_like(a)
    noisy_b = b + 0.1 * b.square().mean(dim=0, keepdim=True).sqrt() * torch.randn_like(b)
    on_map = float(objective((noisy_a, b), None, x))
    on_vector = float(objective((a, noisy_b), None, x))
    assert on_map == pytest.approx(0.01 / 2, rel=0.3)  # averaged over the two outputs
    assert on_vector == pytest.approx(0.01 / 2, rel=0.6)  # 8 samples x 5 channels: a noisier estimate


def test_matching_uses_kl_on_class_scores_and_probabilities_as_they_are() -> None:
    torch.manual_seed(0)
    logits = torch.randn(16, 10)
    x = torch.zeros(16, 1)
    kl = TeacherMatching(lambda _: logits, temperature=2.0)
    assert float(kl(logits.clone(), None, x)) == pytest.approx(0.0, abs=1e-6)
    # a constant shift changes no class probability: KL ignores it, a squared error would not
    assert float(kl(logits + 3.0, None, x)) == pytest.approx(0.0, abs=1e-5)
    assert float(TeacherMatching(lambda _: logits, kind="mse")(logits + 3.0, None, x)) > 1.0
    probs = logits.softmax(1)
    as_probs = TeacherMatching(lambda _: probs)
    assert float(as_probs(probs.clone(), None, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(as_probs(torch.full_like(probs, 0.1), None, x)) > 0.1


def test_matching_skips_integer_outputs_and_refuses_a_different_structure() -> None:
    x = torch.randn(4, 3)
    teacher = lambda t: (t, t.argmax(1))  # noqa: E731
    assert float(TeacherMatching(teacher)((x.clone(), torch.zeros(4, dtype=torch.long)), None, x)) < 1e-6
    with pytest.raises(StructADMMError, match="2 outputs but its teacher 1"):
        TeacherMatching(lambda t: t)((x, x), None, x)
    with pytest.raises(StructADMMError, match="no floating-point output"):
        TeacherMatching(lambda t: t.argmax(1))(x.argmax(1), None, x)


def test_auto_distils_without_labels_or_without_class_scores() -> None:
    scores, maps = torch.zeros(2, 10), (torch.zeros(2, 3, 4, 4), torch.zeros(2, 5))
    assert choose_objective("auto", scores, labelled=True) == "labels"
    assert choose_objective("auto", scores, labelled=False) == "distill"
    assert choose_objective("auto", maps, labelled=True) == "distill"
    assert choose_objective("distill", scores, labelled=True) == "distill"
    with pytest.raises(StructADMMError, match="has no labels"):
        choose_objective("labels", scores, labelled=False)
    with pytest.raises(StructADMMError, match="not one \\[batch, classes\\] tensor"):
        choose_objective("labels", maps, labelled=True)


# -- runs without labels -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_digits(digits) -> tuple[nn.Module, TensorDataset, TensorDataset]:
    """The digits CNN trained on labels, then its data with the labels taken away."""
    torch.manual_seed(0)
    train, test = digits
    model = get_spec("digits-cnn").build()
    train_epochs(model, torch.utils.data.DataLoader(train, batch_size=64, shuffle=True), 6, lr=0.05)
    return model.eval(), train, test


def _inputs_only(data) -> TensorDataset:
    return TensorDataset(torch.stack([data[i][0] for i in range(len(data))]))


def test_a_classifier_compresses_from_unlabeled_inputs_and_keeps_its_predictions(trained_digits, tmp_path: Path) -> None:
    model, train, test = trained_digits
    dense_accuracy = evaluate(model, torch.utils.data.DataLoader(test, batch_size=256))
    config = CompressConfig(ratio=0.5, **FAST)
    result = compress(copy.deepcopy(model), _inputs_only(train), _inputs_only(test), config, out_dir=tmp_path / "run")
    report = json.loads((result.run_dir / "report.json").read_text())
    assert report["objective"] == {"mode": "distill", "asked": "auto", "teacher": "torch",
                                   "score": "none (no labels): see fidelity"}
    assert report["dense"]["accuracy"] is None and report["mac_ratio"] > 2.0
    assert report["fidelity"]["top1_agreement"] >= 0.9
    assert report["fidelity"]["outputs"][0]["cosine"] > 0.9
    # scored afterwards with the labels it never saw
    pruned_accuracy = evaluate(result.model, torch.utils.data.DataLoader(test, batch_size=256))
    assert pruned_accuracy >= dense_accuracy - 0.05


def test_a_model_with_several_outputs_distils_and_exports_every_output(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TwoHeads()
    x = torch.randn(96, 1, 8, 8)
    config = CompressConfig(ratio=0.5, prune_ends=False, **FAST)
    result = compress(model, TensorDataset(x[:64]), TensorDataset(x[64:]), config, out_dir=tmp_path / "run")
    report = json.loads((result.run_dir / "report.json").read_text())
    assert report["objective"]["mode"] == "distill" and report["mac_ratio"] > 1.5
    assert [o["name"] for o in report["fidelity"]["outputs"]] == ["output", "output_1"]
    assert all(o["rel_error"] < 1.0 for o in report["fidelity"]["outputs"])
    assert "top1_agreement" not in report["fidelity"]
    session = OnnxModule(result.pruned_onnx)
    got = session(x[64:70])
    want = result.model(x[64:70])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_a_users_onnx_file_is_the_teacher_in_onnx_runtime(trained_digits, tmp_path: Path) -> None:
    model, train, test = trained_digits
    dense = tmp_path / "dense_in.onnx"
    export_onnx(model, train[0][0][None], dense)
    teacher = OnnxModule(dense)
    x = torch.stack([test[i][0] for i in range(8)])
    torch.testing.assert_close(teacher(x), model(x), atol=1e-4, rtol=1e-3)
    config = CompressConfig(ratio=0.5, objective="distill", prune_method="admm", **FAST)
    result = compress(copy.deepcopy(model), train, test, config, out_dir=tmp_path / "run", dense_onnx=dense)
    report = json.loads((result.run_dir / "report.json").read_text())
    assert report["objective"]["mode"] == "distill" and report["objective"]["teacher"] == "onnx"
    # ADMM asked for: its W-steps distil too, one Z/U update per round
    assert report["prune_method"] == "admm" and len(report["admm"]) == FAST["admm_rounds"]
    assert report["dense"]["accuracy"] > 0.9  # labels still score, though training never read them
    assert report["pruned"]["accuracy"] > 0.85


def test_the_callers_loss_and_metric_replace_the_built_in_ones(trained_digits, tmp_path: Path) -> None:
    model, train, test = trained_digits
    calls = []

    def loss(student, teacher, inputs):
        calls.append(inputs.shape[0])
        return ((student - teacher) ** 2).mean()

    def metric(net, loader):
        return 42.0

    config = CompressConfig(ratio=0.5, **FAST)
    result = compress(copy.deepcopy(model), train, test, config, out_dir=tmp_path / "run", loss=loss, metric=metric)
    report = json.loads((result.run_dir / "report.json").read_text())
    assert calls and report["objective"]["mode"] == "distill" and report["objective"]["score"] == "metric"
    assert report["dense"]["accuracy"] == 42.0 and report["pruned"]["accuracy"] == 42.0
    # distilling, auto prunes one-shot, with no ADMM round, and retrains for the epochs ADMM would have had
    assert report["prune_method"] == "oneshot" and report["admm"] == [] and report["admm_outcome"] is None
    epochs = FAST["admm_rounds"] * FAST["admm_epochs"] + FAST["retrain_epochs"]
    assert sum(calls) == epochs * len(train)
    assert "one-shot magnitude pruning" in (result.run_dir / "report.md").read_text()


def test_prune_method_auto_is_oneshot_only_when_distilling_without_stages() -> None:
    assert CompressConfig().method_for("distill") == "oneshot"
    assert CompressConfig().method_for("labels") == "admm"
    assert CompressConfig(admm_stages=[0.25], ratio=0.5).method_for("distill") == "admm"
    assert CompressConfig(prune_method="oneshot").method_for("labels") == "oneshot"
    assert CompressConfig(prune_method="admm").method_for("distill") == "admm"
    with pytest.raises(StructADMMError, match="cannot be combined with prune_method = oneshot"):
        CompressConfig(admm_stages=[0.25], ratio=0.5, prune_method="oneshot")


def test_labels_asked_for_unlabeled_data_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    x = torch.randn(32, 1, 16, 16)
    with pytest.raises(StructADMMError, match="has no labels"):
        compress(get_spec("digits-cnn").build(), TensorDataset(x), None,
                 CompressConfig(objective="labels", **FAST), out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_an_onnx_file_with_dynamic_height_and_width_compresses_without_labels(tmp_path: Path) -> None:
    """A file that leaves height and width open (as text detectors do) is pruned, counted and timed at
    the run's input shape; pruned.onnx keeps its names, and its open axes where its graph allows."""
    from structadmm.exporters import load_onnx, onnx_signature
    from structadmm.exporters.onnx_export import with_sample_shapes
    from structadmm.models.onnx_input import load_onnx_model

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 1, 1)).eval()
    source = tmp_path / "det.onnx"
    torch.onnx.export(net, torch.rand(1, 3, 32, 32), source, input_names=["image"], output_names=["heat"],
                      dynamic_axes={"image": {0: "n", 2: "h", 3: "w"}, "heat": {0: "n", 2: "h", 3: "w"}},
                      dynamo=False)
    proto = load_onnx(source)
    fixed = with_sample_shapes(proto, [(3, 24, 40)])
    assert [d.dim_value for d in fixed.graph.input[0].type.tensor_type.shape.dim[1:]] == [3, 24, 40]
    assert with_sample_shapes(fixed, [(3, 24, 40)]) is None  # nothing left open
    with pytest.raises(StructADMMError, match="does not fit"):
        with_sample_shapes(fixed, [(3, 24, 41)])
    loaded = load_onnx_model(source, input_shape=(3, 24, 40))
    x = torch.rand(80, 3, 24, 40)
    config = CompressConfig(ratio=0.5, prune_ends=True, **FAST)
    result = compress(loaded.module, TensorDataset(x[:64]), TensorDataset(x[64:]), config, out_dir=tmp_path / "run",
                      dense_onnx=loaded.onnx_file)
    report = result.report
    assert report["objective"]["mode"] == "distill" and report["objective"]["teacher"] == "onnx"
    assert report["mac_ratio"] > 1.5 and report["latency"][0]["speedup"] > 0
    assert not (result.run_dir / ".sized").exists()
    signature = onnx_signature(load_onnx(result.pruned_onnx))
    assert [t.name for t in signature.inputs] == ["image"] and [t.name for t in signature.outputs] == ["heat"]
    assert all(isinstance(d, str) for i in (0, 2, 3) for d in [signature.inputs[0].dims[i]])  # still open


def test_a_sigmoid_map_is_matched_as_probabilities_whose_gradient_survives_saturation() -> None:
    torch.manual_seed(0)
    teacher_map = (torch.rand(4, 1, 8, 8) > 0.9).float() * 0.98 + 0.01  # sparse: mostly 0.01, a few 0.99
    logits = torch.full((4, 1, 8, 8), -12.0, requires_grad=True)  # a student saturated at ~0 everywhere
    objective = TeacherMatching(lambda _: teacher_map)
    x = torch.zeros(4, 1)
    assert float(objective(teacher_map.clone(), None, x)) == pytest.approx(0.0, abs=1e-5)
    objective(torch.sigmoid(logits), None, x).backward()
    kl_grad = logits.grad.abs().max()
    logits.grad = None
    TeacherMatching(lambda _: teacher_map, kind="mse")(torch.sigmoid(logits), None, x).backward()
    assert kl_grad > 1000 * logits.grad.abs().max()  # the squared error's gradient has all but vanished

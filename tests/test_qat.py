"""Quantization-aware retraining: the torch fake-quantization grid is ONNX Runtime's INT8 grid for
the weights as they are now, activations are rounded where ORT's QDQ file rounds them (outputs
included), zeros stay zero, the caller's model is untouched, and the pipeline falls back to QAT
only when post-training INT8 fails its gate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, TensorDataset

import structadmm as sa
from structadmm.exporters import quantize as quantize_module
from structadmm.exporters.quantize import PRUNED_INT8, QAT_FP32, int8_data, quantize_onnx, quantize_run
from structadmm.models import get_spec
from structadmm.pipeline import CompressConfig
from structadmm.pipeline.qat import fake_quantize, qat_retrain

from faults import break_int8


def _net() -> nn.Module:
    """Conv and Linear without BatchNorm, so ORT quantizes exactly the weights torch sees."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(20, 4)).eval()


def _ort_weights(path: Path) -> dict[str, np.ndarray]:
    """Each Conv/Gemm's dequantized int8 weight, in graph order."""
    proto = onnx.load(path)
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    produced_by = {o: n for n in proto.graph.node for o in n.output}
    out = {}
    for node in proto.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            dq = produced_by[node.input[1]]
            assert dq.op_type == "DequantizeLinear"
            q, scale = inits[dq.input[0]].astype(np.float32), inits[dq.input[1]]
            out[node.name] = q * scale.reshape(-1, *([1] * (q.ndim - 1)))
    return out


@pytest.mark.parametrize("reduce_range", [False, True])
def test_weight_grid_is_orts_for_the_weights_as_they_are_now(tmp_path: Path, reduce_range: bool) -> None:
    """The grid follows the weights: after training shrank them, torch rounds them as ORT will
    (max|w| of the final weights over 127, or 64), not on a range remembered from earlier steps."""
    model = _net()
    x = torch.randn(64, 1, 8, 8)
    attached = fake_quantize(model, x[:8], reduce_range=reduce_range)
    model(x)  # a step's forward pass with the weights as they were
    with torch.no_grad():
        for module in attached.layers.values():
            module.parametrizations.weight.original.mul_(0.5)  # what training did to them since
    torch_grid = [m.weight.detach().numpy().copy() for m in attached.layers.values()]  # what torch trains with now
    sa.export_onnx(attached.remove(), x[:2], tmp_path / "fp32.onnx")
    result = quantize_onnx(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", x, batches=2, batch_size=32,
                           reduce_range=reduce_range)
    assert result.reduce_range is reduce_range and result.quantized_nodes == 3
    ort_grid = list(_ort_weights(tmp_path / "int8.onnx").values())
    bound = 64 if reduce_range else 127
    for ours, theirs in zip(torch_grid, ort_grid, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)
        flat = np.abs(ours).reshape(len(ours), -1)
        steps = flat.max(1) / bound
        assert np.allclose(flat / steps[:, None], np.round(flat / steps[:, None]), atol=1e-3)  # every channel on
        assert np.all(flat.max(1) > 0)  # its own grid, its largest weight on the last level


class _Block(nn.Module):
    """What ORT's QDQ rounds in many places: Conv+BN+ReLU modules, pooling, a residual sum made by
    ``+`` in forward, ReLU6, a functional flatten, and Linear layers."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2, self.conv3, self.relu6 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.ReLU6()
        self.fc1, self.relu2, self.fc2 = nn.Linear(8 * 16, 16), nn.ReLU(), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(self.relu1(self.bn1(self.conv1(x))))
        y = self.relu6(self.conv3(self.conv2(y) + y))
        return self.fc2(self.relu2(self.fc1(torch.flatten(y, 1))))


def _literal_qdq(path: Path, x: np.ndarray) -> np.ndarray:
    """The QDQ file run as written (no kernel fusion): float ops between its Quantize/Dequantize pairs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_activations_are_rounded_where_orts_qdq_file_rounds_them(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Block().eval()
    with torch.no_grad():  # a BatchNorm that really scales, so folding it matters
        model.bn1.weight.uniform_(0.5, 1.5), model.bn1.bias.uniform_(-0.2, 0.2)
        model.bn1.running_mean.uniform_(-0.2, 0.2), model.bn1.running_var.uniform_(0.5, 2.0)
    x = torch.randn(32, 1, 8, 8)
    with torch.no_grad():
        fp32 = model(x).numpy()
    sa.export_onnx(model, x[:2], tmp_path / "fp32.onnx")
    quantize_onnx(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", x, batches=1, batch_size=32, reduce_range=False)
    proto = onnx.load(tmp_path / "int8.onnx")
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    quantize = [q for q in proto.graph.node if q.op_type == "QuantizeLinear" and q.input[0] not in inits]
    attached = fake_quantize(model, x, reduce_range=False)
    # every activation ORT rounds is rounded in torch: the outputs too, not only Conv/Linear inputs
    assert len(attached.points) == len(quantize) and not attached.unmatched
    places = set(attached.points.values())
    assert {"(model) input", "relu1 output", "pool output", "relu6 output", "relu2 output", "fc2 output",
            "conv2 output", "conv3 input"} <= places  # conv3 input: the residual sum, made by `+`
    assert not {"conv1 output", "bn1 output", "conv3 output", "fc1 output"} & places  # ORT folds BN and ReLU in
    # one range per ORT scale: pooling and flattening share their input's, as in ORT
    assert len(attached.activations) == len({q.input[1] for q in quantize}) < len(quantize)
    # with ORT's ranges held, the torch model computes what the QDQ file computes, up to float noise at ties
    for quantizer in attached.activations.values():
        quantizer.disable_observer()
    with torch.no_grad():
        ours = model(x).numpy()
    theirs = _literal_qdq(tmp_path / "int8.onnx", x.numpy())
    step = float(inits["output_scale"])
    grid = ours / step + int(inits["output_zero_point"])
    assert np.abs(grid - np.round(grid)).max() < 1e-3  # the output itself sits on ORT's output grid
    off = np.abs(ours - theirs) / step  # in output steps
    assert off.max() <= 2.01 and (off < 0.5).mean() >= 0.9
    assert off.mean() < 0.25 * (np.abs(fp32 - theirs) / step).mean()  # far closer to INT8 than FP32 is
    # the BN-folded weight: torch's rounded conv1 weight times BN's factor is ORT's int8 weight
    factor = (model.bn1.weight / torch.sqrt(model.bn1.running_var + model.bn1.eps)).detach().numpy()
    folded = model.conv1.weight.detach().numpy() * factor[:, None, None, None]
    np.testing.assert_allclose(folded, next(iter(_ort_weights(tmp_path / "int8.onnx").values())), rtol=1e-5,
                               atol=1e-6)
    attached.remove()


def test_qat_keeps_zeros_and_leaves_the_callers_model_alone(digits) -> None:
    train, _ = digits
    model = get_spec("digits-cnn").build().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(torch.rand_like(m.weight) > 0.5)  # non-structured zeros
    before = {k: v.clone() for k, v in model.state_dict().items()}
    zeros = {k: v.eq(0) for k, v in before.items() if k.endswith("weight") and v.dim() > 1}
    small = TensorDataset(train.tensors[0][:256], train.tensors[1][:256])
    retrained = qat_retrain(model, small, 1, lr=0.01, batch_size=64)
    after = retrained.state_dict()
    assert set(after) == set(before)  # a plain model again: no parametrizations, no quantizer buffers
    assert not any(parametrize.is_parametrized(m) for m in retrained.modules())
    assert not any(m._forward_pre_hooks for m in retrained.modules()) and not retrained.training
    assert any(not torch.equal(after[k], before[k]) for k in zeros)  # it did train
    for k, zero in zeros.items():
        assert torch.all(after[k][zero] == 0)
    for k, v in model.state_dict().items():  # the caller's model: same values, nothing attached
        assert torch.equal(v, before[k])
    assert not any(parametrize.is_parametrized(m) or m._forward_pre_hooks for m in model.modules())


def _trained_folder(digits, tmp_path: Path) -> tuple[Path, nn.Module]:
    from structadmm.pipeline.train import train_epochs

    train, _ = digits
    model = get_spec("digits-cnn").build()
    loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    train_epochs(model, loader, 1, lr=0.05)
    example = train.tensors[0][:8]
    sa.export_onnx(model.eval(), example, tmp_path / "dense.onnx")
    sa.PruningPlan.uniform(model, example, "filter", 0.5, multiple=1).project(model)
    small = sa.compact(model, example)
    train_epochs(small, loader, 1, lr=0.02)
    sa.export_onnx(small.eval(), example, tmp_path / "pruned.onnx")
    return tmp_path, small


def _break_pruned_ptq(monkeypatch) -> list[str]:
    """Post-training INT8 of pruned.onnx comes out broken (its Conv scales negated); other files quantize well."""

    real, calls = quantize_module.quantize_onnx, []

    def quantize(model, path, *args, **kwargs):
        calls.append(Path(model).name)
        result = real(model, path, *args, **kwargs)
        if Path(model).name == "pruned.onnx":
            break_int8(Path(path))
        return result

    monkeypatch.setattr(quantize_module, "quantize_onnx", quantize)
    return calls


def test_quantize_run_falls_back_to_qat_when_ptq_fails(digits, tmp_path: Path, monkeypatch) -> None:
    folder, small = _trained_folder(digits, tmp_path)
    calls = _break_pruned_ptq(monkeypatch)
    train, test = digits
    written = []

    def retrain(path: Path) -> None:
        written.append(path)
        sa.export_onnx(qat_retrain(small, train, 1, lr=0.001), train.tensors[0][:8], path)

    config = CompressConfig(quantize="int8", calibration_batches=2, bench_threads=1, qat_epochs=1)
    data = int8_data(DataLoader(train, batch_size=64), DataLoader(test, batch_size=256), holdout=0.1)
    run = quantize_run(folder, config, data, retrain)
    run_files = [name for name in calls if name != "preprocessed.onnx"]  # not QAT's look at where ORT rounds
    assert written == [folder / QAT_FP32] and run_files[:3] == ["pruned.onnx", "dense.onnx", QAT_FP32]
    assert run.accuracy["pruned FP32"] > 0.8  # a trained model, so the broken INT8 file has something to lose
    assert run.post_training["gate"]["ok"] is False and run.post_training["accuracy"] < 0.5
    assert run.gate.ok and run.pruned.path == folder / PRUNED_INT8 and (folder / PRUNED_INT8).exists()
    assert run.accuracy["pruned INT8"] >= run.accuracy["pruned FP32"] - config.int8_max_accuracy_drop
    assert abs(run.accuracy["pruned INT8"] - run.post_training["fp32_accuracy"]) <= 0.01  # close to its FP32 parent


def test_quantize_run_leaves_qat_alone_when_ptq_passes(digits, tmp_path: Path) -> None:
    folder, _ = _trained_folder(digits, tmp_path)
    train, test = digits

    def retrain(path: Path) -> None:
        raise AssertionError("QAT must not run when post-training INT8 passes")

    config = CompressConfig(quantize="int8", calibration_batches=2, bench_threads=1, qat_epochs=1)
    data = int8_data(DataLoader(train, batch_size=64), DataLoader(test, batch_size=256), holdout=0.1)
    run = quantize_run(folder, config, data, retrain)
    assert run.gate.ok and run.post_training is None and not (folder / QAT_FP32).exists()


def test_compress_reports_qat_after_a_failed_ptq(digits, tmp_path: Path, monkeypatch) -> None:
    _break_pruned_ptq(monkeypatch)
    train, test = digits
    config = CompressConfig(dense_epochs=2, admm_rounds=2, admm_epochs=1, retrain_epochs=1, channel_multiple=1,
                            bench_batches=[1], bench_min_runs=2, bench_min_seconds=0.0, bench_isolate=False,
                            quantize="int8", calibration_batches=2, qat_epochs=1)
    result = sa.compress(get_spec("digits-cnn").build(), train, test, config, out_dir=tmp_path)
    report = json.loads((result.run_dir / "report.json").read_text())
    qat = report["quantized"]["qat"]
    assert qat["epochs"] == 1 and qat["onnx"] == QAT_FP32 and not qat["gate"]["ok"]
    assert report["quantized"]["gate"]["ok"] and report["quantized"]["onnx"] == PRUNED_INT8
    assert QAT_FP32 in report["file_sizes"] and (result.run_dir / QAT_FP32).exists()
    assert report["quantized"]["accuracy"] > qat["accuracy"] + 0.3

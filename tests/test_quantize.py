"""INT8 with ONNX Runtime: QDQ structure on the pruned model, calibration on the data given only,
the INT8 gate (on data calibration never read, naming what it compared), rejected files kept out
of the timings, the weight range for the target CPU, older ONNX Runtimes, ORT-side accuracy, and
``structadmm run --quantize int8`` end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch.utils.data import DataLoader, Dataset, TensorDataset
from typer.testing import CliRunner

import structadmm as sa
from structadmm.exporters.accuracy import onnx_outputs
from structadmm.exporters.fidelity import top1_agreement
from structadmm.cli import app
from structadmm.errors import StructADMMError
from structadmm.exporters import quantize as quantize_module
from structadmm.exporters.quantize import (DENSE_INT8, PRUNED_INT8, REJECTED, calibration_batches, check_int8,
                                           layer_sensitivity, quantize_onnx, slower_than_fp32)
from structadmm.models import get_spec
from structadmm.pipeline import CompressConfig
from structadmm.pipeline import stages
from structadmm.pipeline.distributed import DistContext

from faults import break_int8

runner = CliRunner()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, digits) -> Path:
    """dense.onnx and pruned.onnx (filter 0.5, exact channel counts) of a briefly trained digits CNN."""
    from structadmm.pipeline.train import train_epochs

    torch.manual_seed(0)
    train, _ = digits
    model = get_spec("digits-cnn").build()
    loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    train_epochs(model, loader, 1, lr=0.05)
    example = train.tensors[0][:8]
    out = tmp_path_factory.mktemp("run")
    sa.export_onnx(model, example, out / "dense.onnx")
    plan = sa.PruningPlan.uniform(model, example, "filter", 0.5, multiple=1)
    sa.apply_masks(model, sa.ADMM(model, plan).hard_prune()).remove()
    small = sa.compact(model, example)
    train_epochs(small, loader, 1, lr=0.02)  # the physically smaller model retrains like any other
    sa.export_onnx(small, example, out / "pruned.onnx")
    return out


def _conv_weights(path: Path) -> dict[str, np.ndarray]:
    proto = onnx.load(path)
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    return {n.name: inits[n.input[1]] for n in proto.graph.node if n.op_type == "Conv"}


def test_qdq_per_channel_scales_follow_the_pruned_channel_counts(folder: Path, digits, tmp_path: Path) -> None:
    result = quantize_onnx(folder / "pruned.onnx", tmp_path / "q.onnx", digits[0], batches=2)
    assert result.mode == "static" and result.per_channel and result.bytes == (tmp_path / "q.onnx").stat().st_size
    dense, pruned = _conv_weights(folder / "dense.onnx"), _conv_weights(folder / "pruned.onnx")
    assert all(pruned[n].shape[0] < dense[n].shape[0] for n in pruned)  # really pruned
    proto = onnx.load(tmp_path / "q.onnx")
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    produced_by = {o: n for n in proto.graph.node for o in n.output}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert {n.name for n in convs} == set(pruned)
    for conv in convs:
        dq = produced_by[conv.input[1]]  # the weight comes through a DequantizeLinear
        assert dq.op_type == "DequantizeLinear"
        weight, scale = inits[dq.input[0]], inits[dq.input[1]]
        assert weight.dtype == np.int8
        assert scale.shape == (pruned[conv.name].shape[0],)  # one scale per kept output channel
        assert {a.name: a.i for a in dq.attribute}.get("axis", 1) == 0
        assert produced_by[conv.input[0]].op_type == "DequantizeLinear"  # activations quantized too
    assert result.quantized_nodes == len(convs) + 2  # and the two Gemms


class _Recording(Dataset):
    def __init__(self, data: TensorDataset):
        self.data, self.read = data, []

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        self.read.append(index)
        return self.data[index]


def test_calibration_reads_only_the_data_given(folder: Path, digits, tmp_path: Path) -> None:
    recording = _Recording(digits[0])
    loader = DataLoader(recording, batch_size=4, shuffle=False)
    quantize_onnx(folder / "pruned.onnx", tmp_path / "q.onnx", loader, batches=3)
    assert sorted(recording.read) == list(range(12))  # three batches of four, nothing more
    # the input's activation range is the range of exactly those 12 samples (MinMax, uint8 asymmetric)
    x = digits[0].tensors[0][:12].numpy()
    proto = onnx.load(tmp_path / "q.onnx")
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    quant_input = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
    expected = (max(x.max(), 0) - min(x.min(), 0)) / 255
    assert float(inits[quant_input.input[1]]) == pytest.approx(expected, rel=1e-5)
    # other data, another scale: the given batches really decide it
    quantize_onnx(folder / "pruned.onnx", tmp_path / "q2.onnx", digits[0].tensors[0][:4] * 3, batches=1)
    other = {i.name: numpy_helper.to_array(i) for i in onnx.load(tmp_path / "q2.onnx").graph.initializer}
    assert float(other[quant_input.input[1]]) != pytest.approx(expected, rel=1e-3)


def test_calibration_batches_takes_the_first_n() -> None:
    x = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    batches = calibration_batches(iter([x[:3], x[3:6], x[6:]]), 2)
    assert [b.shape[0] for b in batches] == [3, 3] and np.array_equal(batches[1], x[3:6].numpy())
    with pytest.raises(StructADMMError, match="at least 1 batch"):
        calibration_batches(x, 0)


def test_gate_passes_a_good_int8_model_and_fails_a_broken_one(folder: Path, digits, tmp_path: Path) -> None:
    train, test = digits
    quantize_onnx(folder / "pruned.onnx", tmp_path / "good.onnx", train, batches=4)
    quantize_onnx(folder / "pruned.onnx", tmp_path / "bad.onnx", train, batches=4)
    break_int8(tmp_path / "bad.onnx")
    fp32 = onnx_outputs(folder / "pruned.onnx", test)
    good, bad = onnx_outputs(tmp_path / "good.onnx", test), onnx_outputs(tmp_path / "bad.onnx", test)
    assert fp32.accuracy > 0.8  # a trained model, so the gate has something to lose
    passed = check_int8(fp32, good, min_agreement=0.95, max_accuracy_drop=0.02)
    assert passed.ok and passed.agreement == top1_agreement(fp32.logits, good.logits) and not passed.reasons
    failed = check_int8(fp32, bad, min_agreement=0.95, max_accuracy_drop=0.02)
    assert not failed.ok and failed.agreement < 0.95 and failed.accuracy_drop > 0.02
    assert any("agreement" in r for r in failed.reasons) and any("accuracy drop" in r for r in failed.reasons)


def _config(**changes) -> CompressConfig:
    return CompressConfig(quantize="int8", calibration_batches=2, bench_threads=1, **changes)


def _quantize_stage(folder: Path, out: Path, train, val, **changes):
    """The pipeline's quantize stage alone, on a run folder holding ``folder``'s dense.onnx and pruned.onnx."""
    for name in ("dense.onnx", "pruned.onnx"):
        shutil.copy(folder / name, out / name)
    run = stages.Run.start(torch.nn.Identity(), _config(**changes), "net", DistContext(), out, None, out, {}, None,
                           train, val, phases=("dense", "admm", "retrain"))
    return stages.quantize_stage(run, stages.Carry()).quantized


def _break_every_int8(monkeypatch) -> None:
    """Every INT8 file quantize_onnx writes comes out broken (its Conv scales negated)."""
    real = quantize_module.quantize_onnx

    def broken(model, path, *args, **kwargs):
        result = real(model, path, *args, **kwargs)
        break_int8(Path(path))
        return result

    monkeypatch.setattr(quantize_module, "quantize_onnx", broken)


def test_a_rejected_int8_file_is_neither_timed_nor_labelled_pruned_int8(folder: Path, digits, tmp_path: Path,
                                                                        monkeypatch) -> None:
    _break_every_int8(monkeypatch)
    train, test = digits
    run = _quantize_stage(folder, tmp_path, train, test)
    assert not run.gate.ok
    assert (tmp_path / REJECTED).exists() and not (tmp_path / PRUNED_INT8).exists()
    assert run.pruned.path.name == REJECTED
    assert run.models == {"dense_int8": tmp_path / DENSE_INT8}  # what the benchmark times: not the rejected file
    assert "pruned INT8" not in run.accuracy and run.accuracy["rejected INT8"] < 0.5
    entries = [SimpleNamespace(provider="CPUExecutionProvider", batch=1, name=name, threads=1, median_ms=ms, p90_ms=ms,
                               round_speedup=4.0 / ms, round_speedup_low=3.5 / ms, round_speedup_high=4.5 / ms,
                               ci_coverage=0.969, mode="isolated")
               for name, ms in (("dense", 4.0), ("pruned", 2.0), ("dense_int8", 3.0))]
    report = run.report(tmp_path, SimpleNamespace(entries=entries), macs=1000)
    assert [r["variant"] for r in report["latency_variants"]] == ["dense FP32", "pruned FP32", "dense INT8"]
    pruned = report["latency_variants"][1]  # each variant's per-round speedup over dense FP32, with its interval
    assert (pruned["speedup_per_round"], pruned["speedup_low"], pruned["speedup_high"]) == (2.0, 1.75, 2.25)
    assert pruned["ci_coverage"] == 0.969 and pruned["mode"] == "isolated"
    quantized = report["quantized"]
    assert quantized["shipped"] is False and quantized["onnx"] == REJECTED
    assert quantized["accuracy"] == run.accuracy["rejected INT8"] and "pruned INT8" not in quantized["ort_accuracy"]
    assert REJECTED in report["file_sizes"]  # kept, for inspection


def test_gate_names_the_model_it_compared_against(folder: Path, digits, tmp_path: Path, monkeypatch) -> None:
    # post-training INT8 fails, and so does the INT8 file of the "retrained" model (here a copy of pruned.onnx):
    # the second gate compared predictions with that FP32 parent, and the accuracy drop with pruned FP32
    _break_every_int8(monkeypatch)
    monkeypatch.setattr(stages, "_qat", lambda run, small, inputs, **_: lambda path: shutil.copy(run.out / "pruned.onnx",
                                                                                                   path))
    train, test = digits
    run = _quantize_stage(folder, tmp_path, train, test, qat_epochs=1)
    first = run.post_training["gate"]
    assert (first["agreement_with"], first["accuracy_drop_from"]) == ("pruned FP32 (pruned.onnx)",) * 2
    assert first["reasons"][0].startswith("top-1 agreement with pruned FP32 (pruned.onnx) ")
    assert first["reasons"][1].startswith("accuracy drop from pruned FP32 (pruned.onnx) ")
    gate = run.gate
    assert not gate.ok and gate.agreement_with == "QAT FP32 (pruned-qat.onnx)"
    assert gate.accuracy_drop_from == "pruned FP32 (pruned.onnx)"
    assert gate.reasons[0].startswith("top-1 agreement with QAT FP32 (pruned-qat.onnx) ")
    assert gate.reasons[1].startswith("accuracy drop from pruned FP32 (pruned.onnx) ")


class _Phases(Dataset):
    """A dataset that records which samples each phase of the INT8 stage read."""

    def __init__(self, data: TensorDataset):
        self.data, self.phase, self.read = data, "other", {}

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        self.read.setdefault(self.phase, set()).add(index)
        return self.data[index]


def test_without_validation_data_the_gate_scores_on_samples_calibration_never_read(folder: Path, digits,
                                                                                    tmp_path: Path,
                                                                                    monkeypatch) -> None:
    from structadmm.exporters import accuracy

    train = _Phases(digits[0])

    def in_phase(phase, fn):
        def wrapped(*args, **kwargs):
            train.phase = phase
            try:
                return fn(*args, **kwargs)
            finally:
                train.phase = "other"
        return wrapped

    monkeypatch.setattr(quantize_module, "quantize_onnx", in_phase("calibration", quantize_module.quantize_onnx))
    monkeypatch.setattr(accuracy, "onnx_outputs", in_phase("gate", accuracy.onnx_outputs))
    run = _quantize_stage(folder, tmp_path, train, None)  # no validation data; int8_holdout: its default, 0.1
    calibrated, scored = train.read["calibration"], train.read["gate"]
    assert calibrated and scored and not calibrated & scored  # the gate's samples are not the calibration's
    assert len(scored) == round(0.1 * len(train))
    assert run.gate_data == {"split": "training holdout", "samples": len(scored), "holdout": 0.1}
    # with validation data, the gate scores on it and records so
    (tmp_path / "validated").mkdir()
    validated = _quantize_stage(folder, tmp_path / "validated", digits[0], digits[1])
    assert validated.gate_data == {"split": "validation", "samples": len(digits[1]), "holdout": None}


def test_qat_without_validation_data_never_trains_on_the_gates_samples(folder: Path, digits, tmp_path: Path,
                                                                      monkeypatch) -> None:
    """QAT (when post-training INT8 fails) trains on what calibration reads, with the weight range
    the target CPU needs; the held-out samples the gate scores on stay unseen by both."""
    _break_every_int8(monkeypatch)
    seen = {}

    def qat(run, small, inputs, *, train, reduce_range):
        seen.update(train=train, reduce_range=reduce_range)
        return lambda path: shutil.copy(run.out / "pruned.onnx", path)

    monkeypatch.setattr(stages, "_qat", qat)
    x, y = digits[0].tensors
    train = TensorDataset(x, y, torch.arange(len(x)))  # each sample carries its index
    run = _quantize_stage(folder, tmp_path, train, None, qat_epochs=1)
    assert run.post_training is not None  # QAT ran
    qat_read = {int(i) for batch in seen["train"] for i in batch[2]}
    assert len(qat_read) == len(train) - round(0.1 * len(train))  # int8_holdout's default: 0.1
    held_out = quantize_module.int8_data(train, None, holdout=0.1).gate
    assert run.gate_data == {"split": "training holdout", "samples": len(held_out), "holdout": 0.1}
    assert not qat_read & {int(held_out[i][2]) for i in range(len(held_out))}
    assert seen["reduce_range"] is run.pruned.reduce_range  # QAT's weight range is the INT8 file's


def test_quantize_runs_where_onnxruntime_has_no_calibration_cache(folder: Path, digits, tmp_path: Path,
                                                                  monkeypatch) -> None:
    """ONNX Runtime before 1.27 has no ``calibration_cache_path``: the same results, calibrated each time."""
    import onnxruntime.quantization as ortq
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

    real = ortq.quantize_static
    probe = digits[1].tensors[0][:64]
    cached = layer_sensitivity(folder / "pruned.onnx", digits[0], probe, batches=2, reduce_range=False)

    def quantize_static(model_input, model_output, calibration_data_reader=None, quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=None, per_channel=False, reduce_range=False,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_quantize=None,
                        nodes_to_exclude=None, use_external_data_format=False,
                        calibrate_method=CalibrationMethod.MinMax, calibration_providers=None, extra_options=None):
        return real(model_input, model_output, calibration_data_reader, quant_format=quant_format,
                    op_types_to_quantize=op_types_to_quantize, per_channel=per_channel, reduce_range=reduce_range,
                    activation_type=activation_type, weight_type=weight_type, nodes_to_quantize=nodes_to_quantize,
                    nodes_to_exclude=nodes_to_exclude, use_external_data_format=use_external_data_format,
                    calibrate_method=calibrate_method, calibration_providers=calibration_providers,
                    extra_options=extra_options)

    monkeypatch.setattr(ortq, "quantize_static", quantize_static)  # ORT 1.26's signature
    again = layer_sensitivity(folder / "pruned.onnx", digits[0], probe, batches=2, reduce_range=False)
    assert [(r.node, r.sqnr_db, r.agreement) for r in again] == [(r.node, r.sqnr_db, r.agreement) for r in cached]
    result = quantize_onnx(folder / "pruned.onnx", tmp_path / "q.onnx", digits[0], batches=2,
                           calibration_cache=tmp_path / "cache.json")
    assert result.calibration_samples == 64 and result.quantized_nodes > 0


def _int8_weight_bounds(path: Path) -> list[int]:
    proto = onnx.load(path)
    return [int(np.abs(numpy_helper.to_array(i)).max()) for i in proto.graph.initializer
            if i.data_type == onnx.TensorProto.INT8]


def test_an_x86_cpu_whose_flags_cannot_be_read_gets_7_bit_weights(folder: Path, digits, tmp_path: Path,
                                                                  monkeypatch) -> None:
    import platform

    from structadmm import cpu

    monkeypatch.setattr(platform, "machine", lambda: "AMD64")  # Windows' spelling; no /proc/cpuinfo there
    monkeypatch.setattr(cpu, "_cpuinfo", lambda: None)
    quantize_module.needs_reduced_range.cache_clear()
    try:
        result = quantize_onnx(folder / "pruned.onnx", tmp_path / "q.onnx", digits[0], batches=1)
        assert quantize_module.needs_reduced_range() is True
    finally:
        quantize_module.needs_reduced_range.cache_clear()
    assert result.reduce_range is True
    assert max(_int8_weight_bounds(tmp_path / "q.onnx")) == 64  # the weights really are 7-bit


@pytest.mark.parametrize("machine, flags, expected", [
    ("x86_64", {"avx2", "fma"}, True),
    ("x86_64", {"avx2", "avx512f", "avx512_vnni"}, False),
    ("x86_64", {"avx2", "avx_vnni"}, False),
    ("AMD64", {"avx2", "amx_int8"}, False),
    ("x86_64", None, True),  # flags unknown: the safe side
    ("AMD64", None, True),
    ("aarch64", {"asimddp"}, False),
    ("arm64", None, False),
    ("", None, True),  # not even the architecture is known
])
def test_auto_reduced_range_where_int8_kernels_saturate_or_may(machine: str, flags, expected: bool) -> None:
    from structadmm.cpu import reduced_range_for

    seven, reason = reduced_range_for("auto", machine, flags)
    assert seven is expected and ("7-bit" if expected else "full-range") in reason


@pytest.mark.parametrize("target, seven_bit", [("x86-vnni", False), ("x86-avx2", True), ("arm64", False),
                                               ("any", True)])
def test_the_target_cpu_sets_the_weight_range(folder: Path, digits, tmp_path: Path, target: str,
                                              seven_bit: bool) -> None:
    result = quantize_onnx(folder / "pruned.onnx", tmp_path / "q.onnx", digits[0], batches=1, target_cpu=target)
    assert result.reduce_range is seven_bit and target in result.reduce_range_reason
    assert max(_int8_weight_bounds(tmp_path / "q.onnx")) == (64 if seven_bit else 127)
    asked = quantize_onnx(folder / "pruned.onnx", tmp_path / "q.onnx", digits[0], batches=1, target_cpu=target,
                          reduce_range=not seven_bit)  # quantize_reduce_range, when given, wins
    assert asked.reduce_range is not seven_bit


def test_quantize_run_figures_and_exclusions(folder: Path, digits, tmp_path: Path) -> None:
    train, test = digits
    excluded = "/classifier/classifier.3/Gemm"
    run = _quantize_stage(folder, tmp_path, train, test, quantize_exclude=[excluded])
    assert run.gate.ok and (tmp_path / PRUNED_INT8).exists() and run.models["pruned_int8"] == tmp_path / PRUNED_INT8
    assert run.accuracy["pruned FP32"] == onnx_outputs(tmp_path / "pruned.onnx", test).accuracy
    assert run.pruned.excluded == (excluded,)
    gemm = next(n for n in onnx.load(tmp_path / PRUNED_INT8).graph.node if n.name == excluded)
    weight = next(i for i in onnx.load(tmp_path / PRUNED_INT8).graph.initializer if i.name == gemm.input[1])
    assert weight.data_type == onnx.TensorProto.FLOAT  # left in FP32
    assert {s.node for s in run.sensitivity} == {n.name for n in onnx.load(tmp_path / "pruned.onnx").graph.node
                                                  if n.op_type in ("Conv", "Gemm")}
    assert all(0 <= s.agreement <= 1 and s.sqnr_db > 10 for s in run.sensitivity)


def test_layer_sensitivity_ranks_a_damaged_layer_first(folder: Path, digits, tmp_path: Path) -> None:
    # one channel between two Convs made huge (bias +1000 upstream) but unused (its weights zeroed downstream):
    # the FP32 function is unchanged, yet the per-tensor INT8 range of that activation, quantized with either
    # Conv, now rounds every other channel to 0; the other layers are unaffected
    proto = onnx.load(folder / "pruned.onnx")
    inits = {i.name: i for i in proto.graph.initializer}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    upstream, target = convs[1], convs[2]
    bias = numpy_helper.to_array(inits[upstream.input[2]]).copy()
    bias[0] += 1000.0
    inits[upstream.input[2]].CopyFrom(numpy_helper.from_array(bias, upstream.input[2]))
    weight = numpy_helper.to_array(inits[target.input[1]]).copy()
    weight[:, 0] = 0.0
    inits[target.input[1]].CopyFrom(numpy_helper.from_array(weight, target.input[1]))
    onnx.save(proto, tmp_path / "odd.onnx")
    rows = layer_sensitivity(tmp_path / "odd.onnx", digits[0], digits[1].tensors[0][:128], batches=2)
    assert len(rows) == len(convs) + 2
    assert {rows[0].node, rows[1].node} == {upstream.name, target.name}
    assert rows[1].sqnr_db < rows[2].sqnr_db - 10 and rows[1].agreement < 0.9 <= rows[2].agreement


def test_dynamic_quantization_of_a_linear_model(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    x = torch.randn(16, 32)
    sa.export_onnx(model, x, tmp_path / "mlp.onnx")
    result = quantize_onnx(tmp_path / "mlp.onnx", tmp_path / "mlp8.onnx")  # auto: Linear-heavy → dynamic
    assert result.mode == "dynamic" and result.calibration_samples == 0 and result.quantized_nodes == 2
    ops = [n.op_type for n in onnx.load(tmp_path / "mlp8.onnx").graph.node]
    assert "MatMulInteger" in ops and "Gemm" not in ops
    got = onnx_outputs(tmp_path / "mlp8.onnx", (x, torch.zeros(16, dtype=torch.long))).logits
    assert np.abs(got - model(x).detach().numpy()).max() < 0.05


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="kl"), "calibration method must be one of"),
    (dict(mode="int4"), "quantization mode must be one of"),
    (dict(exclude=["conv9"]), "no node named 'conv9'"),
    (dict(mode="static"), "needs calibration data"),
])
def test_bad_quantize_arguments(folder: Path, tmp_path: Path, kwargs, message: str) -> None:
    with pytest.raises(StructADMMError, match=message):
        quantize_onnx(folder / "pruned.onnx", tmp_path / "q.onnx", **kwargs)
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("changes, message", [
    (dict(quantize="int4"), "quantize = 'int4': must be 'int8'"),
    (dict(calibration_method="kl"), "calibration_method = 'kl': must be 'minmax', 'entropy' or 'percentile'"),
    (dict(int8_min_agreement=1.5), "int8_min_agreement = 1.5: must be less than or equal to 1"),
    (dict(quantize_exclude="conv1"), "quantize_exclude = 'conv1': must be a valid list"),
    (dict(quantize_target_cpu="vnni"), "quantize_target_cpu = 'vnni': must be one of auto, x86-vnni, x86-avx2, arm64"),
    (dict(int8_holdout=1.0), "int8_holdout = 1.0: must be less than 1"),
])
def test_bad_quantize_config(changes, message: str) -> None:
    with pytest.raises(StructADMMError, match=message):
        CompressConfig(**changes)


def test_cli_prints_a_warning_for_a_failing_int8_model(monkeypatch, tmp_path: Path) -> None:
    import structadmm.pipeline as pipeline

    report = {"model": "m", "quantized": {"onnx": REJECTED, "gate": {"ok": False, "reasons": ["top-1 agreement 50%"]}}}
    fake = SimpleNamespace(rank=0, report=report, run_dir=tmp_path)
    monkeypatch.setattr(pipeline, "compress", lambda *a, **k: fake)
    result = runner.invoke(app, ["run", "--quantize", "int8", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "warning: the pruned INT8 model failed its gate (top-1 agreement 50%)" in result.output
    assert REJECTED in result.output


def _variant_rows(ms: dict[tuple[int, str], float]) -> list[dict]:
    return [{"provider": "CPUExecutionProvider", "batch": b, "variant": v, "median_ms": t} for (b, v), t in ms.items()]


def test_slower_than_fp32_names_where_int8_did_not_pay() -> None:
    rows = _variant_rows({(1, "dense FP32"): 4.0, (1, "pruned FP32"): 1.0, (1, "pruned INT8"): 0.5, (1, "dense INT8"): 2.0,
                          (64, "dense FP32"): 40.0, (64, "pruned FP32"): 4.0, (64, "pruned INT8"): 6.0,
                          (64, "dense INT8"): 10.0})
    assert slower_than_fp32(rows) == [{"provider": "CPUExecutionProvider", "batch": 64, "time_ratio": 1.5}]
    assert slower_than_fp32([r for r in rows if r["batch"] == 1]) == []
    assert slower_than_fp32([r for r in rows if r["variant"] != "pruned FP32"]) == []  # nothing to compare with


def test_cli_and_report_say_when_int8_is_slower(monkeypatch, tmp_path: Path) -> None:
    import structadmm.pipeline as pipeline
    from structadmm.bench.report import write_report

    rows = _variant_rows({(64, "dense FP32"): 40.0, (64, "pruned FP32"): 4.0, (64, "pruned INT8"): 6.0,
                          (64, "dense INT8"): 10.0})
    gate = {"ok": True, "reasons": [], "agreement": 1.0, "min_agreement": 0.98, "accuracy_drop": 0.0,
            "max_accuracy_drop": 0.005}
    report = {"model": "m", "latency_variants": rows,
              "quantized": {"onnx": PRUNED_INT8, "gate": gate, "slower_than_fp32": slower_than_fp32(rows)}}
    monkeypatch.setattr(pipeline, "compress", lambda *a, **k: SimpleNamespace(rank=0, report=report, run_dir=tmp_path))
    result = runner.invoke(app, ["run", "--quantize", "int8", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert ("warning: pruned INT8 took 1.50x the time of pruned FP32 on CPUExecutionProvider at batch 64; "
            "pruned.onnx is the faster file there") in " ".join(result.output.split())
    write_report(tmp_path / "written", report)
    assert ("Pruned INT8 is slower than pruned FP32 on CPU at batch 64 (1.50x the time)"
            in (tmp_path / "written" / "report.md").read_text())


FAST = dict(dense_epochs=3, admm_rounds=2, admm_epochs=1, retrain_epochs=1, rho=0.5, rho_growth=2.0,
            bench_batches=[1, 8], bench_min_runs=3, bench_min_seconds=0.0, calibration_batches=2,
            bench_isolate=False)  # isolated timing has its own tests (test_latency, test_pipeline)


@pytest.mark.slow  # the fast suite runs the quantize stage through compress (test_qat.py) and docs/guides/int8.md
def test_cli_run_quantize_int8_end_to_end(tmp_path: Path) -> None:
    config = tmp_path / "cfg.toml"
    config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in FAST.items()))
    out = tmp_path / "r"
    result = runner.invoke(app, ["run", "--config", str(config), "--out", str(out), "--quantize", "int8"])
    assert result.exit_code == 0, result.output
    assert "INT8 accuracy" in result.output
    report = json.loads((out / "report.json").read_text())
    quantized = report["quantized"]
    assert quantized["gate"]["ok"] and quantized["onnx"] == PRUNED_INT8
    assert quantized["macs"] == report["pruned"]["macs"] and quantized["bytes"] == (out / PRUNED_INT8).stat().st_size
    assert quantized["calibration_samples"] == 2 * 64  # calibration_batches of batch_size training samples
    accuracy = quantized["ort_accuracy"]
    assert accuracy["pruned FP32"] > 0.8 and abs(accuracy["pruned INT8"] - accuracy["pruned FP32"]) <= 0.005
    sizes = report["file_sizes"]
    assert sizes["pruned-int8.onnx"] < sizes["pruned.onnx"] / 2 and sizes["dense-int8.onnx"] < sizes["dense.onnx"] / 2
    rows = {(r["batch"], r["variant"]) for r in report["latency_variants"]}
    assert rows == {(b, v) for b in (1, 8) for v in ("dense FP32", "pruned FP32", "pruned INT8", "dense INT8")}
    assert report["parity"]["ok"] and report["config"]["quantize"] == "int8"
    md = (out / "report.md").read_text()
    assert "| | dense FP32 | pruned FP32 | pruned INT8 | dense INT8 |" in md and "INT8 gate" in md
    assert "Per-layer sensitivity" in md


def test_report_md_gives_every_int8_variant_its_per_round_interval(tmp_path: Path) -> None:
    from structadmm.bench.report import write_report

    rows = _variant_rows({(64, "dense FP32"): 40.0, (64, "pruned FP32"): 4.0, (64, "pruned INT8"): 5.0,
                          (64, "dense INT8"): 10.0})
    for row, (low, high) in zip(rows, [(1.0, 1.0), (9.0, 11.0), (7.0, 9.0), (3.5, 4.5)]):
        row |= {"speedup": 40.0 / row["median_ms"], "speedup_per_round": 40.0 / row["median_ms"],
                "speedup_low": low, "speedup_high": high, "ci_coverage": 0.96875}
    gate = {"ok": True, "reasons": [], "agreement": 1.0, "min_agreement": 0.98, "accuracy_drop": 0.0,
            "max_accuracy_drop": 0.005}
    write_report(tmp_path, {"model": "m", "latency_variants": rows, "quantized": {"onnx": PRUNED_INT8, "gate": gate}})
    md = (tmp_path / "report.md").read_text()
    assert ("| CPU batch 64: speedup per round (interval, coverage) | 1.00x (1.00–1.00, 96.9 %) | "
            "10.00x (9.00–11.00, 96.9 %) | 8.00x (7.00–9.00, 96.9 %) | 4.00x (3.50–4.50, 96.9 %) |") in md

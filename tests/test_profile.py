"""Per-layer profiles line the dense and pruned graphs up layer by layer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import onnx
import torch
from torch import nn

from structadmm.bench.profile import kernel_ops, kernel_times, layer_table, node_times, profile_events
from structadmm.errors import StructADMMError
from structadmm.exporters import count_onnx, export_onnx, quantize_onnx
from structadmm.prune.plan import PruningPlan
from structadmm.prune.surgery import compact


def net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 4)).eval()


def test_layer_table_matches_layers_across_models(tmp_path: Path) -> None:
    model, x = net(), torch.randn(2, 3, 8, 8)
    export_onnx(model, x, tmp_path / "dense.onnx")
    PruningPlan.uniform(model, x, "filter", 0.5).project(model)
    export_onnx(compact(model, x), x, tmp_path / "pruned.onnx")
    rows = layer_table(tmp_path / "dense.onnx", tmp_path / "pruned.onnx", batch=4, runs=5)
    assert [r.op_type for r in rows] == ["Conv", "Conv", "Gemm"]
    assert [(r.dense_channels, r.pruned_channels) for r in rows] == [(16, 8), (16, 8), (4, 4)]
    assert sum(r.dense_macs for r in rows) == count_onnx(tmp_path / "dense.onnx").macs
    assert sum(r.pruned_macs for r in rows) == count_onnx(tmp_path / "pruned.onnx").macs
    # fused Conv+ReLU kernels are credited to their Conv
    assert all(r.dense_ms > 0 and r.pruned_ms > 0 for r in rows)


def test_node_times_cover_every_kernel(tmp_path: Path) -> None:
    model, x = net(), torch.randn(2, 3, 8, 8)
    export_onnx(model, x, tmp_path / "m.onnx")
    times = node_times(tmp_path / "m.onnx", batch=2, runs=3)
    compute = {n.name for n in onnx.load(tmp_path / "m.onnx").graph.node if n.op_type in ("Conv", "Gemm")}
    assert len(compute) == 3 and compute <= set(times)  # fused activations are credited to their Conv
    assert all(times[name] > 0 for name in compute) and all(ms >= 0 for ms in times.values())


def test_a_profile_taken_alone_runs_in_a_process_of_its_own(tmp_path: Path) -> None:
    model, x = net(), torch.randn(2, 3, 8, 8)
    export_onnx(model, x, tmp_path / "m.onnx")
    events = profile_events(tmp_path / "m.onnx", batch=2, runs=3, alone=True)
    pids = {e["pid"] for e in events if "pid" in e}
    assert pids and os.getpid() not in pids  # ORT's profiler records the process that ran the session
    assert set(kernel_times(events, warmup=5)) == set(kernel_times(profile_events(tmp_path / "m.onnx", batch=2,
                                                                                  runs=3), warmup=5))
    rows = layer_table(tmp_path / "m.onnx", tmp_path / "m.onnx", batch=2, runs=3, alone=True)
    assert [r.op_type for r in rows] == ["Conv", "Conv", "Gemm"] and all(r.dense_ms > 0 for r in rows)


def test_node_times_credit_int8_kernels_to_their_layer(tmp_path: Path) -> None:
    """ORT fuses DequantizeLinear -> Conv -> QuantizeLinear into one QLinearConv named ``<Conv>_token_N``;
    its time goes to that Conv, as a float Conv's does."""
    model, x = net(), torch.randn(2, 3, 8, 8)
    export_onnx(model, x, tmp_path / "m.onnx")
    quantize_onnx(tmp_path / "m.onnx", tmp_path / "q.onnx", torch.randn(8, 3, 8, 8), mode="static", batches=2,
                  batch_size=4)
    events = profile_events(tmp_path / "q.onnx", batch=2, runs=3)
    assert "QLinearConv" in kernel_ops(events).values()
    times = node_times(tmp_path / "q.onnx", batch=2, runs=3)
    convs = {n.name for n in onnx.load(tmp_path / "m.onnx").graph.node if n.op_type == "Conv"}
    assert len(convs) == 2 and convs <= set(times) and all(times[name] > 0 for name in convs)
    assert not any("_token_" in name for name in times)


def test_kernel_times_leave_out_the_warm_up_runs() -> None:
    def run(start: int, conv_us: int) -> list[dict]:
        return [{"cat": "Session", "name": "model_run", "ts": start, "dur": 100},
                {"cat": "Node", "name": "conv_kernel_time", "ts": start + 10, "dur": conv_us},
                {"cat": "Node", "name": "relu_kernel_time", "ts": start + 60, "dur": 20}]

    # two slow warm-up runs (first-run allocations), then three timed runs
    events = [*run(0, 9000), *run(10_000, 5000), *run(20_000, 40), *run(20_200, 40), *run(20_400, 40)]
    assert kernel_times(events, warmup=2) == {"conv": pytest.approx(0.04), "relu": pytest.approx(0.02)}
    assert kernel_times(events, warmup=0)["conv"] == pytest.approx((9000 + 5000 + 120) / 5 / 1000)
    with pytest.raises(StructADMMError, match="nothing is left"):
        kernel_times(events, warmup=5)


def test_layer_rows_carry_the_bytes_each_layer_moves(tmp_path: Path) -> None:
    model, x = net(), torch.randn(2, 3, 8, 8)
    export_onnx(model, x, tmp_path / "dense.onnx")
    PruningPlan.uniform(model, x, "filter", 0.5).project(model)
    export_onnx(compact(model, x), x, tmp_path / "pruned.onnx")
    rows = layer_table(tmp_path / "dense.onnx", tmp_path / "pruned.onnx", batch=4, runs=2)
    first = rows[0]  # Conv 3 -> 16 (-> 8), 3x3, 8x8, BN folded into its bias; float32
    assert first.dense_bytes == 4 * (4 * (3 * 64 + 16 * 64) + 16 * 27 + 16)
    assert first.pruned_bytes == 4 * (4 * (3 * 64 + 8 * 64) + 8 * 27 + 8)

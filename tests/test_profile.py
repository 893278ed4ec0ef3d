"""Per-layer profiles line the dense and pruned graphs up layer by layer."""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from torch import nn

from structadmm.bench.profile import layer_table, node_times
from structadmm.exporters import count_onnx, export_onnx
from structadmm.pipeline.plan import PruningPlan
from structadmm.pipeline.surgery import compact


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

"""Models deployment engineers bring that no classifier zoo covers: Ultralytics YOLO detectors
built from their YAML (random weights; Ultralytics is a test extra only, never imported by the
package). Each goes through README's library flow: plan → projection → compact → export, and
must lose real MACs, compact exactly (compact checks itself) and export with ONNX parity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import structadmm as sa
from structadmm.exporters import count_onnx, count_torch
from structadmm.layers import flat_outputs

pytest.importorskip("ultralytics")


def yolo(config: str) -> torch.nn.Module:
    from ultralytics import YOLO

    torch.manual_seed(0)
    return YOLO(config).model.eval()


def check_detector(config: str, size: int, tmp_path: Path) -> None:
    model, x = yolo(config), torch.randn(1, 3, size, size)
    with torch.no_grad():  # every output: a segmentation head nests its mask prototypes in a tuple
        before = [t.clone() for t in flat_outputs(model(x))]
    plan = sa.PruningPlan.uniform(model, x, sparsity="filter", ratio=0.5)
    with torch.no_grad():  # tracing left the detector as it was (its anchors are cached in forward())
        torch.testing.assert_close(flat_outputs(model(x)), before)
    assert len(plan.units) >= 40, plan.skipped
    plan.project(model)
    small = sa.compact(model, x)  # raises unless it computes what the masked model computes
    assert count_torch(model, x).macs / count_torch(small, x).macs >= 2.0
    sa.export_onnx(model, x, tmp_path / "dense.onnx", verify=False)
    result = sa.export_onnx(small, x, tmp_path / "pruned.onnx")  # parity against the compacted model
    assert result.max_abs_diff is not None
    sa.verify_onnx(model, tmp_path / "pruned.onnx", x)  # and against the masked model it came from
    assert count_onnx(tmp_path / "dense.onnx").macs / count_onnx(tmp_path / "pruned.onnx").macs >= 2.0


def test_a_yolo_trace_leaves_the_detector_as_it_was_and_finds_its_channels() -> None:
    """The fast check (one trace): the head's anchors, cached in forward() while torch.export
    traced it, are the detector's own again afterwards, and C2f's chunk and the DFL head do not
    stop the plan from reaching the backbone, the neck and the head's convolutions."""
    model, x = yolo("yolov8n.yaml"), torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        before = model(x)[0].clone()
    plan = sa.PruningPlan.uniform(model, x, sparsity="filter", ratio=0.5)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], before)
    assert len(plan.units) >= 40 and not any("equal division" in why for _, why in plan.skipped), plan.skipped
    assert all(not isinstance(v, torch.Tensor) or type(v) is torch.Tensor  # no fake tensor left behind
               for m in model.modules() for v in vars(m).values())


@pytest.mark.slow
@pytest.mark.parametrize("config", ["yolov8n.yaml", "yolo11n.yaml"])
def test_yolo_detectors_prune_at_640(config: str, tmp_path: Path) -> None:
    check_detector(config, 640, tmp_path)


@pytest.mark.slow
def test_structadmm_compact_prunes_a_yolo_detector_from_its_masked_weights(tmp_path: Path) -> None:
    """The CLI's `compact` on YOLOv8n: the masked weights in a safetensors file, the model by its
    Ultralytics name; a run folder whose pruned file has ≥ 2x fewer MACs and passes parity."""
    import json

    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from structadmm.cli import app

    model, x = yolo("yolov8n.yaml"), torch.randn(1, 3, 320, 320)
    sa.PruningPlan.uniform(model, x, sparsity="filter", ratio=0.5).project(model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "masked.safetensors")
    (tmp_path / "fast.toml").write_text("bench_batches = [1]\nbench_min_runs = 3\nbench_min_seconds = 0.0\n"
                                        "bench_isolate = false\n")
    result = CliRunner().invoke(app, ["compact", "--model", "ultralytics:yolov8n.yaml", "--checkpoint",
                                      str(tmp_path / "masked.safetensors"), "--input-shape", "3x320x320",
                                      "-c", str(tmp_path / "fast.toml"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["mac_ratio"] >= 2.0 and report["parity"]["ok"]
    assert all(o["rel_error"] < 1e-3 for o in report["fidelity"]["outputs"])  # the masked model, compacted


@pytest.mark.slow
@pytest.mark.parametrize("config", ["yolov8n-seg.yaml", "yolov8n-pose.yaml", "yolo11n-seg.yaml", "yolo11n-pose.yaml"])
def test_yolo_segmentation_and_pose_heads_prune(config: str, tmp_path: Path) -> None:
    check_detector(config, 320, tmp_path)  # 2.4x to 3.0x fewer MACs at filter 0.5

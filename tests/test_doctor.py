"""`structadmm doctor` and the ORT-build facts it prints; `structadmm bench` in both timing modes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from structadmm.bench import runtime
from structadmm.cli import app
from structadmm.exporters import export_onnx

runner = CliRunner()


def test_installed_ort_lists_the_build_that_provides_the_module() -> None:
    import onnxruntime

    installed = runtime.installed_ort()
    assert len(installed) >= 1 and onnxruntime.__version__ in installed.values()


def test_doctor_reports_one_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "installed_ort", lambda: {"onnxruntime": "1.20.0"})
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    assert "onnxruntime package: onnxruntime 1.20.0" in result.output
    assert "CPUExecutionProvider" in result.output and "CUDA" in result.output
    assert "one onnxruntime build: ok" in result.output


def test_doctor_fails_with_the_fix_when_two_builds_clash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "installed_ort", lambda: {"onnxruntime": "1.20.0", "onnxruntime-gpu": "1.20.0"})
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 1
    assert "onnxruntime 1.20.0, onnxruntime-gpu 1.20.0" in result.output
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in result.output


def test_doctor_without_any_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "installed_ort", lambda: {})
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 1 and "none installed (pip install structadmm[cpu] or [gpu])" in result.output


def test_conflict_message_is_one_line_and_only_for_two_builds() -> None:
    assert runtime.conflict_message({"onnxruntime-gpu": "1.20"}) is None
    message = runtime.conflict_message({"onnxruntime": "1.20", "onnxruntime-directml": "1.20"})
    assert message is not None and "\n" not in message
    assert message.endswith("pip uninstall -y onnxruntime onnxruntime-directml && pip install onnxruntime")


@pytest.mark.parametrize("mode", ["--isolate", "--in-process"])
def test_bench_cli_in_both_modes(mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # the whole table on one line per row
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    for name, width in (("dense", 16), ("pruned", 4)):
        net = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(width * 64, 10))
        export_onnx(net, x, tmp_path / f"{name}.onnx")
    result = runner.invoke(app, ["bench", str(tmp_path / "dense.onnx"), str(tmp_path / "pruned.onnx"), "-b", "2",
                                 "--min-seconds", "0", "--min-runs", "4", "--warmup", "1", "--processes", "2",
                                 "-p", "CPUExecutionProvider", mode], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "per round (interval, coverage)" in result.output and "roofline eff" in result.output
    row = next(line for line in result.output.splitlines() if line.startswith("│") and " CPU " in line)
    assert len(re.findall(r"\d\.\d\dx \(\d+\.\d\d", row)) == 1  # per round (interval)
    cells = [cell.strip() for cell in row.strip("│").split("│")]
    speedup, mac_eff, byte_ratio, roofline = float(cells[4][:-1]), float(cells[5]), float(cells[7][:-1]), float(cells[8])
    assert roofline == pytest.approx(speedup / min(speedup / mac_eff, byte_ratio), abs=0.02)
    # the interval's coverage of the median, as reached: [min, max] of 4 rounds in-process, of 2 isolated
    coverage = "87.5" if mode == "--in-process" else "50.0"
    assert re.search(rf"\d\.\d\dx \(\d+\.\d\d-\d+\.\d\d, {coverage} %\)", row), row

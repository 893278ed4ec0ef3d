"""The run folder's report files and the console table."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from rich.console import Console

from structadmm.bench import LatencyEntry, LatencyReport, render_table, write_report

CPU = "CPUExecutionProvider"


def spec_report() -> dict[str, object]:
    """The SPEC §5 example."""
    return {
        "model": "digits-cnn",
        "dense": {"accuracy": 0.983, "macs": 1234567, "params": 45678, "onnx": "dense.onnx"},
        "pruned": {"accuracy": 0.978, "macs": 234567, "params": 6789, "onnx": "pruned.onnx"},
        "mac_ratio": 5.26,
        "param_ratio": 6.7,
        "parity": {"max_abs_diff": 3.1e-6, "ok": True},
        "latency": [
            {"provider": CPU, "batch": 1, "threads": 2, "dense_ms": 0.412, "pruned_ms": 0.2,
             "dense_p90_ms": 0.45, "pruned_p90_ms": 0.21, "speedup": 2.06, "efficiency": 0.39},
            {"provider": CPU, "batch": 64, "threads": 2, "dense_ms": 9.1, "pruned_ms": 2.4,
             "dense_p90_ms": 9.6, "pruned_p90_ms": 2.6, "speedup": 3.79, "efficiency": 0.72},
        ],
        "config": {"sparsity": "filter", "ratio": 0.5},
        "versions": {"onnxruntime": "1.32.0"},
    }


def _console_text(report: dict[str, object]) -> str:
    console = Console(record=True, width=140, file=io.StringIO())
    console.print(render_table(report))
    return console.export_text()


def test_writes_the_four_files_and_nothing_else(tmp_path: Path) -> None:
    report = spec_report()
    write_report(tmp_path / "run", report)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "accuracy.png", "latency.png", "report.json", "report.md"
    ]
    for png in ("accuracy.png", "latency.png"):
        assert (tmp_path / "run" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_json_round_trips_with_the_spec_keys(tmp_path: Path) -> None:
    report = spec_report()
    write_report(tmp_path, report)
    loaded = json.loads((tmp_path / "report.json").read_text())
    assert loaded == report
    assert set(loaded) >= {"model", "dense", "pruned", "mac_ratio", "param_ratio", "parity",
                           "latency", "config", "versions"}
    assert set(loaded["dense"]) == {"accuracy", "macs", "params", "onnx"}
    assert set(loaded["latency"][0]) == {"provider", "batch", "threads", "dense_ms", "pruned_ms",
                                         "dense_p90_ms", "pruned_p90_ms", "speedup", "efficiency"}


def test_report_md_shows_the_figures_and_embeds_the_plot(tmp_path: Path) -> None:
    write_report(tmp_path, spec_report())
    text = (tmp_path / "report.md").read_text()
    latency_row = "| CPU | 64 | 2 | 9.100 | 9.600 | 2.400 | 2.600 | 3.79x | 0.72 | n/a | n/a |"
    for expected in ("digits-cnn", "98.30 %", "97.80 %", "-0.50 pp", "1,234,567", "234,567",
                     "5.26x", "6.70x", latency_row, "3.1e-06", "ok", "![latency](latency.png)"):
        assert expected in text, expected


def test_latency_png_is_an_image(tmp_path: Path) -> None:
    write_report(tmp_path, spec_report())
    image = matplotlib.image.imread(tmp_path / "latency.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_accuracy_none_is_n_a(tmp_path: Path) -> None:
    report = spec_report()
    report["dense"]["accuracy"] = None  # type: ignore[index]
    report["pruned"]["accuracy"] = None  # type: ignore[index]
    write_report(tmp_path, report)
    assert json.loads((tmp_path / "report.json").read_text())["dense"]["accuracy"] is None
    assert "| accuracy | n/a | n/a | n/a |" in (tmp_path / "report.md").read_text()
    assert "n/a" in _console_text(report)


def test_minimal_report_without_optional_parts(tmp_path: Path) -> None:
    report = {"model": "m", "dense": {"macs": 100, "params": 10},
              "pruned": {"macs": 25, "params": 5}}
    write_report(tmp_path, report)
    text = (tmp_path / "report.md").read_text()
    assert "4.00x" in text and "2.00x" in text  # ratios computed from the counts
    assert "No latency was measured." in text and "Parity: not checked" in text
    assert "4.00x" in _console_text(report)


def test_numpy_values_and_nan_become_plain_json(tmp_path: Path) -> None:
    report = spec_report()
    report["mac_ratio"] = np.float64(5.26)
    report["parity"] = {"max_abs_diff": float("nan"), "ok": np.bool_(False)}
    write_report(tmp_path, report)
    loaded = json.loads((tmp_path / "report.json").read_text())
    assert loaded["mac_ratio"] == 5.26
    assert loaded["parity"] == {"max_abs_diff": None, "ok": False}


def test_rewrite_replaces_files_and_leaves_no_temp_files(tmp_path: Path) -> None:
    write_report(tmp_path, spec_report())
    second = copy.deepcopy(spec_report())
    second["model"] = "second"
    write_report(tmp_path, second)
    assert json.loads((tmp_path / "report.json").read_text())["model"] == "second"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failed_render_leaves_the_folder_untouched(tmp_path: Path) -> None:
    write_report(tmp_path, spec_report())
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    broken = spec_report()
    broken["config"] = {"not json": object()}
    with pytest.raises(TypeError):
        write_report(tmp_path, broken)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_render_table_contains_the_figures() -> None:
    text = _console_text(spec_report())
    for expected in ("digits-cnn", "98.30 %", "1.23M", "235k", "5.26x", "45.7k", "6.70x",
                     "CPU batch 64", "9.100", "2.400", "3.79x", "eff 0.72", "3.1e-06"):
        assert expected in text, expected


def test_rows_from_a_latency_report_fit_the_report(tmp_path: Path) -> None:
    def entry(name: str, median: float, speedup: float, rounds: tuple[float, float, float]) -> LatencyEntry:
        return LatencyEntry(CPU, 64, 2, name, median, median * 1.1, median * 0.9, 0.1, 30, speedup, *rounds,
                            ci_coverage=0.75)

    latency = LatencyReport("dense", [entry("dense", 8.0, 1.0, (1.0, 1.0, 1.0)),
                                      entry("pruned", 2.0, 4.0, (3.9, 3.5, 4.25))])
    report = spec_report()
    report["latency"] = latency.to_rows(mac_ratio=5.0, byte_ratios={64: 2.5, 1: 9.0})
    assert report["latency"][0]["speedup_per_round"] == 3.9 and report["latency"][0]["byte_efficiency"] == 1.6
    # the roofline bound is the smaller ratio: the bytes here (2.5x < 5x), the MACs when bytes fall more
    assert report["latency"][0]["roofline_efficiency"] == 4.0 / 2.5
    assert latency.to_rows(mac_ratio=5.0, byte_ratios={64: 8.0})[0]["roofline_efficiency"] == 4.0 / 5.0
    assert "roofline_efficiency" not in latency.to_rows(mac_ratio=5.0)[0]
    write_report(tmp_path, report)
    text = (tmp_path / "report.md").read_text()
    assert ("| CPU | 64 | 2 | 8.000 | 8.800 | 2.000 | 2.200 | 4.00x | 0.80 | 3.90x (3.50–4.25, 75.0 %) "
            "| 2.50x | 1.60 |" in text)  # the interval with the coverage it reached, not a nominal 95 %
    assert "timed isolated: each alone in its own process" in text


def test_an_interval_without_its_coverage_shows_n_a_and_mixed_modes_are_named(tmp_path: Path) -> None:
    report = spec_report()
    rows = report["latency"]  # type: ignore[assignment]
    rows[0].update(mode="isolated", speedup_per_round=2.0, speedup_low=1.9, speedup_high=2.1)  # type: ignore[index]
    rows[1].update(mode="in-process")  # type: ignore[index]
    write_report(tmp_path, report)
    text = (tmp_path / "report.md").read_text()
    assert "2.00x (1.90–2.10, coverage n/a)" in text and "95 %" not in text.split("## Latency")[1].split("\n\n")[1]
    assert ("timed in several modes: isolated: each alone in its own process, processes alternating (CPU batch 1); "
            "in-process: interleaved run by run in one process (CPU batch 64)") in text


def test_report_md_names_what_the_int8_gate_compared_and_never_ships_a_rejected_file(tmp_path: Path) -> None:
    report = spec_report()
    report["quantized"] = {
        "onnx": "pruned-int8.rejected.onnx", "shipped": False, "macs": 234567,
        "ort_accuracy": {"dense FP32": 0.98, "pruned FP32": 0.97, "rejected INT8": 0.5, "dense INT8": 0.97},
        "gate": {"ok": False, "agreement": 0.5, "min_agreement": 0.95, "accuracy_drop": 0.47, "max_accuracy_drop": 0.01,
                 "agreement_with": "QAT FP32 (pruned-qat.onnx)", "accuracy_drop_from": "pruned FP32 (pruned.onnx)",
                 "reasons": ["top-1 agreement 50.00 % < 95.00 %"]},
        "gate_data": {"split": "training holdout", "samples": 144, "holdout": 0.1},
        "reduce_range_reason": "7-bit weights: the target CPU (x86 without VNNI) saturates full-range int8",
    }
    write_report(tmp_path, report)
    md = (tmp_path / "report.md").read_text()
    assert "rejected INT8" in md and "| pruned INT8 |" not in md and "not shipped and was not timed" in md
    assert "agreement with QAT FP32 (pruned-qat.onnx)" in md and "drop from pruned FP32 (pruned.onnx)" in md
    assert "Scored on 144 training holdout samples (a 10.00 % share" in md
    assert "Weights: 7-bit weights" in md

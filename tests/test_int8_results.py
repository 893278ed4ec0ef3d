"""The INT8 benchmarks' tables (benchmarks/int8.py, benchmarks/qat_vs_ptq.py) when the INT8 gate
rejects the pruned INT8 file: the run then neither ships nor times it, and the tables must say it
was rejected, with the gate's figures, instead of failing on the missing "pruned INT8" entries."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import int8  # noqa: E402
import qat_vs_ptq  # noqa: E402

from structadmm.exporters.quantize import REJECTED, REJECTED_VARIANT, Int8Gate  # noqa: E402


def _quantized(ok: bool) -> dict:
    """report.json's ``quantized`` section as QuantizedRun.report writes it (the fields used here)."""
    gate = Int8Gate(ok, agreement=0.9 if not ok else 1.0, accuracy_drop=0.031 if not ok else 0.0,
                    min_agreement=0.98, max_accuracy_drop=0.005,
                    reasons=("top-1 agreement 90.00% < 98.00%",) if not ok else ())
    accuracy = {"dense FP32": 0.99, "pruned FP32": 0.98, "dense INT8": 0.985,
                (REJECTED_VARIANT if not ok else "pruned INT8"): 0.949 if not ok else 0.98}
    return {"shipped": ok, "onnx": REJECTED if not ok else "pruned-int8.onnx", "ort_accuracy": accuracy,
            "gate": {**asdict(gate), "reasons": list(gate.reasons)}}


def test_a_rejected_file_is_reported_as_rejected_with_the_gates_figures() -> None:
    outcome = int8.int8_outcome(_quantized(ok=False))
    assert not outcome["shipped"] and outcome["accuracy"] == 0.949 and outcome["onnx"] == REJECTED
    cell = int8.int8_cell(outcome)
    assert cell.startswith("rejected by the gate")
    assert "agreement 90.00 % (min 98.00 %)" in cell and "drop 3.10 pt (max 0.50 pt)" in cell and "94.90" in cell
    shipped = int8.int8_outcome(_quantized(ok=True))
    assert shipped["shipped"] and int8.int8_cell(shipped) == "98.00"


@pytest.mark.parametrize("ok", [False, True])
def test_digits_table_names_the_file_that_was_made(ok: bool) -> None:
    q = _quantized(ok)
    sizes = {"dense.onnx": 100, "pruned.onnx": 40, q["onnx"]: 12, "dense-int8.onnx": 30}
    rows = int8.digits_rows({"ort_accuracy": q["ort_accuracy"], "gate": q["gate"], "file_sizes": sizes,
                             "pruned_int8": int8.int8_outcome(q)})
    accuracy, files = rows[2].split(" | "), rows[3].split(" | ")
    assert accuracy[3].startswith("rejected") != ok
    assert files[1:] == ["100", "40", "12", "30 |"]


def test_chain_rows_of_a_rejected_run_are_not_timed_and_not_averaged() -> None:
    def run(seed: int, ok: bool) -> dict:
        q = _quantized(ok)
        speed = {"pruned FP32 b64": 9.0, **({"pruned INT8 b64": 6.0, "pruned INT8 b1": 2.0} if ok else {})}
        return {"data": "digits", "ratio": 0.875, "seed": seed, "mac_ratio": 16.0, "ort_accuracy": q["ort_accuracy"],
                "gate": ok, "pruned_int8": int8.int8_outcome(q), "reduce_range": True, "speedup": speed}

    out = {"command": "qat_vs_ptq.py chain", "machine": {"cpu": "test"}, "runs": [run(0, False), run(1, True)]}
    text = qat_vs_ptq.chain_markdown(out, threads=2)
    rejected = next(line for line in text.splitlines() if line.startswith("| digits | 0.875 | 0 |"))
    assert "rejected by the gate" in rejected and rejected.count("not timed (rejected)") == 2
    summary = text.splitlines()[-1]
    assert summary.startswith("| digits | 0.875 | 2 | 1 |") and summary.endswith("| 6.00x |")
    # result files from before the outcome was recorded (the gate's verdict only) still render
    old = run(2, True)
    del old["pruned_int8"]
    assert "| 98.00 |" in qat_vs_ptq.chain_row(old)

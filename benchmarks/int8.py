"""Pruning plus INT8: dense FP32, pruned FP32, pruned INT8 and dense INT8, timed in one run.

    PYTHONPATH=. .venv/bin/python benchmarks/int8.py                       # ResNet-18, VGG-16 at 224; digits
    PYTHONPATH=. .venv/bin/python benchmarks/int8.py --models resnet18 --batches 1 8 --seconds 3 --skip-digits

Speed (zoo models at 224): random seeded weights (latency does not depend on their values and no
pretrained weights can be downloaded here), filter pruning at ``--ratio`` by one-shot magnitude
projection (ADMM would keep other channels, the same counts), INT8 by :func:`structadmm.quantize_onnx`
(ONNX Runtime static QDQ, per-channel, calibrated on ``--calib-batches`` random batches). All four
files are timed on ORT CPU in one run, each model alone in its own process, alternating round by round
(medians); speedups are over dense FP32. The CPU's int8 dot-product flags are recorded: INT8 speed
depends on them (VNNI, AMX) far more than FP32 speed does.

Accuracy (embedded default): the pipeline as ``structadmm run --quantize int8`` runs it, on the
built-in digits with the default config (``--digits-schedule short``: fewer epochs, as the
tests use); then pruned.onnx is quantized again with each calibration method and evaluated in ONNX Runtime on the held-out split.

Writes benchmarks/results/int8.json and int8.md (``--tag`` adds a suffix).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch

from structadmm.bench import benchmark
from structadmm.exporters.accuracy import onnx_outputs
from structadmm.exporters.fidelity import top1_agreement
from structadmm.cpu import cpu_name, int8_flags
from structadmm.exporters import count_onnx, export_onnx, quantize_onnx
from structadmm.models import get_spec
from structadmm.pipeline import CompressConfig
from structadmm.prune import PruningPlan, compact

RESULTS = Path(__file__).parent / "results"
VARIANTS = {"dense": "dense FP32", "pruned": "pruned FP32", "pruned_int8": "pruned INT8", "dense_int8": "dense INT8"}


def speed(name: str, ratio: float, multiple: int, batches: list[int], threads: int, seconds: float, runs: int,
          calib_batches: int, method: str, processes: int = 6) -> dict:
    spec = get_spec(name)
    torch.manual_seed(0)
    model = spec.build().eval()
    x = spec.example_input(2)
    calibration = torch.randn(calib_batches * 4, *x.shape[1:], generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        paths = {key: Path(tmp) / f"{key}.onnx" for key in VARIANTS}
        export_onnx(model, x, paths["dense"])
        PruningPlan.uniform(model, x, "filter", ratio, multiple=multiple).project(model)
        export_onnx(compact(model, x), x, paths["pruned"])
        for fp32 in ("dense", "pruned"):
            quantize_onnx(paths[fp32], paths[f"{fp32}_int8"], calibration, mode="static", method=method,
                          batches=calib_batches, batch_size=4)
        macs = {key: count_onnx(paths[key]).macs for key in ("dense", "pruned")}
        sizes = {key: path.stat().st_size for key, path in paths.items()}
        report = benchmark(paths, batch_sizes=batches, threads=threads, min_seconds=seconds, min_runs=runs,
                           baseline="dense", processes=processes)
    rows = []
    for batch in batches:
        by = {e.name: e for e in report.entries if e.batch == batch and e.provider == "CPUExecutionProvider"}
        row = {"batch": batch, **{f"{k}_ms": by[k].median_ms for k in VARIANTS},
               **{f"{k}_speedup": by["dense"].median_ms / by[k].median_ms for k in VARIANTS},
               # the median of the per-round ratios, its interval and that interval's coverage
               **{f"{k}_per_round": {"median": by[k].round_speedup, "low": by[k].round_speedup_low,
                                     "high": by[k].round_speedup_high, "coverage": by[k].ci_coverage}
                  for k in VARIANTS if k != "dense"}}
        # how much of INT8's gain on the dense model survives on the pruned one
        row["int8_gain_dense"] = by["dense"].median_ms / by["dense_int8"].median_ms
        row["int8_gain_pruned"] = by["pruned"].median_ms / by["pruned_int8"].median_ms
        row["int8_gain_kept"] = row["int8_gain_pruned"] / row["int8_gain_dense"]
        rows.append(row)
    return {"model": name, "ratio": ratio, "multiple": multiple, "method": method, "processes": processes,
            "mac_ratio": macs["dense"] / macs["pruned"],
            "bytes": sizes, "latency": rows, "skipped_providers": report.skipped, "seconds": time.perf_counter() - start}


# a shorter training schedule (as tests/test_pipeline.py uses) for a loaded machine
SCHEDULES = {"default": {}, "short": dict(dense_epochs=4, admm_rounds=3, admm_epochs=1, retrain_epochs=2, rho=0.5,
                                          rho_growth=2.0)}


def digits_accuracy(methods: list[str], threads: int, schedule: str) -> dict:
    """The embedded default through the pipeline with --quantize int8, then each calibration method."""
    from structadmm.models import load_digits_split
    from structadmm.pipeline.compress import compress_default

    config = CompressConfig(quantize="int8", bench_batches=[1, 64], bench_min_seconds=1.0, bench_threads=threads,
                            **SCHEDULES[schedule])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = compress_default(config, out_dir=Path(tmp) / "run")
        report, run = result.report, result.run_dir
        train, test = load_digits_split(seed=config.seed)
        fp32 = onnx_outputs(run / "pruned.onnx", test)
        methods_out = {}
        for method in methods:
            quantize_onnx(run / "pruned.onnx", Path(tmp) / f"{method}.onnx", train, method=method,
                          batches=config.calibration_batches, batch_size=config.batch_size, seed=config.seed)
            out = onnx_outputs(Path(tmp) / f"{method}.onnx", test)
            methods_out[method] = {"accuracy": out.accuracy, "agreement": top1_agreement(fp32.logits, out.logits)}
    q = report["quantized"]
    return {"model": report["model"], "torch_accuracy": {"dense": report["dense"]["accuracy"],
                                                         "pruned": report["pruned"]["accuracy"]},
            "ort_accuracy": q["ort_accuracy"], "gate": q["gate"], "pruned_int8": int8_outcome(q),
            "mac_ratio": report["mac_ratio"],
            "file_sizes": report["file_sizes"], "latency_variants": report["latency_variants"],
            "calibration_methods": methods_out, "test_samples": len(test), "schedule": schedule,
            "seconds": time.perf_counter() - start}


def int8_outcome(quantized: dict) -> dict:
    """What became of the pruned INT8 file of one run, from its report's ``quantized`` section.

    A file that fails the INT8 gate is kept as ``pruned-int8.rejected.onnx``, scored under
    ``"rejected INT8"`` and never timed: ``shipped`` is False and ``accuracy`` is the rejected
    file's. The gate's figures come along either way. Older result files, which recorded only
    the gate's verdict (a bool), are read too."""
    gate = quantized.get("gate")
    gate = gate if isinstance(gate, dict) else {"ok": bool(gate)}
    accuracy = quantized.get("ort_accuracy") or {}
    shipped = bool(quantized.get("shipped", gate["ok"]))
    return {"shipped": shipped, "accuracy": accuracy.get("pruned INT8" if shipped else "rejected INT8"),
            "onnx": quantized.get("onnx", "pruned-int8.onnx" if shipped else "pruned-int8.rejected.onnx"),
            **{key: gate.get(key) for key in ("agreement", "min_agreement", "accuracy_drop", "max_accuracy_drop")},
            "reasons": list(gate.get("reasons") or [])}


def int8_cell(outcome: dict) -> str:
    """A table cell for the pruned INT8 file: its accuracy (%), or that the gate rejected it, with
    the gate's figures against its limits and the rejected file's accuracy."""
    accuracy = "n/a" if outcome["accuracy"] is None else f"{100 * outcome['accuracy']:.2f}"
    if outcome["shipped"]:
        return accuracy
    figures = []
    if outcome.get("agreement") is not None:
        figures.append(f"agreement {100 * outcome['agreement']:.2f} % (min {100 * outcome['min_agreement']:.2f} %)")
    if outcome.get("accuracy_drop") is not None:
        figures.append(f"drop {100 * outcome['accuracy_drop']:.2f} pt (max {100 * outcome['max_accuracy_drop']:.2f} pt)")
    return f"rejected by the gate ({', '.join(figures) or 'no figures recorded'}; its accuracy {accuracy})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["resnet18", "vgg16"], help="zoo models to time (none: digits only)")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--multiple", type=int, default=16, help="kept channels rounded up to this multiple")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--processes", type=int, default=6, help="rounds of isolated processes (95 %% intervals need 6)")
    parser.add_argument("--calib-batches", type=int, default=2, help="random calibration batches of 4 (zoo models)")
    parser.add_argument("--method", default="minmax", choices=("minmax", "entropy", "percentile"))
    parser.add_argument("--skip-digits", action="store_true", help="speed only")
    parser.add_argument("--digits-schedule", choices=tuple(SCHEDULES), default="default",
                        help="training schedule of the digits run: the default config, or a short one")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    results: dict = {"threads": args.threads, "command": "benchmarks/int8.py " + " ".join(sys.argv[1:]), "speed": [],
                     "machine": {"cpu": cpu_name(), "int8_flags": int8_flags(),
                                 "cpu_count": os.cpu_count(), "machine": platform.machine(),
                                 "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
                                 "loadavg_start": os.getloadavg()}}
    for name in args.models:
        results["speed"].append(speed(name, args.ratio, args.multiple, args.batches, args.threads, args.seconds,
                                      args.runs, args.calib_batches, args.method, args.processes))
        print(json.dumps(results["speed"][-1]), flush=True)
    if not args.skip_digits:
        results["digits"] = digits_accuracy(["minmax", "entropy", "percentile"], args.threads, args.digits_schedule)
        print(json.dumps(results["digits"]), flush=True)
    results["machine"]["loadavg_end"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"int8{args.tag}.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    (RESULTS / f"int8{args.tag}.md").write_text(_markdown(results, args.batches))


def _markdown(results: dict, batches: list[int]) -> str:
    m = results["machine"]
    lines = [f"# Pruning plus INT8 (`{results['command']}`)", "",
             f"ORT CPU, {results.get('threads', 2)} threads, on {m.get('cpu', 'an unrecorded CPU')} "
             f"(int8 dot-product flags: {', '.join(m.get('int8_flags') or ['none'])}); load average at start "
             f"{m['loadavg_start'][0]:.1f}, at end {m['loadavg_end'][0]:.1f} on {m['cpu_count']} cores. "
             "Each model is timed alone in its own process, alternating with the others"
             + (f", {results['speed'][0]['processes']} rounds of processes." if results["speed"]
                and "processes" in results["speed"][0] else ".") + " Speedups are ratios of medians.", ""]
    if results["speed"]:
        lines += ["| model | MAC ratio | batch | dense FP32 ms | pruned FP32 | pruned INT8 | dense INT8 | INT8 gain kept |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in results["speed"]:
            for row in r["latency"]:
                cells = [f"{row['dense_ms']:.2f}"] + [f"{row[f'{k}_ms']:.2f} ({row[f'{k}_speedup']:.2f}x)"
                                                     for k in ("pruned", "pruned_int8", "dense_int8")]
                lines.append(f"| {r['model']} | {r['mac_ratio']:.2f}x | {row['batch']} | " + " | ".join(cells)
                             + f" | {row['int8_gain_kept']:.2f} |")
        lines += ["", "Speedups over dense FP32 in brackets. INT8 gain kept = (pruned FP32 / pruned INT8) / "
                      "(dense FP32 / dense INT8).", ""]
        if any("pruned_int8_per_round" in row for r in results["speed"] for row in r["latency"]):
            lines += ["Per round (pruned INT8 over dense FP32): the median of the per-round ratios, the interval "
                      "between order statistics of the rounds, and the probability that it holds the true median.",
                      "", "| model | batch | pruned FP32 per round | pruned INT8 per round |", "|---|---:|---|---|"]
            lines += [f"| {r['model']} | {row['batch']} | {_per_round(row['pruned_per_round'])} | "
                      f"{_per_round(row['pruned_int8_per_round'])} |"
                      for r in results["speed"] for row in r["latency"] if "pruned_int8_per_round" in row]
            lines.append("")
    if "digits" in results:
        d = results["digits"]
        lines += [f"## Accuracy: embedded default ({d['model']}, {d['test_samples']} held-out digits, "
                  f"{d['schedule']} training schedule)", "", *digits_rows(d), ""]
        for provider_batch in dict.fromkeys((r["batch"]) for r in d["latency_variants"]):
            rows = {r["variant"]: r for r in d["latency_variants"] if r["batch"] == provider_batch}
            lines.append(f"Batch {provider_batch}: " + ", ".join(f"{v} {rows[v]['median_ms']:.3f} ms ({rows[v]['speedup']:.2f}x)"
                                                               for v in rows)
                         + ("" if "pruned INT8" in rows else "; pruned INT8 not timed (rejected by the gate)"))
        lines += ["", f"Gate: {'ok' if d['gate']['ok'] else 'FAILED'} (agreement {100 * d['gate']['agreement']:.2f} %, "
                      f"drop {100 * (d['gate']['accuracy_drop'] or 0):.2f} pt)", "",
                  "| calibration | pruned INT8 accuracy | top-1 agreement with pruned FP32 |", "|---|---:|---:|"]
        lines += [f"| {k} | {100 * v['accuracy']:.2f} % | {100 * v['agreement']:.2f} % |"
                  for k, v in d["calibration_methods"].items()]
    return "\n".join(lines) + "\n"


def _per_round(cell: dict) -> str:
    coverage = "n/a" if cell["coverage"] is None else f"{100 * cell['coverage']:.1f} %"
    return f"{cell['median']:.2f}x ({cell['low']:.2f}–{cell['high']:.2f}, {coverage})"


def digits_rows(d: dict) -> list[str]:
    """The digits run's accuracy and file-size table; a pruned INT8 file the gate rejected is shown
    as rejected (with the gate's figures), never as pruned INT8."""
    acc, sizes = d["ort_accuracy"], d["file_sizes"]
    outcome = d.get("pruned_int8") or int8_outcome({"gate": d["gate"], "ort_accuracy": acc})
    int8 = int8_cell(outcome) + (" %" if outcome["shipped"] else "")
    cells = [f"{100 * acc['dense FP32']:.2f} %", f"{100 * acc['pruned FP32']:.2f} %", int8,
             f"{100 * acc['dense INT8']:.2f} %"]
    files = ("dense.onnx", "pruned.onnx", outcome["onnx"], "dense-int8.onnx")
    return ["| | dense FP32 | pruned FP32 | pruned INT8 | dense INT8 |", "|---|---:|---:|---:|---:|",
            "| accuracy (ONNX Runtime) | " + " | ".join(cells) + " |",
            "| file bytes | " + " | ".join(str(sizes.get(f, "n/a")) for f in files) + " |"]


if __name__ == "__main__":
    main()

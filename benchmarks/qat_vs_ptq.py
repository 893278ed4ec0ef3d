"""INT8 after pruning: post-training quantization against quantization-aware retraining, and the whole chain.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/qat_vs_ptq.py accuracy   # MNIST-1D, paired seeds
    PYTHONPATH=. .venv/bin/python benchmarks/qat_vs_ptq.py chain                        # compress --quantize int8

``accuracy``: per seed, the dense ``mnist1d_cnn`` checkpoint of ``accuracy_vs_baselines.py``
(its cache, trained there when missing), filter-pruned at each ratio by one-shot projection (first
conv and classifier whole, exact counts) and fine-tuned 8 epochs: the pruned FP32 model. Then,
every setting being the pipeline's default (nothing chosen on the test split):

* ``PTQ``: :func:`structadmm.quantize_onnx` (static QDQ, per-channel, MinMax on 8 training
  batches of 256; 7-bit weights where :func:`needs_reduced_range` says so for this CPU);
* ``PTQ full range``: the same with 8-bit weights (what ORT's quantizer does by default);
* ``QAT``: :func:`structadmm.qat_retrain` for ``--qat-epochs`` at ``qat_lr``, then PTQ;
* ``FP32 +E``: the control: the same extra epochs at the same learning rate without fake
  quantization, then PTQ, so that QAT's gain is not just more training.

Every file is scored once on the 10,000-sample test split in ONNX Runtime. Differences are
paired over seeds (95 % t-interval).

``chain``: ``structadmm.compress`` with ``--quantize int8`` on MNIST-1D (``mnist1d-cnn``) and the
built-in digits (``--data``) at the given ratios (exact counts) and seeds (``--seeds``, default
0 1 2: the config's seed, so each seed trains its own dense model): dense FP32 against pruned INT8,
accuracy in ONNX Runtime on the held-out split and speed on ORT CPU at batch 64 and 1 (each model
alone in its own process, alternating).

Writes benchmarks/results/qat_vs_ptq.{json,md} and int8_chain.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch

sys.path.insert(0, str(Path(__file__).parent))
from accuracy_vs_baselines import Ctx, ci95  # noqa: E402  (the dense checkpoints and the interval)
from int8 import int8_cell, int8_outcome  # noqa: E402  (a pruned INT8 file the gate rejected)

from structadmm import compact, export_onnx, qat_retrain, quantize_onnx  # noqa: E402
from structadmm.bench.report import speedup_interval  # noqa: E402
from structadmm.exporters.accuracy import onnx_outputs  # noqa: E402
from structadmm.cpu import cpu_name, int8_flags  # noqa: E402
from structadmm.exporters.quantize import needs_reduced_range  # noqa: E402
from structadmm.pipeline import CompressConfig  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PER_ROUND = ("speedup_per_round", "speedup_low", "speedup_high", "ci_coverage")  # a latency row's interval
VARIANTS = ("pruned FP32", "PTQ", "PTQ full range", "QAT FP32", "QAT", "FP32 +E", "FP32 +E, PTQ")


def accuracy_cell(ctx: Ctx, seed: int, ratio: float, qat_epochs: int, qat_lr: float) -> dict[str, float]:
    """Every variant's ORT test accuracy for one seed and ratio."""
    train, test = ctx.train, ctx.test
    model = copy.deepcopy(ctx.dense(seed))
    ctx.plan(model, ratio).project(model)
    small = ctx.finetune(compact(model.eval(), ctx.example, lower=False), seed, 8, 0.03, None, 0.0)
    control = ctx.finetune(small, seed, qat_epochs, qat_lr, None, 0.0)
    qat = qat_retrain(small, ctx.batches(seed), qat_epochs, lr=qat_lr, seed=seed)
    quant = dict(mode="static", batches=8, batch_size=256, seed=seed)
    scores = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = {name: Path(tmp) / f"{i}.onnx" for i, name in enumerate(VARIANTS)}
        for name, net in (("pruned FP32", small), ("QAT FP32", qat), ("FP32 +E", control)):
            export_onnx(net, ctx.example, files[name])
        quantize_onnx(files["pruned FP32"], files["PTQ"], train, **quant)
        quantize_onnx(files["pruned FP32"], files["PTQ full range"], train, reduce_range=False, **quant)
        quantize_onnx(files["QAT FP32"], files["QAT"], train, **quant)
        quantize_onnx(files["FP32 +E"], files["FP32 +E, PTQ"], train, **quant)
        for name, path in files.items():
            scores[name] = onnx_outputs(path, test, threads=1).accuracy
    return scores


def run_accuracy(args) -> None:
    ctx = Ctx({"threads": 1, "width": 32, "dense_epochs": 20, "dense_lr": 0.1, "batch_size": 256,
               "weight_decay": 5e-4, "cache": str(RESULTS / "cache")})
    rows = []
    start = time.perf_counter()
    for ratio in args.ratios:
        for seed in args.seeds:
            scores = accuracy_cell(ctx, seed, ratio, args.qat_epochs, args.qat_lr)
            rows.append({"ratio": ratio, "seed": seed, **scores})
            print(json.dumps(rows[-1]), flush=True)
    pairs = (("PTQ", "pruned FP32"), ("PTQ full range", "pruned FP32"), ("PTQ", "PTQ full range"),
             ("QAT", "PTQ"), ("QAT", "FP32 +E, PTQ"), ("QAT", "QAT FP32"))
    summary = []
    for ratio in args.ratios:
        cell = [r for r in rows if r["ratio"] == ratio]
        for a, b in pairs:
            mean, lo, hi = ci95([100 * (r[a] - r[b]) for r in cell])
            summary.append({"ratio": ratio, "a": a, "b": b, "mean_pt": mean, "ci95_pt": [lo, hi], "n": len(cell)})
    out = {"command": "benchmarks/qat_vs_ptq.py " + " ".join(sys.argv[1:]), "rows": rows, "paired": summary,
           "reduce_range_here": needs_reduced_range(), "qat_epochs": args.qat_epochs, "qat_lr": args.qat_lr,
           "seconds": time.perf_counter() - start, "machine": _machine()}
    (RESULTS / "qat_vs_ptq.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [f"# Post-training INT8 against quantization-aware retraining, after pruning (MNIST-1D)", "",
             f"Command: `PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python {out['command']}`", "",
             f"mnist1d_cnn (width 32), one-shot filter pruning + 8 epochs of fine-tuning, seeds {args.seeds}; "
             f"QAT and the FP32 control: {args.qat_epochs} epochs at lr {args.qat_lr}. ORT accuracy on the 10,000 "
             f"test samples. This CPU: {_machine()['cpu']}; 7-bit weights by default here: "
             f"{needs_reduced_range()}.", "",
             "## Mean test accuracy (%)", "", "| ratio | " + " | ".join(VARIANTS) + " |",
             "|---|" + "---:|" * len(VARIANTS)]
    for ratio in args.ratios:
        cell = [r for r in rows if r["ratio"] == ratio]
        lines.append(f"| {ratio} | " + " | ".join(f"{100 * statistics.mean(r[v] for r in cell):.2f}"
                                                   for v in VARIANTS) + " |")
    lines += ["", "## Paired differences (points, 95 % CI over seeds)", "", "| ratio | difference | mean | 95 % CI |",
              "|---|---|---:|---|"]
    for s in summary:
        lines.append(f"| {s['ratio']} | {s['a']} − {s['b']} | {s['mean_pt']:+.2f} | "
                     f"[{s['ci95_pt'][0]:+.2f}, {s['ci95_pt'][1]:+.2f}] |")
    (RESULTS / "qat_vs_ptq.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def run_chain(args) -> None:
    from structadmm import compress
    from structadmm.models import get_spec
    from structadmm.models.data import load_data

    results = []
    for data_name in args.data:
        model_name = {"mnist1d": "mnist1d-cnn", "digits": "digits-cnn"}[data_name]
        data = load_data(data_name)
        for ratio in args.ratios:
            for seed in args.seeds:
                config = CompressConfig(ratio=ratio, channel_multiple=1, quantize="int8", bench_batches=[1, 64],
                                        bench_threads=args.threads, bench_min_seconds=args.seconds, seed=seed)
                with tempfile.TemporaryDirectory() as tmp:
                    start = time.perf_counter()
                    report = compress(get_spec(model_name).build(), data.train, data.val, config,
                                      out_dir=Path(tmp) / "run", model_name=model_name).report
                q = report["quantized"]
                rows = {(r["batch"], r["variant"]): r for r in report["latency_variants"]}
                results.append({"data": data_name, "model": model_name, "ratio": ratio, "seed": seed,
                                "mac_ratio": report["mac_ratio"], "ort_accuracy": q["ort_accuracy"],
                                "gate": q["gate"]["ok"], "pruned_int8": int8_outcome(q), "reduce_range": q["reduce_range"],
                                "speedup": {f"{v} b{b}": r["speedup"] for (b, v), r in rows.items()},
                                "per_round": {f"{v} b{b}": {k: r[k] for k in PER_ROUND} for (b, v), r in rows.items()},
                                "seconds": time.perf_counter() - start})
                print(json.dumps(results[-1]), flush=True)
    out = {"command": "benchmarks/qat_vs_ptq.py " + " ".join(sys.argv[1:]), "runs": results, "machine": _machine()}
    (RESULTS / "int8_chain.json").write_text(json.dumps(out, indent=1) + "\n")
    (RESULTS / "int8_chain.md").write_text(chain_markdown(out, args.threads))
    print((RESULTS / "int8_chain.md").read_text())


def chain_markdown(out: dict, threads: int) -> str:
    lines = ["# The whole chain: StructADMM pruning, then INT8, against dense FP32", "",
             f"Command: `PYTHONPATH=. .venv/bin/python {out['command']}` (pipeline defaults, `channel_multiple = 1`, "
             f"`--quantize int8`). Accuracy in ONNX Runtime on the held-out split (MNIST-1D: validation, 5,000; "
             f"digits: 360); speed on ORT CPU, {threads} threads, each model alone in its own process, "
             f"alternating; each speedup is the ratio of medians"
             + (", then the median of the per-round speedups with its interval and that interval's coverage"
                if all("per_round" in r for r in out["runs"]) else ", no per-round interval recorded")
             + f". CPU: {out['machine']['cpu']}, load average at the end {_load(out)}.", "",
             "| data | ratio | seed | MAC ratio | dense FP32 | pruned FP32 | pruned INT8 | chain − dense (pt) | "
             "INT8 − pruned FP32 (pt) | speedup b64: pruned FP32 | pruned INT8 | speedup b1: pruned INT8 | "
             "7-bit weights |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    cells: dict[tuple[str, float], list[dict]] = {}
    for r in out["runs"]:
        cells.setdefault((r["data"], r["ratio"]), []).append(r)
        lines.append(chain_row(r))
    lines += ["", "Over seeds (mean accuracy difference and its 95 % CI where there are several seeds; median speedup), "
                  "over the runs whose pruned INT8 file passed the gate:", "",
              "| data | ratio | seeds | rejected by the gate | chain − dense (pt) | INT8 − pruned FP32 (pt) | "
              "speedup b64: pruned INT8 |",
              "|---|---|---:|---:|---|---|---:|"]
    for (data, ratio), runs in cells.items():
        shipped = [r for r in runs if _outcome(r)["shipped"]]
        if not shipped:
            lines.append(f"| {data} | {ratio} | {len(runs)} | {len(runs)} | n/a | n/a | n/a |")
            continue
        chain = [100 * (r["ort_accuracy"]["pruned INT8"] - r["ort_accuracy"]["dense FP32"]) for r in shipped]
        step = [100 * (r["ort_accuracy"]["pruned INT8"] - r["ort_accuracy"]["pruned FP32"]) for r in shipped]
        speed = statistics.median(r["speedup"]["pruned INT8 b64"] for r in shipped)
        lines.append(f"| {data} | {ratio} | {len(runs)} | {len(runs) - len(shipped)} | {_mean_ci(chain)} | "
                     f"{_mean_ci(step)} | {speed:.2f}x |")
    return "\n".join(lines) + "\n"


def _outcome(run: dict) -> dict:
    """The pruned INT8 outcome of one chain run (older result files recorded the gate's verdict only)."""
    return run.get("pruned_int8") or int8_outcome({"gate": run["gate"], "ort_accuracy": run["ort_accuracy"]})


def chain_row(r: dict) -> str:
    """One run of the chain as a table row. A pruned INT8 file that failed the gate was neither
    shipped nor timed: its cells say so, with the gate's figures, instead of an accuracy and speedups."""
    a, outcome = r["ort_accuracy"], _outcome(r)
    if outcome["shipped"]:
        int8 = [f"{100 * a['pruned INT8']:.2f}", f"{100 * (a['pruned INT8'] - a['dense FP32']):+.2f}",
                f"{100 * (a['pruned INT8'] - a['pruned FP32']):+.2f}"]
        timed = [_speed(r, "pruned INT8 b64"), _speed(r, "pruned INT8 b1")]
    else:
        int8 = [int8_cell(outcome), "n/a", "n/a"]
        timed = ["not timed (rejected)"] * 2
    return (f"| {r['data']} | {r['ratio']} | {r.get('seed', 0)} | {r['mac_ratio']:.2f}x | "
            f"{100 * a['dense FP32']:.2f} | {100 * a['pruned FP32']:.2f} | {int8[0]} | {int8[1]} | {int8[2]} | "
            f"{_speed(r, 'pruned FP32 b64')} | {timed[0]} | {timed[1]} | {'yes' if r['reduce_range'] else 'no'} |")


def _speed(run: dict, key: str) -> str:
    """The ratio of medians, and the per-round median with its interval where it was recorded."""
    per_round = (run.get("per_round") or {}).get(key)
    return f"{run['speedup'][key]:.2f}x" + (f"; {speedup_interval(per_round)}" if per_round else "")


def _load(out: dict) -> str:
    load = out["machine"].get("loadavg")
    return "/".join(f"{v:.1f}" for v in load) if load else "n/a"


def _mean_ci(values: list[float]) -> str:
    mean, low, high = ci95(values)
    return f"{mean:+.2f}" if len(values) < 2 else f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]"


def _machine() -> dict:
    return {"cpu": cpu_name(), "int8_flags": int8_flags(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "loadavg": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("accuracy", "chain"))
    parser.add_argument("--ratios", type=float, nargs="+", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0-4 (accuracy), 0-2 (chain)")
    parser.add_argument("--data", nargs="+", choices=("mnist1d", "digits"), default=["mnist1d", "digits"],
                        help="chain: the built-in data sets to run")
    parser.add_argument("--qat-epochs", type=int, default=2)
    parser.add_argument("--qat-lr", type=float, default=CompressConfig().qat_lr)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    if args.what == "accuracy":
        args.ratios = args.ratios or [0.75, 0.875, 0.9375]
        args.seeds = args.seeds or [0, 1, 2, 3, 4]
        run_accuracy(args)
    else:
        args.ratios = args.ratios or [0.875, 0.9375]
        args.seeds = args.seeds or [0, 1, 2]
        run_chain(args)


if __name__ == "__main__":
    main()

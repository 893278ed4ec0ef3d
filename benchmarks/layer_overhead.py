"""Why small layers do not speed up in proportion: a fixed cost per kernel, from ORT's profiler.

    .venv/bin/python benchmarks/layer_overhead.py                       # MobileNetV2, 50 % filter, batch 1
    .venv/bin/python benchmarks/layer_overhead.py --model resnet18 --batch 8 --spinning off

Profiles the dense and the pruned (compacted) model layer by layer (``structadmm.bench.profile``),
each alone in a fresh process of its own, ``--rounds`` times, and in every round fits every matrix layer's time as ``t = a + b * MACs`` by least squares, per model and per
kind of layer (depthwise or not). ``a`` is what a kernel costs whatever its size (thread
hand-off, the NCHWc reorders, reading its weights); pruning cannot remove it, so a model whose
pruned layers are mostly ``a`` cannot reach speedup = MAC ratio. Prints the fit and the share
of the pruned model's time that is fixed cost, each as the median over the rounds with its interval
(96.9 % coverage for 6 rounds); writes benchmarks/results/layer_overhead_<model>_<spinning>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from structadmm.bench.latency import SPINNING, median_interval
from structadmm.bench.profile import layer_table
from structadmm.exporters import export_onnx, load_onnx
from structadmm.models import get_spec
from structadmm.prune import PruningPlan, compact

RESULTS = Path(__file__).parent / "results"


def fit(rows: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares ``t = a + b * macs`` over (macs, ms) pairs; a in ms, b in ms per MMAC."""
    macs, ms = np.array(rows, dtype=float).T
    b, a = np.polyfit(macs / 1e6, ms, 1)
    return float(a), float(b)


def fits_of(table, grouped: set[str]) -> dict:
    """One profile pair's fits: per model (dense, pruned) and kind of layer, ``t = a + b * MACs``; and per
    model its layers' total time, fixed cost and fixed share."""
    result: dict = {"fits": {}}
    for model_key, macs_of, ms_of in (("dense", lambda r: r.dense_macs, lambda r: r.dense_ms),
                                      ("pruned", lambda r: r.pruned_macs, lambda r: r.pruned_ms)):
        rows = [r for r in table if macs_of(r)]
        total = sum(ms_of(r) for r in rows)
        fixed = 0.0
        for kind, mine in (("grouped", [r for r in rows if r.name in grouped]),
                           ("dense", [r for r in rows if r.name not in grouped])):
            if len(mine) < 3:
                continue
            a, b = fit([(macs_of(r), ms_of(r)) for r in mine])
            fixed += a * len(mine)
            result["fits"][f"{model_key}/{kind}"] = {"layers": len(mine), "fixed_ms": a, "ms_per_mmac": b}
        result[model_key] = {"total_ms": total, "fixed_ms": fixed, "fixed_share": fixed / total}
    result["layer_time_ratio"] = result["dense"]["total_ms"] / result["pruned"]["total_ms"]
    return result


def summarise(rounds: list[dict]) -> dict:
    """Every figure of :func:`fits_of` as its median over the rounds with its interval: [median, low, high]."""
    def spread(values: list[float]) -> list[float]:
        interval = median_interval(values)
        return [statistics.median(values), interval.low, interval.high]

    out: dict = {"fits": {}, "layer_time_ratio": spread([r["layer_time_ratio"] for r in rounds])}
    for key in rounds[0]["fits"]:
        out["fits"][key] = {"layers": rounds[0]["fits"][key]["layers"],
                            **{f: spread([r["fits"][key][f] for r in rounds]) for f in ("fixed_ms", "ms_per_mmac")}}
    for model_key in ("dense", "pruned"):
        out[model_key] = {f: spread([r[model_key][f] for r in rounds]) for f in ("total_ms", "fixed_ms", "fixed_share")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenetv2")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--multiple", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=6, help="profile pairs, each model in its own process (6: 96.9 %%)")
    parser.add_argument("--spinning", choices=SPINNING, default="run", help="ORT pool threads (see structadmm.bench.latency)")
    args = parser.parse_args()
    spec = get_spec(args.model)
    torch.manual_seed(0)
    model = spec.build().eval()
    x = spec.example_input(2)
    with tempfile.TemporaryDirectory() as tmp:
        dense, pruned = Path(tmp) / "dense.onnx", Path(tmp) / "pruned.onnx"
        export_onnx(model, x, dense)
        PruningPlan.uniform(model, x, "filter", args.ratio, multiple=args.multiple).project(model)
        export_onnx(compact(model, x), x, pruned)
        grouped = {node.name for node in load_onnx(dense).graph.node
                   if any(a.name == "group" and a.i > 1 for a in node.attribute)}
        rounds, table = [], []
        for _ in range(args.rounds):  # a round: dense, then pruned, each profiled in a fresh process
            table = layer_table(dense, pruned, batch=args.batch, threads=args.threads, runs=args.runs,
                                spinning=args.spinning, alone=True)
            rounds.append(fits_of(table, grouped))
    summary = summarise(rounds)
    macs = sum(r.dense_macs for r in table), sum(r.pruned_macs or 0 for r in table)
    coverage = median_interval(range(args.rounds)).coverage
    result = {"model": args.model, "ratio": args.ratio, "batch": args.batch, "threads": args.threads,
              "spinning": args.spinning, "runs": args.runs, "rounds": args.rounds, "coverage": coverage,
              "timing": "ORT's profiler, each model profiled alone in its own process, one pair per round",
              "mac_ratio": macs[0] / macs[1], **summary, "per_round": rounds, "loadavg": os.getloadavg()}

    def show(value: list[float], scale: float = 1.0, digits: int = 1) -> str:
        return f"{value[0] * scale:.{digits}f} ({value[1] * scale:.{digits}f}-{value[2] * scale:.{digits}f})"

    print(f"medians over {args.rounds} rounds (interval, {100 * coverage:.1f} % coverage)")
    for key, f in summary["fits"].items():
        print(f"{key:15}: {f['layers']:3} layers, t = {show(f['fixed_ms'], 1000)} us + {show(f['ms_per_mmac'], 1000, 2)} us/MMAC")
    for key in ("dense", "pruned"):
        m = summary[key]
        print(f"{key:6} model: layers total {show(m['total_ms'], 1, 3)} ms, fixed cost {show(m['fixed_ms'], 1, 3)} ms, "
              f"share {show(m['fixed_share'], 100, 0)} %")
    print(f"MAC ratio {result['mac_ratio']:.2f}x; layer-time ratio {show(summary['layer_time_ratio'], 1, 2)}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"layer_overhead_{args.model}_{args.spinning}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

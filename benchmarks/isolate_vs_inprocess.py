"""Isolated timing (each model alone in its own process) against interleaved in one process.

    .venv/bin/python benchmarks/isolate_vs_inprocess.py            # resnet18 and mobilenetv2 at 224, batch 1 and 8

Each model is pruned filter-wise at 50 % (random seeded weights, one-shot magnitude projection:
latency and MACs do not depend on the weight values), compacted and exported, then the dense/pruned
pair is measured ``--repeats`` times in both modes of :func:`structadmm.bench.benchmark`, the two
modes taking turns (in-process first on even repeats, isolated first on odd ones) so drift falls on
both. Every row has the ratio of medians, the median of the per-round ratios with its 95 % interval,
the MAC efficiency and the byte ratio (the roofline's memory side). The machine's load average is
recorded before and after every measurement: on a shared machine the figures are noisy.
Writes benchmarks/results/isolate_vs_inprocess.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from structadmm.bench import benchmark
from structadmm.exporters import count_onnx, export_onnx
from structadmm.models import get_spec
from structadmm.prune import PruningPlan, compact

RESULTS = Path(__file__).parent / "results"
MODES = {"in-process": False, "isolated": True}


def prepare(name: str, ratio: float, multiple: int, folder: Path) -> dict:
    spec = get_spec(name)
    torch.manual_seed(0)
    model = spec.build().eval()
    x = spec.example_input(2)
    paths = {"dense": folder / f"{name}_dense.onnx", "pruned": folder / f"{name}_pruned.onnx"}
    export_onnx(model, x, paths["dense"])
    PruningPlan.uniform(model, x, "filter", ratio, multiple=multiple).project(model)
    export_onnx(compact(model, x), x, paths["pruned"])
    return {"paths": paths, "costs": {key: count_onnx(path) for key, path in paths.items()}}


def measure(pair: dict, mode: str, args: argparse.Namespace) -> list[dict]:
    costs = pair["costs"]
    mac_ratio = costs["dense"].macs / costs["pruned"].macs
    byte_ratios = {b: costs["dense"].bytes_at(b) / costs["pruned"].bytes_at(b) for b in args.batches}
    load_before, start = os.getloadavg()[0], time.perf_counter()
    report = benchmark(pair["paths"], batch_sizes=args.batches, threads=args.threads, warmup=args.warmup,
                       min_runs=args.runs, min_seconds=args.seconds, providers=["CPUExecutionProvider"],
                       isolate=MODES[mode], processes=args.processes)
    seconds, load_after = time.perf_counter() - start, os.getloadavg()[0]
    rows = report.to_rows(dense="dense", pruned="pruned", mac_ratio=mac_ratio, byte_ratios=byte_ratios)
    return [row | {"mac_ratio": mac_ratio, "seconds": seconds, "load_before": load_before, "load_after": load_after}
            for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenetv2"])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--multiple", type=int, default=1, help="round kept channels up to a multiple")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0, help="timing budget per batch size and mode")
    parser.add_argument("--runs", type=int, default=16, help="timed runs per model, batch size and mode")
    parser.add_argument("--warmup", type=int, default=4, help="untimed runs per model (per process when isolated)")
    parser.add_argument("--processes", type=int, default=6, help="isolated: rounds of processes (6: 96.9 %% intervals)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    command = "python benchmarks/isolate_vs_inprocess.py " + shlex.join(sys.argv[1:])
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            pair = prepare(name, args.ratio, args.multiple, Path(tmp))
            for repeat in range(args.repeats):
                order = list(MODES) if repeat % 2 == 0 else list(reversed(MODES))
                for mode in order:
                    for row in measure(pair, mode, args):
                        results.append({"model": name, "repeat": repeat} | row)
                        print(json.dumps(results[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    stem = f"isolate_vs_inprocess{args.tag}"
    meta = {"command": command, "cpu_count": os.cpu_count(), "args": vars(args)}
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(table(results, command))


def table(results: list[dict], command: str) -> str:
    lines = [f"`{command.strip()}` (ONNX Runtime CPU, filter 50 %, 224x224, random weights)", "",
             "Load is the machine's 1-minute load average before and after each measurement: on a 2-core machine "
             "anything above 2 means the timed runs shared the cores with other work, and the figures are noisy.", "",
             "| model | batch | mode | repeat | dense ms | pruned ms | speedup | per round (interval, coverage) | MAC ratio "
             "| eff | byte ratio | speedup / byte ratio | load before → after |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(results, key=lambda r: (r["model"], r["batch"], r["mode"], r["repeat"])):
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['mode']} | {r['repeat'] + 1} | {r['dense_ms']:.2f} | {r['pruned_ms']:.2f} "
            f"| {r['speedup']:.2f}x | {r['speedup_per_round']:.2f}x ({r['speedup_low']:.2f}–{r['speedup_high']:.2f}, "
            f"{100 * r['ci_coverage']:.1f} %) "
            f"| {r['mac_ratio']:.2f}x | {r['efficiency']:.2f} | {r['byte_ratio']:.2f}x | {r['byte_efficiency']:.2f} "
            f"| {r['load_before']:.1f} → {r['load_after']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""YOLO detectors pruned at filter 0.5: MACs, parity and ONNX Runtime CPU latency at 640 × 640.

    .venv/bin/python benchmarks/yolo.py                       # YOLOv8n and YOLO11n, batch 1
    .venv/bin/python benchmarks/yolo.py --models yolov8n.yaml --processes 6 --seconds 4

Each detector is built from its Ultralytics YAML (random weights; Ultralytics is a test and
benchmark extra, never a dependency of the package), pruned with README's library flow
(uniform filter plan at 0.5, one-shot projection: the speed of a structure does not depend on how
its weights were chosen), compacted (checked against the masked model), exported and checked in
ONNX Runtime, then timed against its dense export with the project's harness: isolated, each
model alone in its own process, dense and pruned processes alternating over ``--processes``
rounds, ORT CPU, 2 threads. Reported: medians, the median of the per-round speedups with its
distribution-free interval and the coverage that interval reaches, and the MAC ratio from the
ONNX files. One detector per process of this script (``--models`` runs them one after another,
each in a fresh interpreter).

Writes benchmarks/results/yolo.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def measure(config: str, args: argparse.Namespace) -> dict:
    import torch
    from ultralytics import YOLO

    import structadmm as sa
    from structadmm.bench.latency import benchmark

    torch.manual_seed(0)
    model, x = YOLO(config).model.eval(), torch.randn(1, 3, 640, 640)
    plan = sa.PruningPlan.uniform(model, x, sparsity="filter", ratio=0.5)
    plan.project(model)
    small = sa.compact(model, x)
    folder = Path(tempfile.mkdtemp())
    sa.export_onnx(model, x, folder / "dense.onnx", verify=False)
    parity = sa.export_onnx(small, x, folder / "pruned.onnx").max_abs_diff
    masked_parity = sa.verify_onnx(model, folder / "pruned.onnx", x)
    dense_macs, pruned_macs = sa.count_onnx(folder / "dense.onnx").macs, sa.count_onnx(folder / "pruned.onnx").macs
    report = benchmark({"dense": folder / "dense.onnx", "pruned": folder / "pruned.onnx"}, batch_sizes=[1],
                       threads=args.threads, min_seconds=args.seconds, isolate=True, processes=args.processes)
    row = report.to_rows(dense="dense", pruned="pruned", mac_ratio=dense_macs / pruned_macs)[0]
    return {"model": Path(config).stem, "units": len(plan.units), "dense_macs": dense_macs, "pruned_macs": pruned_macs,
            "mac_ratio": dense_macs / pruned_macs, "parity_compacted": parity, "parity_masked": masked_parity, **row}


def render(rows: list[dict], meta: dict) -> str:
    from structadmm.bench.report import speedup_interval

    lines = [
        "# YOLO detectors at filter 0.5, ONNX Runtime CPU, 640 × 640, batch 1",
        "",
        f"Timing: isolated (each model alone in its own process, dense and pruned alternating), "
        f"{meta['processes']} rounds of processes, {meta['threads']} threads, medians. CPU: {meta['cpu']}; "
        f"load average when it started: {meta['load']}. Command: `{meta['command']}`.",
        "",
        "| model | MACs dense → pruned | MAC ratio | dense ms | pruned ms | speedup (median of rounds, interval, "
        "coverage) | efficiency | parity vs masked |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['dense_macs'] / 1e9:.2f} G → {r['pruned_macs'] / 1e9:.2f} G | {r['mac_ratio']:.2f}x | "
            f"{r['dense_ms']:.1f} | {r['pruned_ms']:.1f} | {speedup_interval(r)} | {r['efficiency']:.2f} | "
            f"{r['parity_masked']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["yolov8n.yaml", "yolo11n.yaml"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--processes", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child: measure this config, print its row as JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return
    rows = []
    for config in args.models:  # one detector per process
        child = [sys.executable, __file__, "--one", config, "--threads", str(args.threads),
                 "--processes", str(args.processes), "--seconds", str(args.seconds)]
        done = subprocess.run(child, capture_output=True, text=True, check=True, timeout=3600)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1]["model"], f"{rows[-1]['mac_ratio']:.2f}x MACs", f"{rows[-1]['speedup_per_round']:.2f}x")
    from structadmm.cpu import cpu_name

    meta = {"threads": args.threads, "processes": args.processes, "cpu": cpu_name(), "machine": platform.machine(),
            "load": " ".join(f"{v:.1f}" for v in os.getloadavg()),
            "command": "python benchmarks/yolo.py " + " ".join(sys.argv[1:])}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "yolo.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (RESULTS / "yolo.md").write_text(render(rows, meta))
    print(render(rows, meta))


if __name__ == "__main__":
    main()

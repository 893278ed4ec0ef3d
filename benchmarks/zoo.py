"""The model zoo through the pipeline: prune, compact, export with parity, time on ORT CPU.

    .venv/bin/python benchmarks/zoo.py                                   # every model, filter and shape at 50 %
    .venv/bin/python benchmarks/zoo.py --models resnet18 vgg16 mobilenetv2 --sparsity filter --batches 1 8

Weights are random (seeded): latency and MACs do not depend on their values, and no
pretrained weights can be downloaded here. One-shot magnitude projection stands in for ADMM,
which would choose different channels but the same counts. Dense and pruned are timed in one
process, interleaved (medians); the speedup efficiency is speedup / MAC ratio.
Writes benchmarks/results/zoo_<sparsity>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from structadmm.bench import benchmark
from structadmm.exporters import count_onnx, export_onnx
from structadmm.models import get_spec, model_names
from structadmm.pipeline import PruningPlan, compact

RESULTS = Path(__file__).parent / "results"


def measure(name: str, sparsity: str, ratio: float, multiple: int, batches: list[int], threads: int, seconds: float,
            runs: int) -> dict:
    spec = get_spec(name)
    torch.manual_seed(0)
    model = spec.build().eval()
    x = spec.example_input(2)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        dense, pruned = Path(tmp) / "dense.onnx", Path(tmp) / "pruned.onnx"
        export_onnx(model, x, dense)
        PruningPlan.uniform(model, x, sparsity, ratio, multiple=multiple).project(model)
        small = compact(model, x)
        parity = export_onnx(small, x, pruned).max_abs_diff
        macs = count_onnx(dense).macs, count_onnx(pruned).macs
        report = benchmark({"dense": dense, "pruned": pruned}, batch_sizes=batches, threads=threads,
                           min_seconds=seconds, min_runs=runs)
    mac_ratio = macs[0] / macs[1]
    rows = report.to_rows(dense="dense", pruned="pruned", mac_ratio=mac_ratio)
    return {"model": name, "sparsity": sparsity, "ratio": ratio, "multiple": multiple, "dense_macs": macs[0], "pruned_macs": macs[1],
            "mac_ratio": mac_ratio, "parity": parity, "seconds": time.perf_counter() - start,
            "latency": [{k: row[k] for k in ("batch", "dense_ms", "pruned_ms", "speedup", "efficiency")} for row in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[n for n in model_names() if n != "digits-cnn"])
    parser.add_argument("--sparsity", nargs="+", default=["filter", "shape"])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--multiple", type=int, default=16,
                        help="round kept channels up to a multiple (the pipeline's channel_multiple)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--tag", default="", help="suffix for the result files")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    for sparsity in args.sparsity:
        results = []
        for name in args.models:
            results.append(measure(name, sparsity, args.ratio, args.multiple, args.batches, args.threads, args.seconds, args.runs))
            print(json.dumps(results[-1]), flush=True)
        stem = f"zoo_{sparsity}{args.tag}"
        (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
        (RESULTS / f"{stem}.md").write_text(_table(results, args.batches))


def _table(results: list[dict], batches: list[int]) -> str:
    head = "| model | MAC ratio | parity | " + " | ".join(f"speedup b={b} | eff b={b}" for b in batches) + " |"
    lines = [head, "|---" * (3 + 2 * len(batches)) + "|"]
    for r in results:
        lat = {row["batch"]: row for row in r["latency"]}
        cells = " | ".join(f"{lat[b]['speedup']:.2f}x | {lat[b]['efficiency']:.2f}" for b in batches)
        lines.append(f"| {r['model']} | {r['mac_ratio']:.2f}x | {r['parity']:.1e} | {cells} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

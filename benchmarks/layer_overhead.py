"""Why small layers do not speed up in proportion: a fixed cost per kernel, from ORT's profiler.

    .venv/bin/python benchmarks/layer_overhead.py                       # MobileNetV2, 50 % filter, batch 1
    .venv/bin/python benchmarks/layer_overhead.py --model resnet18 --batch 8 --spinning off

Profiles the dense and the pruned (compacted) model layer by layer (``structadmm.bench.profile``)
and fits every matrix layer's time as ``t = a + b * MACs`` by least squares, per model and per
kind of layer (depthwise or not). ``a`` is what a kernel costs whatever its size (thread
hand-off, the NCHWc reorders, reading its weights); pruning cannot remove it, so a model whose
pruned layers are mostly ``a`` cannot reach speedup = MAC ratio. Prints the fit and the share
of the pruned model's time that is fixed cost; writes benchmarks/results/layer_overhead_<model>_<spinning>.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from structadmm.bench.latency import SPINNING
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenetv2")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--multiple", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=300)
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
        table = layer_table(dense, pruned, batch=args.batch, threads=args.threads, runs=args.runs, spinning=args.spinning)
        grouped = {node.name for node in load_onnx(dense).graph.node
                   if any(a.name == "group" and a.i > 1 for a in node.attribute)}
    result = {"model": args.model, "ratio": args.ratio, "batch": args.batch, "threads": args.threads,
              "spinning": args.spinning, "fits": {}}
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
            print(f"{model_key:6} model, {kind:7} convs: {len(mine):3} layers, t = {1000 * a:6.1f} us + {1000 * b:5.2f} us/MMAC")
        result[model_key] = {"total_ms": total, "fixed_ms": fixed, "fixed_share": fixed / total}
        print(f"{model_key:6} model: layers total {total:.3f} ms, of which fixed cost {fixed:.3f} ms ({100 * fixed / total:.0f} %)")
    d, p = result["dense"], result["pruned"]
    macs = sum(r.dense_macs for r in table), sum(r.pruned_macs or 0 for r in table)
    ideal = d["total_ms"] * macs[1] / macs[0]
    print(f"MAC ratio {macs[0] / macs[1]:.2f}x; layer-time ratio {d['total_ms'] / p['total_ms']:.2f}x; "
          f"with no fixed cost the pruned layers would take {ideal:.3f} ms")
    result["mac_ratio"] = macs[0] / macs[1]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"layer_overhead_{args.model}_{args.spinning}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""ONNX in, ONNX out: the speedup of a model given as an ONNX file against the same model given as torch.

    .venv/bin/python benchmarks/onnx_input.py                         # zoo and torchvision set, opsets 13 and current
    .venv/bin/python benchmarks/onnx_input.py --models resnet20 tv:mobilenet_v3_small --opsets 13

For each model (zoo names; ``tv:<name>`` for a torchvision classification model, random
weights) and opset:

* torch path: the torch model is exported (dense), pruned with the same one-shot filter
  projection as benchmarks/zoo.py, compacted and exported (pruned);
* ONNX path: the model is first exported at that opset to ``user.onnx``, which stands for the
  user's file; ``load_onnx_model`` converts it (onnx2torch, checked against ONNX Runtime), the
  same projection prunes it, and the compacted module is exported with the file's signature.
  Its dense baseline is ``user.onnx`` itself, timed as given.

All four files are timed in one interleaved ONNX Runtime run (medians). ``ratio`` is the ONNX
path's speedup over the torch path's; the goal is within 5 % (0.95..1.05). "same pruned layers"
compares the two pruned files structurally: the shapes of every weight matrix and kernel, and the
op counts (listed where they differ, torch / ONNX), which decide latency independently of timing noise. A model that fails
on either path is recorded with its one-line reason (coverage). ImageNet models run at
``--imagenet-size`` (default 128) to keep the run short on a 2-core machine.
Writes benchmarks/results/onnx_input.json and .md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

from structadmm.bench import benchmark
from structadmm.errors import StructADMMError
from structadmm.exporters import count_onnx, export_onnx, load_onnx, onnx_signature
from structadmm.models import get_spec
from structadmm.models.onnx_input import load_onnx_model
from structadmm.pipeline import PruningPlan, compact

RESULTS = Path(__file__).parent / "results"
ZOO = ["resnet20", "mobilenetv2", "resnet18", "alexnet", "vgg16", "resnet56", "resnet50", "c3d-small", "lenet5",
       "alexnet-cifar"]
TORCHVISION = ["tv:mobilenet_v3_small", "tv:shufflenet_v2_x0_5", "tv:squeezenet1_1", "tv:efficientnet_b0",
               "tv:regnet_y_400mf", "tv:densenet121"]


def build(name: str, imagenet_size: int) -> tuple[torch.nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    if name.startswith("tv:"):
        import torchvision

        return torchvision.models.get_model(name[3:], weights=None).eval(), (3, imagenet_size, imagenet_size)
    spec = get_spec(name)
    shape = spec.input_shape
    if shape == (3, 224, 224):
        shape = (3, imagenet_size, imagenet_size)
    return spec.build().eval(), shape


def prune(model: torch.nn.Module, x: torch.Tensor, ratio: float, multiple: int) -> torch.nn.Module:
    PruningPlan.uniform(model, x, "filter", ratio, multiple=multiple).project(model)
    return compact(model, x)


def measure(name: str, opset: int | None, args: argparse.Namespace) -> dict:
    model, shape = build(name, args.imagenet_size)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    result: dict = {"model": name, "opset": opset or "current", "input": list(shape)}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        files = {k: Path(tmp) / f"{k}.onnx" for k in ("torch_dense", "torch_pruned", "user", "onnx_pruned")}
        export_onnx(model, x, files["user"], opset=opset)
        try:
            loaded = load_onnx_model(files["user"])
        except StructADMMError as exc:
            return result | {"ok": False, "stage": "load", "reason": str(exc).replace(str(files["user"]), "user.onnx")}
        export_onnx(model, x, files["torch_dense"])
        export_onnx(prune(model, x, args.ratio, args.multiple), x, files["torch_pruned"])
        try:
            small = prune(loaded.module, x, args.ratio, args.multiple)
            parity = export_onnx(small, x, files["onnx_pruned"],
                                 signature=onnx_signature(load_onnx(files["user"]))).max_abs_diff
        except StructADMMError as exc:
            return result | {"ok": False, "stage": "prune", "reason": str(exc)}
        macs = {k: count_onnx(p).macs for k, p in files.items()}
        structure = {k: _structure(files[k]) for k in ("torch_pruned", "onnx_pruned")}
        ops = {k: v[0] for k, v in structure.items()}
        op_diff = {op: [ops["torch_pruned"].get(op, 0), ops["onnx_pruned"].get(op, 0)]
                   for op in sorted(set(ops["torch_pruned"]) | set(ops["onnx_pruned"]))
                   if ops["torch_pruned"].get(op, 0) != ops["onnx_pruned"].get(op, 0)}
        report = benchmark(files, batch_sizes=args.batches, threads=args.threads, min_seconds=args.seconds,
                           min_runs=args.runs)
        rows = []
        for batch in args.batches:
            torch_row = _row(report, "torch_dense", "torch_pruned", batch, macs)
            onnx_row = _row(report, "user", "onnx_pruned", batch, macs)
            rows.append({"batch": batch, "torch_speedup": torch_row["speedup"], "onnx_speedup": onnx_row["speedup"],
                         "ratio": onnx_row["speedup"] / torch_row["speedup"],
                         "user_ms": onnx_row["dense_ms"], "torch_dense_ms": torch_row["dense_ms"]})
    return result | {
        "ok": True, "parity": parity, "torch_mac_ratio": macs["torch_dense"] / macs["torch_pruned"],
        "onnx_mac_ratio": macs["user"] / macs["onnx_pruned"], "latency": rows,
        "same_weight_shapes": structure["torch_pruned"][1] == structure["onnx_pruned"][1],
        "op_count_diff": op_diff,
        "seconds": time.perf_counter() - start,
    }


def _structure(path: Path) -> tuple[dict[str, int], list[tuple[int, ...]]]:
    """Op counts and the sorted shapes of the weight matrices and kernels (rank >= 2) of a file."""
    from collections import Counter

    proto = load_onnx(path)
    ops = dict(Counter(node.op_type for node in proto.graph.node))
    return ops, sorted(tuple(t.dims) for t in proto.graph.initializer if len(t.dims) >= 2)


def _row(report, dense: str, pruned: str, batch: int, macs: dict) -> dict:
    rows = report.to_rows(dense=dense, pruned=pruned, mac_ratio=macs[dense] / macs[pruned])
    return next(r for r in rows if r["batch"] == batch)


def _table(results: list[dict], batches: list[int]) -> str:
    head = "| model | opset | input | MAC ratio torch / ONNX | same pruned layers | " + " | ".join(
        f"speedup b={b} torch / ONNX (ratio)" for b in batches) + " |"
    lines = [head, "|---" * (5 + len(batches)) + "|"]
    for r in results:
        shape = "x".join(map(str, r["input"]))
        if not r["ok"]:
            lines.append(f"| {r['model']} | {r['opset']} | {shape} | fails at {r['stage']}: {r['reason']} |"
                         + " |" * (len(batches) - 1))
            continue
        lat = {row["batch"]: row for row in r["latency"]}
        cells = " | ".join(f"{lat[b]['torch_speedup']:.2f}x / {lat[b]['onnx_speedup']:.2f}x ({lat[b]['ratio']:.3f})"
                           for b in batches)
        same = "yes" if r["same_weight_shapes"] else "no"
        if r["op_count_diff"]:
            same += " (ops: " + ", ".join(f"{op} {a}/{b}" for op, (a, b) in r["op_count_diff"].items()) + ")"
        lines.append(f"| {r['model']} | {r['opset']} | {shape} | {r['torch_mac_ratio']:.2f}x / "
                     f"{r['onnx_mac_ratio']:.2f}x | {same} | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=ZOO + TORCHVISION)
    parser.add_argument("--opsets", nargs="+", default=["13", "current"])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--multiple", type=int, default=16)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--imagenet-size", type=int, default=128)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    RESULTS.mkdir(exist_ok=True)
    results = []
    for name in args.models:
        for opset in args.opsets:
            try:
                results.append(measure(name, None if opset == "current" else int(opset), args))
            except Exception as exc:  # noqa: BLE001 - recorded as coverage, the run goes on
                traceback.print_exc()
                results.append({"model": name, "opset": opset, "input": [], "ok": False, "stage": "torch path",
                                "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"})
            print(json.dumps(results[-1]), flush=True)
            stem = f"onnx_input{args.tag}"
            (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
            (RESULTS / f"{stem}.md").write_text(_table(results, args.batches))


if __name__ == "__main__":
    main()

"""Where the INT8 step on a pruned model loses speed: ORT's per-kernel profile of all four variants.

    PYTHONPATH=. .venv/bin/python benchmarks/int8_layers.py                 # ResNet-18 at 224, batch 8
    PYTHONPATH=. .venv/bin/python benchmarks/int8_layers.py --model vgg16 --batch 1

The four files are made as ``benchmarks/int8.py`` makes them (random seeded weights, one-shot filter
pruning at ``--ratio`` with channels rounded to ``--multiple``, ONNX Runtime static QDQ INT8,
per-channel, random calibration). Each is profiled alone with ONNX Runtime's profiler (ORT CPU,
``--threads``, warm-up runs cut out) and every kernel's time is put on one of two sides:

* **matrix layers** (Conv, FusedConv, QLinearConv, Gemm, QGemm, MatMul...): per layer, by the
  module path in the node name, which surgery and quantization both keep;
* **glue**: everything else (QuantizeLinear, QLinearAdd, Transpose, pooling...), per op type.

The per-layer table gives, for each layer, the INT8 gain (FP32 time / INT8 time) in the dense and the
pruned model; a layer whose pruned INT8 gain falls short of its dense one is where the chain loses.
Writes benchmarks/results/int8_layers_<model>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from structadmm.bench.profile import kernel_ops, kernel_owner, kernel_times, profile_events
from structadmm.exporters import count_onnx, export_onnx, load_onnx, quantize_onnx
from structadmm.models import get_spec
from structadmm.prune import PruningPlan, compact

RESULTS = Path(__file__).parent / "results"
VARIANTS = ("dense FP32", "dense INT8", "pruned FP32", "pruned INT8")
MATRIX_KERNELS = {"Conv", "FusedConv", "QLinearConv", "ConvInteger", "Gemm", "FusedGemm", "QGemm", "MatMul", "FusedMatMul",
                  "MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}


def kernel_profile(path: Path, batch: int, threads: int, runs: int, warmup: int = 5) -> list[tuple[str, str, float]]:
    """(owning node, kernel op type, mean ms per run) of every kernel ORT ran, warm-up runs left out; a
    fused kernel counts for the matrix node at the head of what it fused."""
    events = profile_events(path, batch=batch, threads=threads, runs=runs, warmup=warmup)
    owner, ops = kernel_owner(load_onnx(path)), kernel_ops(events)
    return [(owner(kernel), ops[kernel], ms) for kernel, ms in kernel_times(events, warmup=warmup).items()]


def layer_of(node: str) -> str:
    """The module path of a node name (``/layer1/layer1.0/conv1/Conv`` -> ``/layer1/layer1.0/conv1``)."""
    match = re.match(r"(/.*)/[^/]+$", node)
    return match.group(1) if match else node


def split(profile: list[tuple[str, str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    layers: dict[str, float] = defaultdict(float)
    glue: dict[str, float] = defaultdict(float)
    for name, op, ms in profile:
        if op in MATRIX_KERNELS:
            layers[layer_of(name)] += ms
        else:
            glue[op] += ms
    return dict(layers), dict(glue)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--multiple", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()

    spec = get_spec(args.model)
    torch.manual_seed(0)
    model = spec.build().eval()
    x = spec.example_input(2)
    calibration = torch.randn(8, *x.shape[1:], generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        files = dict(zip(VARIANTS, (Path(tmp) / f"{i}.onnx" for i in range(4))))
        export_onnx(model, x, files["dense FP32"])
        PruningPlan.uniform(model, x, "filter", args.ratio, multiple=args.multiple).project(model)
        export_onnx(compact(model, x), x, files["pruned FP32"])
        for kind in ("dense", "pruned"):
            quantize_onnx(files[f"{kind} FP32"], files[f"{kind} INT8"], calibration, mode="static", batches=2,
                          batch_size=4)
        mac_ratio = count_onnx(files["dense FP32"]).macs / count_onnx(files["pruned FP32"]).macs
        profiles = {v: split(kernel_profile(files[v], args.batch, args.threads, args.runs)) for v in VARIANTS}

    layers = [name for name in profiles["dense FP32"][0]]
    rows = [{"layer": name, **{v: profiles[v][0].get(name) for v in VARIANTS}} for name in layers]
    glue_ops = sorted({op for v in VARIANTS for op in profiles[v][1]},
                      key=lambda op: -max(profiles[v][1].get(op, 0.0) for v in VARIANTS))
    totals = {v: sum(profiles[v][0].values()) + sum(profiles[v][1].values()) for v in VARIANTS}
    out = {"command": "benchmarks/int8_layers.py " + " ".join(sys.argv[1:]), "model": args.model, "ratio": args.ratio,
           "multiple": args.multiple, "batch": args.batch, "threads": args.threads, "mac_ratio": mac_ratio,
           "layers": rows, "glue": {v: profiles[v][1] for v in VARIANTS}, "totals_ms": totals}
    RESULTS.mkdir(exist_ok=True)
    stem = f"int8_layers_{args.model}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(out, indent=1) + "\n")

    def gain(fp32: float | None, int8: float | None) -> str:
        return f"{fp32 / int8:.2f}" if fp32 and int8 else "-"

    lines = [f"# Where the INT8 step loses speed: {args.model}, filter {args.ratio}, batch {args.batch}", "",
             f"Command: `PYTHONPATH=. .venv/bin/python {out['command']}`. ORT CPU, {args.threads} threads, "
             f"profiler kernel times (ms per run, mean of {args.runs} runs; each file profiled alone, one after another "
             f"in one process); MAC ratio {mac_ratio:.2f}x.", "",
             "| layer | dense FP32 | dense INT8 | pruned FP32 | pruned INT8 | INT8 gain dense | INT8 gain pruned |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = " | ".join(f"{r[v]:.2f}" if r[v] is not None else "-" for v in VARIANTS)
        lines.append(f"| `{r['layer']}` | {cells} | {gain(r['dense FP32'], r['dense INT8'])} | "
                     f"{gain(r['pruned FP32'], r['pruned INT8'])} |")
    for op in glue_ops:
        cells = " | ".join(f"{profiles[v][1][op]:.2f}" if op in profiles[v][1] else "-" for v in VARIANTS)
        lines.append(f"| glue: {op} | {cells} | | |")
    lines.append("| **total** | " + " | ".join(f"**{totals[v]:.2f}**" for v in VARIANTS) +
                 f" | {gain(totals['dense FP32'], totals['dense INT8'])} | "
                 f"{gain(totals['pruned FP32'], totals['pruned INT8'])} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

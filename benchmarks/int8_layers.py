"""Where the INT8 step on a pruned model loses speed: ORT's per-kernel profile of all four variants.

    PYTHONPATH=. .venv/bin/python benchmarks/int8_layers.py                 # ResNet-18 at 224, batch 8
    PYTHONPATH=. .venv/bin/python benchmarks/int8_layers.py --model vgg16 --batch 1

The four files are made as ``benchmarks/int8.py`` makes them (random seeded weights, one-shot filter
pruning at ``--ratio`` with channels rounded to ``--multiple``, ONNX Runtime static QDQ INT8,
per-channel, random calibration). Each is profiled alone with ONNX Runtime's profiler, in a fresh
process of its own (ORT CPU, ``--threads``, warm-up runs cut out), ``--rounds`` times with the four
files alternating, and every kernel's time is put on one of two sides:

* **matrix layers** (Conv, FusedConv, QLinearConv, Gemm, QGemm, MatMul...): per layer, by the
  module path in the node name, which surgery and quantization both keep;
* **glue**: everything else (QuantizeLinear, QLinearAdd, Transpose, pooling...), per op type.

The per-layer table gives, for each layer, the median time over the rounds and the INT8 gain (FP32
time / INT8 time, the median of the per-round gains with its interval) in the dense and the pruned
model; a layer whose pruned INT8 gain falls short of its dense one is where the chain loses.
Writes benchmarks/results/int8_layers_<model>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from structadmm.bench.latency import median_interval, round_order
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
    fused kernel counts for the matrix node at the head of what it fused. Profiled in a fresh process."""
    events = profile_events(path, batch=batch, threads=threads, runs=runs, warmup=warmup, alone=True)
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
    parser.add_argument("--rounds", type=int, default=6, help="profiles per file, each in its own process (6: 96.9 %%)")
    args = parser.parse_args()

    spec = get_spec(args.model)
    torch.manual_seed(0)
    model = spec.build().eval()
    x = spec.example_input(2)
    calibration = torch.randn(8, *x.shape[1:], generator=torch.Generator().manual_seed(1))
    rounds: dict[str, list[tuple[dict[str, float], dict[str, float]]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        files = dict(zip(VARIANTS, (Path(tmp) / f"{i}.onnx" for i in range(4))))
        export_onnx(model, x, files["dense FP32"])
        PruningPlan.uniform(model, x, "filter", args.ratio, multiple=args.multiple).project(model)
        export_onnx(compact(model, x), x, files["pruned FP32"])
        for kind in ("dense", "pruned"):
            quantize_onnx(files[f"{kind} FP32"], files[f"{kind} INT8"], calibration, mode="static", batches=2,
                          batch_size=4)
        mac_ratio = count_onnx(files["dense FP32"]).macs / count_onnx(files["pruned FP32"]).macs
        for index in range(args.rounds):  # every file profiled alone, in its own process; the files alternate
            for v in round_order(VARIANTS, index):
                rounds[v].append(split(kernel_profile(files[v], args.batch, args.threads, args.runs)))

    layers = list(rounds["dense FP32"][0][0])
    per_round = {v: [{**layer_ms, **{f"glue: {op}": ms for op, ms in glue.items()},
                      "total": sum(layer_ms.values()) + sum(glue.values())} for layer_ms, glue in rounds[v]]
                 for v in VARIANTS}
    glue_ops = sorted({op for v in VARIANTS for _, glue in rounds[v] for op in glue},
                      key=lambda op: -max(_median(per_round[v], f"glue: {op}") or 0.0 for v in VARIANTS))
    keys = [*layers, *(f"glue: {op}" for op in glue_ops), "total"]
    rows = [{"layer": key, **{v: _median(per_round[v], key) for v in VARIANTS},
             "gain dense": _gain(per_round["dense FP32"], per_round["dense INT8"], key),
             "gain pruned": _gain(per_round["pruned FP32"], per_round["pruned INT8"], key)} for key in keys]
    coverage = median_interval(range(args.rounds)).coverage
    out = {"command": "benchmarks/int8_layers.py " + " ".join(sys.argv[1:]), "model": args.model, "ratio": args.ratio,
           "multiple": args.multiple, "batch": args.batch, "threads": args.threads, "mac_ratio": mac_ratio,
           "rounds": args.rounds, "coverage": coverage, "rows": rows, "per_round": per_round,
           "loadavg": os.getloadavg()}
    RESULTS.mkdir(exist_ok=True)
    stem = f"int8_layers_{args.model}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(out, indent=1) + "\n")

    lines = [f"# Where the INT8 step loses speed: {args.model}, filter {args.ratio}, batch {args.batch}", "",
             f"Command: `PYTHONPATH=. .venv/bin/python {out['command']}`. ORT CPU, {args.threads} threads, "
             f"profiler kernel times in ms per run (each profile the mean of {args.runs} runs after 5 warm-up runs); "
             f"every file profiled alone in its own process, {args.rounds} rounds with the four files alternating. "
             f"Times are medians over the rounds; an INT8 gain (FP32 time / INT8 time, dense or pruned) is the "
             f"median of its per-round gains with its interval ({100 * coverage:.1f} % coverage). "
             f"MAC ratio {mac_ratio:.2f}x; load average at the end "
             f"{'/'.join(f'{v:.1f}' for v in out['loadavg'])}. A profile is a breakdown of where time goes, "
             "not a speedup: kernel times leave out what ORT does between kernels.", "",
             "| layer | dense FP32 | dense INT8 | pruned FP32 | pruned INT8 | INT8 gain dense | INT8 gain pruned |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = f"**{r['layer']}**" if r["layer"] == "total" else (
            r["layer"] if r["layer"].startswith("glue: ") else f"`{r['layer']}`")
        cells = " | ".join(f"{r[v]:.2f}" if r[v] is not None else "-" for v in VARIANTS)
        lines.append(f"| {name} | {cells} | {_gain_cell(r['gain dense'])} | {_gain_cell(r['gain pruned'])} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _median(rounds: list[dict[str, float]], key: str) -> float | None:
    values = [r[key] for r in rounds if key in r]
    return statistics.median(values) if values else None


def _gain(fp32: list[dict[str, float]], int8: list[dict[str, float]], key: str) -> list[float] | None:
    """Median per-round FP32 / INT8 time of ``key`` and its interval: [median, low, high]; None where a
    round lacks it (a glue op one of the two files does not run)."""
    if not all(key in a and key in b and b[key] > 0 for a, b in zip(fp32, int8)):
        return None
    gains = [a[key] / b[key] for a, b in zip(fp32, int8)]
    interval = median_interval(gains)
    return [statistics.median(gains), interval.low, interval.high]


def _gain_cell(gain: list[float] | None) -> str:
    return "-" if gain is None else f"{gain[0]:.2f} ({gain[1]:.2f}–{gain[2]:.2f})"


if __name__ == "__main__":
    main()

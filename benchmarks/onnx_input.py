"""ONNX in, ONNX out: a model given as an ONNX file against the same model given as torch.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/onnx_input.py          # zoo + torchvision set, opsets 13 and current
    .venv/bin/python benchmarks/onnx_input.py --models resnet20 tv:mobilenet_v3_small --opsets 13 --no-latency

For each model (zoo names; ``tv:<name>`` for a torchvision classification model, random
weights, seeded) and opset, both paths prune with the plan ``structadmm run`` builds by default
(``CompressConfig()``: filter sparsity, ratio 0.75, kept channels rounded to multiples of 16,
first layer and classifier whole), projected in one shot instead of trained with ADMM: the
pruned structure, hence MACs and latency, depends only on the plan and the weights, which are
the same on both paths.

* torch path: the torch model is exported (``torch_dense.onnx``, as the pipeline writes
  dense.onnx for a torch model), pruned, compacted and exported (``torch_pruned.onnx``);
* ONNX path: the model is first exported at that opset to ``user.onnx``, which stands for the
  user's file; ``sa.load_onnx_model`` converts it (onnx2torch, checked against ONNX Runtime on
  the file), the same plan prunes it, and the compacted module is exported with the file's
  signature (``onnx_pruned.onnx``), as ``structadmm run --model user.onnx`` does. Its dense
  baseline is ``user.onnx`` itself.

Deterministic comparison: the MAC ratios of the two paths, and the pruned layers: the
(op, weight shape) of every Conv/Gemm/MatMul of the two pruned files in graph order must be
equal ("same layers"), so both paths kept the same widths in every layer.

Latency: the four files are timed together with the isolated harness (every model alone in a
fresh process, processes interleaved round by round, ``--processes`` rounds, medians over all
runs), ``--repeats`` times. Per repeat, ``ratio`` is the ONNX path's speedup (user /
onnx_pruned) over the torch path's (torch_dense / torch_pruned); the goal is 0.95..1.05. The
table gives the medians over the repeats and, round by round (the four files timed once each per
round), the median ratio with its distribution-free interval and coverage (96.9 % for the default
single repeat of 6 rounds). "same-file noise" is
torch_pruned's median over onnx_pruned's and torch_dense's over user's: where the files are the
same layers, the same ops run, so their distance from 1 is the measurement's own noise.

A model that fails on either path is recorded with its one-line reason (coverage). ImageNet
models run at ``--imagenet-size`` (default 128); ``name@224`` runs one at 224. Models over
``--latency-max-gmacs`` (VGG-16 at 224) get the deterministic comparison only.
Writes benchmarks/results/onnx_input.json and .md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from structadmm.bench import benchmark
from structadmm.bench.latency import median_interval
from structadmm.errors import StructADMMError
from structadmm.exporters import count_onnx, export_onnx, load_onnx, onnx_signature
from structadmm.models import get_spec
from structadmm.models.onnx_input import load_onnx_model
from structadmm.pipeline import CompressConfig
from structadmm.prune import PruningPlan, compact

RESULTS = Path(__file__).parent / "results"
# AlexNet and VGG-16 at 224 px: at 128 their adaptive pool upsamples (3x3 -> 6x6, 4x4 -> 7x7), which
# only the dynamo exporter writes (Transpose + GatherND), which the channel tracer does not follow
# (--models alexnet vgg16 --no-latency --tag _128 records it).
# torchvision's alexnet is the zoo's layout; its vgg16 is the zoo's without BN, the same ONNX
# graph once BN is folded: both are left to the slow test (tests/test_onnx_input.py) to keep the run short.
ZOO = ["lenet5", "mnist1d-cnn", "alexnet-cifar", "resnet20", "resnet56", "c3d-small", "mobilenetv2", "resnet18",
       "resnet50", "alexnet@224", "vgg16@224"]
TORCHVISION = ["tv:resnet18", "tv:mobilenet_v2", "tv:mobilenet_v3_small", "tv:squeezenet1_1",
               "tv:shufflenet_v2_x0_5", "tv:efficientnet_b0", "tv:regnet_x_400mf", "tv:densenet121"]
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def build(name: str, imagenet_size: int) -> tuple[torch.nn.Module, tuple[int, ...]]:
    name, _, size = name.partition("@")
    size = int(size) if size else imagenet_size
    torch.manual_seed(0)
    if name.startswith("tv:"):
        import torchvision

        return torchvision.models.get_model(name[3:], weights=None).eval(), (3, size, size)
    spec = get_spec(name)
    shape = spec.input_shape
    if shape == (3, 224, 224):
        shape = (3, size, size)
    return spec.build().eval(), shape


def prune(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.nn.Module, list[str]]:
    """The default plan of ``structadmm run``, projected in one shot, then compacted; and why the
    plan left layers whole."""
    cfg = CompressConfig()
    plan = PruningPlan.uniform(model, x, cfg.sparsity, cfg.ratio, multiple=cfg.channel_multiple,
                               keep_ends=not cfg.prune_ends)
    plan.project(model)
    return compact(model, x), [f"{layer}: {why}" for layer, why in plan.skipped]


def layers(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    """(conv or linear, weight shape as [out, in, *kernel]) of every Conv/Gemm/MatMul with a
    constant weight, in graph order: a Linear written as Gemm or as MatMul compares equal."""
    proto = load_onnx(path)
    weights = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    found = []
    for n in proto.graph.node:
        if n.op_type in LAYER_OPS and len(n.input) > 1 and n.input[1] in weights:
            shape = weights[n.input[1]]
            trans_b = next((a.i for a in n.attribute if a.name == "transB"), 0)
            if n.op_type == "MatMul" or (n.op_type == "Gemm" and not trans_b):
                shape = shape[::-1]  # stored [in, out]
            found.append(("conv" if n.op_type == "Conv" else "linear", shape))
    return found


def measure(name: str, opset: int | None, args: argparse.Namespace) -> dict:
    model, shape = build(name, args.imagenet_size)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    result: dict = {"model": name, "opset": opset or "current", "input": list(shape)}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        files = {k: Path(tmp) / f"{k}.onnx" for k in ("torch_dense", "torch_pruned", "user", "onnx_pruned")}
        result["file_opset"] = export_onnx(model, x, files["user"], opset=opset).opset
        export_onnx(model, x, files["torch_dense"])
        small, torch_skipped = prune(model, x)
        export_onnx(small, x, files["torch_pruned"])
        try:
            loaded = load_onnx_model(files["user"])
        except StructADMMError as exc:
            return result | {"ok": False, "stage": "load", "reason": str(exc).replace(str(files["user"]), "user.onnx")}
        try:
            small, onnx_skipped = prune(loaded.module, x)
            parity = export_onnx(small, x, files["onnx_pruned"],
                                 signature=onnx_signature(load_onnx(files["user"]))).max_abs_diff
        except StructADMMError as exc:
            return result | {"ok": False, "stage": "prune", "reason": str(exc)}
        macs = {k: count_onnx(p).macs for k, p in files.items()}
        structure = {k: layers(p) for k, p in files.items()}
        ops = {k: Counter(n.op_type for n in load_onnx(files[k]).graph.node) for k in ("torch_pruned", "onnx_pruned")}
        op_diff = {op: [ops["torch_pruned"][op], ops["onnx_pruned"][op]]
                   for op in sorted(set(ops["torch_pruned"]) | set(ops["onnx_pruned"]))
                   if ops["torch_pruned"][op] != ops["onnx_pruned"][op]}
        pruned = {path: sum(a != b for a, b in zip(structure[dense], structure[path]))
                  for dense, path in (("torch_dense", "torch_pruned"), ("user", "onnx_pruned"))}
        result |= {
            "ok": True, "parity": parity,
            "torch_mac_ratio": macs["torch_dense"] / macs["torch_pruned"],
            "onnx_mac_ratio": macs["user"] / macs["onnx_pruned"],
            "same_layers": structure["torch_pruned"] == structure["onnx_pruned"],
            "layers": len(structure["torch_pruned"]),
            "pruned_layers": [pruned["torch_pruned"], pruned["onnx_pruned"]],
            "op_count_diff": op_diff,
        }
        if not result["same_layers"]:  # why the ONNX path kept more: its skips the torch path does not have
            reasons = {why.split(": ", 1)[1] for why in torch_skipped}
            result["why"] = [why for why in onnx_skipped if why.split(": ", 1)[1] not in reasons]
        if args.latency and macs["user"] > args.latency_max_gmacs * 1e9:
            result["not_timed"] = f"{macs['user'] / 1e9:.1f} GMACs, over --latency-max-gmacs"
        elif args.latency:
            repeats = [benchmark(files, batch_sizes=args.batches, threads=args.threads, min_seconds=args.seconds,
                                 min_runs=args.runs, warmup=args.warmup, processes=args.processes, isolate=True)
                       for _ in range(args.repeats)]
            result["latency"] = [_latency(repeats, batch) for batch in args.batches]
    return result | {"seconds": time.perf_counter() - start}


def _latency(reports: list, batch: int) -> dict:
    """Per repeat: each file's median and the two speedups; then the median over the repeats of
    every figure, and the range of the ratio over the repeats."""
    runs = []
    for report in reports:
        ms = {e.name: e.median_ms for e in report.entries if e.batch == batch}
        torch_speedup, onnx_speedup = ms["torch_dense"] / ms["torch_pruned"], ms["user"] / ms["onnx_pruned"]
        runs.append({"ms": ms, "torch_speedup": torch_speedup, "onnx_speedup": onnx_speedup,
                     "ratio": onnx_speedup / torch_speedup, "noise": ms["torch_pruned"] / ms["onnx_pruned"],
                     "dense_noise": ms["torch_dense"] / ms["user"]})
    ratios = [r["ratio"] for r in runs]
    per_round = [ratio for report in reports for ratio in _round_ratios(report, batch)]
    interval = median_interval(per_round)
    return {"batch": batch, "repeats": runs, "ratio_range": [min(ratios), max(ratios)],
            "round_ratios": per_round, "ratio_per_round": float(np.median(per_round)),
            "ratio_interval": [interval.low, interval.high], "ratio_coverage": interval.coverage,
            **{k: float(np.median([r[k] for r in runs]))
               for k in ("torch_speedup", "onnx_speedup", "ratio", "noise", "dense_noise")}}


def _round_ratios(report, batch: int) -> list[float]:
    """Round by round (the four files each timed once per round, in their own processes): the ONNX
    path's speedup over the torch path's."""
    ms = {e.name: np.asarray(e.round_ms) for e in report.entries if e.batch == batch}
    return list(map(float, (ms["user"] / ms["onnx_pruned"]) / (ms["torch_dense"] / ms["torch_pruned"])))


def _settings(args: argparse.Namespace) -> str:
    return (f"`benchmarks/onnx_input.py` with OMP_NUM_THREADS=1: ORT CPU, {args.threads} thread(s), isolated harness, "
            f"{args.repeats} repeat(s) x {args.processes} rounds of processes per file (each file alone in its own "
            f"process, the four alternating), batch {', '.join(map(str, args.batches))}; "
            f"ImageNet models at {args.imagenet_size} px unless named @224; plan of `structadmm run` "
            "(ratio 0.75, multiples of 16, ends whole). Shared 2-core machine.")


def _table(results: list[dict], batches: list[int], settings: str = "") -> str:
    head = ("| model | opset (file) | input | MAC ratio torch / ONNX | same layers (pruned of) | "
            + " | ".join(f"speedup b={b} torch / ONNX | ratio ONNX / torch: of medians; per round (interval, "
                         f"coverage) | same-file noise pruned / dense"
                         for b in batches) + " |")
    lines = [head, "|---" * (5 + 3 * len(batches)) + "|"]
    for r in results:
        shape = "x".join(map(str, r["input"]))
        opset = f"{r['opset']} ({r.get('file_opset', '?')})"
        if not r["ok"]:
            lines.append(f"| {r['model']} | {opset} | {shape} | fails at {r['stage']}: {r['reason']} |"
                         + " |" * (3 * len(batches)))
            continue
        lat = {row["batch"]: row for row in r.get("latency", [])}
        cells = " | ".join(
            f"{lat[b]['torch_speedup']:.2f}x / {lat[b]['onnx_speedup']:.2f}x | {_ratio_cell(lat[b])} | "
            f"{lat[b]['noise']:.3f} / {lat[b]['dense_noise']:.3f}"
            if b in lat else f"not timed ({r.get('not_timed', '--no-latency')}) | |"
            for b in batches)
        same = "yes" if r["same_layers"] else "no"
        same += f" ({r['pruned_layers'][0]}/{r['pruned_layers'][1]} of {r['layers']})"
        if r["op_count_diff"]:
            same += "; ops " + ", ".join(f"{op} {a}/{b}" for op, (a, b) in r["op_count_diff"].items())
        if r.get("why"):
            same += f"; ONNX path keeps whole {r['why'][0]}"
        lines.append(f"| {r['model']} | {opset} | {shape} | {r['torch_mac_ratio']:.3f}x / "
                     f"{r['onnx_mac_ratio']:.3f}x | {same} | {cells} |")
    return "\n".join(([settings, ""] if settings else []) + _summary(results, batches) + ["", *lines]) + "\n"


def _ratio_cell(row: dict) -> str:
    """The ratio of the medians; then the per-round median with its interval and coverage (files
    written before it was recorded: the range over the repeats, with no coverage)."""
    if "ratio_per_round" not in row:
        return f"{row['ratio']:.3f}; range over repeats {row['ratio_range'][0]:.2f}..{row['ratio_range'][1]:.2f}"
    low, high = row["ratio_interval"]
    return (f"{row['ratio']:.3f}; {row['ratio_per_round']:.3f} ({low:.2f}–{high:.2f}, "
            f"{100 * row['ratio_coverage']:.1f} %)")


def _summary(results: list[dict], batches: list[int]) -> list[str]:
    ok = [r for r in results if r["ok"]]
    exact = [r for r in ok if r["same_layers"] and abs(r["onnx_mac_ratio"] / r["torch_mac_ratio"] - 1) < 1e-9]
    lines = [f"{len(results)} model/opset pairs; {len(ok)} load, prune, compact and export with parity; {len(exact)} "
             "prune to the same layers and MAC ratio as the torch model given directly."]
    for batch in batches:
        rows = [row for r in ok for row in r.get("latency", []) if row["batch"] == batch]
        if not rows:
            continue
        ratios = np.array([row["ratio"] for row in rows])
        noise = np.array([max(abs(row["noise"] - 1), abs(row["dense_noise"] - 1)) for row in rows])
        lines.append(
            f"Batch {batch}, {len(rows)} timed: speedup ratio ONNX / torch median {np.median(ratios):.3f}, "
            f"{int(np.sum(abs(ratios - 1) <= 0.05))} of {len(rows)} within 5 % (range {ratios.min():.2f}.."
            f"{ratios.max():.2f}); the same-file noise (largest of pruned and dense, |x - 1|) has median "
            f"{np.median(noise):.3f} and is over 5 % for {int(np.sum(noise > 0.05))}."
            + _interval_summary([row for row in rows if "ratio_interval" in row]))
    return lines


def _interval_summary(rows: list[dict]) -> str:
    """How many per-round intervals of the ratio hold 1 (same speedup either path) and lie within 0.95..1.05."""
    if not rows:
        return ""
    holds = sum(low <= 1 <= high for low, high in (row["ratio_interval"] for row in rows))
    inside = sum(0.95 <= low and high <= 1.05 for low, high in (row["ratio_interval"] for row in rows))
    coverage = sorted({f"{100 * row['ratio_coverage']:.1f} %" for row in rows})
    return (f" Per round: the ratio's interval ({', '.join(coverage)} coverage) holds 1 for {holds} of {len(rows)} "
            f"and lies within 0.95..1.05 for {inside}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=ZOO + TORCHVISION)
    parser.add_argument("--opsets", nargs="+", default=["13", "current"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="isolated benchmark runs per model; medians over them")
    parser.add_argument("--processes", type=int, default=6,
                        help="rounds of isolated processes per model and repeat (6: per-round intervals of 96.9 %%)")
    parser.add_argument("--seconds", type=float, default=0.4, help="timed seconds per model and repeat")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per model and repeat, at least")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-latency", dest="latency", action="store_false")
    parser.add_argument("--latency-max-gmacs", type=float, default=5.0, help="time only models with fewer MACs")
    parser.add_argument("--imagenet-size", type=int, default=128)
    parser.add_argument("--tag", default="")
    parser.add_argument("--render", type=Path, help="only write the .md of these results (a .json this wrote)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    RESULTS.mkdir(exist_ok=True)
    if args.render:
        (RESULTS / f"onnx_input{args.tag}.md").write_text(
            _table(json.loads(args.render.read_text()), args.batches, _settings(args)))
        return
    results = []
    started = time.perf_counter()
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
            (RESULTS / f"{stem}.md").write_text(_table(results, args.batches, _settings(args)))
    print(f"total {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()

"""MobileNetV2 at filter 0.5: what raises its measured speedup, judged against MACs and against bytes.

    PYTHONPATH=. .venv/bin/python benchmarks/mobilenetv2.py                      # 224, batch 1 and 8, 6 rounds
    PYTHONPATH=. .venv/bin/python benchmarks/mobilenetv2.py --size 64 --processes 2 --seconds 0.3 --tag _smoke

torchvision's ``mobilenet_v2`` with random seeded weights (speed does not depend on their values and
no pretrained weights can be downloaded here), filter pruning at ``--ratio`` by one-shot magnitude
projection (ADMM would keep other channels, the same counts), compacted, exported and checked against
the masked model. Variants, each its own ONNX file:

* ``plain``: every prunable group at exact counts (``multiple = 1``);
* ``dw8`` / ``dw16``: the same, with the kept count of every group that a depthwise conv reads (the
  inverted residuals' hidden channels) rounded up to a multiple of 8 / 16 (the plan's ``multiple``
  per group, :func:`structadmm.prune.plan.channel_multiple`; never above the group's size), the
  other groups exact;
* ``all16``: every group rounded to 16 (the pipeline's default ``channel_multiple``);
* ``expansion``: only the groups a depthwise conv reads are pruned (the expansion channels); the
  block outputs and the stem stay whole;
* ``outside``: everything but those groups.

Which groups hold a depthwise conv is read from the traced channel graph (no per-model table).

Timing (``--no-time`` skips it): the project's isolated mode: each model alone in its own process,
dense and the variants alternating over ``--processes`` rounds, ORT CPU, ``--threads`` threads,
graph optimisation ALL; then dense, ``plain`` and ``dw16`` again at BASIC. Per variant and batch:
the median of the per-round speedups with its distribution-free interval and the coverage that
interval actually reaches (95 % needs 6 or more rounds), the ratio of medians, MAC efficiency
(speedup / MAC ratio) and roofline efficiency (speedup / min(MAC ratio, byte ratio); bytes moved
counted from the ONNX graph, :meth:`structadmm.exporters.OnnxCost.bytes_at`). The load average is
recorded before and after each timing: on a shared machine the figures are noise.

Fusions: every file is opened at BASIC and at ALL with ``SessionOptions.optimized_model_filepath``
and the node types of the optimized graph are counted (NCHWc convolutions, reorders, fused convs).

Writes benchmarks/results/mobilenetv2{tag}.{json,md}.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
import torchvision

from structadmm.bench import benchmark
from structadmm.cpu import cpu_name
from structadmm.exporters import count_onnx, export_onnx
from structadmm.layers import is_depthwise
from structadmm.prune import PruningPlan, compact
from structadmm.prune.plan import ChannelUnit, channel_multiple

RESULTS = Path(__file__).parent / "results"
VARIANTS = ("plain", "dw8", "dw16", "all16", "expansion", "outside")
BASIC_TIMED = ("dense", "plain", "dw16")
LEVELS = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def depthwise_groups(plan: PruningPlan, model: torch.nn.Module) -> set[int]:
    """Ids of the channel groups a depthwise conv reads (in MobileNetV2: the expansion channels)."""
    # a depthwise conv passes its channels through (one filter per channel): its group is the one it reads
    return {g.id for name, m in model.named_modules() if is_depthwise(m)
            for g in plan.graph.groups_of(name, "through")}


def make_plan(variant: str, model: torch.nn.Module, x: torch.Tensor, ratio: float) -> PruningPlan:
    """The variant's plan: a uniform filter plan, its per-group multiples or its units then chosen by
    whether a depthwise conv reads the group."""
    plan = PruningPlan.uniform(model, x, "filter", ratio, multiple=16 if variant == "all16" else 1)
    dw = depthwise_groups(plan, model)
    units = [u for u in plan.units if isinstance(u, ChannelUnit)]
    if variant in ("dw8", "dw16"):
        for unit in units:
            if unit.group.id in dw:
                unit.multiple = channel_multiple(plan.graph, unit.group, int(variant[2:]))
    elif variant in ("expansion", "outside"):
        keep = [u for u in plan.units if (isinstance(u, ChannelUnit) and u.group.id in dw) == (variant == "expansion")]
        plan = PruningPlan(plan.graph, keep, plan.skipped, plan.left_whole)
    return plan


def node_types(path: Path, level: str, threads: int, folder: Path) -> dict[str, int]:
    """Node types (``domain:op`` outside the default domain) of ``path`` as ORT optimises it at ``level``."""
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # the NCHWc file is for this machine only: that is the point here
    out = folder / f"{path.stem}.{level}.onnx"
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(out), load_external_data=False).graph
    counts = collections.Counter(f"{n.domain}:{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
                                 for n in graph.node)
    return dict(sorted(counts.items()))


def build(args: argparse.Namespace, folder: Path) -> dict:
    """Every variant's file, its counts, kept channels and parity against its masked model."""
    torch.manual_seed(0)
    dense = torchvision.models.mobilenet_v2(weights=None).eval()
    x = torch.randn(2, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    files = {"dense": folder / "dense.onnx"}
    export_onnx(dense, x, files["dense"])
    info: dict[str, dict] = {"dense": {}}
    for variant in VARIANTS:
        model = copy.deepcopy(dense)
        plan = make_plan(variant, model, x, args.ratio)
        plan.project(model)
        small = compact(model, x)
        files[variant] = folder / f"{variant}.onnx"
        parity = export_onnx(small, x, files[variant]).max_abs_diff
        info[variant] = {"units": len(plan.units), "parity": parity,
                         "depthwise_channels": sum(m.out_channels for m in small.modules() if is_depthwise(m))}
    info["dense"]["depthwise_channels"] = sum(m.out_channels for m in dense.modules() if is_depthwise(m))
    costs = {name: count_onnx(path) for name, path in files.items()}
    for name, cost in costs.items():
        info[name].update(macs=cost.macs, bytes={b: cost.bytes_at(b) for b in args.batches},
                          mac_ratio=costs["dense"].macs / cost.macs,
                          byte_ratio={b: costs["dense"].bytes_at(b) / cost.bytes_at(b) for b in args.batches})
        info[name]["nodes"] = {level: node_types(files[name], level, args.threads, folder) for level in LEVELS}
    return {"files": files, "info": info}


def timed(files: dict[str, Path], info: dict, args: argparse.Namespace, level: str) -> dict:
    """One isolated benchmark of ``files`` at ORT optimisation ``level``: rows per variant and batch."""
    load_before = os.getloadavg()
    start = time.perf_counter()
    report = benchmark(files, batch_sizes=args.batches, threads=args.threads, min_seconds=args.seconds,
                       min_runs=args.runs, isolate=True, processes=args.processes, optimization=level,
                       baseline="dense")
    rows = []
    for name in files:
        if name == "dense":
            continue
        for row in report.to_rows(dense="dense", pruned=name, mac_ratio=info[name]["mac_ratio"],
                                  byte_ratios=info[name]["byte_ratio"]):
            rows.append({"variant": name, **row})
    medians = {(e.name, e.batch): e.median_ms for e in report.entries}
    return {"level": level, "rows": rows, "median_ms": [{"model": n, "batch": b, "ms": ms} for (n, b), ms in medians.items()],
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "seconds": time.perf_counter() - start,
            "skipped": report.skipped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--processes", type=int, default=6, help="rounds of processes (95 %% intervals need 6)")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per model and batch, over all rounds")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per model and batch, over all rounds")
    parser.add_argument("--no-time", action="store_true", help="counts and fusions only")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    meta = {"command": "benchmarks/mobilenetv2.py " + " ".join(sys.argv[1:]), "cpu": cpu_name(),
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "onnxruntime": ort.__version__,
            "torch": torch.__version__, "loadavg_start": os.getloadavg(), **{k: v for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory() as tmp:
        built = build(args, Path(tmp))
        files, info = built["files"], built["info"]
        print(json.dumps({k: {"mac_ratio": v["mac_ratio"], "byte_ratio": v["byte_ratio"]} for k, v in info.items()}),
              flush=True)
        timings = []
        if not args.no_time:
            timings.append(timed(files, info, args, "all"))
            timings.append(timed({k: files[k] for k in BASIC_TIMED}, info, args, "basic"))
    meta["loadavg_end"] = os.getloadavg()
    meta["seconds"] = time.perf_counter() - started
    results = {"meta": meta, "variants": info, "timings": timings}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"mobilenetv2{args.tag}.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    text = render(results)
    (RESULTS / f"mobilenetv2{args.tag}.md").write_text(text)
    print(text)


# --- the result file ----------------------------------------------------------------------


def _coverage(row: dict) -> str:
    return f"{100 * row['ci_coverage']:.1f} %" if row.get("ci_coverage") is not None else "n/a"


def _load(values) -> str:
    return " / ".join(f"{v:.1f}" for v in values)


#: the node types shown in the fusion table (all are in the JSON)
SHOWN_OPS = ("Conv", "com.microsoft:FusedConv", "com.microsoft.nchwc:Conv", "com.microsoft.nchwc:ReorderInput",
             "com.microsoft.nchwc:ReorderOutput", "Clip", "Add", "com.microsoft.nchwc:GlobalAveragePool")


def render(results: dict) -> str:
    meta, info = results["meta"], results["variants"]
    batches = meta["batches"]
    lines = [f"# MobileNetV2 at filter {meta['ratio']}: variants, MAC and roofline efficiency "
             f"({meta['size']}×{meta['size']})", "",
             f"Command: `PYTHONPATH=. python {meta['command']}`. torchvision mobilenet_v2, random seeded weights, "
             f"one-shot magnitude projection; ORT {meta['onnxruntime']} CPU, {meta['threads']} threads, on "
             f"{meta['cpu'] or 'an unrecorded CPU'} ({meta['cpu_count']} cores). Load average (1 / 5 / 15 min) at "
             f"start {_load(meta['loadavg_start'])}, at end {_load(meta['loadavg_end'])}.", "",
             "## Counts", "",
             "| variant | MACs | MAC ratio | " + " | ".join(f"byte ratio b={b}" for b in batches)
             + " | depthwise channels | units | parity (max abs) |",
             "|---|---:|---:|" + "---:|" * len(batches) + "---:|---:|---:|"]
    for name, v in info.items():
        lines.append(f"| {name} | {v['macs'] / 1e6:.1f} M | {v['mac_ratio']:.2f}x | "
                     + " | ".join(f"{v['byte_ratio'][b]:.2f}x" for b in batches)
                     + f" | {v['depthwise_channels']} | {v.get('units', 'n/a')} | "
                     + (f"{v['parity']:.1e}" if "parity" in v else "n/a") + " |")
    for timing in results["timings"]:
        lines += ["", f"## Speed at ORT optimisation level {timing['level'].upper()}", "",
                  f"Timed isolated: each model alone in its own process, dense and the variants alternating, "
                  f"{meta['processes']} rounds of processes. Load average before {_load(timing['loadavg_before'])}, "
                  f"after {_load(timing['loadavg_after'])}.", "",
                  "| variant | batch | MAC ratio | byte ratio | speedup, median of rounds (interval, coverage) | "
                  "ratio of medians | MAC efficiency | roofline efficiency |",
                  "|---|---:|---:|---:|---|---:|---:|---:|"]
        for r in timing["rows"]:
            lines.append(f"| {r['variant']} | {r['batch']} | {info[r['variant']]['mac_ratio']:.2f}x | "
                         f"{r['byte_ratio']:.2f}x | {r['speedup_per_round']:.2f}x ({r['speedup_low']:.2f}–"
                         f"{r['speedup_high']:.2f}, {_coverage(r)}) | {r['speedup']:.2f}x | {r['efficiency']:.2f} | "
                         f"{r['roofline_efficiency']:.2f} |")
    if len(results["timings"]) == 2:
        medians = [{(m["model"], m["batch"]): m["ms"] for m in t["median_ms"]} for t in results["timings"]]
        lines += ["", "ALL against BASIC for the same file: BASIC median / ALL median, from the two timings above, "
                      "which ran one after the other (no interval):", "", "| file | " + " | ".join(f"b={b}" for b in batches)
                  + " |", "|---|" + "---:|" * len(batches)]
        for name in BASIC_TIMED:
            lines.append(f"| {name} | " + " | ".join(f"{medians[1][(name, b)] / medians[0][(name, b)]:.2f}x"
                                                       for b in batches) + " |")
    lines += ["", "## Fusions: node types after ORT's graph optimisation", "",
              "| variant | level | nodes | " + " | ".join(op.replace("com.microsoft.", "") for op in SHOWN_OPS) + " |",
              "|---|---|---:|" + "---:|" * len(SHOWN_OPS)]
    for name, v in info.items():
        for level, counts in v["nodes"].items():
            lines.append(f"| {name} | {level} | {sum(counts.values())} | "
                         + " | ".join(str(counts.get(op, 0)) for op in SHOWN_OPS) + " |")
    lines += ["", "MAC efficiency = speedup / MAC ratio; roofline efficiency = speedup / min(MAC ratio, byte ratio), "
                  "the byte ratio being dense / pruned bytes moved at that batch (weights once, activations per "
                  "sample, every node unfused), both with the ratio of medians. nchwc:Conv = ORT's blocked-layout "
                  "convolution (channels in blocks of 8 or 16); a Conv left in the default domain at ALL did not "
                  "get it."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

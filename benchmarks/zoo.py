"""The model zoo through the pipeline: prune, compact, export with parity, time on ORT CPU.

    .venv/bin/python benchmarks/zoo.py                                   # every model, filter and shape at 50 %
    .venv/bin/python benchmarks/zoo.py --models resnet18 vgg16 mobilenetv2 --sparsity filter --batches 1 8

Weights are random (seeded): latency and MACs do not depend on their values, and no
pretrained weights can be downloaded here. One-shot magnitude projection stands in for ADMM,
which would choose different channels but the same counts. Dense and pruned are timed isolated by
default: each model alone in its own process, the processes alternating, ``--processes`` rounds (6:
the speedup is the ratio of the medians, and the median per-round ratio is given with its interval and
the coverage that interval reaches). ``--in-process`` times them interleaved in one process instead, as
the tables written before isolation was the default were. MAC efficiency = speedup / MAC ratio; roofline efficiency = speedup /
min(MAC ratio, byte ratio), the byte ratio being dense / pruned bytes moved at that batch, counted from
the ONNX graph (:meth:`structadmm.exporters.OnnxCost.bytes_at`): a memory-bound model such as MobileNetV2
is judged against the bytes it still moves.

``--peer tp`` adds Torch-Pruning's MagnitudePruner (L1, same ratio in every layer, the output
layer ignored; a benchmark-only dependency, ``pip install -e ".[bench]"``) on a copy of the
same weights, exported, counted and timed in the same interleaved run as dense and ours.
Writes benchmarks/results/zoo_<sparsity>.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from peers import torch_pruning_magnitude

from structadmm.bench import benchmark
from structadmm.bench.report import speedup_interval
from structadmm.bench.latency import SPINNING
from structadmm.exporters import count_onnx, export_onnx
from structadmm.models import get_spec, model_names
from structadmm.prune import PruningPlan, compact

RESULTS = Path(__file__).parent / "results"


def measure(name: str, sparsity: str, ratio: float, multiple: int, batches: list[int], threads: int, seconds: float,
            runs: int, peer: str | None = None, spinning: str | None = None, isolate: bool = True,
            processes: int = 6) -> dict:
    spec = get_spec(name)
    torch.manual_seed(0)
    model = spec.build().eval()
    x = spec.example_input(2)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"dense": Path(tmp) / "dense.onnx", "pruned": Path(tmp) / "pruned.onnx"}
        export_onnx(model, x, paths["dense"])
        peer_model = copy.deepcopy(model) if peer else None
        PruningPlan.uniform(model, x, sparsity, ratio, multiple=multiple).project(model)
        small = compact(model, x)
        parity = export_onnx(small, x, paths["pruned"]).max_abs_diff
        if peer_model is not None:
            paths[peer] = Path(tmp) / f"{peer}.onnx"
            export_onnx(torch_pruning_magnitude(peer_model, x, ratio).eval(), x, paths[peer])
        costs = {key: count_onnx(path) for key, path in paths.items()}
        macs = {key: cost.macs for key, cost in costs.items()}
        loadavg = os.getloadavg()
        report = benchmark(paths, batch_sizes=batches, threads=threads, min_seconds=seconds, min_runs=runs,
                           spinning=spinning, isolate=isolate, processes=processes)
    result = {"model": name, "sparsity": sparsity, "ratio": ratio, "multiple": multiple, "spinning": spinning,
              "loadavg": loadavg, "timing": f"isolated, {processes} rounds" if isolate else "in-process, interleaved",
              "dense_macs": macs["dense"],
              "pruned_macs": macs["pruned"], "mac_ratio": macs["dense"] / macs["pruned"], "parity": parity,
              "seconds": time.perf_counter() - start, "latency": _latency(report, "pruned", costs, batches)}
    if peer_model is not None:
        result["peer"] = {"name": peer, "macs": macs[peer], "mac_ratio": macs["dense"] / macs[peer],
                          "latency": _latency(report, peer, costs, batches)}
    return result


def _latency(report, name: str, costs: dict, batches: list[int]) -> list[dict]:
    dense, pruned = costs["dense"], costs[name]
    rows = report.to_rows(dense="dense", pruned=name, mac_ratio=dense.macs / pruned.macs,
                          byte_ratios={b: dense.bytes_at(b) / pruned.bytes_at(b) for b in batches})
    return [{k: row.get(k) for k in ("batch", "dense_ms", "pruned_ms", "speedup", "efficiency", "byte_ratio",
                                     "roofline_efficiency", "speedup_per_round", "speedup_low", "speedup_high",
                                     "ci_coverage")} for row in rows]


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
    parser.add_argument("--peer", choices=("tp",), default=None,
                        help="also time Torch-Pruning's magnitude pruner at the same ratio, in the same run")
    parser.add_argument("--spinning", choices=SPINNING, default=None,
                        help="ORT pool threads (see structadmm.bench.latency; default: on isolated, run in-process)")
    parser.add_argument("--processes", type=int, default=6, help="rounds of isolated processes (95 %% intervals need 6)")
    parser.add_argument("--in-process", action="store_true",
                        help="time the models interleaved in this process instead of one model per process")
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure every model this many times in this process (the first can differ: see README)")
    parser.add_argument("--tag", default="", help="suffix for the result files")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    for sparsity in args.sparsity:
        results = []
        for name in args.models:
            for repeat in range(args.repeats):
                results.append(measure(name, sparsity, args.ratio, args.multiple, args.batches, args.threads, args.seconds,
                                       args.runs, args.peer, args.spinning, not args.in_process,
                                       args.processes) | {"repeat": repeat})
                print(json.dumps(results[-1]), flush=True)
        stem = f"zoo_{sparsity}{args.tag}"
        (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
        (RESULTS / f"{stem}.md").write_text(_table(results, args.batches))


def _table(results: list[dict], batches: list[int]) -> str:
    head = "| model | pruner | MAC ratio | " + " | ".join(
        f"speedup b={b} | per round b={b} (interval, coverage) | MAC eff b={b} | byte ratio b={b} | roofline eff b={b}"
        for b in batches) + " |"
    timings = {r.get("timing", "in-process, interleaved") for r in results}
    if timings == {"in-process, interleaved"}:
        title = ("timed in-process: dense, pruned (and the peer) interleaved run by run in one process, medians; "
                 "per-round intervals are run by run, optimistic, as consecutive runs in one process are not "
                 "independent")
    else:
        title = ("timed " + ", ".join(sorted(timings)) + ": each model alone in its own process, the processes "
                 "alternating; speedup = ratio of the medians")
    lines = [f"# The model zoo on ORT CPU, {title}", "",
             "MAC eff = speedup / MAC ratio; roofline eff = speedup / min(MAC ratio, byte ratio), byte ratio = dense / "
             "pruned bytes moved (weights and activations read and written per node, unfused, from the ONNX graph). "
             "Per round: the median of the per-round speedups, with the interval between order statistics of the "
             "rounds and the coverage of the median that interval reaches (in one process a round is one run of "
             "each model).",
             "", head, "|---" * (3 + 5 * len(batches)) + "|"]
    for r in results:
        rows = [("structadmm", r["mac_ratio"], r["latency"])]
        if "peer" in r:
            rows.append(({"tp": "Torch-Pruning"}[r["peer"]["name"]], r["peer"]["mac_ratio"], r["peer"]["latency"]))
        for pruner, mac_ratio, latency in rows:
            lat = {row["batch"]: row for row in latency}
            cells = " | ".join(f"{lat[b]['speedup']:.2f}x | {speedup_interval(lat[b])} | {lat[b]['efficiency']:.2f} | "
                               + _roofline_cells(lat[b]) for b in batches)
            name = r["model"] + (f" (#{r['repeat'] + 1})" if r.get("repeat") else "")
            lines.append(f"| {name} | {pruner} | {mac_ratio:.2f}x | {cells} |")
    loads = [r["loadavg"] for r in results if "loadavg" in r]
    if loads:
        lines += ["", "Load average (1, 5, 15 min) before each model's timing: "
                  + "; ".join(f"{r['model']} " + ", ".join(f"{v:.2f}" for v in r["loadavg"]) for r in results
                              if "loadavg" in r) + "."]
    return "\n".join(lines) + "\n"


def _roofline_cells(row: dict) -> str:
    """Byte ratio and roofline efficiency; n/a in result files written before they were recorded."""
    if "byte_ratio" not in row:
        return "n/a | n/a"
    return f"{row['byte_ratio']:.2f}x | {row['roofline_efficiency']:.2f}"


if __name__ == "__main__":
    main()

"""The paper's headline, the latency half: measured ORT CPU speedup of the pruned architectures.

    .venv/bin/python benchmarks/headline_speedup.py [--threads 1] [--runs 50] [--seconds 3] [--processes 6]

For the models of the accuracy benchmark (``mnist1d-cnn`` width 32, the built-in ``digits-cnn``),
at filter ratios 0.75 / 0.875 / 0.9375 with the default plan (first conv and classifier whole),
exact ratios (``channel_multiple = 1``, as ``accuracy_vs_baselines.py`` prunes) and multiples of
16 (the pipeline's default): the pruned architecture is compacted, exported and timed against
dense with ONNX Runtime (batch 64 and 1, isolated: each model alone in its own process, the
processes alternating, ``--processes`` rounds; speedup = ratio of the medians, and the median
per-round ratio with its interval and the coverage that interval reaches).
Latency does not depend on the weights' values, so random weights stand in for trained ones;
the accuracy at each ratio is ``accuracy_vs_baselines.py``'s. Writes
benchmarks/results/headline_speedup.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from structadmm import PruningPlan, benchmark, compact, count_onnx, export_onnx
from structadmm.models import get_spec
from structadmm.models.zoo import mnist1d_cnn

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.75, 0.875, 0.9375])
    parser.add_argument("--processes", type=int, default=6, help="rounds of isolated processes per batch size")
    args = parser.parse_args()
    load_start = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="structadmm-headline-"))
    models = {"mnist1d-cnn (width 32)": (lambda: mnist1d_cnn(width=32), (1, 40)),
              "digits-cnn": (get_spec("digits-cnn").build, (1, 16, 16))}
    rows = []
    for name, (build, shape) in models.items():
        torch.manual_seed(0)
        dense = build().eval()
        example = torch.randn(8, *shape)
        files = {"dense": tmp / f"{name[:6]}-dense.onnx"}
        export_onnx(dense, example, files["dense"])
        cases = []
        for ratio in args.ratios:
            for multiple in (1, 16):
                model = build().eval()
                model.load_state_dict(dense.state_dict())
                PruningPlan.uniform(model, example, "filter", ratio, multiple=multiple, keep_ends=True).project(model)
                key = f"r{ratio}-m{multiple}"
                files[key] = tmp / f"{name[:6]}-{key}.onnx"
                export_onnx(compact(model, example), example, files[key])
                cases.append((ratio, multiple, key))
        report = benchmark(files, batch_sizes=(1, 64), threads=args.threads, min_runs=args.runs,
                           min_seconds=args.seconds, baseline="dense", isolate=True, processes=args.processes)
        entry = {(e.name, e.batch): e for e in report.entries}
        dense_macs = count_onnx(files["dense"]).macs
        for ratio, multiple, key in cases:
            rows.append({"model": name, "ratio": ratio, "channel_multiple": multiple,
                         "mac_ratio": dense_macs / count_onnx(files[key]).macs,
                         **{f"speedup_b{b}": entry[(key, b)].speedup for b in (1, 64)},
                         **{f"per_round_b{b}": {"median": entry[(key, b)].round_speedup,
                                                "low": entry[(key, b)].round_speedup_low,
                                                "high": entry[(key, b)].round_speedup_high,
                                                "coverage": entry[(key, b)].ci_coverage} for b in (1, 64)},
                         "mode": entry[(key, 1)].mode})
            print(rows[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    loads = {"loadavg_start": load_start, "loadavg_end": os.getloadavg()}
    (RESULTS / "headline_speedup.json").write_text(json.dumps({"settings": vars(args), **loads, "rows": rows},
                                                              indent=1))
    lines = [f"# Measured ORT CPU speedup of the pruned architectures ({args.threads} thread(s), isolated: each model "
             f"alone in its own process, {args.processes} rounds of processes; medians)",
             "", "Speedup = dense median / pruned median over all runs; per round = the median of the round-by-round "
             "ratios (low–high, the probability that interval holds the true median).", "",
             "| model | ratio | channel multiple | MAC ratio | speedup b=1 | per round b=1 | speedup b=64 | per round b=64 |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['ratio']} | {r['channel_multiple']} | {r['mac_ratio']:.2f}x | "
              f"{r['speedup_b1']:.2f}x | {_per_round(r['per_round_b1'])} | "
              f"{r['speedup_b64']:.2f}x | {_per_round(r['per_round_b64'])} |" for r in rows]
    lines += ["", "Load average (1, 5, 15 min) at the start " + ", ".join(f"{v:.2f}" for v in loads["loadavg_start"])
              + "; at the end " + ", ".join(f"{v:.2f}" for v in loads["loadavg_end"]) + "."]
    (RESULTS / "headline_speedup.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _per_round(cell: dict) -> str:
    return f"{cell['median']:.2f}x ({cell['low']:.2f}–{cell['high']:.2f}, {100 * cell['coverage']:.1f} %)"


if __name__ == "__main__":
    main()

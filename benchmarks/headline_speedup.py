"""The paper's headline, the latency half: measured ORT CPU speedup of the pruned architectures.

    .venv/bin/python benchmarks/headline_speedup.py [--threads 1] [--runs 50] [--seconds 3]

For the models of the accuracy benchmark (``mnist1d-cnn`` width 32, the built-in ``digits-cnn``),
at filter ratios 0.75 / 0.875 / 0.9375 with the default plan (first conv and classifier whole),
exact ratios (``channel_multiple = 1``, as ``accuracy_vs_baselines.py`` prunes) and multiples of
16 (the pipeline's default): the pruned architecture is compacted, exported and timed against
dense with ONNX Runtime (batch 64 and 1, dense and pruned interleaved in one run, medians).
Latency does not depend on the weights' values, so random weights stand in for trained ones;
the accuracy at each ratio is ``accuracy_vs_baselines.py``'s. Writes
benchmarks/results/headline_speedup.{json,md}.
"""

from __future__ import annotations

import argparse
import json
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
    args = parser.parse_args()
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
                           min_seconds=args.seconds, baseline="dense")
        speedup = {(e.name, e.batch): e.speedup for e in report.entries}
        dense_macs = count_onnx(files["dense"]).macs
        for ratio, multiple, key in cases:
            rows.append({"model": name, "ratio": ratio, "channel_multiple": multiple,
                         "mac_ratio": dense_macs / count_onnx(files[key]).macs,
                         **{f"speedup_b{b}": speedup[(key, b)] for b in (1, 64)}})
            print(rows[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "headline_speedup.json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1))
    lines = [f"# Measured ORT CPU speedup of the pruned architectures ({args.threads} thread(s), medians, interleaved)",
             "", "| model | ratio | channel multiple | MAC ratio | speedup b=1 | speedup b=64 |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['ratio']} | {r['channel_multiple']} | {r['mac_ratio']:.2f}x | "
              f"{r['speedup_b1']:.2f}x | {r['speedup_b64']:.2f}x |" for r in rows]
    (RESULTS / "headline_speedup.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""The embedded default (`structadmm run`) over several seeds: accuracy, MACs, ORT CPU speedup.

    .venv/bin/python benchmarks/digits_default.py [--seeds 0 1 2]

Writes benchmarks/results/digits_default.json and .md (the table quoted in README).
Each run times dense and pruned as the pipeline does by default (``bench_isolate``: each model
alone in its own process, the processes alternating); the result's title names the mode the
rows were timed in. Absolute milliseconds are not comparable across machines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from structadmm.bench.report import speedup_interval
from structadmm.pipeline import CompressConfig, compress_default

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ratio", type=float, default=CompressConfig().ratio)
    args = parser.parse_args()

    rows, modes = [], set()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            config = CompressConfig(seed=seed, ratio=args.ratio)
            report = compress_default(config, out_dir=Path(tmp) / f"seed{seed}").report
            lat = {row["batch"]: row for row in report["latency"]}
            modes.update(row["mode"] for row in report["latency"])
            rows.append({
                "seed": seed,
                "dense_acc": report["dense"]["accuracy"], "pruned_acc": report["pruned"]["accuracy"],
                "mac_ratio": report["mac_ratio"], "param_ratio": report["param_ratio"],
                "parity": report["parity"]["max_abs_diff"],
                **{f"speedup_b{b}": r["speedup"] for b, r in lat.items()},
                **{f"efficiency_b{b}": r["efficiency"] for b, r in lat.items()},
                # the median of the per-round speedups, its interval and that interval's coverage
                **{f"per_round_b{b}": speedup_interval(r) for b, r in lat.items()},
                "seconds": sum(report["timings"].values()),
            })
            print(json.dumps(rows[-1]))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "digits_default.json").write_text(json.dumps({"ratio": args.ratio, "runs": rows}, indent=2) + "\n")
    keys = [k for k in rows[0] if k != "seed"]
    lines = [f"# The embedded default over seeds (ratio {args.ratio}): ORT CPU latency timed {' and '.join(sorted(modes))} "
             "(isolated: each model alone in its own process, processes alternating; in-process: interleaved in one "
             "process)", "", "| seed | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for row in rows:
        lines.append(f"| {row['seed']} | " + " | ".join(_fmt(row[k]) for k in keys) + " |")
    lines.append("| median | " + " | ".join(_fmt(statistics.median(r[k] for r in rows)) if not isinstance(rows[0][k], str)
                                            else "" for k in keys) + " |")
    (RESULTS / "digits_default.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _fmt(value: float | str) -> str:
    if isinstance(value, str):
        return value
    return f"{value:.2e}" if abs(value) < 1e-3 else f"{value:.4g}"


if __name__ == "__main__":
    main()

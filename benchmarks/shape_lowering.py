"""Shape lowering on ONNX Runtime CPU: a column-pruned conv run dense vs as a LoweredConv.

    .venv/bin/python benchmarks/shape_lowering.py                      # (a) one conv, (b) VGG-16 224x224
    .venv/bin/python benchmarks/shape_lowering.py --parts vgg --size 112   # VGG-16 at 112x112 (4x less work)
    .venv/bin/python benchmarks/shape_lowering.py --parts sweep narrow # the measurements behind min_gain_for

(a) one 3x3 conv 128->128 on 56x56 with 50 / 75 / 87.5 % of its GEMM columns pruned;
(b) VGG-16 from the zoo with every layer shape-pruned by ``PruningPlan.uniform(model, x, "shape",
    ratio)`` (its Linear layers too; they stay dense Gemms in both models) and every conv lowered
    (``vgg``), or only the convs the default threshold lowers (``vgg-default``);
(sweep) single convs of VGG-16's shapes (and a narrower one) at 40-75 %: where lowering starts
        to pay off;
(narrow) single convs of 16-64 filters at 56x56 and 112x112, 75-93.75 % pruned: where it pays off
        for the narrow convs that the sweep found losing below 75 %.

Dense and lowered are exported with ``export_onnx`` (parity-checked) and timed by
``structadmm.bench.benchmark`` (ORT CPU, 2 threads, batch 8) isolated: each model alone in its own
process, the processes alternating, ``--processes`` rounds (6: the per-round speedups' median comes
with an interval of 96.9 % coverage); ``--in-process`` times them interleaved in one process instead,
as the parts written before isolation was the default were. Absolute milliseconds are not comparable
across machines. Lowering is forced
(``min_gain=1``) so ratios below the default threshold are measured too. MAC ratio = dense MACs /
lowered MACs counted from the two ONNX files; efficiency = speedup / MAC ratio.
Results are merged into benchmarks/results/shape_lowering.json and .md (a part that is not run
keeps its earlier results).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from structadmm.bench import benchmark
from structadmm.bench.report import speedup_interval
from structadmm.exporters import count_onnx, export_onnx
from structadmm.models import get_spec
from structadmm.prune.lowering import lower_conv, lower_convs
from structadmm.prune.plan import PruningPlan
from structadmm.prune.sparsity import project_columns

RESULTS = Path(__file__).parent / "results"
BATCH = 8
THREADS = 2
# (filters = input channels, spatial size): VGG-16's 3x3 convs at 224x224 and a narrower one.
SWEEP_SHAPES = ((32, 112), (64, 112), (128, 56), (256, 28), (512, 14))
SWEEP_RATIOS = (0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75)
NARROW_SHAPES = ((16, 56), (16, 112), (32, 56), (32, 112), (64, 56), (64, 112))
NARROW_RATIOS = (0.75, 0.8, 0.875, 0.9375)
DEFAULT_RULE = "min_gain_for(F) = max(2.5, 32 / sqrt(F)) for a conv of F filters"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=["conv", "vgg", "vgg-default", "sweep", "narrow"], default=["conv", "vgg"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75, 0.875])
    parser.add_argument("--size", type=int, default=224, help="VGG-16 input size (224 or 112)")
    parser.add_argument("--conv-size", type=int, default=56, help="spatial size of the single conv")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds per comparison")
    parser.add_argument("--runs", type=int, default=30, help="minimum timed rounds per comparison")
    parser.add_argument("--processes", type=int, default=6, help="rounds of isolated processes (95 %% intervals need 6)")
    parser.add_argument("--in-process", action="store_true", help="time interleaved in this process instead")
    args = parser.parse_args()
    timing = "in-process, interleaved" if args.in_process else f"isolated, {args.processes} rounds"

    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "shape_lowering.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results.update({"batch": BATCH, "threads": THREADS, "min_gain": DEFAULT_RULE})
    command = shlex.join([".venv/bin/python", "benchmarks/shape_lowering.py", *sys.argv[1:]])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)

        def part(rows: list[dict], **extra: object) -> dict:
            return {"command": command, "timing": timing, **extra, "rows": rows}

        def convs(shapes: tuple[tuple[int, int], ...], ratios: tuple[float, ...]) -> list[dict]:
            return [_single_conv(work, channels, size, r, args) for channels, size in shapes for r in ratios]

        if "conv" in args.parts:
            results["conv"] = part(convs(((128, args.conv_size),), args.ratios),
                                   shape=f"3x3 conv 128->128 on {args.conv_size}x{args.conv_size}")
        if "vgg" in args.parts:
            results["vgg16"] = part([_vgg(work, args.size, r, args) for r in args.ratios], size=args.size)
        if "vgg-default" in args.parts:
            results["vgg16_default"] = part([_vgg(work, args.size, r, args, forced=False) for r in args.ratios],
                                            size=args.size)
        if "sweep" in args.parts:
            results["sweep"] = part(convs(SWEEP_SHAPES, SWEEP_RATIOS))
        if "narrow" in args.parts:
            results["narrow"] = part(convs(NARROW_SHAPES, NARROW_RATIOS))
    if "vgg16" in results and "vgg" not in args.parts:  # the default threshold may have changed since
        for row in results["vgg16"]["rows"]:
            row["lowered_by_default"] = _lowered_by_default(row["size"], row["ratio"])
    path.write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "shape_lowering.md").write_text(_markdown(results))
    print(_markdown(results))


def _single_conv(work: Path, channels: int, size: int, ratio: float, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, channels, 3, padding=1).eval()
    with torch.no_grad():
        conv.weight.mul_(project_columns(conv.weight, ratio).to(conv.weight.dtype))
    lowered = lower_conv(conv, min_gain=1.0)
    x = torch.randn(2, channels, size, size)
    row = {"channels": channels, "size": size, **_compare(work, conv, lowered, x, ratio, args)}
    print(json.dumps(row), flush=True)
    return row


def _vgg(work: Path, size: int, ratio: float, args: argparse.Namespace, forced: bool = True) -> dict:
    """VGG-16 shape-pruned at ``ratio``, dense against lowered: every conv (``forced``), or the convs the
    default threshold lowers."""
    torch.manual_seed(0)
    model = get_spec("vgg16").build().eval()
    x = torch.randn(2, 3, size, size)
    PruningPlan.uniform(model, x, "shape", ratio).project(model)
    _, by_default = lower_convs(model)
    lowered, names = lower_convs(model, min_gain=1.0 if forced else None)
    row = {
        "size": size,
        "lowered_layers": len(names),
        "lowered_by_default": len(by_default),
        **_compare(work, model, lowered, x, ratio, args),
    }
    print(json.dumps(row), flush=True)
    return row


def _lowered_by_default(size: int, ratio: float) -> int:
    torch.manual_seed(0)
    model = get_spec("vgg16").build().eval()
    x = torch.randn(2, 3, size, size)
    PruningPlan.uniform(model, x, "shape", ratio).project(model)
    return len(lower_convs(model)[1])


def _compare(work: Path, dense: nn.Module, lowered: nn.Module, x: torch.Tensor, ratio: float,
             args: argparse.Namespace) -> dict:
    paths = {"dense": work / "dense.onnx", "lowered": work / "lowered.onnx"}
    parity = max(export_onnx(dense, x, paths["dense"]).max_abs_diff,
                 export_onnx(lowered, x, paths["lowered"]).max_abs_diff)
    macs = {name: count_onnx(p).macs for name, p in paths.items()}
    report = benchmark(paths, batch_sizes=(BATCH,), threads=THREADS,
                       providers=["CPUExecutionProvider"], warmup=2,
                       min_runs=args.runs, min_seconds=args.seconds,
                       isolate=not args.in_process, processes=args.processes)
    entry = {e.name: e for e in report.entries}
    rows = report.to_rows(dense="dense", pruned="lowered")
    mac_ratio = macs["dense"] / macs["lowered"]
    speedup = entry["lowered"].speedup
    return {
        "ratio": ratio,
        "mac_ratio": round(mac_ratio, 3),
        "dense_ms": round(entry["dense"].median_ms, 2),
        "lowered_ms": round(entry["lowered"].median_ms, 2),
        "speedup": round(speedup, 3),
        "efficiency": round(speedup / mac_ratio, 3),
        "runs": entry["dense"].runs,
        "per_round": speedup_interval(rows[0]),
        "parity_max_abs_diff": parity,
    }


def _markdown(results: dict) -> str:
    lines = [
        f"ORT CPU, {THREADS} threads, batch {BATCH}; each part says how it was timed (isolated: each model alone in "
        "its own process, the processes alternating; in-process: dense and lowered interleaved run by run in one "
        "process); medians, speedup = ratio of medians, per_round = the median of the per-round speedups with its "
        "interval and that interval's coverage. "
        "ratio = fraction of GEMM columns pruned; lowering forced (min_gain=1) except where the title says "
        f"otherwise; lowered_by_default = convs lower_convs rewrites by default ({results['min_gain']}).",
        "",
    ]
    columns = ["ratio", "mac_ratio", "dense_ms", "lowered_ms", "speedup", "per_round", "efficiency", "runs"]
    sections = [
        ("conv", lambda r: r["shape"], columns),
        ("vgg16", lambda r: f"VGG-16, {r['size']}x{r['size']}, every conv lowered",
         columns + ["lowered_layers", "lowered_by_default"]),
        ("vgg16_default", lambda r: f"VGG-16, {r['size']}x{r['size']}, the convs the default threshold lowers",
         columns + ["lowered_layers", "rule"]),
        ("sweep", lambda r: "Threshold sweep (3x3 convs C->C)", ["channels", "size", *columns]),
        ("narrow", lambda r: "Narrow convs (3x3 convs C->C, 16-64 filters)", ["channels", "size", *columns]),
    ]
    for key, title, cols in sections:
        if key in results:
            part = results[key]
            timing = part.get("timing", "in-process, interleaved")  # parts written before it was recorded
            lines += [f"### {title(part)}", "", f"`{part['command']}`, timed {timing}", "",
                      *_table(part["rows"], cols), ""]
    return "\n".join(lines)


def _table(rows: list[dict], columns: list[str]) -> list[str]:
    out = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    out += ["| " + " | ".join(str(row.get(c, "n/a")) for c in columns) + " |" for row in rows]
    return out


if __name__ == "__main__":
    main()

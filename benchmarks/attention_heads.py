"""Transformers: speed of head + MLP pruning, and ADMM against one-shot pruning on a small ViT.

    .venv/bin/python benchmarks/attention_heads.py latency     # DeiT-S/16 at 224, heads 0.5 + MLP 0.5
    .venv/bin/python benchmarks/attention_heads.py accuracy    # vit-digits, ADMM vs one-shot, paired seeds

**latency**: timm's ``deit_small_patch16_224`` (random weights, 6 heads of 64, MLP 1536) is
pruned with a uniform filter plan at 0.5 (half the heads of every attention, half the MLP
neurons of every block; the residual stream stays whole), compacted, exported, checked against
the masked model in ONNX Runtime, and timed against the dense export with the project's
harness: each model alone in its own process, alternating, ORT CPU, 2 threads, medians.
Efficiency is the measured speedup divided by the MAC ratio (1.0: the speedup the MACs promise).

**accuracy**: the zoo's ``vit-digits`` (4 blocks of 8 heads) on the built-in digits. Per seed,
one dense model is trained; from it, ADMM (the pipeline's default recipe: 8 rounds of 2 epochs,
hard prune, 8 epochs of masked retraining) and one-shot magnitude pruning followed by masked
retraining for the same 24 epochs both prune heads and MLP neurons at the same ratio. Both use
the pipeline's default hyperparameters, untouched (nothing is tuned here, on any split); the
held-out split is read once per model. Reported: the mean paired difference with its 95 % CI.

Writes benchmarks/results/attention_heads_{latency,accuracy}.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import structadmm as sa

RESULTS = Path(__file__).parent / "results"


def latency(args: argparse.Namespace) -> None:
    import timm

    from structadmm.bench.latency import benchmark
    from structadmm.bench.report import speedup_interval

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    plan = sa.PruningPlan.uniform(model, x, sparsity="filter", ratio=args.ratio, multiple=args.multiple)
    heads = [u for u in plan.units if "attn" in u.name]
    plan.project(model)
    small = sa.compact(model, x)
    folder = Path(tempfile.mkdtemp())
    sa.export_onnx(model, x, folder / "dense.onnx", verify=False)
    exported = sa.export_onnx(small, x, folder / "pruned.onnx")  # parity with the masked model, in ORT
    dense_macs, pruned_macs = sa.count_onnx(folder / "dense.onnx").macs, sa.count_onnx(folder / "pruned.onnx").macs
    load_start = os.getloadavg()
    report = benchmark({"dense": folder / "dense.onnx", "pruned": folder / "pruned.onnx"}, batch_sizes=args.batches,
                       threads=args.threads, min_seconds=args.seconds, isolate=True, processes=args.processes)
    loads = {"loadavg_start": load_start, "loadavg_end": os.getloadavg()}
    mac_ratio = dense_macs / pruned_macs
    rows = report.to_rows(mac_ratio=mac_ratio)
    kept = {name: m.num_heads for name, m in small.named_modules() if hasattr(m, "qkv") and hasattr(m, "num_heads")}
    result = {"command": " ".join(sys.argv), "model": args.model, "ratio": args.ratio, "multiple": args.multiple,
              "head_units": len(heads), "heads_kept": kept, "mac_ratio": mac_ratio, "dense_macs": dense_macs,
              "pruned_macs": pruned_macs, "parity": exported.max_abs_diff, "threads": args.threads,
              "processes": args.processes, **loads, "rows": rows}
    write("attention_heads_latency", result, [
        f"`{result['command']}`", "",
        f"{args.model}, uniform filter plan at {args.ratio} (heads and MLP neurons; residual stream whole), "
        f"heads kept per block: {sorted(set(kept.values()))}; {mac_ratio:.2f}x fewer MACs "
        f"({dense_macs / 1e9:.2f} G -> {pruned_macs / 1e9:.2f} G); ONNX parity {exported.max_abs_diff:.1e}.",
        f"ORT CPU, {args.threads} threads, isolated: each model alone in its own process, alternating, "
        f"{args.processes} rounds of processes, medians. Load average (1, 5, 15 min) before timing "
        + ", ".join(f"{v:.2f}" for v in load_start) + ", after " + ", ".join(f"{v:.2f}" for v in loads["loadavg_end"])
        + ".", "",
        "| batch | dense ms | pruned ms | speedup (ratio of medians) | per round: median (interval, coverage) "
        "| efficiency |", "|---|---|---|---|---|---|",
        *[f"| {r['batch']} | {r['dense_ms']:.2f} | {r['pruned_ms']:.2f} | {r['speedup']:.2f}x | "
          f"{speedup_interval(r)} | {r['efficiency']:.2f} |" for r in rows]])


def accuracy(args: argparse.Namespace) -> None:
    from structadmm.models.data import load_data
    from structadmm.models.registry import get_spec
    from structadmm.prune.admm import AdmmSchedule
    from structadmm.pipeline.config import CompressConfig
    from structadmm.exporters.counting import count_torch
    from structadmm.pipeline.train import evaluate, train_epochs
    from structadmm.batches import make_loader

    import structadmm.models.zoo  # noqa: F401  (registers the zoo)

    c = CompressConfig()
    data = load_data("digits")
    spec = get_spec("vit-digits")
    val = make_loader(data.val, 256, shuffle=False)
    fit = dict(momentum=c.momentum, weight_decay=c.weight_decay)
    schedule = AdmmSchedule(c.admm_rounds, c.admm_epochs, tolerance=c.admm_tolerance,
                            extra_rounds=c.admm_extra_rounds, restart=c.admm_lr_restart)
    budget = schedule.max_epochs() + c.retrain_epochs
    rows = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        dense = spec.build()
        loader = make_loader(data.train, c.batch_size, shuffle=True, seed=seed)
        train_epochs(dense, loader, c.dense_epochs, lr=c.lr, **fit)
        example = next(iter(loader))[0][:8]
        row = {"seed": seed, "dense": evaluate(dense, val)}
        for method in ("admm", "one-shot"):
            model = copy.deepcopy(dense)
            plan = sa.PruningPlan.uniform(model, example, "filter", args.ratio, multiple=c.channel_multiple)
            torch.manual_seed(seed)
            loader = make_loader(data.train, c.batch_size, shuffle=True, seed=seed)
            if method == "admm":
                admm = sa.ADMM(model, plan, rho=c.rho, rho_growth=c.rho_growth, rho_max=c.rho_max)
                train_epochs(model, loader, schedule.max_epochs(), lr=c.admm_lr, **schedule.train_kwargs(admm), **fit)
                masks, epochs = admm.hard_prune(), c.retrain_epochs
            else:
                masks, epochs = plan.project(model), budget
            guard = sa.apply_masks(model, masks)
            train_epochs(model, loader, epochs, lr=c.retrain_lr, after_step=guard.enforce, **fit)
            guard.enforce()
            guard.remove()
            small = sa.compact(model.eval(), example)
            row[method] = evaluate(small, val)
            row[f"{method}_mac_ratio"] = count_torch(dense, example).macs / count_torch(small, example).macs
        rows.append(row)
        print(json.dumps(row), flush=True)
    diffs = [r["admm"] - r["one-shot"] for r in rows]
    mean, low, high = ci95(diffs)
    result = {"command": " ".join(sys.argv), "ratio": args.ratio, "epochs_after_dense": budget, "rows": rows,
              "admm_minus_one_shot": {"mean": mean, "ci95": [low, high]},
              "held_out_samples": len(data.val)}
    write("attention_heads_accuracy", result, [
        f"`{result['command']}`", "",
        f"vit-digits on digits ({len(data.val)} held-out samples), heads and MLP neurons at {args.ratio}, "
        f"{budget} epochs after the dense checkpoint for both methods, pipeline defaults, {args.seeds} paired seeds.", "",
        "| seed | dense | ADMM | one-shot + retrain | MAC ratio |", "|---|---|---|---|---|",
        *[f"| {r['seed']} | {r['dense']:.2%} | {r['admm']:.2%} | {r['one-shot']:.2%} | {r['admm_mac_ratio']:.2f}x |"
          for r in rows],
        "", f"ADMM minus one-shot: {mean * 100:+.2f} pt (95 % CI {low * 100:+.2f} to {high * 100:+.2f})."])


def ci95(values: list[float]) -> tuple[float, float, float]:
    """Mean and the 95 % t-interval of the mean."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def write(stem: str, result: dict, lines: list[str]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    lat = sub.add_parser("latency")
    lat.add_argument("--model", default="deit_small_patch16_224")
    lat.add_argument("--ratio", type=float, default=0.5)
    lat.add_argument("--multiple", type=int, default=16)
    lat.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    lat.add_argument("--threads", type=int, default=2)
    lat.add_argument("--seconds", type=float, default=3.0)
    lat.add_argument("--processes", type=int, default=6, help="rounds of isolated processes (95 %% intervals need 6)")
    acc = sub.add_parser("accuracy")
    acc.add_argument("--ratio", type=float, default=0.5)
    acc.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    latency(args) if args.what == "latency" else accuracy(args)


if __name__ == "__main__":
    main()

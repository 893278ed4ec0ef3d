"""Progressive ADMM stages (``admm_stages``) against one ADMM stage, on MNIST-1D at ratio 0.9375.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/admm_stages.py

A brief check, not the accuracy protocol of ``accuracy_vs_baselines.py``: ONE seed, one dense
checkpoint shared by every variant (``mnist1d-cnn``, width 32, trained ``--dense-epochs`` with the
pipeline's trainer and defaults), then every variant is ``structadmm.compress`` on a copy of it
(``dense_epochs = 0``) with the pipeline's defaults except the schedule below, exact ratios
(``channel_multiple = 1``; the first conv and the classifier kept whole, the default), and the
same total budget of ``--budget`` epochs after the dense checkpoint (ADMM, stage retrains and
the final masked retrain all count). Every figure is on the VALIDATION split (5,000 samples);
the test split is never read. The schedules were chosen on it and are all reported.

Writes benchmarks/results/admm_stages.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"

# name -> (admm_stages, admm_rounds, admm_epochs, admm_stage_retrain_epochs); the final retrain fills the budget
VARIANTS: dict[str, tuple[list[float], int, int, int]] = {
    "single 8x2": ([], 8, 2, 0),
    "single 4x4": ([], 4, 4, 0),
    "stages 0.75,0.875 (4x1 each, retrain 2)": ([0.75, 0.875], 4, 1, 2),
    "stages 0.5,0.75,0.875 (3x1 each, retrain 1)": ([0.5, 0.75, 0.875], 3, 1, 1),
    "stages 0.5,0.75,0.875 (2x2 each, retrain 1)": ([0.5, 0.75, 0.875], 2, 2, 1),
}


def dense_model(args: argparse.Namespace, train: Any, cache: Path) -> torch.nn.Module:
    from structadmm.models import get_spec
    from structadmm.pipeline import CompressConfig
    from structadmm.batches import make_loader
    from structadmm.pipeline.train import train_epochs

    spec = get_spec("mnist1d-cnn")
    defaults = CompressConfig()
    path = cache / f"stages-dense-s{args.seed}-e{args.dense_epochs}.pt"
    torch.manual_seed(args.seed)
    model = spec.build()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        train_epochs(model, make_loader(train, defaults.batch_size, shuffle=True, seed=args.seed), args.dense_epochs,
                     lr=defaults.lr, momentum=defaults.momentum, weight_decay=defaults.weight_decay)
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.eval()


def run_variant(name: str, dense: torch.nn.Module, train: Any, val: Any, args: argparse.Namespace) -> dict[str, Any]:
    from structadmm.pipeline import CompressConfig, compress

    stages, rounds, epochs, stage_retrain = VARIANTS[name]
    admm_total = (len(stages) + 1) * rounds * epochs + len(stages) * stage_retrain
    retrain = args.budget - admm_total
    if retrain < 0:
        raise SystemExit(f"{name}: {admm_total} epochs of ADMM exceed the budget of {args.budget}")
    config = CompressConfig(ratio=args.ratio, admm_stages=stages, admm_rounds=rounds, admm_epochs=epochs,
                            admm_stage_retrain_epochs=stage_retrain, retrain_epochs=retrain, dense_epochs=0,
                            channel_multiple=1, seed=args.seed, bench_batches=[64], bench_min_runs=5,
                            bench_min_seconds=0.0, bench_isolate=False)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        report = compress(copy.deepcopy(dense), train, val, config, out_dir=Path(tmp) / "run",
                          model_name="mnist1d-cnn").report
    return {"name": name, "admm_stages": stages, "admm_rounds": rounds, "admm_epochs": epochs,
            "stage_retrain_epochs": stage_retrain, "retrain_epochs": retrain, "total_epochs": admm_total + retrain,
            "val_accuracy": report["pruned"]["accuracy"], "hard_pruned_val_accuracy": report["pruned"]["hard_pruned_accuracy"],
            "dense_val_accuracy": report["dense"]["accuracy"], "mac_ratio": report["mac_ratio"],
            "groups": report["groups"], "final_primal_residual": report["admm_outcome"]["primal_residual"],
            "stages": [{k: s[k] for k in ("stage", "ratio", "hard_pruned_accuracy", "retrained_accuracy", "kept")}
                       | {"primal_residual": s["admm_outcome"]["primal_residual"]} for s in report["admm_stages"]],
            "seconds": time.perf_counter() - started}


def write_markdown(summary: dict[str, Any], path: Path) -> None:
    rows = summary["variants"]
    single = max((r for r in rows if not r["admm_stages"]), key=lambda r: r["val_accuracy"])
    staged = max((r for r in rows if r["admm_stages"]), key=lambda r: r["val_accuracy"])
    lines = [
        "# Progressive ADMM stages against one stage: MNIST-1D, ratio 0.9375 (validation split, one seed)", "",
        f"Command: `{summary['command']}`", "",
        f"mnist1d-cnn (width 32), seed {summary['settings']['seed']}, one dense checkpoint "
        f"({summary['settings']['dense_epochs']} epochs, validation accuracy {100 * rows[0]['dense_val_accuracy']:.2f} %) "
        f"shared by every variant; every variant `structadmm.compress` with the pipeline's defaults but the schedule, "
        f"channel_multiple = 1, the first conv and the classifier whole, and {summary['settings']['budget']} epochs "
        "after the dense checkpoint in all (ADMM, stage retrains, final masked retrain). Accuracies on the "
        "validation split (5,000 samples); the test split was not read. One seed: differences under about "
        "0.5 pt are within what a second seed could move.", "",
        "| variant | ADMM + stage retrain epochs | final retrain | hard-pruned acc. | final val. acc. | MAC ratio | final residual |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['total_epochs'] - r['retrain_epochs']} | {r['retrain_epochs']} "
                     f"| {100 * r['hard_pruned_val_accuracy']:.2f} % | {100 * r['val_accuracy']:.2f} % "
                     f"| {r['mac_ratio']:.1f}x | {r['final_primal_residual']:.3f} |")
    lines += ["", "Per stage (hard-pruned, then after the stage's short masked retrain):", ""]
    for r in rows:
        for s in r["stages"]:
            lines.append(f"- {r['name']}: stage {s['stage']} at {s['ratio']}: residual {s['primal_residual']:.3f}, "
                         f"hard-pruned {100 * s['hard_pruned_accuracy']:.2f} %, retrained "
                         f"{100 * s['retrained_accuracy']:.2f} %")
    diff = 100 * (staged["val_accuracy"] - single["val_accuracy"])
    lines += ["", f"Best staged ({staged['name']}) minus best single stage ({single['name']}): {diff:+.2f} pt "
              f"final validation accuracy; hard-pruned {100 * staged['hard_pruned_val_accuracy']:.2f} % against "
              f"{100 * single['hard_pruned_val_accuracy']:.2f} %. Both are the best of their kind on the split "
              "that chose them (a selection, not an unbiased estimate), from one seed; the test split and more "
              "seeds (`accuracy_vs_baselines.py`) are what would confirm it.", ""]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ratio", type=float, default=0.9375)
    parser.add_argument("--dense-epochs", type=int, default=12)
    parser.add_argument("--budget", type=int, default=24, help="epochs after the dense checkpoint, every variant")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--cache", type=Path, default=RESULTS / "cache")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from structadmm.models.mnist1d import load_mnist1d_splits

    train, val, _ = load_mnist1d_splits()  # the test split is never read here
    dense = dense_model(args, train, args.cache)
    rows = []
    for name in args.variants:
        rows.append(run_variant(name, dense, train, val, args))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "groups"}), flush=True)
    summary = {"command": " ".join(["PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/admm_stages.py",
                                    *(sys.argv[1:] if argv is None else argv)]),
               "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "variants": rows, "machine": {"python": platform.python_version(), "torch": torch.__version__}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "admm_stages.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_markdown(summary, args.out / "admm_stages.md")
    print((args.out / "admm_stages.md").read_text())


if __name__ == "__main__":
    main()

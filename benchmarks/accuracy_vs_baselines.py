"""Accuracy vs MAC reduction: StructADMM against one-shot magnitude pruning and Torch-Pruning.

    .venv/bin/pip install -e ".[bench]"     # torch-pruning (the external peer) and matplotlib
    .venv/bin/python benchmarks/accuracy_vs_baselines.py
    # the defaults, spelled out:
    .venv/bin/python benchmarks/accuracy_vs_baselines.py --seeds 0 1 2 3 4 \
        --ratios 0.5 0.75 0.875 0.9375 --dense-epochs 30 --admm-rounds 8 --admm-epochs 2 \
        --retrain-epochs 14 --retrain-lr 0.01 --finetune-lr 0.03 --threads 1

Real data: scikit-learn's digits (16x16, the fixed stratified 80/20 split of
``load_digits_split()``, 360 held-out images, so 1 pt = 3.6 images). Model: the built-in
``digits-cnn`` (32-32-pool-64-64-pool-128 conv, BN, then 512 -> 64 -> 10).

Per seed ONE dense checkpoint is trained (SGD, cosine, ``--dense-epochs``); every method at
every filter ratio starts from a copy of it and sees the same mini-batch order:

* ``admm``    structadmm: ``PruningPlan.uniform(model, x, "filter", r)``, ``ADMM`` with
              ``--admm-rounds`` Z/U rounds of ``--admm-epochs`` epochs of W-steps
              (``train_epochs(..., penalty=admm.penalty)``), ``hard_prune``, then
              ``apply_masks`` + ``--retrain-epochs`` of masked retraining;
* ``oneshot`` the same plan's ``plan.project(model)`` (one-shot magnitude pruning of the
              coupled channel groups) + masked fine-tuning for as many epochs as ADMM used
              in total (rounds x epochs + retraining);
* ``tp``      Torch-Pruning's ``MagnitudePruner`` (L1 group importance by default,
              ``--tp-norm 2`` for L2), same channel ratio in every layer, output layer
              ignored, one shot, then fine-tuning for the same number of epochs.

MACs are counted by one function for all three: each final model ((a)/(b) after
``structadmm.compact``, (c) as Torch-Pruning left it) is exported with
``structadmm.export_onnx`` (parity-checked against torch) and counted with
``structadmm.count_onnx``; mac_ratio = dense MACs / pruned MACs.

Writes benchmarks/results/accuracy_vs_baselines.json, .md and accuracy_vs_macs.png (or under
``--out``). Training runs with ``--threads`` intra-op threads (default 1: on a 2-core machine
shared with other work, 2 threads made an epoch ~15x slower through oversubscription).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from peers import torch_pruning_magnitude
from torch import nn

from structadmm import ADMM, PruningPlan, apply_masks, compact, count_onnx, export_onnx
from structadmm.files import atomic_path, write_atomic
from structadmm.models import get_spec, load_digits_split
from structadmm.pipeline.train import evaluate, make_loader, train_epochs

RESULTS = Path(__file__).parent / "results"
METHODS = ("admm", "oneshot", "tp")
LABELS = {"admm": "StructADMM (structadmm)", "oneshot": "one-shot magnitude + fine-tune (structadmm plan)",
          "tp": "Torch-Pruning MagnitudePruner + fine-tune"}


# -- building blocks ---------------------------------------------------------------------
class Bench:
    """Data, loaders and the settings every method shares."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.train_set, self.test_set = load_digits_split()  # fixed split (seed 0) for every run
        self.test = make_loader(self.test_set, 256, shuffle=False)
        self.example = self.train_set.tensors[0][:8]
        self.fit = dict(momentum=args.momentum, weight_decay=args.weight_decay)
        self.tmp = Path(tempfile.mkdtemp(prefix="structadmm-acc-"))
        self.cache = Path(args.cache_dir) if args.cache_dir else self.tmp

    def loader(self, seed: int):
        # a fresh generator with the same seed: every method sees the same batch order
        return make_loader(self.train_set, self.args.batch_size, shuffle=True, seed=seed)

    def macs(self, model: nn.Module, name: str) -> int:
        path = self.tmp / f"{name}.onnx"
        export_onnx(model.eval(), self.example, path)
        return count_onnx(path).macs

    def dense(self, seed: int) -> tuple[dict[str, torch.Tensor], float]:
        """The dense checkpoint of ``seed`` (trained once, cached by its settings)."""
        a = self.args
        key = f"dense-s{seed}-e{a.dense_epochs}-lr{a.lr}-b{a.batch_size}-wd{a.weight_decay}.pt"
        path = self.cache / key
        if path.exists():
            state = torch.load(path, weights_only=True)
        else:
            torch.manual_seed(seed)
            model = get_spec("digits-cnn").build()
            train_epochs(model, self.loader(seed), a.dense_epochs, lr=a.lr, **self.fit)
            state = copy.deepcopy(model.state_dict())
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, path)
        model = self.model(state)
        return state, evaluate(model, self.test)

    @staticmethod
    def model(state: dict[str, torch.Tensor]) -> nn.Module:
        model = get_spec("digits-cnn").build()
        model.load_state_dict(state)
        return model

    def total_epochs(self) -> int:
        a = self.args
        return a.admm_rounds * a.admm_epochs + a.retrain_epochs


def masked_finetune(bench: Bench, model: nn.Module, masks, seed: int, epochs: int, lr: float) -> nn.Module:
    """Retrain with the pruned weights held at zero; returns the model to evaluate.

    ``--finetune-on compact`` trains the compacted model instead: the same computation (a
    pruned channel's filter, bias, BN gamma/beta and consumer columns are all zero, so it
    emits exactly 0 and receives zero gradient and zero weight decay), ~MAC-ratio x cheaper.
    """
    torch.manual_seed(seed)
    if bench.args.finetune_on == "compact":
        model = compact(model.eval(), bench.example)
        train_epochs(model, bench.loader(seed), epochs, lr=lr, **bench.fit)
        return model
    guard = apply_masks(model, masks)
    train_epochs(model, bench.loader(seed), epochs, lr=lr, after_step=guard.enforce, **bench.fit)
    guard.enforce()
    guard.remove()
    return model


def run_admm(bench: Bench, state, seed: int, ratio: float) -> dict[str, Any]:
    a = bench.args
    model = bench.model(state)
    plan = PruningPlan.uniform(model, bench.example, "filter", ratio)
    admm = ADMM(model, plan, rho=a.rho, rho_growth=a.rho_growth, rho_max=a.rho_max, ramp_rounds=a.admm_ramp)
    # with --cache-dir, the model after the ADMM phase is kept too (to vary only the retraining)
    key = (f"admm-s{seed}-r{ratio}-{a.admm_rounds}x{a.admm_epochs}-lr{a.admm_lr}-rho{a.rho}-{a.rho_growth}-{a.rho_max}{f'-ramp{a.admm_ramp}' if a.admm_ramp > 1 else ''}"
           f"-d{a.dense_epochs}-{a.lr}-wd{a.weight_decay}.pt")
    path = bench.cache / key if a.cache_dir else None
    if path is not None and path.exists():
        saved = torch.load(path, weights_only=True)
        model.load_state_dict(saved["model"])
        admm.load_state_dict(saved["admm"])
    else:
        torch.manual_seed(seed)
        train_epochs(model, bench.loader(seed), a.admm_rounds * a.admm_epochs, lr=a.admm_lr, penalty=admm.penalty,
                     after_epoch=lambda e: admm.update() if (e + 1) % a.admm_epochs == 0 else None, **bench.fit)
        if path is not None:
            torch.save({"model": model.state_dict(), "admm": admm.state_dict()}, path)
    masks = admm.hard_prune()
    hard_acc = evaluate(model, bench.test)
    model = masked_finetune(bench, model, masks, seed, a.retrain_epochs, a.retrain_lr)
    return {"model": model, "before_finetune_acc": hard_acc,
            "admm": [{"rho": r.rho, "primal": r.primal_residual, "dual": r.dual_residual} for r in admm.history]}


def run_oneshot(bench: Bench, state, seed: int, ratio: float) -> dict[str, Any]:
    model = bench.model(state)
    plan = PruningPlan.uniform(model, bench.example, "filter", ratio)
    masks = plan.project(model)
    pruned_acc = evaluate(model, bench.test)
    model = masked_finetune(bench, model, masks, seed, bench.total_epochs(), bench.args.finetune_lr)
    return {"model": model, "before_finetune_acc": pruned_acc}


def run_tp(bench: Bench, state, seed: int, ratio: float) -> dict[str, Any]:
    model = torch_pruning_magnitude(bench.model(state), bench.example, ratio, norm=bench.args.tp_norm)
    pruned_acc = evaluate(model, bench.test)
    torch.manual_seed(seed)
    train_epochs(model, bench.loader(seed), bench.total_epochs(), lr=bench.args.finetune_lr, **bench.fit)
    return {"model": model, "before_finetune_acc": pruned_acc}


RUNNERS = {"admm": run_admm, "oneshot": run_oneshot, "tp": run_tp}


# -- the experiment --------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75, 0.875, 0.9375])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--dense-epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.05, help="dense training learning rate")
    parser.add_argument("--admm-rounds", type=int, default=8)
    parser.add_argument("--admm-epochs", type=int, default=2, help="epochs of W-steps per Z/U round")
    parser.add_argument("--admm-lr", type=float, default=0.03)
    parser.add_argument("--admm-ramp", type=int, default=0,
                        help="progressive targets: the first N rounds' Z-steps approach the ratio in steps")
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--rho-growth", type=float, default=1.6)
    parser.add_argument("--rho-max", type=float, default=5.0)
    parser.add_argument("--retrain-epochs", type=int, default=14)
    parser.add_argument("--retrain-lr", type=float, default=0.01,
                        help="ADMM's masked retraining (the pipeline's default: it starts from a converged model)")
    parser.add_argument("--finetune-lr", type=float, default=0.03, help="the baselines' fine-tuning")
    parser.add_argument("--finetune-on", choices=("masked", "compact"), default="masked",
                        help="(a)/(b) retraining: the masked full model (apply_masks) or, equivalently, the compacted one")
    parser.add_argument("--tp-norm", type=int, default=1, choices=(1, 2), help="Torch-Pruning importance: L1 or L2")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--cache-dir", default=None, help="keep dense checkpoints here between runs")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--render", metavar="JSON", help="only re-write the .md and .png from a saved results file")
    args = parser.parse_args(argv)
    if args.render:
        result = json.loads(Path(args.render).read_text())
        out_dir = Path(args.out)
        write_atomic(out_dir / "accuracy_vs_baselines.md", _markdown(result))
        _plot(result, out_dir / "accuracy_vs_macs.png")
        return result
    torch.set_num_threads(args.threads)
    bench = Bench(args)
    start = time.perf_counter()

    runs: list[dict[str, Any]] = []
    dense_rows = []
    dense_macs = None
    for seed in args.seeds:
        t0 = time.perf_counter()
        state, dense_acc = bench.dense(seed)
        if dense_macs is None:
            dense_macs = bench.macs(bench.model(state), "dense")
        dense_rows.append({"seed": seed, "accuracy": dense_acc, "seconds": time.perf_counter() - t0})
        print(f"seed {seed}: dense accuracy {dense_acc:.4f}", flush=True)
        for ratio in args.ratios:
            for method in args.methods:
                t0 = time.perf_counter()
                out = RUNNERS[method](bench, state, seed, ratio)
                model = out.pop("model").eval()
                small = compact(model, bench.example) if method != "tp" else model
                acc = evaluate(small, bench.test)
                macs = bench.macs(small, f"{method}-{seed}-{ratio}")
                row = {"seed": seed, "ratio": ratio, "method": method, "accuracy": acc, "macs": macs,
                       "mac_ratio": dense_macs / macs, "params": sum(p.numel() for p in small.parameters()),
                       "seconds": time.perf_counter() - t0, **out}
                runs.append(row)
                print(f"  r={ratio:<7} {method:8} acc {acc:.4f} (before fine-tune {row['before_finetune_acc']:.4f})"
                      f"  macs {row['mac_ratio']:.2f}x  {row['seconds']:.0f}s", flush=True)

    summary = _summarise(runs, args)
    result = {
        "what": "held-out accuracy vs MAC reduction, digits-cnn on scikit-learn digits (360 test images)",
        "command": " ".join(["python benchmarks/accuracy_vs_baselines.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": vars(args) | {"total_epochs_after_dense": bench.total_epochs()},
        "dense": {"macs": dense_macs, "runs": dense_rows,
                  "accuracy_mean": statistics.mean(r["accuracy"] for r in dense_rows),
                  "accuracy_std": _std([r["accuracy"] for r in dense_rows])},
        "summary": summary,
        "runs": runs,
        "seconds": time.perf_counter() - start,
        "versions": _versions(),
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "accuracy_vs_baselines.json", json.dumps(result, indent=2) + "\n")
    write_atomic(out_dir / "accuracy_vs_baselines.md", _markdown(result))
    if not args.no_plot:
        _plot(result, out_dir / "accuracy_vs_macs.png")
    print(_markdown(result))
    return result


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _summarise(runs: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for ratio in args.ratios:
        for method in args.methods:
            sel = [r for r in runs if r["ratio"] == ratio and r["method"] == method]
            if not sel:
                continue
            accs = [r["accuracy"] for r in sel]
            rows.append({"ratio": ratio, "method": method, "n": len(sel),
                         "accuracy_mean": statistics.mean(accs), "accuracy_std": _std(accs),
                         "accuracy_min": min(accs),
                         "before_finetune_mean": statistics.mean(r["before_finetune_acc"] for r in sel),
                         "mac_ratio": statistics.mean(r["mac_ratio"] for r in sel),
                         "macs": statistics.mean(r["macs"] for r in sel)})
    return rows


def _markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    d = result["dense"]
    lines = [
        "# Accuracy vs MAC reduction (digits-cnn, scikit-learn digits, 360 held-out images)",
        "",
        f"Dense: {100 * d['accuracy_mean']:.2f} ± {100 * d['accuracy_std']:.2f} % over seeds {s['seeds']}, "
        f"{d['macs']:,} MACs/sample ({s['dense_epochs']} epochs SGD, lr {s['lr']}).",
        f"After the dense checkpoint every method gets {result['settings']['total_epochs_after_dense']} epochs: "
        f"ADMM {s['admm_rounds']} rounds x {s['admm_epochs']} epochs (lr {s['admm_lr']}, rho {s['rho']} x"
        f"{s['rho_growth']}/round up to {s['rho_max']}) + {s['retrain_epochs']} epochs masked retraining (lr {s['retrain_lr']}); "
        f"baselines one-shot prune + {result['settings']['total_epochs_after_dense']} epochs fine-tuning "
        f"(lr {s['finetune_lr']}). Torch-Pruning importance: L{s['tp_norm']}. "
        + ("(a)/(b) retraining ran on the compacted model (`--finetune-on compact`): the same computation as "
           "masked retraining, since a pruned channel's filter, BN gamma/beta and consumer columns are all zero."
           if s.get("finetune_on") == "compact" else "(a)/(b) retraining: `apply_masks` on the full model."),
        "",
        "| filter ratio | method | accuracy (mean ± std) | min | before fine-tune | MAC ratio | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["summary"]:
        lines.append(f"| {r['ratio']} | {r['method']} | {100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f} % "
                     f"| {100 * r['accuracy_min']:.2f} % | {100 * r['before_finetune_mean']:.2f} % "
                     f"| {r['mac_ratio']:.2f}x | {r['n']} |")
    by = {(r["ratio"], r["method"]): r for r in result["summary"]}
    if any(m != "admm" for _, m in by):
        lines += ["", "ADMM minus the best baseline (mean accuracy, points):", ""]
        for ratio in s["ratios"]:
            if (ratio, "admm") not in by:
                continue
            others = [by[(ratio, m)]["accuracy_mean"] for m in ("oneshot", "tp") if (ratio, m) in by]
            if others:
                lines.append(f"- ratio {ratio}: {100 * (by[(ratio, 'admm')]['accuracy_mean'] - max(others)):+.2f} pt")
    lines += ["", "Per run:", "", "| seed | ratio | method | accuracy | MAC ratio | seconds |", "|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['seed']} | {r['ratio']} | {r['method']} | {100 * r['accuracy']:.2f} % "
                     f"| {r['mac_ratio']:.2f}x | {r['seconds']:.0f} |")
    lines += ["", f"Command: `{result['command']}`  ({result['seconds'] / 60:.1f} min)", ""]
    return "\n".join(lines)


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {"admm": ("o-", "C0"), "oneshot": ("s--", "C1"), "tp": ("^:", "C2")}
    for method in result["settings"]["methods"]:
        rows = [r for r in result["summary"] if r["method"] == method]
        if not rows:
            continue
        x = [r["mac_ratio"] for r in rows]
        y = [100 * r["accuracy_mean"] for r in rows]
        err = [100 * r["accuracy_std"] for r in rows]
        fmt, color = styles[method]
        ax.errorbar(x, y, yerr=err, fmt=fmt, color=color, capsize=3, label=LABELS[method])
    d = result["dense"]
    ax.axhline(100 * d["accuracy_mean"], color="grey", lw=0.8, ls="-.", label="dense")
    ax.set_xscale("log")
    ax.set_xlabel("MAC reduction (dense MACs / pruned MACs, log scale)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(f"digits-cnn, mean ± std over {len(d['runs'])} seeds")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def _versions() -> dict[str, str]:
    import structadmm

    versions = {"structadmm": structadmm.__version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import torch_pruning

        versions["torch_pruning"] = torch_pruning.__version__
    except ImportError:
        pass
    return versions


if __name__ == "__main__":
    main()

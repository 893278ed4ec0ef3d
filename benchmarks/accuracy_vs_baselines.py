"""Does ADMM earn its place? StructADMM against simpler pruning, under a fair protocol, on MNIST-1D.

    .venv/bin/pip install -e ".[bench]"     # torch-pruning (the external peer) and matplotlib
    .venv/bin/python benchmarks/accuracy_vs_baselines.py --workers 2      # resumable: rerun to continue

Data: MNIST-1D generated offline (``structadmm.models.mnist1d``): train 10,000, validation
5,000, test 10,000. Model: ``mnist1d_cnn(width=--width)`` (convs w-2w-2w-4w, flatten, linear).
Plans: uniform filter pruning at ratio r of every group except the first conv's filters and
the classifier (``keep_ends``), exact ratios (``multiple=1``).

Protocol
1. Per seed ONE dense checkpoint (``--dense-epochs``); every method starts from a copy of it,
   and every training phase of a seed draws its mini-batches from a generator seeded with
   the seed, so all methods see the same batch order (paired seeds).
2. Tuning (phase ``val``): seeds ``--tune-seeds`` (disjoint from the test seeds), ratio 0.875,
   scored on the VALIDATION split at the same total budget of ``--budget`` epochs after the
   dense checkpoint. Every method gets a learning-rate grid; ADMM also gets its recipe
   variants (learning-rate restart or not, rounds x epochs, rho schedule, residual
   tolerance, progressive targets); then distillation from the dense model is tried on the
   chosen one-shot and ADMM settings and is switched on for EVERY method only if it helps both.
3. Final (phase ``test``): seeds ``--seeds``, ratios ``--ratios``, the chosen settings only;
   each (method, seed, ratio, fine-tuning epochs F) is one final configuration, trained
   from the dense checkpoint and scored on the TEST split once.

Methods (epochs after the dense checkpoint; ADMM's own epochs count):
* ``admm``    ``ADMM`` + ``AdmmSchedule`` (the pipeline's recipe code) for A epochs, hard
              prune, F epochs of masked retraining: total A + F;
* ``oneshot`` the same plan's ``plan.project`` + F epochs of masked fine-tuning;
* ``tp``      Torch-Pruning ``MagnitudePruner`` (L1), same layers, + F epochs of fine-tuning;
* ``scratch`` the pruned architecture, re-initialised, trained T epochs from scratch (the
              control: do the kept weights matter at all?).
Masked fine-tuning runs on the compacted model (``structadmm.compact``: the same function,
cheaper). Paired differences (ADMM minus each baseline, per seed, at equal total epochs) are
reported with a 95 % t-interval over seeds.

Writes benchmarks/results/accuracy_vs_baselines.{jsonl,json,md} and accuracy_vs_epochs.png.
The jsonl is the raw log (one line per finished job); the run continues from it when rerun.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing as mp
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

RESULTS = Path(__file__).parent / "results"
FS = (0, 1, 2, 4, 8, 16, 32)
TUNE_RATIO = 0.875

# the ADMM recipe variants tried on validation: "ref" is the reference-like recipe (4 rounds x 4 epochs,
# learning rate restarted every round, rho from 1e-3 growing 1.3x per round); "old-default" is the
# pipeline's schedule before this benchmark (8 x 2, one cosine over all rounds, rho 0.05 growing 1.6x)
BASE = dict(rounds=4, epochs=4, restart=True, rho=1e-3, rho_growth=1.3, rho_max=5.0, admm_lr=0.03, lr=0.03,
            tolerance=0.0, extra_rounds=0, ramp=0)
_OLD_RHO = {"rho": 0.05, "rho_growth": 1.6}
VARIANTS = {
    "ref": {},
    "rho1e-2": {"rho": 1e-2},
    "rho-old": _OLD_RHO,
    "rho-old-8x2": {**_OLD_RHO, "rounds": 8, "epochs": 2},
    "rho-old-no-restart": {**_OLD_RHO, "restart": False},
    "rho-old-tol": {**_OLD_RHO, "tolerance": 0.1, "extra_rounds": 4},
    "old-default": {**_OLD_RHO, "rounds": 8, "epochs": 2, "restart": False},
}
LR_GRID = {"oneshot": (0.03, 0.1), "tp": (0.03, 0.1), "scratch": (0.1, 0.3)}


# -- one job (runs in a worker process) --------------------------------------------------------
class Ctx:
    """Data and settings a worker needs, built once per process."""

    def __init__(self, args: dict[str, Any]):
        from structadmm.models.mnist1d import load_mnist1d_splits
        from structadmm.batches import make_loader

        torch.set_num_threads(args["threads"])
        self.args = args
        self.train, self.val, self.test = load_mnist1d_splits()
        self.loaders = {"val": make_loader(self.val, 1000, shuffle=False),
                        "test": make_loader(self.test, 1000, shuffle=False)}
        self.example = self.train.tensors[0][:8]
        self.cache = Path(args["cache"])
        self.fit = dict(momentum=0.9, weight_decay=args["weight_decay"])

    def build(self) -> nn.Module:
        from structadmm.models.zoo import mnist1d_cnn

        return mnist1d_cnn(width=self.args["width"])

    def batches(self, seed: int):
        from structadmm.batches import make_loader

        return make_loader(self.train, self.args["batch_size"], shuffle=True, seed=seed)

    def dense(self, seed: int) -> nn.Module:
        a = self.args
        path = self.cache / f"dense-w{a['width']}-s{seed}-e{a['dense_epochs']}-b{a['batch_size']}-lr{a['dense_lr']}.pt"
        if path.exists():
            state = torch.load(path, weights_only=True)
        else:
            from structadmm.pipeline.train import train_epochs

            torch.manual_seed(seed)
            model = self.build()
            train_epochs(model, self.batches(seed), a["dense_epochs"], lr=a["dense_lr"], **self.fit)
            state = model.state_dict()
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)
        model = self.build()
        model.load_state_dict(state)
        return model.eval()

    def plan(self, model: nn.Module, ratio: float):
        return uniform_plan(model, self.example, ratio)

    def score(self, model: nn.Module, split: str) -> float:
        from structadmm.pipeline.train import evaluate

        return evaluate(model, self.loaders[split])

    def finetune(self, small: nn.Module, seed: int, epochs: int, lr: float, teacher: nn.Module | None,
                 distill: float) -> nn.Module:
        from structadmm.pipeline.train import train_epochs

        torch.manual_seed(seed)
        small = copy.deepcopy(small)
        train_epochs(small, self.batches(seed), epochs, lr=lr, teacher=teacher, distill=distill, **self.fit)
        return small.eval()


_CTX: Ctx | None = None


def _init(args: dict[str, Any]) -> None:
    global _CTX
    _CTX = Ctx(args)


def _dense_job(seed: int) -> None:
    _CTX.dense(seed)


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One method at one ratio for one seed; scores every F (or T) of ``job['fs']`` on ``job['split']``."""
    from structadmm import compact

    ctx, t0 = _CTX, time.perf_counter()
    seed, ratio, split, method, cfg = job["seed"], job["ratio"], job["split"], job["method"], job["cfg"]
    dense = ctx.dense(seed)
    teacher = dense if cfg.get("distill", 0) > 0 else None
    distill = cfg.get("distill", 0.0)
    out: dict[str, Any] = {**job, "dense": ctx.score(dense, split), "scores": {}}
    if method in ("oneshot", "scratch"):
        model = copy.deepcopy(dense)
        ctx.plan(model, ratio).project(model)
        small = compact(model.eval(), ctx.example, lower=False)
        if method == "scratch":
            torch.manual_seed(seed)
            small = _reinit(small)
        offset = 0
    elif method == "tp":
        import peers

        small = peers.torch_pruning_magnitude(copy.deepcopy(dense), ctx.example, ratio, 1, keep_first=True).eval()
        offset = 0
    else:  # admm
        small, outcome = _admm(ctx, dense, seed, ratio, cfg)
        out["admm"] = outcome
        offset = outcome["epochs"]
    out["params"] = sum(p.numel() for p in small.parameters())
    fs = sorted({*job["fs"], *(t - offset for t in job.get("totals", ()) if t >= offset)})
    for f in fs:
        tuned = ctx.finetune(small, seed, f, cfg["lr"], teacher, distill) if f > 0 else small
        out["scores"][str(f)] = ctx.score(tuned, split)
    out["offset"] = offset
    out["seconds"] = time.perf_counter() - t0
    return out


def _reinit(model: nn.Module) -> nn.Module:
    from structadmm.models.zoo import init_weights

    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        if hasattr(m, "reset_running_stats"):
            m.reset_running_stats()
    return init_weights(model)


def uniform_plan(model: nn.Module, example: torch.Tensor, ratio: float):
    """The benchmark's plan: uniform filter pruning at ``ratio``, first conv and classifier whole, exact counts."""
    from structadmm import PruningPlan

    return PruningPlan.uniform(model, example, "filter", ratio, multiple=1, keep_ends=True)


def _admm(ctx: Ctx, dense: nn.Module, seed: int, ratio: float, cfg: dict[str, Any]) -> tuple[nn.Module, dict]:
    return admm_prune(ctx, dense, seed, ratio, cfg, ctx.batches(seed))


def admm_prune(ctx: Ctx, dense: nn.Module, seed: int, ratio: float, cfg: dict[str, Any], batches,
               **train: Any) -> tuple[nn.Module, dict]:
    """ADMM (``ADMM`` + ``AdmmSchedule``, recipe ``cfg``) on a copy of ``dense`` over the loader ``batches``,
    hard prune, compact: (the compacted model, the ADMM outcome with its epochs). ``train``: further
    ``train_epochs`` options (an ``objective``, ``as_deployed``, ``grad_clip``)."""
    from structadmm import ADMM, compact
    from structadmm.prune.admm import AdmmSchedule
    from structadmm.pipeline.train import train_epochs

    model = copy.deepcopy(dense).requires_grad_(True)
    plan = ctx.plan(model, ratio)
    admm = ADMM(model, plan, rho=cfg["rho"], rho_growth=cfg["rho_growth"], rho_max=max(cfg["rho_max"], cfg["rho"]),
                ramp_rounds=cfg["ramp"])
    schedule = AdmmSchedule(cfg["rounds"], cfg["epochs"], tolerance=cfg["tolerance"],
                            extra_rounds=cfg["extra_rounds"], restart=cfg["restart"])
    torch.manual_seed(seed)
    epochs = len(train_epochs(model, batches, schedule.max_epochs(), lr=cfg["admm_lr"],
                              **schedule.train_kwargs(admm), **ctx.fit, **train))
    admm.hard_prune()
    small = compact(model.eval(), ctx.example, lower=False)
    outcome = {**schedule.outcome(admm), "epochs": epochs,
               "residuals": [round(r.primal_residual, 5) for r in admm.history]}
    return small, outcome


# -- the driver ----------------------------------------------------------------------------------
def key_of(job: dict[str, Any]) -> str:
    return json.dumps({k: job[k] for k in ("phase", "seed", "ratio", "method", "name")}, sort_keys=True)


def run_jobs(jobs: list[dict[str, Any]], args: argparse.Namespace, log: Path) -> list[dict[str, Any]]:
    """Run the jobs not yet in ``log``, (ratio, seed) cells ``workers`` at a time (dense checkpoints first)."""
    done = {}
    if log.exists():
        for line in log.read_text().splitlines():
            row = json.loads(line)
            done[key_of(row)] = row
    todo = [j for j in jobs if key_of(j) not in done]
    print(f"{len(jobs) - len(todo)} of {len(jobs)} jobs already done; running {len(todo) if args.workers else 0}",
          flush=True)
    if todo and args.workers:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        with mp.get_context("spawn").Pool(args.workers, initializer=_init, initargs=(settings,)) as pool, \
                log.open("a") as fh:
            cells = list(dict.fromkeys((j["ratio"], j["seed"]) for j in todo))
            for group in (cells[i:i + args.workers] for i in range(0, len(cells), args.workers)):
                # dense checkpoints first, one per worker, so that workers never train the same one twice
                pool.map(_dense_job, sorted({seed for _, seed in group}), chunksize=1)
                for row in pool.imap_unordered(run_job, [j for j in todo if (j["ratio"], j["seed"]) in group]):
                    done[key_of(row)] = row
                    fh.write(json.dumps(row) + "\n")
                    fh.flush()
                    print(f"{row['phase']} s{row['seed']} r{row['ratio']} {row['method']}:{row['name']} "
                          f"{row['seconds']:.0f}s {row['scores']}", flush=True)
    return [done[key_of(j)] for j in jobs if key_of(j) in done]


def recipe(name: str, distill: float = 0.0) -> dict[str, Any]:
    return {**BASE, **VARIANTS[name], "distill": distill}


def tuning_jobs(args) -> list[dict[str, Any]]:
    jobs = []
    for seed in args.tune_seeds:
        common = dict(phase="val", split="val", seed=seed, ratio=TUNE_RATIO)
        for method in ("oneshot", "tp", "scratch"):
            for lr in LR_GRID[method]:
                jobs.append({**common, "method": method, "name": f"lr{lr}", "cfg": {"lr": lr, "distill": 0.0},
                             "fs": [args.budget]})
        for name in args.variants:
            jobs.append({**common, "method": "admm", "name": name, "cfg": recipe(name), "fs": [],
                         "totals": [args.budget]})
    return jobs


def mean_by(rows, method, f) -> dict[str, float]:
    names: dict[str, list[float]] = {}
    for r in rows:
        if r["method"] == method and str(f) in r["scores"]:
            names.setdefault(r["name"], []).append(r["scores"][str(f)])
    return {n: statistics.mean(v) for n, v in names.items() if len(v) == len({r["seed"] for r in rows})}


def choose(rows: list[dict[str, Any]], budget: int) -> dict[str, dict[str, Any]]:
    """The best setting of every method on validation accuracy at ``budget`` total epochs."""
    chosen = {}
    for method in ("oneshot", "tp", "scratch"):
        means = mean_by(rows, method, budget)
        best = max(means, key=means.get)
        chosen[method] = {"name": best, "cfg": {"lr": float(best[2:]), "distill": 0.0}, "val": means[best]}
    admm_means = {}
    for r in rows:
        if r["method"] == "admm":
            f = str(budget - r["offset"])
            if f in r["scores"]:
                admm_means.setdefault(r["name"], []).append(r["scores"][f])
    admm_means = {n: statistics.mean(v) for n, v in admm_means.items()}
    best = max(admm_means, key=admm_means.get)
    chosen["admm"] = {"name": best, "cfg": recipe(best), "val": admm_means[best]}
    chosen["_all"] = {"admm": admm_means, **{m: mean_by(rows, m, budget) for m in ("oneshot", "tp", "scratch")}}
    return chosen


def distill_jobs(args, chosen) -> list[dict[str, Any]]:
    jobs = []
    for seed in args.tune_seeds:
        common = dict(phase="val", split="val", seed=seed, ratio=TUNE_RATIO)
        for method in ("oneshot", "admm"):
            cfg = {**chosen[method]["cfg"], "distill": args.distill}
            jobs.append({**common, "method": method, "name": chosen[method]["name"] + f"+kd{args.distill}",
                         "cfg": cfg, **({"fs": [], "totals": [args.budget]} if method == "admm" else {"fs": [args.budget]})})
    return jobs


def final_jobs(args, chosen, distill: float) -> list[dict[str, Any]]:
    jobs = []
    # the tuning ratio first, with the whole F curve, then the others at the points the goals name
    for ratio in sorted(args.ratios, key=lambda r: r != TUNE_RATIO):
        for seed in args.seeds:
            common = dict(phase="test", split="test", seed=seed, ratio=ratio)
            curve = list(args.fs) if ratio == TUNE_RATIO else [f for f in (0, 8, 16, 32) if f <= max(args.fs)]
            for method in ("admm", "oneshot", "tp", "scratch"):
                cfg = {**chosen[method]["cfg"], "distill": distill}
                fs = {"oneshot": curve, "tp": curve, "admm": [f for f in curve if f <= 8],
                      "scratch": [t for t in args.totals if t > 0]}[method]
                totals = list(args.totals) if method == "admm" else []
                jobs.append({**common, "method": method, "name": chosen[method]["name"] + (f"+kd{distill}" if distill else ""),
                             "cfg": cfg, "fs": fs, "totals": totals})
    return jobs


# -- statistics and outputs ------------------------------------------------------------------------
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 19: 2.093, 29: 2.045}


def ci95(values: list[float]) -> tuple[float, float, float]:
    n = len(values)
    mean = statistics.mean(values)
    if n < 2:
        return mean, float("nan"), float("nan")
    half = T975.get(n - 1, 1.96) * statistics.stdev(values) / math.sqrt(n)
    return mean, mean - half, mean + half


def curves(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per ratio and method: {total epochs: [accuracy per seed]} and {F: [...]} (seed order kept)."""
    out: dict[str, Any] = {}
    for r in rows:
        per = out.setdefault(str(r["ratio"]), {}).setdefault(r["method"], {"by_f": {}, "by_total": {}})
        for f, acc in r["scores"].items():
            per["by_f"].setdefault(f, {})[r["seed"]] = acc
            per["by_total"].setdefault(str(int(f) + r["offset"]), {})[r["seed"]] = acc
    return out


def paired(c: dict[str, Any], ratio: str, a: tuple[str, str, str], b: tuple[str, str, str]) -> dict[str, Any] | None:
    """ADMM minus a baseline, per seed: a/b are (method, 'by_f' or 'by_total', key)."""
    try:
        xa, xb = c[ratio][a[0]][a[1]][a[2]], c[ratio][b[0]][b[1]][b[2]]
    except KeyError:
        return None
    seeds = sorted(set(xa) & set(xb))
    if not seeds:
        return None
    diffs = [100 * (xa[s] - xb[s]) for s in seeds]
    mean, lo, hi = ci95(diffs)
    return {"a": list(a), "b": list(b), "n": len(seeds), "mean_pt": mean, "ci95_pt": [lo, hi],
            "a_mean": 100 * statistics.mean(xa[s] for s in seeds), "b_mean": 100 * statistics.mean(xb[s] for s in seeds)}


def summarise(rows, chosen, distill, args) -> dict[str, Any]:
    c = curves(rows)
    admm_epochs = {str(r["ratio"]): r["offset"] for r in rows if r["method"] == "admm"}
    comparisons = []
    for ratio in map(str, args.ratios):
        if ratio not in c or "admm" not in c[ratio]:
            continue
        a_off = admm_epochs[ratio]
        for total in sorted({int(t) for t in c[ratio]["admm"]["by_total"]}):
            for base in ("oneshot", "tp", "scratch"):
                key = "by_f" if base != "scratch" else "by_f"
                if str(total) in c[ratio].get(base, {}).get(key, {}):
                    p = paired(c, ratio, ("admm", "by_total", str(total)), (base, key, str(total)))
                    if p:
                        comparisons.append({"ratio": float(ratio), "kind": "equal total epochs", "total": total,
                                            "admm_f": total - a_off, **p})
        for base in ("oneshot", "tp"):  # the fine-tuning budget goal: ADMM F=0 against baselines at F=8
            p = paired(c, ratio, ("admm", "by_f", "0"), (base, "by_f", "8"))
            if p:
                comparisons.append({"ratio": float(ratio), "kind": "ADMM F=0 vs baseline F=8", **p})
    means = {ratio: {m: {kind: {k: 100 * statistics.mean(v.values()) for k, v in d.items()}
                         for kind, d in per.items()} for m, per in ms.items()} for ratio, ms in c.items()}
    dense = {}
    for r in rows:
        dense.setdefault(r["seed"], r["dense"])
    return {"chosen": chosen, "distill": distill, "comparisons": comparisons, "mean_accuracy_pt": means,
            "dense_test_accuracy_pt": ci95([100 * v for v in dense.values()]), "curves": c,
            "admm_outcomes": [{"ratio": r["ratio"], "seed": r["seed"], **r["admm"]} for r in rows if r["method"] == "admm"],
            "params": {f"{r['ratio']}:{r['method']}": r["params"] for r in rows}}


def write_markdown(summary: dict[str, Any], args, path: Path) -> None:
    lines = ["# StructADMM against simpler pruning on MNIST-1D (fair protocol)", "",
             f"Command: `python benchmarks/accuracy_vs_baselines.py {' '.join(sys.argv[1:])}`", "",
             f"Model mnist1d_cnn(width={args.width}); dense {args.dense_epochs} epochs; test seeds {args.seeds}; "
             f"tuning seeds {args.tune_seeds} on the validation split at ratio {TUNE_RATIO}, budget {args.budget} epochs.",
             "", f"Dense test accuracy: {summary['dense_test_accuracy_pt'][0]:.2f} % "
             f"(95 % CI {summary['dense_test_accuracy_pt'][1]:.2f}-{summary['dense_test_accuracy_pt'][2]:.2f}).", "",
             "## Settings chosen on validation", "", "| method | chosen | validation acc. |", "|---|---|---|"]
    for m in ("admm", "oneshot", "tp", "scratch"):
        ch = summary["chosen"][m]
        lines.append(f"| {m} | {ch['name']} | {100 * ch['val']:.2f} % |")
    lines += ["", f"Distillation in the final runs: {summary['distill'] or 'off'} "
              f"(validation: {summary['chosen'].get('_distill', {})})", "",
              "All validation means (ratio 0.875):", "", "```", json.dumps(summary["chosen"]["_all"], indent=1), "```",
              "", "## Paired differences on the test split (ADMM minus baseline, points, 95 % CI over seeds)", "",
              "| ratio | comparison | ADMM | baseline | ADMM % | baseline % | diff (pt) | 95 % CI | n |",
              "|---|---|---|---|---|---|---|---|---|"]
    for p in summary["comparisons"]:
        what = p["kind"] + (f" {p['total']}" if "total" in p else "")
        lines.append(f"| {p['ratio']} | {what} | {p['a'][1]}={p['a'][2]} | {p['b'][0]} {p['b'][1]}={p['b'][2]} | "
                     f"{p['a_mean']:.2f} | {p['b_mean']:.2f} | {p['mean_pt']:+.2f} | "
                     f"[{p['ci95_pt'][0]:+.2f}, {p['ci95_pt'][1]:+.2f}] | {p['n']} |")
    lines += ["", "## Mean test accuracy (%) by fine-tuning epochs F (ADMM: after its own epochs)", ""]
    for ratio, ms in summary["mean_accuracy_pt"].items():
        fs = sorted({int(f) for kinds in ms.values() for f in kinds["by_f"]})
        lines.append(f"ratio {ratio} (scratch: F is its total epochs T):")
        lines.append("")
        lines.append("| method | " + " | ".join(f"F={f}" for f in fs) + " |")
        lines.append("|---|" + "---|" * len(fs))
        for m, kinds in ms.items():
            lines.append(f"| {m} | " + " | ".join(f"{kinds['by_f'][str(f)]:.2f}" if str(f) in kinds["by_f"] else "-"
                                                for f in fs) + " |")
        lines.append("")
    outs = summary["admm_outcomes"]
    if outs:
        lines += ["## ADMM residuals", "", "| ratio | seed | rounds | extra | final primal residual | converged |",
                  "|---|---|---|---|---|---|"]
        for o in outs:
            lines.append(f"| {o['ratio']} | {o['seed']} | {o['rounds']} | {o['extra_rounds']} | "
                         f"{o['primal_residual']:.4f} | {o['converged']} |")
    path.write_text("\n".join(lines) + "\n")


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = list(summary["mean_accuracy_pt"])
    fig, axes = plt.subplots(2, len(ratios), figsize=(4.5 * len(ratios), 7), squeeze=False)
    for col, ratio in enumerate(ratios):
        for row, kind in enumerate(("by_f", "by_total")):
            ax = axes[row][col]
            for m, kinds in summary["mean_accuracy_pt"][ratio].items():
                if kind == "by_f" and m == "scratch":
                    continue
                pts = sorted((int(k), v) for k, v in kinds[kind].items())
                ax.plot([max(x, 0.5) for x, _ in pts], [y for _, y in pts], marker="o", label=m)
            ax.set_xscale("log", base=2)
            ax.set_title(f"ratio {ratio}")
            ax.set_xlabel("fine-tuning epochs F (0 plotted at 0.5)" if kind == "by_f"
                          else "total epochs after the dense checkpoint")
            ax.set_ylabel("test accuracy (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--tune-seeds", type=int, nargs="+", default=[100, 101])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.75, 0.875, 0.9375])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--dense-epochs", type=int, default=20)
    parser.add_argument("--dense-lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--budget", type=int, default=32, help="total epochs after the dense checkpoint, for tuning")
    parser.add_argument("--distill", type=float, default=0.5,
                        help="distillation weight tried on validation (0: not tried, off for every method)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="the ADMM recipe variants tried on validation")
    parser.add_argument("--fs", type=int, nargs="+", default=list(FS),
                        help="fine-tuning epochs F of the curves at the tuning ratio")
    parser.add_argument("--totals", type=int, nargs="+", default=[16, 32],
                        help="total epochs after the dense checkpoint at which ADMM meets the baselines")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--phase", choices=("val", "all", "report"), default="all",
                        help="report: summarise the finished jobs of the log without running more")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--cache", type=Path, default=RESULTS / "cache")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "accuracy_vs_baselines.jsonl"

    if args.phase == "report":
        args.workers = 0
    tuned = run_jobs(tuning_jobs(args), args, log)
    chosen = choose(tuned, args.budget)
    distill = 0.0
    if args.distill > 0:  # --distill 0: not tried, off for every method
        kd_rows = run_jobs(distill_jobs(args, chosen), args, log)
        kd = {}
        for m in ("oneshot", "admm"):
            rows = [r for r in kd_rows if r["method"] == m]
            kd[m] = statistics.mean(r["scores"][str(args.budget - r["offset"] if m == "admm" else args.budget)]
                                    for r in rows)
        distill = args.distill if all(kd[m] > chosen[m]["val"] for m in kd) else 0.0
        chosen["_distill"] = {m: {"without": chosen[m]["val"], "with": kd[m]} for m in kd}
    print("chosen on validation:", json.dumps(chosen, indent=1), "distill:", distill, flush=True)
    if args.phase == "val":
        return
    final = run_jobs(final_jobs(args, chosen, distill), args, log)
    summary = summarise(final, chosen, distill, args)
    summary["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    summary["machine"] = {"python": platform.python_version(), "torch": torch.__version__}
    (args.out / "accuracy_vs_baselines.json").write_text(json.dumps(summary, indent=1))
    write_markdown(summary, args, args.out / "accuracy_vs_baselines.md")
    plot(summary, args.out / "accuracy_vs_epochs.png")
    print((args.out / "accuracy_vs_baselines.md").read_text())


if __name__ == "__main__":
    main()

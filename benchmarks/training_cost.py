"""What ADMM adds to training: penalty per SGD step and the amortised Z/U round.

    .venv/bin/python benchmarks/training_cost.py
    # the defaults, spelled out:
    .venv/bin/python benchmarks/training_cost.py --models digits-cnn resnet20 --steps 60 \
        --updates 15 --steps-between-updates 46 --ratio 0.5 --threads 1

For each model, in ONE process with both variants interleaved (order alternating every
round, so machine drift and the other load on a shared machine cancel):

* ``plain``  one SGD step: forward, cross-entropy, zero_grad, backward, optimizer.step;
* ``admm``   the same step with ``loss + admm.penalty()`` (the ADMM W-step);
* ``update`` one ``admm.update()`` (Z-step projection, U-step, residuals, rho growth),
  amortised over ``--steps-between-updates`` steps (default 46 = 2 epochs of 23 steps of
  the digits training set at batch 64, the library's default ``admm_epochs=2``).

overhead = (median admm step - median plain step + median update / steps between updates)
/ median plain step; the bar is <= 15 %. Also timed, to say where time goes: the penalty's
forward alone, its forward + backward alone, and the plan's projection (``plan.masks_for``,
the heart of ``update()``) alone.

Models: ``digits-cnn`` on real digits batches of 64 (1x16x16), ``resnet20`` from the zoo on
random 3x32x32 batches of 32; plan ``PruningPlan.uniform(model, x, "filter", --ratio)``.
Writes benchmarks/results/training_cost.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from structadmm import ADMM, PruningPlan
from structadmm.bench.latency import median_interval
from structadmm.files import write_atomic
from structadmm.models import get_spec, load_digits_split

RESULTS = Path(__file__).parent / "results"
BATCH = {"digits-cnn": 64, "resnet20": 32}
BUDGET = 0.15


def batches(name: str, batch: int, count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    if name == "digits-cnn":
        x, y = load_digits_split()[0].tensors
        out = []
        for _ in range(count):
            idx = torch.randint(len(y), (batch,), generator=gen)
            out.append((x[idx], y[idx]))
        return out
    spec = get_spec(name)
    return [(torch.randn((batch, *spec.input_shape), generator=gen),
             torch.randint(spec.num_classes, (batch,), generator=gen)) for _ in range(count)]


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    spec = get_spec(name)
    model = spec.build().train()
    batch = args.batch or BATCH.get(name, 32)
    data = batches(name, batch, 8, args.seed)
    plan = PruningPlan.uniform(model, data[0][0][:8], "filter", args.ratio)
    admm = ADMM(model, plan)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    counter = iter(range(10**9))

    def step(with_penalty: bool) -> None:
        x, y = data[next(counter) % len(data)]
        loss = F.cross_entropy(model(x), y)
        if with_penalty:
            loss = loss + admm.penalty()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup):
        step(False), step(True)
    admm.update()  # non-zero U from here on, as in every round but the first

    plain, penalised = [], []
    for i in range(args.steps):  # round i: one step of each kind, the order alternating
        first, second = (False, True) if i % 2 == 0 else (True, False)
        t1 = timed(lambda: step(first))
        t2 = timed(lambda: step(second))
        (plain if not first else penalised).append(t1)
        (plain if not second else penalised).append(t2)
    per_round = median_interval([a / p - 1 for a, p in zip(penalised, plain)])  # the penalty's cost, round by round

    # the pieces, also interleaved with a plain step so they see the same machine state
    updates, projection, pen_fwd, pen_fwd_bwd = [], [], [], []
    params = admm.params
    for _ in range(args.updates):
        step(True)
        updates.append(timed(admm.update))
        projection.append(timed(lambda: plan.masks_for({n: p.detach() + admm.U[n] for n, p in params.items()})))
        pen_fwd.append(timed(lambda: admm.penalty()))
        optimizer.zero_grad(set_to_none=True)
        pen_fwd_bwd.append(timed(lambda: admm.penalty().backward()))

    med = statistics.median
    plain_ms, admm_ms = 1e3 * med(plain), 1e3 * med(penalised)
    update_ms = 1e3 * med(updates)
    amortised_ms = update_ms / args.steps_between_updates
    overhead = (admm_ms - plain_ms + amortised_ms) / plain_ms
    n_params = sum(p.numel() for p in model.parameters())
    n_penalised = sum(p.numel() for p in params.values())
    row = {
        "model": name, "batch": batch, "input_shape": list(spec.input_shape),
        "params": n_params, "penalised_params": n_penalised, "penalised_tensors": len(params),
        "plan_units": len(plan.units),
        "plain_step_ms": plain_ms, "admm_step_ms": admm_ms,
        "plain_step_p90_ms": 1e3 * _p90(plain), "admm_step_p90_ms": 1e3 * _p90(penalised),
        "penalty_overhead": (admm_ms - plain_ms) / plain_ms,
        "penalty_overhead_per_round": statistics.median(a / p - 1 for a, p in zip(penalised, plain)),
        "penalty_overhead_interval": [per_round.low, per_round.high], "interval_coverage": per_round.coverage,
        "update_ms": update_ms, "steps_between_updates": args.steps_between_updates,
        "update_amortised_ms": amortised_ms, "update_overhead": amortised_ms / plain_ms,
        "overhead": overhead, "ok": overhead <= BUDGET,
        "breakdown_ms": {"penalty_forward": 1e3 * med(pen_fwd), "penalty_forward_backward": 1e3 * med(pen_fwd_bwd),
                         "projection_masks_for": 1e3 * med(projection), "update_total": update_ms},
        "timed_steps_each": len(plain), "timed_updates": len(updates),
    }
    print(json.dumps(row), flush=True)
    return row


def _per_round(row: dict[str, Any]) -> str:
    if "penalty_overhead_interval" not in row:  # written before it was recorded
        return "n/a"
    low, high = row["penalty_overhead_interval"]
    return (f"{100 * row['penalty_overhead_per_round']:+.1f} % ({100 * low:+.1f} to {100 * high:+.1f} %, "
            f"{100 * row['interval_coverage']:.1f} %)")


def _p90(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(0.9 * len(values)))]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits-cnn", "resnet20"])
    parser.add_argument("--batch", type=int, default=None, help="default: 64 for digits-cnn, 32 otherwise")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=60, help="timed steps of each kind")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--updates", type=int, default=15, help="timed admm.update() calls")
    parser.add_argument("--steps-between-updates", type=int, default=46)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(name, args) for name in args.models]
    result = {
        "what": "ADMM training overhead per SGD step (penalty + amortised Z/U update), medians, interleaved",
        "command": " ".join(["python benchmarks/training_cost.py", *(sys.argv[1:] if argv is None else argv)]),
        "budget": BUDGET, "settings": vars(args), "results": rows,
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "machine": platform.machine(), "threads": torch.get_num_threads()},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "training_cost.json", json.dumps(result, indent=2) + "\n")
    write_atomic(out / "training_cost.md", _markdown(result))
    print(_markdown(result))
    return result


def _markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        "# ADMM training cost (CPU, torch "
        f"{result['versions']['torch']}, {s['threads']} thread(s), filter ratio {s['ratio']})", "",
        f"Median of {s['steps']} steps of each kind, plain and ADMM interleaved in one process (in-process by "
        "nature: the two steps train one model); per round = the median of the per-round penalty costs (one step of "
        "each kind per round) with its distribution-free interval and coverage, optimistic since consecutive steps "
        "in one process are not independent; "
        f"`admm.update()` median of {s['updates']} calls, amortised over {s['steps_between_updates']} steps. "
        f"Budget: total overhead <= {100 * result['budget']:.0f} %.", "",
        "| model | batch | plain step | ADMM step | penalty overhead | per round (interval, coverage) | update() "
        "| amortised | update overhead | total overhead | ok |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['plain_step_ms']:.2f} ms | {r['admm_step_ms']:.2f} ms "
            f"| {100 * r['penalty_overhead']:+.1f} % | {_per_round(r)} | {r['update_ms']:.2f} ms "
            f"| {r['update_amortised_ms']:.3f} ms "
            f"| {100 * r['update_overhead']:.2f} % | {100 * r['overhead']:+.1f} % | {'yes' if r['ok'] else 'NO'} |")
    lines += ["", "Where the time goes (medians, ms):", "",
              "| model | penalised tensors / weights | penalty fwd | penalty fwd+bwd | projection (masks_for) | update() |",
              "|---|---|---|---|---|---|"]
    for r in result["results"]:
        b = r["breakdown_ms"]
        lines.append(f"| {r['model']} | {r['penalised_tensors']} / {r['penalised_params']:,} | {b['penalty_forward']:.3f} "
                     f"| {b['penalty_forward_backward']:.3f} | {b['projection_masks_for']:.2f} | {b['update_total']:.2f} |")
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

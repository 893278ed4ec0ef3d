"""The whole pipeline in one call: train → ADMM → hard prune → masked retrain → surgery →
ONNX export → ONNX Runtime benchmark → report.

Each stage is a library call of its own (plan.py, admm.py, masks.py, surgery.py,
exporters, bench); this module only wires them together and owns the run folder, which is
written under a temporary name and renamed into place when everything has passed, so a
failed or interrupted run never leaves a half-written folder where a finished one should be.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress
from torch import nn

from ..errors import StructADMMError
from .admm import ADMM, AdmmRound
from .config import CompressConfig
from .masks import apply_masks, sparsity_of
from .plan import Masks, PruningPlan
from .surgery import GroupCut, compact_with_report
from .train import Data, evaluate, first_batch, make_loader, train_epochs


@dataclass
class CompressResult:
    """What :func:`compress` produced: the small model, the run folder and its figures."""

    model: nn.Module  # the compacted, physically smaller model
    masks: Masks
    run_dir: Path
    report: dict[str, Any]
    admm_history: list[AdmmRound] = field(default_factory=list)

    @property
    def dense_onnx(self) -> Path:
        return self.run_dir / "dense.onnx"

    @property
    def pruned_onnx(self) -> Path:
        return self.run_dir / "pruned.onnx"


def compress(
    model: nn.Module,
    train_data: Data,
    val_data: Data | None,
    config: CompressConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    model_name: str | None = None,
    progress: Progress | None = None,
) -> CompressResult:
    """Run the whole pipeline on ``model`` and write the run folder (see module docstring).

    ``train_data``/``val_data``: a Dataset, a DataLoader or an ``(x, y)`` pair. ``model`` is
    trained in place (dense phase) and a pruned copy is returned in the result.
    """
    config = config or CompressConfig()
    name = model_name or type(model).__name__
    run_dir = _new_run_dir(out_dir, name)
    staging = run_dir.with_name(f".{run_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        result = _run(model, train_data, val_data, config, name, staging, progress)
        os.replace(staging, run_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    result.run_dir = run_dir
    return result


def _new_run_dir(out_dir: str | Path | None, name: str) -> Path:
    if out_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out_dir = Path("runs") / f"{stamp}-{name}"
    run_dir = Path(out_dir)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise StructADMMError(f"output folder {run_dir} already exists and is not empty; choose a new --out")
    if run_dir.exists():
        run_dir.rmdir()  # an empty folder is replaced atomically at the end
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        probe = run_dir.parent / f".{run_dir.name}.probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise StructADMMError(f"cannot write to {run_dir.parent}: {exc.strerror or exc}") from None
    return run_dir


def _run(model: nn.Module, train_data: Data, val_data: Data | None, config: CompressConfig, name: str,
         out: Path, progress: Progress | None) -> CompressResult:
    from ..bench import benchmark, write_report
    from ..exporters import count_onnx, export_onnx, verify_onnx

    torch.manual_seed(config.seed)
    device = config.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise StructADMMError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    train = make_loader(train_data, config.batch_size, shuffle=True, seed=config.seed)
    val = make_loader(val_data, 256, shuffle=False) if val_data is not None else None
    example = first_batch(train, 8)
    fit = dict(momentum=config.momentum, weight_decay=config.weight_decay, device=device, progress=progress)
    timings: dict[str, float] = {}

    start = time.perf_counter()
    train_epochs(model, train, config.dense_epochs, lr=config.lr, description="dense training", **fit)
    timings["dense_training_s"] = time.perf_counter() - start
    model.cpu().eval()
    dense_acc = evaluate(model, val) if val is not None else None
    export_onnx(model, example, out / "dense.onnx")

    plan = (PruningPlan.from_file(model, example, config.plan) if config.plan
            else PruningPlan.uniform(model, example, config.sparsity, config.ratio))
    if not plan.units:
        reasons = "; ".join(f"{layer}: {why}" for layer, why in plan.skipped[:3]) or "no Conv/Linear layers"
        raise StructADMMError(f"nothing in {name} can be pruned with this plan ({reasons})")

    start = time.perf_counter()
    admm = ADMM(model, plan, rho=config.rho, rho_growth=config.rho_growth, rho_max=config.rho_max)
    train_epochs(
        model, train, config.admm_rounds * config.admm_epochs, lr=config.admm_lr, penalty=admm.penalty,
        after_epoch=lambda epoch: admm.update() if (epoch + 1) % config.admm_epochs == 0 else None,
        description="ADMM", **fit,
    )
    timings["admm_s"] = time.perf_counter() - start
    model.cpu()
    masks = admm.hard_prune()
    hard_pruned_acc = evaluate(model, val) if val is not None else None

    start = time.perf_counter()
    guard = apply_masks(model, masks)
    train_epochs(model, train, config.retrain_epochs, lr=config.retrain_lr, after_step=guard.enforce,
                 description="masked retraining", **fit)
    model.cpu()
    guard.enforce()
    guard.remove()
    timings["retrain_s"] = time.perf_counter() - start
    model.eval()

    small, cuts = compact_with_report(model, example)
    pruned_acc = evaluate(small, val) if val is not None else None
    export_onnx(small, example, out / "pruned.onnx")
    # the exported file against the masked model it came from, on held-out inputs
    check_inputs = first_batch(val, 64) if val is not None else example
    parity = verify_onnx(model, out / "pruned.onnx", check_inputs)

    dense_cost, pruned_cost = count_onnx(out / "dense.onnx"), count_onnx(out / "pruned.onnx")
    mac_ratio = dense_cost.macs / max(pruned_cost.macs, 1)
    latency = benchmark(
        {"dense": out / "dense.onnx", "pruned": out / "pruned.onnx"},
        batch_sizes=config.bench_batches, threads=config.bench_threads,
        min_runs=config.bench_min_runs, min_seconds=config.bench_min_seconds, seed=config.seed,
    )
    report = {
        "model": name,
        "dense": {"accuracy": dense_acc, "macs": dense_cost.macs, "params": dense_cost.params, "onnx": "dense.onnx"},
        "pruned": {"accuracy": pruned_acc, "macs": pruned_cost.macs, "params": pruned_cost.params,
                   "onnx": "pruned.onnx", "hard_pruned_accuracy": hard_pruned_acc,
                   "weight_sparsity": sparsity_of(masks)},
        "mac_ratio": mac_ratio,
        "param_ratio": dense_cost.params / max(pruned_cost.params, 1),
        "parity": {"max_abs_diff": parity, "ok": True},
        "latency": latency.to_rows(dense="dense", pruned="pruned", mac_ratio=mac_ratio),
        "skipped_providers": [{"provider": p, "reason": r} for p, r in latency.skipped],
        "admm": [r.__dict__ for r in admm.history],
        "groups": [cut.__dict__ for cut in cuts],
        "left_alone": [{"layer": layer, "reason": why} for layer, why in plan.skipped],
        "timings": timings,
        "config": config.to_dict(),
        "seed": config.seed,
        "versions": _versions(),
    }
    write_report(out, report)
    return CompressResult(small, masks, out, json.loads(json.dumps(report)), admm.history)


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    from .. import __version__

    return {"structadmm": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": str(os.cpu_count())}


def compress_default(config: CompressConfig | None = None, *, out_dir: str | Path | None = None,
                     progress: Progress | None = None) -> CompressResult:
    """The embedded default: the built-in digits CNN on scikit-learn's digits."""
    from ..models import get_spec, load_digits_split

    config = config or CompressConfig()
    torch.manual_seed(config.seed)
    spec = get_spec("digits-cnn")
    train, test = load_digits_split(seed=config.seed)
    return compress(spec.build(), train, test, config, out_dir=out_dir,
                    model_name=spec.name, progress=progress)

"""The whole pipeline in one call, as a list of stages (:mod:`.stages`):

    plan → dense training → final plan (budget) → reach check → teacher → earlier ADMM stages
    → ADMM + hard prune → masked retraining  ║  compact → export + parity → INT8 → benchmark → report

The stages left of ║ run on every rank and checkpoint as they go; those right of it run on rank 0
and write the run folder. :func:`compact_run` is the conversion stage alone (the right-hand list
after exporting the model as given) for a model pruned in the caller's own loop.

This module owns what lies around the stages: the data check before anything is written, the run
folder, written under a temporary name and renamed into place when everything has passed (so a
failed or interrupted run never leaves a half-written folder where a finished one should be),
resuming from the checkpoint (:mod:`.checkpoint`), and torchrun (:mod:`.distributed`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from rich.progress import Progress
from torch import nn
from torch.utils.data import DataLoader

from ..batches import Data, make_loader
from ..errors import StructADMMError
from ..models.validate import check_data
from ..prune.admm import AdmmRound
from ..prune.plan import Masks
from . import distributed
from .checkpoint import ResumeMismatch, RunFolder, RunState, final_of, phases_of, run_identity, staging_of
from .config import CompressConfig
from .objective import OutputLoss, resolve_objective
from .stages import CONVERTING, PUBLISHING, TRAINING, Carry, Run, run_stages


@dataclass
class CompressResult:
    """What :func:`compress` produced: the small model, the run folder and its figures."""

    model: nn.Module  # the compacted, physically smaller model (under torchrun, ranks > 0: the masked one)
    masks: Masks
    run_dir: Path
    report: dict[str, Any]
    admm_history: list[AdmmRound] = field(default_factory=list)  # empty when the masks came one-shot
    rank: int = 0  # under torchrun, this process's rank; only rank 0 wrote the run folder

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
    resume: bool = False,
    dense_onnx: str | Path | None = None,
    loss: OutputLoss | None = None,
    metric: Callable[[nn.Module, DataLoader], float] | None = None,
) -> CompressResult:
    """Run the whole pipeline on ``model`` and write the run folder (see module docstring).

    ``train_data``/``val_data``: a Dataset, a DataLoader, an ``(x, y)`` pair or inputs alone
    (samples ``(x,)``, e.g. ``TensorDataset(x)``: unlabeled data). ``model`` is
    trained in place (it ends masked, not compacted) and a pruned copy is returned in the result.
    The data is checked first (:func:`structadmm.models.validate.check_data`): data the model cannot learn
    from raises :class:`StructADMMError` before any training and before anything is written.

    ``dense_onnx``: the user's own ONNX file ``model`` was converted from
    (:func:`~structadmm.models.onnx_input.load_onnx_model`). It is the dense baseline, copied as
    ``dense.onnx`` and timed as given, and ``pruned.onnx`` keeps its input and output names,
    dtypes and dynamic axes (a drop-in replacement).

    What training minimises is ``config.objective`` (:mod:`.objective`): ``"labels"``, ``"distill"``
    (the model as given is the teacher and every output is matched; no labels needed and no dense
    training) or ``"auto"`` (distil when the data has no labels or the model is not a classifier).
    ``loss(student_outputs, teacher_outputs, inputs)`` replaces the distillation terms (and means
    distillation); ``metric(model, val_loader) -> float`` replaces top-1 accuracy as the held-out
    score in the report. Either way the report gives pruned.onnx's fidelity to dense.onnx.

    ``resume=True`` continues the interrupted run whose folder is ``out_dir`` from its last
    checkpoint; model, data, config and process count must be the ones it was started with.
    Under torchrun every rank calls this: the ranks train together (``batch_size`` is the
    global batch), and rank 0 alone writes the run folder, evaluates, compacts, exports and
    benchmarks; every rank gets the report.
    """
    config = config or CompressConfig()
    name = model_name or type(model).__name__
    ctx = distributed.setup(config.device)
    try:
        # what training minimises, and the data checked for it, before anything is written (runs/ included)
        mode = resolve_objective(config.objective, model, train_data, loss)
        distributed.on_main(lambda: check_data(model, train_data, val_data, model_name=name,
                                               labels=mode == "labels" if mode else config.objective == "labels"),
                            ctx)
        mode = mode or resolve_objective(config.objective, model, train_data, loss)
        identity = run_identity(config.to_dict(), name, model, _sample_count(train_data), ctx.world_size)
        run_dir = distributed.on_main(lambda: _run_dir(out_dir, name, resume), ctx)
        folder = RunFolder(run_dir) if ctx.is_main else None  # only rank 0 touches the disk
        resumed = distributed.on_main(lambda: folder.resume(identity) if resume else folder.create(), ctx)
        try:
            result = _train_and_publish(model, config, name, ctx, run_dir, folder, identity, resumed, train_data,
                                        val_data, progress, Path(dense_onnx) if dense_onnx is not None else None,
                                        mode, loss, metric)
        except KeyboardInterrupt:
            if folder is not None:
                folder.keep_if_resumable()  # a deliberate stop: --resume picks it up
            raise
        except ResumeMismatch:  # resumed with other inputs: the interrupted run stays as it was
            if folder is not None:
                folder.release()
            raise
        except OSError as exc:  # a full disk, a folder that vanished: the user's to fix
            if folder is not None:
                folder.discard()
            raise StructADMMError(f"cannot write {exc.filename or run_dir}: {exc.strerror or exc}") from exc
        except BaseException:
            if folder is not None:
                folder.discard()
            raise
    finally:
        distributed.teardown(ctx)
    return result


def _train_and_publish(model: nn.Module, config: CompressConfig, name: str, ctx: distributed.DistContext,
                       run_dir: Path, folder: RunFolder | None, identity: dict[str, Any],
                       resumed: dict[str, Any] | None, train_data: Data, val_data: Data | None,
                       progress: Progress | None, dense_onnx: Path | None, mode: str, loss: OutputLoss | None,
                       metric: Callable[[nn.Module, DataLoader], float] | None) -> CompressResult:
    """The run as its list of stages: every rank trains, rank 0 alone publishes."""
    run = Run.start(model, config, name, ctx, run_dir, folder, staging_of(run_dir), identity, resumed,
                    train_data, val_data, phases=phases_of(len(config.stage_ratios())), progress=progress,
                    dense_onnx=dense_onnx, mode=mode, loss=loss, metric=metric)
    trained = run_stages(TRAINING, run)
    published: list[Carry] = []  # rank 0's; the other ranks get the report alone (it is broadcast)

    def publish() -> dict[str, Any]:
        published.append(run_stages(PUBLISHING, run, trained))
        return published[0].report

    report = distributed.on_main(publish, ctx)
    small = published[0].small if published else model  # ranks > 0: the masked model
    history = trained.admm.history if trained.admm is not None else []  # none for a one-shot run
    return CompressResult(small, trained.masks, run_dir, report, history, ctx.rank)


def _run_dir(out_dir: str | Path | None, name: str, resume: bool) -> Path:
    if not resume:
        return _new_run_dir(out_dir, name)
    if out_dir is None:
        raise StructADMMError("resuming needs the folder of the interrupted run (its --out); give it")
    return final_of(Path(out_dir))


def _sample_count(data: Data) -> int | None:
    source = data.dataset if isinstance(data, DataLoader) else data[0] if isinstance(data, tuple) else data
    try:
        return len(source)
    except TypeError:  # an iterable dataset without a length
        return None


def _new_run_dir(out_dir: str | Path | None, name: str) -> Path:
    if out_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out_dir = Path("runs") / f"{stamp}-{name}"
    run_dir = Path(out_dir)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise StructADMMError(f"output folder {run_dir} already exists and is not empty; choose a new --out")
    # an existing empty folder stays until the finished run is renamed onto it (rename replaces it)
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        probe = run_dir.parent / f".{run_dir.name}.probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise StructADMMError(f"cannot write to {run_dir.parent}: {exc.strerror or exc}") from None
    return run_dir


def compact_run(model: nn.Module, example_inputs: Any, config: CompressConfig | None = None, *,
                val_data: Data | None = None, out_dir: str | Path | None = None,
                model_name: str | None = None) -> CompressResult:
    """The conversion stage alone, for a model pruned in your own loop (zeros in its weights).

    Exports ``model`` as given to dense.onnx (the dense architecture's cost), compacts it
    (:func:`~structadmm.prune.surgery.compact_with_report`), exports pruned.onnx, checks it
    against ``model`` (on ``val_data`` when given, else ``example_inputs``), counts, benchmarks
    and writes the same run folder and report.json as :func:`compress`, renamed into place
    only when everything has passed. ``val_data`` (a Dataset, DataLoader or ``(x, y)`` pair)
    also gives both accuracies; without it they are null. Of ``config`` only the bench_*
    settings and the seed are used. ``model`` is not modified.
    """
    config = config or CompressConfig()
    if config.quantize:
        raise StructADMMError("compact does not quantize (INT8 calibrates on training data, which it does not "
                              "take); quantize its pruned.onnx with structadmm.quantize_onnx, or use "
                              "`structadmm run --quantize int8`")
    name = model_name or type(model).__name__
    run_dir = _new_run_dir(out_dir, name)
    folder = RunFolder(run_dir)
    folder.create()
    try:
        state = RunState(folder, {}, model, None, None)  # facts only: nothing to resume
        run = Run(model, config, name, distributed.DistContext(), run_dir, folder, staging_of(run_dir), state,
                  None, make_loader(val_data, 256, shuffle=False) if val_data is not None else None,
                  example_inputs)
        carry = run_stages(CONVERTING, run)
        return CompressResult(carry.small, carry.masks, run_dir, carry.report)
    except OSError as exc:  # a full disk, a folder that vanished: the user's to fix
        folder.discard()
        raise StructADMMError(f"cannot write {exc.filename or run_dir}: {exc.strerror or exc}") from exc
    except BaseException:
        folder.discard()
        raise


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

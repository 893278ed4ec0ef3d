"""The whole pipeline in one call: train → ADMM → hard prune → masked retrain → surgery →
ONNX export → ONNX Runtime benchmark → report. With ``admm_stages``, ADMM → hard prune →
short masked retrain runs once per earlier stage's ratio before the final ADMM, each stage
within the masks of the one before. Once the plan is fixed, what it keeps is compared with the
ratio asked (:mod:`.reach`); a shortfall is a warning and goes into the report.
:func:`compact_run` is the conversion stage alone (surgery → export → benchmark → report)
for a model pruned in the caller's own loop.

Each stage is a library call of its own (plan.py, admm.py, masks.py, surgery.py,
exporters, bench); this module only wires them together and owns the run folder, which is
written under a temporary name and renamed into place when everything has passed, so a
failed or interrupted run never leaves a half-written folder where a finished one should be.
The run is checkpointed as it goes, so an interrupted one can be resumed (:mod:`.checkpoint`),
and it runs under torchrun with rank 0 alone writing (:mod:`.distributed`).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress
from torch import nn
from torch.utils.data import DataLoader

from ..errors import StructADMMError, StructADMMWarning
from ..models.validate import check_data
from . import distributed
from ..prune.admm import ADMM, AdmmRound, AdmmSchedule
from .checkpoint import ResumeMismatch, RunFolder, RunState, final_of, phases_of, run_identity, staging_of
from .config import CompressConfig
from ..prune.masks import apply_masks, sparsity_of
from ..prune.plan import Masks, PruningPlan
from ..prune.surgery import compact_with_report
from ..batches import Data, first_batch, make_loader, run_model
from .train import evaluate, train_epochs


@dataclass
class CompressResult:
    """What :func:`compress` produced: the small model, the run folder and its figures."""

    model: nn.Module  # the compacted, physically smaller model (under torchrun, ranks > 0: the masked one)
    masks: Masks
    run_dir: Path
    report: dict[str, Any]
    admm_history: list[AdmmRound] = field(default_factory=list)
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
) -> CompressResult:
    """Run the whole pipeline on ``model`` and write the run folder (see module docstring).

    ``train_data``/``val_data``: a Dataset, a DataLoader or an ``(x, y)`` pair. ``model`` is
    trained in place (it ends masked, not compacted) and a pruned copy is returned in the result.
    The data is checked first (:func:`structadmm.models.validate.check_data`): data the model cannot learn
    from raises :class:`StructADMMError` before any training and before anything is written.

    ``dense_onnx``: the user's own ONNX file ``model`` was converted from
    (:func:`~structadmm.models.onnx_input.load_onnx_model`). It is the dense baseline, copied as
    ``dense.onnx`` and timed as given, and ``pruned.onnx`` keeps its input and output names,
    dtypes and dynamic axes (a drop-in replacement).

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
        # the data is checked before anything is written, the default runs/ folder included
        distributed.on_main(lambda: check_data(model, train_data, val_data, model_name=name), ctx)
        identity = run_identity(config.to_dict(), name, model, _sample_count(train_data), ctx.world_size)
        run_dir = distributed.on_main(lambda: _run_dir(out_dir, name, resume), ctx)
        folder = RunFolder(run_dir) if ctx.is_main else None  # only rank 0 touches the disk
        resumed = distributed.on_main(lambda: folder.resume(identity) if resume else folder.create(), ctx)
        pipeline = _Pipeline(model, config, name, ctx, run_dir, folder, identity, resumed, progress,
                             Path(dense_onnx) if dense_onnx is not None else None)
        try:
            result = pipeline.run(train_data, val_data)
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


_TIMINGS = {"dense": "dense_training_s", "admm": "admm_s", "retrain": "retrain_s"}


def _timing_key(phase: str) -> str:
    """report.json's timings key of a phase; an earlier stage's ``admm-2`` is ``admm_stage2_s``."""
    if phase in _TIMINGS:
        return _TIMINGS[phase]
    name, stage = phase.rsplit("-", 1)
    return f"{name}_stage{stage}_s"


class _Pipeline:
    """One run, phase by phase, checkpointed as it goes (see :class:`.checkpoint.RunState`)."""

    def __init__(self, model: nn.Module, config: CompressConfig, name: str, ctx: distributed.DistContext,
                 run_dir: Path, folder: RunFolder | None, identity: dict[str, Any], resumed: dict[str, Any] | None,
                 progress: Progress | None, dense_onnx: Path | None = None):
        self.model, self.config, self.name, self.ctx = model, config, name, ctx
        self.dense_onnx = dense_onnx
        self.run_dir, self.folder, self.identity, self.resumed = run_dir, folder, identity, resumed
        self.out = staging_of(run_dir)  # written by rank 0 only
        self.fit = dict(momentum=config.momentum, weight_decay=config.weight_decay, device=config.device,
                        progress=progress if ctx.is_main else None)
        self.small: nn.Module = model  # replaced by the compacted model on rank 0

    def run(self, train_data: Data, val_data: Data | None) -> CompressResult:
        config, model = self.config, self.model
        torch.manual_seed(config.seed)
        if config.device.startswith("cuda") and not torch.cuda.is_available():
            raise StructADMMError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
        loader = make_loader(train_data, config.batch_size, shuffle=True, seed=config.seed)
        self.train = distributed.shard(loader, self.ctx, seed=config.seed)
        self.val = make_loader(val_data, 256, shuffle=False) if val_data is not None else None
        self.example = first_batch(self.train, 8)
        stages = config.stage_ratios()
        self.state = RunState(self.folder, self.identity, model, self.train.generator, self.resumed,
                              phases_of(len(stages)))

        plan = self._plan()  # depends on the structure only: fail before training, not after
        dense_acc = self._dense()
        plan = self._final_plan(plan)
        self._check_reach(plan)
        teacher = self._teacher()
        within = None  # the masks of the stage before: what it pruned stays pruned
        for stage, ratio in enumerate(stages[:-1], 1):
            within = self._stage(stage, plan.at_ratio(ratio), within, teacher)
        admm = ADMM(model, plan, rho=config.rho, rho_growth=config.rho_growth, rho_max=config.rho_max, within=within)
        self.state.admm = admm
        masks = self._admm(admm, within, "admm", self._offset(len(stages), "admm"))
        self._retrain(masks, teacher, "retrain", config.retrain_epochs, self._offset(len(stages), "retrain"))
        report = distributed.on_main(lambda: self._publish(plan, admm, masks, dense_acc), self.ctx)
        return CompressResult(self.small, masks, self.run_dir, report, admm.history, self.ctx.rank)

    def _train(self, phase: str, epochs: int, epoch_offset: int, **kwargs: Any) -> None:
        """One training phase, continued from the checkpoint when the run resumes inside it."""
        resume = self.state.enter(phase)
        train_epochs(self.model, self.train, epochs, resume=resume, epoch_offset=epoch_offset,
                     on_epoch_end=lambda trainer: self.state.save(phase, trainer), **kwargs, **self.fit)
        self.model.cpu()
        self.state.leave(_timing_key(phase))

    def _offset(self, stage: int, phase: str) -> int:
        """Epochs trained before ``phase`` of ``stage`` (1-based): the DistributedSampler's epoch offset."""
        config = self.config
        per_stage = self.admm_schedule(config).max_epochs() + config.admm_stage_retrain_epochs
        before = config.dense_epochs + (stage - 1) * per_stage
        return before + (self.admm_schedule(config).max_epochs() if phase == "retrain" else 0)

    def _check_reach(self, plan: PruningPlan) -> None:
        """Compare what the plan keeps with the ratio asked (once per run); a shortfall is a warning."""
        from ..prune.reach import check_reach

        facts, config = self.state.facts, self.config
        if "ratio_shortfall" not in facts:
            uniform = not (config.plan or config.target_macs or config.target_latency)
            reach = check_reach(self.model, self.example, plan, config.ratio if uniform else None)
            facts["ratio_shortfall"] = None if reach.reached else reach.to_dict()
        if facts["ratio_shortfall"] is not None and self.ctx.is_main:
            warnings.warn(StructADMMWarning(facts["ratio_shortfall"]["message"]), stacklevel=2)

    def _stage(self, stage: int, plan: PruningPlan, within: Masks | None, teacher: nn.Module | None) -> Masks:
        """One earlier ADMM stage (``admm_stages``): ADMM within the last stage's masks, hard prune, short retrain."""
        from ..prune.reach import kept_channels

        config = self.config
        admm = ADMM(self.model, plan, rho=config.rho, rho_growth=config.rho_growth, rho_max=config.rho_max,
                    within=within)
        self.state.admm = admm
        masks = self._admm(admm, within, f"admm-{stage}", self._offset(stage, "admm"))
        record = self.state.facts.setdefault("stages", {}).setdefault(str(stage), {})
        if "ratio" not in record:  # the stage's ADMM ran now, not in an interrupted earlier run
            record.update(ratio=plan.units[0].ratio, admm=[r.__dict__ for r in admm.history],
                          admm_outcome=self.state.facts.pop("admm_outcome"),
                          hard_pruned_accuracy=self.state.facts.pop("hard_pruned_accuracy"),
                          kept=kept_channels(plan, masks))
        self._retrain(masks, teacher, f"retrain-{stage}", config.admm_stage_retrain_epochs,
                      self._offset(stage, "retrain"))
        if "retrained_accuracy" not in record:
            record["retrained_accuracy"] = self._evaluate()
        return masks

    def _evaluate(self) -> float | None:
        """Held-out accuracy, measured on rank 0 with rank 0's BatchNorm statistics."""
        val = self.val
        return distributed.on_main(lambda: evaluate(self.model, val) if val is not None else None, self.ctx)

    def _dense(self) -> float | None:
        if not self.state.done("dense"):
            config = self.config
            self._train("dense", config.dense_epochs, 0, lr=config.lr, description="dense training")
            self.model.eval()
            self.state.facts["dense_accuracy"] = self._evaluate()
            if self.config.distill > 0:  # the teacher of masked retraining, kept in the checkpoint
                self.state.facts["dense_weights"] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            distributed.on_main(self._write_dense, self.ctx)
        self.model.cpu().eval()
        return self.state.facts["dense_accuracy"]

    def _teacher(self) -> nn.Module | None:
        """The dense model, frozen, for distillation during masked retraining (None when off)."""
        if self.config.distill <= 0:
            return None
        teacher = copy.deepcopy(self.model)
        teacher.load_state_dict(self.state.facts["dense_weights"])
        return teacher.eval().requires_grad_(False)

    def _write_dense(self) -> None:
        """dense.onnx: the user's own file as given, else the trained model exported."""
        if self.dense_onnx is None:
            self._export(self.model, "dense.onnx")
            return
        import onnx

        from ..exporters import load_onnx

        # one self-contained file (external data, if any, is read from beside the source)
        onnx.save(load_onnx(self.dense_onnx), self.out / "dense.onnx")

    def _qat(self, small: nn.Module, check_inputs: Any):
        """The retraining :func:`quantize_run` calls when post-training INT8 fails its gate: the
        compacted model retrained through INT8 fake quantization, exported, checked for parity."""
        from ..exporters import verify_onnx
        from .qat import qat_retrain

        def retrain(path: Path) -> None:
            config = self.config
            net = qat_retrain(small, self.train, config.qat_epochs, lr=config.qat_lr, seed=config.seed,
                              momentum=config.momentum, weight_decay=config.weight_decay,
                              reduce_range=config.quantize_reduce_range)
            self._export(net, path.name)
            verify_onnx(net, path, check_inputs)

        return retrain

    def _export(self, model: nn.Module, filename: str) -> None:
        from ..exporters import export_onnx, load_onnx, onnx_signature

        signature = onnx_signature(load_onnx(self.dense_onnx)) if self.dense_onnx is not None else None
        export_onnx(model, self.example, self.out / filename, signature=signature)

    def _plan(self) -> PruningPlan:
        config, model = self.config, self.model
        multiple = config.channel_multiple
        plan = (PruningPlan.from_file(model, self.example, config.plan, multiple=multiple,
                                      residual=config.prune_residual) if config.plan
                else PruningPlan.uniform(model, self.example, config.sparsity, config.ratio, multiple=multiple,
                                         keep_ends=not config.prune_ends, residual=config.prune_residual))
        if not plan.units:
            reasons = "; ".join(f"{layer}: {why}" for layer, why in plan.skipped[:3]) or "no Conv/Linear layers"
            raise StructADMMError(f"nothing in {self.name} can be pruned with this plan ({reasons})")
        return plan

    def _final_plan(self, plan: PruningPlan) -> PruningPlan:
        """The plan ADMM runs with, fixed once after dense training and kept in the checkpoint.

        A run resumed after that point uses the saved plan exactly: a budget plan depends on the
        trained weights (and a latency target on timings), so it is never chosen again.
        """
        config = self.config
        saved = self.state.facts.get("plan")
        if saved is None:
            if config.target_macs or config.target_latency:
                plan = self._budget_plan()
            self.state.facts["plan"] = plan.to_state()
            return plan
        budget = config.target_macs or config.target_latency
        current = plan.to_state()
        if "left_whole" not in saved:  # a checkpoint from before plans recorded the groups they keep whole
            current.pop("left_whole")
        if not budget and current != saved:
            raise ResumeMismatch(f"cannot resume {self.run_dir}: the pruning plan differs from the interrupted run's "
                                 "(a changed --plan file?); resume with the plan it was started with")
        try:
            return PruningPlan.from_state(plan.graph, saved)
        except StructADMMError as exc:
            raise ResumeMismatch(f"cannot resume {self.run_dir}: {exc}") from None

    def _budget_plan(self) -> PruningPlan:
        """Per-group ratios for the MAC or latency target, from the trained dense model.

        Sensitivity is probed on up to 512 held-out samples (training samples without any);
        every rank computes the same plan from the same weights and data.
        """
        from ..prune.budget import plan_for_latency, plan_for_macs

        config = self.config
        source = (self.val if self.val is not None else self.train).dataset
        x_probe, y_probe = next(iter(make_loader(source, 512, shuffle=False)))[:2]
        x_probe = tuple(x_probe) if isinstance(x_probe, list) else x_probe

        def probe(net: nn.Module) -> float:
            net.eval()
            with torch.no_grad():
                return float((run_model(net, x_probe).argmax(1) == y_probe).float().mean())

        common = dict(probe=probe, sparsity=config.sparsity, multiple=config.channel_multiple)
        if config.target_macs:
            result = plan_for_macs(self.model, self.example, config.target_macs, **common)
        else:
            batch = max(config.bench_batches)
            result = plan_for_latency(self.model, self.example, config.target_latency, batch=batch,
                                      threads=config.bench_threads, **common)
        self.state.facts["budget"] = {"ratios": result.ratios, "predicted_mac_ratio": result.mac_ratio,
                                      "measured_speedup": result.speedup, "measurements": result.measurements}
        return result.plan

    def _admm(self, admm: ADMM, within: Masks | None, phase: str, offset: int) -> Masks:
        """ADMM, then the hard prune; ``within``: an earlier stage's masks, held at zero while it trains."""
        if self.state.done(phase):
            return self.state.resumed_masks()
        config, ctx = self.config, self.ctx
        schedule = self.admm_schedule(config)

        def check(admm: ADMM) -> None:
            distributed.check_identical([*admm.Z.values(), *admm.U.values()], ctx, "ADMM's Z and U")

        self.state.masks = within  # saved with this phase's checkpoints, for a resume inside it
        guard = apply_masks(self.model, within) if within is not None else None
        try:
            self._train(phase, schedule.max_epochs(), offset, lr=config.admm_lr,
                        description="ADMM" if phase == "admm" else f"ADMM stage {phase.rsplit('-', 1)[1]}",
                        after_step=guard.enforce if guard is not None else None,
                        **schedule.train_kwargs(admm, check))
        finally:
            if guard is not None:
                guard.remove()
        self.state.facts["admm_outcome"] = schedule.outcome(admm)
        masks = admm.hard_prune()
        distributed.check_identical(masks.values(), ctx, "the masks")
        self.state.facts["hard_pruned_accuracy"] = self._evaluate()
        return masks

    @staticmethod
    def admm_schedule(config: CompressConfig) -> AdmmSchedule:
        return AdmmSchedule(config.admm_rounds, config.admm_epochs, tolerance=config.admm_tolerance,
                            extra_rounds=config.admm_extra_rounds, restart=config.admm_lr_restart)

    def _retrain(self, masks: Masks, teacher: nn.Module | None, phase: str, epochs: int, offset: int) -> None:
        config = self.config
        self.state.masks = masks
        if self.state.done(phase):  # an earlier stage's retrain, finished before the run was interrupted
            return
        guard = apply_masks(self.model, masks)  # re-applied after every optimizer step
        self._train(phase, epochs, offset, lr=config.retrain_lr, after_step=guard.enforce,
                    description="masked retraining", teacher=teacher, distill=config.distill,
                    temperature=config.distill_temperature)
        guard.enforce()
        guard.remove()
        self.model.eval()

    def convert(self, example_inputs: Any, val_data: Data | None) -> CompressResult:
        """The conversion stage alone (:func:`compact_run`): dense.onnx of the model as given, then publish."""
        model = self.model
        self.example = example_inputs
        self.val = make_loader(val_data, 256, shuffle=False) if val_data is not None else None
        self.state = RunState(self.folder, self.identity, model, None, None)  # facts only: nothing to resume
        started = time.perf_counter()
        # the pruning the weights hold: zeros in every Conv/Linear weight (for the report's weight_sparsity)
        masks = {name: p.detach().ne(0).float() for name, p in model.named_parameters() if p.dim() > 1}
        dense_acc = evaluate(model, self.val) if self.val is not None else None
        self._export(model, "dense.onnx")  # the masked model at full size: the dense architecture's cost
        self.state.facts["timings"]["dense_export_s"] = time.perf_counter() - started
        report = self._publish(None, None, masks, dense_acc)
        return CompressResult(self.small, masks, self.run_dir, report)

    def _publish(self, plan: PruningPlan | None, admm: ADMM | None, masks: Masks,
                 dense_acc: float | None) -> dict[str, Any]:
        """Rank 0: surgery, export, parity, benchmark and report; then the folder is renamed into place."""
        from ..bench import benchmark, write_report
        from ..bench.profile import layer_table
        from ..prune.lowering import LoweredConv
        from ..exporters import count_onnx, sparse_storage, verify_onnx
        from ..exporters.quantize import quantize_run

        config, model, out, val = self.config, self.model, self.out, self.val
        small, cuts = compact_with_report(model, self.example)
        self.small = small
        pruned_acc = evaluate(small, val) if val is not None else None
        self._export(small, "pruned.onnx")
        # the exported file against the masked model it came from, on held-out inputs
        check_inputs = first_batch(val, 64) if val is not None else self.example
        parity = verify_onnx(model, out / "pruned.onnx", check_inputs)

        dense_cost, pruned_cost = count_onnx(out / "dense.onnx"), count_onnx(out / "pruned.onnx")
        mac_ratio = dense_cost.macs / max(pruned_cost.macs, 1)
        storage = sparse_storage(out / "pruned.onnx")  # what irregular sparsity buys: bytes, not speed
        # --quantize int8: INT8 files made, evaluated and gated in ORT, then timed with the FP32 pair
        retrain = self._qat(small, check_inputs) if config.qat_epochs else None
        quantized = quantize_run(out, config, self.train, val, retrain) if config.quantize else None
        latency = benchmark(
            {"dense": out / "dense.onnx", "pruned": out / "pruned.onnx", **(quantized.models if quantized else {})},
            batch_sizes=config.bench_batches, threads=config.bench_threads,
            min_runs=config.bench_min_runs, min_seconds=config.bench_min_seconds, seed=config.seed,
            isolate=config.bench_isolate,
        )
        byte_ratios = {b: dense_cost.bytes_at(b) / max(pruned_cost.bytes_at(b), 1) for b in config.bench_batches}
        report = {
            "model": self.name,
            "dense": {"accuracy": dense_acc, "macs": dense_cost.macs, "params": dense_cost.params,
                      "onnx": "dense.onnx",
                      "source": str(self.dense_onnx) if self.dense_onnx is not None else None},
            "pruned": {"accuracy": pruned_acc, "macs": pruned_cost.macs, "params": pruned_cost.params,
                       "onnx": "pruned.onnx", "hard_pruned_accuracy": self.state.facts.get("hard_pruned_accuracy"),
                       "weight_sparsity": sparsity_of(masks)},
            "mac_ratio": mac_ratio,
            "sparse_storage": {"weights": storage.weights, "zeros": storage.zeros, "sparsity": storage.sparsity,
                               "dense_bytes": storage.dense_bytes, "csr_bytes": storage.sparse_bytes,
                               "compression": storage.compression},
            "param_ratio": dense_cost.params / max(pruned_cost.params, 1),
            "parity": {"max_abs_diff": parity, "ok": True},
            "latency": latency.to_rows(dense="dense", pruned="pruned", mac_ratio=mac_ratio, byte_ratios=byte_ratios),
            "skipped_providers": [{"provider": p, "reason": r} for p, r in latency.skipped],
            "admm": [r.__dict__ for r in admm.history] if admm is not None else [],
            "admm_outcome": self.state.facts.get("admm_outcome"),
            "admm_stages": [{"stage": int(k), **v} for k, v in sorted(self.state.facts.get("stages", {}).items(),
                                                                       key=lambda kv: int(kv[0]))],
            "ratio_shortfall": self.state.facts.get("ratio_shortfall"),
            "groups": [cut.__dict__ for cut in cuts],
            "left_alone": [{"layer": layer, "reason": why} for layer, why in plan.skipped] if plan is not None else [],
            "budget": self.state.facts.get("budget"),
            "lowered": [name for name, m in small.named_modules() if isinstance(m, LoweredConv)],
            "layers": [row.__dict__ for row in layer_table(out / "dense.onnx", out / "pruned.onnx",
                                                           batch=max(config.bench_batches),
                                                           threads=config.bench_threads)],
            "timings": dict(self.state.facts["timings"]),
            "config": config.to_dict(),
            "seed": config.seed,
            "versions": _versions(),
        }
        if quantized is not None:
            report.update(quantized.report(out, latency, pruned_cost.macs))
        write_report(out, report)
        self.folder.finish()
        return json.loads(json.dumps(report))


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    from ..version import __version__
    from ..bench.runtime import installed_ort

    return {"structadmm": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "onnxruntime_package": "+".join(installed_ort()) or "unknown",
            "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": str(os.cpu_count())}


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
    name = model_name or type(model).__name__
    run_dir = _new_run_dir(out_dir, name)
    folder = RunFolder(run_dir)
    folder.create()
    try:
        pipeline = _Pipeline(model, config, name, distributed.DistContext(), run_dir, folder, {}, None, None)
        return pipeline.convert(example_inputs, val_data)
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

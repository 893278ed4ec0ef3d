"""The stages of a run, in order, each a small function with plain inputs and outputs.

A run is two lists of stages (:data:`TRAINING`, then :data:`PUBLISHING` on rank 0), and
:func:`run_stages` calls them in order. Every stage is ``stage(run, carry) -> carry``:

* :class:`Run` is what the stages share and never change: the model being pruned, its config,
  the data loaders, the run folder and the checkpoint state (:class:`.checkpoint.RunState`);
* :class:`Carry` is what the stages hand on: the plan, the masks, the compacted model, the report.
  It is frozen; a stage returns a new one with the fields it made (``dataclasses.replace``).

Each stage names the :class:`Carry` fields it ``needs`` and ``gives`` and the config keys it
reads (its config section), so the list can be checked and a stage used alone: build a
:class:`Run`, put its inputs in a :class:`Carry`, call it.

Checkpoint boundaries lie between the training stages: each training phase (dense, admm-i,
retrain-i, admm, retrain) checkpoints at its start and after each epoch, and a resumed run skips
the stages whose phase is done, taking their results from the checkpoint's facts. The publishing
stages run from the final masked model, on rank 0 alone, and write the staging folder that is
renamed into place at the end.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from statistics import median
from typing import Any, Callable

import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn
from torch.utils.data import DataLoader

from ..batches import first_batch, make_loader, run_model, split_batch
from ..errors import StructADMMError, StructADMMWarning
from ..layers import eval_mode, flat_outputs
from ..prune.admm import ADMM, AdmmSchedule
from ..prune.masks import apply_masks, sparsity_of
from ..prune.plan import Masks, PruningPlan
from ..prune.surgery import compact_with_report
from . import distributed
from .checkpoint import ResumeMismatch, RunFolder, RunState
from .config import CompressConfig
from .objective import Objective, OutputLoss, is_class_scores, objective_of
from .train import evaluate, train_epochs

__all__ = ["CONVERTING", "Carry", "PUBLISHING", "RUN_WIDE", "Run", "Stage", "TRAINING", "run_stages", "stage"]


@dataclass(frozen=True)
class Carry:
    """What the stages hand on to each other (every field None until a stage gives it)."""

    plan: PruningPlan | None = None
    dense_accuracy: float | None = None
    teacher: nn.Module | None = None  # the frozen dense model (torch, or the user's ONNX file in ORT), for distillation
    within: Masks | None = None  # the masks of the last earlier ADMM stage: they stay pruned
    admm: ADMM | None = None
    masks: Masks | None = None
    small: nn.Module | None = None  # the compacted model
    cuts: list | None = None  # surgery's cut per channel group
    pruned_accuracy: float | None = None
    check_inputs: Any = None  # held-out inputs the exported files are checked on
    parity: float | None = None
    fidelity: dict[str, Any] | None = None  # pruned.onnx against dense.onnx on held-out inputs
    quantized: Any = None  # exporters.quantize.QuantizeRun
    latency: Any = None  # bench.LatencyReport
    report: dict[str, Any] | None = None


@dataclass(frozen=True)
class Stage:
    """One step of a run: ``fn(run, carry) -> carry``, with what it needs, gives and reads."""

    name: str
    fn: Callable[["Run", Carry], Carry]
    needs: tuple[str, ...] = ()
    gives: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()  # the config keys it reads: its config section

    def __call__(self, run: "Run", carry: Carry) -> Carry:
        return self.fn(run, carry)


def stage(name: str, *, needs: tuple[str, ...] = (), gives: tuple[str, ...] = (),
          keys: tuple[str, ...] = ()) -> Callable[[Callable[["Run", Carry], Carry]], Stage]:
    """Declare the decorated function a :class:`Stage`."""
    return lambda fn: Stage(name, fn, needs, gives, keys)


def run_stages(stages: tuple[Stage, ...], run: "Run", carry: Carry | None = None) -> Carry:
    """Call ``stages`` in order, each on the carry the one before returned."""
    carry = carry or Carry()
    for step in stages:
        carry = step(run, carry)
    return carry


def _outputs(model: nn.Module, example: Any) -> Any:
    """``model``'s outputs on ``example``, in eval mode, without gradients."""
    with eval_mode(model), torch.no_grad():
        return run_model(model, example)


#: the staging folder's sub-folder of the copies counted and timed at the run's input shape (removed at the end)
SIZED = ".sized"

_TIMINGS = {"dense": "dense_training_s", "admm": "admm_s", "retrain": "retrain_s"}


def timing_key(phase: str) -> str:
    """report.json's timings key of a phase; an earlier stage's ``admm-2`` is ``admm_stage2_s``."""
    if phase in _TIMINGS:
        return _TIMINGS[phase]
    name, number = phase.rsplit("-", 1)
    return f"{name}_stage{number}_s"


@dataclass
class Run:
    """What every stage of one run shares: the model, its config, the data, the run folder."""

    model: nn.Module  # trained in place; ends masked
    config: CompressConfig
    name: str
    ctx: distributed.DistContext
    run_dir: Path
    folder: RunFolder | None  # None on ranks other than 0, which never write
    out: Path  # the staging folder the publishing stages write
    state: RunState
    train: DataLoader | None
    val: DataLoader | None
    example: Any  # real example inputs (the first training batch's, at most 8)
    dense_onnx: Path | None = None  # the user's own ONNX file, the dense baseline when given
    progress: Progress | None = None
    fit: dict[str, Any] = field(default_factory=dict)
    mode: str = "labels"  # what training minimises: "labels" or "distill" (config.objective resolved)
    loss: OutputLoss | None = None  # the caller's distillation loss(student_outputs, teacher_outputs, inputs)
    metric: Callable[[nn.Module, DataLoader], float] | None = None  # the caller's score; else top-1 accuracy

    @classmethod
    def start(cls, model: nn.Module, config: CompressConfig, name: str, ctx: distributed.DistContext,
              run_dir: Path, folder: RunFolder | None, out: Path, identity: dict[str, Any],
              resumed: dict[str, Any] | None, train_data: Any, val_data: Any, *, phases: tuple[str, ...],
              progress: Progress | None = None, dense_onnx: Path | None = None, mode: str = "labels",
              loss: OutputLoss | None = None, metric: Callable[[nn.Module, DataLoader], float] | None = None) -> "Run":
        """A run that trains: seeds, checks the device, makes the loaders and the checkpoint state.
        ``mode``: what training minimises (``config.objective`` resolved: :func:`.objective.resolve_objective`)."""
        torch.manual_seed(config.seed)
        if config.device.startswith("cuda") and not torch.cuda.is_available():
            raise StructADMMError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
        loader = make_loader(train_data, config.batch_size, shuffle=True, seed=config.seed)
        train = distributed.shard(loader, ctx, seed=config.seed)
        val = make_loader(val_data, 256, shuffle=False) if val_data is not None else None
        state = RunState(folder, identity, model, train.generator, resumed, phases)
        fit = dict(momentum=config.momentum, weight_decay=config.weight_decay, device=config.device,
                   progress=progress if ctx.is_main else None)
        return cls(model, config, name, ctx, run_dir, folder, out, state, train, val, first_batch(train, 8),
                   dense_onnx, progress, fit, mode, loss, metric)

    # -- what several stages use -------------------------------------------------------------
    @property
    def method(self) -> str:
        """How the masks are found: "admm" or "oneshot" (``config.prune_method`` resolved for this run's mode)."""
        return self.config.method_for(self.mode)

    def train_phase(self, phase: str, epochs: int, epoch_offset: int, *, objective: Objective | None = None,
                    **kwargs: Any) -> None:
        """One training phase, continued from the checkpoint when the run resumes inside it.
        ``objective``: what it minimises (:func:`.objective.objective_of`: the labels by default)."""
        resume = self.state.enter(phase)
        train_epochs(self.model, self.train, epochs, resume=resume, epoch_offset=epoch_offset,
                     objective=objective or objective_of(), as_deployed=self.mode == "distill",
                     grad_clip=self.config.distill_grad_clip if self.mode == "distill" else None,
                     on_epoch_end=lambda trainer: self.state.save(phase, trainer), **kwargs, **self.fit)
        self.model.cpu()
        self.state.leave(timing_key(phase))

    def objective(self, teacher: Any) -> Objective:
        """What the training after dense training minimises (ADMM's W-steps, masked retraining): the one
        place a run's objective comes from."""
        c = self.config
        if self.mode == "distill":
            return objective_of("distill", teacher, temperature=c.distill_temperature, kind=c.distill_loss,
                                loss=self.loss)
        return objective_of("labels", teacher, distill=c.distill, temperature=c.distill_temperature)

    def schedule(self) -> AdmmSchedule:
        c = self.config
        return AdmmSchedule(c.admm_rounds, c.admm_epochs, tolerance=c.admm_tolerance,
                            extra_rounds=c.admm_extra_rounds, restart=c.admm_lr_restart)

    def offset(self, number: int, phase: str) -> int:
        """Epochs trained before ``phase`` of ADMM stage ``number`` (1-based): the sampler's epoch offset."""
        c = self.config
        admm_epochs = self.schedule().max_epochs()
        before = c.dense_epochs + (number - 1) * (admm_epochs + c.admm_stage_retrain_epochs)
        return before + (admm_epochs if phase == "retrain" else 0)

    def evaluate(self, model: nn.Module | None = None) -> float | None:
        """Held-out accuracy (or the caller's ``metric``) of ``model`` (the run's), measured on rank 0
        with rank 0's BatchNorm statistics; None without held-out labels (and no metric)."""
        model = self.model if model is None else model
        return distributed.on_main(lambda: self.score(model), self.ctx)

    def score(self, model: nn.Module) -> float | None:
        if self.val is None:
            return None
        if self.metric is not None:
            with eval_mode(model), torch.no_grad():
                return float(self.metric(model, self.val))
        return evaluate(model, self.val)

    def export(self, model: nn.Module, filename: str) -> None:
        """``model`` as ``filename`` in the staging folder, with the user's file's names when given.

        A converted file whose graph fixes sizes computed from the input (reshape targets, a
        detector's anchors) cannot keep axes besides the batch dynamic: it is written for the
        run's input shape, and a warning says so."""
        from ..exporters import export_onnx, load_onnx, onnx_signature
        from ..exporters.onnx_export import SignatureError

        signature = onnx_signature(load_onnx(self.dense_onnx)) if self.dense_onnx is not None else None
        try:
            export_onnx(model, self.example, self.out / filename, signature=signature)
        except SignatureError:
            if signature is None:
                raise
            items = self.example if isinstance(self.example, tuple) else (self.example,)
            outputs = flat_outputs(_outputs(model, self.example))
            export_onnx(model, self.example, self.out / filename, signature=signature.fixed(
                [t.shape for t in items], [t.shape for t in outputs]))
            shapes = ", ".join("x".join(map(str, t.shape[1:])) for t in items)
            warnings.warn(StructADMMWarning(
                f"{filename} takes samples of {shapes} only: its graph fixes sizes computed from the input, so "
                f"the axes {self.dense_onnx.name} leaves dynamic besides the batch could not stay dynamic"),
                stacklevel=2)

    def sized(self, path: Path) -> Path:
        """``path``, or where its inputs leave axes besides the batch dynamic (a detector's height and
        width), a copy with them fixed at the run's input shape: what is counted and timed."""
        import onnx

        from ..exporters import load_onnx
        from ..exporters.onnx_export import with_sample_shapes

        items = self.example if isinstance(self.example, tuple) else (self.example,)
        proto = with_sample_shapes(load_onnx(path), [tuple(t.shape[1:]) for t in items])
        if proto is None:
            return path
        target = self.out / SIZED / path.name
        target.parent.mkdir(exist_ok=True)
        onnx.save(proto, target)
        return target

    def dense_copy(self) -> nn.Module:
        """A separate copy of the model holding its dense weights (as they were before any pruning)."""
        dense = copy.deepcopy(self.model)
        dense.load_state_dict(self.state.facts["dense_weights"])
        return dense

    def new_admm(self, plan: PruningPlan, within: Masks | None) -> ADMM:
        c = self.config
        admm = ADMM(self.model, plan, rho=c.rho, rho_growth=c.rho_growth, rho_max=c.rho_max, within=within)
        self.state.admm = admm
        return admm


# -- training: plan, dense, ADMM, retrain ---------------------------------------------------------

@stage("plan", gives=("plan",), keys=("plan", "sparsity", "ratio", "channel_multiple", "prune_ends", "prune_residual"))
def plan_stage(run: Run, carry: Carry) -> Carry:
    """The plan from the structure alone, before any training: a model that cannot be pruned fails now."""
    c, model = run.config, run.model
    plan = (PruningPlan.from_file(model, run.example, c.plan, multiple=c.channel_multiple, residual=c.prune_residual)
            if c.plan else
            PruningPlan.uniform(model, run.example, c.sparsity, c.ratio, multiple=c.channel_multiple,
                                keep_ends=not c.prune_ends, residual=c.prune_residual))
    if not plan.units:
        reasons = "; ".join(f"{layer}: {why}" for layer, why in plan.skipped[:3]) or "no Conv/Linear layers"
        raise StructADMMError(f"nothing in {run.name} can be pruned with this plan ({reasons})")
    return replace(carry, plan=plan)


@stage("dense", gives=("dense_accuracy",), keys=("dense_epochs", "lr", "distill", "objective"))
def dense_stage(run: Run, carry: Carry) -> Carry:
    """Dense training (skipped when resumed past it, and when distilling: the model as given is the
    teacher), held-out accuracy, dense.onnx."""
    if not run.state.done("dense"):
        c = run.config
        run.train_phase("dense", c.dense_epochs if run.mode == "labels" else 0, 0, lr=c.lr,
                        description="dense training")
        run.model.eval()
        run.state.facts["dense_accuracy"] = run.evaluate()
        if c.distill > 0 or run.mode == "distill":  # the teacher, kept in the checkpoint
            run.state.facts["dense_weights"] = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
        distributed.on_main(lambda: _write_dense(run), run.ctx)
    run.model.cpu().eval()
    return replace(carry, dense_accuracy=run.state.facts["dense_accuracy"])


def _write_dense(run: Run) -> None:
    """dense.onnx: the user's own file as given, else the trained model exported."""
    if run.dense_onnx is None:
        run.export(run.model, "dense.onnx")
        return
    import onnx

    from ..exporters import load_onnx

    # one self-contained file (external data, if any, is read from beside the source)
    onnx.save(load_onnx(run.dense_onnx), run.out / "dense.onnx")


@stage("final plan", needs=("plan",), gives=("plan",), keys=("target_macs", "target_latency", "bench_batches",
                                                               "bench_threads"))
def final_plan_stage(run: Run, carry: Carry) -> Carry:
    """The plan ADMM runs with, fixed once after dense training and kept in the checkpoint.

    A run resumed after that point uses the saved plan exactly: a budget plan depends on the
    trained weights (and a latency target on timings), so it is never chosen again.
    """
    c, plan = run.config, carry.plan
    saved = run.state.facts.get("plan")
    if saved is None:
        if c.target_macs or c.target_latency:
            plan = _budget_plan(run)
        run.state.facts["plan"] = plan.to_state()
        return replace(carry, plan=plan)
    current = plan.to_state()
    if "left_whole" not in saved:  # a checkpoint from before plans recorded the groups they keep whole
        current.pop("left_whole")
    if not (c.target_macs or c.target_latency) and current != saved:
        raise ResumeMismatch(f"cannot resume {run.run_dir}: the pruning plan differs from the interrupted run's "
                             "(a changed --plan file?); resume with the plan it was started with")
    try:
        return replace(carry, plan=PruningPlan.from_state(plan.graph, saved))
    except StructADMMError as exc:
        raise ResumeMismatch(f"cannot resume {run.run_dir}: {exc}") from None


def _budget_plan(run: Run) -> PruningPlan:
    """Per-group ratios for the MAC or latency target, from the trained dense model.

    Sensitivity is probed on up to 512 held-out samples (training samples without any): top-1
    accuracy when training on labels, else the mean cosine similarity of every output to the dense
    model's. Every rank computes the same plan from the same weights and data.
    """
    from ..prune.budget import plan_for_latency, plan_for_macs

    c = run.config
    source = (run.val if run.val is not None else run.train).dataset
    x_probe, y_probe = split_batch(next(iter(make_loader(source, 512, shuffle=False))))
    if run.mode == "labels" and y_probe is not None:
        def probe(net: nn.Module) -> float:
            return float((_outputs(net, x_probe).argmax(1) == y_probe).float().mean())
    else:
        reference = [t.flatten(1) for t in flat_outputs(_outputs(run.model, x_probe)) if t.is_floating_point()]

        def probe(net: nn.Module) -> float:
            got = [t.flatten(1) for t in flat_outputs(_outputs(net, x_probe)) if t.is_floating_point()]
            return float(torch.stack([F.cosine_similarity(a, b, dim=1).mean() for a, b in zip(got, reference)]).mean())

    common = dict(probe=probe, sparsity=c.sparsity, multiple=c.channel_multiple)
    if c.target_macs:
        result = plan_for_macs(run.model, run.example, c.target_macs, **common)
    else:
        result = plan_for_latency(run.model, run.example, c.target_latency, batch=max(c.bench_batches),
                                  threads=c.bench_threads, **common)
    run.state.facts["budget"] = {"ratios": result.ratios, "predicted_mac_ratio": result.mac_ratio,
                                 "measured_speedup": result.speedup, "measurements": result.measurements}
    return result.plan


@stage("reach", needs=("plan",), keys=("ratio",))
def reach_stage(run: Run, carry: Carry) -> Carry:
    """Compare what the plan keeps with the ratio asked (once per run); a shortfall is a warning."""
    from ..prune.reach import check_reach

    facts, c = run.state.facts, run.config
    if "ratio_shortfall" not in facts:
        uniform = not (c.plan or c.target_macs or c.target_latency)
        reach = check_reach(run.model, run.example, carry.plan, c.ratio if uniform else None)
        facts["ratio_shortfall"] = None if reach.reached else reach.to_dict()
    if facts["ratio_shortfall"] is not None and run.ctx.is_main:
        warnings.warn(StructADMMWarning(facts["ratio_shortfall"]["message"]), stacklevel=2)
    return carry


@stage("teacher", gives=("teacher",), keys=("distill", "objective"))
def teacher_stage(run: Run, carry: Carry) -> Carry:
    """The dense model, frozen: the teacher of every phase after dense training when distilling, of
    masked retraining when ``distill`` > 0 (None when neither). A model converted from the user's
    ONNX file distils from that file itself, run in ONNX Runtime, when it trains on the CPU."""
    if run.config.distill <= 0 and run.mode != "distill":
        return carry
    if run.mode == "distill" and run.dense_onnx is not None and run.config.device == "cpu":
        from ..exporters.onnx_module import OnnxModule

        return replace(carry, teacher=OnnxModule(run.dense_onnx))
    return replace(carry, teacher=run.dense_copy().eval().requires_grad_(False))


@stage("earlier ADMM stages", needs=("plan",), gives=("within",), keys=("admm_stages", "admm_stage_retrain_epochs"))
def earlier_stages(run: Run, carry: Carry) -> Carry:
    """``admm_stages``: ADMM, hard prune and a short retrain at each earlier ratio, each within
    the masks of the one before."""
    from ..prune.reach import kept_channels

    within = carry.within
    for number, ratio in enumerate(run.config.stage_ratios()[:-1], 1):
        plan = carry.plan.at_ratio(ratio)
        admm = run.new_admm(plan, within)
        masks = _admm_phase(run, admm, within, carry.teacher, f"admm-{number}", run.offset(number, "admm"))
        record = run.state.facts.setdefault("stages", {}).setdefault(str(number), {})
        if "ratio" not in record:  # the stage's ADMM ran now, not in an interrupted earlier run
            record.update(ratio=plan.units[0].ratio, admm=[r.__dict__ for r in admm.history],
                          admm_outcome=run.state.facts.pop("admm_outcome"),
                          hard_pruned_accuracy=run.state.facts.pop("hard_pruned_accuracy"),
                          kept=kept_channels(plan, masks))
        _retrain_phase(run, masks, carry.teacher, f"retrain-{number}", run.config.admm_stage_retrain_epochs,
                       run.offset(number, "retrain"))
        if "retrained_accuracy" not in record:
            record["retrained_accuracy"] = run.evaluate()
        within = masks
    return replace(carry, within=within)


@stage("ADMM", needs=("plan",), gives=("admm", "masks"),
       keys=("prune_method", "admm_rounds", "admm_epochs", "admm_lr", "admm_tolerance", "admm_extra_rounds",
             "admm_lr_restart", "rho", "rho_growth", "rho_max", "distill_loss", "distill_temperature", "reconstruct",
             "reconstruct_samples"))
def admm_stage(run: Run, carry: Carry) -> Carry:
    """ADMM at the final ratio (within the earlier stages' masks), then the hard prune; with
    ``prune_method`` resolved to "oneshot", the plan's projection of the weights as they stand instead."""
    if run.method == "oneshot":
        return replace(carry, admm=None, masks=_oneshot_phase(run, carry.plan, "admm"))
    admm = run.new_admm(carry.plan, carry.within)
    number = len(run.config.stage_ratios())
    masks = _admm_phase(run, admm, carry.within, carry.teacher, "admm", run.offset(number, "admm"))
    return replace(carry, admm=admm, masks=masks)


@stage("masked retraining", needs=("masks",), keys=("retrain_epochs", "retrain_lr", "distill",
                                                     "distill_temperature", "distill_loss", "prune_method",
                                                     "admm_rounds", "admm_epochs", "admm_extra_rounds"))
def retrain_stage(run: Run, carry: Carry) -> Carry:
    """Masked retraining: ``retrain_epochs``, plus the ADMM epochs a one-shot run did not spend."""
    number = len(run.config.stage_ratios())
    epochs = run.config.retrain_epochs + (run.schedule().max_epochs() if run.method == "oneshot" else 0)
    offset = run.offset(number, "admm" if run.method == "oneshot" else "retrain")
    _retrain_phase(run, carry.masks, carry.teacher, "retrain", epochs, offset)
    return carry


def _oneshot_phase(run: Run, plan: PruningPlan, phase: str) -> Masks:
    """One-shot magnitude pruning: the plan's projection of the weights as they stand (the dense
    model's), i.e. the hard prune without ADMM before it."""
    if run.state.done(phase):
        return run.state.resumed_masks()
    masks = plan.project(run.model)
    distributed.check_identical(masks.values(), run.ctx, "the masks")
    _reconstruct(run, masks)
    run.state.facts["hard_pruned_accuracy"] = run.evaluate()
    return masks


def _reconstruct(run: Run, masks: Masks) -> None:
    """With ``reconstruct`` set, refit the hard-pruned model's kept layers to reproduce the
    dense model's layer outputs on the first ``reconstruct_samples`` training inputs (the same on every
    rank: the first batches of the same data); report.json's ``reconstruction`` says what it did."""
    if not run.config.reconstruct:
        return
    from ..prune.reconstruct import reconstruct

    inputs = first_batch(make_loader(run.train.dataset, run.config.reconstruct_samples, shuffle=False))
    device = next(run.model.parameters()).device
    inputs = inputs.to(device) if isinstance(inputs, torch.Tensor) else tuple(t.to(device) for t in inputs)
    refits = reconstruct(run.model, run.dense_copy().to(device), inputs, masks, seed=run.config.seed)
    done = [r for r in refits if not r.skipped]
    run.state.facts["reconstruction"] = {
        "samples": len(inputs if isinstance(inputs, torch.Tensor) else inputs[0]), "layers": len(done),
        "error_before": median([r.error_before for r in done]) if done else None,
        "error_after": median([r.error_after for r in done]) if done else None,
        "skipped": [{"layer": r.name, "reason": r.skipped} for r in refits if r.skipped]}


def _admm_phase(run: Run, admm: ADMM, within: Masks | None, teacher: Any, phase: str, offset: int) -> Masks:
    """ADMM, then the hard prune; ``within``: an earlier stage's masks, held at zero while it trains;
    the W-steps minimise the run's objective (distillation from ``teacher`` when distilling) plus the penalty."""
    if run.state.done(phase):
        return run.state.resumed_masks()
    schedule, ctx = run.schedule(), run.ctx

    def check(admm: ADMM) -> None:
        distributed.check_identical([*admm.Z.values(), *admm.U.values()], ctx, "ADMM's Z and U")

    run.state.masks = within  # saved with this phase's checkpoints, for a resume inside it
    guard = apply_masks(run.model, within) if within is not None else None
    try:
        run.train_phase(phase, schedule.max_epochs(), offset, lr=run.config.admm_lr,
                        description="ADMM" if phase == "admm" else f"ADMM stage {phase.rsplit('-', 1)[1]}",
                        after_step=guard.enforce if guard is not None else None,
                        objective=run.objective(teacher) if run.mode == "distill" else None,
                        **schedule.train_kwargs(admm, check))
    finally:
        if guard is not None:
            guard.remove()
    run.state.facts["admm_outcome"] = schedule.outcome(admm)
    masks = admm.hard_prune()
    distributed.check_identical(masks.values(), ctx, "the masks")
    _reconstruct(run, masks)
    run.state.facts["hard_pruned_accuracy"] = run.evaluate()
    return masks


def _retrain_phase(run: Run, masks: Masks, teacher: nn.Module | None, phase: str, epochs: int, offset: int) -> None:
    """Masked retraining: the masks re-applied after every optimizer step."""
    c = run.config
    run.state.masks = masks
    if run.state.done(phase):  # an earlier stage's retrain, finished before the run was interrupted
        return
    guard = apply_masks(run.model, masks)
    run.train_phase(phase, epochs, offset, lr=c.retrain_lr, after_step=guard.enforce,
                    description="masked retraining",
                    objective=run.objective(teacher))
    guard.enforce()
    guard.remove()
    run.model.eval()


#: config keys every stage may read: the run's own (seeding, device, the loaders and the optimiser)
RUN_WIDE = ("seed", "device", "batch_size", "momentum", "weight_decay", "objective", "distill_grad_clip")

#: the training stages of :func:`~structadmm.pipeline.compress.compress`, in order
TRAINING = (plan_stage, dense_stage, final_plan_stage, reach_stage, teacher_stage, earlier_stages, admm_stage,
            retrain_stage)


# -- publishing (rank 0): surgery, export, INT8, benchmark, report ----------------------------------

@stage("compact", gives=("small", "cuts", "pruned_accuracy"))
def compact_stage(run: Run, carry: Carry) -> Carry:
    """Surgery: the physically smaller model, checked against the masked one inside."""
    small, cuts = compact_with_report(run.model, run.example)
    accuracy = run.score(small)
    return replace(carry, small=small, cuts=cuts, pruned_accuracy=accuracy)


@stage("export", needs=("small",), gives=("check_inputs", "parity"))
def export_stage(run: Run, carry: Carry) -> Carry:
    """pruned.onnx, checked against the masked model it came from on held-out inputs."""
    from ..exporters import verify_onnx

    run.export(carry.small, "pruned.onnx")
    check_inputs = first_batch(run.val, 64) if run.val is not None else run.example
    parity = verify_onnx(run.model, run.out / "pruned.onnx", check_inputs)
    return replace(carry, check_inputs=check_inputs, parity=parity)


@stage("fidelity", needs=("small",), gives=("fidelity",), keys=("boxes",))
def fidelity_stage(run: Run, carry: Carry) -> Carry:
    """pruned.onnx against dense.onnx, both run in ONNX Runtime on up to 64 held-out inputs (training
    inputs without any, the example inputs without either): per output, the relative error and the
    cosine similarity; the top-1 agreement of a classifier; with ``boxes = "yolo"``, the mAP@0.5 of
    the pruned model's boxes against the dense model's."""
    from ..exporters.fidelity import box_map50, output_fidelity, top1_agreement, yolo_boxes
    from ..exporters.onnx_module import OnnxModule

    source = run.val if run.val is not None else run.train
    inputs = first_batch(source, 64) if source is not None else run.example
    items = inputs if isinstance(inputs, tuple) else (inputs,)
    pruned_file = OnnxModule(run.out / "pruned.onnx")
    dense, pruned = OnnxModule(run.out / "dense.onnx")(*items), pruned_file(*items)
    flat_dense, flat_pruned = flat_outputs(dense), flat_outputs(pruned)
    fidelity: dict[str, Any] = {"samples": int(items[0].shape[0]), "outputs": [
        {**asdict(f), "name": name} for f, name in zip(output_fidelity(dense, pruned), pruned_file.output_names)]}
    if len(flat_dense) == 1 and is_class_scores(flat_dense[0]):
        fidelity["top1_agreement"] = top1_agreement(flat_dense[0], flat_pruned[0])
    if run.config.boxes == "yolo":
        dense_boxes, pruned_boxes = yolo_boxes(flat_dense[0]), yolo_boxes(flat_pruned[0])
        fidelity["dense_boxes"] = sum(len(scores) for _, scores, _ in dense_boxes)
        fidelity["pruned_boxes"] = sum(len(scores) for _, scores, _ in pruned_boxes)
        # no dense box to find: the mAP says nothing (an untrained detector scores every anchor below conf)
        fidelity["box_map50"] = box_map50(dense_boxes, pruned_boxes) if fidelity["dense_boxes"] else None
    return replace(carry, fidelity=fidelity)


@stage("quantize", needs=("small", "check_inputs"), gives=("quantized",),
       keys=("quantize", "quantize_mode", "calibration_method", "calibration_batches", "quantize_per_channel",
             "quantize_reduce_range", "quantize_target_cpu", "quantize_exclude", "int8_min_agreement",
             "int8_max_accuracy_drop", "int8_holdout", "qat_epochs", "qat_lr"))
def quantize_stage(run: Run, carry: Carry) -> Carry:
    """``quantize = "int8"``: INT8 files made, evaluated and gated in ORT (QAT when PTQ fails it).
    Without validation data, the gate scores on training data held out from calibration and QAT."""
    from ..exporters.quantize import int8_data, needs_reduced_range, quantize_run

    c = run.config
    if not c.quantize:
        return carry
    data = int8_data(run.train, run.val, holdout=c.int8_holdout, seed=c.seed)
    retrain = None
    if c.qat_epochs:
        # QAT reads what calibration reads (never the gate's holdout), with the weight range ORT will use
        reduce_range = (c.quantize_reduce_range if c.quantize_reduce_range is not None
                        else needs_reduced_range(c.quantize_target_cpu))
        train = run.train if data.split == "validation" else make_loader(data.calibration, c.batch_size, shuffle=True,
                                                                          seed=c.seed)
        retrain = _qat(run, carry.small, carry.check_inputs, train=train, reduce_range=reduce_range)
    return replace(carry, quantized=quantize_run(run.out, c, data, retrain))


def _qat(run: Run, small: nn.Module, check_inputs: Any, *, train: DataLoader, reduce_range: bool
         ) -> Callable[[Path], None]:
    """The retraining ``quantize_run`` calls when post-training INT8 fails its gate: the compacted
    model retrained through INT8 fake quantization on ``train`` with the weight range ORT will use
    (``reduce_range``: 7-bit weights), exported, checked for parity."""
    from ..exporters import verify_onnx
    from .qat import qat_retrain

    def retrain(path: Path) -> None:
        c = run.config
        net = qat_retrain(small, train, c.qat_epochs, lr=c.qat_lr, seed=c.seed, momentum=c.momentum,
                          weight_decay=c.weight_decay, reduce_range=reduce_range)
        run.export(net, path.name)
        verify_onnx(net, path, check_inputs)

    return retrain


@stage("benchmark", gives=("latency",), keys=("bench_batches", "bench_threads", "bench_min_runs",
                                              "bench_min_seconds", "bench_isolate", "seed"))
def bench_stage(run: Run, carry: Carry) -> Carry:
    """dense.onnx, pruned.onnx and any INT8 files timed in ONNX Runtime."""
    from ..bench import benchmark

    c, out = run.config, run.out
    files = {name: run.sized(Path(path)) for name, path in {
        "dense": out / "dense.onnx", "pruned": out / "pruned.onnx",
        **(carry.quantized.models if carry.quantized else {})}.items()}
    latency = benchmark(files, batch_sizes=c.bench_batches, threads=c.bench_threads, min_runs=c.bench_min_runs,
                        min_seconds=c.bench_min_seconds, seed=c.seed, isolate=c.bench_isolate)
    return replace(carry, latency=latency)


@stage("report", needs=("small", "cuts", "masks", "parity", "fidelity", "latency"), gives=("report",))
def report_stage(run: Run, carry: Carry) -> Carry:
    """report.json, report.md and the plots; then the staging folder is renamed into place."""
    from ..bench import write_report
    from ..bench.profile import layer_table
    from ..exporters import count_onnx, sparse_storage
    from ..exporters.onnx_module import OnnxModule
    from ..prune.lowering import LoweredConv

    c, out, facts, plan, admm = run.config, run.out, run.state.facts, carry.plan, carry.admm
    dense_file, pruned_file = run.sized(out / "dense.onnx"), run.sized(out / "pruned.onnx")
    dense_cost, pruned_cost = count_onnx(dense_file), count_onnx(pruned_file)
    mac_ratio = dense_cost.macs / max(pruned_cost.macs, 1)
    storage = sparse_storage(out / "pruned.onnx")  # what irregular sparsity buys: bytes, not speed
    byte_ratios = {b: dense_cost.bytes_at(b) / max(pruned_cost.bytes_at(b), 1) for b in c.bench_batches}
    report = {
        "model": run.name,
        "dense": {"accuracy": carry.dense_accuracy, "macs": dense_cost.macs, "params": dense_cost.params,
                  "onnx": "dense.onnx", "source": str(run.dense_onnx) if run.dense_onnx is not None else None},
        "pruned": {"accuracy": carry.pruned_accuracy, "macs": pruned_cost.macs, "params": pruned_cost.params,
                   "onnx": "pruned.onnx", "hard_pruned_accuracy": facts.get("hard_pruned_accuracy"),
                   "weight_sparsity": sparsity_of(carry.masks)},
        "mac_ratio": mac_ratio,
        "sparse_storage": {"weights": storage.weights, "zeros": storage.zeros, "sparsity": storage.sparsity,
                           "dense_bytes": storage.dense_bytes, "csr_bytes": storage.sparse_bytes,
                           "compression": storage.compression},
        "param_ratio": dense_cost.params / max(pruned_cost.params, 1),
        "parity": {"max_abs_diff": carry.parity, "ok": True},
        "objective": {"mode": run.mode, "asked": c.objective,
                      "teacher": (None if carry.teacher is None else
                                  "onnx" if isinstance(carry.teacher, OnnxModule) else "torch"),
                      # what the models were scored with: no labels, no accuracy (fidelity says how close they are)
                      "score": ("metric" if run.metric is not None else "top-1 accuracy"
                                if carry.dense_accuracy is not None else "none (no labels): see fidelity")},
        "fidelity": carry.fidelity,
        "latency": carry.latency.to_rows(dense="dense", pruned="pruned", mac_ratio=mac_ratio, byte_ratios=byte_ratios),
        "skipped_providers": [{"provider": p, "reason": r} for p, r in carry.latency.skipped],
        "admm": [r.__dict__ for r in admm.history] if admm is not None else [],
        "prune_method": run.method,
        "reconstruction": facts.get("reconstruction"),
        "admm_outcome": facts.get("admm_outcome"),
        "admm_stages": [{"stage": int(k), **v} for k, v in sorted(facts.get("stages", {}).items(),
                                                                   key=lambda kv: int(kv[0]))],
        "ratio_shortfall": facts.get("ratio_shortfall"),
        "groups": [cut.__dict__ for cut in carry.cuts],
        "left_alone": [{"layer": layer, "reason": why} for layer, why in plan.skipped] if plan is not None else [],
        "budget": facts.get("budget"),
        "lowered": [name for name, m in carry.small.named_modules() if isinstance(m, LoweredConv)],
        "layers": [row.__dict__ for row in layer_table(dense_file, pruned_file,
                                                       batch=max(c.bench_batches), threads=c.bench_threads)],
        "timings": dict(facts["timings"]),
        "config": c.to_dict(),
        "seed": c.seed,
        "versions": versions(),
    }
    if carry.quantized is not None:
        report.update(carry.quantized.report(out, carry.latency, pruned_cost.macs))
    write_report(out, report)
    shutil.rmtree(out / SIZED, ignore_errors=True)
    run.folder.finish()
    return replace(carry, report=json.loads(json.dumps(report)))


def versions() -> dict[str, str]:
    """The versions report.json records."""
    import onnx
    import onnxruntime

    from ..bench.runtime import installed_ort
    from ..version import __version__

    return {"structadmm": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "onnxruntime_package": "+".join(installed_ort()) or "unknown",
            "python": platform.python_version(), "machine": platform.machine(), "cpu_count": str(os.cpu_count())}


#: after training, on rank 0: from the masked model to the finished run folder
PUBLISHING = (compact_stage, export_stage, fidelity_stage, quantize_stage, bench_stage, report_stage)


@stage("dense as given", gives=("masks", "dense_accuracy"))
def given_stage(run: Run, carry: Carry) -> Carry:
    """For :func:`~structadmm.pipeline.compress.compact_run`: the model pruned in the caller's own
    loop, exported at full size as dense.onnx (the dense architecture's cost)."""
    started = time.perf_counter()
    # the pruning the weights hold: zeros in every Conv/Linear weight (for the report's weight_sparsity)
    masks = {name: p.detach().ne(0).float() for name, p in run.model.named_parameters() if p.dim() > 1}
    accuracy = run.score(run.model)
    run.export(run.model, "dense.onnx")
    run.state.facts["timings"]["dense_export_s"] = time.perf_counter() - started
    return replace(carry, masks=masks, dense_accuracy=accuracy)


#: :func:`~structadmm.pipeline.compress.compact_run`: the conversion stage alone
CONVERTING = (given_stage, *PUBLISHING)

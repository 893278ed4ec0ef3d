"""The pipeline's settings: one pydantic model, loadable from TOML, every value type- and range-checked.

The CLI's flags, a ``--config FILE.toml`` and keyword construction in Python all fill the same
:class:`CompressConfig`, and it is validated in this one place: a wrong type (``admm_rounds =
"3"``, ``dense_epochs = 1.5``), a value out of range, a non-finite number or an unknown key is a
one-line :class:`~structadmm.errors.StructADMMError` naming the key. The resolved config is
written to report.json, so a run can always be repeated.

To add a setting, add one annotated field (type, default, range) to the class.
"""

from __future__ import annotations

from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..cpu import INT8_TARGETS
from ..errors import StructADMMError
from ..files import read_toml
from ..prune.sparsity import parse_sparsity

_SOURCE: ContextVar[str] = ContextVar("config_source", default="config")  # what errors name: a file, "flags"


class CompressConfig(BaseModel):
    """Every setting of a run. Types are strict: an integer setting takes an integer, not 2.0 or "2"."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True, allow_inf_nan=False)

    # what to prune
    sparsity: str = "filter"  # filter | channel | shape | irregular, or a combination: filter+shape
    # the first layer and the classifier are left whole unless prune_ends (see the recipe block)
    ratio: float = Field(0.75, gt=0, lt=1, description="the fraction of groups removed in every prunable layer")
    plan: str | None = None  # TOML plan file with per-layer settings (overrides sparsity/ratio)
    # per-layer ratios chosen for this MAC reduction (overrides ratio), or for this measured ORT CPU speedup
    target_macs: float | None = Field(None, gt=1, description="a reduction factor, e.g. 4 for 4x fewer MACs")
    target_latency: float | None = Field(None, gt=1, description="a speedup over dense, e.g. 3 for 3x faster")
    # kept channels rounded up to a multiple (see sparsity.keep_count): ONNX Runtime's CPU kernels work on
    # blocks of 8 (AVX2) or 16 (AVX-512) channels; 1 keeps the exact ratios
    channel_multiple: int = Field(16, ge=1)
    # what training minimises: "labels" (cross-entropy on integer class labels), "distill" (the model as given is
    # the teacher and every output is matched; no labels needed, dense training skipped) or "auto" (distill when
    # the data has no labels or the model's output is not one [batch, classes] tensor, else labels)
    objective: Literal["labels", "distill", "auto"] = "auto"
    # how distillation matches an output: "auto" (KL for a single [batch, classes] output, scaled MSE otherwise),
    # "mse" (every output, e.g. an embedder's single [batch, dim] output) or "kl" (every output is class scores)
    distill_loss: Literal["auto", "mse", "kl"] = "auto"
    # the report also scores the pruned model's boxes against the dense model's (mAP@0.5): "yolo" decodes an
    # Ultralytics-style [batch, 4 + classes, anchors] output (cx, cy, w, h, class scores) and applies NMS
    boxes: Literal["yolo"] | None = None
    # distillation clips the gradient's global norm to this before every step (0: off): its outputs are matched
    # relative to their spread, which makes plain SGD unstable on outputs that barely vary
    distill_grad_clip: float = Field(1.0, ge=0)
    # how the masks are found: "admm" (the paper's method: ADMM rounds, then the hard prune), "oneshot" (the
    # dense weights projected by magnitude at once, then masked retraining for the ADMM epochs plus
    # retrain_epochs, the same budget) or "auto" (oneshot when the run distils without admm_stages, else admm:
    # with 1,000-5,000 unlabeled samples one-shot won or tied on validation, benchmarks/limited_data.py)
    prune_method: Literal["auto", "admm", "oneshot"] = "auto"
    # after each hard prune, refit every kept conv and linear layer by least squares so that it reproduces the
    # dense layer's output on reconstruct_samples training inputs (no labels, no gradient; prune/reconstruct.py).
    # Off by default: it lifted the PP-OCRv4 detector's fidelity (cosine 0.27 -> 0.78) but cost the text-direction
    # classifier accuracy after masked retraining (benchmarks/results/no_labels_*_recon.md)
    reconstruct: bool = False
    reconstruct_samples: int = Field(16, ge=1)  # inputs in the one batch both passes run (memory grows with it)
    # training (the built-in trainer; SGD with momentum and a cosine schedule per phase)
    dense_epochs: int = Field(12, ge=0)  # train the dense model first; 0 for an already trained model (distill: unused)
    admm_rounds: int = Field(8, ge=1)  # Z/U updates
    admm_epochs: int = Field(2, ge=1)  # epochs of W-steps between two Z/U updates
    retrain_epochs: int = Field(8, ge=0)  # masked retraining after the hard prune
    lr: float = Field(0.05, gt=0)
    admm_lr: float = Field(0.03, gt=0)
    retrain_lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    batch_size: int = Field(64, ge=1)
    # the ADMM penalty schedule
    rho: float = Field(0.05, gt=0)
    rho_growth: float = Field(1.6, ge=1)
    rho_max: float = Field(5.0, gt=0)  # at least rho
    # benchmarking
    bench_batches: list[int] = Field(default_factory=lambda: [1, 64], min_length=1)
    bench_threads: int = Field(2, ge=1)
    bench_min_runs: int = Field(30, ge=1)
    bench_min_seconds: float = Field(3.0, ge=0)
    bench_isolate: bool = True  # each model alone in its own process, alternating (False: interleaved in one)
    # the run
    seed: int = Field(0, ge=0)
    device: str = Field("cpu", pattern=r"^(cpu|cuda|cuda:\d+)$", description="cpu, cuda or cuda:N")

    # --- INT8 quantization (ONNX Runtime; exporters/quantize.py) -------------------------------
    quantize: Literal["int8"] | None = None  # quantize pruned.onnx (and dense.onnx for reference) after export
    quantize_mode: Literal["auto", "static", "dynamic"] = "auto"  # dynamic: weights only; auto: dynamic if Linear-heavy
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    calibration_batches: int = Field(8, ge=1)  # batches of training data (of batch_size) the calibration reads
    quantize_per_channel: bool = True
    # weights in 7 bits ([-64, 64]); unset: what quantize_target_cpu needs (7 bits on x86 without VNNI, whose int8
    # kernels saturate on full-range per-channel weights; cpu.reduced_range_for)
    quantize_reduce_range: bool | None = None
    quantize_target_cpu: str = Field("auto", description=(
        "the CPU the INT8 model is for, which sets its weights' range unless quantize_reduce_range is given: "
        + "; ".join(f"{name}: {meaning}" for name, meaning in INT8_TARGETS.items())))
    quantize_exclude: list[str] = Field(default_factory=list)  # ONNX node names left in FP32 (see sensitivity)
    int8_min_agreement: float = Field(0.98, ge=0, le=1)  # INT8 gate: top-1 agreement with the FP32 model
    int8_max_accuracy_drop: float = Field(0.005, ge=0, le=1)  # INT8 gate: FP32 minus INT8 accuracy (0.005 = 0.5 pt)
    int8_holdout: float = Field(0.1, gt=0, lt=1, description=(
        "without validation data, the fraction of the training data held out from INT8 calibration and QAT for "
        "the INT8 gate to score on (report.json's quantized.gate_data says which split the gate used)"))
    # quantization-aware retraining (pipeline/qat.py) when post-training INT8 fails the gate: epochs of masked
    # retraining through INT8 fake quantization, then quantized again (0: off)
    qat_epochs: int = Field(0, ge=0)
    qat_lr: float = Field(0.001, gt=0)
    # --- end INT8 quantization ------------------------------------------------------------------

    # --- the ADMM recipe (benchmarks/accuracy_vs_baselines.py validates these) --------------------
    # restart the cosine learning rate every ADMM round (chosen on MNIST-1D validation, see README)
    admm_lr_restart: bool = True
    admm_tolerance: float = Field(0.0, ge=0)  # hard prune only once the primal residual ||W-Z||/||W|| is at most this
    admm_extra_rounds: int = Field(0, ge=0)  # at most this many rounds beyond admm_rounds while above admm_tolerance
    distill: float = Field(0.0, ge=0, lt=1)  # weight of distillation from the dense model in masked retraining; 0: off
    distill_temperature: float = Field(4.0, gt=0)  # of the KL on class scores, here and with objective = "distill"
    prune_ends: bool = False  # False: the first layer and the classifier are left whole by uniform plans
    prune_residual: bool = False  # also prune a transformer's residual stream (channels its LayerNorms normalise)
    # progressive stages for extreme ratios: ADMM at each of these ratios in turn, each followed by a hard
    # prune and admm_stage_retrain_epochs of masked retraining, then ADMM at `ratio` with what the stages
    # pruned held at zero; every stage runs the whole ADMM schedule (admm_rounds x admm_epochs)
    admm_stages: list[float] = Field(default_factory=list)
    admm_stage_retrain_epochs: int = Field(1, ge=0)
    # --- end of the ADMM recipe ----------------------------------------------------------------------

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise StructADMMError(describe(exc, _SOURCE.get())) from None

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise StructADMMError(describe(exc, "config")) from None

    @field_validator("sparsity")
    @classmethod
    def _known_sparsity(cls, value: str) -> str:
        try:
            parse_sparsity(value)
        except StructADMMError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("quantize_target_cpu")
    @classmethod
    def _known_target_cpu(cls, value: str) -> str:
        if value not in INT8_TARGETS:
            raise ValueError(f"must be one of {', '.join(INT8_TARGETS)}")
        return value

    @field_validator("admm_stages", mode="before")
    @classmethod
    def _stages_as_list(cls, value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value

    @field_validator("admm_stages")
    @classmethod
    def _rising_stages(cls, value: list[float]) -> list[float]:
        if any(not 0 < r < 1 for r in value):
            raise ValueError("every stage is a ratio in (0, 1)")
        if any(b <= a for a, b in zip(value, value[1:])):
            raise ValueError("stages must rise strictly (each prunes more than the one before)")
        return value

    @field_validator("bench_batches", mode="before")
    @classmethod
    def _batches_as_list(cls, value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value

    @field_validator("bench_batches")
    @classmethod
    def _positive_batches(cls, value: list[int]) -> list[int]:
        if any(b < 1 for b in value):
            raise ValueError("batch sizes must be >= 1")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "CompressConfig":
        if self.target_macs is not None and self.target_latency is not None:
            raise ValueError("give target_macs or target_latency, not both")
        if self.rho_max < self.rho:
            raise ValueError(f"rho_max ({self.rho_max}) must be >= rho ({self.rho})")
        if self.admm_stages:
            self._check_stages()
            if self.prune_method == "oneshot":
                raise ValueError("admm_stages are stages of ADMM; they cannot be combined with prune_method = oneshot")
        return self

    def method_for(self, mode: str) -> str:
        """``prune_method`` resolved for a run whose objective resolved to ``mode`` ("labels" or
        "distill"): "admm" or "oneshot"."""
        if self.prune_method != "auto":
            return self.prune_method
        return "oneshot" if mode == "distill" and not self.admm_stages else "admm"

    def _check_stages(self) -> None:
        """admm_stages rise to the run's uniform ratio, channel by channel: what it can be combined with."""
        other = [key for key in ("plan", "target_macs", "target_latency") if getattr(self, key) is not None]
        if other:
            raise ValueError(f"admm_stages stages the uniform ratio; it cannot be combined with {', '.join(other)}")
        kinds = [k.value for k in parse_sparsity(self.sparsity) if k.value not in ("filter", "channel")]
        if kinds:
            raise ValueError(f"admm_stages works with filter and channel sparsity only, not {'+'.join(kinds)}")
        if self.admm_stages[-1] > self.ratio or any(r >= self.ratio for r in self.admm_stages[:-1]):
            raise ValueError(f"admm_stages {self.admm_stages} must rise to ratio {self.ratio}, the last stage")

    def stage_ratios(self) -> list[float]:
        """The ratio of every ADMM stage, ending at ``ratio`` (just ``[ratio]`` without admm_stages)."""
        return [r for r in self.admm_stages if r < self.ratio] + [self.ratio]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "config") -> "CompressConfig":
        """Settings from a mapping (a TOML file's contents, the CLI's flags); ``source`` names it in errors."""
        token = _SOURCE.set(source)
        try:
            return cls(**values)
        finally:
            _SOURCE.reset(token)

    @classmethod
    def from_toml(cls, path: str | Path, overrides: Mapping[str, Any] | None = None) -> "CompressConfig":
        """Settings from a TOML file (top-level keys as in this class), then ``overrides``."""
        values = read_toml(path, "config file")
        config = cls.from_mapping(values, source=str(path))  # the file's own mistakes name the file
        return cls.from_mapping({**config.to_dict(), **overrides}, source=f"{path} with flags") if overrides else config

    def replace(self, **changes: Any) -> "CompressConfig":
        return self.from_mapping({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


def describe(exc: ValidationError, source: str) -> str:
    """A pydantic error as one line that names every offending key."""
    known = ", ".join(CompressConfig.model_fields)
    unknown = [str(e["loc"][0]) for e in exc.errors() if e["type"] == "extra_forbidden"]
    if unknown:
        return f"{source}: unknown key(s) {', '.join(unknown)}; known keys: {known}"
    problems = []
    for e in exc.errors(include_url=False):
        key = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in e["loc"]).lstrip(".")
        message = e["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
        field = CompressConfig.model_fields.get(str(e["loc"][0])) if e["loc"] else None
        if e["type"] == "string_pattern_mismatch" and field is not None and field.description:
            message = f"must be {field.description}"
        elif field is not None and field.description:
            message += f" ({field.description})"
        problems.append(f"{key} = {e['input']!r}: {message}" if key else message)
    return f"{source}: " + "; ".join(problems)

"""The pipeline's settings: one dataclass, loadable from TOML, unknown keys rejected.

The CLI's flags and a ``--config FILE.toml`` fill the same :class:`CompressConfig`, and the
resolved config is written to report.json, so a run can always be repeated.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import StructADMMError
from .sparsity import check_ratio, parse_sparsity


@dataclass
class CompressConfig:
    # what to prune
    sparsity: str = "filter"  # filter | channel | shape | irregular, or a combination: filter+shape
    ratio: float = 0.5  # fraction of groups removed in every prunable layer
    plan: str | None = None  # TOML plan file with per-layer settings (overrides sparsity/ratio)
    target_macs: float | None = None  # per-layer ratios chosen for this MAC reduction, e.g. 4.0 (overrides ratio)
    target_latency: float | None = None  # per-layer ratios chosen for this measured ORT CPU speedup, e.g. 3.0
    # kept channels rounded up to a multiple (see sparsity.keep_count): ONNX Runtime's CPU kernels work on
    # blocks of 8 (AVX2) or 16 (AVX-512) channels; 1 keeps the exact ratios
    channel_multiple: int = 16
    # training (the built-in trainer; SGD with momentum and a cosine schedule per phase)
    dense_epochs: int = 12  # train the dense model first; 0 for an already trained model
    admm_rounds: int = 8  # Z/U updates
    admm_epochs: int = 2  # epochs of W-steps between two Z/U updates
    retrain_epochs: int = 8  # masked retraining after the hard prune
    lr: float = 0.05
    admm_lr: float = 0.03
    retrain_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    # the ADMM penalty schedule
    rho: float = 0.05
    rho_growth: float = 1.6
    rho_max: float = 5.0
    # benchmarking
    bench_batches: list[int] = field(default_factory=lambda: [1, 64])
    bench_threads: int = 2
    bench_min_runs: int = 30
    bench_min_seconds: float = 3.0
    bench_isolate: bool = True  # each model alone in its own process, alternating (False: interleaved in one)
    # the run
    seed: int = 0
    device: str = "cpu"

    # --- INT8 quantization (ONNX Runtime; exporters/quantize.py) -------------------------------
    quantize: str | None = None  # "int8": quantize pruned.onnx (and dense.onnx for reference) after export
    quantize_mode: str = "auto"  # static (QDQ, calibrated) | dynamic (weights only) | auto (dynamic if Linear-heavy)
    calibration_method: str = "minmax"  # minmax | entropy | percentile
    calibration_batches: int = 8  # batches of training data (of batch_size) the calibration reads
    quantize_per_channel: bool = True
    quantize_exclude: list[str] = field(default_factory=list)  # ONNX node names left in FP32 (see sensitivity)
    int8_min_agreement: float = 0.98  # INT8 gate: top-1 agreement with the FP32 model on held-out data
    int8_max_accuracy_drop: float = 0.005  # INT8 gate: FP32 accuracy minus INT8 accuracy (0.005 = 0.5 pt)
    # --- end INT8 quantization ------------------------------------------------------------------

    def __post_init__(self) -> None:
        parse_sparsity(self.sparsity)
        self.ratio = check_ratio(self.ratio)
        for name in ("dense_epochs", "admm_rounds", "admm_epochs", "retrain_epochs", "seed"):
            if int(getattr(self, name)) < 0:
                raise StructADMMError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "admm_lr", "retrain_lr", "rho", "batch_size", "bench_threads"):
            if not getattr(self, name) > 0:
                raise StructADMMError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("target_macs", "target_latency"):
            value = getattr(self, name)
            if value is not None and not float(value) > 1:
                raise StructADMMError(f"{name} is a reduction factor and must be > 1 (e.g. 4 for 4x), got {value}")
        if self.target_macs is not None and self.target_latency is not None:
            raise StructADMMError("give target_macs or target_latency, not both")
        if int(self.channel_multiple) < 1:
            raise StructADMMError(f"channel_multiple must be >= 1, got {self.channel_multiple}")
        if self.rho_growth < 1 or self.rho_max < self.rho:
            raise StructADMMError("rho_growth must be >= 1 and rho_max >= rho")
        if not self.bench_batches or any(int(b) < 1 for b in self.bench_batches):
            raise StructADMMError(f"bench_batches must be positive batch sizes, got {self.bench_batches}")
        if self.device not in ("cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise StructADMMError(f"device must be cpu or cuda, got {self.device!r}")
        self._check_quantize()

    def _check_quantize(self) -> None:
        """The INT8 quantization block's settings."""
        if self.quantize not in (None, "int8"):
            raise StructADMMError(f"quantize must be int8 (or left out), got {self.quantize!r}")
        if self.quantize_mode not in ("auto", "static", "dynamic"):
            raise StructADMMError(f"quantize_mode must be auto, static or dynamic, got {self.quantize_mode!r}")
        if self.calibration_method not in ("minmax", "entropy", "percentile"):
            raise StructADMMError(f"calibration_method must be minmax, entropy or percentile, got {self.calibration_method!r}")
        if int(self.calibration_batches) < 1:
            raise StructADMMError(f"calibration_batches must be >= 1, got {self.calibration_batches}")
        if not isinstance(self.quantize_exclude, list) or not all(isinstance(n, str) for n in self.quantize_exclude):
            raise StructADMMError("quantize_exclude must be a list of ONNX node names")
        if not 0 <= self.int8_min_agreement <= 1:
            raise StructADMMError(f"int8_min_agreement must be in [0, 1], got {self.int8_min_agreement}")
        if not 0 <= self.int8_max_accuracy_drop <= 1:
            raise StructADMMError(f"int8_max_accuracy_drop must be in [0, 1], got {self.int8_max_accuracy_drop}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "config") -> "CompressConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise StructADMMError(f"{source}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        try:
            return cls(**values)
        except TypeError as exc:
            raise StructADMMError(f"{source}: {exc}") from None

    @classmethod
    def from_toml(cls, path: str | Path, overrides: Mapping[str, Any] | None = None) -> "CompressConfig":
        """Settings from a TOML file (top-level keys as in this class), then ``overrides``."""
        values = read_toml(path, "config file")
        return cls.from_mapping({**values, **(overrides or {})}, source=str(path))

    def replace(self, **changes: Any) -> "CompressConfig":
        return self.from_mapping({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """A TOML file's contents; a one-line error naming ``what`` it was meant to be otherwise."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except OSError as exc:
        raise StructADMMError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise StructADMMError(f"{what} {path} is not valid TOML: {exc}") from None

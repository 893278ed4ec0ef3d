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
    ratio: float = 0.75  # fraction of groups removed in every prunable layer (but the first and the classifier)
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
    # the run
    seed: int = 0
    device: str = "cpu"

    # --- the ADMM recipe (benchmarks/accuracy_vs_baselines.py validates these) --------------------
    # restart the cosine learning rate every ADMM round (off: it lost on MNIST-1D validation, see README)
    admm_lr_restart: bool = False
    admm_tolerance: float = 0.0  # hard prune only once the primal residual ||W-Z||/||W|| is at most this
    admm_extra_rounds: int = 0  # at most this many rounds beyond admm_rounds while above admm_tolerance
    distill: float = 0.0  # weight in [0, 1) of distillation from the dense model in masked retraining; 0: off
    distill_temperature: float = 4.0
    prune_ends: bool = False  # False: the first layer and the classifier are left whole by uniform plans

    def _check_recipe(self) -> None:
        if not self.admm_tolerance >= 0 or int(self.admm_extra_rounds) < 0:
            raise StructADMMError("admm_tolerance and admm_extra_rounds must be >= 0")
        if not 0 <= self.distill < 1:
            raise StructADMMError(f"distill is a loss weight in [0, 1), got {self.distill}")
        if not self.distill_temperature > 0:
            raise StructADMMError(f"distill_temperature must be > 0, got {self.distill_temperature}")
    # --- end of the ADMM recipe ----------------------------------------------------------------------

    def __post_init__(self) -> None:
        self._check_recipe()
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

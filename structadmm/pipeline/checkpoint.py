"""Resumable runs: the staging run folder, its lock, and the checkpoint that lets
:func:`~structadmm.pipeline.compress.compress` continue an interrupted run where it stopped.

A run is written into ``.{name}.partial`` next to its final folder ``name`` and renamed into
place when everything has passed. The staging name carries no process id, so a later process
finds an interrupted run from the final folder's name alone (``structadmm run --resume DIR``).
Inside it, ``checkpoint/`` holds

* ``state.pt``: everything needed to continue (see :meth:`RunState.save`), rewritten
  atomically (temp file, fsync, ``os.replace``) at the start of each phase (dense, admm,
  retrain; with ``admm_stages`` also each earlier stage's admm-i and retrain-i) and at the end of each of its epochs — so also after every ADMM round. It is read
  with ``torch.load(weights_only=True)``: RNG states are stored as tensors, numbers and lists;
* ``lock``: held with ``flock`` by the process writing the run. The kernel releases it when
  that process dies, even by SIGKILL, which tells a live run from an interrupted one.

``checkpoint/`` is deleted just before the rename, so a finished folder holds only the run's
outputs, and a finished folder is never opened for resuming.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import StructADMMError
from ..files import atomic_path
from ..prune.admm import ADMM
from ..prune.plan import Masks
from .train import TrainerState

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so two processes on one run go undetected
    fcntl = None

PHASES = ("dense", "admm", "retrain")


def phases_of(stages: int) -> tuple[str, ...]:
    """The phases of a run with ``stages`` ADMM stages: every stage but the last adds ``admm-i`` and ``retrain-i``."""
    return ("dense", *(f"{name}-{i}" for i in range(1, stages) for name in ("admm", "retrain")), "admm", "retrain")
FORMAT = 2  # 2: the pruning plan is saved (facts["plan"]) once fixed, and a resume uses it


class ResumeMismatch(StructADMMError):
    """A resume whose inputs do not match the interrupted run; the interrupted run is left as it was."""


def staging_of(final: Path) -> Path:
    return final.with_name(f".{final.name}.partial")


def final_of(path: Path) -> Path:
    """The run folder a path names: the final folder itself, or its ``.{name}.partial``."""
    if path.name.startswith(".") and path.name.endswith(".partial"):
        return path.with_name(path.name[1:-len(".partial")])
    return path


class RunFolder:
    """The staging folder of one run: created or reopened, checkpointed, then finished or discarded."""

    def __init__(self, final: Path):
        self.final = final
        self.staging = staging_of(final)
        self._lock: int | None = None

    @property
    def checkpoint(self) -> Path:
        return self.staging / "checkpoint" / "state.pt"

    def create(self) -> None:
        """Take the staging folder for a fresh run; one that holds a checkpoint is refused."""
        if self.staging.exists():
            self._acquire()
            if self.checkpoint.exists():
                self.release()
                raise StructADMMError(
                    f"{self.staging} holds an interrupted run of {self.final}; continue it with "
                    f"--resume {self.final}, or delete {self.staging} to start over"
                )
            shutil.rmtree(self.staging)  # stopped before its first checkpoint: nothing to keep
            self.release()
        self.staging.mkdir(parents=True)
        self._acquire()

    def resume(self, identity: dict[str, Any]) -> dict[str, Any]:
        """Reopen an interrupted run and return its checkpoint; ``identity`` must match it."""
        if self.final.exists() and (not self.final.is_dir() or any(self.final.iterdir())):
            raise StructADMMError(f"{self.final} is a finished run; there is nothing to resume")
        if not self.checkpoint.parent.is_dir():
            raise StructADMMError(
                f"no interrupted run to resume in {self.final}: {self.staging} does not exist or has no checkpoint; "
                "give the --out folder of a run that was stopped, or start a new run without --resume"
            )
        self._acquire()
        try:
            state = self._load()
            problem = mismatch(state["identity"], identity)
            if problem:
                raise StructADMMError(f"cannot resume {self.final}: {problem}")
            if state["phase"] != "dense" and not (self.staging / "dense.onnx").exists():
                raise StructADMMError(f"the checkpoint in {self.staging} is past the dense phase but dense.onnx is "
                                      f"missing; delete {self.staging} and start over")
        except BaseException:
            self.release()
            raise
        for leftover in self.staging.rglob(".*.tmp"):  # atomic writes cut short by the kill
            leftover.unlink()
        return state

    def save(self, state: dict[str, Any]) -> None:
        with atomic_path(self.checkpoint) as tmp:
            torch.save(state, tmp)

    def finish(self) -> None:
        """Drop the checkpoint and rename the staging folder to the final one."""
        shutil.rmtree(self.checkpoint.parent)
        os.replace(self.staging, self.final)
        self.release()

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        self.release()

    def keep_if_resumable(self) -> None:
        """After an interruption: keep the staging folder for --resume when it has a checkpoint."""
        if self.checkpoint.exists():
            self.release()
        else:
            self.discard()

    def release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor drops the flock
            self._lock = None

    def _acquire(self) -> None:
        path = self.checkpoint.parent / "lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise StructADMMError(
                    f"another process (pid {holder}) is writing {self.final} right now; wait for it or stop it"
                ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock = fd

    def _load(self) -> dict[str, Any]:
        try:
            state = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise StructADMMError(
                f"{self.staging} has no checkpoint yet (the run stopped before its first one); "
                "start the run again without --resume, which replaces it"
            ) from None
        except Exception as exc:
            raise StructADMMError(f"cannot read the checkpoint {self.checkpoint} ({type(exc).__name__}: {exc}); "
                                  f"delete {self.staging} and start over") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise StructADMMError(f"{self.checkpoint} is not a checkpoint this version of structadmm "
                                  f"writes; delete {self.staging} and start over")
        return state


def run_identity(config: dict[str, Any], model_name: str, model: nn.Module, train_samples: int | None,
                 world_size: int) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one for the result to be the same."""
    return {"config": config, "model": model_name,
            "params": {n: list(t.shape) for n, t in model.state_dict().items()},
            "train_samples": train_samples, "world_size": world_size}


def mismatch(stored: dict[str, Any], current: dict[str, Any]) -> str | None:
    """One line saying how ``current`` differs from the checkpoint's identity, or None."""
    if stored["config"] != current["config"]:
        keys = sorted(k for k in stored["config"].keys() | current["config"].keys()
                      if stored["config"].get(k) != current["config"].get(k))
        diffs = ", ".join(f"{k} {current['config'].get(k)!r} here, {stored['config'].get(k)!r} there" for k in keys)
        return (f"the config differs from the interrupted run's ({diffs}); resume with the settings it was "
                "started with (the same --config file and flags)")
    if stored["model"] != current["model"]:
        return f"the interrupted run pruned {stored['model']}, not {current['model']}; resume with the same --model"
    if stored["params"] != current["params"]:
        return (f"this {current['model']} has other parameters or shapes than the interrupted run's; "
                "resume with the same --model")
    if stored["train_samples"] != current["train_samples"]:
        return (f"the interrupted run trained on {stored['train_samples']} samples, this data has "
                f"{current['train_samples']}; resume with the same --data")
    if stored["world_size"] != current["world_size"]:
        return (f"the interrupted run used {stored['world_size']} process(es), this one {current['world_size']}; "
                f"resume with the same number (torchrun --nproc_per_node {stored['world_size']})")
    return None


class RunState:
    """The pipeline state a checkpoint holds, saved as the run goes and restored where it resumes.

    A checkpoint is taken at the start of each phase and after each of its epochs; on resume,
    phases before the checkpoint's are skipped (their results come from ``facts``), and the
    checkpoint's own phase restores weights, ADMM state, RNG states and the trainer's state
    and continues after the recorded epoch. Every RNG-consuming step between two checkpoints is
    re-run from the same RNG state, so a resumed run repeats the uninterrupted one exactly
    (up to non-deterministic kernels).
    """

    def __init__(self, folder: RunFolder | None, identity: dict[str, Any], model: nn.Module,
                 generator: torch.Generator | None, resumed: dict[str, Any] | None,
                 phases: tuple[str, ...] = PHASES):
        self.phases = phases  # in order (see phases_of)
        self.folder = folder  # None on ranks other than 0, which never write
        self.identity = identity
        self.model = model
        self.generator = generator  # the training loader's, whose state decides the shuffle
        self.resumed = resumed
        # results of finished phases: dense_accuracy, plan (PruningPlan.to_state), budget,
        # ratio_shortfall, stages, hard_pruned_accuracy, timings
        self.facts: dict[str, Any] = dict(resumed["facts"]) if resumed else {"timings": {}}
        self.admm: ADMM | None = None
        self.masks: Masks | None = None
        self._phase_start = time.perf_counter()

    def done(self, phase: str) -> bool:
        """Whether the checkpoint resumed from is past ``phase`` (so it is skipped)."""
        return self.resumed is not None and self.phases.index(self.resumed["phase"]) > self.phases.index(phase)

    def resumed_masks(self) -> Masks:
        return {n: m.float() for n, m in self.resumed["masks"].items()}

    def enter(self, phase: str) -> TrainerState | None:
        """Start ``phase``: restore it when the run resumes inside it, else checkpoint its start."""
        resumed = self.resumed
        if resumed is not None and resumed["phase"] == phase:
            self.model.load_state_dict(resumed["model"])
            if self.admm is not None:
                self.admm.load_state_dict(resumed["admm"])
            restore_rng(resumed["rng"], self.generator)
            self._phase_start = time.perf_counter() - resumed["elapsed_s"]
            return resumed["trainer"]
        self._phase_start = time.perf_counter()
        self.save(phase, {"epoch": 0, "optimizer": None, "schedule": None})
        return None

    def leave(self, timing_key: str) -> None:
        self.facts["timings"][timing_key] = time.perf_counter() - self._phase_start

    def save(self, phase: str, trainer: TrainerState) -> None:
        """Checkpoint the run as it stands (rank 0 only; the other ranks hold the same state)."""
        if self.folder is None:
            return
        self.folder.save({
            "format": FORMAT, "identity": self.identity, "phase": phase, "epoch": trainer["epoch"],
            "trainer": trainer, "model": self.model.state_dict(),
            "admm": self.admm.state_dict() if self.admm is not None else None,
            "masks": {n: m.bool() for n, m in self.masks.items()} if self.masks is not None else None,
            "facts": self.facts, "elapsed_s": time.perf_counter() - self._phase_start,
            "rng": capture_rng(self.generator),
        })


def capture_rng(generator: torch.Generator | None) -> dict[str, Any]:
    """torch (CPU and CUDA), numpy, python and ``generator`` states, as tensors and numbers."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss_next},
        "loader": generator.get_state() if generator is not None else None,
    }


def restore_rng(state: dict[str, Any], generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    saved = state["numpy"]
    np.random.set_state(("MT19937", saved["keys"].numpy().astype(np.uint32), saved["pos"], saved["has_gauss"],
                         saved["gauss"]))
    saved = state["python"]
    random.setstate((saved["version"], tuple(saved["state"].tolist()), saved["gauss"]))
    if generator is not None and state["loader"] is not None:
        generator.set_state(state["loader"])

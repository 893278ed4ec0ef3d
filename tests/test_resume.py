"""Resume: a run killed with SIGKILL inside ADMM continues to the uninterrupted run's result.

Both runs are real ``structadmm run`` processes with one CPU thread each (deterministic
kernels), so "the same result" is checked exactly: masks-derived figures, kept channels per
group, the ADMM residual history, the budget plan (for a --target-macs run) and every weight
of pruned.onnx.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from typer.testing import CliRunner

from cli_checks import ended_cleanly
from structadmm.cli import app
from structadmm.errors import StructADMMError
from structadmm.pipeline.checkpoint import RunFolder

CONFIG = """\
dense_epochs = 1
admm_rounds = 4
admm_epochs = 1
retrain_epochs = 1
batch_size = 16
rho = 0.5
rho_growth = 2.0
bench_batches = [1, 8]
bench_min_runs = 3
bench_isolate = false
bench_min_seconds = 0
channel_multiple = 1
"""

MODEL = """\
from torch import nn


def build() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )
"""

runner = CliRunner()


@pytest.fixture
def inputs(digits, tmp_path: Path) -> list[str]:
    """The run's arguments, minus --out/--resume: a small CNN, 128 digits, a short config."""
    train, test = digits
    (tmp_path / "tiny.py").write_text(MODEL)
    (tmp_path / "cfg.toml").write_text(CONFIG)
    np.savez(tmp_path / "digits.npz", x=train.tensors[0][:128].numpy(), y=train.tensors[1][:128].numpy(),
             x_val=test.tensors[0][:64].numpy(), y_val=test.tensors[1][:64].numpy())
    return ["--model", f"{tmp_path / 'tiny.py'}:build", "--data", str(tmp_path / "digits.npz"),
            "--config", str(tmp_path / "cfg.toml")]


def _start(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one thread: deterministic, and two runs share 2 cores
    return subprocess.Popen([sys.executable, "-m", "structadmm.cli", "run", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_inside_admm(process: subprocess.Popen, checkpoint: Path, timeout: float = 300.0) -> dict:
    """SIGKILL ``process`` once its checkpoint is past the first ADMM round; returns that checkpoint."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = torch.load(checkpoint, weights_only=True) if checkpoint.exists() else None
        if state is not None and state["phase"] == "admm" and state["epoch"] >= 1:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return state
        if process.poll() is not None or (state is not None and state["phase"] == "retrain"):
            process.kill()
            pytest.fail(f"the run left the ADMM phase before it could be killed: {process.communicate()[0]}")
        time.sleep(0.02)
    process.kill()
    pytest.fail("the run did not reach the ADMM phase in time")


def _weights(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.mark.parametrize("target", [pytest.param([], id="uniform"),
                                    pytest.param(["--target-macs", "2.5"], id="target-macs", marks=pytest.mark.slow)])
def test_a_killed_run_resumes_to_the_uninterrupted_result(inputs: list[str], tmp_path: Path, target: list[str]) -> None:
    inputs = [*inputs, *target]
    full, killed = tmp_path / "full", tmp_path / "killed"
    uninterrupted = _start([*inputs, "--out", str(full)])  # alongside the one we kill, to save time
    victim = _start([*inputs, "--out", str(killed)])
    staging = tmp_path / ".killed.partial"
    state = _kill_inside_admm(victim, staging / "checkpoint" / "state.pt")
    assert uninterrupted.wait(timeout=600) == 0, uninterrupted.communicate()[0]
    assert not killed.exists() and (staging / "dense.onnx").exists()
    assert len(state["admm"]["history"]) == state["epoch"]  # Z/U rounds done so far are in the checkpoint

    # a fresh run must not take over the interrupted one, nor a resume with other settings
    result = runner.invoke(app, ["run", *inputs, "--out", str(killed)])
    assert result.exit_code == 2 and f"--resume {killed}" in result.output
    result = runner.invoke(app, ["run", *inputs, "--ratio", "0.25", "--resume", str(killed)])
    assert result.exit_code == 2 and "ratio 0.25 here, 0.75 there" in result.output, result.output
    assert (staging / "checkpoint" / "state.pt").exists()

    resumed = _start([*inputs, "--resume", str(killed)])
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output
    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in full.iterdir()) == [
        "accuracy.png", "dense.onnx", "latency.png", "pruned.onnx", "report.json", "report.md"]
    assert not staging.exists()

    a, b = (json.loads((run / "report.json").read_text()) for run in (full, killed))
    assert a["pruned"]["macs"] < a["dense"]["macs"]  # the run pruned something, so equal results mean something
    assert a["budget"] == b["budget"] and (a["budget"] is not None) == bool(target)
    if target:
        assert a["mac_ratio"] >= 2.5 * 0.999
    for key in ("macs", "params", "weight_sparsity", "accuracy", "hard_pruned_accuracy"):
        assert a["pruned"][key] == b["pruned"][key], key
    assert a["dense"] == b["dense"] and a["groups"] == b["groups"] and a["admm"] == b["admm"]
    assert a["mac_ratio"] == b["mac_ratio"] and a["config"] == b["config"]
    wa, wb = _weights(full / "pruned.onnx"), _weights(killed / "pruned.onnx")
    assert wa.keys() == wb.keys()
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)

    # resuming a finished run fails and leaves it exactly as it was
    before = _snapshot(killed)
    result = runner.invoke(app, ["run", *inputs, "--resume", str(killed)])
    assert result.exit_code == 2 and "is a finished run" in result.output
    assert _snapshot(killed) == before


def test_resume_without_a_checkpoint_is_a_clear_error(inputs: list[str], tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", *inputs, "--resume", str(tmp_path / "never-ran")])
    assert result.exit_code == 2 and "no interrupted run to resume" in result.output
    ended_cleanly(result)
    assert not (tmp_path / "never-ran").exists()

    (tmp_path / ".early.partial" / "checkpoint").mkdir(parents=True)  # killed before its first checkpoint
    result = runner.invoke(app, ["run", *inputs, "--resume", str(tmp_path / "early")])
    assert result.exit_code == 2 and "has no checkpoint yet" in result.output


def test_resume_and_out_must_name_the_same_folder(inputs: list[str], tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", *inputs, "--resume", str(tmp_path / "a"), "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "leave out --out" in result.output


def test_a_live_run_is_not_taken_over(tmp_path: Path) -> None:
    live = RunFolder(tmp_path / "run")
    live.create()
    try:
        with pytest.raises(StructADMMError, match=rf"another process \(pid {os.getpid()}\) is writing"):
            RunFolder(tmp_path / "run").create()
    finally:
        live.discard()
    assert not live.staging.exists()


class _StopAt:
    """A stand-in for rich's Progress that raises ``error`` at the ``at``-th training step."""

    def __init__(self, at: int, error: BaseException):
        self.steps, self.at, self.error = 0, at, error

    def add_task(self, *args, **kwargs) -> int:
        return 0

    def advance(self, task: int) -> None:
        self.steps += 1
        if self.steps == self.at:
            raise self.error

    def remove_task(self, task: int) -> None:
        pass


@pytest.mark.parametrize("error, kept", [(KeyboardInterrupt(), True), (RuntimeError("boom"), False)])
def test_ctrl_c_keeps_the_checkpoint_and_a_failure_does_not(digits, tmp_path: Path, error, kept) -> None:
    from structadmm.pipeline import CompressConfig, compress
    from torch import nn

    train, _ = digits
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16 * 16, 10))
    data = tuple(t[:32] for t in train.tensors)
    config = CompressConfig(dense_epochs=1, admm_rounds=2, admm_epochs=1, retrain_epochs=1, batch_size=16,
                            prune_ends=True)
    with pytest.raises(type(error)):  # stops in the second ADMM epoch: two steps an epoch
        compress(model, data, None, config, out_dir=tmp_path / "run", progress=_StopAt(6, error))
    checkpoint = tmp_path / ".run.partial" / "checkpoint" / "state.pt"
    assert checkpoint.exists() == kept and not (tmp_path / "run").exists()
    if kept:
        state = torch.load(checkpoint, weights_only=True)
        assert (state["phase"], state["epoch"]) == ("admm", 1)


def _tiny_run(digits, tmp_path: Path, **settings) -> tuple:
    from torch import nn

    from structadmm.pipeline import CompressConfig

    train, test = digits
    torch.manual_seed(0)
    model = nn.Sequential(  # MODEL: its budget plan from trained weights differs from the untrained one's
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    config = CompressConfig(dense_epochs=1, admm_rounds=2, admm_epochs=1, retrain_epochs=1, batch_size=16,
                            channel_multiple=1, bench_batches=[1], bench_min_runs=3, bench_min_seconds=0.0, **settings)
    return model, tuple(t[:32] for t in train.tensors), tuple(t[:64] for t in test.tensors), config


def test_a_resumed_budget_run_keeps_the_plan_it_started_with(digits, tmp_path: Path) -> None:
    """The budget plan is chosen from the trained dense weights; a resume must not choose it again
    (on the resumed, still untrained model) but run ADMM with the checkpoint's plan, exactly."""
    from structadmm.pipeline import compress

    model, train, val, config = _tiny_run(digits, tmp_path, target_macs=2.0)
    with pytest.raises(KeyboardInterrupt):  # stops in the second ADMM epoch: two steps an epoch
        compress(model, train, val, config, out_dir=tmp_path / "run", progress=_StopAt(6, KeyboardInterrupt()))
    state = torch.load(tmp_path / ".run.partial" / "checkpoint" / "state.pt", weights_only=True)
    assert state["phase"] == "admm" and state["facts"]["budget"]["ratios"]

    fresh, *_ = _tiny_run(digits, tmp_path)  # a newly built model, as a resuming process has
    result = compress(fresh, train, val, config, out_dir=tmp_path / "run", resume=True)
    assert result.report["budget"] == state["facts"]["budget"]
    kept = {row["name"]: row["ratio"] for row in state["facts"]["plan"]["units"]}
    assert kept == state["facts"]["budget"]["ratios"]


def test_a_resume_with_a_changed_plan_file_is_refused_and_keeps_the_run(digits, tmp_path: Path) -> None:
    from structadmm.pipeline import compress

    plan = tmp_path / "plan.toml"
    plan.write_text('[layers."*"]\nsparsity = "filter"\nratio = 0.5\n')
    model, train, val, config = _tiny_run(digits, tmp_path, plan=str(plan))
    with pytest.raises(KeyboardInterrupt):
        compress(model, train, val, config, out_dir=tmp_path / "run", progress=_StopAt(6, KeyboardInterrupt()))
    plan.write_text('[layers."*"]\nsparsity = "filter"\nratio = 0.75\n')
    fresh, *_ = _tiny_run(digits, tmp_path)
    with pytest.raises(StructADMMError, match="the pruning plan differs from the interrupted run's"):
        compress(fresh, train, val, config, out_dir=tmp_path / "run", resume=True)
    assert (tmp_path / ".run.partial" / "checkpoint" / "state.pt").exists()
    with pytest.raises(StructADMMError, match="holds an interrupted run"):
        RunFolder(tmp_path / "run").create()

"""What a new user's mistakes get from the CLI: one clear line, exit status 2, no traceback,
no partial output, and earlier runs untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli_checks import ended_cleanly
from structadmm.cli import app

runner = CliRunner()

USER_MODELS = """
import torch
from torch import nn

def build():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 10))

class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 14 * 14, 10)

    def forward(self, x):
        if x.mean() > 0:  # data-dependent control flow: torch.fx cannot trace this
            x = -x
        return self.fc(torch.flatten(self.conv(x), 1))

def branchy():
    return Branchy()
"""

FAST = """
dense_epochs = 1
admm_rounds = 1
admm_epochs = 1
retrain_epochs = 1
bench_min_seconds = 0.0
bench_min_runs = 3
bench_isolate = false
bench_batches = [1, 4]
"""


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "models.py").write_text(USER_MODELS)
    (tmp_path / "fast.toml").write_text(FAST)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "report.json").write_text('{"kept": true}')
    return tmp_path


def expect_clean_failure(workdir: Path, args: list[str], message: str) -> None:
    before = sorted(p.name for p in workdir.iterdir())
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output
    ended_cleanly(result)
    assert len(result.output.strip().splitlines()) <= 3  # one message (rich may wrap it)
    assert sorted(p.name for p in workdir.iterdir()) == before  # nothing new, nothing half-written
    assert json.loads((workdir / "earlier" / "report.json").read_text()) == {"kept": True}


def run_args(workdir: Path, *extra: str) -> list[str]:
    return ["run", "--config", str(workdir / "fast.toml"), "--out", str(workdir / "new"), *extra]


def test_truncated_checkpoint(workdir: Path) -> None:
    good = workdir / "w.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)).state_dict(), good)
    bad = workdir / "half.pt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    good.unlink()
    expect_clean_failure(workdir, run_args(workdir, "--model", f"{workdir}/models.py:build", "--checkpoint", str(bad)),
                         "half.pt")


def test_plan_naming_missing_layers(workdir: Path) -> None:
    plan = workdir / "plan.toml"
    plan.write_text('[layers."backbone.*"]\nsparsity = "filter"\nratio = 0.5\n')
    expect_clean_failure(workdir, run_args(workdir, "--plan", str(plan)), "matches no Conv or Linear layer")


def test_untraceable_model(workdir: Path) -> None:
    expect_clean_failure(workdir, run_args(workdir, "--model", f"{workdir}/models.py:branchy",
                                           "--input-shape", "1x16x16"), "cannot trace Branchy")


def test_wrong_input_shape(workdir: Path) -> None:
    expect_clean_failure(workdir, run_args(workdir, "--model", "lenet5"), "lenet5")


def test_data_folder_without_images(workdir: Path) -> None:
    empty = workdir / "images"
    (empty / "cats").mkdir(parents=True)
    (empty / "cats" / "notes.txt").write_text("no images here")
    expect_clean_failure(workdir, run_args(workdir, "--data", str(empty)), "images")


def test_nan_loss_during_admm(workdir: Path) -> None:
    (workdir / "nan.toml").write_text(FAST + "admm_lr = 1e12\nrho = 1e12\nrho_max = 1e12\n")
    args = ["run", "--config", str(workdir / "nan.toml"), "--out", str(workdir / "new")]
    expect_clean_failure(workdir, args, "the loss became")


def test_unwritable_output_folder(workdir: Path) -> None:
    blocker = workdir / "a-file"
    blocker.write_text("")
    expect_clean_failure(workdir, ["run", "--config", str(workdir / "fast.toml"), "--out", str(blocker / "run")],
                         "cannot write")


def test_existing_output_folder(workdir: Path) -> None:
    expect_clean_failure(workdir, ["run", "--config", str(workdir / "fast.toml"), "--out", str(workdir / "earlier")],
                         "already exists")


def test_full_disk_while_writing_the_report(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import structadmm.bench

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(workdir / "new" / "report.json"))

    monkeypatch.setattr(structadmm.bench, "write_report", no_space)
    expect_clean_failure(workdir, run_args(workdir), "No space left on device")

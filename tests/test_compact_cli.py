"""`structadmm compact`: a model pruned in the user's own loop → the same run folder and report as `run`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from cli_checks import ended_cleanly
from structadmm.cli import app
from structadmm.models import get_spec
from structadmm.prune import PruningPlan

runner = CliRunner()

# isolated timing has its own tests (test_latency, test_pipeline)
FAST = "bench_batches = [1, 4]\nbench_min_runs = 3\nbench_min_seconds = 0.0\nbench_isolate = false\n"
RUN_FILES = ["accuracy.png", "dense.onnx", "latency.png", "pruned.onnx", "report.json", "report.md"]


def _pruned_state(name: str, ratio: float = 0.5) -> dict[str, torch.Tensor]:
    """A zoo model pruned the way a user's own loop leaves it: zeros in its weights, nothing else."""
    torch.manual_seed(0)
    spec = get_spec(name)
    model = spec.build()
    PruningPlan.uniform(model, torch.randn(2, *spec.input_shape), "filter", ratio).project(model)
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "fast.toml").write_text(FAST)
    save_file(_pruned_state("digits-cnn"), str(tmp_path / "masked.safetensors"))
    return tmp_path


def test_compact_writes_the_run_folder_of_a_run(workdir: Path) -> None:
    result = runner.invoke(app, ["compact", "--model", "digits-cnn", "--checkpoint", str(workdir / "masked.safetensors"),
                                 "--data", "digits", "--config", str(workdir / "fast.toml"), "--out", str(workdir / "r")])
    assert result.exit_code == 0, result.output
    run = workdir / "r"
    assert sorted(p.name for p in run.iterdir()) == RUN_FILES
    assert sorted(p.name for p in workdir.iterdir()) == ["fast.toml", "masked.safetensors", "r"]  # no staging left
    report = json.loads((run / "report.json").read_text())
    for key in ("model", "dense", "pruned", "mac_ratio", "param_ratio", "parity", "latency", "config", "versions"):
        assert key in report
    assert report["model"] == "digits-cnn"
    assert report["dense"]["onnx"] == "dense.onnx" and report["pruned"]["onnx"] == "pruned.onnx"
    assert report["mac_ratio"] > 3.0 and report["param_ratio"] > 3.0  # half of every layer's channels removed
    assert report["mac_ratio"] == pytest.approx(report["dense"]["macs"] / report["pruned"]["macs"])
    assert report["parity"]["ok"] and report["parity"]["max_abs_diff"] < 1e-4
    # the same function before and after surgery: the same held-out accuracy, not just close
    assert report["dense"]["accuracy"] is not None and report["dense"]["accuracy"] == report["pruned"]["accuracy"]
    assert 0.4 < report["pruned"]["weight_sparsity"] < 0.9
    assert {(row["provider"], row["batch"]) for row in report["latency"]} == {
        ("CPUExecutionProvider", 1), ("CPUExecutionProvider", 4)}
    for row in report["latency"]:
        assert row["efficiency"] == pytest.approx(row["speedup"] / report["mac_ratio"])
    assert report["groups"] and all(g["kept"] < g["channels"] for g in report["groups"])
    assert report["admm"] == [] and report["config"]["bench_batches"] == [1, 4]
    assert "## Per layer" in (run / "report.md").read_text()
    assert "run folder" in result.output


def test_compact_takes_a_torch_state_dict_and_random_inputs(workdir: Path) -> None:
    torch.save(_pruned_state("lenet5"), workdir / "masked.pt")
    result = runner.invoke(app, ["compact", "--model", "lenet5", "--checkpoint", str(workdir / "masked.pt"),
                                 "--config", str(workdir / "fast.toml"), "--out", str(workdir / "r")])
    assert result.exit_code == 0, result.output
    report = json.loads((workdir / "r" / "report.json").read_text())
    assert report["dense"]["accuracy"] is None and report["pruned"]["accuracy"] is None  # no data given
    assert report["parity"]["ok"] and report["pruned"]["macs"] < report["dense"]["macs"]


def _expect_clean_failure(workdir: Path, args: list[str], message: str) -> None:
    before = sorted(p.name for p in workdir.iterdir())
    result = runner.invoke(app, ["compact", *args, "--config", str(workdir / "fast.toml"), "--out", str(workdir / "r")])
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output
    ended_cleanly(result)
    assert len(result.output.strip().splitlines()) <= 3  # one message (rich may wrap it)
    assert sorted(p.name for p in workdir.iterdir()) == before  # nothing written, not even a staging folder


def test_a_missing_checkpoint(workdir: Path) -> None:
    _expect_clean_failure(workdir, ["--model", "digits-cnn", "--checkpoint", str(workdir / "nope.safetensors")],
                          "does not exist")


def test_a_checkpoint_of_another_model(workdir: Path) -> None:
    _expect_clean_failure(workdir, ["--model", "lenet5", "--checkpoint", str(workdir / "masked.safetensors")],
                          "lenet5")


def test_a_checkpoint_that_is_not_one(workdir: Path) -> None:
    (workdir / "junk.safetensors").write_bytes(b"not a safetensors file")
    _expect_clean_failure(workdir, ["--model", "digits-cnn", "--checkpoint", str(workdir / "junk.safetensors")],
                          "junk.safetensors")


def test_a_failure_while_writing_leaves_nothing(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import structadmm.bench

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(structadmm.bench, "benchmark", full_disk)  # after surgery and both exports
    _expect_clean_failure(workdir, ["--model", "digits-cnn", "--checkpoint", str(workdir / "masked.safetensors")],
                          "No space left on device")

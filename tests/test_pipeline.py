"""The whole pipeline at a reduced size: the library call, the CLI, and what bad input gets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli_checks import ended_cleanly
from structadmm.cli import app
from structadmm.errors import StructADMMError
from structadmm.models import get_spec
from structadmm.pipeline import CompressConfig, compress

FAST = dict(dense_epochs=4, admm_rounds=3, admm_epochs=1, retrain_epochs=2, rho=0.5, rho_growth=2.0,
            bench_batches=[1, 16], bench_min_runs=3, bench_min_seconds=0.0,
            bench_isolate=False)  # one test below times isolated, the default; the rest stay fast

runner = CliRunner()


def test_compress_writes_a_complete_run_folder(digits, tmp_path: Path) -> None:
    train, test = digits
    # timed as shipped, isolated; one batch size (test_latency.py covers several in isolated mode)
    config = CompressConfig(ratio=0.5, prune_ends=True, **{**FAST, "bench_isolate": True, "bench_batches": [16]})
    result = compress(get_spec("digits-cnn").build(), train, test, config, out_dir=tmp_path / "run",
                      model_name="digits-cnn")
    run = result.run_dir
    assert sorted(p.name for p in run.iterdir()) == ["accuracy.png", "dense.onnx", "latency.png", "pruned.onnx", "report.json",
                                                            "report.md"]
    report = json.loads((run / "report.json").read_text())
    for key in ("model", "dense", "pruned", "mac_ratio", "param_ratio", "parity", "latency", "config", "versions"):
        assert key in report
    assert report["parity"]["ok"] and report["parity"]["max_abs_diff"] < 1e-4
    assert report["mac_ratio"] > 3.0 and report["param_ratio"] > 3.0
    assert report["dense"]["accuracy"] > 0.9 and report["pruned"]["accuracy"] > 0.9  # real digits, held out
    assert {(row["provider"], row["batch"]) for row in report["latency"]} == {("CPUExecutionProvider", 16)}
    for row in report["latency"]:
        assert row["efficiency"] == pytest.approx(row["speedup"] / report["mac_ratio"])
        assert row["mode"] == "isolated"  # reported figures: each model alone in its own process
        assert row["byte_ratio"] > 1.0 and row["byte_efficiency"] == pytest.approx(row["speedup"] / row["byte_ratio"])
        assert row["speedup_low"] <= row["speedup_per_round"] <= row["speedup_high"]
    assert report["versions"]["onnxruntime_package"] in ("onnxruntime", "onnxruntime-gpu")
    residuals = [r["primal_residual"] for r in report["admm"]]
    assert residuals[-1] < residuals[0]
    assert report["config"]["ratio"] == 0.5 and report["model"] == "digits-cnn"
    layers = {row["name"]: row for row in report["layers"]}
    assert sum(row["pruned_macs"] for row in layers.values()) == report["pruned"]["macs"]
    assert "## Per layer" in (run / "report.md").read_text()


@pytest.mark.slow  # the planner is tested in the fast suite (test_budget.py: targets met, predictions exact)
def test_cli_target_macs_chooses_per_layer_ratios(tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", "--config", str(_config(tmp_path)), "--out", str(tmp_path / "r"),
                                 "--target-macs", "6"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["mac_ratio"] >= 6.0
    assert report["budget"]["predicted_mac_ratio"] == pytest.approx(report["mac_ratio"], rel=1e-6)
    assert len(set(report["budget"]["ratios"].values())) > 1  # not one uniform ratio


# the CLI tests check what the command does, not how well it trains: the shortest schedule
SHORT = {**FAST, "dense_epochs": 1, "admm_rounds": 2, "retrain_epochs": 1}


def _config(tmp_path: Path, **extra) -> Path:
    path = tmp_path / "cfg.toml"
    lines = [f"{k} = {json.dumps(v)}" for k, v in {**SHORT, **extra}.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_run_prints_the_table_and_leaves_the_folder(tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", "--config", str(_config(tmp_path)), "--out", str(tmp_path / "r"),
                                 "--ratio", "0.5"])
    assert result.exit_code == 0, result.output
    assert "MACs" in result.output and "CPU batch 16" in result.output
    assert (tmp_path / "r" / "report.json").exists()
    assert json.loads((tmp_path / "r" / "report.json").read_text())["config"]["ratio"] == 0.5


@pytest.mark.parametrize("args, message", [
    (["run", "--ratio", "1.5"], "flags: ratio = 1.5: must be less than 1"),
    (["run", "--ratio", "0"], "flags: ratio = 0.0: must be greater than 0"),
    (["run", "--target-macs", "0.5"], "target_macs = 0.5: must be greater than 1 (a reduction factor"),
    (["run", "--model", "resnet1000"], "unknown model 'resnet1000'"),
    (["run", "--sparsity", "rows"], "unknown sparsity type 'rows'"),
    (["run", "--config", "/nonexistent/cfg.toml"], "cannot read config file"),
    (["bench", "/nonexistent/a.onnx", "/nonexistent/b.onnx"], "a.onnx"),
    (["bench", "/nonexistent/a.onnx", "/nonexistent/b.onnx", "--opt-level", "max"], "graph optimisation level"),
    (["bench", "/nonexistent/a.onnx", "/nonexistent/b.onnx", "--spinning", "no"], "spinning must be one of"),
    (["bench", "/nonexistent/a.onnx", "/nonexistent/b.onnx", "-p", "GPU"], "unknown execution provider 'GPU'"),
    (["inspect", "--model", "nope"], "unknown model 'nope'"),
])
def test_bad_input_gets_one_clear_line(args: list[str], message: str, tmp_path: Path) -> None:
    result = runner.invoke(app, args + (["--out", str(tmp_path / "o")] if args[0] == "run" else []))
    assert result.exit_code == 2, result.output
    assert message in result.output
    ended_cleanly(result)
    assert not (tmp_path / "o").exists()


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07not a model at all")
    result = runner.invoke(app, ["bench", str(garbage), str(garbage)])
    assert result.exit_code == 2 and "garbage.onnx" in result.output
    ended_cleanly(result)
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("ratio = = 3\n")
    result = runner.invoke(app, ["run", "--config", str(bad_toml)])
    assert result.exit_code == 2 and "not valid TOML" in result.output
    unknown = _config(tmp_path, learning_rate=0.1)
    result = runner.invoke(app, ["run", "--config", str(unknown)])
    assert result.exit_code == 2 and "unknown key(s) learning_rate" in result.output


def test_existing_run_folder_is_never_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "earlier"
    out.mkdir()
    (out / "report.json").write_text("{}")
    result = runner.invoke(app, ["run", "--config", str(_config(tmp_path)), "--out", str(out)])
    assert result.exit_code == 2 and "already exists" in result.output
    assert (out / "report.json").read_text() == "{}"


def test_debug_shows_the_traceback() -> None:
    result = runner.invoke(app, ["run", "--ratio", "2", "--debug"])
    assert result.exit_code != 0 and isinstance(result.exception, StructADMMError)
    assert "ratio = 2.0" in str(result.exception)


def test_inspect_lists_units_and_what_was_left_alone() -> None:
    result = runner.invoke(app, ["inspect", "--model", "resnet20", "--ratio", "0.5"])
    assert result.exit_code == 0, result.output
    assert "pruning units" in result.output and "left alone: fc: classifier, kept whole (keep_ends)" in result.output
    assert "left alone: conv1: first layer, kept whole (keep_ends)" in result.output


@pytest.mark.slow
def test_default_run_meets_the_targets(tmp_path: Path) -> None:
    """`structadmm run` as shipped: >= 3x fewer MACs, accuracy within 1 point, >= 2x faster at the large batch."""
    result = runner.invoke(app, ["run", "--out", str(tmp_path / "default")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "default" / "report.json").read_text())
    assert report["mac_ratio"] >= 3.0
    assert report["pruned"]["accuracy"] >= report["dense"]["accuracy"] - 0.01
    large = max(report["latency"], key=lambda row: row["batch"])
    assert large["speedup"] >= 2.0


def test_an_empty_out_folder_is_filled_and_kept_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    result = runner.invoke(app, ["run", "--config", str(_config(tmp_path)), "--out", str(out), "--plan",
                                 str(tmp_path / "missing.toml")])
    assert result.exit_code == 2 and out.is_dir() and not any(out.iterdir())
    result = runner.invoke(app, ["run", "--config", str(_config(tmp_path)), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "report.json").exists()

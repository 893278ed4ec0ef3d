"""Config validation: every wrong type, out-of-range value or unknown key, from Python, a TOML
file or a flag, is one StructADMMError line naming the key, before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli_checks import ended_cleanly
from structadmm.cli import app
from structadmm.errors import StructADMMError
from structadmm.pipeline import CompressConfig

BAD = [
    # (key, value, what the message says)
    ("dense_epochs", 1.5, "must be a valid integer"),
    ("admm_rounds", "3", "must be a valid integer"),
    ("admm_epochs", 0, "greater than or equal to 1"),  # would silently skip ADMM
    ("admm_epochs", 1.5, "must be a valid integer"),  # used to crash later as an internal error
    ("retrain_epochs", True, "must be a valid integer"),
    ("momentum", -0.9, "greater than or equal to 0"),
    ("momentum", 1.0, "less than 1"),
    ("weight_decay", -1e-4, "greater than or equal to 0"),
    ("bench_min_runs", 0, "greater than or equal to 1"),
    ("bench_min_seconds", -1.0, "greater than or equal to 0"),
    ("bench_batches", [], "at least 1 item"),
    ("bench_batches", [1, 0], "batch sizes must be >= 1"),
    ("bench_batches", ["8"], "must be a valid integer"),
    ("batch_size", 0, "greater than or equal to 1"),
    ("lr", float("nan"), "finite number"),
    ("lr", "0.1", "must be a valid number"),
    ("ratio", 1.0, "less than 1"),
    ("channel_multiple", 0, "greater than or equal to 1"),
    ("rho_growth", 0.5, "greater than or equal to 1"),
    ("seed", -1, "greater than or equal to 0"),
    ("sparsity", "rows", "unknown sparsity type 'rows'"),
    ("device", "tpu", "must be cpu, cuda or cuda:N"),
    ("target_macs", 1.0, "greater than 1"),
]


@pytest.mark.parametrize("key, value, message", BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_keyword_construction_names_the_key(key: str, value: object, message: str) -> None:
    with pytest.raises(StructADMMError) as info:
        CompressConfig(**{key: value})
    text = str(info.value)
    assert text.startswith(f"config: {key}") and message in text and "\n" not in text


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value != value:
        return "nan"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


@pytest.mark.parametrize("key, value, message", BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_a_toml_mistake_names_the_file_and_the_key(key: str, value: object, message: str, tmp_path: Path) -> None:
    path = tmp_path / "cfg.toml"
    path.write_text(f"{key} = {_toml(value)}\n")
    with pytest.raises(StructADMMError) as info:
        CompressConfig.from_toml(path)
    text = str(info.value)
    assert text.startswith(f"{path}: {key}") and message in text and "\n" not in text


def test_good_values_pass_and_ints_are_accepted_for_floats(tmp_path: Path) -> None:
    path = tmp_path / "cfg.toml"
    path.write_text("lr = 1\nratio = 0.25\nbench_batches = [1, 8]\nadmm_epochs = 3\ndevice = \"cuda:1\"\n")
    config = CompressConfig.from_toml(path, {"seed": 7})
    assert (config.lr, config.ratio, config.bench_batches, config.admm_epochs, config.seed) == (1.0, 0.25, [1, 8], 3, 7)
    assert CompressConfig(bench_batches=(1, 4)).bench_batches == [1, 4]
    assert CompressConfig().replace(ratio=0.75).ratio == 0.75


def test_cross_field_and_unknown_keys(tmp_path: Path) -> None:
    with pytest.raises(StructADMMError, match="give target_macs or target_latency, not both"):
        CompressConfig(target_macs=2.0, target_latency=2.0)
    with pytest.raises(StructADMMError, match=r"rho_max \(0.01\) must be >= rho \(0.05\)"):
        CompressConfig(rho_max=0.01)
    with pytest.raises(StructADMMError, match="unknown key.s. learning_rate; known keys: sparsity, ratio"):
        CompressConfig(learning_rate=0.1)


def test_assignment_is_checked_too() -> None:
    config = CompressConfig()
    with pytest.raises(StructADMMError, match="admm_epochs = 0"):
        config.admm_epochs = 0
    assert config.admm_epochs == 2


def test_a_flag_mistake_names_the_flag_not_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cfg.toml"
    path.write_text("dense_epochs = 1\n")
    result = CliRunner().invoke(app, ["run", "--config", str(path), "--ratio", "2", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    ended_cleanly(result)
    assert f"{path} with flags: ratio = 2.0: must be less than 1" in " ".join(result.output.split())
    path.write_text("admm_epochs = 1.5\n")
    result = CliRunner().invoke(app, ["run", "--config", str(path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "admm_epochs = 1.5: must be a valid integer" in " ".join(result.output.split())
    assert not (tmp_path / "o").exists()

"""The CLI's argument parsing, fuzzed: whatever a user types, the answer is a clean exit
(0, or 2 with a message), never a crash or a traceback."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import structadmm.pipeline
from cli_checks import ended_cleanly
from structadmm.cli import app
from structadmm.errors import StructADMMError

runner = CliRunner()

FLAGS = ["--model", "--data", "--sparsity", "--ratio", "--plan", "--config", "--out", "--device", "--seed",
         "--target-macs", "--target-latency", "--input-shape", "--checkpoint", "--resume"]
VALUES = st.one_of(
    st.sampled_from(["digits-cnn", "resnet20", "nope", "filter+shape", "rows", "0.5", "1.5", "-1", "nan", "inf",
                     "cuda", "cpu", "3x32x32", "0x0", "x:y", "/nonexistent", "", "1e309"]),
    st.text(max_size=12),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
)


def _stub_compress(*args, **kwargs):
    raise StructADMMError("stub: the pipeline is not run while fuzzing")


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(args=st.lists(st.tuples(st.sampled_from(FLAGS), VALUES), max_size=4))
def test_run_arguments_never_crash(args, monkeypatch: pytest.MonkeyPatch, tmp_path_factory) -> None:
    monkeypatch.setattr(structadmm.pipeline, "compress", _stub_compress)
    out = tmp_path_factory.mktemp("fuzz") / "out"
    argv = ["run", "--out", str(out)] + [item for pair in args for item in pair]
    result = runner.invoke(app, argv)
    assert result.exit_code in (0, 2), (argv, result.output)
    ended_cleanly(result)


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(args=st.lists(st.one_of(st.sampled_from(["--model", "--ratio", "--sparsity", "-r", "-s", "--plan"]), VALUES),
                     max_size=5))
def test_inspect_arguments_never_crash(args) -> None:
    result = runner.invoke(app, ["inspect", *args])
    assert result.exit_code in (0, 2), (args, result.output)
    ended_cleanly(result)

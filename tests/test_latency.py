"""The latency harness's bookkeeping (never its timings: CI machines are too noisy for that)."""

from __future__ import annotations

import gc
import inspect
import itertools
import logging
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from structadmm.bench import LatencyReport, benchmark, latency, runtime
from structadmm.bench.latency import median_interval, round_order, time_interleaved
from structadmm.errors import StructADMMError
from structadmm.exporters import export_onnx

CPU = "CPUExecutionProvider"
FAST = {"min_seconds": 0.0, "min_runs": 5, "warmup": 1, "providers": [CPU], "isolate": False}
SPEC_ROW_KEYS = {"provider", "batch", "threads", "dense_ms", "pruned_ms", "dense_p90_ms",
                 "pruned_p90_ms", "speedup", "speedup_per_round", "speedup_low", "speedup_high", "ci_coverage",
                 "mode"}


def _net(width: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(width * 8 * 8, 10))


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    return {
        "dense": export_onnx(_net(16), x, folder / "dense.onnx").path,
        "pruned": export_onnx(_net(4), x, folder / "pruned.onnx").path,
    }


@pytest.fixture(scope="module")
def report(pair: dict[str, Path]) -> LatencyReport:
    return benchmark(pair, batch_sizes=(1, 3), threads=1, **FAST)


def test_an_entry_per_model_and_batch(report: LatencyReport) -> None:
    keys = [(e.provider, e.batch, e.name) for e in report.entries]
    assert keys == [(CPU, 1, "dense"), (CPU, 1, "pruned"), (CPU, 3, "dense"), (CPU, 3, "pruned")]
    for entry in report.entries:
        assert entry.runs >= 5 and entry.threads == 1
        assert 0 < entry.min_ms <= entry.median_ms <= entry.p90_ms
        assert entry.iqr_ms >= 0
    assert report.baseline == "dense" and report.skipped == []


def test_speedups_are_relative_to_the_baseline(report: LatencyReport) -> None:
    for batch in (1, 3):
        dense, pruned = (e for e in report.entries if e.batch == batch)
        assert dense.speedup == 1.0
        assert pruned.speedup == pytest.approx(dense.median_ms / pruned.median_ms)


def test_to_rows_has_the_spec_keys(report: LatencyReport) -> None:
    rows = report.to_rows()
    assert [set(row) for row in rows] == [SPEC_ROW_KEYS, SPEC_ROW_KEYS]
    pruned = {e.batch: e for e in report.entries if e.name == "pruned"}
    for row in rows:
        assert row["provider"] == CPU and row["threads"] == 1
        assert row["pruned_ms"] == pruned[row["batch"]].median_ms
        assert row["speedup"] == pytest.approx(pruned[row["batch"]].speedup)

    with_efficiency = report.to_rows(mac_ratio=4.0)
    assert with_efficiency[0]["efficiency"] == pytest.approx(with_efficiency[0]["speedup"] / 4.0)


def test_baseline_can_be_named(pair: dict[str, Path]) -> None:
    result = benchmark(pair, batch_sizes=(2,), baseline="pruned", **FAST)
    assert [e.name for e in result.entries] == ["pruned", "dense"]
    assert result.entries[0].speedup == 1.0
    assert result.to_rows(dense="dense", pruned="pruned")[0]["dense_ms"] == (
        result.entries[1].median_ms
    )


def test_round_order_alternates() -> None:
    names = ["a", "b", "c"]
    assert [round_order(names, i) for i in range(3)] == [names, names[::-1], names]


def test_time_interleaved_runs_every_model_once_per_round_in_alternating_order() -> None:
    calls: list[str] = []
    runners = {name: (lambda name=name: calls.append(name)) for name in ("dense", "pruned")}
    times = time_interleaved(runners, min_runs=4, min_seconds=0.0)
    assert calls == ["dense", "pruned", "pruned", "dense"] * 2
    assert {name: len(t) for name, t in times.items()} == {"dense": 4, "pruned": 4}


def test_time_interleaved_stopping_rules() -> None:
    def run(min_runs: int, min_seconds: float, max_runs: int) -> int:
        ticks = itertools.count()  # a fake clock: one second per reading
        times = time_interleaved({"m": lambda: None}, min_runs=min_runs, min_seconds=min_seconds,
                                 max_runs=max_runs, clock=lambda: float(next(ticks)))
        assert all(t == 1.0 for t in times["m"])
        return len(times["m"])

    assert run(min_runs=3, min_seconds=0, max_runs=100) == 3
    # 2 clock readings per round: 10 s have passed after round 5 (the start reading is t=0).
    assert run(min_runs=3, min_seconds=10, max_runs=100) == 5
    assert run(min_runs=3, min_seconds=1e9, max_runs=7) == 7


def test_benchmark_times_all_models_together_baseline_first(
    pair: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[str]] = []
    real = latency.time_interleaved

    def spy(runners: dict[str, latency.Runner], **kwargs: object) -> dict[str, list[float]]:
        seen.append(list(runners))
        return real(runners, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(latency, "time_interleaved", spy)
    benchmark(pair, batch_sizes=(1, 2), baseline="pruned", **FAST)
    assert seen == [["pruned", "dense"], ["pruned", "dense"]]


def test_unavailable_provider_is_skipped_with_a_reason(pair: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # a CPU-only onnxruntime, also on machines that have a GPU build
    monkeypatch.setattr(latency.ort, "get_available_providers", lambda: [CPU])
    result = benchmark(pair, batch_sizes=(1,), min_seconds=0.0, min_runs=5, warmup=1,
                       providers=["CUDAExecutionProvider", CPU], isolate=False)
    assert [(p, "not available" in reason) for p, reason in result.skipped] == [
        ("CUDAExecutionProvider", True)
    ]
    assert {e.provider for e in result.entries} == {CPU}


def test_default_providers_report_missing_gpu_providers(pair: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # a CPU-only onnxruntime, also on machines that have a GPU build
    monkeypatch.setattr(latency.ort, "get_available_providers", lambda: [CPU])
    result = benchmark(pair, batch_sizes=(1,), min_seconds=0.0, min_runs=5, warmup=1, isolate=False)
    assert [p for p, _ in result.skipped] == ["CUDAExecutionProvider", "TensorrtExecutionProvider"]
    assert {e.provider for e in result.entries} == {CPU}


def test_garbage_file_is_an_error(pair: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(StructADMMError, match="bad.onnx"):
        benchmark({"dense": pair["dense"], "bad": bad}, **FAST)
    with pytest.raises(StructADMMError, match="missing.onnx"):
        benchmark({"dense": pair["dense"], "x": tmp_path / "missing.onnx"}, **FAST)


def _save(path: Path, node: onnx.NodeProto, shape: list[object], domains: dict[str, int]) -> Path:
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)
    graph = helper.make_graph([node], "g", [x], [y])
    opsets = [helper.make_opsetid(domain, version) for domain, version in domains.items()]
    onnx.save(helper.make_model(graph, opset_imports=opsets), path)
    return path


def test_model_onnx_runtime_cannot_load_is_an_error(pair: dict[str, Path], tmp_path: Path) -> None:
    # Valid for onnx.checker (custom domains are allowed) but not runnable.
    odd = _save(tmp_path / "odd.onnx", helper.make_node("Frob", ["input"], ["y"], domain="x.y"),
                ["N", 3, 8, 8], {"": 17, "x.y": 1})
    with pytest.raises(StructADMMError, match="odd.onnx: ONNX Runtime cannot load it"):
        benchmark({"dense": pair["dense"], "odd": odd}, **FAST)


def test_models_with_different_inputs_are_an_error(pair: dict[str, Path], tmp_path: Path) -> None:
    other = _save(tmp_path / "other.onnx", helper.make_node("Relu", ["input"], ["y"]),
                  ["N", 3, 9, 9], {"": 17})
    with pytest.raises(StructADMMError, match="different inputs"):
        benchmark({"dense": pair["dense"], "other": other}, **FAST)


def test_fixed_batch_model_at_another_batch_is_an_error(tmp_path: Path) -> None:
    fixed = _save(tmp_path / "fixed.onnx", helper.make_node("Relu", ["input"], ["y"]),
                  [1, 4], {"": 17})
    assert benchmark({"fixed": fixed}, batch_sizes=(1,), **FAST).entries[0].speedup == 1.0
    with pytest.raises(StructADMMError, match="fixed batch of 1"):
        benchmark({"fixed": fixed}, batch_sizes=(4,), **FAST)


@pytest.mark.parametrize(
    "kwargs",
    [{"baseline": "nope"}, {"batch_sizes": (0,)}, {"threads": 0}, {"min_runs": 0},
     {"min_runs": 10, "max_runs": 5}, {"warmup": -1}, {"optimization": "max"}, {"spinning": "sometimes"},
     {"providers": ["NoSuchExecutionProvider"]}, {"processes": 1}, {"child_timeout": 0}],
)
def test_bad_arguments(pair: dict[str, Path], kwargs: dict[str, object]) -> None:
    with pytest.raises(StructADMMError):
        benchmark(pair, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("spinning", "allow", "stop"), [("run", "", "1"), ("off", "0", ""), ("on", "", "")])
def test_session_settings_reach_onnx_runtime(spinning: str, allow: str, stop: str) -> None:
    options = latency.SessionSettings(threads=3, optimization="basic", spinning=spinning).options()
    assert options.intra_op_num_threads == 3
    assert options.graph_optimization_level == latency.ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    for key, value in (("session.intra_op.allow_spinning", allow), ("session.force_spinning_stop", stop)):
        if value:
            assert options.get_session_config_entry(key) == value
        else:  # unset: ORT's default (spinning allowed, not stopped)
            with pytest.raises(RuntimeError):
                options.get_session_config_entry(key)


def test_every_optimisation_level_gives_the_same_outputs_timed(pair: dict[str, Path]) -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)

    def outputs(path: Path, level: str) -> np.ndarray:
        options = latency.SessionSettings(threads=1, optimization=level, spinning="off").options()
        session = latency.ort.InferenceSession(str(path), options, providers=[CPU])
        return session.run(None, {session.get_inputs()[0].name: x})[0]

    reference = {name: outputs(path, "disable") for name, path in pair.items()}  # the graph as exported
    assert not np.allclose(reference["dense"], reference["pruned"])  # two functions, so the check can fail
    for level in latency.OPTIMIZATION_LEVELS:
        for name, path in pair.items():
            np.testing.assert_allclose(outputs(path, level), reference[name], rtol=1e-5, atol=1e-6, err_msg=level)
        result = benchmark(pair, batch_sizes=(2,), optimization=level, spinning="off", **FAST)
        assert [(e.name, e.batch) for e in result.entries] == [("dense", 2), ("pruned", 2)]
        assert all(e.runs >= FAST["min_runs"] and e.median_ms > 0 for e in result.entries)


# --- isolated mode, warm-up, gc, per-round ratios, the ORT conflict warning -----------------


def test_isolated_mode_alternates_one_process_per_model(pair: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    jobs: list[dict[str, object]] = []
    fake = {"dense": [[4.0, 4.0, 4.0], [8.0, 8.0, 8.0], [4.0, 4.0, 4.0]],  # seconds per run, per process
            "pruned": [[1.0, 1.0, 1.0], [4.0, 4.0, 4.0], [2.0, 2.0, 2.0]]}

    def child(job: dict[str, object]) -> list[float]:
        jobs.append(job)
        name = Path(str(job["path"])).stem
        return fake[name][sum(Path(str(j["path"])).stem == name for j in jobs) - 1]

    monkeypatch.setattr(latency, "_run_child", lambda job, timeout: child(job))
    result = benchmark(pair, batch_sizes=(2,), min_runs=7, min_seconds=3.0, warmup=4, providers=[CPU], processes=3)
    assert [Path(str(j["path"])).stem for j in jobs] == ["dense", "pruned", "pruned", "dense", "dense", "pruned"]
    assert {(j["min_runs"], j["min_seconds"], j["warmup"], j["batch"], j["settings"]["spinning"]) for j in jobs} == {
        (3, 1.0, 4, 2, "on")}  # the budget split over the rounds; ORT's default spinning alone
    row = result.to_rows(dense="dense", pruned="pruned")[0]
    assert row["mode"] == "isolated" and row["dense_ms"] == 4000.0  # median of all 9 runs
    assert row["pruned_ms"] == 2000.0 and row["speedup"] == 2.0  # ratio of the medians
    assert row["speedup_per_round"] == 2.0  # per round 4/1, 8/4, 4/2
    assert (row["speedup_low"], row["speedup_high"]) == (2.0, 4.0)  # three rounds: [min, max]
    assert row["ci_coverage"] == 0.75  # ... which holds the median only 3 times in 4, and says so
    by_name = {e.name: e for e in result.entries}  # each process's median, in round order (ms)
    assert by_name["dense"].round_ms == (4000.0, 8000.0, 4000.0)
    assert by_name["pruned"].round_ms == (1000.0, 4000.0, 2000.0)


def test_isolated_mode_runs_real_processes(pair: dict[str, Path]) -> None:
    result = benchmark(pair, batch_sizes=(1,), min_runs=4, min_seconds=0.0, warmup=1, providers=[CPU], processes=2)
    dense, pruned = result.entries
    assert (dense.mode, dense.runs, pruned.runs) == ("isolated", 4, 4)
    assert 0 < pruned.min_ms <= pruned.median_ms and pruned.round_speedup_low <= pruned.round_speedup_high


def test_a_failing_child_is_one_clear_line(tmp_path: Path) -> None:
    job = dict(path=str(tmp_path / "gone.onnx"), provider=CPU, batch=1,
               settings={"threads": 1, "optimization": "all", "spinning": "on"}, warmup=1, seed=0, min_runs=1,
               min_seconds=0.0, max_runs=1)
    failed = r"gone.onnx \(CPUExecutionProvider, batch 1\) in its own process failed: .*gone.onnx"
    with pytest.raises(StructADMMError, match=failed) as caught:
        latency._run_child(job, 60.0)
    assert "\n" not in str(caught.value)


def test_warm_up_is_interleaved_like_the_timing(pair: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(latency, "make_runner", lambda session, arrays, provider: (
        lambda name=Path(session._model_path).stem: calls.append(name)))
    benchmark(pair, batch_sizes=(1,), **{**FAST, "warmup": 3, "min_runs": 2})
    warm_up, timed = calls[:6], calls[6:]
    assert warm_up == ["dense", "pruned", "pruned", "dense", "dense", "pruned"]
    assert timed == ["dense", "pruned", "pruned", "dense"]


def test_gc_is_off_while_timing_and_restored() -> None:
    seen: list[bool] = []
    time_interleaved({"m": lambda: seen.append(gc.isenabled())}, min_runs=3, min_seconds=0.0)
    assert seen == [False] * 3 and gc.isenabled()
    gc.disable()
    try:  # a caller that had it off keeps it off
        time_interleaved({"m": lambda: None}, min_runs=1, min_seconds=0.0)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_in_process_per_round_ratio_is_run_against_run(pair: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    fake = {"dense": [3.0, 1.0, 3.0, 9.0], "pruned": [1.0, 1.0, 1.0, 1.0]}  # seconds per round
    monkeypatch.setattr(latency, "time_interleaved", lambda runners, **_: fake)
    row = benchmark(pair, batch_sizes=(1,), **FAST).to_rows()[0]
    assert row["mode"] == "in-process" and row["speedup"] == 3.0  # median 3 s / median 1 s
    assert row["speedup_per_round"] == 3.0 and (row["speedup_low"], row["speedup_high"]) == (1.0, 9.0)
    fake["pruned"] = [3.0, 1.0, 1.0, 9.0]  # the ratio of medians 3/2, but round by round equal 3 times of 4
    row = benchmark(pair, batch_sizes=(1,), **FAST).to_rows()[0]
    assert row["speedup"] == 1.5 and row["speedup_per_round"] == 1.0


def test_median_interval_is_the_binomial_order_statistic_interval() -> None:
    values = list(range(1, 101))  # n = 100: ranks 40 and 61 (the textbook n/2 +- 0.98 sqrt(n))
    assert median_interval(values)[:2] == (40.0, 61.0)
    assert median_interval(values).coverage == pytest.approx(0.9648, abs=1e-4)
    assert median_interval([5.0, 1.0, 3.0]) == (1.0, 5.0, 0.75)  # too few for 95 %: [min, max], and it says 75 %
    assert median_interval([2.0]) == (2.0, 2.0, 0.0)
    rng = np.random.default_rng(0)
    narrow = [median_interval(rng.normal(size=n)) for n in (20, 200, 2000)]
    widths = [high - low for low, high, _ in narrow]
    assert widths[0] > widths[1] > widths[2] and all(low < 0.2 and high > -0.2 for low, high, _ in narrow)
    with pytest.raises(StructADMMError):
        median_interval([])


def _coverage(n: int, k: int) -> float:
    """P(x_(k) <= median <= x_(n-k+1)) for n values: 1 - 2 P(Binomial(n, 1/2) <= k - 1), written out here."""
    return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n


@pytest.mark.parametrize("n", [*range(1, 41), 99, 100, 101, 1000])
def test_median_interval_is_the_narrowest_that_reaches_the_level_and_states_its_coverage(n: int) -> None:
    values = np.arange(n, dtype=float)  # sorted distinct values: rank k is value k - 1
    low, high, coverage = median_interval(values)
    k = int(low) + 1
    assert high == n - k  # symmetric ranks k and n - k + 1
    assert coverage == pytest.approx(_coverage(n, k), abs=1e-12)
    if coverage >= 0.95:  # the level is reached, by the narrowest such interval
        assert 2 * (k + 1) > n + 1 or _coverage(n, k + 1) < 0.95
    else:  # it cannot be reached: [min, max], and the coverage says so
        assert k == 1 and n < 6


def test_median_interval_coverage_matches_simulation() -> None:
    """The stated coverage is how often the interval holds the true median: 4000 samples per n from a
    skewed distribution (exponential, median ln 2), against the binomial standard error."""
    rng = np.random.default_rng(1234)
    trials = 4000
    for n in (3, 5, 6, 12, 30):
        samples = rng.exponential(size=(trials, n))
        intervals = [median_interval(sample) for sample in samples]
        held = np.mean([low <= math.log(2) <= high for low, high, _ in intervals])
        stated = intervals[0].coverage
        assert {i.coverage for i in intervals} == {stated}
        assert abs(held - stated) < 4 * math.sqrt(stated * (1 - stated) / trials) + 1e-3, (n, held, stated)


def test_default_rounds_reach_95_percent() -> None:
    """Isolated mode's default number of rounds gives per-round intervals that hold the median 95 % of the time."""
    rounds = inspect.signature(benchmark).parameters["processes"].default
    assert median_interval(range(rounds)).coverage >= 0.95
    assert median_interval(range(rounds - 1)).coverage < 0.95  # and no more processes than that costs


def test_a_warm_up_run_is_required(pair: dict[str, Path]) -> None:
    for call in (lambda: benchmark(pair, **{**FAST, "warmup": 0}),
                 lambda: latency.time_alone(pair["dense"], warmup=0, min_runs=1, min_seconds=0.0)):
        with pytest.raises(StructADMMError, match="warmup must be at least 1") as caught:
            call()
        assert "\n" not in str(caught.value)


def test_two_ort_builds_warn_on_every_benchmark(pair: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(runtime, "installed_ort", lambda: {"onnxruntime": "1.20.0", "onnxruntime-gpu": "1.20.0"})
    with caplog.at_level(logging.WARNING, logger="structadmm"):
        benchmark(pair, batch_sizes=(1,), **FAST)
        benchmark(pair, batch_sizes=(1,), **FAST)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    assert "fix: pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in lines[0]
    monkeypatch.setattr(runtime, "installed_ort", lambda: {"onnxruntime": "1.20.0"})
    caplog.clear()
    benchmark(pair, batch_sizes=(1,), **FAST)
    assert caplog.records == []

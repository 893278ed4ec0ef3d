"""ONNX Runtime latency benchmark: dense vs pruned, each model alone in its own process or interleaved in one.

This module owns how latency is measured (SPEC §6): one session per model and execution
provider (graph optimisation ALL by default, fixed thread count, sequential execution), the same seeded
random input for every model, a warm-up, then timed runs with the garbage collector off. Two modes:

* **isolated** (``isolate=True``, the default): every model is timed alone in a fresh process, as it
  is deployed, with ORT's default thread spinning; the processes alternate model by model, round by
  round (order reversed every round), ``processes`` rounds per batch size (6 by default: the fewest
  whose [min, max] covers the median with at least 95 %), each child killed if it runs past
  ``child_timeout``. A round's ratio is the baseline process's median over the model process's median.
* **in-process** (``isolate=False``): one session per model in this process, warm-up and timed runs
  interleaved run by run with the order reversed every round. Cheaper, but a timed session competes
  with the idle sessions' threads (see ``spinning`` below). A round's ratio is one run against one run.

Either way slow drift (thermal, frequency scaling, other load) falls on every model alike. It reports
median, p90, min and IQR per model, the speedup of each model over the baseline as the ratio of the
medians, and next to it the median of the per-round ratios with a distribution-free interval
(:func:`median_interval`) and that interval's coverage: the exact probability that it holds the true
median, which depends only on the number of rounds (75 % for [min, max] of 3, 96.9 % of 6).

CPU is always measured; CUDA and TensorRT when ONNX Runtime offers them (on those, inputs and
outputs stay on the device through IOBinding so host↔device copies are not timed, and no thread
count is reported: ``threads`` sets only the CPU pool). A provider that cannot be used is listed in
``LatencyReport.skipped`` with the reason, never silently replaced by another. At least one untimed
warm-up run is required: a session's first run allocates its buffers and, under TensorRT, builds the
engine. TensorRT builds one engine per model and batch size into an engine cache (``engine_cache``,
one folder per batch size), in isolated mode in this process before any child is timed, so the
children load it instead of rebuilding it; files holding QuantizeLinear/DequantizeLinear (QDQ INT8)
get TensorRT's INT8 and FP16 flags, so they are timed as INT8 engines, not FP32 ones.

Thread spinning (``spinning``): ORT's pool threads normally busy-wait for work, which makes
handing a kernel to a worker cheap but lets the threads of a session that just finished keep
the cores busy while the next model in the round is timed. The default ``"run"`` spins inside
a run and stops the spinning at its end (``session.force_spinning_stop``): every model gets
cheap dispatch and none steals from the next. ``"off"`` never spins (each kernel then pays a
thread wake-up, 17–37 µs on the 2-core reference machine, which dominates small layers at
batch 1); ``"on"`` is ORT's default, for timing one model alone (the default in isolated mode).

Every call warns, with the fix, when several ONNX Runtime builds are installed (:mod:`.runtime`).
"""

from __future__ import annotations

import gc
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnxruntime as ort

from structadmm.errors import StructADMMError, one_line
from structadmm.bench.runtime import warn_if_conflicting

__all__ = ["ENGINE_CACHE", "LatencyEntry", "LatencyReport", "MedianInterval", "SessionSettings", "benchmark",
           "call_alone", "median_interval", "round_order", "round_ratios", "session_providers", "time_alone",
           "time_interleaved"]

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
_GPU_PROVIDERS = (CUDA, TENSORRT)
OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
SPINNING = ("run", "off", "on")
#: The TensorRT engine cache's folder, beside the baseline model (in a run folder: inside it) unless named.
ENGINE_CACHE = "trt_engines"
_NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}

Runner = Callable[[], object]
InputSpec = tuple[tuple[tuple[int, ...], str], ...]  # per input: (shape without batch, type)


@dataclass(frozen=True)
class LatencyEntry:
    """One model at one provider and batch size; times in milliseconds per batch."""

    provider: str
    batch: int
    threads: int | None  # the CPU pool's intra-op threads; None on GPU providers, where it sets nothing timed
    name: str
    median_ms: float
    p90_ms: float
    min_ms: float
    iqr_ms: float
    runs: int
    speedup: float  # baseline median / this median (1.0 for the baseline itself)
    round_speedup: float = 1.0  # median over rounds of (baseline / this model) in that round
    round_speedup_low: float = 1.0  # a distribution-free interval of that median (median_interval)
    round_speedup_high: float = 1.0
    mode: str = "isolated"  # one model per process; or "in-process": interleaved run by run in one process
    ci_coverage: float | None = None  # the probability that [low, high] holds the true median (MedianInterval)
    # this model's time in each round, ms: a process's median (isolated) or one run (in-process); for
    # per-round figures of other pairs than (baseline, model), such as a ratio of two speedups
    round_ms: tuple[float, ...] = ()


@dataclass
class LatencyReport:
    """All measurements of one :func:`benchmark` call."""

    baseline: str
    entries: list[LatencyEntry] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (provider, reason)

    def to_rows(
        self,
        *,
        dense: str | None = None,
        pruned: str | None = None,
        mac_ratio: float | None = None,
        byte_ratios: Mapping[int, float] | None = None,
    ) -> list[dict[str, object]]:
        """The report.json "latency" list (SPEC §5) for a dense/pruned pair.

        ``dense`` defaults to the baseline and ``pruned`` to the only other model. With
        ``mac_ratio`` (dense MACs / pruned MACs) each row also gets
        ``efficiency = speedup / mac_ratio``; with ``byte_ratios`` (batch -> dense bytes moved /
        pruned bytes moved, :meth:`~structadmm.exporters.OnnxCost.bytes_at`) it gets ``byte_ratio``
        and ``byte_efficiency = speedup / byte_ratio``; with both, ``roofline_efficiency = speedup /
        min(mac_ratio, byte_ratio)``: the speedup against the smaller of the two ratios, the most a
        roofline model lets pruning buy (a compute-bound net is judged by its MACs, a memory-bound
        one by its bytes; 1.0: as fast as the bound allows).
        ``speedup_per_round`` (and its interval ``speedup_low``..``speedup_high``, which holds the
        true median with probability ``ci_coverage``) is the median of the per-round ratios, exact
        when ``dense`` is the baseline. ``mode`` is how they were timed ("isolated": one model per
        process; "in-process": interleaved in one process); ``threads`` is None on GPU providers.
        """
        dense = dense or self.baseline
        pruned = pruned or self._only_other(dense)
        index = {(e.provider, e.batch, e.name): e for e in self.entries}
        rows: list[dict[str, object]] = []
        for provider, batch in dict.fromkeys((e.provider, e.batch) for e in self.entries):
            d, p = index.get((provider, batch, dense)), index.get((provider, batch, pruned))
            if d is None or p is None:
                raise StructADMMError(f"no latency measured for {dense!r} and {pruned!r}")
            row: dict[str, object] = {
                "provider": provider,
                "batch": batch,
                "threads": d.threads,
                "dense_ms": d.median_ms,
                "pruned_ms": p.median_ms,
                "dense_p90_ms": d.p90_ms,
                "pruned_p90_ms": p.p90_ms,
                "speedup": d.median_ms / p.median_ms,
                "speedup_per_round": p.round_speedup / d.round_speedup,
                "speedup_low": p.round_speedup_low / d.round_speedup,
                "speedup_high": p.round_speedup_high / d.round_speedup,
                "ci_coverage": p.ci_coverage,
                "mode": d.mode,
            }
            if mac_ratio:
                row["efficiency"] = row["speedup"] / mac_ratio
            if byte_ratios and batch in byte_ratios:
                row["byte_ratio"] = byte_ratios[batch]
                row["byte_efficiency"] = row["speedup"] / byte_ratios[batch]
                if mac_ratio:
                    row["roofline_efficiency"] = row["speedup"] / min(mac_ratio, byte_ratios[batch])
            rows.append(row)
        return rows

    def _only_other(self, dense: str) -> str:
        others = list(dict.fromkeys(e.name for e in self.entries if e.name != dense))
        if len(others) != 1:
            raise StructADMMError(
                f"cannot tell which model is the pruned one among {others}; pass pruned=NAME"
            )
        return others[0]


def benchmark(
    models: Mapping[str, str | Path],
    *,
    batch_sizes: Sequence[int] = (1, 64),
    threads: int = 2,
    providers: Sequence[str] | None = None,
    warmup: int = 10,
    min_runs: int = 30,
    min_seconds: float = 3.0,
    max_runs: int = 10_000,
    seed: int = 0,
    baseline: str | None = None,
    optimization: str = "all",
    spinning: str | None = None,
    isolate: bool = True,
    processes: int = 6,
    child_timeout: float = 600.0,
    engine_cache: str | Path | None = None,
) -> LatencyReport:
    """Measure every model at every batch size on every usable provider.

    ``models`` maps display names to ONNX files that take the same inputs with a dynamic (or
    matching) batch axis; the first model, or ``baseline``, is the reference for speedups.
    Timing stops once ``min_runs`` rounds and ``min_seconds`` have both passed, or at
    ``max_runs`` rounds; with ``isolate`` (see the module docstring) these budgets are split over
    the ``processes`` rounds of processes, each of which also runs ``warmup`` (at least 1) untimed
    runs first and is killed after ``child_timeout`` seconds. ``optimization`` is ORT's graph
    optimisation level (one of :data:`OPTIMIZATION_LEVELS`); ``spinning`` is explained in the module
    docstring (default: ``"on"`` isolated, ``"run"`` in-process). ``engine_cache`` is TensorRT's engine
    cache folder (default: :data:`ENGINE_CACHE` beside the baseline model; used only under TensorRT).
    """
    paths = {name: Path(path) for name, path in models.items()}
    settings = SessionSettings(threads, optimization, spinning or ("on" if isolate else "run"))
    baseline = _check_arguments(paths, baseline, batch_sizes, warmup, min_runs, max_runs)
    if isolate and processes < 2:
        raise StructADMMError(f"isolated timing needs at least 2 rounds of processes, got {processes}")
    if not child_timeout > 0:
        raise StructADMMError(f"child_timeout must be a positive number of seconds, got {child_timeout}")
    warn_if_conflicting()
    runnable, skipped = _select_providers(providers)
    from structadmm.exporters.onnx_export import load_onnx  # here, not at the top: isolated children skip torch

    for path in paths.values():
        load_onnx(path)  # a clear error for a missing or corrupt file before anything is timed
    names = [baseline, *(name for name in paths if name != baseline)]
    cache = Path(engine_cache) if engine_cache is not None else paths[baseline].parent / ENGINE_CACHE
    report = LatencyReport(baseline=baseline, skipped=skipped)
    for provider in runnable:
        at_batch = {batch: _settings_at(settings, provider, cache, batch) for batch in batch_sizes}
        opened_with = at_batch[batch_sizes[0]]
        sessions, reason = _open_sessions(paths, provider, opened_with)
        if sessions is None:
            report.skipped.append((provider, reason))
            continue
        spec = _common_input_spec(sessions, paths)
        for batch in batch_sizes:
            random_inputs(spec, batch, seed)  # a fixed batch that does not fit fails here, in this process
        if isolate:
            del sessions  # the children open their own; nothing of this process's stays on the device
            budget = dict(min_runs=math.ceil(min_runs / processes), min_seconds=min_seconds / processes,
                          max_runs=max(1, max_runs // processes))
            for batch in batch_sizes:
                if provider == TENSORRT:
                    _build_engines(paths, names, spec, batch, seed, at_batch[batch])
                per_process = _time_isolated(paths, names, provider, batch, at_batch[batch], warmup, processes,
                                             seed, budget, child_timeout)
                times = {name: [t for run in per_process[name] for t in run] for name in names}
                rounds = {name: [float(np.median(run)) for run in per_process[name]] for name in names}
                report.entries.extend(_entries(provider, batch, threads, times, rounds, baseline, "isolated"))
            continue
        for batch in batch_sizes:
            if at_batch[batch] != opened_with:  # TensorRT: each batch size its own engines and cache folder
                opened_with = at_batch[batch]
                sessions = _open_sessions_or_fail(paths, provider, opened_with)
            arrays = random_inputs(spec, batch, seed)
            runners = {name: make_runner(sessions[name], arrays, provider) for name in names}
            for i in range(warmup):  # warmed up in the same alternating order as they are timed
                for name in round_order(names, i):
                    runners[name]()
            times = time_interleaved(
                runners, min_runs=min_runs, min_seconds=min_seconds, max_runs=max_runs
            )
            report.entries.extend(_entries(provider, batch, threads, times, times, baseline, "in-process"))
    return report


def time_alone(
    path: str | Path,
    *,
    provider: str = CPU,
    batch: int = 1,
    settings: "SessionSettings | Mapping[str, object] | None" = None,
    warmup: int = 10,
    min_runs: int = 30,
    min_seconds: float = 3.0,
    max_runs: int = 10_000,
    seed: int = 0,
) -> list[float]:
    """Seconds of every timed run of one model alone in this process (what an isolated child runs;
    ``settings`` may be given as the dict of a :class:`SessionSettings`)."""
    path = Path(path)
    _check_warmup(warmup)
    if isinstance(settings, Mapping):
        settings = SessionSettings(**settings)
    session, reason = _open_session(path, provider, settings or SessionSettings(spinning="on"))
    if session is None:
        raise StructADMMError(reason)
    run = make_runner(session, random_inputs(_input_spec(session, path), batch, seed), provider)
    for _ in range(warmup):
        run()
    return time_interleaved({"model": run}, min_runs=min_runs, min_seconds=min_seconds, max_runs=max_runs)["model"]


def _settings_at(settings: "SessionSettings", provider: str, cache: Path, batch: int) -> "SessionSettings":
    """The settings of ``provider``'s sessions at ``batch``: under TensorRT with its engine cache folder
    (one per batch size, so every engine is built for the batch it is timed at)."""
    if provider != TENSORRT:
        return settings
    return replace(settings, engine_cache=str(cache / f"batch{batch}"))


def _build_engines(paths: Mapping[str, Path], names: Sequence[str], spec: InputSpec, batch: int, seed: int,
                   settings: "SessionSettings") -> None:
    """One untimed run of every model at ``batch`` in this process: TensorRT builds each engine and
    writes it into the settings' cache, which the isolated children then load instead of rebuilding."""
    Path(str(settings.engine_cache)).mkdir(parents=True, exist_ok=True)
    sessions = _open_sessions_or_fail(paths, TENSORRT, settings)
    arrays = random_inputs(spec, batch, seed)
    for name in names:
        make_runner(sessions[name], arrays, TENSORRT)()


def _time_isolated(
    paths: Mapping[str, Path], names: Sequence[str], provider: str, batch: int, settings: "SessionSettings",
    warmup: int, processes: int, seed: int, budget: Mapping[str, float], timeout: float,
) -> dict[str, list[list[float]]]:
    """Every model alone in a fresh process, the processes alternating; seconds per process per model."""
    per_process: dict[str, list[list[float]]] = {name: [] for name in names}
    for index in range(processes):
        for name in round_order(names, index):
            job = dict(path=str(paths[name]), provider=provider, batch=batch, settings=asdict(settings),
                       warmup=warmup, seed=seed, **budget)
            per_process[name].append(_run_child(job, timeout))
    return per_process


# The isolated child: ``structadmm`` and ``structadmm.bench`` are bare namespaces there, so their
# __init__ files (which import torch and the whole pipeline) are not run and a child starts in the
# time it takes to import numpy and onnxruntime (and what the called module imports).
_CHILD = """
import json, sys, types
from importlib import import_module
root = sys.argv[1]
for name, folder in (("structadmm", root), ("structadmm.bench", root + "/bench")):
    module = types.ModuleType(name)
    module.__path__ = [folder]
    sys.modules[name] = module
call = json.loads(sys.argv[2])
print(json.dumps(getattr(import_module(call["module"]), call["function"])(**call["kwargs"])))
"""


def call_alone(module: str, function: str, kwargs: Mapping[str, object], *, timeout: float, what: str,
               timeout_name: str = "timeout") -> object:
    """``module.function(**kwargs)`` in a fresh Python process, for a model measured alone, as it is
    deployed (no session, arena or thread pool of this process's around). ``module`` is one of
    structadmm's; ``kwargs`` and the result travel as JSON. The child's error, or its running past
    ``timeout`` seconds (when it is killed), is raised here as a one-line StructADMMError about ``what``
    (``timeout_name``: what the caller calls that limit, for the hint to raise it)."""
    package = str(Path(__file__).resolve().parents[1])  # the structadmm this process imported
    call = json.dumps({"module": module, "function": function, "kwargs": dict(kwargs)})
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD, package, call], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:  # subprocess.run has killed and reaped the child
        raise StructADMMError(
            f"{what} in its own process did not finish within {timeout:g} s and was killed; if the model is only "
            f"slow, raise {timeout_name}"
        ) from None
    if done.returncode != 0:
        lines = [line for line in (done.stderr or "").splitlines() if line.strip()] or ["no output"]
        message = lines[-1].removeprefix("structadmm.errors.StructADMMError: ")
        raise StructADMMError(f"{what} in its own process failed: {message}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _run_child(job: Mapping[str, object], timeout: float) -> list[float]:
    """:func:`time_alone` in a fresh Python process (:func:`call_alone`); its run times."""
    what = f"timing {job['path']} ({job['provider']}, batch {job['batch']})"
    times = call_alone("structadmm.bench.latency", "time_alone", job, timeout=timeout, what=what,
                       timeout_name="child_timeout")
    return [float(t) for t in times]  # type: ignore[union-attr]


def round_order(names: Sequence[str], round_index: int) -> list[str]:
    """Order of the models in one timing round: forward on even rounds, reversed on odd ones."""
    return list(names) if round_index % 2 == 0 else list(reversed(names))


def time_interleaved(
    runners: Mapping[str, Runner],
    *,
    min_runs: int = 30,
    min_seconds: float = 3.0,
    max_runs: int = 10_000,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Time ``runners`` in rounds (each runs once per round, order from :func:`round_order`).

    Returns the seconds of every run per name. Stops after the round in which both ``min_runs``
    rounds and ``min_seconds`` are reached, or after ``max_runs`` rounds.
    """
    names = list(runners)
    times: dict[str, list[float]] = {name: [] for name in names}
    collecting = gc.isenabled()
    gc.collect()
    gc.disable()  # a collection must not land inside one model's timed run
    try:
        start = end = clock()
        rounds = 0
        while True:
            for name in round_order(names, rounds):
                begin = clock()
                runners[name]()
                end = clock()
                times[name].append(end - begin)
            rounds += 1
            if rounds >= max_runs or (rounds >= min_runs and end - start >= min_seconds):
                return times
    finally:
        if collecting:
            gc.enable()


def round_ratios(baseline: Sequence[float], other: Sequence[float]) -> np.ndarray:
    """Per-round speedups of ``other`` over ``baseline`` (round i: baseline[i] / other[i])."""
    if len(baseline) != len(other) or not len(baseline):
        raise StructADMMError(f"per-round ratios need the same number of rounds, got {len(baseline)} and {len(other)}")
    return np.asarray(baseline, dtype=float) / np.asarray(other, dtype=float)


class MedianInterval(NamedTuple):
    """Order statistics k and n-k+1 of n values, and the interval's coverage: the exact probability
    1 - 2 P(B <= k-1), B ~ Binomial(n, 1/2), that such an interval holds the true median of the
    distribution the values came from (continuous; with ties it holds it at least that often).
    The coverage depends on n alone: [min, max] of 3 values has 75 %, of 6 values 96.9 %."""

    low: float
    high: float
    coverage: float


def median_interval(values: Sequence[float], confidence: float = 0.95) -> MedianInterval:
    """A distribution-free confidence interval of the median, and the coverage it actually reaches.

    k is the largest rank whose interval [x_(k), x_(n-k+1)] still covers the median with probability
    at least ``confidence``; with too few values for that (fewer than 6 at 95 %) it is [min, max],
    whose ``coverage`` is then below ``confidence``: report the coverage, not the level asked for.
    """
    x = np.sort(np.asarray(values, dtype=float))
    n = len(x)
    if n == 0:
        raise StructADMMError("no values to take a median of")
    if not 0 < confidence < 1:
        raise StructADMMError(f"confidence must be between 0 and 1, got {confidence}")
    # exact integers: 2**n P(B <= j) = sum of comb(n, i) for i <= j
    limit = (1 - Fraction(confidence).limit_denominator(10**6)) / 2 * 2**n
    k, tail, term = 1, 1, n  # tail: 2**n P(B <= k - 1); term: comb(n, k)
    while 2 * (k + 1) <= n + 1 and tail + term <= limit:  # rank k + 1 keeps the coverage: take it
        tail += term
        term = term * (n - k) // (k + 1)
        k += 1
    return MedianInterval(float(x[k - 1]), float(x[n - k]), float(Fraction(2**n - 2 * tail, 2**n)))


# --- set-up -------------------------------------------------------------------------------


def _check_arguments(
    paths: Mapping[str, Path],
    baseline: str | None,
    batch_sizes: Sequence[int],
    warmup: int,
    min_runs: int,
    max_runs: int,
) -> str:
    """Validate the arguments and return the baseline's name."""
    if not paths:
        raise StructADMMError("benchmark needs at least one ONNX model")
    if baseline is not None and baseline not in paths:
        raise StructADMMError(f"baseline {baseline!r} is not one of the models {list(paths)}")
    if not batch_sizes or any(int(b) != b or b < 1 for b in batch_sizes):
        raise StructADMMError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    _check_warmup(warmup)
    if not 1 <= min_runs <= max_runs:
        raise StructADMMError(f"need 1 <= min_runs <= max_runs, got {min_runs} and {max_runs}")
    return baseline if baseline is not None else next(iter(paths))


def _check_warmup(warmup: int) -> None:
    if warmup < 1:
        raise StructADMMError(f"warmup must be at least 1 untimed run (a session's first run allocates its buffers "
                              f"and, under TensorRT, builds the engine; it must not be timed), got {warmup}")


def _select_providers(requested: Sequence[str] | None) -> tuple[list[str], list[tuple[str, str]]]:
    unknown = [p for p in requested or () if p not in ort.get_all_providers()]
    if unknown:
        raise StructADMMError(f"unknown execution provider {unknown[0]!r}; ONNX Runtime knows "
                              f"{', '.join(ort.get_all_providers()[:6])}, ...")
    available = set(ort.get_available_providers())
    wanted = [CPU, *_GPU_PROVIDERS] if requested is None else list(dict.fromkeys(requested))
    runnable = [p for p in wanted if p in available]
    skipped = [(p, _unavailable_reason(p)) for p in wanted if p not in available]
    return runnable, skipped


def _unavailable_reason(provider: str) -> str:
    hint = " (install onnxruntime-gpu and CUDA)" if provider in _GPU_PROVIDERS else ""
    return f"not available in this onnxruntime {ort.__version__} build{hint}"


def _open_sessions(
    paths: Mapping[str, Path], provider: str, settings: "SessionSettings"
) -> tuple[dict[str, ort.InferenceSession] | None, str]:
    """Sessions for every model on ``provider``, or (None, reason) when the provider is unusable.

    One session per model serves every batch size (the inputs have a dynamic batch axis), except
    under TensorRT, whose settings name one engine cache folder per batch size.
    """
    sessions = {}
    for name, path in paths.items():
        session, reason = _open_session(path, provider, settings)
        if session is None:
            return None, reason
        sessions[name] = session
    return sessions, ""


def _open_sessions_or_fail(
    paths: Mapping[str, Path], provider: str, settings: "SessionSettings"
) -> dict[str, ort.InferenceSession]:
    """:func:`_open_sessions` where the provider has already worked for these files: a failure is an error."""
    sessions, reason = _open_sessions(paths, provider, settings)
    if sessions is None:
        raise StructADMMError(f"{provider} worked for the first batch size but not now: {reason}")
    return sessions


def _open_session(path: Path, provider: str, settings: "SessionSettings") -> tuple[ort.InferenceSession | None, str]:
    if provider == TENSORRT and settings.engine_cache:
        Path(settings.engine_cache).mkdir(parents=True, exist_ok=True)
    try:
        session = ort.InferenceSession(str(path), settings.options(),
                                       providers=session_providers(path, provider, settings))
    except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types
        if provider != CPU:
            return None, f"cannot create a session for {path}: {one_line(exc)}"
        raise StructADMMError(f"{path}: ONNX Runtime cannot load it: {one_line(exc)}") from exc
    # ORT silently falls back to CPU when a GPU provider's libraries fail to load.
    if session.get_providers()[0] != provider:
        fallback = session.get_providers()[0]
        return None, f"ONNX Runtime could not initialise it (fell back to {fallback})"
    return session, ""


@dataclass(frozen=True)
class SessionSettings:
    """How every timed (and profiled) ONNX Runtime session is configured."""

    threads: int = 2
    optimization: str = "all"
    spinning: str = "run"
    engine_cache: str | None = None  # TensorRT only: the engine cache folder (None: every session builds its own)

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise StructADMMError(f"threads must be at least 1, got {self.threads}")
        if self.optimization not in OPTIMIZATION_LEVELS:
            raise StructADMMError(
                f"graph optimisation level must be one of {', '.join(OPTIMIZATION_LEVELS)}, got {self.optimization!r}"
            )
        if self.spinning not in SPINNING:
            raise StructADMMError(f"spinning must be one of {', '.join(SPINNING)}, got {self.spinning!r}")

    def options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.graph_optimization_level = OPTIMIZATION_LEVELS[self.optimization]
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: fallback warnings are reported as skips
        if self.spinning == "off":
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        elif self.spinning == "run":
            options.add_session_config_entry("session.force_spinning_stop", "1")
        return options


def session_providers(path: str | Path, provider: str, settings: SessionSettings) -> list[str | tuple[str, dict]]:
    """The ``providers`` argument of ``path``'s session: ``provider`` first, CPU (and CUDA under
    TensorRT) only for ops it cannot run. TensorRT gets its engine cache (when the settings name
    one) and, for a QDQ file (:func:`~structadmm.exporters.quantize.holds_qdq`), its INT8 and FP16
    flags: without them TensorRT runs the quantized graph as an FP32 engine. FP32 files stay FP32 engines."""
    if provider == TENSORRT:
        from structadmm.exporters.quantize import holds_qdq  # here: an isolated child imports it only for TensorRT

        int8 = holds_qdq(path)
        options: dict[str, object] = {"trt_int8_enable": int8, "trt_fp16_enable": int8,
                                      "trt_engine_cache_enable": settings.engine_cache is not None}
        if settings.engine_cache is not None:
            options["trt_engine_cache_path"] = settings.engine_cache
        return [(TENSORRT, options), CUDA, CPU]
    chain = {CPU: [CPU], CUDA: [CUDA, CPU]}.get(provider)
    return list(chain) if chain is not None else [provider, CPU]


def _common_input_spec(
    sessions: Mapping[str, ort.InferenceSession], paths: Mapping[str, Path]
) -> InputSpec:
    specs = {name: _input_spec(session, paths[name]) for name, session in sessions.items()}
    first_name, first = next(iter(specs.items()))
    for name, spec in specs.items():
        if spec != first:
            raise StructADMMError(
                f"models take different inputs: {first_name} {_describe(first)}, "
                f"{name} {_describe(spec)}; benchmarked models must take the same input shape"
            )
    return first


def _input_spec(session: ort.InferenceSession, path: Path) -> InputSpec:
    spec = []
    for meta in session.get_inputs():
        rest = meta.shape[1:]
        if not meta.shape or not all(isinstance(d, int) for d in rest):
            raise StructADMMError(
                f"{path}: input {meta.name!r} has shape {meta.shape}; only the batch axis "
                "(dim 0) may be dynamic"
            )
        if meta.type not in _NUMPY_TYPES:
            raise StructADMMError(
                f"{path}: input {meta.name!r} is {meta.type}; only float inputs can be benchmarked"
            )
        fixed_batch = meta.shape[0] if isinstance(meta.shape[0], int) else None
        spec.append(((fixed_batch, *rest), meta.type))
    return tuple(spec)


def _describe(spec: InputSpec) -> str:
    shapes = (["batch" if d is None else d for d in shape] for shape, _ in spec)
    return ", ".join(f"{shape} {kind}" for shape, (_, kind) in zip(shapes, spec))


def random_inputs(spec: InputSpec, batch: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = []
    for (fixed_batch, *rest), kind in spec:
        if fixed_batch is not None and fixed_batch != batch:
            raise StructADMMError(
                f"the models were exported with a fixed batch of {fixed_batch}, so batch {batch} "
                "cannot be measured; export with a dynamic batch axis"
            )
        sample = rng.standard_normal((batch, *rest), dtype=np.float32)
        arrays.append(sample.astype(_NUMPY_TYPES[kind]))
    return arrays


# --- running ------------------------------------------------------------------------------


def make_runner(session: ort.InferenceSession, arrays: list[np.ndarray], provider: str) -> Runner:
    """One run of ``session`` on ``arrays`` (on GPU providers through IOBinding, inputs already on the device)."""
    if provider == CPU:
        feed = {meta.name: array for meta, array in zip(session.get_inputs(), arrays)}
        return lambda: session.run(None, feed)
    return _device_runner(session, arrays)


def _device_runner(session: ort.InferenceSession, arrays: list[np.ndarray]) -> Runner:
    """Inputs copied to the GPU once and outputs left there, so a run times only the model."""
    binding = session.io_binding()
    device_inputs = [ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0) for array in arrays]
    for meta, value in zip(session.get_inputs(), device_inputs):
        binding.bind_ortvalue_input(meta.name, value)
    for meta in session.get_outputs():
        binding.bind_output(meta.name, "cuda")

    def run() -> None:
        _ = device_inputs  # keeps the device buffers alive as long as the binding is used
        session.run_with_iobinding(binding)

    return run


def _entries(
    provider: str, batch: int, threads: int, times: Mapping[str, list[float]],
    rounds: Mapping[str, list[float]], baseline: str, mode: str,
) -> list[LatencyEntry]:
    """Statistics of every run in ``times``; per-round ratios from ``rounds`` (one value per round)."""
    stats = {name: np.asarray(seconds) * 1e3 for name, seconds in times.items()}
    reference = float(np.median(stats[baseline]))
    entries = []
    for name, ms in stats.items():
        ratios = round_ratios(rounds[baseline], rounds[name])
        interval = median_interval(ratios)
        q25, median, q75, p90 = (float(v) for v in np.percentile(ms, [25, 50, 75, 90]))
        entries.append(
            LatencyEntry(
                provider=provider,
                batch=batch,
                threads=threads if provider == CPU else None,
                name=name,
                median_ms=median,
                p90_ms=p90,
                min_ms=float(ms.min()),
                iqr_ms=q75 - q25,
                runs=len(ms),
                speedup=1.0 if name == baseline else reference / median,
                round_speedup=float(np.median(ratios)),
                round_speedup_low=interval.low,
                round_speedup_high=interval.high,
                mode=mode,
                ci_coverage=interval.coverage,
                round_ms=tuple(float(t) * 1e3 for t in rounds[name]),
            )
        )
    return entries


"""ONNX Runtime latency benchmark: dense vs pruned, interleaved in one process.

This module owns how latency is measured (SPEC §6): one session per model and execution
provider (graph optimisation ALL by default, fixed thread count, sequential execution), the same seeded
random input for every model, a warm-up, then timed runs interleaved round by round with the
order reversed every round, so slow drift (thermal, frequency scaling, other load) and
"who ran last" cache effects fall on every model alike. It reports median, p90, min and IQR per
model and the speedup of each model over the baseline.

CPU is always measured; CUDA and TensorRT when ONNX Runtime offers them (on those, inputs and
outputs stay on the device through IOBinding so host↔device copies are not timed). A provider
that cannot be used is listed in ``LatencyReport.skipped`` with the reason, never silently
replaced by another.

Thread spinning (``spinning``): ORT's pool threads normally busy-wait for work, which makes
handing a kernel to a worker cheap but lets the threads of a session that just finished keep
the cores busy while the next model in the round is timed. The default ``"run"`` spins inside
a run and stops the spinning at its end (``session.force_spinning_stop``): every model gets
cheap dispatch and none steals from the next. ``"off"`` never spins (each kernel then pays a
thread wake-up, 17–37 µs on the 2-core reference machine, which dominates small layers at
batch 1); ``"on"`` is ORT's default, for timing one model alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from structadmm.errors import StructADMMError
from structadmm.exporters.onnx_export import _one_line, load_onnx

__all__ = ["LatencyEntry", "LatencyReport", "SessionSettings", "benchmark", "round_order", "time_interleaved"]

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
    threads: int
    name: str
    median_ms: float
    p90_ms: float
    min_ms: float
    iqr_ms: float
    runs: int
    speedup: float  # baseline median / this median (1.0 for the baseline itself)


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
    ) -> list[dict[str, object]]:
        """The report.json "latency" list (SPEC §5) for a dense/pruned pair.

        ``dense`` defaults to the baseline and ``pruned`` to the only other model. With
        ``mac_ratio`` (dense MACs / pruned MACs) each row also gets
        ``efficiency = speedup / mac_ratio``.
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
            }
            if mac_ratio:
                row["efficiency"] = row["speedup"] / mac_ratio
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
    spinning: str = "run",
) -> LatencyReport:
    """Measure every model at every batch size on every usable provider.

    ``models`` maps display names to ONNX files that take the same inputs with a dynamic (or
    matching) batch axis; the first model, or ``baseline``, is the reference for speedups.
    Timing stops once ``min_runs`` rounds and ``min_seconds`` have both passed, or at
    ``max_runs`` rounds. ``optimization`` is ORT's graph optimisation level (one of
    :data:`OPTIMIZATION_LEVELS`); ``spinning`` is explained in the module docstring.
    """
    paths = {name: Path(path) for name, path in models.items()}
    settings = SessionSettings(threads, optimization, spinning)
    baseline = _check_arguments(paths, baseline, batch_sizes, warmup, min_runs, max_runs)
    runnable, skipped = _select_providers(providers)
    for path in paths.values():
        load_onnx(path)  # a clear error for a missing or corrupt file before anything is timed
    names = [baseline, *(name for name in paths if name != baseline)]
    report = LatencyReport(baseline=baseline, skipped=skipped)
    for provider in runnable:
        sessions, reason = _open_sessions(paths, provider, settings)
        if sessions is None:
            report.skipped.append((provider, reason))
            continue
        spec = _common_input_spec(sessions, paths)
        for batch in batch_sizes:
            arrays = _random_inputs(spec, batch, seed)
            runners = {name: _runner(sessions[name], arrays, provider) for name in names}
            for run in runners.values():
                for _ in range(warmup):
                    run()
            times = time_interleaved(
                runners, min_runs=min_runs, min_seconds=min_seconds, max_runs=max_runs
            )
            report.entries.extend(_entries(provider, batch, threads, times, baseline))
    return report


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
    if warmup < 0:
        raise StructADMMError(f"warmup must be >= 0 runs, got {warmup}")
    if not 1 <= min_runs <= max_runs:
        raise StructADMMError(f"need 1 <= min_runs <= max_runs, got {min_runs} and {max_runs}")
    return baseline if baseline is not None else next(iter(paths))


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

    One session per model serves every batch size: the inputs have a dynamic batch axis.
    """
    sessions = {}
    for name, path in paths.items():
        try:
            session = ort.InferenceSession(
                str(path), settings.options(), providers=_provider_chain(provider)
            )
        except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types
            if provider != CPU:
                return None, f"cannot create a session for {path}: {_one_line(exc)}"
            raise StructADMMError(
                f"{path}: ONNX Runtime cannot load it: {_one_line(exc)}"
            ) from exc
        # ORT silently falls back to CPU when a GPU provider's libraries fail to load.
        if session.get_providers()[0] != provider:
            fallback = session.get_providers()[0]
            return None, f"ONNX Runtime could not initialise it (fell back to {fallback})"
        sessions[name] = session
    return sessions, ""


@dataclass(frozen=True)
class SessionSettings:
    """How every timed (and profiled) ONNX Runtime session is configured."""

    threads: int = 2
    optimization: str = "all"
    spinning: str = "run"

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


def _provider_chain(provider: str) -> list[str]:
    """``provider`` first; CPU (and CUDA under TensorRT) only for ops it cannot run."""
    chain = {CPU: [CPU], CUDA: [CUDA, CPU], TENSORRT: [TENSORRT, CUDA, CPU]}.get(provider)
    return chain if chain is not None else [provider, CPU]


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


def _random_inputs(spec: InputSpec, batch: int, seed: int) -> list[np.ndarray]:
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


def _runner(session: ort.InferenceSession, arrays: list[np.ndarray], provider: str) -> Runner:
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
    provider: str, batch: int, threads: int, times: Mapping[str, list[float]], baseline: str
) -> list[LatencyEntry]:
    stats = {name: np.asarray(seconds) * 1e3 for name, seconds in times.items()}
    reference = float(np.median(stats[baseline]))
    entries = []
    for name, ms in stats.items():
        q25, median, q75, p90 = (float(v) for v in np.percentile(ms, [25, 50, 75, 90]))
        entries.append(
            LatencyEntry(
                provider=provider,
                batch=batch,
                threads=threads,
                name=name,
                median_ms=median,
                p90_ms=p90,
                min_ms=float(ms.min()),
                iqr_ms=q75 - q25,
                runs=len(ms),
                speedup=1.0 if name == baseline else reference / median,
            )
        )
    return entries


"""The CUDA / TensorRT runner, run here without a GPU: onnxruntime's InferenceSession, IOBinding and
OrtValue are replaced by fakes that record what the harness asks of them (providers and their options,
bindings, runs), and the isolated children by a recorder. What is checked is what a GPU run depends on:
engines cached in the run folder and built before anything is timed, INT8 engines for QDQ files,
inputs and outputs bound on the device once, no thread count on GPU rows, and a child that hangs is
killed after its timeout. Last, benchmarks/gpu_check.sh refuses in one line where there is no GPU."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from structadmm.bench import benchmark, latency, write_report
from structadmm.errors import StructADMMError

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
FAST = {"min_seconds": 0.0, "min_runs": 3, "warmup": 2, "threads": 3}


# --- two small ONNX files: FP32 and QDQ INT8 (real files: benchmark validates them) ----------


def _save(path: Path, nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto]) -> Path:
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 8, 8])
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    run = tmp_path / "run"
    run.mkdir()
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [0.05])
    zero = helper.make_tensor("zero", TensorProto.UINT8, [], [128])
    qdq = [helper.make_node("QuantizeLinear", ["input", "scale", "zero"], ["q"]),
           helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["dq"]),
           helper.make_node("Relu", ["dq"], ["y"])]
    return {"dense": _save(run / "dense.onnx", [helper.make_node("Relu", ["input"], ["y"])], []),
            "int8": _save(run / "dense-int8.onnx", qdq, [scale, zero])}


# --- the fake onnxruntime ------------------------------------------------------------------


class Meta:
    def __init__(self, name: str, shape: list[Any]) -> None:
        self.name, self.shape, self.type = name, shape, "tensor(float)"


class FakeValue:
    """An OrtValue: where its copy of the array lives."""

    def __init__(self, array: np.ndarray, device: str, device_id: int) -> None:
        self.shape, self.device, self.device_id = array.shape, device, device_id


class FakeOrtValue:
    made: list[FakeValue] = []

    @staticmethod
    def ortvalue_from_numpy(array: np.ndarray, device: str = "cpu", device_id: int = 0) -> FakeValue:
        value = FakeValue(array, device, device_id)
        FakeOrtValue.made.append(value)
        return value


class FakeBinding:
    def __init__(self) -> None:
        self.inputs: dict[str, FakeValue] = {}
        self.outputs: dict[str, str] = {}

    def bind_ortvalue_input(self, name: str, value: FakeValue) -> None:
        self.inputs[name] = value

    def bind_output(self, name: str, device_type: str = "cpu", device_id: int = 0) -> None:
        self.outputs[name] = device_type


class FakeSession:
    """Records every session: its file, its providers as passed (with options), and its runs."""

    opened: list["FakeSession"] = []
    events: list[tuple[Any, ...]] = []  # ("run", file, batch, cache folder) and, from the fake child, ("child", ...)
    usable = {CPU, CUDA, TRT}  # providers whose libraries "load"; the others fall back, as ORT does

    def __init__(self, path: str, options: Any = None, providers: list[Any] | None = None) -> None:
        self.path, self.options, self.providers = Path(path), options, list(providers or [CPU])
        self.names = [p if isinstance(p, str) else p[0] for p in self.providers]
        self.runs = self.bindings = 0
        FakeSession.opened.append(self)

    def provider_options(self, name: str) -> dict[str, Any] | None:
        return next((p[1] for p in self.providers if not isinstance(p, str) and p[0] == name), None)

    def get_providers(self) -> list[str]:
        return [name for name in self.names if name in FakeSession.usable]

    def get_inputs(self) -> list[Meta]:
        return [Meta("input", ["N", 3, 8, 8])]

    def get_outputs(self) -> list[Meta]:
        return [Meta("y", ["N", 3, 8, 8])]

    def io_binding(self) -> FakeBinding:
        self.bindings += 1
        return FakeBinding()

    def run_with_iobinding(self, binding: FakeBinding) -> None:
        assert self.get_providers()[0] != CPU, "IOBinding on the device is for GPU providers"
        assert set(binding.inputs) == {"input"} and binding.outputs == {"y": "cuda"}
        assert all(v.device == "cuda" for v in binding.inputs.values())
        self.runs += 1
        cache = (self.provider_options(TRT) or {}).get("trt_engine_cache_path")
        FakeSession.events.append(("run", self.path.name, binding.inputs["input"].shape[0], cache))

    def run(self, outputs: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        assert self.get_providers()[0] == CPU, "a GPU session must run through IOBinding (no host copies timed)"
        self.runs += 1
        return [np.maximum(feed["input"], 0)]


@pytest.fixture()
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> type[FakeSession]:
    FakeSession.opened, FakeSession.events, FakeSession.usable = [], [], {CPU, CUDA, TRT}
    FakeOrtValue.made = []
    monkeypatch.setattr(latency.ort, "InferenceSession", FakeSession)
    monkeypatch.setattr(latency.ort, "OrtValue", FakeOrtValue)
    monkeypatch.setattr(latency.ort, "get_available_providers", lambda: [TRT, CUDA, CPU])
    return FakeSession


# --- TensorRT: engine cache, INT8 flags -----------------------------------------------------


def test_tensorrt_caches_engines_in_the_run_folder_and_builds_qdq_files_as_int8(
    files: dict[str, Path], fake_gpu: type[FakeSession]
) -> None:
    result = benchmark(files, batch_sizes=(1, 4), providers=[TRT], isolate=False, **FAST)
    assert [(e.provider, e.batch, e.name) for e in result.entries] == [
        (TRT, 1, "dense"), (TRT, 1, "int8"), (TRT, 4, "dense"), (TRT, 4, "int8")]
    run = files["dense"].parent
    timed = [s for s in fake_gpu.opened if s.runs]
    assert {(s.path.name, s.provider_options(TRT)["trt_engine_cache_path"]) for s in timed} == {
        (f.name, str(run / "trt_engines" / f"batch{b}")) for f in files.values() for b in (1, 4)}
    for session in fake_gpu.opened:
        options = session.provider_options(TRT)
        assert session.names == [TRT, CUDA, CPU]  # CUDA, then CPU, only for what TensorRT cannot run
        assert options["trt_engine_cache_enable"] is True
        assert Path(options["trt_engine_cache_path"]).is_dir()
        int8 = session.path.name == "dense-int8.onnx"  # the QDQ file: an INT8 (and FP16) engine, not FP32
        assert (options["trt_int8_enable"], options["trt_fp16_enable"]) == (int8, int8)
    for session in timed:  # each batch size its own sessions, warmed up before timing
        assert session.runs == FAST["warmup"] + FAST["min_runs"]


def test_engine_cache_folder_can_be_named(files: dict[str, Path], fake_gpu: type[FakeSession], tmp_path: Path) -> None:
    benchmark(files, batch_sizes=(2,), providers=[TRT], isolate=False, engine_cache=tmp_path / "engines", **FAST)
    assert {s.provider_options(TRT)["trt_engine_cache_path"] for s in fake_gpu.opened} == {
        str(tmp_path / "engines" / "batch2")}
    assert not (files["dense"].parent / "trt_engines").exists()


def test_isolated_tensorrt_builds_every_engine_before_any_child_is_timed(
    files: dict[str, Path], fake_gpu: type[FakeSession], monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs: list[tuple[dict[str, Any], float]] = []

    def child(job: dict[str, Any], timeout: float) -> list[float]:
        jobs.append((job, timeout))
        fake_gpu.events.append(("child", Path(job["path"]).name, job["batch"], job["settings"]["engine_cache"]))
        return [0.001] * job["min_runs"]

    monkeypatch.setattr(latency, "_run_child", child)
    benchmark(files, batch_sizes=(1, 4), providers=[TRT], processes=2, child_timeout=77.0, **FAST)
    run = files["dense"].parent
    for batch in (1, 4):
        cache = str(run / "trt_engines" / f"batch{batch}")
        events = [e for e in fake_gpu.events if e[2] == batch]
        first_child = next(i for i, e in enumerate(events) if e[0] == "child")
        built = {e[1] for e in events[:first_child] if e[0] == "run" and e[3] == cache}
        assert built == {"dense.onnx", "dense-int8.onnx"}  # in this process, into the cache, before any child
        assert not any(e[0] == "run" for e in events[first_child:])  # and nothing of the parent runs while timed
        assert [e[3] for e in events if e[0] == "child"] == [cache] * 4  # the children load that cache
    assert {timeout for _, timeout in jobs} == {77.0}
    for job, _ in jobs:
        assert job["warmup"] >= 1 and job["provider"] == TRT
        assert json.loads(json.dumps(job)) == job  # what the child gets on its command line
        assert latency.SessionSettings(**job["settings"]) == latency.SessionSettings(
            threads=3, spinning="on", engine_cache=job["settings"]["engine_cache"])


def test_what_an_isolated_child_opens(files: dict[str, Path], fake_gpu: type[FakeSession], tmp_path: Path) -> None:
    settings = latency.SessionSettings(threads=1, engine_cache=str(tmp_path / "cache"))
    times = latency.time_alone(files["int8"], provider=TRT, batch=2, settings=settings, warmup=1, min_runs=4,
                               min_seconds=0.0)
    (session,) = fake_gpu.opened
    assert len(times) == 4 and session.runs == 5  # one warm-up (the engine loads or builds there), four timed
    assert session.provider_options(TRT) == {"trt_engine_cache_enable": True,
                                             "trt_engine_cache_path": str(tmp_path / "cache"),
                                             "trt_int8_enable": True, "trt_fp16_enable": True}
    with pytest.raises(StructADMMError, match="warmup must be at least 1"):
        latency.time_alone(files["int8"], provider=TRT, settings=settings, warmup=0)


# --- CUDA: IOBinding, fallback, rows --------------------------------------------------------


def test_cuda_binds_inputs_and_outputs_on_the_device_once(files: dict[str, Path], fake_gpu: type[FakeSession]) -> None:
    result = benchmark(files, batch_sizes=(5,), providers=[CUDA], isolate=False, **FAST)
    assert {e.provider for e in result.entries} == {CUDA}
    assert all(s.names == [CUDA, CPU] and s.provider_options(CUDA) is None for s in fake_gpu.opened)
    timed = [s for s in fake_gpu.opened if s.runs]
    assert len(timed) == 2 and all(s.bindings == 1 for s in timed)  # bound once, not per run
    assert all(s.runs == FAST["warmup"] + FAST["min_runs"] for s in timed)
    assert [(v.shape, v.device) for v in FakeOrtValue.made] == [((5, 3, 8, 8), "cuda")] * 2  # one copy per model


def test_a_provider_that_falls_back_to_cpu_is_skipped(files: dict[str, Path], fake_gpu: type[FakeSession]) -> None:
    fake_gpu.usable = {CPU}  # the GPU libraries fail to load: ORT quietly runs on CPU
    result = benchmark(files, batch_sizes=(1,), providers=[TRT, CUDA], isolate=False, **FAST)
    assert result.entries == []
    assert result.skipped == [(TRT, "ONNX Runtime could not initialise it (fell back to CPUExecutionProvider)"),
                              (CUDA, "ONNX Runtime could not initialise it (fell back to CPUExecutionProvider)")]


def test_gpu_rows_carry_no_thread_count(files: dict[str, Path], fake_gpu: type[FakeSession], tmp_path: Path) -> None:
    result = benchmark(files, batch_sizes=(1,), providers=[CPU, CUDA, TRT], isolate=False, **FAST)
    rows = result.to_rows(dense="dense", pruned="int8")
    assert {row["provider"]: row["threads"] for row in rows} == {CPU: 3, CUDA: None, TRT: None}
    assert all(row["mode"] == "in-process" and 0 < row["ci_coverage"] < 1 for row in rows)
    write_report(tmp_path / "report", {"model": "m", "latency": rows})
    latency_section = (tmp_path / "report" / "report.md").read_text().split("## Latency")[1]
    table = [line.split(" | ") for line in latency_section.splitlines() if line.startswith("| ")]
    assert table[0][2] == "threads"
    threads = {cells[0].removeprefix("| "): cells[2] for cells in table[1:]}
    assert threads == {"CPU": "3", "CUDA": "n/a", "Tensorrt": "n/a"}


# --- the child's time limit -----------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a named pipe")
def test_a_hung_child_is_killed_after_its_timeout_and_reported_in_one_line(tmp_path: Path) -> None:
    hang = tmp_path / "hang.onnx"
    os.mkfifo(hang)  # opening it for reading blocks until a writer comes: the child hangs in session creation
    job = dict(path=str(hang), provider=CPU, batch=1, settings={"threads": 1, "optimization": "all", "spinning": "on"},
               warmup=1, seed=0, min_runs=1, min_seconds=0.0, max_runs=1)
    start = time.perf_counter()
    with pytest.raises(StructADMMError) as caught:
        latency._run_child(job, 3.0)
    elapsed = time.perf_counter() - start
    message = str(caught.value)
    assert "\n" not in message and "hang.onnx" in message
    assert "did not finish within 3 s and was killed" in message and message.endswith("raise child_timeout")
    assert 3.0 <= elapsed < 20.0
    with pytest.raises(OSError) as no_reader:  # nobody holds the pipe open any more: the child is gone
        os.close(os.open(hang, os.O_WRONLY | os.O_NONBLOCK))
    assert no_reader.value.errno == errno.ENXIO



# --- benchmarks/gpu_check.sh refuses at once where there is no GPU --------------------------

GPU_CHECK = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def _gpu_check(tmp_path: Path, smi: str, python: str = sys.executable) -> subprocess.CompletedProcess:
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(GPU_CHECK), str(out)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NVIDIA_SMI": smi, "PYTHON": python})
    assert not out.exists()  # it stops before writing anything
    return done


def _fake_smi(tmp_path: Path, script: str) -> str:
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + script + "\n")
    smi.chmod(0o755)
    return str(smi)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize(("smi", "says"), [
    (None, "no NVIDIA GPU here (/nonexistent/nvidia-smi not found)"),
    ("exit 9", "finds no usable GPU"),
    ('echo "No devices were found"', "lists no GPU"),
])
def test_gpu_check_refuses_in_one_line_without_a_gpu(tmp_path: Path, smi: str | None, says: str) -> None:
    done = _gpu_check(tmp_path, "/nonexistent/nvidia-smi" if smi is None else _fake_smi(tmp_path, smi))
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("gpu_check: ") and says in done.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.skipif("CUDAExecutionProvider" in latency.ort.get_available_providers(),
                    reason="this onnxruntime has CUDA: the script would run for real")
def test_gpu_check_refuses_a_cpu_onnxruntime_in_one_line(tmp_path: Path) -> None:
    done = _gpu_check(tmp_path, _fake_smi(tmp_path, 'echo "GPU 0: NVIDIA H100 (UUID: GPU-0)"'))
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1
    assert "has no CUDAExecutionProvider" in done.stderr and "pip install onnxruntime-gpu" in done.stderr

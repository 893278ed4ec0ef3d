"""The first conversion of a user's ONNX file runs in a child process with a memory and a time limit.

:mod:`.onnx_guard` reads and renames the file and bounds what it can; whatever those checks miss
must not take the parent down. :func:`dry_run` hands the renamed, self-contained model to a child
process which, under an address-space limit (``RLIMIT_AS``: what the child maps when it starts plus
``memory`` bytes) and a wall-clock limit (killed after ``seconds``):

1. runs :func:`~.onnx_guard.check_sizes`: ONNX shape inference (with constant folding of shapes
   and data propagation) at the largest batch the parent checks, so that every tensor's size is
   known and bounded before anything computes it;
2. converts the model with :func:`~.onnx_convert.convert`, the parent's own conversion code, and
   runs the module and ONNX Runtime once on seeded inputs at that batch;
3. answers with one JSON line: ``{"ok": true, "memory": <bytes the checks estimate>}`` or
   ``{"error": "<one line>"}``.

What crosses between the processes is data only: the parent sends the model's bytes and numbers,
and gets back a verdict, never an object, a pickle or code. The error line names the renamed
model's nodes; the parent puts the file's own names back (:meth:`.onnx_guard.NameMap.restore_text`)
and shows it. When the child has converted and run the model within the limits, the parent
converts the same bytes itself: the same code on the same bytes and inputs takes the same memory
and time, and the parent gets an ordinary ``nn.Module`` without rebuilding one from a description.
(Shipping the module back was rejected: a torch.fx GraphModule pickles as Python source, which is
what unpickling it runs, and rebuilding onnx2torch's modules from data would need a whitelist of
every module class it has. Converting twice costs one conversion of the model, tens of
milliseconds to a few seconds; the zygote below keeps the rest small.)

Children come from a *zygote*: one fresh interpreter per parent process (``python -P``, so
nothing in the current folder shadows a module), started on first use, which imports torch, onnx,
onnx2torch and structadmm once and forks a child per file. A fork takes milliseconds where a
fresh interpreter takes seconds to import torch and onnx2torch. Forking is safe there because the
zygote never runs a model: no OpenMP or torch thread pool has started, OpenBLAS runs with
``OPENBLAS_NUM_THREADS=1`` (no thread of its own), and the one other thread is the idle one ONNX
Runtime's module starts when imported; the zygote never creates a session, each child creates its
own. (A child that hung on a lock held across the fork would be stopped by its time limit.) The
zygote runs in the file system's root folder; its children send nothing to the terminal and are
killed if it dies. The zygote exits when the parent closes its pipe (at exit, or
when the parent dies). The address-space limit needs Linux (``/proc/self/status``); elsewhere the
child runs with the time limit only.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from ..errors import StructADMMError

#: Address space a child may map beyond ``memory``: thread stacks and allocator arenas that are
#: reserved, not used (MALLOC_ARENA_MAX=2 keeps the arenas few), per thread, and once.
_HEADROOM = 512 * 1024**2
_PER_THREAD = 16 * 1024**2
#: The longest answer read from a child, and how long the zygote may take to start.
_ANSWER_BYTES = 1 << 16
_START_SECONDS = 120.0
_LENGTH = struct.Struct(">Q")


@dataclass(frozen=True)
class Request:
    """What the child is asked to check: the model's inputs at ``batch`` samples of ``sample_shapes``,
    ``tensor`` bytes per tensor and ``memory`` bytes in all, within ``seconds``."""

    sample_shapes: Sequence[Sequence[int]]
    batch: int
    tensor: int
    memory: int
    seconds: float


def dry_run(model: bytes, request: Request) -> dict:
    """The child's verdict on ``model`` (the serialized, renamed ModelProto): ``{"ok": True, ...}`` or
    ``{"error": one line}``. One line of :class:`StructADMMError` when no child can be started."""
    with _LOCK:
        global _ZYGOTE
        for attempt in range(2):  # a zygote that died (killed from outside, say) is started again once
            if _ZYGOTE is None or _ZYGOTE.poll() is not None:
                _ZYGOTE = _Zygote()
            try:
                answer = _ZYGOTE.ask(request, model)
                _LAST.clear()
                _LAST.update({k: answer[k] for k in ("seconds", "cpu", "peak") if isinstance(answer.get(k), (int, float))})
                return answer
            except BrokenPipeError:
                _ZYGOTE.close()
                _ZYGOTE = None
                if attempt:
                    raise StructADMMError("the sandbox process for ONNX files stopped; try again") from None
    raise AssertionError("unreachable")


def last_child() -> dict:
    """What the latest child took: ``seconds`` of wall time, ``cpu`` seconds, and ``peak`` bytes of resident
    memory beyond what it had when forked (for tests and diagnostics)."""
    return dict(_LAST)


def warm() -> None:
    """Start the zygote now (if it is not running), so that its imports overlap the parent's reading."""
    with _LOCK:
        global _ZYGOTE
        if _ZYGOTE is None or _ZYGOTE.poll() is not None:
            _ZYGOTE = _Zygote()


# --- the parent's side ---------------------------------------------------------------------------------


_LOCK = threading.Lock()
_ZYGOTE: "_Zygote | None" = None
_LAST: dict = {}

_BOOT = """
import sys
sys.path.insert(0, {root!r})
from structadmm.models.onnx_sandbox import serve
serve()
"""


class _Zygote:
    def __init__(self) -> None:
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, MALLOC_ARENA_MAX="2", OPENBLAS_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
        self.started = time.monotonic()
        self.ready = False
        self.process = subprocess.Popen(
            [sys.executable, "-P", "-c", _BOOT.format(root=root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, env=env, close_fds=True, cwd=os.path.abspath(os.sep),
        )
        atexit.register(self.close)

    def poll(self) -> int | None:
        return self.process.poll()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.close()
                self.process.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()

    def ask(self, request: Request, model: bytes) -> dict:
        if not self.ready:
            hello = self._line(_START_SECONDS)
            if hello.get("ready") is not True:
                self.close()
                raise StructADMMError(f"the sandbox process for ONNX files did not start: {hello.get('error', 'no answer')}")
            self.ready = True
        header = json.dumps(asdict(request)).encode()
        stream = self.process.stdin
        stream.write(_LENGTH.pack(len(header)) + header + _LENGTH.pack(len(model)))
        stream.write(model)
        stream.flush()
        return self._line(request.seconds + 30.0)

    def _line(self, seconds: float) -> dict:
        """One JSON line from the zygote within ``seconds`` (it enforces the child's own time limit)."""
        out = self.process.stdout
        deadline = time.monotonic() + seconds
        data = b""
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([out], [], [], left)[0]:
                self.process.kill()
                self.process.wait()
                raise StructADMMError(f"the sandbox process for ONNX files did not answer within {seconds:.0f} s")
            chunk = os.read(out.fileno(), _ANSWER_BYTES)
            if not chunk:
                raise BrokenPipeError
            data += chunk
        try:
            answer = json.loads(data)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise StructADMMError("the sandbox process for ONNX files answered something unreadable")
        return answer


# --- the zygote -----------------------------------------------------------------------------------------


def serve() -> None:
    """The zygote's loop: read a request from stdin, fork a child to check it, answer one JSON line."""
    try:
        import numpy  # noqa: F401  (imported once here, shared by every child)
        import onnx  # noqa: F401
        import onnx.reference  # noqa: F401  (folds shape constants in check_sizes)
        import onnx2torch  # noqa: F401
        import torch  # noqa: F401

        from . import onnx_convert, onnx_guard  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - told to the parent as one line
        _answer(sys.stdout.buffer, {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]})
        return
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    _answer(stdout, {"ready": True})
    while True:
        header = _read_block(stdin)
        model = _read_block(stdin)
        if header is None or model is None:
            return
        _answer(stdout, _fork_child(Request(**json.loads(header)), model))


def _read_block(stream) -> bytes | None:
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    (length,) = _LENGTH.unpack(head)
    data = stream.read(length)
    return data if len(data) == length else None


def _answer(stream, answer: dict) -> None:
    stream.write(json.dumps(answer).encode() + b"\n")
    stream.flush()


def _fork_child(request: Request, model: bytes) -> dict:
    """Fork a child to :func:`_check` ``model``; its answer (or why there is none), with the ``seconds`` it
    took and its ``peak`` resident memory beyond what it had when it started."""
    started = time.monotonic()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read)
        code = 1
        try:
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):  # nothing it prints reaches the parent's pipe or terminal
                os.dup2(devnull, fd)
            os.write(write, b"%d\n" % _status_bytes("VmRSS"))  # what it maps at the start: the base of its peak
            answer = _check(request, model)
            os.write(write, json.dumps(answer).encode()[:_ANSWER_BYTES])
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    deadline = time.monotonic() + request.seconds
    data, timed_out = b"", False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read], [], [], left)[0]:
                timed_out = True
                break
            chunk = os.read(read, _ANSWER_BYTES)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(read)
        if timed_out:
            os.kill(pid, signal.SIGKILL)
        _, status, usage = os.wait4(pid, 0)
    start, _, data = data.partition(b"\n")
    peak = max(0, usage.ru_maxrss * 1024 - int(start)) if start.isdigit() else None
    return {**_verdict(data, status, timed_out, request), "seconds": time.monotonic() - started, "peak": peak,
            "cpu": usage.ru_utime + usage.ru_stime}


def _verdict(data: bytes, status: int, timed_out: bool, request: Request) -> dict:
    from .onnx_guard import FILE_MARK

    if timed_out:
        return {"error": f"{FILE_MARK}: converting it took longer than {request.seconds:.0f} s, the time limit for "
                         "ONNX files (time_limit)"}
    try:
        answer = json.loads(data)
        if isinstance(answer, dict):
            return answer
    except ValueError:
        pass
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        return {"error": f"{FILE_MARK}: converting it crashed ({name}); it may need more than the memory limit "
                         f"for ONNX files, {request.memory / 1e9:.3g} GB (memory_limit)"}
    return {"error": f"{FILE_MARK}: converting it stopped without an answer (exit status {os.WEXITSTATUS(status)})"}


# --- the child ------------------------------------------------------------------------------------------


def _status_bytes(field: str) -> int:
    """A size from /proc/self/status (``VmSize``, ``VmRSS``, ``VmHWM``: the peak RSS); 0 where there is none."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))
    except (OSError, StopIteration, ValueError):
        return 0


def _limit(request: Request) -> None:
    """Cap the child's address space at what it maps now plus ``request.memory`` and room for thread
    stacks, and its CPU time (a backstop to the zygote's clock); kill it if the zygote dies."""
    try:
        import ctypes
        import resource

        import torch
    except ImportError:
        return
    try:
        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass
    threads = torch.get_num_threads()
    cpu, hard = int(request.seconds * (threads + 1)) + 10, resource.getrlimit(resource.RLIMIT_CPU)[1]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu if hard == resource.RLIM_INFINITY else min(cpu, hard), hard))
    mapped, memory = _status_bytes("VmSize"), request.memory
    if not mapped:
        return  # not Linux: the time limits alone
    soft = mapped + memory + _HEADROOM + _PER_THREAD * threads
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _check(request: Request, model: bytes) -> dict:
    """The child's work (see the module docstring); every failure becomes ``{"error": one line}``, worded
    as the parent's own run would word it."""
    import warnings

    from ..errors import one_line
    from .onnx_guard import FILE_MARK

    warnings.simplefilter("ignore")
    stage = f"{FILE_MARK}: checking it failed"
    try:
        _limit(request)
        import onnx
        import torch

        from .onnx_guard import SizeLimits, check_sizes
        from .onnx_convert import convert, example_batch

        proto = onnx.ModelProto.FromString(model)
        needed = check_sizes(proto, request.sample_shapes, request.batch,
                             SizeLimits(request.tensor, request.memory), FILE_MARK)
        inputs = example_batch(proto, request.sample_shapes, request.batch, seed=request.batch)
        stage = f"{FILE_MARK}: onnx2torch cannot convert it"
        module = convert(proto, FILE_MARK, inputs)
        del proto
        stage = f"the PyTorch conversion of {FILE_MARK} fails at batch {request.batch}"
        with torch.no_grad():
            module(*inputs)
        del module
        stage = f"{FILE_MARK}: ONNX Runtime cannot run it"
        _run_onnx_runtime(model, inputs)
        return {"ok": True, "memory": needed}
    except StructADMMError as exc:
        return {"error": str(exc)}
    except MemoryError:
        return {"error": _out_of_memory(request)}
    except Exception as exc:  # noqa: BLE001 - told to the parent as one line
        text = one_line(exc)
        if "alloc" in text.lower():  # torch's and ONNX Runtime's allocators say so, as RuntimeError
            return {"error": _out_of_memory(request)}
        return {"error": f"{stage}: {type(exc).__name__}: {text}"}


def _out_of_memory(request: Request) -> str:
    from .onnx_guard import FILE_MARK

    return (f"{FILE_MARK}: converting and running it at batch {request.batch} needs more than "
            f"{request.memory / 1e9:.3g} GB, the memory limit for ONNX files (memory_limit)")


def _run_onnx_runtime(model: bytes, inputs) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = False
    options.log_severity_level = 4
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    session.run(None, {name: t.numpy() for name, t in zip(names, inputs)})

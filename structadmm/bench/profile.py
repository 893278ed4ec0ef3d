"""Where the time goes: per-layer ONNX Runtime profiles of a dense and a pruned model.

ONNX Runtime's profiler records every kernel's duration. Node names from the exporter carry
the torch module path (``/features/features.3/Conv``), and surgery keeps module names, so
the dense and pruned graphs line up layer by layer (a dense file from elsewhere lines up in
graph order: :func:`pair_layers`): for every Conv / Gemm / MatMul the
table has its output channels, MACs, bytes moved (the roofline's memory side: activations read
and written at the profiled batch plus the weights, from :func:`~structadmm.exporters.count_onnx`)
and measured time in both models. Fused kernels (a Conv that absorbed its ReLU) carry the time of
what they absorbed. Times are averaged over the runs after the warm-up only.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from structadmm.bench.latency import SessionSettings, call_alone
from structadmm.errors import StructADMMError
from structadmm.exporters.counting import count_onnx
from structadmm.exporters.onnx_export import load_onnx

_MATRIX_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


@dataclass(frozen=True)
class LayerRow:
    """One matrix layer in the dense and the pruned model (pruned fields None if it is gone)."""

    name: str
    op_type: str
    dense_channels: int | None
    pruned_channels: int | None
    dense_macs: int
    pruned_macs: int | None
    dense_ms: float
    pruned_ms: float | None
    dense_bytes: int = 0  # bytes moved at the profiled batch (activations in and out, weights)
    pruned_bytes: int | None = None


def node_times(path: str | Path, *, batch: int = 8, threads: int = 2, runs: int = 20, seed: int = 0,
               spinning: str = "run", warmup: int = 5, alone: bool = False) -> dict[str, float]:
    """Mean milliseconds per timed run of every node, from ONNX Runtime's profiler (warm-up runs left
    out); ``alone``: profiled in a fresh process of its own (:func:`profile_events`)."""
    events = profile_events(path, batch=batch, threads=threads, runs=runs, seed=seed, spinning=spinning, warmup=warmup,
                            alone=alone)
    owner = kernel_owner(load_onnx(path))
    total: dict[str, float] = defaultdict(float)
    for kernel, ms in kernel_times(events, warmup=warmup).items():
        total[owner(kernel)] += ms
    return dict(total)


def profile_events(path: str | Path, *, batch: int = 8, threads: int = 2, runs: int = 20, seed: int = 0,
                   spinning: str = "run", warmup: int = 5, alone: bool = False,
                   timeout: float = 600.0) -> list[dict]:
    """ONNX Runtime's profiler events for ``warmup + runs`` runs of ``path`` on random inputs of ``batch``
    (CPU); :func:`kernel_times` cuts the warm-up runs out. ``alone``: in a fresh Python process of its own,
    killed after ``timeout`` seconds, as isolated timing runs a model (nothing of this process's sessions,
    arenas or thread pools around it)."""
    load_onnx(path)
    if alone:
        kwargs = dict(path=str(path), batch=batch, threads=threads, runs=runs, seed=seed, spinning=spinning,
                      warmup=warmup)
        return call_alone("structadmm.bench.profile", "profile_events", kwargs, timeout=timeout,
                          what=f"profiling {path}")  # type: ignore[return-value]
    with tempfile.TemporaryDirectory() as tmp:
        options = SessionSettings(threads, spinning=spinning).options()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(seed)
        feed = {i.name: rng.standard_normal((batch, *i.shape[1:]), dtype=np.float32) for i in session.get_inputs()}
        for _ in range(warmup + runs):  # the profiler cannot start late: kernel_times cuts the warm-up out
            session.run(None, feed)
        return json.loads(Path(session.end_profiling()).read_text())


def kernel_ops(events: list[dict]) -> dict[str, str]:
    """The op type ORT ran for each kernel of a profile (``QLinearConv``, ``FusedConv``, ...)."""
    return {e["name"][: -len("_kernel_time")]: e["args"]["op_name"] for e in events
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")}


def kernel_times(events: list[dict], *, warmup: int) -> dict[str, float]:
    """Mean milliseconds per run of every kernel in a profile, over the runs after the first ``warmup``.

    Every ``session.run`` is one ``model_run`` event; a kernel's events belong to the run whose
    span contains their start.
    """
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    if len(runs) <= warmup:
        raise StructADMMError(f"the profile has {len(runs)} runs; nothing is left after {warmup} warm-up runs")
    start = runs[warmup][0]
    timed = len(runs) - warmup
    total: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= start:
            total[event["name"][: -len("_kernel_time")]] += event["dur"] / 1000.0
    return {name: ms / timed for name, ms in total.items()}


def kernel_owner(proto: onnx.ModelProto):
    """Map a kernel name from the profiler to the graph node that owns its time.

    ORT's optimiser renames what it fuses: ``fused X`` for a node X, ``<tensor>_nchwc``
    for a chain Conv -> Relu rewritten to the blocked layout (named after its last output), or
    ``X_token_N`` for QDQ nodes around X fused into one quantized kernel (QLinearConv, QGemm).
    Such time goes to the matrix node at the head of the chain.
    """
    nodes = {node.name: node for node in proto.graph.node}
    producer = {out: node for node in proto.graph.node for out in node.output}

    def owner(kernel: str) -> str:
        name = re.sub(r"_token_\d+$", "", kernel.removeprefix("fused ").removesuffix("_nchwc"))
        node = nodes.get(name) or producer.get(name)
        if node is None:
            return name
        while node.op_type not in _MATRIX_OPS and node.input and node.input[0] in producer:
            node = producer[node.input[0]]
        return node.name if node.op_type in _MATRIX_OPS else (nodes.get(name) or producer[name]).name

    return owner


def _out_channels(proto: onnx.ModelProto) -> dict[str, int]:
    shapes = {init.name: list(init.dims) for init in proto.graph.initializer}
    out = {}
    for node in proto.graph.node:
        if node.op_type in _MATRIX_OPS and len(node.input) > 1 and node.input[1] in shapes:
            dims = shapes[node.input[1]]
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            out[node.name] = dims[0] if node.op_type in ("Conv", "ConvTranspose") or trans_b else dims[-1]
    return out


def layer_table(dense: str | Path, pruned: str | Path, *, batch: int = 8, threads: int = 2,
                runs: int = 20, spinning: str = "run", alone: bool = False) -> list[LayerRow]:
    """Per matrix layer: channels, MACs, bytes moved and measured time in the dense and the pruned model
    (``alone``: each profiled in a fresh process of its own)."""
    costs = {}
    times = {}
    channels = {}
    for key, path in (("dense", dense), ("pruned", pruned)):
        costs[key] = {layer.name: layer for layer in count_onnx(path).layers if layer.op_type in _MATRIX_OPS}
        times[key] = node_times(path, batch=batch, threads=threads, runs=runs, spinning=spinning, alone=alone)
        channels[key] = _out_channels(load_onnx(path))
    match = pair_layers([(n, c.op_type) for n, c in costs["dense"].items()],
                        [(n, c.op_type) for n, c in costs["pruned"].items()])
    rows = []
    for name, layer in costs["dense"].items():
        other = match.get(name)
        small = costs["pruned"].get(other) if other else None
        rows.append(LayerRow(
            name=name, op_type=layer.op_type,
            dense_channels=channels["dense"].get(name), pruned_channels=channels["pruned"].get(other),
            dense_macs=layer.macs, pruned_macs=small.macs if small else None,
            dense_ms=times["dense"].get(name, 0.0),
            pruned_ms=times["pruned"].get(other, 0.0) if small else None,
            dense_bytes=layer.bytes_at(batch), pruned_bytes=small.bytes_at(batch) if small else None,
        ))
    return rows


def pair_layers(dense: list[tuple[str, str]], pruned: list[tuple[str, str]]) -> dict[str, str]:
    """Dense matrix layer name → pruned layer name, from (name, op type) lists in graph order.

    By name where the names line up (both files exported by structadmm). A dense file from
    elsewhere (a user's ONNX file) names its nodes its own way: then layers pair in graph
    order, where both files have the same sequence of matrix op types.
    """
    pruned_names = {name for name, _ in pruned}
    if any(name in pruned_names for name, _ in dense):
        return {name: name for name, _ in dense if name in pruned_names}
    if [op for _, op in dense] == [op for _, op in pruned]:
        return {d: p for (d, _), (p, _) in zip(dense, pruned)}
    return {}

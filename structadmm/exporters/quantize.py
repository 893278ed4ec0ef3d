"""INT8 ONNX files made by ONNX Runtime's quantization tooling, and the gate they must pass.

This module owns the step "FP32 ONNX file → INT8 ONNX file" and nothing of the arithmetic:
every scale and zero point comes from ``onnxruntime.quantization``.

* :func:`quantize_onnx`: ``quant_pre_process``, then static quantization (QDQ format, per-channel
  weights, activations calibrated on the batches given, with MinMax, Entropy or Percentile)
  or dynamic quantization (weights only, activations ranged at run time: for Linear-heavy
  models). Named nodes can be left in FP32.
* :func:`qdq_steps`: where the QDQ file rounds (every quantized activation and int8 weight), read
  from what ORT writes: what quantization-aware retraining mirrors.
* :func:`layer_sensitivity`: each quantizable layer quantized on its own (reusing one
  calibration), scored by how far the model's output moves from FP32: the list to choose
  exclusions from.
* :func:`check_int8`: the INT8 gate, top-1 agreement with the FP32 model and accuracy drop.
* :func:`needs_reduced_range`: whether the CPU the model is for wants 7-bit weights. Without
  VNNI, x86 int8 kernels multiply uint8 by int8 with ``vpmaddubsw``, whose int16 pair sums
  saturate once per-channel weights use the full int8 range; ORT's advice there is
  ``reduce_range`` (the CPUs: :data:`structadmm.cpu.INT8_TARGETS`).
* :func:`int8_data` and :func:`quantize_run`: the pipeline's ``--quantize int8`` stage over a run
  folder, its gate scored on data the calibration never read.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader

from structadmm.cpu import reduced_range_for
from structadmm.errors import StructADMMError
from structadmm.errors import one_line
from structadmm.files import write_atomic
from structadmm.exporters.onnx_export import load_onnx

__all__ = ["CALIBRATION_METHODS", "GATE_SPLITS", "Int8Data", "Int8Gate", "LayerSensitivity", "QuantizeResult",
           "QuantizedRun", "QDQ_OPS", "QdqActivation", "QdqSteps", "QdqWeight", "calibration_batches", "check_int8",
           "holds_qdq", "int8_data",
           "layer_sensitivity", "needs_reduced_range", "qdq_steps", "quantize_onnx", "quantize_run",
           "slower_than_fp32"]

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
MODES = ("auto", "static", "dynamic")
# the matrix ops whose weights carry the model's size and time
_MATRIX_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: the ops of a QDQ model: a tensor rounded to int8 and back around the float op that reads it
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
# the integer matrix ops of ORT's other (QOperator and dynamic) quantized formats
_INTEGER_MATRIX_OPS = ("ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeMatMul")


@dataclass(frozen=True)
class QuantizeResult:
    """What :func:`quantize_onnx` wrote."""

    path: Path
    mode: str  # static | dynamic
    method: str | None  # the calibration method (static only)
    calibration_samples: int  # samples the calibration read (0 for dynamic)
    per_channel: bool
    reduce_range: bool  # weights in [-64, 64] (7 bits) rather than [-127, 127]
    reduce_range_reason: str  # why, in words (the target CPU, or the caller's choice)
    excluded: tuple[str, ...]
    quantized_nodes: int  # matrix nodes now fed by int8 weights
    bytes: int


def calibration_batches(data: Any, batches: int, batch_size: int = 32, seed: int = 0) -> list[np.ndarray]:
    """The first ``batches`` input batches of ``data``, as float32 arrays; nothing more is read.

    ``data``: a DataLoader (its own batches, in its order), a Dataset or ``(x, y)`` pair (batched
    by ``batch_size`` in a seeded shuffle, so a class-sorted set still calibrates on every class),
    an array or tensor of inputs, or an iterable of batches.
    """
    from torch.utils.data import DataLoader, Dataset

    from structadmm.batches import make_loader

    if batches < 1:
        raise StructADMMError(f"calibration needs at least 1 batch, got {batches}")
    if isinstance(data, (np.ndarray, torch.Tensor)):
        data = (torch.as_tensor(data),)
    if isinstance(data, (Dataset, tuple)):
        data = make_loader(data, batch_size, shuffle=True, seed=seed)
    if not isinstance(data, (DataLoader, Iterable)):
        raise StructADMMError(f"calibration data must be a Dataset, DataLoader, array or batches, not {type(data).__name__}")
    out: list[np.ndarray] = []
    for batch in data:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        out.append(np.ascontiguousarray(np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x,
                                                   dtype=np.float32)))
        if len(out) == batches:
            break
    if not out:
        raise StructADMMError("the calibration data is empty")
    return out


def quantize_onnx(
    model: str | Path,
    path: str | Path,
    calibration: Any = None,
    *,
    mode: str = "auto",
    method: str = "minmax",
    batches: int = 8,
    batch_size: int = 32,
    per_channel: bool = True,
    reduce_range: bool | None = None,
    exclude: Sequence[str] = (),
    nodes: Sequence[str] | None = None,
    preprocess: bool = True,
    seed: int = 0,
    calibration_cache: str | Path | None = None,
    target_cpu: str = "auto",
) -> QuantizeResult:
    """Quantize the FP32 ONNX file ``model`` to INT8 at ``path`` with ONNX Runtime.

    ``mode``: ``static`` (QDQ, activations calibrated on the first ``batches`` batches of
    ``calibration``, see :func:`calibration_batches`), ``dynamic`` (weights only; no calibration
    data) or ``auto`` (dynamic when Gemm/MatMul hold most of the MACs, else static).
    ``method``: minmax | entropy | percentile. ``reduce_range``: 7-bit weights; None picks
    what ``target_cpu`` (a key of :data:`structadmm.cpu.INT8_TARGETS`; ``auto``: this CPU) needs.
    ``exclude``: node names left in FP32 (names as in :func:`layer_sensitivity`); ``nodes``:
    quantize only these. ``calibration_cache``: a file that keeps the calibration for the next
    call on the same model (ONNX Runtime 1.27 and later; older ones calibrate again each time).
    ``path`` is written atomically.
    """
    model, path = Path(model), Path(path)
    if reduce_range is None:
        reduce_range, why = reduced_range_for(target_cpu)
    else:
        why = f"{'7-bit' if reduce_range else 'full-range'} weights asked for"
    if mode not in MODES:
        raise StructADMMError(f"quantization mode must be one of {', '.join(MODES)}, got {mode!r}")
    if method not in CALIBRATION_METHODS:
        raise StructADMMError(f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}")
    proto = load_onnx(model)
    with tempfile.TemporaryDirectory(prefix="structadmm-quant-") as tmp:
        source = _preprocessed(model, Path(tmp)) if preprocess else model
        graph = onnx.load(source).graph
        _check_node_names(graph, exclude, "exclude")
        _check_node_names(graph, nodes or (), "nodes")
        if mode == "auto":
            mode = "dynamic" if _matrix_share(proto) > 0.5 else "static"
        tmp_out = Path(tmp) / "quantized.onnx"
        samples = 0
        with _quiet():
            if mode == "static":
                samples = _quantize_static(graph, source, tmp_out, calibration, method, batches, batch_size,
                                           per_channel, reduce_range, exclude, nodes, seed, calibration_cache)
            else:
                _quantize_dynamic(source, Path(tmp), tmp_out, per_channel, reduce_range, exclude, nodes)
        quantized = load_onnx(tmp_out)
        count = _quantized_matrix_nodes(quantized)
        try:
            write_atomic(path, tmp_out.read_bytes())
        except OSError as exc:
            raise StructADMMError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return QuantizeResult(path, mode, method if mode == "static" else None, samples, per_channel, reduce_range,
                          why, tuple(exclude), count, path.stat().st_size)


@lru_cache(maxsize=None)
def needs_reduced_range(target_cpu: str = "auto") -> bool:
    """Whether int8 weights should use 7 bits on the CPU the model is for (``auto``: this one): x86
    without VNNI (AVX2, AVX-512 without VNNI), where ORT's uint8 x int8 kernels saturate int16 pair
    sums on full-range weights, and x86 whose flags cannot be read (see
    :func:`structadmm.cpu.reduced_range_for`).

    Measured here (AVX2): a 1-D CNN's first conv quantized per channel lost 3.3 pt of accuracy in
    ORT's int8 kernel and none when the same QDQ model ran in float; 7-bit weights lost none.
    """
    return reduced_range_for(target_cpu)[0]


# --- static and dynamic ---------------------------------------------------------------------


class _Reader(CalibrationDataReader):
    """ORT's calibration reader over a fixed list of input arrays: it yields those and nothing else."""

    def __init__(self, name: str, arrays: list[np.ndarray]):
        self.name, self.arrays, self.position = name, arrays, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.arrays):
            return None
        self.position += 1
        return {self.name: self.arrays[self.position - 1]}

    def rewind(self) -> None:
        self.position = 0

    def __len__(self) -> int:
        return len(self.arrays)


def _quantize_static(graph: onnx.GraphProto, source: Path, out: Path, calibration: Any, method: str, batches: int,
                     batch_size: int, per_channel: bool, reduce_range: bool, exclude: Sequence[str],
                     nodes: Sequence[str] | None,
                     seed: int, cache: str | Path | None) -> int:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    inputs = _graph_inputs(graph)
    if len(inputs) != 1:
        raise StructADMMError(f"static quantization calibrates single-input models; this one takes {len(inputs)} "
                              "inputs: use mode='dynamic'")
    reader = None
    samples = 0
    cached = cache is not None and Path(cache).is_file() and _has_calibration_cache()
    if calibration is not None and not cached:
        arrays = calibration_batches(calibration, batches, batch_size, seed)
        samples = sum(len(a) for a in arrays)
        reader = _Reader(inputs[0], arrays)
    elif calibration is None and not cached:
        raise StructADMMError("static quantization needs calibration data (batches of training inputs)")
    calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}[method]
    extra = {"CalibPercentile": 99.999} if method == "percentile" else {}
    keep = {"calibration_cache_path": str(cache)} if cache is not None and _has_calibration_cache() else {}
    try:
        quantize_static(
            str(source), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
            reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            nodes_to_exclude=list(exclude), nodes_to_quantize=list(nodes or []), calibrate_method=calibrate,
            extra_options=extra, **keep,
        )
    except (ValueError, RuntimeError) as exc:  # ORT's own words for data that does not fit the model
        raise StructADMMError(f"ONNX Runtime could not quantize {source.name}: {one_line(exc)}") from exc
    return samples


def _has_calibration_cache() -> bool:
    """Whether this ONNX Runtime's ``quantize_static`` keeps a calibration cache (1.27 and later)."""
    from onnxruntime.quantization import quantize_static

    return "calibration_cache_path" in inspect.signature(quantize_static).parameters


def _quantize_dynamic(source: Path, tmp: Path, out: Path, per_channel: bool, reduce_range: bool,
                      exclude: Sequence[str],
                      nodes: Sequence[str] | None) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # ORT's dynamic (integer-op) quantizer has no Gemm: a torch Linear exports as Gemm, so it is
    # rewritten as the MatMul + Add it computes first (same node names, so exclusions still match)
    proto = onnx.load(source)
    if _gemm_as_matmul(proto.graph):
        source = tmp / "matmul.onnx"
        onnx.save(proto, source)
    try:
        quantize_dynamic(str(source), str(out), per_channel=per_channel, reduce_range=reduce_range, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Attention", "LSTM", "Gather"],
                         nodes_to_exclude=list(exclude), nodes_to_quantize=list(nodes or []))
    except (ValueError, RuntimeError) as exc:
        raise StructADMMError(f"ONNX Runtime could not quantize {source.name}: {one_line(exc)}") from exc


def _gemm_as_matmul(graph: onnx.GraphProto) -> bool:
    """Rewrite every Gemm with a constant 2-D B (alpha = beta = 1, no transA) as MatMul (+ Add)."""
    from onnx import helper, numpy_helper

    inits = {init.name: init for init in graph.initializer}
    changed = False
    nodes = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            weight = weight.T
        name = f"{node.input[1]}_matmul"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), name))
        has_bias = len(node.input) > 2 and node.input[2]
        mid = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [mid], name=node.name))
        if has_bias:
            nodes.append(helper.make_node("Add", [mid, node.input[2]], [node.output[0]], name=f"{node.name}_bias"))
        changed = True
    if changed:
        del graph.node[:]
        graph.node.extend(nodes)
        used = {i for n in graph.node for i in n.input}
        keep = [init for init in graph.initializer if init.name in used]
        del graph.initializer[:]
        graph.initializer.extend(keep)
    return changed


def _preprocessed(model: Path, tmp: Path) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = tmp / "preprocessed.onnx"
    try:
        with _quiet():
            quant_pre_process(str(model), str(out))
    except Exception as exc:  # noqa: BLE001 - shape inference fails in many ways on odd graphs
        raise StructADMMError(f"{model}: ONNX Runtime's quantization pre-processing failed: {one_line(exc)}") from exc
    return out


# --- where the QDQ model rounds ----------------------------------------------------------------


@dataclass(frozen=True)
class QdqActivation:
    """An activation tensor that ORT's QDQ model quantizes (uint8, one scale per tensor)."""

    tensor: str  # its name in the FP32 model
    value: np.ndarray  # its FP32 value on the inputs given
    scale: float
    zero_point: int
    shared: str  # the name of its scale: tensors with the same one share one range (MaxPool, Flatten, ...)


@dataclass(frozen=True)
class QdqWeight:
    """A matrix node's weight that ORT's QDQ model stores in int8 (symmetric)."""

    node: str  # the Conv, ConvTranspose, Gemm or MatMul node
    value: np.ndarray  # its FP32 weight in torch's layout (Gemm/MatMul weights as [out, in], like nn.Linear)
    axis: int | None  # the axis of its per-channel scales in that layout (None: one scale for the tensor)


@dataclass(frozen=True)
class QdqSteps:
    """Where ORT's static QDQ quantization rounds one model (see :func:`qdq_steps`)."""

    activations: list[QdqActivation]
    weights: list[QdqWeight]
    other: list[str]  # other int8 initializers (LayerNorm scales, Gather tables, ...): names in the INT8 file


def qdq_steps(model: str | Path, inputs: Any, *, per_channel: bool = True, reduce_range: bool = False,
              exclude: Sequence[str] = ()) -> QdqSteps:
    """Where :func:`quantize_onnx` (static, with these settings) rounds the FP32 ONNX file ``model``,
    read from the QDQ file ONNX Runtime writes: every activation tensor it quantizes, with its FP32
    value on ``inputs`` (an array of model inputs, which also calibrate it: where ORT rounds does not
    depend on the data) and its scale, and every matrix weight it stores in int8.

    ORT quantizes nearly every activation of a QDQ model, not only the inputs of its Conv and Gemm
    nodes: their outputs too, after the Relu/Clip it folds into them, pooling and reshaping outputs
    (sharing their input's scale), residual additions, and the model's output itself.
    """
    from onnx import numpy_helper

    x = np.asarray(inputs.detach().cpu() if isinstance(inputs, torch.Tensor) else inputs, dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="structadmm-steps-") as tmp:
        tmp = Path(tmp)
        source = _preprocessed(Path(model), tmp)
        quantize_onnx(source, tmp / "int8.onnx", x, mode="static", batches=1, batch_size=len(x),
                      per_channel=per_channel, reduce_range=reduce_range, exclude=exclude, preprocess=False)
        fp32, int8 = onnx.load(source), load_onnx(tmp / "int8.onnx")
        inits = {i.name: numpy_helper.to_array(i) for i in int8.graph.initializer}
        fp32_inits = {i.name: numpy_helper.to_array(i) for i in fp32.graph.initializer}
        tensors = {o for n in fp32.graph.node for o in n.output} | set(_graph_inputs(fp32.graph))
        readers: dict[str, list[onnx.NodeProto]] = {}
        for node in int8.graph.node:
            for name in node.input:
                readers.setdefault(name, []).append(node)
        found: dict[str, tuple[float, int, str]] = {}
        for q in int8.graph.node:
            if q.op_type != "QuantizeLinear" or q.input[0] in inits:
                continue
            name = q.input[0]
            if name not in tensors:  # a graph output renamed for its Q: the DequantizeLinear after it gives it back
                name = next((dq.output[0] for dq in readers.get(q.output[0], []) if dq.op_type == "DequantizeLinear"),
                            name)
            if name in tensors:
                zero_point = int(inits[q.input[2]]) if len(q.input) > 2 and q.input[2] else 0
                found[name] = (float(inits[q.input[1]]), zero_point, q.input[1])
        values = _intermediate_values(fp32, source, list(found), x, tmp)
    activations = [QdqActivation(name, values[name], *found[name]) for name in found]
    produced_by = {o: n for n in int8.graph.node for o in n.output}
    fp32_nodes = {n.name: n for n in fp32.graph.node}
    weights, matrix_weights = [], set()
    for node in int8.graph.node:
        if node.op_type not in _MATRIX_OPS or len(node.input) < 2 or node.name not in fp32_nodes:
            continue
        dq = produced_by.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or inits.get(dq.input[0], np.zeros(0)).dtype != np.int8:
            continue
        original = fp32_nodes[node.name].input[1]
        if original not in fp32_inits:
            continue
        matrix_weights.add(dq.input[0])
        value = fp32_inits[original]
        channelwise = inits[dq.input[1]].ndim == 1
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) if channelwise else None
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMul" or (node.op_type == "Gemm" and not attrs.get("transB", 0)):
            value, axis = value.T, (None if axis is None else 1 - axis)  # [in, out] -> [out, in]
        weights.append(QdqWeight(node.name, np.ascontiguousarray(value), axis))
    other = [dq.input[0] for dq in int8.graph.node if dq.op_type == "DequantizeLinear" and dq.input[0] in inits
             and inits[dq.input[0]].dtype == np.int8 and dq.input[0] not in matrix_weights]
    return QdqSteps(activations, weights, other)


def _intermediate_values(proto: onnx.ModelProto, source: Path, names: list[str], x: np.ndarray,
                         tmp: Path) -> dict[str, np.ndarray]:
    """The FP32 values of the tensors ``names`` of the model ``proto`` (saved at ``source``) on ``x``."""
    import onnxruntime as ort

    known = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                              for name in names if name not in known)
    path = tmp / "probed.onnx"
    onnx.save(proto, path)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # every tensor kept as named
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    wanted = [o.name for o in session.get_outputs() if o.name in set(names)]
    return dict(zip(wanted, session.run(wanted, {session.get_inputs()[0].name: x})))


# --- per-layer sensitivity ----------------------------------------------------------------


@dataclass(frozen=True)
class LayerSensitivity:
    """One layer quantized alone: how far the model's output moves from FP32."""

    node: str
    op_type: str
    sqnr_db: float  # FP32 output power over the change INT8 makes to it, in dB (higher: less sensitive)
    agreement: float  # top-1 agreement with the FP32 model on the samples


def layer_sensitivity(model: str | Path, calibration: Any, samples: Any, *, method: str = "minmax",
                      batches: int = 8, batch_size: int = 32, per_channel: bool = True,
                      reduce_range: bool | None = None, seed: int = 0, threads: int = 2) -> list[LayerSensitivity]:
    """Quantize each Conv/Gemm/MatMul of ``model`` on its own (static, one shared calibration)
    and score the model's first output on ``samples`` (an array of inputs) against FP32.

    Sorted most sensitive first. Node names are those :func:`quantize_onnx` takes in ``exclude``.
    """
    model = Path(model)
    x = np.asarray(samples.detach().cpu() if isinstance(samples, torch.Tensor) else samples, dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="structadmm-sens-") as tmp:
        tmp = Path(tmp)
        source = _preprocessed(model, tmp)
        graph = onnx.load(source).graph
        reference = _run(source, x, threads)
        cache = tmp / "calibration.json"
        rows = []
        for node in graph.node:
            if node.op_type not in _MATRIX_OPS or not any(i in {t.name for t in graph.initializer} for i in node.input):
                continue
            out = tmp / f"one-{len(rows)}.onnx"
            quantize_onnx(source, out, calibration, mode="static", method=method, batches=batches,
                          batch_size=batch_size, per_channel=per_channel, reduce_range=reduce_range,
                          nodes=[node.name], preprocess=False,
                          seed=seed, calibration_cache=cache)
            got = _run(out, x, threads)
            rows.append(LayerSensitivity(node.name, node.op_type, _sqnr_db(reference, got),
                                         float((got.argmax(1) == reference.argmax(1)).mean())))
    return sorted(rows, key=lambda r: r.sqnr_db)


def _sqnr_db(reference: np.ndarray, got: np.ndarray) -> float:
    noise = float(np.linalg.norm((reference - got).astype(np.float64)))
    signal = float(np.linalg.norm(reference.astype(np.float64)))
    return math.inf if noise == 0 else 20 * math.log10(max(signal, 1e-30) / noise)


def _run(path: Path, x: np.ndarray, threads: int) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


# --- the INT8 gate ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Int8Gate:
    """Whether an INT8 model may ship in place of its FP32 model (see :func:`check_int8`)."""

    ok: bool
    agreement: float  # top-1 agreement with the FP32 model named by agreement_with, in [0, 1]
    accuracy_drop: float | None  # accuracy of the model named by accuracy_drop_from − INT8 accuracy (None without labels)
    min_agreement: float
    max_accuracy_drop: float
    agreement_with: str = "FP32"  # the FP32 model the INT8 model's predictions were compared with
    accuracy_drop_from: str = "FP32"  # the model whose accuracy the drop is measured from
    reasons: tuple[str, ...] = ()


def check_int8(fp32, int8, *, min_agreement: float, max_accuracy_drop: float, fp32_name: str = "FP32",
               baseline: tuple[str, Any] | None = None) -> Int8Gate:
    """The INT8 gate over two :class:`~structadmm.exporters.accuracy.OnnxOutputs` of the same data:
    fails when top-1 agreement < ``min_agreement`` or accuracy falls by > ``max_accuracy_drop``.

    ``fp32_name``: what ``fp32`` is, in the gate's words (its verdict names it). ``baseline``:
    ``(name, outputs)`` of the model the accuracy drop is measured from when it is not ``fp32``
    (a quantization-aware retrained model agrees with its own FP32 parent, and must not fall below
    the pruned FP32 model it replaces)."""
    from structadmm.exporters.fidelity import top1_agreement

    drop_from, reference = baseline if baseline is not None else (fp32_name, fp32)
    agreement = top1_agreement(fp32.logits, int8.logits)
    drop = None if reference.accuracy is None or int8.accuracy is None else reference.accuracy - int8.accuracy
    reasons = []
    if agreement < min_agreement:
        reasons.append(f"top-1 agreement with {fp32_name} {agreement:.2%} < {min_agreement:.2%}")
    if drop is not None and drop > max_accuracy_drop:
        reasons.append(f"accuracy drop from {drop_from} {drop * 100:.2f} pt > {max_accuracy_drop * 100:.2f} pt")
    return Int8Gate(not reasons, agreement, drop, min_agreement, max_accuracy_drop, fp32_name, drop_from,
                    tuple(reasons))


# --- the data the stage reads ---------------------------------------------------------------

#: What the gate scores on: the validation data, or a part of the training data held out from calibration
GATE_SPLITS = ("validation", "training holdout")


@dataclass(frozen=True)
class Int8Data:
    """The INT8 stage's data (:func:`int8_data`): calibration and quantization-aware retraining read
    ``calibration``; the gate, the ORT accuracies and the sensitivity probe read ``gate``, which
    calibration never sees."""

    calibration: Any  # a Dataset
    gate: Any  # a Dataset, DataLoader or (x, y) pair
    split: str  # one of GATE_SPLITS: what ``gate`` is
    holdout: float | None = None  # the fraction of the training data held out ("training holdout" only)


def int8_data(train: Any, val: Any, *, holdout: float, seed: int = 0) -> Int8Data:
    """Calibration data and gate data for :func:`quantize_run`.

    With validation data (``val``), the gate scores on it and calibration reads ``train``. Without,
    a seeded ``holdout`` fraction of ``train`` (at least one sample) is held out: the gate scores on
    it and calibration never reads it. The FP32 model was still trained on those samples, so their
    accuracies are training accuracies; the INT8-against-FP32 comparison is what stays honest.
    ``train``: a Dataset, DataLoader (its dataset is used) or ``(x, y)`` pair.
    """
    from torch.utils.data import DataLoader, Subset, TensorDataset

    source = train.dataset if isinstance(train, DataLoader) else train
    if isinstance(source, tuple):
        source = TensorDataset(*(torch.as_tensor(t) for t in source))
    if val is not None:
        return Int8Data(source, val, GATE_SPLITS[0])
    if not 0 < holdout < 1:
        raise StructADMMError(f"the INT8 holdout must be a fraction in (0, 1), got {holdout}")
    total = len(source)
    held = max(1, round(total * holdout))
    if total - held < 1:
        raise StructADMMError(f"no validation data, and {total} training sample(s) cannot be split into calibration "
                              "and a held-out part for the INT8 gate: give validation data")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()
    return Int8Data(Subset(source, sorted(order[held:])), Subset(source, sorted(order[:held])), GATE_SPLITS[1],
                    holdout)


# --- the pipeline stage -----------------------------------------------------------------------


VARIANTS = {"dense": "dense FP32", "pruned": "pruned FP32", "pruned_int8": "pruned INT8", "dense_int8": "dense INT8"}
#: the label of a pruned INT8 file that failed its gate (it is never timed nor reported as pruned INT8)
REJECTED_VARIANT = "rejected INT8"

PRUNED_INT8, DENSE_INT8, REJECTED = "pruned-int8.onnx", "dense-int8.onnx", "pruned-int8.rejected.onnx"
QAT_FP32 = "pruned-qat.onnx"  # the quantization-aware retrained model in FP32, the parent of its INT8 file


@dataclass
class QuantizedRun:
    """What :func:`quantize_run` produced in the run folder; :meth:`report` renders it."""

    pruned: QuantizeResult
    dense: QuantizeResult
    gate: Int8Gate
    accuracy: dict[str, float | None]  # ORT accuracy per variant (a rejected file's under REJECTED_VARIANT)
    gate_data: dict[str, Any]  # what the gate scored on: split (GATE_SPLITS), samples, holdout fraction
    sensitivity: list[LayerSensitivity] = field(default_factory=list)
    # when quantization-aware retraining replaced post-training quantization: what PTQ gave and the QAT epochs
    post_training: dict[str, Any] | None = None

    @property
    def shipped(self) -> bool:
        """Whether the pruned INT8 file passed its gate (a rejected one is kept only for inspection)."""
        return self.gate.ok

    @property
    def models(self) -> dict[str, Path]:
        """The INT8 variants to time alongside dense and pruned FP32: a rejected file is not one."""
        return {**({"pruned_int8": self.pruned.path} if self.shipped else {}), "dense_int8": self.dense.path}

    def report(self, run_dir: Path, latency, macs: int) -> dict[str, Any]:
        """report.json's ``quantized``, ``latency_variants`` and ``file_sizes``."""
        files = ["dense.onnx", "pruned.onnx", self.pruned.path.name, self.dense.path.name,
                 *([QAT_FP32] if self.post_training else [])]
        rows = []
        index = {(e.provider, e.batch, e.name): e for e in latency.entries}
        for provider, batch in dict.fromkeys((e.provider, e.batch) for e in latency.entries):
            base = index[(provider, batch, "dense")]
            for name, label in VARIANTS.items():
                entry = index.get((provider, batch, name))
                if entry is not None:
                    rows.append({"provider": provider, "batch": batch, "variant": label, "threads": entry.threads,
                                 "median_ms": entry.median_ms, "p90_ms": entry.p90_ms,
                                 "speedup": base.median_ms / entry.median_ms,
                                 # dense is the baseline: the entry's per-round figures are over dense FP32
                                 "speedup_per_round": entry.round_speedup, "speedup_low": entry.round_speedup_low,
                                 "speedup_high": entry.round_speedup_high, "ci_coverage": entry.ci_coverage,
                                 "mode": entry.mode})
        quantized = {
            "accuracy": self.accuracy[VARIANTS["pruned_int8"] if self.shipped else REJECTED_VARIANT],
            "shipped": self.shipped, "macs": macs, "onnx": self.pruned.path.name,
            "bytes": self.pruned.bytes, "mode": self.pruned.mode, "calibration_method": self.pruned.method,
            "calibration_samples": self.pruned.calibration_samples, "per_channel": self.pruned.per_channel,
            "excluded": list(self.pruned.excluded), "quantized_nodes": self.pruned.quantized_nodes,
            "gate": {**asdict(self.gate), "reasons": list(self.gate.reasons)},
            "gate_data": self.gate_data,
            "ort_accuracy": self.accuracy,
            "dense_int8": {"onnx": self.dense.path.name, "bytes": self.dense.bytes,
                           "accuracy": self.accuracy[VARIANTS["dense_int8"]]},
            "sensitivity": [asdict(s) for s in self.sensitivity],
            "reduce_range": self.pruned.reduce_range,
            "reduce_range_reason": self.pruned.reduce_range_reason,
            "qat": self.post_training,
            "slower_than_fp32": slower_than_fp32(rows),
        }
        return {"quantized": quantized, "latency_variants": rows,
                "file_sizes": {name: (run_dir / name).stat().st_size for name in files}}


def slower_than_fp32(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Where the pruned INT8 model ran slower than pruned FP32, from ``latency_variants`` rows:
    ``{provider, batch, time_ratio}`` (INT8 median / FP32 median, above 1). On small or narrow
    models the int8 kernels and the input's quantization can cost more than they save."""
    fp32 = {(r["provider"], r["batch"]): r["median_ms"] for r in rows if r["variant"] == VARIANTS["pruned"]}
    slower = []
    for r in rows:
        base = fp32.get((r["provider"], r["batch"]))
        if r["variant"] == VARIANTS["pruned_int8"] and base and r["median_ms"] > base:
            slower.append({"provider": r["provider"], "batch": r["batch"], "time_ratio": r["median_ms"] / base})
    return slower


def quantize_run(run_dir: str | Path, config, data: Int8Data,
                 retrain: Callable[[Path], None] | None = None) -> QuantizedRun:
    """The ``--quantize int8`` stage: quantize pruned.onnx and dense.onnx in ``run_dir`` with the
    same calibration (the first ``calibration_batches`` batches of ``data.calibration``), evaluate
    all four variants on ``data.gate`` with ONNX Runtime, gate pruned INT8 against pruned FP32, and
    score per-layer sensitivity. A pruned INT8 model that fails the gate is written as
    ``pruned-int8.rejected.onnx``, never as ``pruned-int8.onnx``, and is labelled
    :data:`REJECTED_VARIANT`, never pruned INT8 (:attr:`QuantizedRun.models` leaves it out).

    ``retrain(path)``: when post-training quantization fails the gate, called to write the FP32
    ONNX file of a quantization-aware retrained model at ``path`` (``pruned-qat.onnx``); that
    file is quantized in its place and gated the same way: agreement with its own FP32 parent,
    accuracy drop from pruned FP32 (the gate names both)."""
    from structadmm.exporters.accuracy import onnx_outputs

    run_dir = Path(run_dir)
    source = data.calibration
    common = dict(mode=config.quantize_mode, method=config.calibration_method, batches=config.calibration_batches,
                  batch_size=config.batch_size, per_channel=config.quantize_per_channel,
                  reduce_range=config.quantize_reduce_range, target_cpu=config.quantize_target_cpu, seed=config.seed)
    pruned = quantize_onnx(run_dir / "pruned.onnx", run_dir / PRUNED_INT8, source,
                           exclude=config.quantize_exclude, **common)
    # the dense reference: exclusions name pruned.onnx's nodes, which dense.onnx shares
    dense_graph = {n.name for n in load_onnx(run_dir / "dense.onnx").graph.node}
    dense = quantize_onnx(run_dir / "dense.onnx", run_dir / DENSE_INT8, source,
                          exclude=[n for n in config.quantize_exclude if n in dense_graph], **common)
    outputs = {label: onnx_outputs(run_dir / file, data.gate, threads=config.bench_threads)
               for label, file in (("dense FP32", "dense.onnx"), ("pruned FP32", "pruned.onnx"),
                                   ("pruned INT8", PRUNED_INT8), ("dense INT8", DENSE_INT8))}
    pruned_fp32 = "pruned FP32 (pruned.onnx)"
    gate = check_int8(outputs["pruned FP32"], outputs["pruned INT8"], min_agreement=config.int8_min_agreement,
                      max_accuracy_drop=config.int8_max_accuracy_drop, fp32_name=pruned_fp32)
    post_training = None
    if not gate.ok and retrain is not None and pruned.mode == "static":
        post_training = {"accuracy": outputs["pruned INT8"].accuracy, "gate": {**asdict(gate), "reasons": list(gate.reasons)},
                         "epochs": config.qat_epochs, "onnx": QAT_FP32}
        retrain(run_dir / QAT_FP32)
        pruned = quantize_onnx(run_dir / QAT_FP32, run_dir / PRUNED_INT8, source, exclude=config.quantize_exclude,
                               **common)
        outputs["pruned INT8"] = onnx_outputs(run_dir / PRUNED_INT8, data.gate, threads=config.bench_threads)
        parent = onnx_outputs(run_dir / QAT_FP32, data.gate, threads=config.bench_threads)
        post_training["fp32_accuracy"] = parent.accuracy
        gate = check_int8(parent, outputs["pruned INT8"], min_agreement=config.int8_min_agreement,
                          max_accuracy_drop=config.int8_max_accuracy_drop, fp32_name=f"QAT FP32 ({QAT_FP32})",
                          baseline=(pruned_fp32, outputs["pruned FP32"]))
    sensitivity = []
    if pruned.mode == "static":
        probe = calibration_batches(data.gate, 1, 256, config.seed)[0]
        sensitivity = layer_sensitivity(run_dir / "pruned.onnx", source, probe, method=config.calibration_method,
                                        batches=config.calibration_batches, batch_size=config.batch_size,
                                        per_channel=config.quantize_per_channel, reduce_range=pruned.reduce_range,
                                        seed=config.seed, threads=config.bench_threads)
    accuracy = {label: out.accuracy for label, out in outputs.items()}
    if not gate.ok:
        os.replace(pruned.path, run_dir / REJECTED)
        pruned = QuantizeResult(**{**asdict(pruned), "path": run_dir / REJECTED})
        accuracy[REJECTED_VARIANT] = accuracy.pop(VARIANTS["pruned_int8"])
    gate_data = {"split": data.split, "samples": len(outputs["pruned FP32"].logits), "holdout": data.holdout}
    return QuantizedRun(pruned, dense, gate, accuracy, gate_data, sensitivity, post_training)


# --- helpers ------------------------------------------------------------------------------


def _graph_inputs(graph: onnx.GraphProto) -> list[str]:
    initializers = {init.name for init in graph.initializer}
    return [v.name for v in graph.input if v.name not in initializers]


def _check_node_names(graph: onnx.GraphProto, names: Sequence[str], what: str) -> None:
    known = {n.name for n in graph.node}
    unknown = [n for n in names if n not in known]
    if unknown:
        matrix = [n.name for n in graph.node if n.op_type in _MATRIX_OPS][:6]
        raise StructADMMError(f"quantization {what}: no node named {unknown[0]!r} in the model; its Conv/Gemm/MatMul "
                              f"nodes are named like {', '.join(matrix) or '(none)'}")


def _matrix_share(proto: onnx.ModelProto) -> float:
    """Fraction of the model's MACs in Gemm/MatMul (the Linear layers)."""
    from structadmm.exporters.counting import count_onnx

    cost = count_onnx(proto)
    linear = sum(layer.macs for layer in cost.layers if layer.op_type in ("Gemm", "MatMul"))
    return linear / cost.macs if cost.macs else 0.0


def holds_qdq(model: onnx.ModelProto | str | Path) -> bool:
    """Whether an ONNX model (a ModelProto, or a file read without its external data) holds
    QuantizeLinear / DequantizeLinear nodes (:data:`QDQ_OPS`): a QDQ INT8 model, as
    :func:`quantize_onnx` writes in static mode. The one test of "is this file QDQ" that the
    benchmark (TensorRT's INT8 flags) and :func:`quantize_onnx`'s node count share."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    return any(node.op_type in QDQ_OPS for node in proto.graph.node)


def _quantized_matrix_nodes(proto: onnx.ModelProto) -> int:
    """Matrix nodes computing in int8: integer ops, or, in a QDQ model (:func:`holds_qdq`),
    matrix ops whose weight comes from a DequantizeLinear."""
    count = sum(node.op_type in _INTEGER_MATRIX_OPS for node in proto.graph.node)
    if not holds_qdq(proto):
        return count
    produced_by = {out: node for node in proto.graph.node for out in node.output}
    for node in proto.graph.node:
        if node.op_type in _MATRIX_OPS and len(node.input) > 1:
            weight = produced_by.get(node.input[1])
            count += weight is not None and weight.op_type == "DequantizeLinear"
    return count


@contextmanager
def _quiet() -> Iterator[None]:
    """ORT's quantizer logs advice at WARNING through the root logger; keep the console clean."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


"""MAC and parameter counts: read from an ONNX graph (:func:`count_onnx`), and the one
forward-side MAC counter for torch models (:func:`count_torch`).

Dense and pruned models are counted by :func:`count_onnx`, from the files that are
benchmarked, so the MAC ratio in the report compares like with like. Before a file exists
(the budget search), :func:`count_torch` counts the same MACs from one forward pass, with
:mod:`torch.utils.flop_counter`; the tests hold the two to the same figure on every zoo model
and on random graphs.

Definitions:

* ``macs`` — multiply-accumulates for ONE sample: dim 0 of every graph input (the batch) is set
  to 1 and onnx shape inference fills in the rest. Only the matrix ops are counted: Conv (any
  rank, grouped/depthwise), ConvTranspose, Gemm and MatMul (batched, broadcast); every other node
  counts 0. Bias additions are not multiplies and are not counted.
* ``params`` — elements of every floating-point constant (initializer or ``Constant`` node) that
  some node reads: the weights stored in the file. Integer constants (shapes, indices) are not
  parameters. Because exporters fold an eval-mode BatchNorm into the preceding conv, a torch
  Conv+BN pair counts as the conv's weight plus one bias per output channel, not as
  ``sum(p.numel())`` of the torch modules.

* ``activation_bytes`` / ``weight_bytes`` — the memory one node reads and writes, for the roofline:
  its non-constant inputs and outputs for ONE sample, and the constants it reads (once per run,
  whatever the batch). At batch B a node moves ``B * activation_bytes + weight_bytes``
  (:meth:`OnnxCost.bytes_at`). Every node is counted as if run alone, unfused (a Relu that ORT fuses
  into its Conv moves nothing of its own; reshapes, which ORT does in place, count 0), so the totals are an upper bound on the traffic; a node with
  a tensor of unknown shape counts 0. A constant made by a ``Constant`` node is counted as a weight of
  the node that reads it. The byte ratio at batch B is dense ``bytes_at(B)`` / pruned ``bytes_at(B)``;
  the benchmark reports speedup / min(MAC ratio, byte ratio) as the roofline efficiency
  (:meth:`structadmm.bench.LatencyReport.to_rows`).
Nodes inside subgraphs (If/Loop bodies) are not counted. :func:`count_torch` counts the same
operations as they reach torch's kernels (convolutions, matrix products, attention), per sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from typing import Any, Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from structadmm.errors import StructADMMError, one_line
from structadmm.layers import eval_mode
from structadmm.exporters.onnx_export import load_onnx
from structadmm.exporters.shape_folding import FOLD_ROUNDS, fold_shape_constants

__all__ = ["LayerCost", "OnnxCost", "TorchCost", "count_onnx", "count_torch"]

_FLOAT_TYPES = frozenset(
    {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
)

Shape = tuple[int, ...]


@dataclass(frozen=True)
class LayerCost:
    """Cost of one graph node (``name`` is ``op_type_index`` for unnamed nodes)."""

    name: str
    op_type: str
    macs: int
    params: int
    activation_bytes: int = 0  # per sample: non-constant inputs read + outputs written
    weight_bytes: int = 0  # constants read, once per run

    def bytes_at(self, batch: int) -> int:
        """Bytes this node moves in one run at ``batch``."""
        return batch * self.activation_bytes + self.weight_bytes


@dataclass(frozen=True)
class OnnxCost:
    """Whole-model cost; ``layers`` has one entry per node, in graph order, and its ``macs`` and
    ``params`` sum to the totals (a constant read by several nodes is credited to the first)."""

    macs: int
    params: int
    layers: list[LayerCost]

    def bytes_at(self, batch: int) -> int:
        """Bytes all nodes move in one run at ``batch`` (the roofline's memory side, unfused)."""
        return sum(layer.bytes_at(batch) for layer in self.layers)


def count_onnx(model_or_path: onnx.ModelProto | str | Path, *,
               input_shapes: Sequence[Sequence[int]] | None = None) -> OnnxCost:
    """Count per-sample MACs and parameters of an ONNX model (a file path or a ModelProto).

    ``input_shapes`` gives one sample's shape (no batch axis) per graph input, for a model whose
    inputs leave other axes than the batch dynamic (a detector's height and width, say)."""
    proto = (
        load_onnx(model_or_path) if isinstance(model_or_path, (str, Path)) else model_or_path
    )
    graph = _infer_with_batch_one(proto, input_shapes).graph
    constants = _float_constant_sizes(graph)
    shapes = _static_shapes(graph)
    itemsizes = _itemsizes(graph)
    credited: set[str] = set()
    layers = []
    for index, node in enumerate(graph.node):
        owned = [n for n in dict.fromkeys(node.input) if n in constants and n not in credited]
        credited.update(owned)
        layers.append(
            LayerCost(
                name=node.name or f"{node.op_type}_{index}",
                op_type=node.op_type,
                macs=_node_macs(node, shapes),
                params=sum(constants[n] for n in owned),
                **_node_bytes(node, shapes, itemsizes, constants),
            )
        )
    return OnnxCost(
        macs=sum(layer.macs for layer in layers),
        params=sum(layer.params for layer in layers),
        layers=layers,
    )


@dataclass(frozen=True)
class TorchCost:
    """Per-sample MACs of one forward pass of a torch model.

    ``layers``: the MACs done inside each leaf module (by name), for the modules that do any;
    ``macs - sum(layers.values())`` is what the model's own ``forward`` code does outside them
    (a functional matmul, attention).
    """

    macs: int
    layers: dict[str, int]


def count_torch(model: nn.Module, example_inputs: Any) -> TorchCost:
    """Count the per-sample MACs of ``model`` on ``example_inputs`` (a tensor or a tuple; dim 0 is
    the batch) with one eval-mode forward pass; the model's train/eval mode is restored.

    ``layers`` holds each module's own MACs, those of its children excluded (an attention
    module's products around its projection layers). The pass runs with autograd on, as training
    does, so that fused inference kernels without a MAC formula (``nn.MultiheadAttention``'s fast
    path) are not taken; no gradient is computed."""
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    batch = inputs[0].shape[0]
    counter = FlopCounterMode(display=False, custom_mapping=_ATTENTION_FLOPS)
    with eval_mode(model), torch.enable_grad(), counter:
        model(*inputs)
    counts = counter.get_flop_counts()
    prefix = type(model).__name__

    def total(name: str) -> int:
        return sum(counts.get(f"{prefix}.{name}" if name else prefix, {}).values())

    layers = {}
    for name, module in model.named_modules():
        own = total(name) - sum(total(f"{name}.{child}" if name else child) for child, _ in module.named_children())
        if name and own > 0:
            layers[name] = _per_sample(own, batch)
    return TorchCost(_per_sample(counter.get_total_flops(), batch), layers)


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Scaled dot-product attention: the two matrix products, Q K^T and the scores times V."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


#: attention kernels torch's flop counter has no formula for: the CPU flash kernel, which
#: ``F.scaled_dot_product_attention`` (and so ``nn.MultiheadAttention``) runs on CPU even with
#: autograd on. Without it an attention block counts only its projections.
_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops}


def _per_sample(flops: int, batch: int) -> int:
    return int(flops) // 2 // batch  # the flop counter counts a multiply-accumulate as two


# --- shapes -------------------------------------------------------------------------------


def _infer_with_batch_one(proto: onnx.ModelProto,
                          input_shapes: Sequence[Sequence[int]] | None = None) -> onnx.ModelProto:
    """A copy with batch = 1 everywhere (and the inputs' other axes ``input_shapes``, where given) and
    freshly inferred shapes (the caller's is untouched)."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    batch_symbols = set()
    inputs = [value for value in graph.input if value.name not in initializers]
    if input_shapes is not None and len(input_shapes) != len(inputs):
        raise StructADMMError(f"the ONNX model takes {len(inputs)} inputs; {len(input_shapes)} input shapes were given")
    for i, value in enumerate(inputs):
        dims = value.type.tensor_type.shape.dim
        if not dims:
            continue
        if dims[0].dim_param:
            batch_symbols.add(dims[0].dim_param)
        dims[0].dim_value = 1
        if input_shapes is not None:
            if len(input_shapes[i]) != len(dims) - 1:
                raise StructADMMError(f"input {value.name!r} has {len(dims)} axes; the input shape "
                                      f"{'x'.join(map(str, input_shapes[i]))} gives {len(input_shapes[i]) + 1} with the batch")
            for dim, size in zip(list(dims)[1:], input_shapes[i]):
                dim.dim_value = int(size)
    # Declared output shapes still carry the batch symbol; stale value_info would conflict too.
    for value in graph.output:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in batch_symbols:
                dim.dim_value = 1
    del graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        for _ in range(FOLD_ROUNDS):  # a Reshape to a shape computed from Shape (Paddle2ONNX, tf2onnx)
            if not _open_shapes(inferred):
                break
            folded = fold_shape_constants(inferred)
            if folded is None:
                break
            inferred = onnx.shape_inference.infer_shapes(folded, strict_mode=False, data_prop=True)
        return inferred
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        raise StructADMMError(
            f"cannot infer the shapes of the ONNX model: {one_line(exc)}"
        ) from exc


def _open_shapes(model: onnx.ModelProto) -> bool:
    """Whether a node of the main graph makes a tensor whose shape inference left open."""
    known = {v.name for v in (*model.graph.value_info, *model.graph.output)
             if v.type.tensor_type.HasField("shape")
             and all(d.HasField("dim_value") for d in v.type.tensor_type.shape.dim)}
    return any(name and name not in known for node in model.graph.node for name in node.output)


def _static_shapes(graph: onnx.GraphProto) -> dict[str, Shape]:
    shapes: dict[str, Shape] = {init.name: tuple(init.dims) for init in graph.initializer}
    for node in graph.node:
        tensor = _constant_tensor(node)
        if tensor is not None:
            shapes[node.output[0]] = tuple(tensor.dims)
    for value in [*graph.input, *graph.value_info, *graph.output]:
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        dims = tensor_type.shape.dim
        if all(dim.HasField("dim_value") for dim in dims):
            shapes[value.name] = tuple(dim.dim_value for dim in dims)
    return shapes


def _shape(shapes: dict[str, Shape], node: onnx.NodeProto, tensor: str) -> Shape:
    if tensor in shapes:
        return shapes[tensor]
    raise StructADMMError(
        f"cannot count the MACs of {node.op_type} node {node.name or '(unnamed)'}: the shape of "
        f"{tensor!r} is unknown (only the batch axis of the inputs may be dynamic)"
    )


_VIEW_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})  # ORT reuses the buffer


def _itemsizes(graph: onnx.GraphProto) -> dict[str, int]:
    types = {init.name: init.data_type for init in graph.initializer}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        types.setdefault(value.name, value.type.tensor_type.elem_type)
    for node in graph.node:
        tensor = _constant_tensor(node)
        if tensor is not None:
            types[node.output[0]] = tensor.data_type
    sizes = {}
    for name, kind in types.items():
        try:
            sizes[name] = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(kind)).itemsize
        except (KeyError, TypeError, ValueError):
            continue
    return sizes


def _node_bytes(node: onnx.NodeProto, shapes: dict[str, Shape], itemsizes: dict[str, int],
                constants: dict[str, int]) -> dict[str, int]:
    tensors = [name for name in (*node.input, *node.output) if name]
    if node.op_type in _VIEW_OPS or any(name not in shapes or name not in itemsizes for name in tensors):
        return {"activation_bytes": 0, "weight_bytes": 0}
    size = {name: math.prod(shapes[name]) * itemsizes[name] for name in tensors}
    weights = sum(size[name] for name in dict.fromkeys(node.input) if name in constants)
    activations = sum(size[name] for name in dict.fromkeys(tensors) if name not in constants)
    return {"activation_bytes": activations, "weight_bytes": weights}


# --- parameters ---------------------------------------------------------------------------


def _float_constant_sizes(graph: onnx.GraphProto) -> dict[str, int]:
    sizes = {
        init.name: math.prod(init.dims)
        for init in graph.initializer
        if init.data_type in _FLOAT_TYPES
    }
    for node in graph.node:
        if node.op_type != "Constant":
            continue
        tensor = _constant_tensor(node)
        if tensor is not None and tensor.data_type in _FLOAT_TYPES:
            sizes[node.output[0]] = math.prod(tensor.dims)
        for attr in node.attribute:
            if attr.name == "value_float":
                sizes[node.output[0]] = 1
            elif attr.name == "value_floats":
                sizes[node.output[0]] = len(attr.floats)
    return sizes


def _constant_tensor(node: onnx.NodeProto) -> TensorProto | None:
    if node.op_type != "Constant":
        return None
    return next((attr.t for attr in node.attribute if attr.name == "value"), None)


# --- MACs ---------------------------------------------------------------------------------


def _node_macs(node: onnx.NodeProto, shapes: dict[str, Shape]) -> int:
    counter = _MAC_COUNTERS.get(node.op_type)
    return counter(node, shapes) if counter is not None and node.domain in ("", "ai.onnx") else 0


def _conv_macs(node: onnx.NodeProto, shapes: dict[str, Shape]) -> int:
    # Weight [M, C/groups, *k]: each output element reads C/groups · prod(k) weights.
    output = _shape(shapes, node, node.output[0])
    weight = _shape(shapes, node, node.input[1])
    return math.prod(output) * math.prod(weight[1:])


def _conv_transpose_macs(node: onnx.NodeProto, shapes: dict[str, Shape]) -> int:
    # Weight [C, M/groups, *k]: each input element is scattered through M/groups · prod(k) weights.
    data = _shape(shapes, node, node.input[0])
    weight = _shape(shapes, node, node.input[1])
    return math.prod(data) * math.prod(weight[1:])


def _gemm_macs(node: onnx.NodeProto, shapes: dict[str, Shape]) -> int:
    a = _shape(shapes, node, node.input[0])
    b = _shape(shapes, node, node.input[1])
    attrs = {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}
    m, k = (a[1], a[0]) if attrs.get("transA", 0) else (a[0], a[1])
    n = b[0] if attrs.get("transB", 0) else b[1]
    return m * k * n


def _matmul_macs(node: onnx.NodeProto, shapes: dict[str, Shape]) -> int:
    a = _shape(shapes, node, node.input[0])
    b = _shape(shapes, node, node.input[1])
    # numpy.matmul semantics: a 1-D operand is a row (left) or column (right) vector.
    a = (1, *a) if len(a) == 1 else a
    b = (*b, 1) if len(b) == 1 else b
    batch = np.broadcast_shapes(a[:-2], b[:-2])
    return math.prod(batch) * a[-2] * a[-1] * b[-1]


_MAC_COUNTERS = {
    "Conv": _conv_macs,
    "ConvTranspose": _conv_transpose_macs,
    "Gemm": _gemm_macs,
    "MatMul": _matmul_macs,
}

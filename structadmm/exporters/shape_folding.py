"""Folding the small constants that compute a graph's shapes, so that ONNX shape inference can size what
follows them: ``Shape`` of a tensor of known shape, and the ``Cast``, ``Slice``, ``Concat``, arithmetic ...
on it that exporters (Paddle2ONNX, tf2onnx, torch's legacy exporter) write to compute a Reshape's
target. The MAC counter (:mod:`.counting`) and the ONNX input checks (:mod:`structadmm.models.onnx_guard`)
both infer shapes this way. Sizes are bounded before anything is computed; the reference implementation
(``onnx.reference``) computes the folded values, on at most :data:`SHAPE_DATA` elements each.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

#: Constants with at most this many elements are folded (and kept as values for shape inference).
SHAPE_DATA = 1024
_STANDARD_DOMAINS = ("", "ai.onnx")

#: Ops folded when all their inputs are small constants (or, for Shape and Size, have a known shape):
#: those that compute shapes, axes and pads. The reference implementation computes them.
FOLDABLE = frozenset({
    "Shape", "Size", "Identity", "Cast", "Neg", "Abs", "Floor", "Ceil", "Not", "Squeeze", "Unsqueeze", "Reshape",
    "Flatten", "Gather", "Slice", "Concat", "Add", "Sub", "Mul", "Div", "Mod", "Equal", "Less", "Greater",
    "LessOrEqual", "GreaterOrEqual", "And", "Or", "Max", "Min", "Where", "ReduceProd", "ReduceSum", "ReduceMax",
    "ReduceMin", "ConstantOfShape", "Range", "Expand", "Tile", "Constant",
})
FOLD_ROUNDS = 8


def fold_shape_constants(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """``model`` (inferred) with every main-graph node in :data:`FOLDABLE` whose inputs are known and
    whose output has at most :data:`SHAPE_DATA` elements replaced by initializers holding its outputs;
    None when there is none. Sizes are bounded before anything is computed (:func:`_folded_size`)."""
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    known = {t.name: numpy_helper.to_array(t) for t in graph.initializer if math.prod(t.dims) <= SHAPE_DATA}
    types = {v.name: v.type for v in (*graph.value_info, *graph.input, *graph.output)}
    opset = next((o.version for o in model.opset_import if o.domain in _STANDARD_DOMAINS), None)
    folded = []
    for node in graph.node:
        if node.op_type not in FOLDABLE or node.domain not in _STANDARD_DOMAINS or not node.output:
            continue
        shape_of = node.op_type in ("Shape", "Size")
        names = [n for n in node.input if n]
        if shape_of:
            dims = known_dims(types.get(node.input[0]))
            if dims is None and node.input[0] in known:  # a value folded before: its shape is its array's
                dims = list(known[node.input[0]].shape)
            if dims is None:
                continue
            feeds = {node.input[0]: np.zeros(dims, np.uint8)} if math.prod(dims) <= SHAPE_DATA else None
            if feeds is None:  # Shape and Size need only the shape: a stand-in of that shape, strided to nothing
                feeds = {node.input[0]: np.lib.stride_tricks.as_strided(np.zeros(1, np.uint8), dims, [0] * len(dims))}
        elif all(n in known for n in names):
            feeds = {n: known[n] for n in names}
            if _folded_size(node, feeds) > SHAPE_DATA:
                continue
        else:
            continue
        graph_inputs = [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
                        for n, a in feeds.items()]
        single = onnx.helper.make_model(
            onnx.helper.make_graph([node], "fold", graph_inputs, [onnx.ValueInfoProto(name=n) for n in node.output]),
            opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=model.ir_version)
        try:
            results = ReferenceEvaluator(single).run(None, feeds)
        except Exception:  # noqa: BLE001 - not foldable: inference and the size check say what is wrong
            continue
        if any(np.asarray(r).size > SHAPE_DATA for r in results):
            continue
        known.update({n: np.asarray(r) for n, r in zip(node.output, results)})
        folded.append(node)
    if not folded:
        return None
    out = onnx.ModelProto()
    out.CopyFrom(model)
    drop = {id(n) for n in folded}
    kept = [n for n in graph.node if id(n) not in drop]
    del out.graph.node[:]
    out.graph.node.extend(kept)
    outputs = {v.name for v in out.graph.output}
    made = [n for node in folded for n in node.output if n and n not in outputs]
    out.graph.initializer.extend(numpy_helper.from_array(known[n], n) for n in made)
    stale = set(made)  # what inference said of them before they were known: their arrays say it now
    kept_info = [v for v in out.graph.value_info if v.name not in stale]
    del out.graph.value_info[:]
    out.graph.value_info.extend(kept_info)
    return out


def known_dims(value_type: onnx.TypeProto | None) -> list[int] | None:
    if value_type is None or value_type.WhichOneof("value") != "tensor_type" or not value_type.tensor_type.HasField("shape"):
        return None
    dims = value_type.tensor_type.shape.dim
    return [d.dim_value for d in dims] if all(d.HasField("dim_value") for d in dims) else None


def _folded_size(node: onnx.NodeProto, feeds: dict[str, np.ndarray]) -> int:
    """An upper bound on the elements ``node`` makes from the constant ``feeds`` (before it computes)."""
    args = [feeds.get(n) for n in node.input]
    op = node.op_type
    try:
        if op == "ConstantOfShape":
            return int(np.prod(args[0].astype(np.float64))) if args[0].size else 1
        if op == "Range":
            start, limit, delta = (float(a) for a in args)
            return max(0, math.ceil((limit - start) / delta)) if delta else SHAPE_DATA + 1
        if op == "Expand":
            return math.prod(np.broadcast_shapes(args[0].shape, tuple(int(d) for d in args[1])))
        if op == "Tile":
            return args[0].size * int(np.prod(args[1].astype(np.float64)))
        if op == "Concat":
            return sum(a.size for a in args if a is not None)
        if op == "Gather":
            return args[0].size * max(args[1].size, 1)
        if op == "Constant":
            return 0
        present = [a for a in args if a is not None]
        return math.prod(np.broadcast_shapes(*(a.shape for a in present))) if present else 0
    except (ValueError, TypeError, OverflowError, IndexError):
        return SHAPE_DATA + 1

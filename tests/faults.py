"""Deliberately broken artefacts, for the tests of the gates that must catch them."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import numpy_helper


def break_int8(path: Path) -> None:
    """A deliberately broken INT8 model: every Conv weight's scales negated (weights sign-flipped)."""
    proto = onnx.load(path)
    produced_by = {o: n for n in proto.graph.node for o in n.output}
    weights = [produced_by.get(n.input[1]) for n in proto.graph.node if n.op_type == "Conv"]
    scales = {dq.input[1] for dq in weights if dq is not None and dq.op_type == "DequantizeLinear"}
    for init in proto.graph.initializer:
        if init.name in scales:
            init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), init.name))
    onnx.save(proto, path)

"""ONNX export with parity verification, safe loading, and MAC/parameter counting."""

from structadmm.exporters.counting import LayerCost, OnnxCost, count_onnx
from structadmm.exporters.onnx_export import (
    ExportResult,
    OnnxSignature,
    TensorSpec,
    export_onnx,
    load_onnx,
    onnx_signature,
    verify_onnx,
)
from structadmm.exporters.sparse import SparseStorage, sparse_storage

__all__ = [
    "ExportResult",
    "LayerCost",
    "OnnxCost",
    "OnnxSignature",
    "SparseStorage",
    "TensorSpec",
    "count_onnx",
    "export_onnx",
    "load_onnx",
    "onnx_signature",
    "sparse_storage",
    "verify_onnx",
]

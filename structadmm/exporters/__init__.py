"""ONNX export with parity verification, safe loading, and MAC/parameter counting."""

from structadmm.exporters.counting import LayerCost, OnnxCost, count_onnx
from structadmm.exporters.onnx_export import ExportResult, export_onnx, load_onnx, verify_onnx
from structadmm.exporters.sparse import SparseStorage, sparse_storage

__all__ = [
    "ExportResult",
    "LayerCost",
    "OnnxCost",
    "SparseStorage",
    "count_onnx",
    "export_onnx",
    "load_onnx",
    "sparse_storage",
    "verify_onnx",
]

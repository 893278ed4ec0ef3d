"""ONNX export with parity verification, safe loading, and MAC/parameter counting."""

from structadmm.exporters.counting import LayerCost, OnnxCost, TorchCost, count_onnx, count_torch
from structadmm.exporters.onnx_export import ExportResult, export_onnx, load_onnx, verify_onnx
from structadmm.exporters.sparse import SparseStorage, sparse_storage

__all__ = [
    "ExportResult",
    "LayerCost",
    "OnnxCost",
    "SparseStorage",
    "TorchCost",
    "count_onnx",
    "count_torch",
    "export_onnx",
    "load_onnx",
    "sparse_storage",
    "verify_onnx",
]

"""ONNX export with parity verification, safe loading, MAC/parameter counting and INT8 quantization."""

from structadmm.exporters.counting import LayerCost, OnnxCost, count_onnx
from structadmm.exporters.onnx_export import ExportResult, export_onnx, load_onnx, verify_onnx
from structadmm.exporters.quantize import QuantizeResult, quantize_onnx
from structadmm.exporters.sparse import SparseStorage, sparse_storage

__all__ = [
    "ExportResult",
    "LayerCost",
    "OnnxCost",
    "QuantizeResult",
    "SparseStorage",
    "count_onnx",
    "export_onnx",
    "load_onnx",
    "quantize_onnx",
    "sparse_storage",
    "verify_onnx",
]

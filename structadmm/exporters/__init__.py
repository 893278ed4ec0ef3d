"""ONNX export with parity verification, safe loading, and MAC/parameter counting."""

from structadmm.exporters.counting import LayerCost, OnnxCost, count_onnx
from structadmm.exporters.onnx_export import ExportResult, export_onnx, load_onnx, verify_onnx

__all__ = [
    "ExportResult",
    "LayerCost",
    "OnnxCost",
    "count_onnx",
    "export_onnx",
    "load_onnx",
    "verify_onnx",
]

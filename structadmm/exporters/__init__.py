"""ONNX export with parity verification, safe loading, MAC/parameter counting and INT8 quantization."""

from structadmm.exporters.counting import LayerCost, OnnxCost, TorchCost, count_onnx, count_torch
from structadmm.exporters.onnx_export import (
    ExportResult,
    OnnxSignature,
    TensorSpec,
    export_onnx,
    load_onnx,
    onnx_signature,
    verify_onnx,
)
from structadmm.exporters.quantize import QuantizeResult, quantize_onnx
from structadmm.exporters.sparse import SparseStorage, sparse_storage

__all__ = [
    "ExportResult",
    "LayerCost",
    "OnnxCost",
    "OnnxSignature",
    "QuantizeResult",
    "SparseStorage",
    "TensorSpec",
    "TorchCost",
    "count_onnx",
    "count_torch",
    "export_onnx",
    "load_onnx",
    "onnx_signature",
    "quantize_onnx",
    "sparse_storage",
    "verify_onnx",
]

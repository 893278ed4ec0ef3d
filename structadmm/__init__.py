"""structadmm: structured weight pruning with ADMM, structural surgery, ONNX export and benchmarking.

    import structadmm as sa
    sa.export_onnx(model, example_inputs, "dense.onnx")
    plan = sa.PruningPlan.uniform(model, example_inputs, sparsity="filter", ratio=0.5)
    admm = sa.ADMM(model, plan)
    ...                                   # loss = task_loss + admm.penalty(); admm.update()
    masks = admm.hard_prune()
    guard = sa.apply_masks(model, masks)  # retrain with pruned weights held at zero
    small = sa.compact(model, example_inputs)
    sa.export_onnx(small, example_inputs, "pruned.onnx")
    sa.quantize_onnx("pruned.onnx", "pruned-int8.onnx", train_dataset)   # ONNX Runtime static INT8
    qat = sa.qat_retrain(small, train_dataset, epochs=2)   # when INT8 loses too much: retrain through
                                                           # fake quantization, export, quantize again
    report = sa.benchmark({"dense": "dense.onnx", "pruned": "pruned.onnx"})
"""

from .version import __version__

import importlib.util as _importlib_util

if _importlib_util.find_spec("onnxruntime") is None:  # the build is chosen by an extra, never by the core
    raise ImportError("structadmm needs ONNX Runtime: pip install 'structadmm[cpu]' (or 'structadmm[gpu]' for CUDA)")

from .bench import LatencyReport, benchmark, write_report
from .errors import ParityError, StructADMMError, StructADMMWarning
from .exporters import count_onnx, export_onnx, load_onnx, onnx_signature, quantize_onnx, verify_onnx
from .graph import trace
from .models.onnx_input import load_onnx_model
from .pipeline import CompressConfig, CompressResult, compress, qat_retrain
from .prune import ADMM, MaskGuard, PruningPlan, Sparsity, apply_masks, compact, reconstruct

__all__ = [
    "ADMM", "CompressConfig", "CompressResult", "LatencyReport", "MaskGuard", "ParityError", "PruningPlan",
    "Sparsity", "StructADMMError", "StructADMMWarning", "apply_masks", "benchmark", "compact", "compress",
    "count_onnx", "export_onnx", "load_onnx", "load_onnx_model", "onnx_signature", "qat_retrain", "quantize_onnx",
    "reconstruct", "trace",
    "verify_onnx", "write_report",
]

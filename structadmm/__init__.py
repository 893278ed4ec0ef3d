"""structadmm: structured weight pruning with ADMM, structural surgery, ONNX export and benchmarking.

    import structadmm as sa
    plan = sa.PruningPlan.uniform(model, example_inputs, sparsity="filter", ratio=0.5)
    admm = sa.ADMM(model, plan)
    ...                                   # loss = task_loss + admm.penalty(); admm.update()
    masks = admm.hard_prune()
    sa.apply_masks(model, masks)          # retrain with pruned weights held at zero
    small = sa.compact(model, example_inputs)
    sa.export_onnx(small, example_inputs, "pruned.onnx")
    report = sa.benchmark({"dense": "dense.onnx", "pruned": "pruned.onnx"})
"""

__version__ = "0.1.0"

from .bench import LatencyReport, benchmark, write_report
from .errors import ParityError, StructADMMError
from .exporters import count_onnx, export_onnx, load_onnx, onnx_signature, verify_onnx
from .models.onnx_input import load_onnx_model
from .pipeline import (
    ADMM,
    CompressConfig,
    CompressResult,
    MaskGuard,
    PruningPlan,
    Sparsity,
    apply_masks,
    compact,
    compress,
    trace,
)

__all__ = [
    "ADMM", "CompressConfig", "CompressResult", "LatencyReport", "MaskGuard", "ParityError", "PruningPlan",
    "Sparsity", "StructADMMError", "apply_masks", "benchmark", "compact", "compress", "count_onnx",
    "export_onnx", "load_onnx", "load_onnx_model", "onnx_signature", "trace", "verify_onnx", "write_report",
]

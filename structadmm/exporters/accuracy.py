"""Accuracy measured where the model runs: an ONNX file evaluated with ONNX Runtime.

The torch accuracy of a model says nothing about its INT8 file, whose arithmetic only ONNX
Runtime knows. This module owns running an ONNX file over held-out data and the figures
taken from its outputs: top-1 accuracy (two models' agreement is
:func:`structadmm.exporters.fidelity.top1_agreement` of their logits).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from structadmm.errors import StructADMMError
from structadmm.errors import one_line
from structadmm.exporters.onnx_export import load_onnx

__all__ = ["OnnxOutputs", "onnx_outputs"]


@dataclass(frozen=True)
class OnnxOutputs:
    """The first output of an ONNX model over a data set, with the labels when the data has them."""

    logits: np.ndarray  # samples x classes
    labels: np.ndarray | None

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(axis=1)

    @property
    def accuracy(self) -> float | None:
        """Top-1 accuracy in [0, 1]; None when the data has no labels."""
        if self.labels is None or not len(self.labels):
            return None
        return float((self.predictions == self.labels).mean())


def onnx_outputs(path: str | Path, data, *, batch_size: int = 256, threads: int = 2) -> OnnxOutputs:
    """Run the ONNX file at ``path`` on CPU over ``data`` (a Dataset, DataLoader or ``(x, y)``
    pair; batches are ``x`` or ``(x, y, ...)``) and collect its first output."""
    import onnxruntime as ort

    from structadmm.batches import make_loader

    path = Path(path)
    load_onnx(path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types for bad files
        raise StructADMMError(f"{path}: ONNX Runtime cannot load it: {one_line(exc)}") from exc
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise StructADMMError(f"{path}: takes {len(inputs)} inputs; accuracy is measured for single-input models")
    logits, labels = [], []
    for batch in make_loader(data, batch_size, shuffle=False):
        x, y = (batch[0], batch[1] if len(batch) > 1 else None) if isinstance(batch, (tuple, list)) else (batch, None)
        out = session.run(None, {inputs[0].name: np.asarray(x, dtype=np.float32)})[0]
        if out.ndim != 2:
            raise StructADMMError(f"{path}: output has shape {list(out.shape)}; accuracy needs samples x classes")
        logits.append(out)
        if y is not None:
            labels.append(np.asarray(y))
    if not logits:
        raise StructADMMError("no data to evaluate the ONNX model on")
    return OnnxOutputs(np.concatenate(logits), np.concatenate(labels) if len(labels) == len(logits) else None)

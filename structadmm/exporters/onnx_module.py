"""An ONNX file run by ONNX Runtime, called like a torch module.

Distillation from a user's ONNX file uses the file itself as the teacher, in the runtime it was
written for, rather than trusting its conversion to torch; the report's fidelity figures run the
dense and pruned files the same way. The module has no parameters and no gradient: it is only
ever a frozen reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from structadmm.errors import StructADMMError, one_line
from structadmm.exporters.onnx_export import load_onnx

__all__ = ["OnnxModule"]

_NUMPY_OF_ORT = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
                 "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
                 "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}


class OnnxModule(nn.Module):
    """``OnnxModule(path)(*inputs)`` runs the ONNX file on CPU and returns its outputs as torch
    tensors on the first input's device: one tensor, or a tuple in the file's output order.

    Inputs are fed by position and cast to the dtypes the file declares. A file whose batch axis
    is fixed (``batch`` in the file: 1 for many exported detectors) is run in chunks of that
    size, the last one padded with copies of its last sample and trimmed after.
    """

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        self.path = Path(path)
        load_onnx(self.path)  # checked and readable before ORT sees it
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types for bad files
            raise StructADMMError(f"{self.path}: ONNX Runtime cannot load it: {one_line(exc)}") from exc
        self._inputs = self._session.get_inputs()
        first = self._inputs[0].shape[0] if self._inputs and self._inputs[0].shape else None
        self.batch = first if isinstance(first, int) and first > 0 else None

    @property
    def output_names(self) -> list[str]:
        """The file's output names, in the order :meth:`forward` returns them."""
        return [o.name for o in self._session.get_outputs()]

    def forward(self, *inputs: torch.Tensor) -> Any:
        if len(inputs) != len(self._inputs):
            raise StructADMMError(f"{self.path.name} takes {len(self._inputs)} inputs, {len(inputs)} were given")
        arrays = [np.ascontiguousarray(t.detach().cpu().numpy(), dtype=_NUMPY_OF_ORT.get(spec.type))
                  for t, spec in zip(inputs, self._inputs)]
        n = arrays[0].shape[0]
        step = self.batch or n
        parts = []
        for start in range(0, n, step):
            chunk = [a[start:start + step] for a in arrays]
            short = step - chunk[0].shape[0]
            if short:
                chunk = [np.concatenate([c, np.repeat(c[-1:], short, axis=0)]) for c in chunk]
            outputs = self._run(chunk)
            parts.append([o[:step - short] for o in outputs] if short else outputs)
        device = inputs[0].device
        outs = tuple(torch.from_numpy(np.concatenate([p[i] for p in parts])).to(device) for i in range(len(parts[0])))
        return outs[0] if len(outs) == 1 else outs

    def _run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        feed = {spec.name: a for spec, a in zip(self._inputs, arrays)}
        try:
            return self._session.run(None, feed)
        except Exception as exc:  # noqa: BLE001 - ORT's runtime errors are one type per cause, none of ours
            shapes = ", ".join(str(list(a.shape)) for a in arrays)
            raise StructADMMError(f"{self.path}: ONNX Runtime cannot run it on inputs of shape {shapes}: "
                                  f"{one_line(exc)}") from None

    def __deepcopy__(self, memo: dict) -> "OnnxModule":
        return type(self)(self.path, threads=self._session.get_session_options().intra_op_num_threads)

"""Sparse storage of an ONNX model's weights: what irregular (and any) sparsity saves on disk.

Irregular sparsity removes no structure, so it buys no speed on dense kernels; what it buys
is compression. This module reports it honestly: per weight tensor the number of zeros and
the bytes of the tensor stored dense and in CSR form (rows = the first axis; values and
int32 column indices, plus int32 row pointers), and the totals. A tensor is counted in CSR
only where that is smaller.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from structadmm.exporters.onnx_export import load_onnx

_INDEX_BYTES = 4  # int32 column indices and row pointers


@dataclass(frozen=True)
class SparseStorage:
    weights: int  # elements of the float initializers with two or more axes
    zeros: int
    dense_bytes: int
    sparse_bytes: int  # each tensor in CSR where that is smaller, dense otherwise

    @property
    def sparsity(self) -> float:
        return self.zeros / self.weights if self.weights else 0.0

    @property
    def compression(self) -> float:
        return self.dense_bytes / self.sparse_bytes if self.sparse_bytes else 1.0


def csr_bytes(array: np.ndarray) -> int:
    """Bytes of ``array`` as a CSR matrix of shape [first axis, everything else]."""
    rows = array.reshape(array.shape[0], -1)
    nnz = int(np.count_nonzero(rows))
    return nnz * (array.itemsize + _INDEX_BYTES) + (rows.shape[0] + 1) * _INDEX_BYTES


def sparse_storage(model_or_path: onnx.ModelProto | str | Path) -> SparseStorage:
    """Zeros and dense/CSR bytes over the weight matrices and kernels of an ONNX model."""
    proto = load_onnx(model_or_path) if isinstance(model_or_path, (str, Path)) else model_or_path
    weights = zeros = dense = sparse = 0
    for init in proto.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.ndim < 2 or not np.issubdtype(array.dtype, np.floating):
            continue  # biases, scales and shapes: no sparse format pays off
        weights += array.size
        zeros += array.size - int(np.count_nonzero(array))
        dense += array.nbytes
        sparse += min(array.nbytes, csr_bytes(array))
    return SparseStorage(weights, zeros, dense, sparse)

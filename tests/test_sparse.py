"""Sparse storage figures are exact: zeros and CSR bytes of known tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from structadmm.exporters import export_onnx, sparse_storage
from structadmm.exporters.sparse import csr_bytes
from structadmm.prune.plan import PruningPlan


def test_csr_bytes_by_hand() -> None:
    a = np.zeros((3, 4), dtype=np.float32)
    a[0, 1] = a[2, 3] = 1.0
    assert csr_bytes(a) == 2 * (4 + 4) + 4 * 4  # values + column indices, then 4 row pointers


def test_sparse_storage_counts_only_weight_matrices() -> None:
    w = np.zeros((4, 8), dtype=np.float32)
    w[:, 0] = 1.0
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.ones(8, np.float32), "bias")],
    )
    storage = sparse_storage(helper.make_model(graph))
    assert (storage.weights, storage.zeros) == (32, 28)
    assert storage.dense_bytes == 128 and storage.sparse_bytes == 4 * 8 + 5 * 4


def test_irregular_pruning_compresses_without_claiming_speed(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 4)).eval()
    x = torch.randn(2, 3, 8, 8)
    PruningPlan.uniform(model, x, "irregular", 0.9).project(model)
    export_onnx(model, x, tmp_path / "m.onnx")
    storage = sparse_storage(tmp_path / "m.onnx")
    assert storage.sparsity > 0.85
    assert storage.compression > 4

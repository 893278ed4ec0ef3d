"""MAC and parameter counts from ONNX graphs against hand-computed figures, and the forward-side
counter (count_torch) against them and against the ONNX counter on the zoo and random graphs.

Each expected MAC figure is worked out in the test from the layer's arithmetic:
output elements × (C_in / groups) × prod(kernel) for convolutions, M·K·N for matrix products.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from random_nets import RandomNet
from structadmm.errors import StructADMMError
from structadmm.exporters import OnnxCost, count_onnx, count_torch, export_onnx
from zoo_cases import ZOO_INPUTS, zoo_case, zoo_params


def _count_torch(tmp_path: Path, model: nn.Module, *sample_shape: int) -> OnnxCost:
    # Batch 2 in the example: the count must still be per sample.
    path = export_onnx(model.eval(), torch.randn(2, *sample_shape), tmp_path / "m.onnx").path
    return count_onnx(path)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _compute_layers(cost: OnnxCost) -> list[tuple[str, int]]:
    return [(layer.op_type, layer.macs) for layer in cost.layers if layer.macs]


CONV_CASES = {
    # name: (layer, input shape without batch, expected MACs)
    "conv2d_stride_padding": (nn.Conv2d(3, 8, 3, stride=2, padding=1), (3, 9, 9),
                              8 * 5 * 5 * 3 * 3 * 3),
    "conv2d_rectangular": (nn.Conv2d(3, 8, (3, 5), stride=(1, 2), padding=(1, 0)), (3, 7, 11),
                           8 * 7 * 4 * 3 * 3 * 5),
    "conv2d_grouped": (nn.Conv2d(8, 12, 3, groups=4), (8, 6, 6), 12 * 4 * 4 * (8 // 4) * 3 * 3),
    "conv2d_depthwise": (nn.Conv2d(6, 6, 3, padding=1, groups=6), (6, 5, 5), 6 * 5 * 5 * 1 * 9),
    "conv1d": (nn.Conv1d(4, 6, 5, stride=2, padding=2), (4, 17), 6 * 9 * 4 * 5),
    "conv3d": (nn.Conv3d(2, 4, 3, padding=1), (2, 4, 5, 6), 4 * (4 * 5 * 6) * 2 * 27),
    "conv3d_depthwise": (nn.Conv3d(4, 4, (1, 3, 3), groups=4), (4, 3, 5, 5), 4 * 3 * 3 * 3 * 9),
    "conv_transpose2d": (nn.ConvTranspose2d(4, 6, 3, stride=2), (4, 5, 5),
                         (4 * 5 * 5) * 6 * 3 * 3),  # every input element × M × prod(k)
    "linear": (nn.Linear(20, 7), (20,), 20 * 7),
}


@pytest.mark.parametrize("name", list(CONV_CASES))
def test_single_layer_macs_and_params(tmp_path: Path, name: str) -> None:
    layer, shape, expected_macs = CONV_CASES[name]
    cost = _count_torch(tmp_path, layer, *shape)
    assert cost.macs == expected_macs
    assert cost.params == _params(layer)
    assert len(_compute_layers(cost)) == 1


def test_linear_exports_as_gemm_with_trans_b(tmp_path: Path) -> None:
    path = export_onnx(nn.Linear(20, 7), torch.randn(1, 20), tmp_path / "m.onnx").path
    (gemm,) = [n for n in onnx.load(path).graph.node if n.op_type == "Gemm"]
    assert helper.get_attribute_value(next(a for a in gemm.attribute if a.name == "transB")) == 1
    assert count_onnx(path).macs == 20 * 7


class Projection(nn.Module):
    """An N-d activation times a weight matrix: exported as a broadcast MatMul."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class Gram(nn.Module):
    """A batched MatMul of two activations (no weights)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ x.transpose(-1, -2)


def test_matmul_nd_times_weight(tmp_path: Path) -> None:
    cost = _count_torch(tmp_path, Projection(), 3, 4, 5)
    assert _compute_layers(cost) == [("MatMul", 3 * 4 * 5 * 6)]
    assert cost.params == 5 * 6


def test_matmul_batched_activations(tmp_path: Path) -> None:
    cost = _count_torch(tmp_path, Gram(), 4, 5)
    assert _compute_layers(cost) == [("MatMul", 4 * 5 * 4)]
    assert cost.params == 0


def test_conv_bn_relu_flatten_linear(tmp_path: Path) -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 10),
    )
    cost = _count_torch(tmp_path, model, 3, 6, 6)
    assert _compute_layers(cost) == [("Conv", 8 * 36 * 3 * 9), ("Gemm", 288 * 10)]
    # BN is folded into the conv: its γ and β (16) disappear and the conv gains a bias (8).
    assert cost.params == _params(model) - 2 * 8 + 8


class ViewFlatten(nn.Module):
    """x.view(x.size(0), -1) exports integer shape constants, which are not parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.fc(y.view(y.size(0), -1))


def test_integer_constants_are_not_params(tmp_path: Path) -> None:
    model = ViewFlatten()
    cost = _count_torch(tmp_path, model, 2, 6, 6)
    assert cost.params == _params(model)
    assert cost.macs == 3 * 16 * 2 * 9 + 48 * 2


def test_layers_add_up_and_path_equals_proto(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1))
    path = export_onnx(model, torch.randn(1, 3, 5, 5), tmp_path / "m.onnx").path
    proto = onnx.load(path)
    before = proto.SerializeToString()
    cost = count_onnx(proto)
    assert cost == count_onnx(path) == count_onnx(str(path))
    assert proto.SerializeToString() == before  # the caller's model is not modified
    assert sum(layer.macs for layer in cost.layers) == cost.macs
    assert sum(layer.params for layer in cost.layers) == cost.params
    assert [layer.op_type for layer in cost.layers] == ["Conv", "Relu", "Conv"]
    assert cost.layers[1].macs == cost.layers[1].params == 0


# --- hand-built graphs: attributes and shapes exporters rarely produce -----------------------


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
           initializers: dict[str, np.ndarray]) -> onnx.ModelProto:
    output = helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)
    graph = helper.make_graph(
        nodes, "g", inputs, [output],
        initializer=[numpy_helper.from_array(v, name) for name, v in initializers.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _floats(*shape: int) -> np.ndarray:
    return np.ones(shape, dtype=np.float32)


def test_gemm_trans_a_and_trans_b() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 20])
    model = _model(
        [
            helper.make_node("Gemm", ["x", "w"], ["y"], transB=1),  # [1,20]·[7,20]ᵀ
            helper.make_node("Gemm", ["a", "b"], ["z"], transA=1),  # [20,5]ᵀ·[20,3]
            helper.make_node("Gemm", ["y", "c"], ["out"]),  # [1,7]·[7,2]
        ],
        [x],
        {"w": _floats(7, 20), "a": _floats(20, 5), "b": _floats(20, 3), "c": _floats(7, 2)},
    )
    cost = count_onnx(model)
    assert [layer.macs for layer in cost.layers] == [20 * 7, 5 * 20 * 3, 7 * 2]
    assert cost.params == 7 * 20 + 20 * 5 + 20 * 3 + 7 * 2


def test_matmul_broadcast_and_vectors() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 1, 3, 4])
    model = _model(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"]),  # batch (1,2,1)⊗(5,) → (1,2,5)
            helper.make_node("MatMul", ["y", "v"], ["out"]),  # [...,3,6]·[6] → [...,3]
        ],
        [x],
        {"w": _floats(5, 4, 6), "v": _floats(6)},
    )
    cost = count_onnx(model)
    assert [layer.macs for layer in cost.layers] == [2 * 5 * 3 * 4 * 6, 2 * 5 * 3 * 6]


def test_shared_weight_is_counted_once() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"]),
         helper.make_node("MatMul", ["y", "w"], ["out"])],
        [x],
        {"w": _floats(4, 4)},
    )
    cost = count_onnx(model)
    assert cost.params == 16
    assert [layer.params for layer in cost.layers] == [16, 0]


def test_dynamic_spatial_dims_are_an_error() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])
    model = _model([helper.make_node("Conv", ["x", "w"], ["y"])], [x], {"w": _floats(4, 3, 3, 3)})
    with pytest.raises(StructADMMError, match="shape of 'y' is unknown"):
        count_onnx(model)


def test_bad_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"junk")
    with pytest.raises(StructADMMError, match="junk.onnx"):
        count_onnx(path)


def test_bytes_moved_per_node_for_the_roofline(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    cost = _count_torch(tmp_path, model, 3, 6, 6)
    moved = {layer.op_type: (layer.activation_bytes, layer.weight_bytes) for layer in cost.layers}
    assert moved["Conv"] == (4 * (3 * 36 + 8 * 36), 4 * (8 * 27 + 8))  # float32: input, output; weight, bias
    assert moved["Relu"] == (4 * 2 * 8 * 36, 0)
    assert moved["Flatten"] == (0, 0)  # a view: ORT moves nothing
    assert moved["Gemm"] == (4 * (288 + 10), 4 * (288 * 10 + 10))
    conv = next(layer for layer in cost.layers if layer.op_type == "Conv")
    assert conv.bytes_at(8) == 8 * conv.activation_bytes + conv.weight_bytes  # weights read once per run
    assert cost.bytes_at(8) == sum(layer.bytes_at(8) for layer in cost.layers)



def test_bytes_moved_on_a_hand_built_graph() -> None:
    """Every node's bytes worked out by hand: float32 is 4 bytes, float16 2; activations per sample
    (dim 0 of the input set to 1), constants (initializers, Constant nodes) once per run."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])
    constant = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(_floats(5)))
    model = _model(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["y"]),  # 1x1, 2 -> 4 channels on 4x4
            helper.make_node("Relu", ["y"], ["r"]),
            helper.make_node("Reshape", ["r", "shape"], ["z"]),  # a view: moves nothing
            helper.make_node("MatMul", ["z", "w2"], ["m"]),
            constant,
            helper.make_node("Add", ["m", "c"], ["a"]),
            helper.make_node("Cast", ["a"], ["h"], to=TensorProto.FLOAT16),
            helper.make_node("Cast", ["h"], ["out"], to=TensorProto.FLOAT),
        ],
        [x],
        {"w": _floats(4, 2, 1, 1), "b": _floats(4), "shape": np.array([-1, 64], dtype=np.int64),
         "w2": _floats(64, 5)},
    )
    cost = count_onnx(model)
    moved = [(layer.op_type, layer.activation_bytes, layer.weight_bytes) for layer in cost.layers]
    assert moved == [
        ("Conv", 4 * (2 * 16 + 4 * 16), 4 * (4 * 2 + 4)),  # reads x, writes y; weight and bias
        ("Relu", 4 * (4 * 16 + 4 * 16), 0),
        ("Reshape", 0, 0),
        ("MatMul", 4 * (64 + 5), 4 * 64 * 5),
        ("Constant", 0, 0),  # makes a constant: its reader counts it
        ("Add", 4 * (5 + 5), 4 * 5),  # m in, a out; the Constant's c as a weight
        ("Cast", 4 * 5 + 2 * 5, 0),  # float32 in, float16 out
        ("Cast", 2 * 5 + 4 * 5, 0),
    ]
    per_sample, once = 384 + 512 + 276 + 40 + 30 + 30, 48 + 1280 + 20
    assert cost.macs == 4 * 16 * 2 + 64 * 5
    assert cost.bytes_at(1) == per_sample + once == 2620
    assert cost.bytes_at(8) == 8 * per_sample + once == 11524  # weights are read once, whatever the batch


# --- the forward-side counter (count_torch) against the ONNX one ---------------------------


@pytest.mark.parametrize("name", list(CONV_CASES))
def test_torch_counter_on_single_layers(name: str) -> None:
    layer, shape, expected_macs = CONV_CASES[name]
    assert count_torch(layer, torch.randn(2, *shape)).macs == expected_macs  # per sample, at batch 2


def test_torch_counter_counts_functional_matmuls_outside_layers() -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 3), Gram())
    cost = count_torch(model, torch.randn(2, 2, 5, 5))
    conv = 3 * 3 * 3 * 2 * 9
    assert cost.layers == {"0": conv, "1": 3 * 3 * 3 * 3}  # Gram is a leaf module
    assert cost.macs == conv + 3 * 3 * 3 * 3


def test_every_registered_model_has_a_zoo_case() -> None:
    """The zoo-wide checks build every registered model from ZOO_INPUTS: a model added to the zoo
    without an entry would fail them only in the slow suite."""
    from structadmm.models import model_names

    assert set(model_names()) <= set(ZOO_INPUTS)


@pytest.mark.parametrize("name", zoo_params())
def test_torch_counter_agrees_with_onnx_on_the_zoo(tmp_path: Path, name: str) -> None:
    model, x = zoo_case(name)
    path = export_onnx(model, x, tmp_path / "m.onnx", verify=False).path
    assert count_torch(model, x).macs == count_onnx(path).macs > 0


@pytest.mark.parametrize("seed", range(8))
def test_torch_counter_agrees_with_onnx_on_random_graphs(tmp_path: Path, seed: int) -> None:
    torch.manual_seed(seed)
    model = RandomNet(seed).eval()
    x = model.example_input()
    path = export_onnx(model, x, tmp_path / "m.onnx", verify=False).path
    assert count_torch(model, x).macs == count_onnx(path).macs > 0

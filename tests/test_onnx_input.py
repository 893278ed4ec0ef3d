"""ONNX in, ONNX out: a user's .onnx file converted, pruned, compacted and written back as a
drop-in replacement; and every way an untrusted file can be bad gets one line, before it runs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from typer.testing import CliRunner

import structadmm as sa
from cli_checks import ended_cleanly
from structadmm.cli import app
from structadmm.errors import ParityError, StructADMMError
from structadmm.exporters import count_onnx, export_onnx, load_onnx, onnx_signature
from structadmm.models import get_spec
from structadmm.models.onnx_convert import SplitMergeReshape, clear_inert_allowzero
from structadmm.models.onnx_input import example_inputs, load_onnx_model
from structadmm.pipeline import CompressConfig, compress
from structadmm.prune import PruningPlan, compact

FAST = dict(dense_epochs=2, admm_rounds=2, admm_epochs=1, retrain_epochs=1, rho=0.5, rho_growth=2.0,
            bench_batches=[1, 8], bench_min_runs=3, bench_min_seconds=0.0, channel_multiple=1,
            bench_isolate=False)  # isolated timing has its own tests (test_latency, test_pipeline)
runner = CliRunner()


# --- ONNX files made by others ---------------------------------------------------------------------


def _helper_model(path: Path, *, opset: int = 13, batch: int | str = "N", op: str | None = None,
                  spatial: tuple = (16, 16), reduce_mean: bool = False, reshape: list[int] | None = None,
                  allowzero: int = 0) -> Path:
    """Conv-BN-Relu-Conv-Relu-GlobalAveragePool-Flatten-Gemm written node by node with onnx.helper,
    with the input named 'pixels' (batch axis 'N') and the output 'logits'. With ``reshape``, the
    Flatten is a Reshape to that constant shape (with ``allowzero``)."""
    rng = np.random.default_rng(0)

    def init(name: str, *shape: int, scale: float = 0.3) -> TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [init("w1", 16, 1, 3, 3), init("b1", 16),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, 16).astype(np.float32), "bn_s"), init("bn_b", 16),
             init("bn_m", 16, scale=0.1), numpy_helper.from_array(rng.uniform(0.5, 1.5, 16).astype(np.float32), "bn_v"),
             init("w2", 24, 16, 3, 3), init("b2", 24), init("fc_w", 10, 24), init("fc_b", 10)]
    if reshape is not None:
        inits.append(numpy_helper.from_array(np.array(reshape, np.int64), "shape"))
    if reduce_mean:  # axes as an input: ReduceMean-18, newer than onnx2torch's
        inits.append(numpy_helper.from_array(np.array([2, 3], np.int64), "axes"))
    nodes = [
        helper.make_node("Conv", ["pixels", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"], ["n1"], epsilon=1e-5),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node(op or "Relu", ["c2"], ["r2"]),
        helper.make_node("ReduceMean", ["r2", "axes"], ["g"], keepdims=1) if reduce_mean else
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Reshape", ["g", "shape"], ["f"], allowzero=allowzero) if reshape is not None else
        helper.make_node("Flatten", ["g"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "handmade",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [batch, 1, *spatial])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="handmade")
    model.ir_version = 8
    onnx.save(model, path)
    return path


class _Residual(nn.Module):
    """A small residual CNN for 1x16x16 inputs, exported by the legacy exporter, not ours."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.head = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return self.head(torch.relu(h + self.body(h)))


def _legacy_model(path: Path, *, opset: int = 11) -> Path:
    """_Residual through torch.onnx's TorchScript exporter at an older opset, BN nodes kept, and
    the user's own names: input 'image' with batch axis 'batch_size', output 'scores'."""
    torch.manual_seed(0)
    net = _Residual().eval()
    for m in net.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(2, 1, 16, 16),), str(path), dynamo=False, opset_version=opset,
                          input_names=["image"], output_names=["scores"], do_constant_folding=False,
                          dynamic_axes={"image": {0: "batch_size"}, "scores": {0: "batch_size"}})
    return path


def _zoo_onnx(name: str, path: Path, opset: int | None) -> tuple[Path, torch.Tensor]:
    spec = get_spec(name)
    torch.manual_seed(0)
    x = spec.example_input(2)
    export_onnx(spec.build().eval(), x, path, opset=opset)
    return path, x


def _round_trip(path: Path, x: torch.Tensor, tmp_path: Path, ratio: float = 0.5) -> tuple[float, Path]:
    """Load, prune (one-shot projection), compact and export with the file's signature: the MAC
    ratio and the pruned file."""
    loaded = load_onnx_model(path)
    net = loaded.module
    PruningPlan.uniform(net, x, "filter", ratio).project(net)
    small = compact(net, x)  # checks parity with the masked module itself
    out = tmp_path / "pruned.onnx"
    result = export_onnx(small, x, out, signature=onnx_signature(load_onnx(path)))  # checks parity with ORT
    assert result.max_abs_diff < 1e-4
    assert onnx_signature(load_onnx(out)) == onnx_signature(load_onnx(path))  # a drop-in replacement
    return count_onnx(path).macs / count_onnx(out).macs, out


# --- round trips -----------------------------------------------------------------------------------


@pytest.mark.parametrize("opset", [13, None], ids=["opset13", "current"])
@pytest.mark.parametrize("name", ["lenet5", pytest.param("resnet20", marks=pytest.mark.slow)])
def test_zoo_round_trip_matches_the_torch_path(name: str, opset: int | None, tmp_path: Path) -> None:
    path, x = _zoo_onnx(name, tmp_path / "m.onnx", opset)
    ratio, _ = _round_trip(path, x, tmp_path)
    # the same plan on the torch model directly gives the same MAC reduction
    torch.manual_seed(0)
    net = get_spec(name).build().eval()
    PruningPlan.uniform(net, x, "filter", 0.5).project(net)
    export_onnx(compact(net, x), x, tmp_path / "torch.onnx")
    assert ratio == pytest.approx(count_onnx(path).macs / count_onnx(tmp_path / "torch.onnx").macs, rel=1e-9)
    assert ratio > 2.5


def _layers(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    """(op, weight shape) of every Conv/Gemm/MatMul of an ONNX file, in graph order."""
    proto = load_onnx(path)
    weights = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    return [(n.op_type, weights[n.input[1]]) for n in proto.graph.node
            if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in weights]


def _both_paths(name: str, size: int, opset: int | None, tmp_path: Path) -> tuple[float, float]:
    """The MAC ratios of a model pruned as torch and pruned from its ONNX export at ``opset`` (same
    plan: filters, ratio 0.5, multiples of 16); asserts both pruned files have the same layers."""
    torch.manual_seed(0)
    if name.startswith("tv:"):
        import torchvision

        net, shape = torchvision.models.get_model(name[3:], weights=None).eval(), (3, size, size)
    else:
        spec = get_spec(name)
        net, shape = spec.build().eval(), (spec.input_shape if spec.input_shape != (3, 224, 224) else (3, size, size))
    return _both_paths_of(net, torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)), opset, tmp_path)


def _both_paths_of(net: nn.Module, x: torch.Tensor, opset: int | None, tmp_path: Path,
                   multiple: int = 16) -> tuple[float, float]:
    path = tmp_path / "user.onnx"
    export_onnx(net, x, path, opset=opset)
    export_onnx(net, x, tmp_path / "torch_dense.onnx")
    PruningPlan.uniform(net, x, "filter", 0.5, multiple=multiple).project(net)
    export_onnx(compact(net, x), x, tmp_path / "torch_pruned.onnx")
    module = load_onnx_model(path).module
    PruningPlan.uniform(module, x, "filter", 0.5, multiple=multiple).project(module)
    out = tmp_path / "onnx_pruned.onnx"
    assert export_onnx(compact(module, x), x, out, signature=onnx_signature(load_onnx(path))).max_abs_diff < 1e-4
    assert onnx_signature(load_onnx(out)) == onnx_signature(load_onnx(path))
    assert _layers(out) == _layers(tmp_path / "torch_pruned.onnx")
    return (count_onnx(tmp_path / "torch_dense.onnx").macs / count_onnx(tmp_path / "torch_pruned.onnx").macs,
            count_onnx(path).macs / count_onnx(out).macs)


def test_torchvision_model_through_an_opset_13_file_prunes_as_the_torch_model(tmp_path: Path) -> None:
    # MobileNetV3's squeeze-excitation gates come out of the file as HardSigmoid (alpha 1/6) and, at
    # 32 px, its last pooling as a Squeeze with its axes as an input: both must let the channel tracer
    # through as the torch model's nn.Hardsigmoid and pooling do (ShuffleNetV2's Reshape/Slice: slow test)
    torch_ratio, onnx_ratio = _both_paths("tv:mobilenet_v3_small", 32, 13, tmp_path)
    assert onnx_ratio == pytest.approx(torch_ratio, rel=1e-9) and onnx_ratio > 1.8


class _Shuffle(nn.Module):
    """A ShuffleNetV2 unit: chunk, branch, concat, channel shuffle by view. With ``batch_view`` the
    shuffle ends in ``view(b, -1, h, w)``, which the exporter writes as a Reshape to a shape computed
    from the input's Shape, and the file leaves the rank of what follows unknown."""

    def __init__(self, batch_view: bool = False) -> None:
        super().__init__()
        self.batch_view = batch_view
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                                    nn.Conv2d(8, 8, 1), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(16, 32, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.stem(x).chunk(2, dim=1)
        x = torch.cat((x1, self.branch(x2)), dim=1)
        b, c, h, w = x.size()
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2)
        x = x.contiguous().view(b, -1, h, w) if self.batch_view else x.reshape(-1, c, h, w)
        return self.head(x)


def test_channel_shuffle_and_split_from_a_file_follow_the_pruned_channels(tmp_path: Path) -> None:
    # the file states the split as Slice [0:8], [8:16] and the shuffle as Reshape [-1, 2, 8, H, W]:
    # read as chunk parts and as a split of the channel axis, they prune as the torch model does
    torch.manual_seed(0)
    x = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    torch_ratio, onnx_ratio = _both_paths_of(_Shuffle().eval(), x, 13, tmp_path, multiple=1)
    assert onnx_ratio == pytest.approx(torch_ratio, rel=1e-9) and onnx_ratio > 1.5
    kinds = {type(m).__name__ for m in load_onnx_model(tmp_path / "user.onnx").module.modules()}
    assert {"ChunkSlice", "SplitMergeReshape"} <= kinds


def test_global_pool_whose_input_rank_the_file_leaves_unknown_converts(tmp_path: Path) -> None:
    # onnx2torch's GlobalAveragePool averages every axis there (a (1, 1, 1, 1) output); the ONNX
    # spec's, every axis after the channels: the converted module must match ONNX Runtime
    path = tmp_path / "m.onnx"
    torch.manual_seed(0)
    export_onnx(_Shuffle(batch_view=True).eval(), torch.randn(2, 1, 12, 12), path, opset=13)
    module = load_onnx_model(path).module
    assert any(isinstance(m, nn.AdaptiveAvgPool2d) for m in module.modules())


ROUND_TRIPS = [("lenet5", 0), ("mnist1d-cnn", 0), ("alexnet-cifar", 0), ("resnet20", 0), ("resnet56", 0),
               ("c3d-small", 0), ("mobilenetv2", 64), ("resnet18", 64), ("resnet50", 64), ("alexnet", 224),
               ("vgg16", 224), ("tv:resnet18", 64), ("tv:mobilenet_v2", 64), ("tv:mobilenet_v3_small", 64),
               ("tv:alexnet", 224), ("tv:vgg16", 224), ("tv:squeezenet1_1", 64), ("tv:shufflenet_v2_x0_5", 64),
               ("tv:efficientnet_b0", 64), ("tv:regnet_x_400mf", 64), ("tv:densenet121", 64)]


@pytest.mark.slow
@pytest.mark.parametrize("opset", [13, None], ids=["opset13", "current"])
@pytest.mark.parametrize("name,size", ROUND_TRIPS, ids=[name for name, _ in ROUND_TRIPS])
def test_zoo_and_torchvision_round_trips_prune_as_the_torch_models(name: str, size: int, opset: int | None,
                                                                   tmp_path: Path) -> None:
    # AlexNet and VGG at 224 px: smaller inputs make their adaptive pool upsample, which only the
    # dynamo exporter writes (Transpose + GatherND) and the channel tracer does not follow
    torch_ratio, onnx_ratio = _both_paths(name, size, opset, tmp_path)
    assert onnx_ratio == pytest.approx(torch_ratio, rel=1e-9)
    assert onnx_ratio > (1.0 if name == "lenet5" else 1.5)  # lenet5's 6 and 16 filters round up to 16: whole


def test_handmade_onnx_helper_model_round_trips(tmp_path: Path) -> None:
    path = _helper_model(tmp_path / "hand.onnx")
    loaded = sa.load_onnx_model(path)
    assert loaded.input_shape == (1, 16, 16) and loaded.num_classes == 10 and loaded.onnx_file == path
    # onnx2torch gives the layers surgery slices
    kinds = {type(m) for m in loaded.module.modules()}
    assert {nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.AdaptiveAvgPool2d} <= kinds
    ratio, out = _round_trip(path, torch.randn(4, 1, 16, 16), tmp_path)
    assert ratio > 2.0
    dims = [d.dim_param for d in load_onnx(out).graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] == "N"


def test_opset_newer_than_onnx2torch_is_moved_to_one_it_converts(tmp_path: Path) -> None:
    path = _helper_model(tmp_path / "m18.onnx", opset=18, reduce_mean=True)
    ratio, _ = _round_trip(path, torch.randn(4, 1, 16, 16), tmp_path)
    assert ratio > 2.0


@pytest.mark.parametrize("opset", [9, 11])
def test_legacy_exporter_at_an_older_opset_round_trips(opset: int, tmp_path: Path) -> None:
    path = _legacy_model(tmp_path / "legacy.onnx", opset=opset)
    assert "BatchNormalization" in {n.op_type for n in load_onnx(path).graph.node}
    kinds = {type(m).__name__ for m in load_onnx_model(path).module.modules()}
    assert "BatchNorm2d" in kinds and "OnnxBatchNorm" not in kinds  # sliceable by surgery
    ratio, out = _round_trip(path, torch.randn(4, 1, 16, 16), tmp_path)
    assert ratio > 2.0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"] and session.get_inputs()[0].shape[0] == "batch_size"
    assert [o.name for o in session.get_outputs()] == ["scores"]


@pytest.mark.parametrize("shape", [[-1, 24], [0, -1], [0, 24]])
def test_reshape_with_inert_allowzero_converts_and_prunes(shape: list[int], tmp_path: Path) -> None:
    # what the dynamo exporter writes for torch.flatten: allowzero=1, a constant shape; onnx2torch
    # converts allowzero=0 only, and without a 0 in the shape the flag changes nothing
    path = _helper_model(tmp_path / "m.onnx", opset=14, reshape=[-1, 24], allowzero=1)
    proto = load_onnx(path)
    clear_inert_allowzero(proto, path)
    assert not [a for n in proto.graph.node if n.op_type == "Reshape" for a in n.attribute if a.name == "allowzero"]
    # with allowzero=0 a 0 copies the input's dimension: [0, -1] and [0, 24] flatten as well
    path = _helper_model(tmp_path / "m.onnx", opset=14, reshape=shape, allowzero=int(0 not in shape))
    loaded = load_onnx_model(path)  # checked against ONNX Runtime on the file itself
    assert any(isinstance(m, nn.Flatten) for m in loaded.module.modules())  # flattening follows a pruned count
    ratio, out = _round_trip(path, torch.randn(4, 1, 16, 16), tmp_path)
    assert ratio > 2.0  # the conv before the Reshape is pruned too


def test_reshape_that_splits_the_channels_keeps_the_literal_part(tmp_path: Path) -> None:
    path = _helper_model(tmp_path / "m.onnx", opset=14, reshape=[-1, 4, 6], allowzero=1)
    model = onnx.load(path)  # ... -> Reshape [-1, 4, 6] -> Flatten -> Gemm
    reshape = next(n for n in model.graph.node if n.op_type == "Reshape")
    reshape.output[0] = "f3"
    model.graph.node.insert(list(model.graph.node).index(reshape) + 1,
                            helper.make_node("Flatten", ["f3"], ["f"], axis=1))
    onnx.save(model, path)
    module = load_onnx_model(path).module
    # 24 channels (x1x1) into 4 x -1: the 4 stays a number, the rest follows the channel count
    [split] = [m for m in module.modules() if isinstance(m, SplitMergeReshape)]
    assert (split.head, split.fixed, split.tail) == (1, (4,), 0)
    # the tracer keeps the 4 blocks equal; compaction checks the pruned module against the masked one
    ratio, _ = _round_trip(path, torch.randn(4, 1, 16, 16), tmp_path)
    assert ratio > 2.0


@pytest.mark.parametrize("case", ["zero", "computed"])
def test_reshape_whose_allowzero_matters_is_one_line(case: str, tmp_path: Path) -> None:
    path = _helper_model(tmp_path / "m.onnx", opset=14, reshape=[0, 24] if case == "zero" else [-1, 24], allowzero=1)
    if case == "computed":  # the shape comes from a Shape node: unknown before it runs
        model = onnx.load(path)
        model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "shape"))
        model.graph.node.insert(0, helper.make_node("Shape", ["fc_b"], ["ten"]))  # [10]
        model.graph.node.insert(1, helper.make_node("Add", ["ten", "fourteen"], ["width"]))  # [24]
        model.graph.node.insert(2, helper.make_node("Concat", ["minus_one", "width"], ["shape"], axis=0))
        model.graph.initializer.extend([numpy_helper.from_array(np.array([v], np.int64), n) for n, v in
                                        (("minus_one", -1), ("fourteen", 14))])
        onnx.save(model, path)
        _fails(path, r"Reshape .* has allowzero=1 with a shape computed at run time")
    else:
        _fails(path, r"Reshape .* has allowzero=1 and a 0 in its shape \[0, 24\]")


def test_dynamic_spatial_axes_need_and_take_an_input_shape(tmp_path: Path) -> None:
    path = _helper_model(tmp_path / "hw.onnx", spatial=("H", "W"))
    with pytest.raises(StructADMMError, match=r"dynamic axes .* give the shape of one sample"):
        load_onnx_model(path)
    loaded = load_onnx_model(path, input_shape=(1, 16, 16))
    assert loaded.input_shape == (1, 16, 16)
    x = torch.randn(3, 1, 16, 16)
    PruningPlan.uniform(loaded.module, x, "filter", 0.5).project(loaded.module)
    out = tmp_path / "p.onnx"
    export_onnx(compact(loaded.module, x), x, out, signature=onnx_signature(load_onnx(path)))
    assert onnx_signature(load_onnx(out)).inputs[0].dims == ("N", 1, "H", "W")


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.extra = nn.Sequential(nn.Linear(4, 16), nn.ReLU())
        self.head = nn.Linear(32, 3)

    def forward(self, image: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.image(image), self.extra(extra)], dim=1))


class _Pairs(torch.utils.data.Dataset):
    """Samples ((image, meta), label): what a data function gives for a model with two inputs."""

    def __init__(self, images: torch.Tensor, meta: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.meta, self.labels = images, meta, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return (self.images[i], self.meta[i]), self.labels[i]


def test_two_input_model_prunes_on_data_that_gives_both(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "two.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_TwoInputs().eval(), (torch.randn(2, 1, 8, 8), torch.randn(2, 4)), str(path), dynamo=False,
                          input_names=["image", "meta"], output_names=["logits"], opset_version=13,
                          dynamic_axes={"image": {0: "b"}, "meta": {0: "b"}, "logits": {0: "b"}})
    loaded = load_onnx_model(path)
    assert loaded.input_shape is None  # several inputs: no single sample shape
    n = 96
    gen = torch.Generator().manual_seed(0)
    images, meta = torch.randn(n, 1, 8, 8, generator=gen), torch.randn(n, 4, generator=gen)
    labels = (images.mean((1, 2, 3)) > 0).long() + (meta[:, 0] > 0).long()
    train, val = _Pairs(images[:64], meta[:64], labels[:64]), _Pairs(images[64:], meta[64:], labels[64:])
    result = compress(loaded.module, train, val, CompressConfig(ratio=0.5, prune_ends=True, batch_size=16, **FAST),
                      out_dir=tmp_path / "run", model_name="two", dense_onnx=path)
    assert result.report["mac_ratio"] > 1.5 and result.report["parity"]["ok"]
    assert onnx_signature(load_onnx(result.pruned_onnx)) == onnx_signature(load_onnx(path))
    # the CLI's data sources give one input per sample: one line saying so, nothing written
    np.savez(tmp_path / "one.npz", x=np.zeros((8, 1, 8, 8), np.float32), y=np.zeros(8, np.int64))
    cli = runner.invoke(app, ["run", "--model", str(path), "--data", str(tmp_path / "one.npz"),
                              "--out", str(tmp_path / "cli")])
    assert cli.exit_code == 2 and "takes 2 inputs (image, meta)" in cli.output
    assert not (tmp_path / "cli").exists()


def test_cli_runs_end_to_end_on_a_legacy_export(digits, tmp_path: Path) -> None:
    path = _legacy_model(tmp_path / "legacy.onnx")
    cfg = tmp_path / "cfg.toml"
    cfg.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in {**FAST, "ratio": 0.5, "prune_ends": True}.items()) + "\n")
    x, y = digits[0].tensors  # 240 real digit samples keep the run short
    np.savez(tmp_path / "digits.npz", x=x[:240].numpy(), y=y[:240].numpy())
    result = runner.invoke(app, ["run", "--model", str(path), "--data", str(tmp_path / "digits.npz"),
                                 "--config", str(cfg), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    report = json.loads((run / "report.json").read_text())
    assert report["parity"]["ok"] and report["mac_ratio"] > 2.0
    assert report["dense"]["source"] == str(path)
    # the user's node names differ from ours: per-layer rows pair in graph order
    assert all(row["pruned_macs"] is not None for row in report["layers"])
    assert sum(row["pruned_macs"] for row in report["layers"]) == report["pruned"]["macs"]
    # the dense baseline is the user's own file; the pruned file replaces it
    assert load_onnx(run / "dense.onnx").graph == load_onnx(path).graph
    assert onnx_signature(load_onnx(run / "pruned.onnx")) == onnx_signature(load_onnx(path))
    x = example_inputs(path, 5)[0].numpy()
    out = ort.InferenceSession(str(run / "pruned.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    assert out[0].shape == (5, 10)


# --- untrusted files -------------------------------------------------------------------------------


def _fails(path: Path, pattern: str, **kwargs) -> None:
    with pytest.raises(StructADMMError, match=pattern) as info:
        load_onnx_model(path, **kwargs)
    assert "\n" not in str(info.value)


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    _fails(tmp_path / "nope.onnx", r"ONNX file .*nope.onnx does not exist")


def test_too_big_a_file_is_refused_before_parsing(tmp_path: Path) -> None:
    path = _helper_model(tmp_path / "m.onnx")
    _fails(path, r"over the 0 MB limit", max_bytes=100)


@pytest.mark.parametrize("content, message", [
    (b"", r"bad\.onnx takes no inputs"),  # an empty protobuf parses: a model of nothing
    (b"not a protobuf at all \xff\xfe", r"not a readable ONNX file \(truncated or corrupt\?\)"),
    ("truncated", r"not a readable ONNX file \(truncated or corrupt\?\)"),
])
def test_garbage_and_truncated_files(content, message: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.onnx"
    if content == "truncated":
        full = _helper_model(tmp_path / "full.onnx").read_bytes()
        content = full[: len(full) // 2]
    path.write_bytes(content)
    _fails(path, message)


def test_checker_errors_are_one_line(tmp_path: Path) -> None:
    model = onnx.load(_helper_model(tmp_path / "m.onnx"))
    model.graph.node[2].input[0] = "no_such_tensor"
    path = tmp_path / "broken.onnx"
    onnx.save(model, path)
    _fails(path, r"invalid ONNX model")


def _with_external_data(tmp_path: Path, location: str) -> Path:
    model = onnx.load(_helper_model(tmp_path / "m.onnx"))
    onnx.external_data_helper.convert_model_to_external_data(model, location="weights.bin", size_threshold=0)
    onnx.save(model, tmp_path / "ext.onnx")
    model = onnx.load(tmp_path / "ext.onnx", load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, tmp_path / "ext.onnx")
    return tmp_path / "ext.onnx"


def test_external_data_beside_the_file_loads(tmp_path: Path) -> None:
    path = _with_external_data(tmp_path, "weights.bin")
    assert load_onnx_model(path).num_classes == 10


@pytest.mark.parametrize("location", ["../weights.bin", "/etc/passwd", "sub/../../weights.bin"])
def test_external_data_escaping_the_folder_is_refused(location: str, tmp_path: Path) -> None:
    folder = tmp_path / "inner"
    folder.mkdir()
    path = _with_external_data(folder, "weights.bin")
    (folder / "weights.bin").rename(tmp_path / "weights.bin")  # really there, outside the folder
    path = _with_external_data(folder, location)
    _fails(path, r"outside the file's folder")


def test_missing_external_data_is_refused(tmp_path: Path) -> None:
    path = _with_external_data(tmp_path, "gone.bin")
    _fails(path, r"external data file 'gone.bin' .* does not exist")


def test_absurd_initializer_shape_is_refused(tmp_path: Path) -> None:
    model = onnx.load(_helper_model(tmp_path / "m.onnx"))
    fc = next(t for t in model.graph.initializer if t.name == "fc_b")
    fc.dims[:] = [1 << 20, 1 << 20]
    path = tmp_path / "huge.onnx"
    onnx.save(model, path)
    _fails(path, r"initializer 'fc_b' declares shape \[1048576, 1048576\] \(1\.1e\+12 elements\), over the limit")


def test_initializer_with_less_data_than_its_shape_is_refused(tmp_path: Path) -> None:
    model = onnx.load(_helper_model(tmp_path / "m.onnx"))
    fc = next(t for t in model.graph.initializer if t.name == "fc_b")
    fc.dims[:] = [10, 10]
    path = tmp_path / "short.onnx"
    onnx.save(model, path)
    _fails(path, r"initializer 'fc_b' declares shape \[10, 10\] but stores 10 elements")


def test_absurd_input_shape_is_refused(tmp_path: Path) -> None:
    model = onnx.load(_helper_model(tmp_path / "m.onnx"))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_value = dims[3].dim_value = 1 << 16
    path = tmp_path / "wide.onnx"
    onnx.save(model, path)
    _fails(path, r"'pixels' has shape .* over the limit")


def test_fixed_batch_is_refused(tmp_path: Path) -> None:
    _fails(_helper_model(tmp_path / "m.onnx", batch=1), r"exported for batch size 1 only")


def test_custom_op_is_refused_by_name(tmp_path: Path) -> None:
    model = onnx.load(_helper_model(tmp_path / "m.onnx"))
    model.graph.node[4].op_type, model.graph.node[4].domain = "FancyRelu", "com.example"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    _fails(path, r"op FancyRelu of domain 'com.example' is a custom op")


def test_unconvertible_op_is_named(tmp_path: Path) -> None:
    _fails(_helper_model(tmp_path / "m.onnx", op="Cosh"), r"op Cosh \(opset 13\) cannot be converted")


def test_conversion_that_disagrees_with_onnx_runtime_is_refused(tmp_path: Path, monkeypatch) -> None:
    import onnx2torch

    real = onnx2torch.convert

    def off_by_one(proto):
        module = real(proto)
        fc = next(m for m in module.modules() if isinstance(m, nn.Linear))
        with torch.no_grad():
            fc.bias += 1
        return module

    monkeypatch.setattr(onnx2torch, "convert", off_by_one)
    with pytest.raises(ParityError, match=r"does not compute what ONNX Runtime does"):
        load_onnx_model(_helper_model(tmp_path / "m.onnx"))


def test_cli_bad_file_one_line_and_nothing_written(tmp_path: Path) -> None:
    path = _helper_model(tmp_path / "m.onnx", op="Cosh")
    result = runner.invoke(app, ["run", "--model", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "op Cosh" in result.output
    ended_cleanly(result)
    assert not (tmp_path / "run").exists()


def test_layer_pairing_by_name_else_by_graph_order() -> None:
    from structadmm.bench.profile import pair_layers

    ours = [("/a/Conv", "Conv"), ("/b/Gemm", "Gemm")]
    assert pair_layers(ours, [("/b/Gemm", "Gemm")]) == {"/b/Gemm": "/b/Gemm"}
    theirs = [("conv_0", "Conv"), ("fc", "Gemm")]
    assert pair_layers(theirs, ours) == {"conv_0": "/a/Conv", "fc": "/b/Gemm"}
    assert pair_layers(theirs, ours[::-1]) == {}  # different sequences: nothing paired

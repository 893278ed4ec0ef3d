"""ONNX files written by other exporters than torch's: Paddle2ONNX (RapidOCR's PP-OCR models, weights in
Constant nodes, -1 for unknown axes), Ultralytics (YOLOv8n, anchors computed from shapes, opset 18) and
tf2onnx (NHWC inputs, convs wrapped in Transposes) load, prune, compact exactly and export with their
own input and output names, parity checked."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from structadmm.errors import StructADMMError
from structadmm.exporters import count_onnx, export_onnx, load_onnx, onnx_signature
from structadmm.layers import flat_outputs
from structadmm.models.onnx_input import load_onnx_model
from structadmm.prune import PruningPlan, compact


def _rapidocr(name: str) -> Path:
    pytest.importorskip("rapidocr_onnxruntime")
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    path = Path(spec.origin).parent / "models" / name
    # the dev extra pins rapidocr-onnxruntime==1.4.4, which ships every file named here: a missing one is a
    # broken install, not a reason to pass quietly
    assert path.exists(), f"{name} is not in the installed rapidocr_onnxruntime {spec.origin}"
    return path


def _round_trip(path: Path, shape: tuple[int, ...], tmp_path: Path, *, fixed: bool = False,
                ratio: float = 0.5) -> tuple[float, Path]:
    """Load ``path`` at samples of ``shape``, prune its filters at ``ratio`` (one-shot projection), compact
    and export with the file's signature (with ``fixed``, its dynamic axes other than the batch fixed at
    ``shape``); the fraction of MACs removed (the project's counter, at ``shape``) and the pruned file."""
    loaded = load_onnx_model(path, input_shape=shape)
    net = loaded.module
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    PruningPlan.uniform(net, x, "filter", ratio).project(net)
    with torch.no_grad():
        masked = flat_outputs(net(x))
    small = compact(net, x)
    with torch.no_grad():
        compacted = flat_outputs(small(x))
    assert len(masked) == len(compacted)
    # exact compaction: the same function up to float reordering (surgery's own bound: 1e-4 + 1e-4 max |out|)
    assert all(float((a - b).abs().max()) <= 1e-4 + 1e-4 * float(a.abs().max()) for a, b in zip(masked, compacted))
    signature = onnx_signature(load_onnx(path))
    if fixed:
        signature = signature.fixed([x.shape], [o.shape for o in compacted])
    out = tmp_path / "pruned.onnx"
    result = export_onnx(small, x, out, signature=signature)  # parity against ONNX Runtime on two batches
    # tighter than export's own check (1e-4 + 1e-3 max |out|): the surgery bound above, float reordering only
    scale = max(float(t.abs().max()) for t in compacted)
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4 + 1e-4 * scale
    written = onnx_signature(load_onnx(out))
    original = onnx_signature(load_onnx(path))
    assert [t.name for t in written.inputs] == [t.name for t in original.inputs]
    assert [t.name for t in written.outputs] == [t.name for t in original.outputs]
    dense, pruned = count_onnx(path, input_shapes=[shape]).macs, count_onnx(out, input_shapes=[shape]).macs
    return 1 - pruned / dense, out


# --- Paddle2ONNX (RapidOCR) ----------------------------------------------------------------------------


def test_paddle_cls_model_prunes_and_exports_with_its_names(tmp_path: Path) -> None:
    # weights in Constant nodes, input [-1, 3, '?', '?'], SE blocks whose biases are Reshape(Constant)
    path = _rapidocr("ch_ppocr_mobile_v2.0_cls_infer.onnx")
    removed, out = _round_trip(path, (3, 48, 192), tmp_path)
    assert removed >= 0.25
    # the -1 batch and the dynamic height and width stay dynamic in the pruned file
    assert [isinstance(d, str) for d in onnx_signature(load_onnx(out)).inputs[0].dims] == [True, False, True, True]


@pytest.mark.slow
def test_paddle_det_model_prunes_and_keeps_its_dynamic_axes(tmp_path: Path) -> None:
    # HardSigmoid, HardSwish as Clip/Mul/Div, ConvTranspose, Resize by constant scales
    path = _rapidocr("ch_PP-OCRv4_det_infer.onnx")
    removed, out = _round_trip(path, (3, 320, 320), tmp_path)
    assert removed >= 0.25
    assert onnx_signature(load_onnx(out)) == onnx_signature(load_onnx(path))  # a drop-in replacement


@pytest.mark.slow
def test_paddle_rec_model_prunes_at_its_input_width(tmp_path: Path) -> None:
    # the SVTR neck reshapes to shapes computed from the input's width: the conversion freezes them, so
    # the pruned file keeps its names but is written for the width it was pruned at (one line otherwise)
    path = _rapidocr("ch_PP-OCRv4_rec_infer.onnx")
    removed, out = _round_trip(path, (3, 48, 320), tmp_path, fixed=True)
    assert removed >= 0.25
    assert onnx_signature(load_onnx(out)).inputs[0].dims[1:] == (3, 48, 320)


# --- Ultralytics ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def yolo_onnx(tmp_path_factory) -> Path:
    """YOLOv8n with random weights, exported by Ultralytics' own ONNX exporter (offline; no onnxslim)."""
    pytest.importorskip("ultralytics")
    folder = tmp_path_factory.mktemp("yolo")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setenv("YOLO_OFFLINE", "1")
        from ultralytics import YOLO

        torch.manual_seed(0)
        # dynamic=True: a dynamic batch axis, which the pipeline needs (a batch-1 file is refused in one line)
        written = YOLO("yolov8n.yaml").export(format="onnx", imgsz=320, simplify=False, dynamic=True)
    return Path(folder, written)


@pytest.mark.slow
def test_ultralytics_yolov8n_export_prunes(yolo_onnx: Path, tmp_path: Path) -> None:
    # opset 18 Split/Resize, Identity-shared weights, anchor grids from Shape/Range/Expand, DFL softmax
    removed, out = _round_trip(yolo_onnx, (3, 320, 320), tmp_path, fixed=True)
    assert removed >= 0.25
    dims = onnx_signature(load_onnx(out)).outputs[0].dims
    assert isinstance(dims[0], str) and dims[1:] == (84, 2100)


@pytest.mark.slow
def test_ultralytics_export_keeping_its_dynamic_size_is_one_line(yolo_onnx: Path, tmp_path: Path) -> None:
    loaded = load_onnx_model(yolo_onnx, input_shape=(3, 320, 320))
    x = torch.randn(2, 3, 320, 320)
    with pytest.raises(StructADMMError, match="would not be a drop-in replacement: output0 would have axes") as info:
        export_onnx(loaded.module, x, tmp_path / "p.onnx", signature=onnx_signature(load_onnx(yolo_onnx)))
    assert "\n" not in str(info.value)


# --- tf2onnx-style NHWC ----------------------------------------------------------------------------------


def _nhwc_model(path: Path, size: int = 16) -> Path:
    """What tf2onnx writes for a small Keras CNN: an NHWC input, every Conv wrapped in Transposes to NCHW
    and back, a residual Add and Relus in NHWC, GlobalAveragePool, a Reshape and MatMul + Add."""
    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int) -> TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    inits = [weight("conv1/kernel", 16, 3, 3, 3), weight("conv1/bias", 16), weight("conv2/kernel", 16, 16, 3, 3),
             weight("conv2/bias", 16), weight("conv3/kernel", 32, 16, 3, 3), weight("conv3/bias", 32),
             weight("dense/kernel", 32, 10), weight("dense/bias", 10),
             numpy_helper.from_array(np.array([-1, 32], np.int64), "flat_shape")]
    nodes = []

    def conv(x: str, name: str, out: str, stride: int = 1) -> None:
        nodes.extend([
            helper.make_node("Transpose", [x], [f"{name}/in"], perm=[0, 3, 1, 2], name=f"{name}__T_in"),
            helper.make_node("Conv", [f"{name}/in", f"{name}/kernel", f"{name}/bias"], [f"{name}/conv"],
                             pads=[1, 1, 1, 1], strides=[stride, stride], name=name),
            helper.make_node("Transpose", [f"{name}/conv"], [out], perm=[0, 2, 3, 1], name=f"{name}__T_out")])

    conv("input_1:0", "conv1", "c1")
    nodes.append(helper.make_node("Relu", ["c1"], ["r1"], name="relu1"))
    conv("r1", "conv2", "c2")
    nodes.append(helper.make_node("Add", ["c2", "r1"], ["s2"], name="add"))
    nodes.append(helper.make_node("Relu", ["s2"], ["r2"], name="relu2"))
    conv("r2", "conv3", "c3", stride=2)
    nodes += [helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
              helper.make_node("Transpose", ["r3"], ["r3t"], perm=[0, 3, 1, 2], name="pool__T"),
              helper.make_node("GlobalAveragePool", ["r3t"], ["g"], name="pool"),
              helper.make_node("Reshape", ["g", "flat_shape"], ["f"], name="flatten"),
              helper.make_node("MatMul", ["f", "dense/kernel"], ["m"], name="dense/MatMul"),
              helper.make_node("Add", ["m", "dense/bias"], ["Identity:0"], name="dense/BiasAdd")]
    graph = helper.make_graph(nodes, "tf2onnx_like",
                              [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, ["unk__0", size, size, 3])],
                              [helper.make_tensor_value_info("Identity:0", TensorProto.FLOAT, ["unk__0", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="tf2onnx")
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_nhwc_file_with_transposed_convs_prunes(tmp_path: Path) -> None:
    path = _nhwc_model(tmp_path / "keras.onnx")
    removed, out = _round_trip(path, (16, 16, 3), tmp_path)
    assert removed >= 0.25
    assert onnx_signature(load_onnx(out)) == onnx_signature(load_onnx(path))
    # conv1 and conv2 (tied by the residual Add) lost half their filters; conv3 feeds the head (kept)
    weights = {t.name: tuple(t.dims) for t in load_onnx(out).graph.initializer}
    assert sorted(d[0] for d in weights.values() if len(d) == 4) == [8, 8, 32]


# --- the generic pieces, on small handmade files ----------------------------------------------------------


def _constant_weights_model(path: Path, batch_dim: int = -1) -> Path:
    """Conv-Relu-GlobalAveragePool-Flatten-Gemm whose weights are Constant nodes (as Paddle2ONNX writes
    them) and whose batch axis is written as ``batch_dim``."""
    rng = np.random.default_rng(0)
    tensors = {"conv.w": rng.standard_normal((16, 3, 3, 3)), "conv.b": rng.standard_normal(16),
               "fc.w": rng.standard_normal((10, 16)), "fc.b": rng.standard_normal(10)}
    nodes = [helper.make_node("Constant", [], [name], value=numpy_helper.from_array((v * 0.3).astype(np.float32), name))
             for name, v in tensors.items()]
    nodes += [helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["c"], ["r"]),
              helper.make_node("GlobalAveragePool", ["r"], ["g"]),
              helper.make_node("Flatten", ["g"], ["f"], axis=1),
              helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["scores"], transB=1)]
    graph = helper.make_graph(nodes, "paddle_like",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, 3, 8, 8])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch_dim, 10])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], producer_name="PaddlePaddle")
    model.ir_version = 7
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("batch_dim", [-1, 0])
def test_weights_in_constant_nodes_and_unknown_batch_written_as_a_number(batch_dim: int, tmp_path: Path) -> None:
    path = _constant_weights_model(tmp_path / "m.onnx", batch_dim)
    assert isinstance(onnx_signature(load_onnx(path)).inputs[0].dims[0], str)  # -1 and 0 are dynamic
    removed, out = _round_trip(path, (3, 8, 8), tmp_path)
    assert removed >= 0.25
    assert onnx_signature(load_onnx(out)) == onnx_signature(load_onnx(path))


def test_a_node_naming_a_missing_constant_keeps_the_files_name_in_the_message(tmp_path: Path) -> None:
    model = onnx.load(_constant_weights_model(tmp_path / "m.onnx"))
    model.graph.node.remove(next(n for n in model.graph.node if n.output[0] == "conv.w"))
    onnx.save(model, tmp_path / "broken.onnx")
    with pytest.raises(StructADMMError, match=r"conv\.w") as info:
        load_onnx_model(tmp_path / "broken.onnx")
    assert "\n" not in str(info.value)


def test_an_axis_below_minus_one_is_still_refused(tmp_path: Path) -> None:
    _fails = pytest.raises(StructADMMError, match=r"'x' has an invalid shape \[-2, 3, 8, 8\]")
    with _fails:
        load_onnx_model(_constant_weights_model(tmp_path / "m.onnx", batch_dim=-2))


def _resize_model(path: Path, **attributes) -> Path:
    """Conv-Resize(x2, nearest)-Conv-GlobalAveragePool-Flatten at opset 18 (newer than onnx2torch's Resize)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n)
             for n, s in (("w1", (8, 3, 3, 3)), ("w2", (8, 8, 3, 3)))]
    inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Resize", ["r1", "", "scales"], ["u"], mode="nearest", **attributes),
             helper.make_node("Conv", ["u", "w2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c2"], ["g"]),
             helper.make_node("Flatten", ["g"], ["y"])]
    graph = helper.make_graph(nodes, "resize", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_opset_18_resize_at_its_defaults_prunes(tmp_path: Path) -> None:
    removed, _ = _round_trip(_resize_model(tmp_path / "m.onnx"), (3, 8, 8), tmp_path)
    assert removed >= 0.25
    kinds = {type(m).__name__ for m in load_onnx_model(tmp_path / "m.onnx").module.modules()}
    assert "StaticResize" in kinds  # scales as numbers: the tracer follows it


def test_opset_18_resize_with_antialias_is_one_line(tmp_path: Path) -> None:
    path = _resize_model(tmp_path / "m.onnx")
    model = onnx.load(path)
    next(n for n in model.graph.node if n.op_type == "Resize").attribute.append(helper.make_attribute("antialias", 1))
    onnx.save(model, path)
    with pytest.raises(StructADMMError, match=r"onnx2torch cannot convert it: Resize-18 with antialias=1") as info:
        load_onnx_model(path)
    assert "\n" not in str(info.value)


def test_count_onnx_takes_the_shape_of_a_sample_for_dynamic_axes(tmp_path: Path) -> None:
    path = _resize_model(tmp_path / "m.onnx")
    model = onnx.load(path)
    for d, name in zip(model.graph.input[0].type.tensor_type.shape.dim[2:], ("H", "W")):
        d.dim_param = name
    onnx.save(model, path)
    with pytest.raises(StructADMMError, match="is unknown"):
        count_onnx(path)
    small, large = count_onnx(path, input_shapes=[(3, 8, 8)]).macs, count_onnx(path, input_shapes=[(3, 16, 16)]).macs
    assert small == 8 * 8 * 8 * 27 + 16 * 16 * 8 * 72 and large == 4 * small

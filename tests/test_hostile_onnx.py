"""Hostile ONNX files, built with onnx.helper: none runs code, none takes more than 2 GB or 60 s
before it is refused, and each refusal is one line (issue 24).

Every file is loaded with ``memory_limit=1 GiB``: the sandboxed child that checks and first
converts a file cannot map more than that beyond what it shares with the zygote (plus room for
thread stacks), and each test asserts the child's measured peak and the wall time.
"""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from structadmm.cli import app
from structadmm.errors import StructADMMError
from structadmm.exporters import export_onnx, onnx_signature
from structadmm.models import onnx_guard, onnx_sandbox
from structadmm.models.onnx_input import load_onnx_model
from structadmm.prune import PruningPlan, compact

GiB = 1024**3
LIMITS = dict(memory_limit=GiB, time_limit=50.0)
#: The node name from the issue: torch.fx used to write it into the Python source it runs.
PAYLOAD = 'x", getattr(__import__("os"), "system")("touch pwned")) and getattr(self, "y'


def _model(path: Path, nodes: list, inits: list = (), *, inputs=None, outputs=None, opset: int = 13,
           ir: int = 8) -> Path:
    """A model of ``nodes`` taking 'x' (float, [N, 4]) and giving 'y' (float, [N, 4]) unless told otherwise."""
    graph = helper.make_graph(
        nodes, "hostile",
        inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        outputs or [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    onnx.save(model, path)
    return path


def _const(name: str, values, dtype=np.int64) -> TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype), name)


def _refused(path: Path, pattern: str, **kwargs) -> str:
    """Load ``path``: one line of StructADMMError matching ``pattern``, within 60 s, the parent's peak memory
    grown by under 2 GB and any child's peak under 2 GB."""
    onnx_sandbox.last_child()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.monotonic()
    with pytest.raises(StructADMMError, match=pattern) as info:
        load_onnx_model(path, **{**LIMITS, **kwargs})
    assert time.monotonic() - start < 60
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before < 2 * GiB
    assert onnx_sandbox.last_child().get("peak", 0) < 2 * GiB
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    return message


# --- names: no code runs ------------------------------------------------------------------------------


def _named_model(path: Path, names: list[str]) -> Path:
    """x -> Relu -> Mul(by an initializer) -> Identity -> y, every name taken from ``names`` (node, value,
    initializer, input and output names)."""
    n = (names * 8)[:8]
    nodes = [helper.make_node("Relu", [n[0]], [n[1]], name=n[2]),
             helper.make_node("Mul", [n[1], n[3]], [n[4]], name=n[5]),
             helper.make_node("Identity", [n[4]], [n[6]], name=n[7])]
    scale = numpy_helper.from_array(np.full(4, 2.0, np.float32), n[3])
    return _model(path, nodes, [scale], inputs=[helper.make_tensor_value_info(n[0], TensorProto.FLOAT, ["N", 4])],
                  outputs=[helper.make_tensor_value_info(n[6], TensorProto.FLOAT, ["N", 4])])


@pytest.fixture
def sentinel() -> Path:
    """Where a payload that ran would create 'pwned': an absolute folder without dots (onnx2torch turns a
    dot in a node name into a slash), outside pytest's, so that code run by any process would show."""
    folder = Path(tempfile.mkdtemp(prefix="sa_pwned_"))
    assert "." not in str(folder)
    yield folder / "pwned"
    shutil.rmtree(folder)


def _payloads(target: Path) -> list[str]:
    """Node names that run code when written into Python source between double quotes."""
    shell = f'getattr(__import__("os"), "system")("touch {target}")'
    touch = f'getattr(getattr(__import__("pathlib"), "Path")("{target}"), "touch")()'
    return [f'x", {shell}) and getattr(self, "y', f'x", {touch}) and getattr(self, "y',
            f'a")\n{touch}\n("', f'x\\", {touch}) and getattr(self, "y', f"a'); {touch}; ('",
            f"{touch}#", "__import__", "class", "lambda", "self", "None"]


def test_the_payload_would_run_without_renaming(tmp_path: Path, sentinel: Path) -> None:
    # the control: onnx2torch on the file's own names writes the node name into the forward torch.fx
    # generates, which runs it when the module is called (as the check against ONNX Runtime does)
    import onnx2torch

    path = _named_model(tmp_path / "m.onnx", ["x", "r", _payloads(sentinel)[1], "s", "m", "mul", "y", "id"])
    module = onnx2torch.convert(onnx.load(path))
    assert "pathlib" in module.code and not sentinel.exists()
    with pytest.raises(Exception):  # noqa: B017 - the call fails after the payload ran, as the issue says
        module(torch.randn(2, 4))
    assert sentinel.exists()


@pytest.mark.parametrize("index", range(len(_payloads(Path("p")))))
def test_payload_names_load_and_run_nothing(index: int, tmp_path: Path, sentinel: Path, monkeypatch) -> None:
    payload = [PAYLOAD, *_payloads(sentinel)][index]
    monkeypatch.chdir(tmp_path)
    ran = []
    monkeypatch.setattr(os, "system", lambda *a: ran.append(a) or 0)
    path = _named_model(tmp_path / "m.onnx", ["x", "r", payload, "s", "m", payload + "2", "y", payload])
    loaded = load_onnx_model(path, **LIMITS)
    assert not ran and not sentinel.exists() and not (tmp_path / "pwned").exists()
    x = torch.randn(3, 4)
    assert torch.allclose(loaded.module(x), 2 * torch.relu(x))
    code = loaded.module.code
    assert "__import__" not in code and "pathlib" not in code


def _names_of(model: onnx.ModelProto) -> dict:
    g = model.graph
    return {"nodes": [(n.name, list(n.input), list(n.output)) for n in g.node], "inits": [t.name for t in g.initializer],
            "inputs": [v.name for v in g.input], "outputs": [v.name for v in g.output]}


NAMES = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=40) | st.sampled_from(
    [PAYLOAD, "import", "None", "self", "__import__('os').system('touch pwned')", "a\nb", "a\\", '"', "'", "n0_x",
     "v0", "w1", "g0", "initializers", "forward", "x.y", "ünïcødé", "名前"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(NAMES, min_size=8, max_size=8, unique=True))
def test_fuzzed_names_are_renamed_converted_without_running_and_round_trip(names: list[str], tmp_path: Path,
                                                                            monkeypatch) -> None:
    import onnx2torch

    monkeypatch.chdir(tmp_path)
    ran = []
    monkeypatch.setattr(os, "system", lambda *a: ran.append(a) or 0)
    path = _named_model(tmp_path / "fuzz.onnx", names)
    original = onnx.load(path)
    checked = onnx_guard.read_model(path)
    onnx_guard.assert_safe(checked.proto)
    assert _names_of(checked.names.restore(checked.proto)) == _names_of(original)  # the map gives every name back
    assert [t.name for t in checked.signature.inputs] == [names[0]]  # the pruned file's names
    assert [t.name for t in checked.signature.outputs] == [names[6]]
    module = onnx2torch.convert(checked.proto)  # what torch.fx generates and runs from the renamed model
    x = torch.randn(2, 4)
    assert torch.allclose(module(x), 2 * torch.relu(x))
    assert not ran and not (tmp_path / "pwned").exists()
    message = checked.names.restore_text(f"node {checked.proto.graph.node[0].name} failed on {checked.proto.graph.input[0].name}")
    assert message == f"node {onnx_guard.quoted(names[2])} failed on {onnx_guard.quoted(names[0])}"


def test_pruned_file_keeps_the_files_odd_input_and_output_names(tmp_path: Path) -> None:
    # the pruned model is written with the file's own names, however odd
    odd_in, odd_out = 'pixels "in"\nline 2', "logits ünï"
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", [odd_in, "w", "b"], ["c"], name=PAYLOAD, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "fw", "fb"], [odd_out], transB=1)]
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in
             (("w", (8, 1, 3, 3)), ("b", (8,)), ("fw", (3, 8)), ("fb", (3,)))]
    path = _model(tmp_path / "odd.onnx", nodes, inits,
                  inputs=[helper.make_tensor_value_info(odd_in, TensorProto.FLOAT, ["N", 1, 8, 8])],
                  outputs=[helper.make_tensor_value_info(odd_out, TensorProto.FLOAT, ["N", 3])])
    loaded = load_onnx_model(path, **LIMITS)
    x = torch.randn(4, 1, 8, 8)
    PruningPlan.uniform(loaded.module, x, "filter", 0.5, multiple=1).project(loaded.module)
    out = tmp_path / "pruned.onnx"
    signature = onnx_signature(onnx.load(path))
    export_onnx(compact(loaded.module, x), x, out, signature=signature)
    assert onnx_signature(onnx.load(out)) == signature
    assert [v.name for v in onnx.load(out).graph.input] == [odd_in]


# --- sizes: known and bounded before anything runs ------------------------------------------------------


def test_constant_of_shape_of_48_gb_is_refused_naming_the_node(tmp_path: Path) -> None:
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"], name="make it big",
                              value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
             helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
             helper.make_node("Add", ["x", "total"], ["y"])]
    path = _model(tmp_path / "cos.onnx", nodes, [_const("shape", [1, 3, 65536, 65536])])
    message = _refused(path, r"node 'make it big' \(ConstantOfShape\) would make a tensor of 51.5 GB")
    assert "shape [1, 3, 65536, 65536]" in message


def test_a_16_mb_initializer_read_by_1500_nodes_is_converted_once(tmp_path: Path) -> None:
    # onnx2torch copied it for every node that reads it (24 GB); it is one tensor now
    weight = numpy_helper.from_array(np.ones((1024, 4096), np.float32), "W")  # 16 MB
    nodes = [helper.make_node("Shape", ["W"], [f"s{i}"]) for i in range(1500)]
    nodes += [helper.make_node("Concat", [f"s{i}" for i in range(1500)], ["all"], axis=0),
              helper.make_node("ReduceMin", ["all"], ["least"], keepdims=1),
              helper.make_node("Cast", ["least"], ["scale"], to=TensorProto.FLOAT),
              helper.make_node("Mul", ["x", "scale"], ["y"])]
    path = _model(tmp_path / "shared.onnx", nodes, [weight])
    start = time.monotonic()
    loaded = load_onnx_model(path, **LIMITS)
    assert time.monotonic() - start < 60
    assert onnx_sandbox.last_child()["peak"] < GiB
    storages = {b.untyped_storage().data_ptr(): b.untyped_storage().nbytes() for b in loaded.module.buffers()}
    assert sum(storages.values()) < 17e6  # one copy of W
    x = torch.randn(2, 4)
    assert torch.allclose(loaded.module(x), 1024 * x)


def test_a_16_mb_weight_of_1500_convolutions_is_refused(tmp_path: Path) -> None:
    # each converted Conv owns its weight (surgery prunes layers apart): 1,500 copies are refused up front
    weight = numpy_helper.from_array(np.zeros((1024, 1024, 2, 2), np.float32), "W")
    nodes = [helper.make_node("Conv", ["x", "W"], [f"c{i}"], name=f"conv{i}") for i in range(1500)]
    nodes.append(helper.make_node("Sum", [f"c{i}" for i in range(1500)], ["y"]))
    path = _model(tmp_path / "convs.onnx", nodes, [weight],
                  inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1024, 2, 2])],
                  outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1024, 1, 1])])
    _refused(path, r"initializer 'W' \(16.8 MB\) is the weight of 1500 layers; converting them takes 25.1 GB")


@pytest.mark.parametrize("case", ["Expand", "Tile", "Range", "Pad", "Resize", "Concat", "Reshape"])
def test_ops_that_make_sizes_from_values_are_bounded(case: str, tmp_path: Path) -> None:
    nodes, inits = [], []
    tail = [helper.make_node("ReduceMax", ["big"], ["top"], keepdims=0), helper.make_node("Add", ["x", "top"], ["y"])]
    if case == "Expand":
        nodes = [helper.make_node("Expand", ["x", "shape"], ["big"], name="expand")]
        inits = [_const("shape", [1 << 16, 1 << 16, 1, 4])]
    elif case == "Tile":
        nodes = [helper.make_node("Tile", ["x", "reps"], ["big"], name="tile")]
        inits = [_const("reps", [1 << 16, 1 << 16])]
    elif case == "Range":
        nodes = [helper.make_node("Range", ["start", "limit", "delta"], ["ints"], name="range"),
                 helper.make_node("Cast", ["ints"], ["big"], to=TensorProto.FLOAT)]
        inits = [_const("start", 0), _const("limit", 1 << 40), _const("delta", 1)]
    elif case == "Pad":
        nodes = [helper.make_node("Pad", ["x", "pads"], ["big"], name="pad")]
        inits = [_const("pads", [0, 1 << 31, 0, 1 << 31])]
    elif case == "Resize":
        x4 = helper.make_node("Unsqueeze", ["x", "axes"], ["x4"])
        nodes = [x4, helper.make_node("Resize", ["x4", "", "scales"], ["big"], name="resize", mode="nearest")]
        inits = [_const("axes", [2, 3]), numpy_helper.from_array(np.array([1, 1, 1e5, 1e5], np.float32), "scales")]
    elif case == "Concat":  # 2,048 reads of a 1 MiB initializer: 2 GiB, from a 1 MB file
        nodes = [helper.make_node("Concat", ["c"] * 2048, ["big"], name="concat", axis=0)]
        inits = [numpy_helper.from_array(np.zeros((1 << 18,), np.float32), "c")]
    else:  # Reshape: a size computed from constants, and a reshape to it
        nodes = [helper.make_node("Mul", ["side", "side"], ["area"]),
                 helper.make_node("Concat", ["area", "side"], ["shape"], axis=0),
                 helper.make_node("ConstantOfShape", ["shape"], ["flat"], name="fill"),
                 helper.make_node("Reshape", ["flat", "back"], ["big"], name="reshape")]
        inits = [_const("side", [1 << 17]), _const("back", [-1])]
    path = _model(tmp_path / f"{case}.onnx", nodes + tail, inits)
    _refused(path, r"node '(expand|tile|range|pad|resize|concat|fill|reshape)' \((Expand|Tile|Range|Pad|Resize|Concat|"
                   r"ConstantOfShape|Reshape)\) would make a tensor of .* over the .* limit")


def test_tensor_limit_is_configurable(tmp_path: Path) -> None:
    nodes = [helper.make_node("Tile", ["x", "reps"], ["big"], name="tile"),
             helper.make_node("ReduceMax", ["big"], ["top"], keepdims=0), helper.make_node("Add", ["x", "top"], ["y"])]
    path = _model(tmp_path / "tile.onnx", nodes, [_const("reps", [1, 1 << 12])])  # 3 x 16,384 floats: 196 kB
    assert load_onnx_model(path, **LIMITS).module(torch.ones(2, 4)).shape == (2, 4)
    _refused(path, r"node 'tile' \(Tile\) would make a tensor of 197 kB .* over the 100 kB limit",
             max_tensor_bytes=100_000)


def test_a_tensor_that_grows_faster_than_the_batch_is_refused(tmp_path: Path) -> None:
    # an outer product over the batch: 36 bytes at batch 3, 256 kB at 256, 64 GB at 131,072
    nodes = [helper.make_node("ReduceSum", ["x", "axis"], ["col"], keepdims=1),
             helper.make_node("Transpose", ["col"], ["row"], perm=[1, 0]),
             helper.make_node("MatMul", ["col", "row"], ["outer"], name="outer"),
             helper.make_node("ReduceSum", ["outer", "axis"], ["back"], keepdims=1),
             helper.make_node("Add", ["x", "back"], ["y"])]
    path = _model(tmp_path / "outer.onnx", nodes, [_const("axis", [1])])
    _refused(path, r"node 'outer' \(MatMul\) makes a tensor that grows faster than the batch")


def test_a_size_only_known_when_it_runs_is_refused(tmp_path: Path) -> None:
    nodes = [helper.make_node("NonZero", ["x"], ["where"], name="nonzero"),
             helper.make_node("ReduceSum", ["where"], ["count"], keepdims=0),
             helper.make_node("Cast", ["count"], ["scale"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["x", "scale"], ["y"])]
    _refused(_model(tmp_path / "nonzero.onnx", nodes),
             r"the size of what node 'nonzero' \(NonZero\) makes cannot be known before it runs")


def test_too_many_nodes_and_too_deep_subgraphs_are_refused(tmp_path: Path) -> None:
    chain = [helper.make_node("Identity", [f"t{i}" if i else "x"], [f"t{i + 1}" if i < 199 else "y"]) for i in range(200)]
    _refused(_model(tmp_path / "long.onnx", chain), r"has over 100 nodes, the limit", max_nodes=100)

    def nested(depth: int) -> onnx.GraphProto:
        out = helper.make_tensor_value_info(f"o{depth}", TensorProto.FLOAT, [1])
        if depth == 0:
            return helper.make_graph([helper.make_node("Constant", [], ["o0"], value=helper.make_tensor(
                "c", TensorProto.FLOAT, [1], [1.0]))], "leaf", [], [out])
        sub = nested(depth - 1)
        node = helper.make_node("If", ["cond"], [f"o{depth}"], then_branch=sub, else_branch=sub)
        return helper.make_graph([node], f"level{depth}", [], [out])

    deep = nested(12)
    nodes = [helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
             helper.make_node("Greater", ["m", "zero"], ["cond"]), *deep.node,
             helper.make_node("Add", ["x", "o12"], ["y"])]
    _refused(_model(tmp_path / "deep.onnx", nodes, [numpy_helper.from_array(np.float32(0), "zero")]),
             r"subgraphs nest 9 deep, over the limit of 8")


def test_the_sandbox_time_limit_stops_a_slow_model(tmp_path: Path) -> None:
    # 64 MB made at run time from a tiny file, then 2,000 matrix products: minutes of work, cut at 1 s
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["W"], value=helper.make_tensor("v", TensorProto.FLOAT,
                                                                                            [1], [1e-3]))]
    nodes += [helper.make_node("MatMul", [f"h{i}" if i else "x", "W"], [f"h{i + 1}" if i < 1999 else "y"])
              for i in range(2000)]
    path = _model(tmp_path / "slow.onnx", nodes, [_const("shape", [4096, 4096])],
                  inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4096])],
                  outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4096])])
    _refused(path, r"converting it took longer than 1 s, the time limit", time_limit=1.0)
    assert onnx_sandbox.last_child()["seconds"] < 10


def test_the_sandbox_memory_limit_stops_what_the_estimate_misses(tmp_path: Path) -> None:
    # the estimate counts tensors, not a runtime's work space: torch materializes both operands of a
    # broadcast matrix product (1.6 GB each here, for a 0.5 GB operand and a 4 MB result); the child
    # runs out of its memory, not the parent's
    k, m = 4096, 32768
    nodes = [helper.make_node("Reshape", ["x", "rows"], ["a"]),
             helper.make_node("ConstantOfShape", ["bshape"], ["b"], value=helper.make_tensor(
                 "v", TensorProto.FLOAT, [1], [1e-3])),
             helper.make_node("MatMul", ["a", "b"], ["prod"]), helper.make_node("ReduceSum", ["prod", "axes"], ["y"], keepdims=0)]
    path = _model(tmp_path / "broadcast.onnx", nodes,
                  [_const("rows", [-1, 1, 1, k]), _const("bshape", [1, m, k, 1]), _const("axes", [2, 3])],
                  inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
                  outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", m])])
    _refused(path, r"converting and running it at batch 3 needs more than 0.734 GB, the memory limit",
             memory_limit=700 * 1024**2)
    assert 0.5e9 < onnx_sandbox.last_child()["peak"] < 2 * GiB  # it got as far as the 0.5 GB operand


# --- types ---------------------------------------------------------------------------------------------


def _if_with_branch_initializer(dtype: int) -> list:
    branch_init = helper.make_tensor("deep", dtype, [4], [1, 2, 3, 4] if dtype != TensorProto.BFLOAT16 else [0] * 4)
    then = helper.make_graph([helper.make_node("Identity", ["deep"], ["o"])], "then", [],
                             [helper.make_tensor_value_info("o", dtype, [4])], [branch_init])
    return [helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
            helper.make_node("Greater", ["m", "zero"], ["cond"]),
            helper.make_node("If", ["cond"], ["picked"], then_branch=then, else_branch=then),
            helper.make_node("Cast", ["picked"], ["f"], to=TensorProto.FLOAT), helper.make_node("Add", ["x", "f"], ["y"])]


@pytest.mark.parametrize("case", ["bfloat16 input", "float8 cast", "bfloat16 in a subgraph", "float8 constant"])
def test_bfloat16_and_float8_anywhere_are_one_line(case: str, tmp_path: Path) -> None:
    zero = numpy_helper.from_array(np.float32(0), "zero")
    if case == "bfloat16 input":
        nodes = [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)]
        path = _model(tmp_path / "m.onnx", nodes, inputs=[helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["N", 4])])
    elif case == "float8 cast":
        nodes = [helper.make_node("Cast", ["x"], ["f8"], to=TensorProto.FLOAT8E4M3FN, name="to f8"),
                 helper.make_node("Cast", ["f8"], ["y"], to=TensorProto.FLOAT)]
        path = _model(tmp_path / "m.onnx", nodes, opset=19, ir=9)
    elif case == "bfloat16 in a subgraph":
        path = _model(tmp_path / "m.onnx", _if_with_branch_initializer(TensorProto.BFLOAT16), [zero])
    else:
        nodes = [helper.make_node("Constant", [], ["k"], value=helper.make_tensor("k", TensorProto.FLOAT8E5M2, [4], [1, 2, 3, 4])),
                 helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT), helper.make_node("Add", ["x", "kf"], ["y"])]
        path = _model(tmp_path / "m.onnx", nodes, opset=19, ir=9)
    _refused(path, r"is (bfloat16|float8e4m3fn|float8e5m2); structadmm converts float32")


# --- external data --------------------------------------------------------------------------------------


def _external(folder: Path, location: str, *, where: str = "initializer") -> Path:
    """A model whose 'scale' (4 floats, in 'data.bin' beside it) is stored externally at ``location``, held as an
    initializer, a Constant node's value, or an initializer of an If branch."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.bin").write_bytes(np.full(4, 2.0, np.float32).tobytes())
    tensor = numpy_helper.from_array(np.full(4, 2.0, np.float32), "scale")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        tensor.external_data.add(key=key, value=value)
    if where == "initializer":
        return _model(folder / "m.onnx", [helper.make_node("Mul", ["x", "scale"], ["y"])], [tensor])
    if where == "constant":
        node = helper.make_node("Constant", [], ["scale"])
        node.attribute.add(name="value", type=onnx.AttributeProto.TENSOR).t.CopyFrom(tensor)
        return _model(folder / "m.onnx", [node, helper.make_node("Mul", ["x", "scale"], ["y"])])
    then = helper.make_graph([helper.make_node("Identity", ["scale"], ["o"])], "then", [],
                             [helper.make_tensor_value_info("o", TensorProto.FLOAT, [4])], [tensor])
    nodes = [helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0), helper.make_node("Greater", ["m", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["s"], then_branch=then, else_branch=then),
             helper.make_node("Mul", ["x", "s"], ["y"])]
    return _model(folder / "m.onnx", nodes, [numpy_helper.from_array(np.float32(0), "zero")])


@pytest.mark.parametrize("where", ["initializer", "constant", "subgraph"])
def test_external_data_beside_the_file_is_read_wherever_it_is_held(where: str, tmp_path: Path, monkeypatch) -> None:
    path = _external(tmp_path / "model", "data.bin", where=where)
    monkeypatch.chdir(tmp_path)  # relative to the file's folder, not the current one
    checked = onnx_guard.read_model(path)
    tensors = [t for t in onnx_guard.all_tensors(checked.proto.graph) if list(t.dims) == [4]]
    assert tensors and all(numpy_helper.to_array(t).tolist() == [2.0] * 4 and not t.external_data for t in tensors)
    if where == "subgraph":  # read and checked, then refused by name: onnx2torch has no If
        _refused(path, r"op If \(opset 13\) cannot be converted")
        return
    x = torch.randn(2, 4)
    assert torch.allclose(load_onnx_model(path, **LIMITS).module(x), 2 * x)


@pytest.mark.parametrize("where", ["initializer", "constant", "subgraph"])
def test_external_data_outside_the_folder_is_refused_wherever_it_is_held(where: str, tmp_path: Path,
                                                                         monkeypatch) -> None:
    (tmp_path / "secret.bin").write_bytes(np.full(4, 7.0, np.float32).tobytes())
    path = _external(tmp_path / "model", "../secret.bin", where=where)
    monkeypatch.chdir(tmp_path / "model")
    _refused(path, r"outside the file's folder")


def test_symlinks_that_leave_the_folder_or_loop_are_refused(tmp_path: Path) -> None:
    (tmp_path / "secret.bin").write_bytes(np.full(4, 7.0, np.float32).tobytes())
    path = _external(tmp_path / "model", "link.bin")
    (tmp_path / "model" / "link.bin").symlink_to(tmp_path / "secret.bin")
    _refused(path, r"points its external data at 'link.bin', outside the file's folder")
    path = _external(tmp_path / "loop", "a.bin")
    (tmp_path / "loop" / "a.bin").symlink_to(tmp_path / "loop" / "b.bin")
    (tmp_path / "loop" / "b.bin").symlink_to(tmp_path / "loop" / "a.bin")
    _refused(path, r"external data 'a.bin' is a symlink loop")
    path = _external(tmp_path / "inside", "alias.bin")  # a symlink that stays inside is followed
    (tmp_path / "inside" / "alias.bin").symlink_to(tmp_path / "inside" / "data.bin")
    assert load_onnx_model(path, **LIMITS).module(torch.ones(1, 4)).tolist() == [[2.0] * 4]


@pytest.mark.parametrize("location,pattern", [
    ("data\x00.bin", r"holds a NUL character"),
    ("d" * 300, r"with 300 characters, over the limit of 255"),
    ("", r"names no location"),
    ("/etc/passwd", r"outside the file's folder"),
    (".", r"not a regular file"),
])
def test_bad_external_data_locations_are_one_line(location: str, pattern: str, tmp_path: Path) -> None:
    _refused(_external(tmp_path, location), pattern)


def test_external_data_that_is_a_fifo_or_too_short_is_refused(tmp_path: Path) -> None:
    path = _external(tmp_path / "fifo", "pipe.bin")
    os.mkfifo(tmp_path / "fifo" / "pipe.bin")  # opening it for reading would wait for a writer forever
    _refused(path, r"'pipe.bin' is not a regular file")
    path = _external(tmp_path / "short", "data.bin")
    (tmp_path / "short" / "data.bin").write_bytes(b"\0" * 8)
    _refused(path, r"reads bytes 0..16 of 'data.bin', which has 8")
    model = onnx.load(path, load_external_data=False)
    model.graph.initializer[0].external_data[1].value = "-8"
    onnx.save(model, path)
    _refused(path, r"gives its external data the offset '-8', not a byte count")


# --- the file itself, and what converts it ------------------------------------------------------------------


def test_a_file_of_2_gb_or_more_is_one_line(tmp_path: Path, monkeypatch) -> None:
    path = _model(tmp_path / "m.onnx", [helper.make_node("Relu", ["x"], ["y"])])
    real = os.fstat

    def looks_huge(fd):
        info = real(fd)
        return os.stat_result((*info[:6], 2 * GiB, *info[7:]))

    monkeypatch.setattr(os, "fstat", looks_huge)
    _refused(path, r"is 2.1 GB; an ONNX file of 2 GB or more cannot be parsed", max_bytes=4 * GiB)


def test_a_model_path_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.onnx")
    _refused(tmp_path / "pipe.onnx", r"is not a regular file")
    _refused(Path("/dev/zero"), r"is not a regular file")


def test_a_subgraph_that_reads_outer_values_and_odd_domains_convert_renamed(tmp_path: Path) -> None:
    # the file spells the standard domain 'ai.onnx' and names nodes like modules ('a.b'), as exporters do
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="block.0.relu", domain="ai.onnx"),
             helper.make_node("Mul", ["r", "two"], ["y"], name="block.0.mul")]
    path = _model(tmp_path / "m.onnx", nodes, [numpy_helper.from_array(np.full(4, 2.0, np.float32), "two")])
    module = load_onnx_model(path, **LIMITS).module
    assert {n for n, _ in module.named_children()} >= {"n0_block_0_relu", "n1_block_0_mul"}


def test_onnx2torch_missing_names_the_extra(tmp_path: Path, monkeypatch) -> None:
    import sys

    path = _model(tmp_path / "m.onnx", [helper.make_node("Relu", ["x"], ["y"])])
    monkeypatch.setitem(sys.modules, "onnx2torch", None)  # as if not installed
    _refused(path, r"needs onnx2torch.*pip install 'structadmm\[cpu\]'")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--model", str(path), "--out", str(out)])
    assert result.exit_code == 2 and "structadmm[cpu]" in result.output and "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize("case", ["constant of shape", "nul location", "bfloat16", "symlink loop"])
def test_cli_refuses_hostile_files_with_exit_2_and_writes_nothing(case: str, tmp_path: Path) -> None:
    expected = {"constant of shape": "ConstantOfShape", "nul location": "NUL", "bfloat16": "bfloat16",
                "symlink loop": "symlink loop"}[case]
    if case == "constant of shape":
        nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"], value=helper.make_tensor(
            "v", TensorProto.FLOAT, [1], [1.0])), helper.make_node("ReduceSum", ["big"], ["t"], keepdims=0),
                 helper.make_node("Add", ["x", "t"], ["y"])]
        path = _model(tmp_path / "m.onnx", nodes, [_const("shape", [1, 3, 65536, 65536])])
    elif case == "nul location":
        path = _external(tmp_path / "model", "a\x00b")
    elif case == "bfloat16":
        path = _model(tmp_path / "m.onnx", [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
                      inputs=[helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["N", 4])])
    else:
        path = _external(tmp_path / "model", "a.bin")
        (tmp_path / "model" / "a.bin").symlink_to(tmp_path / "model" / "a.bin")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--model", str(path), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert "Traceback" not in result.output and "internal error" not in result.output
    assert len(result.output.strip().splitlines()) <= 3  # one line (rich may wrap it)
    assert not out.exists()

"""Converting a checked ONNX model to PyTorch: onnx2torch, then the wrappers it leaves swapped for
plain ``torch.nn`` layers the channel tracer and surgery know.

This is the conversion code both the sandboxed child (:mod:`.onnx_sandbox`, which tries it first
under limits) and the parent (:mod:`.onnx_input`, which converts the same bytes once the child has
passed them) run; the checks that decide whether a file gets here are in :mod:`.onnx_input` and
:mod:`.onnx_guard`.
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import onnx
import torch
import torch.fx
from onnx import numpy_helper
from torch import nn

from ..errors import ParityError, StructADMMError, one_line
from ..exporters import OnnxSignature, onnx_signature, verify_onnx
from .onnx_guard import (
    FILE_MARK,
    STANDARD_DOMAINS,
    all_nodes,
    assert_safe,
    infer_folded,
    op_name,
    rename_added,
    without_weight_data,
)

#: Oldest opset tried when onnx2torch lags the file's opset.
_OLDEST_OPSET = 9

# onnx2torch's Slice indexes with a list, which torch deprecates with a warning on every forward
# pass of a converted model: noise to a user, about code that is not theirs or ours
warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing",
                        category=UserWarning, module="onnx2torch")


def example_batch(model: OnnxSignature | onnx.ModelProto, shapes: Sequence[Sequence[int]], batch: int,
                  seed: int) -> tuple[torch.Tensor, ...]:
    """Seeded inputs for ``model`` (a signature, or a proto whose signature it is): ``batch`` samples
    of ``shapes[i]`` for input ``i``."""
    signature = onnx_signature(model) if isinstance(model, onnx.ModelProto) else model
    generator = torch.Generator().manual_seed(seed)
    inputs = []
    for spec, shape in zip(signature.inputs, shapes):
        dtype = np.dtype(spec.dtype)
        if np.issubdtype(dtype, np.floating):
            inputs.append(torch.randn((batch, *shape), generator=generator).to(torch.from_numpy(np.zeros(0, dtype)).dtype))
        elif dtype == np.bool_:
            inputs.append(torch.randint(0, 2, (batch, *shape), generator=generator).bool())
        elif np.issubdtype(dtype, np.integer):  # token ids, indices: the valid range is unknown; 0 and 1 are safe
            inputs.append(torch.randint(0, 2, (batch, *shape), generator=generator).to(
                torch.from_numpy(np.zeros(0, dtype)).dtype))
        else:
            raise StructADMMError(f"input {spec.name!r} is {spec.dtype}; structadmm feeds numeric inputs only")
    return tuple(inputs)


# --- conversion -----------------------------------------------------------------------------------


def clear_inert_allowzero(proto: onnx.ModelProto, path: str | Path) -> onnx.ModelProto:
    """``proto``, changed in place: ``allowzero=1`` removed from every Reshape whose shape is a constant
    with no 0 entry.

    ``allowzero`` only decides what a 0 in the shape means (copy the input's dimension, or a
    dimension of size 0), so without a 0 it has no effect (ONNX spec, Reshape-14) and clearing
    it is exact. onnx2torch converts ``allowzero=0`` only; the dynamo exporter writes ``allowzero=1``
    on every Reshape. One line where it does matter: a constant shape with a 0, or a shape
    computed at run time.
    """
    constants = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer if len(t.dims) == 1}
    for node in all_nodes(proto.graph):
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name in ("value", "value_ints"):
            attr = node.attribute[0]
            constants[node.output[0]] = numpy_helper.to_array(attr.t) if attr.name == "value" else np.array(attr.ints)
    for node in all_nodes(proto.graph):
        if node.op_type != "Reshape" or node.domain not in STANDARD_DOMAINS:
            continue
        flag = next((a for a in node.attribute if a.name == "allowzero"), None)
        if flag is None or flag.i == 0:
            continue
        where = f"{path}: Reshape {node.name or repr(node.output[0])} has allowzero=1"
        if len(node.input) < 2 or node.input[1] not in constants:
            raise StructADMMError(f"{where} with a shape computed at run time; onnx2torch converts allowzero=0 only")
        shape = constants[node.input[1]]
        if (shape == 0).any():
            raise StructADMMError(
                f"{where} and a 0 in its shape {shape.tolist()} (a dimension of size 0); onnx2torch converts "
                "allowzero=0 only"
            )
        node.attribute.remove(flag)
    return proto


def fold_constant_reshapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto``, changed in place: every main-graph Identity, Reshape, Flatten, Squeeze and Unsqueeze of
    an initializer by constant arguments replaced by an initializer holding its result.

    Paddle2ONNX writes a conv's bias as ``Add(conv, Reshape(bias, [1, C, 1, 1]))``: folded, the Add
    reads a per-channel constant that surgery slices with the conv's filters, where a Reshape left
    in the module would keep the literal C; torch's exporter shares a weight between layers through
    Identity nodes, where onnx2torch looks for a layer's weight among the initializers. Only the
    layout of the initializer's data changes (the same elements), computed with numpy.
    """
    graph = proto.graph
    if proto.ir_version < 4:
        return proto
    opset = next((o.version for o in proto.opset_import if o.domain in STANDARD_DOMAINS), 0)
    known = {t.name: t for t in graph.initializer}
    readers: dict[str, int] = {}
    for node in all_nodes(graph):
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {v.name for v in graph.output}
    kept = []
    for node in graph.node:
        result = None
        if (node.op_type in ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze") and node.domain in STANDARD_DOMAINS
                and len(node.output) == 1 and node.output[0] and node.output[0] not in outputs
                and node.output[0] not in known and node.input and all(not n or n in known for n in node.input)):
            try:
                result = _folded(node, [numpy_helper.to_array(known[n]) if n else None for n in node.input], opset)
            except (ValueError, IndexError, TypeError):
                result = None
        if result is None:
            kept.append(node)
            continue
        tensor = numpy_helper.from_array(np.ascontiguousarray(result), node.output[0])
        graph.initializer.append(tensor)
        known[tensor.name] = tensor
    if len(kept) != len(graph.node):
        del graph.node[:]
        graph.node.extend(kept)
        used = {n for node in all_nodes(graph) for n in node.input} | outputs
        unread = [t for t in graph.initializer if t.name not in used and readers.get(t.name)]
        for tensor in unread:  # initializers only the folded nodes read
            graph.initializer.remove(tensor)
    return proto


def _folded(node: onnx.NodeProto, args: list, opset: int) -> np.ndarray | None:
    """What the Reshape, Flatten, Squeeze or Unsqueeze ``node`` makes of the constant ``args`` (numpy)."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    data = args[0]
    if data is None:
        return None
    if node.op_type == "Identity":
        return data
    if node.op_type == "Reshape":
        if len(args) < 2 or args[1] is None or args[1].ndim != 1:
            return None
        shape = [int(d) for d in args[1]]
        if not attrs.get("allowzero", 0):
            shape = [data.shape[i] if d == 0 and i < data.ndim else d for i, d in enumerate(shape)]
        return data.reshape(shape)
    if node.op_type == "Flatten":
        axis = int(attrs.get("axis", 1))
        axis = axis + data.ndim if axis < 0 else axis
        return data.reshape(math.prod(data.shape[:axis]), -1)
    axes = attrs.get("axes") if opset < 13 else (None if len(args) < 2 or args[1] is None else args[1].tolist())
    if node.op_type == "Squeeze":
        if axes is None:
            return data.reshape([d for d in data.shape if d != 1])
        return np.squeeze(data, tuple(int(a) for a in axes))
    if axes is None:
        return None
    rank = data.ndim + len(axes)
    out = data
    for axis in sorted(int(a) + rank if int(a) < 0 else int(a) for a in axes):
        out = np.expand_dims(out, axis)
    return out


def _with_ranks(proto: onnx.ModelProto, example: tuple[torch.Tensor, ...], where: str | Path) -> onnx.ModelProto:
    """``proto`` with a value info for every node output the file gives none (or one without a rank) for:
    onnx2torch reads the input ranks of BatchNormalization, pools and norms from them, and Paddle2ONNX
    files carry none. They come from the checks' own shape inference (:func:`~.onnx_guard.infer_folded`,
    run in the sandbox first) at the shapes of ``example``, with the batch axis left dynamic."""
    graph = proto.graph
    have = {v.name for v in graph.value_info if v.type.tensor_type.HasField("shape")}
    wanted = {n for node in graph.node for n in node.output if n and n not in have}
    if not wanted or not example:
        return proto
    initializers = {t.name for t in graph.initializer}
    inputs = [v.name for v in graph.input if v.name not in initializers]
    try:
        inferred = infer_folded(without_weight_data(proto), inputs, [tuple(t.shape[1:]) for t in example],
                                example[0].shape[0], str(where))
    except StructADMMError:
        return proto  # conversion says what it misses
    for value in inferred.graph.value_info:
        if value.name in wanted and value.type.tensor_type.HasField("shape"):
            added = graph.value_info.add()
            added.CopyFrom(value)
            dims = added.type.tensor_type.shape.dim
            if len(dims):
                dims[0].Clear()
    return proto


def _at_convertible_opset(proto: onnx.ModelProto, path: str | Path) -> onnx.ModelProto:
    """``proto`` itself when onnx2torch converts every op at its opset, else moved to the newest
    opset at which it does; one line naming the op when there is none."""
    opset = next((o.version for o in proto.opset_import if o.domain in STANDARD_DOMAINS), None)
    if opset is None:
        raise StructADMMError(f"{path} imports no standard ONNX opset")
    missing = _unconvertible(proto, opset)
    if not missing:
        return proto
    from onnx import version_converter

    for target in range(opset - 1, _OLDEST_OPSET - 1, -1):
        if _unconvertible(proto, target):
            continue
        try:
            moved = version_converter.convert_version(proto, target)
        except Exception:  # noqa: BLE001 - the converter cannot move this graph: try an older opset
            continue
        if not _unconvertible(moved, target):
            return moved
    op, version = op_name(missing[0][0]), missing[0][1]
    more = f" (and {', '.join(op_name(o) for o, _ in missing[1:4])})" if len(missing) > 1 else ""
    raise StructADMMError(
        f"{path}: op {op} (opset {version}) cannot be converted to PyTorch: onnx2torch has no converter for it{more}"
    )


#: ONNX op versions newer than onnx2torch's that only widened the element types accepted
#: (float8 in 19, int4 in 21; Cast-19's saturate applies to float8 alone): the older
#: version's converter is exact for every type it converts. The ONNX Runtime check is the backstop.
_TYPE_ONLY_VERSIONS = {
    "Cast": (19, 21), "Constant": (19, 21), "Identity": (19, 21), "Reshape": (19, 21), "Shape": (19, 21),
    "Size": (19, 21), "Flatten": (21,), "Transpose": (21,), "Squeeze": (21,), "Unsqueeze": (21,),
}


#: ONNX op versions newer than onnx2torch's whose new attributes, at their defaults, leave the op as
#: the older version computes it: the older converter is used where the node keeps them so.
_SAME_AT_DEFAULTS = {
    ("Split", 18): {"num_outputs": None},  # num_outputs: the number of outputs, which the converter counts
    ("Resize", 18): {"antialias": 0, "axes": None, "keep_aspect_ratio_policy": "stretch"},
    ("Resize", 19): {"antialias": 0, "axes": None, "keep_aspect_ratio_policy": "stretch"},
}


def _at_defaults(older, new_attributes: dict, op: str, version: int):
    def convert(node, graph):
        for name, default in new_attributes.items():
            value = node.attributes.get(name, default)
            if name == "num_outputs" and value == len(node.output_values):
                continue
            if value != default and not (isinstance(value, bytes) and value.decode(errors="replace") == default):
                raise NotImplementedError(f"{op}-{version} with {name}={value!r}")
        if op == "Resize" and node.attributes.get("coordinate_transformation_mode") == "half_pixel_symmetric":
            raise NotImplementedError(f"{op}-{version} with coordinate_transformation_mode='half_pixel_symmetric'")
        return older(node, graph)
    return convert


def _register_type_only_versions() -> None:
    from onnx2torch.node_converters.registry import add_converter, get_converter

    for (op, version), attributes in _SAME_AT_DEFAULTS.items():
        try:
            get_converter(operation_type=op, version=version)
            continue
        except NotImplementedError:
            pass
        older = next((c for v in range(version - 1, 0, -1) for c in [_converter_or_none(op, v)] if c), None)
        if older is not None:
            add_converter(operation_type=op, version=version)(_at_defaults(older, attributes, op, version))

    for op, versions in _TYPE_ONLY_VERSIONS.items():
        for version in versions:
            try:
                get_converter(operation_type=op, version=version)
                continue  # onnx2torch has it (a newer onnx2torch)
            except NotImplementedError:
                pass
            try:
                older = get_converter(operation_type=op, version=version - 1)
            except NotImplementedError:
                continue
            add_converter(operation_type=op, version=version)(older)


def _converter_or_none(op: str, version: int):
    from onnx2torch.node_converters.registry import get_converter

    try:
        return get_converter(operation_type=op, version=version)
    except NotImplementedError:
        return None


def _unconvertible(proto: onnx.ModelProto, opset: int) -> list[tuple[str, int]]:
    from onnx2torch.node_converters.registry import get_converter

    _register_type_only_versions()
    missing: dict[str, int] = {}
    for node in all_nodes(proto.graph):
        try:
            get_converter(operation_type=node.op_type, version=opset, domain=node.domain)
        except NotImplementedError:
            missing.setdefault(node.op_type, opset)
    return list(missing.items())


def convert(proto: onnx.ModelProto, where: str | Path, example: tuple[torch.Tensor, ...]) -> nn.Module:
    """The renamed model ``proto`` (from :func:`~.onnx_guard.read_model`) as an fx module, its global
    average pools made ``torch.nn`` ones on ``example``; one line naming the op or the converter's
    complaint where it cannot be converted. Changes ``proto`` (see :func:`clear_inert_allowzero`).
    The sandboxed child and the parent both convert with this."""
    proto = _at_convertible_opset(clear_inert_allowzero(fold_constant_reshapes(proto), where), where)
    module = _onnx2torch(_with_ranks(proto, example, where), where)
    global_pools(module, example)
    return module


def _onnx2torch(proto: onnx.ModelProto, where: str | Path) -> nn.Module:
    import onnx2torch

    rename_added(proto)  # names the version converter added
    assert_safe(proto)  # only names read_model gave reach the source torch.fx writes and runs
    try:
        with _initializers_once():
            module = onnx2torch.convert(proto).eval()
    except Exception as exc:  # noqa: BLE001 - an attribute or case the converter does not cover
        raise StructADMMError(f"{where}: onnx2torch cannot convert it: {one_line(exc)}") from exc
    _own_parameters(module)
    return module


_ONCE = threading.Lock()


@contextlib.contextmanager
def _initializers_once() -> Iterator[None]:
    """onnx2torch converts an initializer to a tensor once, however many nodes read it.

    onnx2torch makes a new tensor (a copy of the data) for every use of an initializer: for
    every node that reads it as an input, and for every layer that takes it as its weight (one
    16 MB initializer read by 1,500 nodes took 24 GB). Its ``OnnxTensor.to_torch`` is made to
    return a view of the tensor it made the first time, for as long as this lasts (a new view each
    time: onnx2torch numbers its buffers by counting distinct tensors).
    """
    from onnx2torch.onnx_tensor import OnnxTensor

    def to_torch(self: OnnxTensor) -> torch.Tensor:
        made = self.__dict__.get("_structadmm_tensor")
        if made is None:
            made = self.__dict__["_structadmm_tensor"] = original(self)
        return made.view_as(made)

    with _ONCE:
        original = OnnxTensor.to_torch
        OnnxTensor.to_torch = to_torch
        try:
            yield
        finally:
            OnnxTensor.to_torch = original


def _own_parameters(module: nn.Module) -> None:
    """Give every layer's parameters and buffers that share data with another tensor of the module a copy
    of their own (the constants the graph reads, ``get_attr``, stay shared): pruning changes a layer's
    weights in place. What the copies take is bounded before conversion (:func:`~.onnx_guard.check_sizes`)."""
    read = {str(node.target) for node in module.graph.nodes if node.op == "get_attr"}  # the shared constants
    shared: dict[int, list[tuple[nn.Module, str, bool]]] = {}
    constants = set()
    for prefix, owner in module.named_modules():
        for name, tensor in [*owner.named_parameters(recurse=False), *owner.named_buffers(recurse=False)]:
            if tensor is None or tensor.numel() == 0:
                continue
            key = tensor.untyped_storage().data_ptr()
            if (f"{prefix}.{name}" if prefix else name) in read:
                constants.add(key)
            else:
                shared.setdefault(key, []).append((owner, name, isinstance(tensor, nn.Parameter)))
    for key, users in shared.items():
        for owner, name, is_parameter in users[0 if key in constants else 1:]:
            tensor = getattr(owner, name)
            with torch.no_grad():
                copy = tensor.detach().clone()
            setattr(owner, name, nn.Parameter(copy, requires_grad=tensor.requires_grad) if is_parameter else copy)


def check_against_runtime(module: nn.Module, model: bytes, inputs: tuple[torch.Tensor, ...],
                           atol: float, rtol: float) -> None:
    try:
        verify_onnx(module, FILE_MARK, inputs, atol=atol, rtol=rtol, model_bytes=model)
    except ParityError as exc:
        raise ParityError(f"the PyTorch conversion of {FILE_MARK} does not compute what ONNX Runtime does: {exc}") from exc
    except StructADMMError:
        raise
    except Exception as exc:  # noqa: BLE001 - the converted module failed to run
        raise StructADMMError(
            f"the PyTorch conversion of {FILE_MARK} fails at batch {inputs[0].shape[0]}: {type(exc).__name__}: "
            f"{one_line(exc)}"
        ) from exc


# --- onnx2torch wrappers → torch.nn layers ---------------------------------------------------------


def replace_wrappers(module: nn.Module, example: tuple[torch.Tensor, ...]) -> nn.Module:
    """Swap onnx2torch wrapper modules for the equivalent ``torch.nn`` layers, in place.

    (Global average pools are ``nn.AdaptiveAvgPool{1,2,3}d(1)`` already: :func:`global_pools`.)

    * A functional ``OnnxBatchNorm`` (emitted where the file shares or copies its statistics
      through Identity nodes, as the legacy exporter does at old opsets) whose statistics are
      constants becomes an ``nn.BatchNorm{1,2,3}d`` with its own copy of them, which surgery can slice.
    * onnx2torch's Reshape, Slice, Squeeze and Unsqueeze read their shape, bounds or axes from
      tensors at run time, which the channel tracer (built on torch.export) cannot follow. Where
      those are constants: a Reshape that flattens each sample becomes ``nn.Flatten``, one that
      splits or merges the dims after the batch a :class:`SplitMergeReshape` (both follow a pruned
      channel count), any other a :class:`StaticReshape`; a Slice that takes one of n equal parts
      of an axis becomes a :class:`ChunkSlice` (what ``torch.chunk`` exports to), any other a
      :class:`StaticSlice`; a Squeeze or Unsqueeze, onnx2torch's own static-axes module.
    * ``HardSigmoid(1/6, 1/2)`` becomes ``nn.Hardsigmoid``, which the tracer knows as elementwise.

    Each swap is kept only where the module's outputs on ``example`` are unchanged.
    """
    if isinstance(module, torch.fx.GraphModule):
        _own_batchnorms(module, example)
        _static_arguments(module, example)
        _static_resizes(module, example)
        _fold_shape_values(module, example)
    from onnx2torch.node_converters.activations import OnnxHardSigmoid

    swaps = {name: nn.Hardsigmoid() for name, sub in module.named_modules() if isinstance(sub, OnnxHardSigmoid)
             and math.isclose(sub.alpha, 1 / 6, rel_tol=1e-6) and math.isclose(sub.beta, 0.5, rel_tol=1e-6)}
    with torch.no_grad():
        reference = module(*example)
    for name, new in swaps.items():
        old = module.get_submodule(name)
        _set_submodule(module, name, new)
        with torch.no_grad():
            if not _same(reference, module(*example)):
                _set_submodule(module, name, old)
    return module


def global_pools(module: nn.Module, example: tuple[torch.Tensor, ...]) -> None:
    """onnx2torch's GlobalAveragePool modules become ``nn.AdaptiveAvgPool{1,2,3}d(1)``, in place.

    By the ONNX spec, GlobalAveragePool averages every axis after the channels, which is what
    the adaptive pools compute (and the channel tracer knows as spatial). onnx2torch's module
    averages every axis of the input instead where the file leaves the rank of the pool's input
    unknown (after a Reshape to a computed shape, say). Run before the check against ONNX Runtime,
    which then checks this too. Nothing is swapped where the module fails to run: the check says why.
    """
    from onnx2torch.node_converters.global_average_pool import (
        OnnxGlobalAveragePool,
        OnnxGlobalAveragePoolWithKnownInputShape,
    )

    pools = {3: nn.AdaptiveAvgPool1d, 4: nn.AdaptiveAvgPool2d, 5: nn.AdaptiveAvgPool3d}
    shapes: dict[str, tuple[int, ...]] = {}
    try:  # the pools reached before the module fails (as after a wrong pool) are recorded all the same
        _input_shapes(module, example, (OnnxGlobalAveragePool, OnnxGlobalAveragePoolWithKnownInputShape), shapes)
    except Exception:  # noqa: BLE001 - the check against ONNX Runtime reports a module that fails to run
        pass
    for name, rank in {name: len(shape) for name, shape in shapes.items()}.items():
        if rank in pools:
            _set_submodule(module, name, pools[rank](1))


def _own_batchnorms(module: torch.fx.GraphModule, example: tuple[torch.Tensor, ...]) -> None:
    from onnx2torch.node_converters.batch_norm import OnnxBatchNorm

    norms = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
    ranks = _input_ranks(module, example, (OnnxBatchNorm,))
    if not ranks:
        return
    with torch.no_grad():
        reference = module(*example)
    undo = []
    for node in module.graph.nodes:
        if node.op != "call_module" or node.target not in ranks or len(node.args) != 5 or node.kwargs:
            continue
        stats = [_constant(module, arg) for arg in node.args[1:]]
        if any(t is None for t in stats) or ranks[node.target] not in norms:
            continue
        old = module.get_submodule(node.target)
        weight, bias, mean, var = (t.detach().clone().float() for t in stats)
        norm = norms[ranks[node.target]](len(weight), eps=old.epsilon, momentum=old.momentum).eval()
        with torch.no_grad():
            norm.weight.copy_(weight), norm.bias.copy_(bias)
            norm.running_mean.copy_(mean), norm.running_var.copy_(var)
        undo.append((node, node.args, old))
        _set_submodule(module, node.target, norm)
        node.args = (node.args[0],)
    _keep_if_same(module, example, reference, undo)


class StaticReshape(nn.Module):
    """ONNX Reshape (``allowzero=0``) to a shape known when the graph is converted: a 0 copies the
    input's dimension at that index, a -1 is inferred."""

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.shape = tuple(int(d) for d in shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # copied sizes other than the batch as numbers: exported files keep their shapes inferable
        return x.reshape([(x.shape[0] if i == 0 else int(x.shape[i])) if d == 0 else d
                          for i, d in enumerate(self.shape)])

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


def _static_arguments(module: torch.fx.GraphModule, example: tuple[torch.Tensor, ...]) -> None:
    """``OnnxReshape``, ``OnnxSlice`` and ``Onnx(Un)SqueezeDynamicAxes`` nodes whose shape (starts,
    ends, axes, steps) are constants become layers that hold them as numbers."""
    from onnx2torch.node_converters.reshape import OnnxReshape
    from onnx2torch.node_converters.slice import OnnxSlice
    from onnx2torch.node_converters.squeeze import OnnxSqueezeDynamicAxes, OnnxSqueezeStaticAxes
    from onnx2torch.node_converters.unsqueeze import OnnxUnsqueezeDynamicAxes, OnnxUnsqueezeStaticAxes

    from onnx2torch.node_converters.split import OnnxSplit, OnnxSplit13

    types = (OnnxReshape, OnnxSlice, OnnxSqueezeDynamicAxes, OnnxUnsqueezeDynamicAxes, OnnxSplit13)
    shapes = _input_shapes(module, example, types)
    seen = _arguments_at_two_batches(module, example, types)
    with torch.no_grad():
        reference = module(*example)
    undo = []
    for node in module.graph.nodes:
        if node.op != "call_module" or node.target not in shapes or node.kwargs:
            continue
        old = module.get_submodule(str(node.target))
        values = [_fixed_value(module, arg, seen.get(str(node.target)), i, batch_first=isinstance(old, OnnxReshape))
                  for i, arg in enumerate(node.args[1:], 1)]
        if not values or any(v is None or v.dim() != 1 or v.dtype.is_floating_point for v in values):
            continue
        values = [v.tolist() for v in values]
        if isinstance(old, OnnxReshape) and len(values) == 1:
            new = _reshape_layer(values[0], shapes[node.target])
        elif isinstance(old, OnnxSlice) and len(values) in (2, 3, 4):
            starts, ends, axes, steps = (values + [None, None])[:4]
            axes = axes if axes is not None else list(range(len(starts)))
            steps = steps if steps is not None else [1] * len(starts)
            if min(steps, default=0) < 1 or not len(starts) == len(ends) == len(axes) == len(steps):
                continue  # reversed slices stay onnx2torch's
            new = _slice_layer(list(zip(axes, starts, ends, steps)), shapes[node.target])
        elif isinstance(old, OnnxSqueezeDynamicAxes) and len(values) == 1 and values[0]:
            new = OnnxSqueezeStaticAxes(axes=values[0])
        elif isinstance(old, OnnxUnsqueezeDynamicAxes) and len(values) == 1:
            new = OnnxUnsqueezeStaticAxes(axes=values[0])
        elif isinstance(old, OnnxSplit13) and len(values) == 1 and len(values[0]) == old.num_splits:
            parts = values[0]
            # equal parts as torch.chunk, which follows a pruned channel count
            new = (ChunkSplit(old.axis, len(parts)) if len(set(parts)) == 1 and old.axis % len(shapes[node.target])
                   else OnnxSplit(num_splits=old.num_splits, axis=old.axis, split=parts))
        else:
            continue
        undo.append((node, node.args, old))
        _set_submodule(module, str(node.target), new)
        node.args = (node.args[0],)
    _keep_if_same(module, example, reference, undo)


class StaticResize(nn.Module):
    """ONNX Resize (as onnx2torch converts it: ``F.interpolate`` on the axes after the channels) by
    constant scales or to constant sizes."""

    def __init__(self, mode: str, align_corners: bool | None, scale_factor: Sequence[float] | None = None,
                 size: Sequence[int] | None = None) -> None:
        super().__init__()
        self.mode, self.align_corners = str(mode), align_corners if align_corners is None else bool(align_corners)
        self.scale_factor = None if scale_factor is None else tuple(float(f) for f in scale_factor)
        self.size = None if size is None else tuple(int(d) for d in size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(x, size=self.size, scale_factor=self.scale_factor, mode=self.mode,
                                         align_corners=self.align_corners)

    def extra_repr(self) -> str:
        what = f"size={self.size}" if self.size is not None else f"scale_factor={self.scale_factor}"
        return f"{what}, mode={self.mode!r}, align_corners={self.align_corners}"


def _static_resizes(module: torch.fx.GraphModule, example: tuple[torch.Tensor, ...]) -> None:
    """onnx2torch's Resize modules whose scales or sizes are constants (or computed from shapes only,
    the same at two batch sizes after the channels) become :class:`StaticResize` layers: onnx2torch's
    read them from tensors at run time, which the channel tracer cannot follow."""
    from onnx2torch.node_converters.resize import OnnxResize, OnnxResizeV10, _onnx_mode_to_torch_mode

    types = (OnnxResize, OnnxResizeV10)
    shapes = _input_shapes(module, example, types)
    if not shapes:
        return
    seen = _arguments_at_two_batches(module, example, types)
    with torch.no_grad():
        reference = module(*example)
    undo = []
    for node in module.graph.nodes:
        if node.op != "call_module" or node.target not in shapes:
            continue
        old = module.get_submodule(str(node.target))
        inner = old._resize if isinstance(old, OnnxResizeV10) else old
        names = ("scales",) if isinstance(old, OnnxResizeV10) else ("roi", "scales", "sizes")
        args = {name: (i, arg) for i, (name, arg) in enumerate(zip(names, node.args[1:]), 1)}
        args.update({name: (name, arg) for name, arg in node.kwargs.items() if name in names})
        if len(args) != len(node.args) - 1 + len(node.kwargs):
            continue
        values = {}
        for name, (key, arg) in args.items():
            value = _fixed_value(module, arg, seen.get(str(node.target)), key, after_batch=name == "sizes")
            if value is None:
                break
            values[name] = value
        else:
            roi, scales, sizes = (values.get(k) for k in ("roi", "scales", "sizes"))
            if roi is not None and roi.numel() and not inner.ignore_roi:
                continue
            rank = len(shapes[node.target])
            try:
                mode = _onnx_mode_to_torch_mode(inner.onnx_mode, rank - 2)
            except NotImplementedError:
                continue
            if sizes is not None and sizes.numel():
                if sizes.numel() != rank:
                    continue
                new = StaticResize(mode, inner.align_corners, size=sizes.tolist()[2:])
            elif scales is not None and scales.numel() == rank and scales.tolist()[:2] == [1, 1]:
                new = StaticResize(mode, inner.align_corners, scale_factor=scales.tolist()[2:])
            else:
                continue
            undo.append((node, node.args, old, node.kwargs))
            _set_submodule(module, str(node.target), new)
            node.args, node.kwargs = (node.args[0],), {}
    _keep_if_same(module, example, reference, undo)


def _fold_shape_values(module: torch.fx.GraphModule, example: tuple[torch.Tensor, ...]) -> None:
    """Every value the module computes from its inputs' shapes only (:func:`_from_shapes_only`) and
    then mixes with data, the same at two batch sizes, becomes a constant buffer of the module: the
    anchor grids a detector builds with Shape, Range and Expand (Ultralytics' dynamic export), which
    torch.export cannot trace (their sizes come from tensors' values). Kept only where the module's
    outputs on ``example`` are unchanged."""
    from onnx2torch.node_converters.shape import OnnxShape

    graph = module.graph
    shape_only = {node for node in graph.nodes if node.op in ("call_module", "call_function", "call_method")
                  and not (node.op == "call_module" and isinstance(module.get_submodule(str(node.target)), OnnxShape))
                  and _from_shapes_only(module, node)}
    frontier = [node for node in shape_only if any(user not in shape_only for user in node.users)]
    if not frontier:
        return
    values = []
    one_more = tuple(torch.cat([t, t[:1]]) if t.dim() else t for t in example)
    for inputs in (example, one_more):
        recorder = _Recorder(module, set(frontier))
        try:
            with torch.no_grad():
                recorder.run(*inputs)
        except Exception:  # noqa: BLE001 - the module does not run at another batch: nothing folded
            return
        values.append(recorder.seen)
    with torch.no_grad():
        reference = module(*example)
    made = []
    for i, node in enumerate(frontier):
        a, b = values[0].get(node), values[1].get(node)
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.shape != b.shape or not torch.equal(a, b):
            continue
        name = f"shape_constant_{i}"
        while hasattr(module, name):
            name += "_"
        module.register_buffer(name, a.detach().clone())
        with graph.inserting_before(node):
            constant = graph.get_attr(name)
        node.replace_all_uses_with(constant)
        made.append((node, constant, name))
    if not made:
        return
    module.recompile()
    with torch.no_grad():
        same = _same(reference, module(*example))
    if not same:
        for node, constant, name in made:
            constant.replace_all_uses_with(node)
            graph.erase_node(constant)
            delattr(module, name)
        module.recompile()
        return
    graph.eliminate_dead_code()
    module.delete_all_unused_submodules()
    module.recompile()


class _Recorder(torch.fx.Interpreter):
    """Runs an fx module and keeps the values of the nodes asked for."""

    def __init__(self, module: torch.fx.GraphModule, wanted: set) -> None:
        super().__init__(module)
        self.wanted, self.seen = wanted, {}

    def run_node(self, n: torch.fx.Node):
        value = super().run_node(n)
        if n in self.wanted:
            self.seen[n] = value.detach().clone() if isinstance(value, torch.Tensor) else value
        return value


def _arguments_at_two_batches(module: torch.fx.GraphModule, example: tuple[torch.Tensor, ...],
                              types: tuple[type, ...]) -> dict[str, tuple[tuple, tuple, int, int]]:
    """The arguments every submodule of one of ``types`` is called with (first call) on ``example`` and
    on ``example`` with one more sample, and the two batch sizes, by submodule name."""
    batches = (example[0].shape[0], example[0].shape[0] + 1) if example and example[0].dim() else (0, 0)
    one_more = tuple(torch.cat([t, t[:1]]) if t.dim() else t for t in example)
    runs: list[dict[str, tuple]] = []
    for inputs in (example, one_more):
        calls: dict[str, tuple] = {}

        def record(name: str, calls: dict = calls):
            def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
                copy = {**dict(enumerate(args)), **kwargs}
                calls.setdefault(name, {k: a.detach().clone() if isinstance(a, torch.Tensor) else a
                                        for k, a in copy.items()})
            return hook

        handles = [sub.register_forward_pre_hook(record(name), with_kwargs=True)
                   for name, sub in module.named_modules() if isinstance(sub, types)]
        try:
            with torch.no_grad():
                module(*inputs)
        except Exception:  # noqa: BLE001 - a module that does not run at another batch: constants only
            return {}
        finally:
            for handle in handles:
                handle.remove()
        runs.append(calls)
    return {name: (args, runs[1][name], *batches) for name, args in runs[0].items() if name in runs[1]}


def _fixed_value(module: torch.fx.GraphModule, arg: object, seen: tuple | None, index: int | str,
                 batch_first: bool = False, after_batch: bool = False) -> torch.Tensor | None:
    """The value argument ``arg`` (the ``index``-th of its node, or its keyword) always holds: a constant (:func:`_constant`),
    or one computed from the shapes of tensors only (Shape, and arithmetic on it: what Paddle2ONNX and
    tf2onnx write for a Reshape to ``[batch, -1]``) that is the same at both batches in ``seen`` (see
    :func:`_arguments_at_two_batches`). With ``batch_first``, a 1-D shape whose first entry is the batch
    at both gives 0 there (a Reshape's "copy the input's dimension"); with ``after_batch``, a 1-D value
    whose entries after the first two are the same at both is that at the first batch (a Resize's sizes,
    whose batch and channel entries are not used). None where it is neither."""
    constant = _constant(module, arg)
    if constant is not None or seen is None or not _from_shapes_only(module, arg):
        return constant
    first, second, batch, more = seen
    a, b = (run.get(index) for run in (first, second))
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.shape != b.shape:
        return None
    if torch.equal(a, b) or (after_batch and a.dim() == 1 and torch.equal(a[2:], b[2:])):
        return a
    if (batch_first and a.dim() == 1 and len(a) > 1 and torch.equal(a[1:], b[1:]) and not a.dtype.is_floating_point
            and int(a[0]) == batch and int(b[0]) == more):
        return torch.cat([torch.zeros_like(a[:1]), a[1:]])
    return None


def _from_shapes_only(module: torch.fx.GraphModule, arg: object) -> bool:
    """Whether the fx value ``arg`` depends on the module's inputs through their shapes only (every path
    up from it to an input goes through an ONNX Shape), not on their values."""
    from onnx2torch.node_converters.shape import OnnxShape

    stack, seen = [arg], set()
    while stack:
        node = stack.pop()
        if not isinstance(node, torch.fx.Node) or node in seen:
            continue
        seen.add(node)
        if node.op == "get_attr":
            continue
        if node.op == "call_module" and isinstance(module.get_submodule(str(node.target)), OnnxShape):
            continue
        if node.op not in ("call_module", "call_function", "call_method"):
            return False
        stack.extend(node.all_input_nodes)
    return True


def _slice_layer(slices: list[tuple[int, int, int, int]], given: tuple[int, ...]) -> nn.Module:
    """The layer for a Slice with constant bounds of inputs shaped ``given``: a :class:`ChunkSlice`
    where it takes one of ``n`` equal parts of a non-batch axis (``x[:, 24:48]`` of 48 channels:
    what ``torch.chunk`` exports to), which follows the size of that axis; else a :class:`StaticSlice`."""
    if len(slices) == 1:
        axis, start, end, step = slices[0]
        size = given[axis] if -len(given) <= axis < len(given) else 0
        start, end = (min(max(b + size if b < 0 else b, 0), size) for b in (start, end))
        part = end - start
        if step == 1 and axis % len(given) != 0 and 0 < part < size and size % part == 0 and start % part == 0:
            return ChunkSlice(axis, size // part, start // part)
    return StaticSlice(slices)


class ChunkSlice(nn.Module):
    """Part ``index`` of ``chunks`` equal parts of ``axis``: ``torch.chunk(x, chunks, axis)[index]``."""

    def __init__(self, axis: int, chunks: int, index: int) -> None:
        super().__init__()
        self.axis, self.chunks, self.index = int(axis), int(chunks), int(index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.chunk(x, self.chunks, self.axis)[self.index]

    def extra_repr(self) -> str:
        return f"axis={self.axis}, chunks={self.chunks}, index={self.index}"


class ChunkSplit(nn.Module):
    """ONNX Split of ``axis`` into ``chunks`` equal parts: ``torch.chunk(x, chunks, axis)``."""

    def __init__(self, axis: int, chunks: int) -> None:
        super().__init__()
        self.axis, self.chunks = int(axis), int(chunks)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.chunk(x, self.chunks, self.axis)

    def extra_repr(self) -> str:
        return f"axis={self.axis}, chunks={self.chunks}"


class StaticSlice(nn.Module):
    """ONNX Slice with constant starts, ends, axes and positive steps, as ``x[start:end:step]`` per axis
    (the same clamping of out-of-range bounds as ONNX)."""

    def __init__(self, slices) -> None:
        super().__init__()
        self.slices = tuple((int(a), int(start), int(end), int(step)) for a, start, end, step in slices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = [slice(None)] * x.dim()
        for axis, start, end, step in self.slices:
            index[axis] = slice(start, end, step)
        return x[tuple(index)]

    def extra_repr(self) -> str:
        return ", ".join(f"axis {a}: {start}:{end}:{step}" for a, start, end, step in self.slices)


def _reshape_layer(shape: list[int], given: tuple[int, ...]) -> nn.Module:
    """The layer for a Reshape to the constant ``shape`` of inputs shaped ``given`` (batch first):
    ``nn.Flatten()`` where it flattens each sample (``[-1, C*H*W]``, ``[0, -1]``); a
    :class:`SplitMergeReshape` where it keeps the batch and splits or merges the dims between a
    kept prefix and suffix (a channel shuffle's ``[-1, g, C/g, H, W]``); else a :class:`StaticReshape`.
    The first two are exact for every batch size (the other axes of the file's inputs are fixed)
    and follow the channel count when surgery changes it."""
    if len(shape) == 2 and len(given) >= 2 and shape[0] in (0, -1) and (
            shape[1] == math.prod(given[1:]) or shape == [0, -1]):
        return nn.Flatten()
    out = _resolved(shape, given)
    if out is None or not given or shape[0] not in (0, -1) or out[0] != given[0]:
        return StaticReshape(shape)
    head = 1
    while head < min(len(given), len(out)) and out[head] == given[head]:
        head += 1
    tail = 0
    while tail < min(len(given), len(out)) - head and out[-1 - tail] == given[-1 - tail]:
        tail += 1
    middle = out[head:len(out) - tail]
    if not middle or len(given) - head - tail < 1:
        return StaticReshape(shape)
    return SplitMergeReshape(head, middle[:-1], tail)


def _resolved(shape: list[int], given: tuple[int, ...]) -> list[int] | None:
    """The output shape of an ONNX Reshape (allowzero=0) of a ``given``-shaped input to ``shape``."""
    out = [given[i] if d == 0 and i < len(given) else d for i, d in enumerate(shape)]
    known = math.prod(d for d in out if d != -1)
    if out.count(-1) > 1 or known == 0 or any(d < -1 for d in out):
        return None
    if -1 in out:
        out[out.index(-1)] = math.prod(given) // known
    return out if math.prod(out) == math.prod(given) else None


class SplitMergeReshape(nn.Module):
    """A Reshape that keeps the first ``head`` and last ``tail`` dims of its input and turns the
    dims between into ``(*fixed, -1)``: the last new dim follows the input's size, so a channel
    shuffle ``[-1, g, C/g, H, W]`` or its merge ``[-1, C, H, W]`` stays right when C changes."""

    def __init__(self, head: int, fixed: Sequence[int], tail: int) -> None:
        super().__init__()
        self.head, self.fixed, self.tail = int(head), tuple(int(d) for d in fixed), int(tail)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the batch as -1 and the other sizes as numbers: exported files keep their dynamic batch
        # and their shapes inferable
        shape = [int(d) for d in x.shape[1:]]
        middle = math.prod(shape[self.head - 1:len(shape) - self.tail]) // math.prod(self.fixed)
        return x.reshape([-1, *shape[:self.head - 1], *self.fixed, middle, *shape[len(shape) - self.tail:]])

    def extra_repr(self) -> str:
        return f"head={self.head}, fixed={self.fixed}, tail={self.tail}"


def _keep_if_same(module: torch.fx.GraphModule, example: tuple[torch.Tensor, ...], reference: object,
                  undo: list) -> None:
    """Keep the swaps in ``undo`` ((node, old args, old module) each, already made) if the module's
    outputs on ``example`` are still ``reference``, else undo them all (onnx2torch's modules are
    exact, if not prunable); then drop what no node uses any more."""
    if not undo:
        return
    module.recompile()
    with torch.no_grad():
        same = _same(reference, module(*example))
    if not same:
        for node, args, old, *kwargs in undo:
            _set_submodule(module, str(node.target), old)
            node.args = args
            if kwargs:
                node.kwargs = kwargs[0]
        module.recompile()
        return
    module.graph.eliminate_dead_code()
    module.delete_all_unused_submodules()
    module.recompile()


def _constant(module: torch.fx.GraphModule, arg: object) -> torch.Tensor | None:
    """The tensor an fx argument always holds: an initializer, possibly through Identity copies."""
    from onnx2torch.node_converters.identity import OnnxCopyIdentity

    if not isinstance(arg, torch.fx.Node):
        return None
    if arg.op == "get_attr":
        value = module
        for part in str(arg.target).split("."):
            value = getattr(value, part)
        return value if isinstance(value, torch.Tensor) else None
    if arg.op == "call_module" and len(arg.args) == 1 and isinstance(
            module.get_submodule(str(arg.target)), (OnnxCopyIdentity, nn.Identity)):
        return _constant(module, arg.args[0])
    return None


def _input_ranks(module: nn.Module, example: tuple[torch.Tensor, ...], types: tuple[type, ...]) -> dict[str, int]:
    return {name: len(shape) for name, shape in _input_shapes(module, example, types).items()}


def _input_shapes(module: nn.Module, example: tuple[torch.Tensor, ...], types: tuple[type, ...],
                  shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, tuple[int, ...]]:
    """The shape of the first input of every submodule of one of ``types`` (first call) on ``example``,
    recorded into ``shapes`` as the module runs."""
    shapes = {} if shapes is None else shapes

    def record(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            shapes.setdefault(name, tuple(args[0].shape))
        return hook

    handles = [sub.register_forward_pre_hook(record(name))
               for name, sub in module.named_modules() if isinstance(sub, types)]
    try:
        with torch.no_grad():
            module(*example)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _same(a: object, b: object) -> bool:
    from ..layers import flat_outputs

    xs, ys = flat_outputs(a), flat_outputs(b)
    return len(xs) == len(ys) and all(x.shape == y.shape and torch.allclose(x, y, atol=1e-6) for x, y in zip(xs, ys))

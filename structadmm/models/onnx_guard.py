"""A user's ONNX file as data: read once, checked, and renamed before anything converts or runs it.

:func:`read_model` is the only way :mod:`.onnx_input` reads a file. It returns a
:class:`CheckedModel` whose proto

* comes from one read of the file's bytes (at most ``max_bytes``, and under protobuf's 2 GiB
  limit), parsed as a protobuf and never read again from disk;
* holds its external data inline: every tensor stored outside the file (initializers, ``Constant``
  attributes and subgraphs included) names a location that is resolved once, against the file's
  own folder, and read once. A location that is empty, absolute, over 255 characters, holds a NUL,
  leaves the folder (by ``..`` or a symlink), loops, or names anything but a regular file is refused;
  so is data shorter or longer than its tensor;
* has at most ``max_nodes`` nodes, subgraphs nested at most ``max_depth`` deep, standard ONNX ops
  only (no model-local functions), and element types that PyTorch and ONNX Runtime both compute on
  CPU: bfloat16, float8, int4, strings and the like are refused wherever they appear (a tensor, a
  graph's input, output or value info, a ``Cast`` target);
* has every name replaced by a safe identifier: node ``i`` becomes ``n<i>_<slug>`` (the slug keeps
  the original's ASCII letters, digits and underscores, for readable layer names), an initializer
  ``w<i>``, any other value ``v<i>``, a graph ``g<i>``. onnx2torch names its modules after the nodes
  and torch.fx writes those names into Python source it executes, so only these names may reach
  it (:func:`rename_added` names what a version conversion adds the same way, and :func:`assert_safe`
  checks every name right before conversion). :class:`NameMap` maps every new
  name back: error messages quote the file's own names, and ``CheckedModel.signature`` keeps the
  file's input and output names, which the pruned file is written with.

Everything here is protobuf and numpy work bounded by the file's size; no ONNX or PyTorch code runs
on the model. :func:`check_sizes` is the other half, run in the sandboxed child
(:mod:`.onnx_sandbox`): shape inference at concrete batch sizes (folding, with bounded sizes, the
small constants that compute shapes, and ONNX's data propagation last), after which every tensor's
size is known and bounded before anything computes it. Every refusal is one line of
:class:`~structadmm.errors.StructADMMError`.
"""

from __future__ import annotations

import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto

from ..errors import StructADMMError, one_line
from ..exporters import OnnxSignature, onnx_signature
from ..exporters.shape_folding import FOLD_ROUNDS, SHAPE_DATA, fold_shape_constants

#: Largest file (with its external data) that is loaded by default.
MAX_BYTES = 2 * 1024**3
#: Protobuf cannot hold a message of 2 GiB or more, whatever ``max_bytes`` says.
PROTOBUF_LIMIT = 2 * 1024**3
#: Largest tensor (elements) an initializer may declare.
MAX_TENSOR_ELEMENTS = 2**31
#: Largest sample (elements, without the batch axis) an input may take.
MAX_SAMPLE_ELEMENTS = 2**26
MAX_RANK = 8
#: Most nodes (all graphs together) and deepest nesting of subgraphs a file may have.
MAX_NODES = 100_000
MAX_DEPTH = 8
#: Longest external-data location (characters); most file systems allow 255 bytes per name.
MAX_LOCATION = 255
#: Smallest per-tensor limit: a tensor may take max(this, 4x the largest initializer) bytes.
MIN_TENSOR_LIMIT = 1024**3
STANDARD_DOMAINS = ("", "ai.onnx")
#: Stands for the file's path in messages about the renamed model (the path may hold text that looks
#: like a new name); the parent writes the path in after putting the file's names back.
FILE_MARK = "<file>"
#: Element types PyTorch and ONNX Runtime both compute on CPU, and onnx2torch converts.
SUPPORTED_TYPES = frozenset({
    TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.INT8, TensorProto.INT16,
    TensorProto.INT32, TensorProto.INT64, TensorProto.UINT8, TensorProto.BOOL,
})
#: Attributes that name an element type (Cast's ``to``, RandomNormal's ``dtype``, ...).
_TYPE_ATTRIBUTES = ("to", "dtype", "output_dtype")
#: A name :class:`NameMap` gives: what :func:`assert_safe` accepts and error messages are searched for.
_NODE_NAME = re.compile(r"n\d+_[A-Za-z0-9_]*")
_VALUE_NAME = re.compile(r"[vwg]\d+")
_GIVEN_NAME = re.compile(r"\b(?:n\d+_[A-Za-z0-9_]*|[vwg]\d+)\b")
_SLUG = 32
#: How files are opened: never blocking (a FIFO named as the model or its data would wait for a writer
#: forever; it is refused as not a regular file once open), not inherited by child processes.
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


@dataclass
class NameMap:
    """The safe names :func:`rename` gave, and the file's originals they stand for."""

    nodes: list[str] = field(default_factory=list)  # original name of node n<i>
    values: dict[str, str] = field(default_factory=dict)  # new value, initializer or graph name -> original
    new: dict[str, str] = field(default_factory=dict)  # original value or initializer name -> new
    node_names: dict[str, int] = field(default_factory=dict)  # new node name -> i

    def original(self, name: str) -> str:
        """The file's name for ``name`` (a node's, value's, initializer's or graph's new name)."""
        if name in self.node_names:
            return self.nodes[self.node_names[name]]
        return self.values.get(name, name)

    def show(self, name: str) -> str:
        """``name``'s original, quoted on one line (a nameless node by its position)."""
        if name in self.node_names and not self.nodes[self.node_names[name]]:
            return f"#{self.node_names[name]}"
        return quoted(self.original(name))

    def restore_text(self, text: str) -> str:
        """``text`` (a message about the renamed model) with every new name replaced by its original."""
        return _GIVEN_NAME.sub(lambda m: self.show(m.group(0)) if m.group(0) in self.node_names
                               or m.group(0) in self.values else m.group(0), text)

    def restore(self, proto: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of the renamed ``proto`` with the file's original names back (the inverse of :func:`rename`)."""
        restored = onnx.ModelProto()
        restored.CopyFrom(proto)
        _rename_graph(restored.graph, lambda n: self.values.get(n, n) if n else n,
                      lambda node: self.original(node.name), lambda g: self.values.get(g, g))
        return restored


@dataclass
class CheckedModel:
    """A file read by :func:`read_model`: its renamed, self-contained proto and what it says."""

    proto: onnx.ModelProto  # renamed, external data inline, standard domain written ""
    names: NameMap
    signature: OnnxSignature  # the file's inputs and outputs, with its own names
    total_bytes: int  # the file and its external data
    largest_initializer: int  # bytes

    def tensor_limit(self, given: int | None = None) -> int:
        """The largest tensor (bytes) the model may make: ``given``, else max(1 GiB, 4x its largest initializer)."""
        return given if given is not None else max(MIN_TENSOR_LIMIT, 4 * self.largest_initializer)


def quoted(name: str, limit: int = 60) -> str:
    """``name`` as a one-line Python literal, cut to about ``limit`` characters."""
    text = repr(name)
    return text if len(text) <= limit else text[: limit - 4] + "..." + text[0]


# --- reading -----------------------------------------------------------------------------------------


def read_model(path: str | Path, *, max_bytes: int = MAX_BYTES, max_nodes: int = MAX_NODES,
               max_depth: int = MAX_DEPTH) -> CheckedModel:
    """The ONNX file at ``path`` read once and checked as the module docstring says."""
    path = Path(path)
    raw = read_bytes(path, max_bytes)
    try:
        proto = onnx.ModelProto.FromString(raw)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise StructADMMError(f"{path}: not a readable ONNX file (truncated or corrupt?): {one_line(exc)}") from exc
    size = len(raw)
    del raw
    check_structure(proto, path, max_nodes, max_depth)
    check_types(proto, path)
    external = inline_external_data(proto, path, min(max_bytes, PROTOBUF_LIMIT - 1) - size)
    check_tensors(proto, path)
    unknown_dims_dynamic(proto)
    constants_to_initializers(proto)
    signature = onnx_signature(proto)
    largest = max((_declared_bytes(t) for t in all_tensors(proto.graph)), default=0)
    names = rename(proto)
    return CheckedModel(proto, names, signature, size + external, largest)


def read_bytes(path: Path, max_bytes: int) -> bytes:
    """The file's bytes, read once through one descriptor; one line if it is missing, not a regular
    file, 2 GiB or more (protobuf's limit) or over ``max_bytes``."""
    try:
        fd = os.open(path, _READ_FLAGS)
    except FileNotFoundError:
        raise StructADMMError(f"ONNX file {path} does not exist; check the path") from None
    except OSError as exc:
        raise StructADMMError(f"ONNX file {path} cannot be opened: {exc.strerror or one_line(exc)}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise StructADMMError(f"ONNX file {path} is not a regular file")
        size = info.st_size
        if size >= PROTOBUF_LIMIT:
            raise StructADMMError(
                f"{path} is {size / 1e9:.1f} GB; an ONNX file of 2 GB or more cannot be parsed (protobuf's limit): "
                "save its weights as external data beside it"
            )
        if size > max_bytes:
            raise StructADMMError(f"{path} is {size / 1e6:.0f} MB, over the {max_bytes / 1e6:.0f} MB limit for ONNX files")
        chunks, left = [], size + 1  # one byte more than it said: a file that grows while read is refused
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 26))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    raw = b"".join(chunks)
    if len(raw) != size:
        raise StructADMMError(f"{path} changed while it was read; try again")
    return raw


# --- structure and types ----------------------------------------------------------------------------


def graphs(graph: onnx.GraphProto) -> Iterator[tuple[onnx.GraphProto, int]]:
    """``graph`` and every subgraph in it (If branches, Loop and Scan bodies), with its depth (0 for ``graph``)."""
    stack = [(graph, 0)]
    while stack:
        current, depth = stack.pop()
        yield current, depth
        for node in reversed(current.node):
            stack.extend((sub, depth + 1) for sub in reversed(_subgraphs(node)))


def all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for current, _ in graphs(graph):
        yield from current.node


def all_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    """Every tensor stored in the model: initializers and node attributes, in every graph."""
    for current, _ in graphs(graph):
        yield from current.initializer
        for node in current.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors


def check_structure(proto: onnx.ModelProto, path: Path, max_nodes: int, max_depth: int) -> None:
    """One line unless the model is standard ops only, small and shallow enough (see the module docstring)."""
    if proto.functions:
        raise StructADMMError(
            f"{path} defines model-local functions ({quoted(proto.functions[0].name)}); inline them first "
            "(onnx.inliner.inline_local_functions)"
        )
    count = 0
    for graph, depth in graphs(proto.graph):
        if depth > max_depth:
            raise StructADMMError(f"{path}: subgraphs nest {depth} deep, over the limit of {max_depth}")
        count += len(graph.node)
        if count > max_nodes:
            raise StructADMMError(f"{path} has over {max_nodes} nodes, the limit for ONNX files")
        if graph.sparse_initializer:
            raise StructADMMError(f"{path}: sparse initializers ({quoted(graph.sparse_initializer[0].values.name)}) "
                                  "are not supported; store them dense")
        for node in graph.node:
            if node.domain not in STANDARD_DOMAINS:
                raise StructADMMError(
                    f"{path}: op {op_name(node.op_type)} of domain {quoted(node.domain)} is a custom op; only standard "
                    "ONNX ops can be converted"
                )
            if any(a.HasField("sparse_tensor") or a.sparse_tensors for a in node.attribute):
                raise StructADMMError(f"{path}: node {quoted(node.name)} ({op_name(node.op_type)}) holds a sparse "
                                      "tensor; store it dense")


def op_name(op_type: str) -> str:
    """An op's type as written in messages: as is when it is a plain name, else quoted."""
    return op_type if op_type.isascii() and op_type.isidentifier() else quoted(op_type)


def type_name(elem_type: int) -> str:
    """``bfloat16`` for ``TensorProto.BFLOAT16``, and so on."""
    try:
        return TensorProto.DataType.Name(elem_type).lower()
    except ValueError:
        return f"element type {elem_type}"


def check_types(proto: onnx.ModelProto, path: Path) -> None:
    """One line naming the first tensor, value or ``Cast`` whose element type is not in :data:`SUPPORTED_TYPES`."""
    def refuse(what: str, elem_type: int) -> None:
        raise StructADMMError(
            f"{path}: {what} is {type_name(elem_type)}; structadmm converts float32, float16, float64, integer and "
            "bool models only (convert it to float32 first)"
        )

    for tensor in all_tensors(proto.graph):
        if tensor.data_type not in SUPPORTED_TYPES:
            refuse(f"tensor {quoted(tensor.name)}", tensor.data_type)
    for graph, _ in graphs(proto.graph):
        for value in (*graph.input, *graph.output, *graph.value_info):
            for elem_type in _elem_types(value.type):
                if elem_type not in SUPPORTED_TYPES and elem_type != TensorProto.UNDEFINED:
                    refuse(f"{quoted(value.name)}", elem_type)
        for node in graph.node:
            for attr in node.attribute:
                if attr.name in _TYPE_ATTRIBUTES and attr.type == onnx.AttributeProto.INT and attr.i not in SUPPORTED_TYPES:
                    refuse(f"the output of node {quoted(node.name)} ({op_name(node.op_type)})", attr.i)


def _elem_types(value_type: onnx.TypeProto) -> Iterator[int]:
    """Element types of a value's type, through sequences, optionals and maps."""
    kind = value_type.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        yield getattr(value_type, kind).elem_type
    elif kind == "sequence_type":
        yield from _elem_types(value_type.sequence_type.elem_type)
    elif kind == "optional_type":
        yield from _elem_types(value_type.optional_type.elem_type)
    elif kind == "map_type":
        yield value_type.map_type.key_type
        yield from _elem_types(value_type.map_type.value_type)


# --- external data ------------------------------------------------------------------------------------


def inline_external_data(proto: onnx.ModelProto, path: Path, budget: int) -> int:
    """Read every tensor's external data into the proto (see the module docstring); the bytes read.

    Each location is resolved once, against the folder of the file (symlinks in the file's own
    path followed), and each file opened once; at most ``budget`` bytes are read in all.
    """
    folder = Path(os.path.realpath(path)).parent
    opened: dict[str, tuple[int, int]] = {}  # location -> (descriptor, size)
    total = 0
    try:
        for tensor in all_tensors(proto.graph):
            if tensor.data_location != TensorProto.EXTERNAL:
                continue
            info = {entry.key: entry.value for entry in tensor.external_data}
            location = info.get("location", "")
            where = f"{path}: tensor {quoted(tensor.name)}"
            if location not in opened:
                opened[location] = _open_location(location, folder, path, quoted(tensor.name))
            fd, size = opened[location]
            offset = _external_int(info, "offset", 0, where)
            declared = _declared_bytes(tensor)
            length = _external_int(info, "length", declared, where)
            if length != declared:
                raise StructADMMError(f"{where} declares {declared} bytes but its external data holds {length}")
            if offset + length > size:
                raise StructADMMError(
                    f"{where} reads bytes {offset}..{offset + length} of {quoted(location)}, which has {size}"
                )
            total += length
            if total > budget:
                raise StructADMMError(
                    f"{path}: its external data is over {budget / 1e6:.0f} MB, the limit left for ONNX files "
                    "(a file and its data must stay under 2 GB)"
                )
            data = os.pread(fd, length, offset)
            if len(data) != length:
                raise StructADMMError(f"{where}: {quoted(location)} changed while it was read; try again")
            tensor.raw_data = data
            tensor.data_location = TensorProto.DEFAULT
            del tensor.external_data[:]
    finally:
        for fd, _ in opened.values():
            os.close(fd)
    return total


def _open_location(location: str, folder: Path, path: Path, name: str) -> tuple[int, int]:
    """A read-only descriptor on the regular file ``location`` names inside ``folder``, and its size
    (for tensor ``name``, quoted, of the file at ``path``)."""
    where, missing = f"{path}: tensor {name}", f"{path}"
    if not location:
        raise StructADMMError(f"{where} is stored externally but names no location")
    if "\x00" in location:
        raise StructADMMError(f"{where} names its external data {quoted(location)}, which holds a NUL character")
    if len(location) > MAX_LOCATION:
        raise StructADMMError(
            f"{where} names its external data with {len(location)} characters, over the limit of {MAX_LOCATION}"
        )
    outside = StructADMMError(
        f"{where} points its external data at {quoted(location)}, outside the file's folder; external data must "
        "sit beside the model"
    )
    normal = os.path.normpath(location)
    if os.path.isabs(location) or location.startswith(("/", "\\")) or normal == ".." or normal.startswith("../"):
        raise outside
    try:
        target = Path(folder, location).resolve(strict=True)
    except FileNotFoundError:
        raise StructADMMError(f"{missing}: external data file {quoted(location)} of tensor {name} does not exist") from None
    except RuntimeError:  # Python < 3.13 reports a symlink loop this way
        raise StructADMMError(f"{where}: external data {quoted(location)} is a symlink loop") from None
    except OSError as exc:
        if exc.errno == 40:  # ELOOP
            raise StructADMMError(f"{where}: external data {quoted(location)} is a symlink loop") from None
        raise StructADMMError(f"{where}: external data {quoted(location)} cannot be read: {exc.strerror}") from None
    if not target.is_relative_to(folder):
        raise outside
    try:
        fd = os.open(target, _READ_FLAGS | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise StructADMMError(f"{where}: external data {quoted(location)} cannot be opened: {exc.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise StructADMMError(f"{where}: external data {quoted(location)} is not a regular file")
    return fd, info.st_size


def _external_int(info: dict[str, str], key: str, default: int, where: str) -> int:
    if key not in info:
        return default
    text = info[key]
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        raise StructADMMError(f"{where} gives its external data the {key} {quoted(text)}, not a byte count")
    return int(text)


# --- tensors and inputs ----------------------------------------------------------------------------------


def _itemsize(elem_type: int) -> int:
    return onnx.helper.tensor_dtype_to_np_dtype(elem_type).itemsize


def _declared_bytes(tensor: TensorProto) -> int:
    if tensor.data_type not in SUPPORTED_TYPES:
        return 0
    return math.prod(tensor.dims) * _itemsize(tensor.data_type)


def check_tensors(proto: onnx.ModelProto, path: Path) -> None:
    """One line unless every stored tensor's shape is sane and its data matches it, and the graph's inputs
    and outputs have sane shapes."""
    for tensor in all_tensors(proto.graph):
        dims = list(tensor.dims)
        if any(d < 0 for d in dims) or len(dims) > MAX_RANK:
            raise StructADMMError(f"{path}: initializer {quoted(tensor.name)} has an invalid shape {dims}")
        elements = math.prod(dims)
        if elements > MAX_TENSOR_ELEMENTS:
            raise StructADMMError(
                f"{path}: initializer {quoted(tensor.name)} declares shape {dims} ({elements:.3g} elements), "
                f"over the limit of {MAX_TENSOR_ELEMENTS:.3g}"
            )
        stored = _stored_elements(tensor)
        if stored is not None and stored != elements:
            raise StructADMMError(
                f"{path}: initializer {quoted(tensor.name)} declares shape {dims} but stores {stored} elements"
            )
    for value in (*proto.graph.input, *proto.graph.output):
        if value.type.WhichOneof("value") != "tensor_type":
            raise StructADMMError(f"{path}: {quoted(value.name)} is not a tensor; inputs and outputs must be tensors")
        dims = value.type.tensor_type.shape.dim
        fixed = [d.dim_value for d in dims if d.HasField("dim_value") and d.dim_value > 0]
        if len(dims) > MAX_RANK or any(d.HasField("dim_value") and d.dim_value < -1 for d in dims):
            raise StructADMMError(f"{path}: {quoted(value.name)} has an invalid shape {[_dim(d) for d in dims]}")
        if math.prod(fixed[1:] if len(fixed) == len(dims) else fixed) > MAX_SAMPLE_ELEMENTS:
            raise StructADMMError(
                f"{path}: {quoted(value.name)} has shape {[_dim(d) for d in dims]}, over the limit of "
                f"{MAX_SAMPLE_ELEMENTS:.3g} elements per sample"
            )


def unknown_dims_dynamic(proto: onnx.ModelProto) -> None:
    """Every axis of the main graph's inputs, outputs and value infos written with the size -1 or 0 made
    dynamic (no size), in place: what Paddle2ONNX and older exporters write for an axis whose size is
    unknown (:func:`~structadmm.exporters.onnx_signature` reads them as dynamic too)."""
    for value in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
        if value.type.WhichOneof("value") != "tensor_type":
            continue
        for d in value.type.tensor_type.shape.dim:
            if d.HasField("dim_value") and d.dim_value <= 0:
                d.ClearField("dim_value")


def constants_to_initializers(proto: onnx.ModelProto) -> None:
    """Every main-graph ``Constant`` node that holds a tensor (its ``value`` attribute) made an
    initializer of the same name, in place (the node removed): Paddle2ONNX, among others, stores a
    model's weights that way, where converters look for initializers. The same values reach the same
    nodes, so the graph computes the same; a Constant whose output is a graph output stays a node, and
    files older than IR version 4 (whose initializers must also be graph inputs) are left as they are."""
    if proto.ir_version < 4:
        return
    graph = proto.graph
    outputs = {v.name for v in graph.output}
    taken = {t.name for t in graph.initializer} | {v.name for v in graph.input}
    kept, made = [], []
    for node in graph.node:
        if (node.op_type == "Constant" and node.domain in STANDARD_DOMAINS and len(node.output) == 1
                and len(node.attribute) == 1 and node.attribute[0].name == "value"
                and node.attribute[0].HasField("t") and node.output[0]
                and node.output[0] not in outputs and node.output[0] not in taken):
            tensor = TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            taken.add(tensor.name)
            made.append(tensor)
        else:
            kept.append(node)
    if made:
        del graph.node[:]
        graph.node.extend(kept)
        graph.initializer.extend(made)


def _stored_elements(tensor: TensorProto) -> int | None:
    """Elements the tensor's stored data holds (None for a tensor whose data is not counted this way)."""
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data) // _itemsize(tensor.data_type)
    for name in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        values = getattr(tensor, name)
        if len(values):
            return len(values)
    return 0 if tensor.data_location == TensorProto.DEFAULT else None


def _dim(d: onnx.TensorShapeProto.Dimension) -> int | str:
    return d.dim_value if d.HasField("dim_value") else d.dim_param or "?"


# --- names ------------------------------------------------------------------------------------------------


def rename(proto: onnx.ModelProto) -> NameMap:
    """Replace, in place, every node, value, initializer and graph name of ``proto`` by a safe identifier
    (see the module docstring), write the standard domain ``""`` and drop what names values but is not
    converted (training info, quantization annotations); the map back."""
    names = NameMap()
    for graph, _ in graphs(proto.graph):
        for tensor in graph.initializer:
            if tensor.name and tensor.name not in names.new:
                names.new[tensor.name] = f"w{len(names.new)}"
    count = {"v": 0, "g": 0}

    def value(name: str) -> str:
        if name and name not in names.new:
            names.new[name] = f"v{count['v']}"
            count["v"] += 1
        return names.new.get(name, name)

    def node_name(node: onnx.NodeProto) -> str:
        i = len(names.nodes)
        names.nodes.append(node.name)
        new = f"n{i}_{_slug(node.name or node.op_type)}"
        names.node_names[new] = i
        return new

    def graph_name(name: str) -> str:
        new = f"g{count['g']}"
        count["g"] += 1
        names.values[new] = name
        return new

    _rename_graph(proto.graph, value, node_name, graph_name)
    for opset in proto.opset_import:
        if opset.domain in STANDARD_DOMAINS:
            opset.domain = ""
    for graph, _ in graphs(proto.graph):
        for node in graph.node:
            if node.domain in STANDARD_DOMAINS:
                node.domain = ""
        del graph.quantization_annotation[:]
    del proto.training_info[:]
    names.values.update({new: old for old, new in names.new.items()})
    return names


def _slug(name: str) -> str:
    """The end of ``name`` (at most :data:`_SLUG` characters, from a word's start), ASCII letters, digits
    and underscores only: ``/features/features.0/Conv`` gives ``features_features_0_Conv``."""
    slug = re.sub(r"[^A-Za-z0-9_]", "_", name)
    if len(slug) > _SLUG:
        tail = slug[-_SLUG:]
        slug = tail.split("_", 1)[1] if "_" in tail[:-1] else tail
    return slug.strip("_")


def _rename_graph(graph: onnx.GraphProto, value, node_name, graph_name) -> None:
    """Rename ``graph`` and its subgraphs in place: ``value`` maps a value's name, ``node_name`` gives a
    node its name, ``graph_name`` maps a graph's."""
    for current, _ in graphs(graph):
        current.name = graph_name(current.name)
        for info in (*current.input, *current.output, *current.value_info):
            info.name = value(info.name)
        for tensor in current.initializer:
            tensor.name = value(tensor.name)
        for node in current.node:
            node.name = node_name(node)
            node.input[:] = [value(n) for n in node.input]
            node.output[:] = [value(n) for n in node.output]
            for attr in node.attribute:
                if attr.HasField("t"):
                    attr.t.name = value(attr.t.name)
                for tensor in attr.tensors:
                    tensor.name = value(tensor.name)


def rename_added(proto: onnx.ModelProto) -> None:
    """Give a safe name, in place, to every node and value of the renamed ``proto`` whose name is not one
    :func:`rename` gives: what a tool that changed the model since (``onnx.version_converter``) added.
    The new names continue past the largest index in use."""
    used = {"n": -1, "v": -1}
    names = [(g, node) for g, _ in graphs(proto.graph) for node in g.node]
    for _, node in names:
        if _NODE_NAME.fullmatch(node.name):
            used["n"] = max(used["n"], int(node.name[1:].split("_")[0]))
        for name in (*node.input, *node.output):
            if _VALUE_NAME.fullmatch(name) and name[0] == "v":
                used["v"] = max(used["v"], int(name[1:]))
    added: dict[str, str] = {}

    def value(name: str) -> str:
        if not name or _VALUE_NAME.fullmatch(name):
            return name
        if name not in added:
            used["v"] += 1
            added[name] = f"v{used['v']}"
        return added[name]

    for graph, _ in graphs(proto.graph):
        for info in (*graph.input, *graph.output, *graph.value_info):
            info.name = value(info.name)
        for tensor in graph.initializer:
            tensor.name = value(tensor.name)
        for node in graph.node:
            if not _NODE_NAME.fullmatch(node.name):
                used["n"] += 1
                node.name = f"n{used['n']}_{_slug(node.op_type)}"
            node.input[:] = [value(n) for n in node.input]
            node.output[:] = [value(n) for n in node.output]


def assert_safe(proto: onnx.ModelProto) -> None:
    """Raise unless every name in ``proto`` is one :func:`rename` gives (what may reach generated code)."""
    for graph, _ in graphs(proto.graph):
        values = [*(v.name for v in (*graph.input, *graph.output, *graph.value_info)),
                  *(t.name for t in graph.initializer),
                  *(n for node in graph.node for n in (*node.input, *node.output) if n)]
        bad = [n for n in values if not _VALUE_NAME.fullmatch(n)]
        bad += [node.name for node in graph.node if not _NODE_NAME.fullmatch(node.name) or node.domain]
        if bad:
            raise StructADMMError(f"internal check: a name from the file was about to reach generated code ({quoted(bad[0])})")


# --- sizes (run in the sandboxed child) -------------------------------------------------------------------


#: A batch far larger than the checks run at: shapes are also inferred there, to refuse tensors that grow
#: faster than the batch (the pipeline trains and times the model at larger batches than it checks).
GROWTH_BATCH = 256
#: Initializers with at most this many elements keep their values for shape inference (shapes, axes,
#: pads computed from constants); larger ones become typed inputs, so inference copies no weights.
_SHAPE_DATA = SHAPE_DATA


@dataclass(frozen=True)
class SizeLimits:
    """What :func:`check_sizes` allows: bytes per tensor, and bytes to run the model once (its weights,
    converted, and its activations at the batch checked)."""

    tensor: int
    memory: int


def check_sizes(proto: onnx.ModelProto, sample_shapes: Sequence[Sequence[int]], batch: int,
                limits: SizeLimits, where: str) -> int:
    """One line naming the node unless, with the inputs at ``batch`` samples of ``sample_shapes``, every
    node output has a known shape, no tensor takes over ``limits.tensor`` bytes, none grows faster than
    the batch, and the model's estimated memory to run (returned, in bytes: its weights in the proto,
    the converted module and ONNX Runtime, and its activations at their peak) stays under
    ``limits.memory``. Names are the renamed model's.

    The model must first pass ``onnx.checker``. Shapes come from ONNX shape inference (strict); where
    that leaves a size open, from folding the small constants that compute it
    (:func:`fold_shape_constants`) and inferring again, and last from inference with data
    propagation (:func:`infer_folded`).
    """
    try:
        onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise StructADMMError(f"{where}: invalid ONNX model: {one_line(exc)}") from exc
    shapes_only = without_weight_data(proto)
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [v.name for v in proto.graph.input if v.name not in initializers]
    sizes = _output_sizes(infer_folded(shapes_only, inputs, sample_shapes, batch, where), where, limits.tensor)
    large = _output_sizes(infer_folded(shapes_only, inputs, sample_shapes, GROWTH_BATCH, where), where, None)
    for name, (size, node) in sizes.items():
        grown = large.get(name, (0, node))[0]
        if grown > size * GROWTH_BATCH / batch * 1.01 + 4096:
            raise StructADMMError(
                f"{where}: node {node.name} ({op_name(node.op_type)}) makes a tensor that grows faster than the batch "
                f"({_human(size)} at batch {batch}, {_human(grown)} at batch {GROWTH_BATCH})"
            )
    weights = _converted_weights(proto, where, limits.memory)
    peak, at = _peak_activations(proto.graph, {k: v[0] for k, v in sizes.items()})
    needed = 3 * weights + peak
    if needed > limits.memory:
        detail = f" (the most at node {at.name}, {op_name(at.op_type)})" if at is not None else ""
        raise StructADMMError(
            f"{where}: running it at batch {batch} takes about {_human(needed)}{detail}, over the "
            f"{_human(limits.memory)} limit for ONNX files"
        )
    return needed


def infer_folded(model: onnx.ModelProto, inputs: Sequence[str], sample_shapes: Sequence[Sequence[int]], batch: int,
                 where: str) -> onnx.ModelProto:
    """:func:`_infer`, then, while sizes stay open, fold the shape constants that compute them and infer
    again; ONNX's own data propagation last, for what folding leaves open (it computes the values it
    propagates without bounding them first, so it runs only where it is needed, in the sandbox)."""
    inferred = _infer(model, inputs, sample_shapes, batch, where)
    for _ in range(FOLD_ROUNDS):
        if not _open_sizes(inferred):
            return inferred
        folded = fold_shape_constants(inferred)
        if folded is None:
            break
        inferred = _infer(folded, inputs, sample_shapes, batch, where)
    if _open_sizes(inferred):
        inferred = _infer(inferred, inputs, sample_shapes, batch, where, data_prop=True)
    return inferred


def _open_sizes(model: onnx.ModelProto) -> bool:
    types = {v.name: v.type for v in (*model.graph.value_info, *model.graph.output, *model.graph.input)}
    return any(name and (name not in types or _bytes_of(types[name]) is None)
               for node in model.graph.node for name in node.output)


def without_weight_data(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` for shape inference: the main graph's initializers over :data:`_SHAPE_DATA` elements
    become graph inputs of their type and shape, without their data."""
    model = onnx.ModelProto()
    model.ir_version = max(proto.ir_version, 4)
    model.opset_import.extend(proto.opset_import)
    graph, source = model.graph, proto.graph
    graph.name = source.name
    graph.node.extend(source.node)
    graph.input.extend(source.input)
    graph.output.extend(source.output)
    graph.value_info.extend(source.value_info)
    declared = {v.name for v in source.input}
    for tensor in source.initializer:
        if math.prod(tensor.dims) <= _SHAPE_DATA:
            graph.initializer.append(tensor)
        elif tensor.name not in declared:
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return model


def _infer(model: onnx.ModelProto, inputs: Sequence[str], sample_shapes: Sequence[Sequence[int]], batch: int,
           where: str, data_prop: bool = False) -> onnx.ModelProto:
    """``model`` with its ``inputs`` fixed at ``batch`` samples of ``sample_shapes``, through ONNX shape
    inference (strict; with data propagation if asked)."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    values = {v.name: v for v in fixed.graph.input}
    for name, shape in zip(inputs, sample_shapes):
        dims = values[name].type.tensor_type.shape
        dims.Clear()
        for d in (batch, *shape):
            dims.dim.add().dim_value = int(d)
    try:
        return onnx.shape_inference.infer_shapes(fixed, check_type=True, strict_mode=True, data_prop=data_prop)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError, ValueError) as exc:
        raise StructADMMError(f"{where}: invalid ONNX model at batch {batch}: {one_line(exc)}") from exc


def _output_sizes(model: onnx.ModelProto, where: str, limit: int | None) -> dict[str, tuple[int, onnx.NodeProto]]:
    """Bytes of every node output of every graph, by value name; one line for an unknown or over-``limit`` size."""
    sizes = {}
    for graph, _ in graphs(model.graph):
        types = {v.name: v.type for v in (*graph.value_info, *graph.output, *graph.input)}
        for node in graph.node:
            for name in node.output:
                if not name:
                    continue
                value_type = types.get(name)
                size = _bytes_of(value_type) if value_type is not None else None
                if value_type is not None and value_type.WhichOneof("value") == "tensor_type":
                    elem = value_type.tensor_type.elem_type
                    if elem not in SUPPORTED_TYPES and elem != TensorProto.UNDEFINED:
                        raise StructADMMError(
                            f"{where}: node {node.name} ({op_name(node.op_type)}) makes a {type_name(elem)} tensor; structadmm "
                            "converts float32, float16, float64, integer and bool models only"
                        )
                if size is None:
                    raise StructADMMError(
                        f"{where}: the size of what node {node.name} ({op_name(node.op_type)}) makes cannot be known before it "
                        "runs (shape inference leaves it open); structadmm converts graphs whose sizes follow from "
                        "their inputs' shapes"
                    )
                if limit is not None and size > limit:
                    raise StructADMMError(
                        f"{where}: node {node.name} ({op_name(node.op_type)}) would make a tensor of {_human(size)} "
                        f"(shape {_shape_of(value_type)}), over the {_human(limit)} limit"
                    )
                sizes[name] = (size, node)
    return sizes


def _bytes_of(value_type: onnx.TypeProto) -> int | None:
    if value_type.WhichOneof("value") != "tensor_type":
        return None
    tensor = value_type.tensor_type
    if not tensor.HasField("shape") or tensor.elem_type not in SUPPORTED_TYPES:
        return None
    dims = tensor.shape.dim
    if not all(d.HasField("dim_value") and d.dim_value >= 0 for d in dims):
        return None
    return math.prod(d.dim_value for d in dims) * _itemsize(tensor.elem_type)


def _shape_of(value_type: onnx.TypeProto) -> list[int | str]:
    return [_dim(d) for d in value_type.tensor_type.shape.dim]


#: Inputs of these ops (by position) become a converted layer's own parameters, one copy per node.
_PARAMETER_INPUTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "BatchNormalization": (1, 2, 3, 4),
                     "InstanceNormalization": (1, 2), "LayerNormalization": (1, 2)}


def _converted_weights(model: onnx.ModelProto, where: str, limit: int) -> int:
    """Bytes the converted module holds: each initializer once (the converter shares it between the
    nodes that read it), plus a copy for every further layer that makes it its own parameter; one line
    naming the initializer when those copies alone pass ``limit``."""
    sizes = {t.name: _declared_bytes(t) for g, _ in graphs(model.graph) for t in g.initializer}
    layers: dict[str, int] = {}
    for node in all_nodes(model.graph):
        for position in _PARAMETER_INPUTS.get(node.op_type, ()):
            if position < len(node.input) and node.input[position] in sizes:
                layers[node.input[position]] = layers.get(node.input[position], 0) + 1
    copies = {name: sizes[name] * (count - 1) for name, count in layers.items() if count > 1}
    if sum(copies.values()) > limit:
        name = max(copies, key=copies.get)
        raise StructADMMError(
            f"{where}: initializer {name} ({_human(sizes[name])}) is the weight of {layers[name]} layers; converting "
            f"them takes {_human(sum(copies.values()))}, over the {_human(limit)} limit"
        )
    return sum(sizes.values()) + sum(copies.values())


def _peak_activations(graph: onnx.GraphProto, sizes: dict[str, int]) -> tuple[int, onnx.NodeProto | None]:
    """The most bytes of node outputs alive at once when ``graph`` runs in order (a value lives from the
    node that makes it to the last node that reads it, or to the end if the graph outputs it), with each
    node's subgraphs counted whole; and the node where it is reached."""
    last: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for name in _reads(node):
            last[name] = i
    kept = {v.name for v in graph.output}
    live, peak, at = 0, 0, None
    for i, node in enumerate(graph.node):
        live += sum(sizes.get(n, 0) for n in node.output if n)
        inner = sum(sizes.get(n, 0) for sub in _subgraphs(node) for inner_node in all_nodes(sub)
                    for n in inner_node.output)
        if live + inner > peak:
            peak, at = live + inner, node
        done = {n for n in node.output if n and n not in last} | {n for n in _reads(node) if last[n] == i}
        live -= sum(sizes.get(n, 0) for n in done if n not in kept and n in sizes)
    return peak, at


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [sub for attr in node.attribute for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)]


def _reads(node: onnx.NodeProto) -> list[str]:
    """Values ``node`` reads: its inputs and, through its subgraphs, outer values."""
    names = [n for n in node.input if n]
    for sub in _subgraphs(node):
        names.extend(n for inner in all_nodes(sub) for n in inner.input if n)
    return names


def _human(size: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{int(size)} bytes"

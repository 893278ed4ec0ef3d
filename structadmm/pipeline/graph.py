"""The channel dependency graph: which slices of which tensors belong to one channel.

The model is traced with ``torch.fx`` and shapes are propagated with the example inputs.
Every channel a Conv or Linear produces gets an *entry* id, and every tensor records the
entry at each position of its channel axis (a numpy array; 2-D after a reshape splits the
axis). The rules, with no knowledge of any model:

* Conv / Linear read their input entries (*in* slices of the weight) and create new ones
  (*out* slices of weight and bias); a depthwise conv passes its input entries through;
* per-channel layers (BatchNorm, GroupNorm, PReLU, a layer-scale parameter) carry a
  *through* slice and pass entries on; activations, pooling, dropout just pass them on;
* element-wise binary ops (residual add, gating) *tie* their operands' entries position by
  position; ``cat`` on the channel axis concatenates, elsewhere it ties;
* reshapes and permutes move the entries with the data (flatten repeats a channel's entry
  over its spatial features; a channel shuffle permutes them); splitting the channel axis
  ties the entries in each column so every block keeps the same channels in the same order;
* ``chunk`` on the channel axis and grouped convs require their blocks to keep equal counts.

Tied entries form one *channel* (an atom: kept or removed together). Channels linked
through any producer or tie form a :class:`ChannelGroup`, the unit a plan prunes. An op the
rules do not cover *freezes* every group that reaches it (never pruned), with the reason.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import StructADMMError

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)

#: Modules that act on every element independently (any layout).
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
#: Modules that act on the trailing spatial axes of a channels-first tensor.
_SPATIAL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
)

_F = torch.nn.functional
_ELEMENTWISE_FUNCTIONS = {
    torch.relu, _F.relu, _F.relu6, _F.leaky_relu, _F.elu, _F.gelu, _F.silu, _F.mish,
    torch.sigmoid, _F.sigmoid, torch.tanh, _F.tanh, _F.hardswish, _F.hardsigmoid, _F.hardtanh,
    _F.softplus, _F.dropout, torch.abs, torch.neg, torch.exp, torch.clamp, torch.sqrt, torch.rsqrt,
}
_SPATIAL_FUNCTIONS = {
    _F.dropout1d, _F.dropout2d, _F.dropout3d,
    _F.max_pool1d, _F.max_pool2d, _F.max_pool3d, _F.avg_pool1d, _F.avg_pool2d, _F.avg_pool3d,
    _F.adaptive_avg_pool1d, _F.adaptive_avg_pool2d, _F.adaptive_avg_pool3d,
    _F.adaptive_max_pool1d, _F.adaptive_max_pool2d, _F.adaptive_max_pool3d, _F.interpolate, _F.pad,
}
_ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "abs", "neg", "exp", "clamp", "clamp_",
    "sqrt", "rsqrt", "contiguous", "clone", "detach", "float", "to", "type_as",
}
_BINARY = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum,
}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_RESHAPES = {torch.flatten, torch.reshape}
_RESHAPE_METHODS = {"flatten", "view", "reshape", "squeeze", "unsqueeze"}
_PERMUTES = {torch.permute, torch.transpose}
_PERMUTE_METHODS = {"permute", "transpose"}
_REDUCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCTION_METHODS = {"mean", "sum", "amax", "amin"}
_CHUNKS = {torch.chunk, torch.split}
_CHUNK_METHODS = {"chunk", "split"}
_METADATA_QUERIES = {"size", "dim", "numel", getattr}


@dataclass(frozen=True, eq=False)
class Slice:
    """The channel entries along one axis of one parameter or buffer.

    ``role`` is ``"out"`` (a layer's outputs: weight rows, bias), ``"through"`` (a
    per-channel tensor the channels pass: BatchNorm statistics, a depthwise kernel, a
    layer-scale) or ``"in"`` (a layer's input columns). ``entries[p]`` is the entry at
    position ``p`` of ``axis``. For a grouped conv's input (``groups`` > 1) position
    ``p`` is column ``p % (C/groups)`` of the rows of block ``p // (C/groups)``.
    """

    module: str
    tensor: str
    axis: int
    entries: np.ndarray
    role: str
    groups: int = 1

    @property
    def name(self) -> str:
        return f"{self.module}.{self.tensor}" if self.module else self.tensor

    def _grouped(self) -> int:
        return self.groups if self.role == "in" else 1

    def positions(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` rearranged as [positions, everything else]."""
        g = self._grouped()
        if g > 1:  # weight [F, C/g, *k]: position b*(C/g) + l is column l of row block b
            rows, cols = tensor.shape[0], tensor.shape[1]
            return tensor.reshape(g, rows // g, cols, -1).permute(0, 2, 1, 3).reshape(g * cols, -1)
        return tensor.movedim(self.axis, 0).reshape(tensor.shape[self.axis], -1)

    def norms(self, tensor: torch.Tensor) -> torch.Tensor:
        """Squared L2 norm of every position (float64)."""
        return self.positions(tensor.detach()).double().pow(2).sum(1)

    def mask(self, shape: torch.Size, keep: torch.Tensor) -> torch.Tensor:
        """A float mask of ``shape`` that zeroes the positions where ``keep`` is False."""
        g = self._grouped()
        flat = keep.to(torch.float32).view(-1, 1)
        if g > 1:
            rows, cols = shape[0], shape[1]
            rest = math.prod(shape[2:])
            return flat.expand(g * cols, rows // g * rest).reshape(g, cols, rows // g, rest).permute(0, 2, 1, 3).reshape(shape)
        moved = (shape[self.axis],) + tuple(d for i, d in enumerate(shape) if i != self.axis)
        return flat.expand(shape[self.axis], math.prod(moved[1:])).reshape(moved).movedim(0, self.axis)

    def select(self, tensor: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``tensor`` without the positions where ``keep`` is False."""
        g = self._grouped()
        if g > 1:
            rows, cols = tensor.shape[0], tensor.shape[1]
            blocks = tensor.reshape(g, rows // g, cols, *tensor.shape[2:])
            index = keep.view(g, cols).nonzero()[:, 1].view(g, -1)  # equal counts per block
            return torch.stack([blocks[b][:, index[b]] for b in range(g)]).reshape(rows, index.shape[1], *tensor.shape[2:])
        return tensor.index_select(self.axis, keep.nonzero().flatten())


@dataclass
class ChannelGroup:
    """Channels that are pruned together: one plan unit."""

    id: int
    channels: np.ndarray  # atom ids; a group's size is its number of channels
    name: str
    producers: list[str]
    consumers: list[str]
    frozen: str | None = None  # why the group must not be pruned; None if it may be

    @property
    def size(self) -> int:
        return len(self.channels)

    @property
    def prunable(self) -> bool:
        return self.frozen is None


@dataclass
class ChannelGraph:
    """The traced model's channels, groups, slices and block constraints."""

    groups: list[ChannelGroup]
    slices: list[Slice]
    atom_of: np.ndarray  # entry id -> atom id
    local_of: np.ndarray  # atom id -> index within its group
    group_of: np.ndarray  # atom id -> group id
    blocks: list[list[np.ndarray]]  # each: blocks of atoms that must keep equal counts
    modules: dict[str, nn.Module]
    notes: list[str] = field(default_factory=list)

    def prunable_groups(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def groups_of(self, module: str, role: str) -> list[ChannelGroup]:
        ids = {int(self.group_of[a]) for s in self.slices if s.module == module and s.role == role
               for a in np.unique(self.atom_of[s.entries])}
        return [self.groups[i] for i in sorted(ids)]

    def blocks_in(self, group: ChannelGroup) -> list[list[torch.Tensor]]:
        """The equal-count constraints on ``group``, as local channel indices."""
        return [[torch.from_numpy(self.local_of[b]) for b in constraint] for constraint in self.blocks
                if self.group_of[constraint[0][0]] == group.id]

    def producer_blocks(self, group: ChannelGroup) -> list[torch.Tensor]:
        """Per producing layer, the group's channels it makes (each must keep at least one:
        a layer with no outputs cannot exist)."""
        return [torch.from_numpy(np.unique(local)) for s, _, local in self.slices_of(group)
                if s.role == "out" and s.tensor == "weight"]

    def slices_of(self, group: ChannelGroup) -> list[tuple[Slice, np.ndarray, np.ndarray]]:
        """(slice, positions in the group, their channel index within the group) per slice."""
        out = []
        for s in self.slices:
            atoms = self.atom_of[s.entries]
            pos = np.nonzero(self.group_of[atoms] == group.id)[0]
            if len(pos):
                out.append((s, pos, self.local_of[atoms[pos]]))
        return out

    def tensor(self, s: Slice) -> torch.Tensor:
        return getattr(self.modules[s.module], s.tensor)


def trace(model: nn.Module, example_inputs: Any) -> ChannelGraph:
    """Trace ``model`` and return its channel graph (see the module docstring)."""
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types for untraceable Python
        raise StructADMMError(
            f"cannot trace {type(model).__name__} with torch.fx ({_first_line(exc)}); "
            "models with data-dependent Python control flow need that logic moved out of forward()"
        ) from None
    modes = {m: m.training for m in gm.modules()}
    gm.eval()  # shape propagation must not update BatchNorm statistics
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    except Exception as exc:
        shapes = [tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor)]
        raise StructADMMError(
            f"the example input (shape {shapes}) does not fit {type(model).__name__}: {_first_line(exc)}"
        ) from None
    finally:
        for m, training in modes.items():
            m.training = training
    return _Tracer(gm, model).run()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self, n: int) -> None:
        self.parent.extend(range(len(self.parent), len(self.parent) + n))

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass(frozen=True)
class _Chan:
    """A tensor's channel layout: ``entries`` occupies dims ``axis .. axis + entries.ndim``."""

    entries: np.ndarray
    axis: int

    def dims(self) -> range:
        return range(self.axis, self.axis + self.entries.ndim)


class _Tracer:
    def __init__(self, gm: torch.fx.GraphModule, model: nn.Module) -> None:
        self.gm = gm
        self.root = model
        # names resolve in the user's model, not in the GraphModule (which rebuilds some parents)
        self.modules = dict(model.named_modules())
        self.atoms = _UnionFind()  # entries that are one channel
        self.groups = _UnionFind()  # entries pruned by one plan unit
        self.frozen: dict[int, str] = {}  # entry -> reason (resolved to groups at the end)
        self.producer: dict[int, str] = {}  # first entry of each new block -> the module producing it
        self.slices: list[Slice] = []
        self.blocks: list[list[np.ndarray]] = []
        self.chans: dict[torch.fx.Node, Any] = {}
        self.notes: list[str] = []
        self.calls: dict[str, int] = {}

    # -- entries, ties, freezing -----------------------------------------------------------
    def new(self, n: int, producer: str | None = None, frozen: str | None = None) -> np.ndarray:
        start = len(self.atoms.parent)
        self.atoms.add(n)
        self.groups.add(n)
        for i in range(start + 1, start + n):
            self.groups.union(start, i)
        if producer is not None:
            self.producer[start] = producer
        if frozen is not None:
            self.frozen[start] = frozen
        return np.arange(start, start + n)

    def tie(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.ravel().tolist(), b.ravel().tolist()):
            self.atoms.union(x, y)
            self.groups.union(x, y)

    def freeze(self, chans: Iterable[Any], reason: str) -> None:
        for chan in chans:
            for c in _flatten_chans(chan):
                for e in np.unique(c.entries).tolist():  # every group the tensor touches
                    self.frozen.setdefault(e, reason)

    def unsupported(self, node: torch.fx.Node, what: str) -> _Chan | None:
        reason = f"{what} at node '{node.name}'"
        touched = [self.chans.get(a) for a in node.all_input_nodes if self.chans.get(a) is not None]
        if touched:
            self.notes.append(f"{reason}: channels reaching it are not pruned")
        self.freeze(touched, reason)
        return self.fresh(node, frozen=reason)

    def mixing(self, node: torch.fx.Node, chan: _Chan | None, what: str) -> _Chan | None:
        """An op that mixes values across channels but keeps the layout: freeze, pass on."""
        reason = f"{what} at node '{node.name}'"
        if chan is not None:
            self.notes.append(f"{reason}: channels reaching it are not pruned")
            self.freeze([chan], reason)
        return chan

    def fresh(self, node: torch.fx.Node, producer: str | None = None, frozen: str | None = None,
              axis: int = 1) -> _Chan | None:
        shape = _shape(node)
        if shape is None or len(shape) <= axis:
            return None
        return _Chan(self.new(shape[axis], producer, frozen), axis)

    def equal_counts(self, blocks: list[np.ndarray]) -> None:
        """Require ``blocks`` to keep equal numbers of channels; they become one group."""
        self.blocks.append(blocks)
        first = int(blocks[0].flat[0])
        for e in np.concatenate([b.ravel() for b in blocks]).tolist():
            self.groups.union(first, e)

    def slice(self, module: str, tensor: str, axis: int, entries: np.ndarray, role: str, groups: int = 1) -> None:
        self.slices.append(Slice(module, tensor, axis, np.asarray(entries).ravel(), role, groups))

    # -- the walk --------------------------------------------------------------------------
    def run(self) -> ChannelGraph:
        for node in self.gm.graph.nodes:
            self.chans[node] = self.visit(node)
        return self.build()

    def build(self) -> ChannelGraph:
        n = len(self.atoms.parent)
        atom_root = np.array([self.atoms.find(i) for i in range(n)], dtype=np.int64)
        group_root = np.array([self.groups.find(i) for i in range(n)], dtype=np.int64)
        _, atom_of = np.unique(atom_root, return_inverse=True)
        roots, group_of_entry = np.unique(group_root, return_inverse=True)
        n_atoms = int(atom_of.max()) + 1 if n else 0
        group_of = np.zeros(n_atoms, dtype=np.int64)
        group_of[atom_of] = group_of_entry
        local_of = np.zeros(n_atoms, dtype=np.int64)
        members: dict[int, list[int]] = {}
        for atom in range(n_atoms):
            members.setdefault(int(group_of[atom]), []).append(atom)
        for atoms in members.values():
            local_of[atoms] = np.arange(len(atoms))
        reasons: dict[int, str] = {}
        for entry, reason in self.frozen.items():
            reasons.setdefault(int(group_of_entry[entry]), reason)
        producers: dict[int, list[str]] = {}
        for entry, module in self.producer.items():
            producers.setdefault(int(group_of_entry[entry]), []).append(module)
        consumers: dict[int, list[str]] = {}
        for s in self.slices:
            if s.role == "in":
                for g in np.unique(group_of_entry[s.entries]).tolist():
                    consumers.setdefault(g, []).append(s.module)
        groups = []
        for gid in range(len(roots)):
            prods = producers.get(gid, [])
            frozen = reasons.get(gid)
            if frozen is None and not prods:
                frozen = "no layer produces these channels"
            if frozen is None and not consumers.get(gid):
                frozen = "no Conv or Linear reads these channels"
            name = prods[0] + (f"+{len(prods) - 1}" if len(prods) > 1 else "") if prods else f"group{gid}"
            groups.append(ChannelGroup(gid, np.array(members.get(gid, []), dtype=np.int64), name, prods,
                                       consumers.get(gid, []), frozen))
        blocks = [[np.unique(atom_of[b]) for b in constraint] for constraint in self.blocks]
        return ChannelGraph(groups, self.slices, atom_of, local_of, group_of, blocks, self.modules, self.notes)

    def visit(self, node: torch.fx.Node) -> Any:
        if node.op == "placeholder":
            return self.fresh(node, frozen="model input")
        if node.op == "output":
            self.freeze([self.chans.get(a) for a in node.all_input_nodes], "model output")
            return None
        if node.op == "get_attr":
            return None  # a constant: handled where it is used (layer-scale) or by its user's rule
        if node.op == "call_function" and node.target is operator.getitem:
            return self.getitem(node)
        shape = _shape(node)
        if shape is None:
            if node.target in _METADATA_QUERIES or not any(self.chans.get(a) for a in node.all_input_nodes):
                return None
            if (node.op == "call_function" and node.target in _CHUNKS) or \
                    (node.op == "call_method" and node.target in _CHUNK_METHODS):
                return self.chunk(node)
            return self.unsupported(node, f"'{_target_name(node)}'")
        if node.op == "call_module":
            return self.visit_module(node, self.modules[node.target])
        return self.visit_function(node)

    def visit_module(self, node: torch.fx.Node, module: nn.Module) -> _Chan | None:
        name = str(node.target)
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.calls[name] > 1 and any(True for _ in module.parameters(recurse=False)):
            return self.unsupported(node, f"module '{name}' called more than once (shared weights)")
        src = node.args[0] if node.args else None
        chan = self.chans.get(src)
        rank = len(_shape(src) or ())
        if isinstance(module, _CONVS):
            return self.conv(node, name, module, chan)
        if isinstance(module, nn.Linear):
            if chan is None or chan.entries.ndim != 1 or chan.axis != rank - 1:
                return self.unsupported(node, f"Linear '{name}' whose input features are not channels")
            self.slice(name, "weight", 1, chan.entries, "in")
            out = self.fresh(node, producer=name, axis=rank - 1)
            self.out_slices(name, module, out.entries)
            return out
        if isinstance(module, _BATCHNORMS) or (isinstance(module, nn.PReLU) and module.num_parameters > 1):
            if not self.channels_first(chan):
                return self.unsupported(node, f"{type(module).__name__} '{name}' on a tensor whose axis 1 is not channels")
            for tensor_name, _ in _per_channel_tensors(module):
                self.slice(name, tensor_name, 0, chan.entries, "through")
            return chan
        if isinstance(module, nn.GroupNorm):
            return self.group_norm(node, name, module, chan)
        if isinstance(module, nn.LayerNorm):
            return self.layer_norm(node, name, module, chan)
        if isinstance(module, _ELEMENTWISE_MODULES) or isinstance(module, nn.PReLU):
            return chan
        if isinstance(module, _SPATIAL_MODULES):
            return chan if chan is None or self.channels_first(chan) else self.unsupported(
                node, f"{type(module).__name__} '{name}' on a channels-last tensor")
        if isinstance(module, nn.Flatten):
            return self.reshape(node, src)
        if isinstance(module, (nn.Softmax, nn.LogSoftmax)):
            return self.along(node, chan, module.dim, f"{type(module).__name__} '{name}'")
        return self.unsupported(node, f"module {type(module).__name__} '{name}'")

    def channels_first(self, chan: _Chan | None) -> bool:
        return chan is not None and chan.axis == 1 and chan.entries.ndim == 1

    def out_slices(self, name: str, module: nn.Module, entries: np.ndarray) -> None:
        self.slice(name, "weight", 0, entries, "out")
        if getattr(module, "bias", None) is not None:
            self.slice(name, "bias", 0, entries, "out")

    def conv(self, node: torch.fx.Node, name: str, module: nn.Module, chan: _Chan | None) -> _Chan | None:
        if not self.channels_first(chan):
            return self.unsupported(node, f"convolution '{name}' on a tensor whose axis 1 is not channels")
        groups, cin, cout = module.groups, module.in_channels, module.out_channels
        if groups > 1 and groups == cin:
            # depthwise: output channel o reads input channel o // (cout / cin) alone
            entries = np.repeat(chan.entries, cout // cin)
            for tensor_name in ("weight", "bias"):
                if getattr(module, tensor_name) is not None:
                    self.slice(name, tensor_name, 0, entries, "through")
            return _Chan(entries, 1)
        self.slice(name, "weight", 1, chan.entries, "in", groups)
        out = self.fresh(node, producer=name)
        self.out_slices(name, module, out.entries)
        if groups > 1:  # every group of the conv must keep the same number of inputs and outputs
            self.equal_counts(np.split(chan.entries, groups))
            self.equal_counts(np.split(out.entries, groups))
        return out

    def group_norm(self, node: torch.fx.Node, name: str, module: nn.GroupNorm, chan: _Chan | None) -> _Chan | None:
        if not self.channels_first(chan):
            return self.unsupported(node, f"GroupNorm '{name}' on a tensor whose axis 1 is not channels")
        if module.num_groups == 1:
            return self.mixing(node, chan, f"GroupNorm '{name}' with one group (normalises over all channels)")
        # statistics are per normalisation group: a channel group is removed whole or kept whole
        for block in np.split(chan.entries, module.num_groups):
            self.tie(block[:1].repeat(len(block)), block)
        for tensor_name, _ in _per_channel_tensors(module):
            self.slice(name, tensor_name, 0, chan.entries, "through")
        return chan

    def layer_norm(self, node: torch.fx.Node, name: str, module: nn.LayerNorm, chan: _Chan | None) -> _Chan | None:
        rank = len(_shape(node))
        normalised = set(range(rank - len(module.normalized_shape), rank))
        if chan is not None and normalised & set(chan.dims()):
            return self.mixing(node, chan, f"LayerNorm '{name}' normalising over the channel axis")
        return chan

    def along(self, node: torch.fx.Node, chan: _Chan | None, dim: Any, what: str) -> _Chan | None:
        """An op mixing values along ``dim``: fine unless that is a channel axis."""
        rank = len(_shape(node))
        if chan is not None and (dim is None or dim % rank in chan.dims()):
            return self.mixing(node, chan, f"{what} over the channel axis")
        return chan

    def visit_function(self, node: torch.fx.Node) -> _Chan | None:
        target, method = node.target, node.op == "call_method"
        first = node.args[0] if node.args else None
        chan = self.chans.get(first)

        def among(functions: set, methods: set) -> bool:
            return target in methods if method else target in functions

        if among(_ELEMENTWISE_FUNCTIONS, _ELEMENTWISE_METHODS):
            return chan
        if among(_SPATIAL_FUNCTIONS, set()):
            return chan if chan is None or self.channels_first(chan) else self.unsupported(
                node, f"'{_target_name(node)}' on a channels-last tensor")
        if among(_BINARY, _BINARY_METHODS):
            return self.binary(node)
        if not method and target is torch.cat:
            return self.cat(node)
        if among(_RESHAPES, _RESHAPE_METHODS):
            return self.reshape(node, first)
        if among(_PERMUTES, _PERMUTE_METHODS):
            return self.permute(node, first)
        if among(_REDUCTIONS, _REDUCTION_METHODS):
            return self.reduction(node, first)
        if among({_F.softmax, _F.log_softmax, torch.softmax}, {"softmax", "log_softmax"}):
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            return self.along(node, chan, dim, f"'{_target_name(node)}'")
        return self.unsupported(node, f"'{_target_name(node)}'")

    # -- element-wise binary ops -----------------------------------------------------------
    def binary(self, node: torch.fx.Node) -> _Chan | None:
        out_shape = _shape(node)
        rank = len(out_shape)
        result: _Chan | None = None
        attrs = []
        for arg in node.args[:2]:
            if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
                attrs.append(arg)
                continue
            shape, chan = _shape(arg), self.chans.get(arg)
            if shape is None or chan is None:
                continue
            if len(shape) != rank:
                return self.unsupported(node, f"'{_target_name(node)}' broadcasting a lower-rank tensor")
            if any(shape[d] == 1 and out_shape[d] != 1 for d in chan.dims()):
                continue  # broadcast along the channel axis: scales every channel alike
            if result is None:
                result = chan
            elif result.axis != chan.axis or result.entries.shape != chan.entries.shape:
                return self.unsupported(node, f"'{_target_name(node)}' of tensors with different channel layouts")
            else:
                self.tie(result.entries, chan.entries)
        for attr in attrs:
            if result is not None and not self.layer_scale(attr, result, rank):
                return self.unsupported(node, f"'{_target_name(node)}' with tensor attribute '{attr.target}'")
        return result if result is not None else self.fresh(node)

    def layer_scale(self, attr: torch.fx.Node, chan: _Chan, rank: int) -> bool:
        """A parameter broadcast against the channels (layer scale, a per-channel affine)."""
        value = _resolve(self.root, str(attr.target))
        if not isinstance(value, torch.Tensor) or value.ndim > rank or chan.entries.ndim != 1:
            return False
        shape = (1,) * (rank - value.ndim) + tuple(value.shape)
        varying = [d for d, size in enumerate(shape) if size != 1]
        if not varying:
            return True
        if varying != [chan.axis] or shape[chan.axis] != len(chan.entries):
            return False
        owner, _, tensor_name = str(attr.target).rpartition(".")
        for s in self.slices:
            if s.module == owner and s.tensor == tensor_name:  # the same parameter scales another tensor too
                self.tie(s.entries, chan.entries)
                return True
        self.slice(owner, tensor_name, chan.axis - (rank - value.ndim), chan.entries, "through")
        return True

    def cat(self, node: torch.fx.Node) -> _Chan | None:
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        dim %= len(_shape(node))
        parts = [self.chans.get(t) for t in tensors]
        if any(p is None for p in parts) or len({(p.axis, p.entries.ndim) for p in parts}) != 1:
            return self.unsupported(node, "'cat' of tensors with different channel layouts")
        first = parts[0]
        if first.entries.ndim == 1 and dim == first.axis:
            return _Chan(np.concatenate([p.entries for p in parts]), first.axis)
        if dim in first.dims() or dim == 0:
            return self.unsupported(node, f"'cat' along axis {dim}")
        for part in parts[1:]:
            if part.entries.shape != first.entries.shape:
                return self.unsupported(node, "'cat' of tensors with different channel layouts")
            self.tie(first.entries, part.entries)
        return first

    def chunk(self, node: torch.fx.Node) -> list[_Chan | None] | None:
        src = node.args[0]
        chan, shape = self.chans.get(src), _shape(src)
        how = node.args[1] if len(node.args) > 1 else node.kwargs.get("chunks", node.kwargs.get("split_size_or_sections"))
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        dim %= len(shape)
        is_chunk = node.target in (torch.chunk, "chunk")
        if chan is None or dim not in chan.dims():
            sizes = _split_sizes(shape[dim], how, is_chunk)
            return [chan] * len(sizes)
        if not (is_chunk and chan.entries.ndim == 1 and shape[dim] % how == 0):
            self.unsupported(node, f"'{_target_name(node)}' of the channel axis into fixed sizes")
            return None
        pieces = np.split(chan.entries, how)
        self.equal_counts(pieces)  # chunk splits the pruned axis evenly: blocks keep equal counts
        return [_Chan(p, chan.axis) for p in pieces]

    def getitem(self, node: torch.fx.Node) -> Any:
        container, index = node.args[:2]
        value = self.chans.get(container)
        if isinstance(value, list):
            return value[index]
        if not isinstance(value, _Chan):
            return None
        # tensor indexing: fine while every axis up to the channel axes is taken whole
        items = index if isinstance(index, tuple) else (index,)
        head = items[: value.axis + value.entries.ndim]
        if all(isinstance(i, slice) and i == slice(None) for i in head):
            return value
        return self.unsupported(node, "indexing that selects channels")

    # -- layout changes --------------------------------------------------------------------
    def reshape(self, node: torch.fx.Node, src: Any) -> _Chan | None:
        before, after = _shape(src), _shape(node)
        chan = self.chans.get(src)
        if chan is None:
            return self.fresh(node)
        if before is None or after is None or not after or after[0] != before[0]:
            return self.unsupported(node, f"'{_target_name(node)}' that changes the batch axis")
        # the entry of every element, moved with the data
        full = np.broadcast_to(chan.entries.reshape(_layout(before, chan)), before[1:]).reshape(after[1:])
        dims = [d + 1 for d in range(full.ndim) if full.shape[d] > 1 and not _constant_along(full, d)]
        if not dims:
            return _Chan(full.reshape(-1)[:1], 1) if full.size else None
        if dims != list(range(dims[0], dims[-1] + 1)):
            return self.unsupported(node, f"'{_target_name(node)}' that interleaves channels with other axes")
        index = tuple(slice(None) if d + 1 in dims else 0 for d in range(full.ndim))
        entries = np.ascontiguousarray(full[index])
        if entries.ndim > chan.entries.ndim and chan.entries.ndim == 1 and entries.size == chan.entries.size:
            # the channel axis is split into blocks: tie each column so the blocks stay aligned
            columns = entries.reshape(entries.shape[0], -1)
            for col in columns.T:
                self.tie(col[:1].repeat(len(col)), col)
        atoms = np.vectorize(self.atoms.find, otypes=[np.int64])(entries) if entries.size else entries
        shrinking = [dims[0] + d for d in range(entries.ndim) if not _constant_along(atoms, d)]
        if self.literal_size(node, shrinking):
            return self.unsupported(node, f"'{_target_name(node)}' with a hard-coded channel count")
        return _Chan(entries, dims[0])

    def literal_size(self, node: torch.fx.Node, dims: list[int]) -> bool:
        """A view/reshape with a literal size on an axis that pruning shrinks breaks after surgery."""
        if node.target not in ("view", "reshape", torch.reshape):
            return False
        sizes = node.args[1:] if node.target != torch.reshape else node.args[1:2]
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            sizes = sizes[0]
        return any(isinstance(sizes[d], int) and sizes[d] not in (-1, 1) for d in dims if d < len(sizes))

    def permute(self, node: torch.fx.Node, src: Any) -> _Chan | None:
        chan, rank = self.chans.get(src), len(_shape(node))
        if chan is None:
            return None
        if node.target in (torch.transpose, "transpose"):
            a, b = (d % rank for d in node.args[1:3])
            order = list(range(rank))
            order[a], order[b] = order[b], order[a]
        else:
            order = node.args[1:] if node.target == "permute" else node.args[1]
            if len(order) == 1 and isinstance(order[0], (tuple, list)):
                order = order[0]
            order = [d % rank for d in order]
        if order[0] != 0:
            return self.unsupported(node, f"'{_target_name(node)}' that moves the batch axis")
        new_positions = [order.index(d) for d in chan.dims()]
        lo = min(new_positions)
        if sorted(new_positions) != list(range(lo, lo + len(new_positions))):
            return self.unsupported(node, f"'{_target_name(node)}' that separates the channel axes")
        axes = np.argsort(new_positions)
        return _Chan(np.ascontiguousarray(chan.entries.transpose(axes)), lo)

    def reduction(self, node: torch.fx.Node, src: Any) -> _Chan | None:
        chan, before = self.chans.get(src), _shape(src)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if chan is None:
            return None
        if dims is None:
            return self.unsupported(node, f"'{_target_name(node)}' over all axes")
        dims = {d % len(before) for d in (dims if isinstance(dims, Sequence) else (dims,))}
        if 0 in dims or dims & set(chan.dims()):
            return self.unsupported(node, f"'{_target_name(node)}' over the channel axis")
        keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        shift = 0 if keepdim else sum(d < chan.axis for d in dims)
        return _Chan(chan.entries, chan.axis - shift)


def _layout(shape: tuple[int, ...], chan: _Chan) -> tuple[int, ...]:
    """``shape[1:]`` with 1 on every axis that is not a channel axis (for broadcasting)."""
    return tuple(s if d in chan.dims() else 1 for d, s in enumerate(shape) if d > 0)


def _constant_along(array: np.ndarray, axis: int) -> bool:
    return bool((np.take(array, [0], axis=axis) == array).all())


def _split_sizes(total: int, how: Any, is_chunk: bool) -> list[int]:
    if is_chunk:
        step = -(-total // how)
        return [min(step, total - i) for i in range(0, total, step)]
    if isinstance(how, int):
        return [min(how, total - i) for i in range(0, total, how)]
    return list(how)


def _per_channel_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, t) for n, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
            if t is not None and t.ndim == 1]


def _flatten_chans(value: Any) -> list[_Chan]:
    if isinstance(value, _Chan):
        return [value]
    if isinstance(value, list):
        return [c for v in value for c in _flatten_chans(v)]
    return []


def _resolve(root: nn.Module, path: str) -> Any:
    value: Any = root
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _target_name(node: torch.fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))

"""The channel dependency graph: which slices of which tensors belong to one channel.

The model is traced with ``torch.export`` into ATen ops (the same IR that ``.pt2`` programs
hold), so functional calls (``F.batch_norm``, ``F.conv2d``, ``F.linear``), custom modules and
Python-level shape logic all reduce to one bounded vocabulary of core ops. Parameters come
back to the user's own modules by their qualified names, so surgery slices the user's modules.

Every channel a Conv or Linear produces gets an *entry* id, and every tensor records the entry
at each position of its channel axis (a numpy array; 2-D after a reshape splits the axis).
What each op does to the entries is one small rule per op in :mod:`.oprules` (a registry:
supporting a new op is one function there). In short:

* Conv / Linear read their input entries (*in* slices of the weight) and create new ones
  (*out* slices of weight and bias); a depthwise conv passes its input entries through;
* per-channel tensors (BatchNorm, GroupNorm, PReLU, a layer-scale parameter) carry a
  *through* slice and pass entries on; activations, pooling, dropout just pass them on;
* element-wise binary ops (residual add, gating) *tie* their operands' entries position by
  position; ``cat`` on the channel axis concatenates, elsewhere it ties;
* reshapes and permutes move the entries with the data (flatten repeats a channel's entry
  over its spatial features; a channel shuffle permutes them); splitting the channel axis
  ties the entries in each column so every block keeps the same channels in the same order;
* ``chunk`` on the channel axis and grouped convs require their blocks to keep equal counts;
* a parameter used twice (shared weights, one BatchNorm applied to two tensors) ties the
  entries of its uses.

Values that carry no entries are of two kinds. A :class:`ParamView` is a parameter seen through
ops that only move its values (``cls_token.expand``, a relative-position table gathered and
permuted): where one of its axes lines up with a channel axis it gets a *through* slice. An
:class:`Opaque` tensor is one whose layout the rules cannot follow (a model input, an op without
a rule): whatever it meets is frozen, and a layer reading it just cannot lose input channels.

Tied entries form one *channel* (an atom: kept or removed together). Channels linked
through any producer or tie form a :class:`ChannelGroup`, the unit a plan prunes. An op the
rules do not cover *freezes* every group that reaches it (never pruned), with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.fx
from torch import nn

from ..errors import StructADMMError, one_line
from ..layers import eval_mode, quiet_torch
from .heads import traced_as_heads

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
    weight: bool = False  #: the weight matrix of a Conv or Linear (not its bias or a norm's tensor)

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
    #: group id -> the first op that gives the group's channel count as a number (view, reshape,
    #: expand): the model's code may have written that number down (see ``surgery.freeze_fixed_sizes``)
    sized: dict[int, str] = field(default_factory=dict)
    #: group id -> the first LayerNorm that normalises over the group's channels (a transformer's
    #: residual stream): prunable only as a whole stream, and only when asked (``residual``)
    normalised: dict[int, str] = field(default_factory=dict)

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
                if s.role == "out" and s.weight]

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


def slice_groups(graph: ChannelGraph, s: Slice) -> np.ndarray:
    """The channel group id at every position of slice ``s``."""
    return graph.group_of[graph.atom_of[s.entries]]


def trace(model: nn.Module, example_inputs: Any) -> ChannelGraph:
    """Trace ``model`` with ``torch.export`` and return its channel graph (module docstring).

    The model runs in eval mode for the trace (no BatchNorm statistics change) and is left in
    the mode it was in. Its ``nn.MultiheadAttention`` modules are traced as the
    :class:`~.heads.HeadAttention` that surgery turns them into (same parameters, same names)
    and are back in place afterwards; nothing else about the model is touched.
    """
    from . import oprules  # noqa: F401  (importing it registers the op rules)

    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    with eval_mode(model), traced_as_heads(model):
        try:
            with quiet_torch(), torch.no_grad():
                program = torch.export.export(model, inputs, strict=False)
        except Exception as exc:  # export raises many types for untraceable Python
            _check_inputs_fit(model, inputs)
            raise StructADMMError(
                f"cannot trace {type(model).__name__} with torch.export ({one_line(exc)}); "
                "models with data-dependent Python control flow need that logic moved out of forward()"
            ) from None
        return Walk(program, model).run()


def _check_inputs_fit(model: nn.Module, inputs: tuple) -> None:
    """Run ``model`` on ``inputs`` (eval, no grad): a failure means the inputs do not fit it."""
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as exc:
        shapes = [tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor)]
        raise StructADMMError(
            f"the example input (shape {shapes}) does not fit {type(model).__name__}: {one_line(exc)}"
        ) from None


# -- the op-rule registry --------------------------------------------------------------------

#: ATen op (an ``OpOverloadPacket`` such as ``torch.ops.aten.relu``, or a Python callable such
#: as ``operator.getitem``) -> its rule. A rule takes the :class:`Walk` and the node and returns
#: the node's channel layout: a :class:`Chan`, a list of them for ops returning several tensors,
#: or None for a tensor without channels.
RULES: dict[Any, Callable[["Walk", torch.fx.Node], Any]] = {}


#: rules that decide themselves what a tensor the rules could not follow (:class:`Opaque`) means to
#: them (a layer reading it, an element-wise op meeting it); for every other op such an input makes
#: the result opaque too
READS_OPAQUE: set[Callable] = set()

#: ATen op -> how it moves a :class:`ParamView`'s axes (view, permute, expand, indexing); returns
#: the result's ParamView, or None where the axes are lost
PARAM_VIEWS: dict[Any, Callable[["Walk", torch.fx.Node], "ParamView | None"]] = {}


def rule(*ops: Any, reads_opaque: bool = False) -> Callable:
    """Register the decorated function as the rule of ``ops``."""

    def register(fn: Callable) -> Callable:
        for op in ops:
            RULES[op] = fn
        if reads_opaque:
            READS_OPAQUE.add(fn)
        return fn

    return register


def param_view(*ops: Any) -> Callable:
    """Register the decorated function as how ``ops`` move a parameter's axes."""

    def register(fn: Callable) -> Callable:
        for op in ops:
            PARAM_VIEWS[op] = fn
        return fn

    return register


def rule_of(target: Any) -> Callable | None:
    found = RULES.get(target)
    if found is None and hasattr(target, "overloadpacket"):
        found = RULES.get(target.overloadpacket)
    return found


class UnionFind:
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
class Chan:
    """A tensor's channel layout: ``entries`` occupies dims ``axis .. axis + entries.ndim``.

    ``split``: the layout comes from splitting one channel axis into blocks (``[heads,
    head_dim]``) and the blocks are not aligned yet; reading it through :meth:`Walk.chan` ties
    each column across the blocks, unless a permute first makes each block one channel (a head).
    """

    entries: np.ndarray
    axis: int
    split: bool = False

    def dims(self) -> range:
        return range(self.axis, self.axis + self.entries.ndim)


@dataclass(frozen=True)
class Param:
    """A parameter or buffer of the user's model, as a graph placeholder refers to it."""

    module: str
    tensor: str


@dataclass(frozen=True)
class ParamView:
    """A tensor made from one parameter by ops that only move its values: ``axes[d]`` is the
    parameter axis that dimension ``d`` runs along (None where it runs along none)."""

    param: Param
    axes: tuple[int | None, ...]


@dataclass(frozen=True)
class Opaque:
    """A tensor whose channel layout the rules cannot follow; ``reason`` freezes what it meets."""

    reason: str


class Walk:
    """One pass over an exported program: the rules' shared state and the tools they use."""

    def __init__(self, program: torch.export.ExportedProgram, model: nn.Module) -> None:
        self.graph = program.graph
        self.root = model
        self.modules = dict(model.named_modules())
        self.params: dict[str, Param] = {}
        for spec in program.graph_signature.input_specs:
            if spec.target is not None and spec.kind.name in ("PARAMETER", "BUFFER"):
                owner, _, tensor = spec.target.rpartition(".")
                self.params[spec.arg.name] = Param(owner, tensor)
        self.atoms = UnionFind()  # entries that are one channel
        self.groups = UnionFind()  # entries pruned by one plan unit
        self.frozen: dict[int, str] = {}  # entry -> reason (resolved to groups at the end)
        self.producer: dict[int, str] = {}  # first entry of each new block -> the module producing it
        self.slices: list[Slice] = []
        self.blocks: list[list[np.ndarray]] = []
        self.values: dict[torch.fx.Node, Any] = {}
        self.notes: list[str] = []
        self.sized_entries: dict[int, str] = {}
        self.normalised_entries: dict[int, str] = {}
        self.materialised: dict[tuple[torch.fx.Node, int], Chan] = {}

    # -- what rules read -------------------------------------------------------------------
    def chan(self, arg: Any) -> Chan | None:
        value = self.values.get(arg) if isinstance(arg, torch.fx.Node) else None
        if not isinstance(value, Chan):
            return None
        if value.split:  # blocks of a split channel axis stay aligned: tie each column across them
            for column in value.entries.reshape(value.entries.shape[0], -1).T:
                self.tie(column[:1].repeat(len(column)), column)
            value = self.values[arg] = Chan(value.entries, value.axis)
        return value

    def value(self, arg: Any) -> Any:
        return self.values.get(arg) if isinstance(arg, torch.fx.Node) else None

    def view(self, arg: Any) -> ParamView | None:
        value = self.value(arg)
        return value if isinstance(value, ParamView) else None

    def read(self, arg: Any, axis: int) -> Chan | None:
        """The layout of ``arg`` for a layer that reads it along ``axis``: its :class:`Chan`, or,
        for a tensor the rules could not follow, new frozen entries along ``axis``."""
        chan = self.chan(arg)
        value = self.value(arg)
        if chan is not None or not isinstance(value, Opaque):
            return chan
        key = (arg, axis % len(self.shape(arg)))
        if key not in self.materialised:
            self.materialised[key] = Chan(self.new(self.shape(arg)[key[1]], frozen=value.reason), key[1])
        return self.materialised[key]

    def align(self, arg: Any, chan: Chan, rank: int) -> bool:
        """Line ``arg`` up with ``chan`` in an op whose result has ``rank`` axes (element-wise
        broadcasting): True when it is the same for every channel, a parameter whose matching
        axis follows the channels (it gets a *through* slice), or a tensor the rules could not
        follow (the channels are frozen); False for per-channel values it cannot follow."""
        shape = self.shape(arg)
        if shape is None:
            return True
        offset = rank - len(shape)
        dims = [d - offset for d in chan.dims()]
        if any(d < 0 for d in dims) or all(shape[d] == 1 for d in dims):
            return True
        value = self.value(arg)
        if isinstance(value, Opaque):
            self.freeze([chan], value.reason)
            return True
        if isinstance(value, ParamView) and chan.entries.ndim == 1:
            axis = value.axes[dims[0]]
            if axis is not None and shape[dims[0]] == len(chan.entries) == self.tensor_of(value.param).shape[axis]:
                self.slice(value.param, axis, chan.entries, "through")
                return True
        return False

    def param(self, arg: Any) -> Param | None:
        return self.params.get(arg.name) if isinstance(arg, torch.fx.Node) and arg.op == "placeholder" else None

    def tensor_of(self, p: Param) -> torch.Tensor:
        return getattr(self.modules[p.module], p.tensor)

    @staticmethod
    def shape(arg: Any) -> tuple[int, ...] | None:
        value = arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None
        return tuple(int(d) for d in value.shape) if isinstance(value, torch.Tensor) else None

    @staticmethod
    def bind(node: torch.fx.Node) -> dict[str, Any]:
        """The node's arguments by their schema names, defaults filled in."""
        schema = getattr(node.target, "_schema", None)
        if schema is None:
            return {str(i): a for i, a in enumerate(node.args)} | dict(node.kwargs)
        bound: dict[str, Any] = {}
        for i, spec in enumerate(schema.arguments):
            if i < len(node.args):
                bound[spec.name] = node.args[i]
            elif spec.name in node.kwargs:
                bound[spec.name] = node.kwargs[spec.name]
            elif spec.has_default_value():
                bound[spec.name] = spec.default_value
        return bound

    @staticmethod
    def called_as(node: torch.fx.Node) -> str:
        """The Python-level call the node came from ('chunk', 'split', ...), where export kept it."""
        fn = node.meta.get("torch_fn")
        return fn[1].rpartition(".")[2] if fn else ""

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
            for c in flatten_chans(chan):
                for e in np.unique(c.entries).tolist():  # every group the tensor touches
                    self.frozen.setdefault(e, reason)

    def unsupported(self, node: torch.fx.Node, what: str) -> Chan | None:
        """An op the rules cannot follow: freeze what reaches it; its result is opaque."""
        reason = f"{what} {where(node)}"
        touched = [self.values.get(a) for a in node.all_input_nodes if self.values.get(a) is not None]
        self.notes.append(f"{reason}: channels reaching it are not pruned")
        self.freeze(touched, reason)
        return Opaque(reason)

    def mixing(self, node: torch.fx.Node, chan: Chan | None, what: str) -> Chan | None:
        """An op that mixes values across channels but keeps the layout: freeze, pass on."""
        reason = f"{what} {where(node)}"
        if chan is not None:
            self.notes.append(f"{reason}: channels reaching it are not pruned")
            self.freeze([chan], reason)
        return chan

    def fresh(self, node: torch.fx.Node, producer: str | None = None, frozen: str | None = None,
              axis: int = 1) -> Chan | None:
        shape = self.shape(node)
        if shape is None or len(shape) <= axis:
            return None
        return Chan(self.new(shape[axis], producer, frozen), axis)

    def equal_counts(self, blocks: list[np.ndarray]) -> None:
        """Require ``blocks`` to keep equal numbers of channels; they become one group."""
        self.blocks.append(blocks)
        first = int(blocks[0].flat[0])
        for e in np.concatenate([b.ravel() for b in blocks]).tolist():
            self.groups.union(first, e)

    def one_channel_along(self, entries: np.ndarray, axis: int) -> bool:
        """Whether ``entries`` are one channel (tied already) all along ``axis``."""
        roots = np.vectorize(self.atoms.find, otypes=[np.int64])(entries) if entries.size else entries
        return bool((np.take(roots, [0], axis=axis) == roots).all())

    def normalised(self, node: torch.fx.Node, chan: Chan) -> None:
        """``node`` normalises over ``chan``'s channels (a LayerNorm over a residual stream)."""
        what = f"layer norm over the channel axis {where(node)}"
        for e in np.unique(chan.entries).tolist():
            self.normalised_entries.setdefault(e, what)

    def sized(self, node: torch.fx.Node, chan: Chan) -> None:
        """``node`` states ``chan``'s channel count as a number: a size the code may hard-code."""
        what = f"'{op_name(node)}' {where(node)}"
        for e in np.unique(chan.entries).tolist():
            self.sized_entries.setdefault(e, what)

    def slice(self, p: Param, axis: int, entries: np.ndarray, role: str, groups: int = 1, weight: bool = False) -> None:
        """Record that ``axis`` of parameter ``p`` follows ``entries``; a parameter used again
        (shared weights) ties the new entries to the first use's instead."""
        entries = np.asarray(entries).ravel()
        for s in self.slices:
            if (s.module, s.tensor, s.axis, s.role) == (p.module, p.tensor, axis, role):
                if len(s.entries) == len(entries):
                    self.tie(s.entries, entries)
                    return
                raise StructADMMError(f"'{s.name}' is used with two different channel layouts")
        self.slices.append(Slice(p.module, p.tensor, axis, entries, role, groups, weight))

    # -- the walk --------------------------------------------------------------------------
    def run(self) -> ChannelGraph:
        for node in self.graph.nodes:
            self.values[node] = self.visit(node)
        return self.build()

    def visit(self, node: torch.fx.Node) -> Any:
        if node.op == "placeholder":
            if node.name in self.params:
                p = self.params[node.name]
                return ParamView(p, tuple(range(self.tensor_of(p).ndim)))
            return None if self.shape(node) is None else Opaque("model input")
        if node.op == "output":
            self.freeze([self.values.get(a) for a in node.all_input_nodes], "model output")
            return None
        if node.op != "call_function":
            return None
        found = rule_of(node.target)
        inputs = [self.values.get(a) for a in node.all_input_nodes]
        if not any(flatten_chans(v) for v in inputs) and found not in READS_OPAQUE:
            # nothing with channels reaches it: it passes on what it was made from
            opaque = next((v for v in inputs if isinstance(v, Opaque)), None)
            views = [v for v in inputs if isinstance(v, ParamView)]
            if opaque is None and views:
                made = PARAM_VIEWS.get(getattr(node.target, "overloadpacket", node.target))
                source = node.args[0] if node.args else None  # the viewed tensor; others index it
                view = made(self, node) if made is not None and self.view(source) is not None else None
                opaque = view if view is not None else Opaque(f"values computed from '{views[0].param.module}."
                                                              f"{views[0].param.tensor}' in forward()")
            if opaque is not None:
                return [opaque] * len(node.meta["val"]) if isinstance(node.meta.get("val"), (tuple, list)) else opaque
        if found is not None:
            return found(self, node)
        if not any(flatten_chans(v) for v in inputs):
            return None  # a new tensor made from constants
        return self.unsupported(node, f"'{op_name(node)}'")

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
        blocks = []
        for constraint in self.blocks:
            atoms = equal_count_atoms([atom_of[b] for b in constraint])
            if atoms is None:
                reasons.setdefault(int(group_of[atom_of[constraint[0].flat[0]]]),
                                   "channels shuffled unevenly across the blocks of a chunk or grouped conv")
            elif atoms:
                blocks.append(atoms)
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
            prods = list(dict.fromkeys(producers.get(gid, [])))
            frozen = reasons.get(gid)
            if frozen is None and not prods:
                frozen = "no layer produces these channels"
            if frozen is None and not consumers.get(gid):
                frozen = "no Conv or Linear reads these channels"
            name = prods[0] + (f"+{len(prods) - 1}" if len(prods) > 1 else "") if prods else f"group{gid}"
            groups.append(ChannelGroup(gid, np.array(members.get(gid, []), dtype=np.int64), name, prods,
                                       list(dict.fromkeys(consumers.get(gid, []))), frozen))
        sized: dict[int, str] = {}
        for entry, what in self.sized_entries.items():
            sized.setdefault(int(group_of_entry[entry]), what)
        normalised: dict[int, str] = {}
        for entry, what in self.normalised_entries.items():
            normalised.setdefault(int(group_of_entry[entry]), what)
        return ChannelGraph(groups, self.slices, atom_of, local_of, group_of, blocks, self.modules,
                            list(dict.fromkeys(self.notes)), sized, normalised)


def equal_count_atoms(blocks: list[np.ndarray]) -> list[np.ndarray] | None:
    """Blocks of entries (as atom ids) that must keep equal numbers of *entries*, as blocks of
    atoms that must keep equal numbers of atoms: [] when any choice keeps the counts equal,
    None when no atom-count constraint says it (an atom with uneven weight across blocks).

    An atom may own several entries (a channel shuffle ties them). One with the same number of
    entries in every block removes as many from each, so it is free; the rest must each lie in
    one block only, all with the same number of entries there.
    """
    ids = np.unique(np.concatenate(blocks))
    counts = np.stack([np.bincount(np.searchsorted(ids, b), minlength=len(ids)) for b in blocks])
    uneven = ~(counts == counts[:1]).all(0)
    if not uneven.any():
        return []
    rest = counts[:, uneven]
    if ((rest > 0).sum(0) != 1).any() or len(np.unique(rest[rest > 0])) != 1:
        return None
    return [ids[uneven][rest[i] > 0] for i in range(len(blocks))]


def flatten_chans(value: Any) -> list[Chan]:
    if isinstance(value, Chan):
        return [value]
    if isinstance(value, (list, tuple)):
        return [c for v in value for c in flatten_chans(v)]
    return []


def where(node: torch.fx.Node) -> str:
    """Where in the user's model ``node`` runs: its innermost module, else the node's name."""
    stack = node.meta.get("nn_module_stack") or {}
    path = next((p for p, _ in reversed(list(stack.values())) if p), None)
    return f"in '{path}'" if path else f"at node '{node.name}'"


def op_name(node: torch.fx.Node) -> str:
    """A readable name for the op behind ``node`` ('conv2d', 'getitem', ...)."""
    target = node.target
    if hasattr(target, "overloadpacket"):
        return target.overloadpacket.__name__
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))

"""The op-rule registry and the small vocabulary rules speak: :class:`Chan`, :class:`Walk`.

What each ATen op does to channels is one function, a *rule*, registered here for its ops with
``@rule(aten.the_op, ...)`` (the rules themselves live in :mod:`.rules`, which registers them when
the package is imported). :func:`.trace.trace` walks the exported program node by node and calls
the rule of each ``call_function`` node.

The rule contract
-----------------
Inputs
    ``rule(w, node)``: the :class:`Walk` (the trace's state) and one ``torch.fx.Node``. Read the
    node's arguments by schema name with ``w.bind(node)``. Each *tensor operand* is read through
    the Walk, never from ``w.values`` directly:

    * ``w.chan(arg)``: its channel layout (:class:`Chan`), or None. Use it where the op follows the
      channels (activations, norms, adds). It also settles a split axis (``Chan.split``: it ties
      each column across the blocks), so call it only where the op really aligns the blocks.
    * ``w.read(arg, axis)``: like ``chan``, for a *layer* that reads ``arg`` along ``axis`` (a
      Conv's input, a Linear's features): a tensor the rules could not follow (:class:`Opaque`)
      gets new frozen entries there, so the layer keeps its inputs but may still lose outputs.
      A rule that uses ``read`` registers with ``reads_opaque=True``.
    * ``w.value(arg)`` / ``w.view(arg)``: what the operand is without settling anything: a
      :class:`Chan`, a :class:`ParamView` (a parameter seen through ops that only move its
      values), an :class:`Opaque`, or None. Use it to decide before committing to a layout.
    * ``w.param(arg)``: the :class:`Param` behind a parameter placeholder (a layer's weight).
    * ``w.align(arg, chan, rank)``: an operand broadcast against ``chan`` (a per-channel scale).

    Operands that carry no channels (index tensors, masks, shapes, plain numbers) still pass
    through ``value`` or ``align`` so the rule decides what they mean. A rule that leaves a tensor
    operand unread is a bug (its channels would be silently ignored); :func:`.trace.audit_rules`
    finds such rules and the test suite runs it over the model corpus.

Outputs
    The node's layout: a :class:`Chan` (``entries`` along ``axis``), None for a tensor without
    channels, a :class:`ParamView` or :class:`Opaque` passed on, or, for an op returning several
    tensors, a list with one of those per output in the op's output order (``getitem`` picks).

What a rule does on the way
    * ``w.slice(param, axis, entries, role)``: a parameter's axis follows these channels
      (``role`` ``"out"`` for a layer's outputs, ``"through"`` for per-channel tensors, ``"in"``
      for a layer's inputs); surgery slices exactly the slices recorded.
    * ``w.fresh(node, producer=...)`` / ``w.new(n)``: new channels made by a layer.
    * ``w.tie(a, b)``: entries that are one channel (a residual add); ``w.equal_counts(blocks)``:
      blocks that must keep equal counts (grouped convs, ``chunk``).
    * Freezing: ``w.unsupported(node, what)`` when the op cannot be followed (what reaches it is
      frozen and its result is opaque); ``w.mixing(node, chan, what)`` when it mixes values across
      channels but keeps the layout; ``w.freeze(chans, reason)`` directly. Every freeze leaves its
      reason, which reaches the plan and the user.
    * ``w.sized(node, chan)`` when the op states a channel count as a number the code may have
      written down; ``w.normalised(node, chan)`` for a LayerNorm over the channel axis.

Registering a second rule for an op raises, unless asked with ``replace=True``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.fx
from torch import nn

from ..errors import StructADMMError
from .channels import ChannelGraph, ChannelGroup, Slice, equal_count_atoms


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


def rule(*ops: Any, reads_opaque: bool = False, replace: bool = False) -> Callable:
    """Register the decorated function as the rule of ``ops`` (the module docstring's contract).

    An op that has a rule already raises :class:`StructADMMError` unless ``replace`` is True.
    """

    def register(fn: Callable) -> Callable:
        _check_new(RULES, ops, replace, "a rule")
        for op in ops:
            RULES[op] = fn
        if reads_opaque:
            READS_OPAQUE.add(fn)
        return fn

    return register


def param_view(*ops: Any, replace: bool = False) -> Callable:
    """Register the decorated function as how ``ops`` move a parameter's axes."""

    def register(fn: Callable) -> Callable:
        _check_new(PARAM_VIEWS, ops, replace, "a parameter-view rule")
        for op in ops:
            PARAM_VIEWS[op] = fn
        return fn

    return register


def _check_new(table: dict, ops: tuple, replace: bool, what: str) -> None:
    taken = [getattr(op, "__name__", str(op)) for op in ops if op in table]
    if taken and not replace:
        raise StructADMMError(f"{', '.join(taken)} already has {what}; register with replace=True to override it")


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
        # a tensor shared by several modules (tied weights) has several names: the graph calls it by
        # the one the model lists first, which is the name every other lookup (masks, plans) uses
        first_name: dict[int, str] = {}
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            first_name.setdefault(id(tensor), name)
        for spec in program.graph_signature.input_specs:
            if spec.target is not None and spec.kind.name in ("PARAMETER", "BUFFER"):
                owner, _, attr = spec.target.rpartition(".")
                tensor = getattr(self.modules.get(owner), attr, None)
                owner, _, attr = first_name.get(id(tensor), spec.target).rpartition(".")
                self.params[spec.arg.name] = Param(owner, attr)
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
        #: when a list: every rule's tensor operands that carry something and that it left unread
        #: (see :func:`.trace.audit_rules`); None outside an audit
        self.unread: list[str] | None = None
        self.touched: set[torch.fx.Node] = set()

    # -- what rules read -------------------------------------------------------------------
    def chan(self, arg: Any) -> Chan | None:
        value = self.value(arg)
        if not isinstance(value, Chan):
            return None
        if value.split:  # blocks of a split channel axis stay aligned: tie each column across them
            for column in value.entries.reshape(value.entries.shape[0], -1).T:
                self.tie(column[:1].repeat(len(column)), column)
            value = self.values[arg] = Chan(value.entries, value.axis)
        return value

    def value(self, arg: Any) -> Any:
        if not isinstance(arg, torch.fx.Node):
            return None
        self.touched.add(arg)
        return self.values.get(arg)

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
        if not isinstance(arg, torch.fx.Node) or arg.op != "placeholder":
            return None
        self.touched.add(arg)
        return self.params.get(arg.name)

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
        self.touched.update(node.all_input_nodes)  # everything that reaches it is frozen: all read
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
        """Record that ``axis`` of parameter ``p`` follows ``entries``. A parameter used again the
        same way (one layer called twice) ties the new entries to the first use's; one used along
        the same axis in another role (an embedding tied to the output layer) freezes both."""
        entries = np.asarray(entries).ravel()
        for s in self.slices:
            if (s.module, s.tensor, s.axis) != (p.module, p.tensor, axis):
                continue
            if s.role == role and len(s.entries) == len(entries):
                self.tie(s.entries, entries)
                return
            reason = f"'{s.name}' is shared by layers that use it differently (tied weights)"
            self.notes.append(f"{reason}: its channels are not pruned")
            for e in np.unique(np.concatenate([s.entries, entries])).tolist():  # every group either touches
                self.frozen.setdefault(e, reason)
            break
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
            if self.unread is None:
                return found(self, node)
            self.touched = set()
            result = found(self, node)
            unread = [a.name for a in node.all_input_nodes
                      if a not in self.touched and (flatten_chans(self.values.get(a)) or isinstance(self.values.get(a), (ParamView, Opaque)))]
            if unread:
                self.unread.append(f"rule '{found.__name__}' of '{op_name(node)}' {where(node)} left operand(s) "
                                   f"{', '.join(unread)} unread")
            return result
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

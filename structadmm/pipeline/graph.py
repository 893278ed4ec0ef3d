"""The channel dependency graph: which slices of which parameters share one channel.

The model is traced with ``torch.fx`` and shapes are propagated with the example inputs.
Every tensor's channel axis (dim 1) is then described as a sequence of *channel spaces*.
A Conv or Linear output opens a new space; channel-preserving ops (activations, pooling,
normalisation, depthwise convs, dropout, ...) pass the spaces through; an element-wise
binary op (residual add, squeeze-excitation gate) merges the spaces of its operands into
one; ``cat`` on the channel axis concatenates them; a flatten multiplies every channel into
``spatial`` consecutive features. Merged spaces form a :class:`ChannelGroup`: removing
channel ``c`` of a group means removing, in every member, the slice that belongs to ``c``.

Nothing here knows any model: the same rules hold for chains, residual nets, concats and
squeeze-excitation blocks. An op the rules do not cover *freezes* the spaces that reach it
(they are never pruned) and the reason is kept, so nothing is silently mis-pruned.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import StructADMMError

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

#: Modules that act on each channel independently and have no per-channel parameters.
_CHANNELWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)

_F = torch.nn.functional
#: Functions and tensor methods that act on each channel independently.
_CHANNELWISE_FUNCTIONS = {
    torch.relu, _F.relu, _F.relu6, _F.leaky_relu, _F.elu, _F.gelu, _F.silu, _F.mish,
    torch.sigmoid, _F.sigmoid, torch.tanh, _F.tanh, _F.hardswish, _F.hardsigmoid, _F.hardtanh,
    _F.softplus, _F.dropout, _F.dropout1d, _F.dropout2d, _F.dropout3d,
    _F.max_pool1d, _F.max_pool2d, _F.max_pool3d, _F.avg_pool1d, _F.avg_pool2d, _F.avg_pool3d,
    _F.adaptive_avg_pool1d, _F.adaptive_avg_pool2d, _F.adaptive_avg_pool3d,
    _F.adaptive_max_pool1d, _F.adaptive_max_pool2d, _F.adaptive_max_pool3d, _F.interpolate,
    torch.abs, torch.neg, torch.exp, torch.clamp,
}
_CHANNELWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "abs", "neg", "exp", "clamp",
    "clamp_", "contiguous", "clone", "detach", "float", "to", "type_as",
}
_ELEMENTWISE_BINARY = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
}
_ELEMENTWISE_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_RESHAPES = {torch.flatten, torch.reshape}
_RESHAPE_METHODS = {"flatten", "view", "reshape", "squeeze", "unsqueeze"}
_METADATA_QUERIES = {"size", "dim", "numel", getattr, operator.getitem}
_REDUCTIONS = {torch.mean, torch.sum, torch.amax}
_REDUCTION_METHODS = {"mean", "sum", "amax"}


@dataclass(frozen=True)
class Slice:
    """Where channel ``c`` of a group lives in one module's parameters.

    ``role`` is ``"out"`` for a producer (a Conv/Linear whose output channels are the
    group: rows ``offset + c`` of weight and bias), ``"through"`` for a per-channel layer
    the channels pass through (BatchNorm, depthwise conv: entries ``offset + c`` along dim
    0 of every per-channel tensor) and ``"in"`` for a consumer (weight columns ``offset +
    c*factor ... offset + (c+1)*factor`` along dim 1; ``factor`` > 1 after a flatten).
    """

    module: str
    role: str
    offset: int = 0
    factor: int = 1


@dataclass
class ChannelGroup:
    """A set of channels that must be kept or removed together, across layers."""

    id: int
    size: int
    slices: list[Slice]
    frozen: str | None = None  # why the group must not be pruned; None if it may be

    @property
    def producers(self) -> list[str]:
        return [s.module for s in self.slices if s.role == "out"]

    @property
    def consumers(self) -> list[str]:
        return [s.module for s in self.slices if s.role == "in"]

    @property
    def name(self) -> str:
        """The first producer names the group: ``conv1`` or ``layer1.0.conv2+3``."""
        producers = self.producers or [s.module for s in self.slices] or [f"group{self.id}"]
        extra = len(producers) - 1
        return producers[0] + (f"+{extra}" if extra else "")

    @property
    def prunable(self) -> bool:
        return self.frozen is None


class _Spaces:
    """Union-find over channel spaces, each with a size, its slices and a freeze reason."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.slices: list[list[Slice]] = []
        self.frozen: list[str | None] = []

    def new(self, size: int, frozen: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.slices.append([])
        self.frozen.append(frozen)
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        if self.size[a] != self.size[b]:
            raise AssertionError(f"merging channel spaces of sizes {self.size[a]} and {self.size[b]}")
        self.parent[b] = a
        self.slices[a].extend(self.slices[b])
        self.frozen[a] = self.frozen[a] or self.frozen[b]

    def add(self, i: int, s: Slice) -> None:
        self.slices[self.find(i)].append(s)

    def freeze(self, i: int, reason: str) -> None:
        root = self.find(i)
        self.frozen[root] = self.frozen[root] or reason


# A tensor's channel axis: the spaces it is made of, in order, each with the number of
# consecutive entries per channel (1, or the spatial size after a flatten).
_Channels = tuple[tuple[int, int], ...]


@dataclass
class ChannelGraph:
    """The traced model's channel groups and the facts surgery and planning need."""

    groups: list[ChannelGroup]
    modules: dict[str, nn.Module]
    notes: list[str] = field(default_factory=list)  # ops that froze groups, for the plan summary

    def prunable_groups(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def groups_of(self, module: str, role: str) -> list[ChannelGroup]:
        return [g for g in self.groups if any(s.module == module and s.role == role for s in g.slices)]


def trace(model: nn.Module, example_inputs: Any) -> ChannelGraph:
    """Trace ``model`` and return its channel groups (see the module docstring)."""
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types for untraceable Python
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StructADMMError(
            f"cannot trace {type(model).__name__} with torch.fx ({first_line}); "
            "models with data-dependent Python control flow need that logic moved out of forward()"
        ) from None
    modes = {m: m.training for m in gm.modules()}
    gm.eval()  # shape propagation must not update BatchNorm statistics
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    except Exception as exc:
        raise StructADMMError(
            f"the example input (shape {[tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor)]}) "
            f"does not fit {type(model).__name__}: {str(exc).strip().splitlines()[0]}"
        ) from None
    finally:
        for m, training in modes.items():
            m.training = training
    return _Tracer(gm).run()


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = getattr(node, "meta", {}).get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


class _Tracer:
    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.spaces = _Spaces()
        self.channels: dict[torch.fx.Node, _Channels | None] = {}
        self.notes: list[str] = []
        self.calls: dict[str, int] = {}

    # -- helpers ---------------------------------------------------------------------
    def fresh(self, node: torch.fx.Node, frozen: str | None = None) -> _Channels | None:
        shape = _shape(node)
        if shape is None or len(shape) < 2:
            return None
        return ((self.spaces.new(shape[1], frozen), 1),)

    def freeze_all(self, args: Iterable[Any], reason: str) -> None:
        for arg in args:
            for space, _ in self.channels.get(arg) or ():
                self.spaces.freeze(space, reason)

    def unsupported(self, node: torch.fx.Node, what: str) -> _Channels | None:
        reason = f"{what} at node '{node.name}' is not understood by the channel graph"
        tensor_args = [a for a in node.all_input_nodes if self.channels.get(a)]
        if tensor_args:
            self.notes.append(reason)
        self.freeze_all(tensor_args, reason)
        return self.fresh(node, frozen=reason)

    def merge(self, a: _Channels, b: _Channels) -> bool:
        """Unify two channel axes element by element; False if their layouts differ."""
        if len(a) != len(b) or any(fa != fb for (_, fa), (_, fb) in zip(a, b)):
            return False
        if any(self.spaces.size[self.spaces.find(sa)] != self.spaces.size[self.spaces.find(sb)]
               for (sa, _), (sb, _) in zip(a, b)):
            return False
        for (sa, _), (sb, _) in zip(a, b):
            self.spaces.union(sa, sb)
        return True

    def segments(self, chans: _Channels) -> list[tuple[int, int, int]]:
        """(space, offset, factor) for every space on a channel axis."""
        out, offset = [], 0
        for space, factor in chans:
            out.append((space, offset, factor))
            offset += self.spaces.size[self.spaces.find(space)] * factor
        return out

    # -- the walk --------------------------------------------------------------------
    def run(self) -> ChannelGraph:
        for node in self.gm.graph.nodes:
            self.channels[node] = self.visit(node)
        groups = []
        roots = sorted({self.spaces.find(i) for i in range(len(self.spaces.parent))})
        for root in roots:
            slices = self.spaces.slices[root]
            if not slices:
                continue
            frozen = self.spaces.frozen[root]
            if frozen is None and not any(s.role == "in" for s in slices):
                frozen = "no layer reads these channels"
            if frozen is None and not any(s.role == "out" for s in slices):
                frozen = "no layer produces these channels"
            groups.append(ChannelGroup(len(groups), self.spaces.size[root], list(slices), frozen))
        modules = {name: m for name, m in self.modules.items() if name}
        return ChannelGraph(groups, modules, self.notes)

    def visit(self, node: torch.fx.Node) -> _Channels | None:
        if node.op == "placeholder":
            return self.fresh(node, frozen="model input")
        if node.op == "output":
            self.freeze_all(node.all_input_nodes, "model output")
            return None
        if node.op == "get_attr":
            return self.fresh(node, frozen=f"tensor attribute '{node.target}' used directly")
        shape = _shape(node)
        if shape is None:
            # sizes and shapes carry no channels; anything else without one tensor output
            # (split, chunk, unbind: tuples of tensors) would hide where channels go
            if node.target in _METADATA_QUERIES or not any(self.channels.get(a) for a in node.all_input_nodes):
                return None
            return self.unsupported(node, f"'{_target_name(node)}'")
        if node.op == "call_module":
            return self.visit_module(node, self.modules[node.target])
        return self.visit_function(node)

    def visit_module(self, node: torch.fx.Node, module: nn.Module) -> _Channels | None:
        name = str(node.target)
        self.calls[name] = self.calls.get(name, 0) + 1
        has_params = any(True for _ in module.parameters(recurse=False))
        if has_params and self.calls[name] > 1:
            return self.unsupported(node, f"module '{name}' called more than once (shared weights)")
        src = node.args[0] if node.args else None
        chans = self.channels.get(src)
        if isinstance(module, _CONVS) or isinstance(module, nn.Linear):
            if isinstance(module, nn.Linear) and len(_shape(src) or ()) != 2:
                return self.unsupported(node, f"Linear '{name}' on a tensor of rank != 2")
            groups = getattr(module, "groups", 1)
            if groups == 1:
                for space, offset, factor in self.segments(chans or ()):
                    self.spaces.add(space, Slice(name, "in", offset, factor))
                out = self.fresh(node)
                self.spaces.add(out[0][0], Slice(name, "out"))
                return out
            if groups == module.in_channels == module.out_channels and chans:
                # depthwise: output channel c is a function of input channel c alone
                for space, offset, _ in self.segments(chans):
                    self.spaces.add(space, Slice(name, "through", offset))
                return chans
            return self.unsupported(node, f"grouped convolution '{name}' (groups={groups})")
        if isinstance(module, _NORMS):
            if chans:
                for space, offset, factor in self.segments(chans):
                    if factor != 1:
                        return self.unsupported(node, f"normalisation '{name}' after a flatten")
                    self.spaces.add(space, Slice(name, "through", offset))
            return chans
        if isinstance(module, _CHANNELWISE_MODULES):
            return chans
        if isinstance(module, nn.Flatten):
            return self.reshape(node, src)
        return self.unsupported(node, f"module {type(module).__name__} '{name}'")

    def visit_function(self, node: torch.fx.Node) -> _Channels | None:
        target = node.target
        is_method = node.op == "call_method"
        first = node.args[0] if node.args else None
        if (not is_method and target in _CHANNELWISE_FUNCTIONS) or (is_method and target in _CHANNELWISE_METHODS):
            return self.channels.get(first)
        if (not is_method and target in _ELEMENTWISE_BINARY) or (is_method and target in _ELEMENTWISE_BINARY_METHODS):
            return self.binary(node)
        if not is_method and target is torch.cat:
            return self.cat(node)
        if (not is_method and target in _RESHAPES) or (is_method and target in _RESHAPE_METHODS):
            return self.reshape(node, first)
        if (not is_method and target in _REDUCTIONS) or (is_method and target in _REDUCTION_METHODS):
            return self.reduction(node, first)
        return self.unsupported(node, f"'{_target_name(node)}'")

    def binary(self, node: torch.fx.Node) -> _Channels | None:
        operands = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
        out_shape = _shape(node)
        # an operand whose channel axis is broadcast (size 1 or absent) scales all channels alike
        full = [a for a in operands if (s := _shape(a)) is not None and len(s) == len(out_shape) and s[1] == out_shape[1]]
        if len(full) < len(operands) and any(
            (s := _shape(a)) is not None and len(s) >= 2 and len(s) == len(out_shape) and s[1] != 1
            for a in operands if a not in full
        ):
            return self.unsupported(node, f"'{_target_name(node)}' with mismatched channel axes")
        if any(_shape(a) is not None and len(_shape(a)) != len(out_shape) and _shape(a) != () for a in operands):
            return self.unsupported(node, f"'{_target_name(node)}' broadcasting a lower-rank tensor")
        if not full:
            return self.fresh(node)
        result = self.channels.get(full[0])
        for other in full[1:]:
            chans = self.channels.get(other)
            if result is None or chans is None or not self.merge(result, chans):
                return self.unsupported(node, f"'{_target_name(node)}' of tensors with different channel layouts")
        return result

    def cat(self, node: torch.fx.Node) -> _Channels | None:
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        rank = len(_shape(node))
        dim = dim % rank
        parts = [self.channels.get(t) for t in tensors]
        if any(p is None for p in parts):
            return self.unsupported(node, "'cat' of tensors without a channel axis")
        if dim == 1:
            return tuple(seg for part in parts for seg in part)
        if dim == 0:
            return self.unsupported(node, "'cat' along the batch axis")
        for part in parts[1:]:
            if not self.merge(parts[0], part):
                return self.unsupported(node, "'cat' of tensors with different channel layouts")
        return parts[0]

    def reshape(self, node: torch.fx.Node, src: Any) -> _Channels | None:
        before, after = _shape(src), _shape(node)
        chans = self.channels.get(src)
        if chans is None or before is None or after is None:
            return self.unsupported(node, f"'{_target_name(node)}'")
        if len(after) >= 2 and after[0] == before[0] and after[1] == before[1]:
            # only trailing (spatial) axes changed: (N, C, 1, 1) <-> (N, C), etc.
            if math.prod(after[2:]) == math.prod(before[2:]):
                return chans
        if len(after) == 2 and after[0] == before[0] and after[1] == math.prod(before[1:]):
            spatial = math.prod(before[2:])
            return tuple((space, factor * spatial) for space, factor in chans)
        return self.unsupported(node, f"'{_target_name(node)}' from {list(before)} to {list(after)}")

    def reduction(self, node: torch.fx.Node, src: Any) -> _Channels | None:
        before = _shape(src)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if before is None or dims is None:
            return self.unsupported(node, f"'{_target_name(node)}' over all axes")
        dims = {d % len(before) for d in (dims if isinstance(dims, Sequence) else (dims,))}
        if 0 in dims or 1 in dims:
            return self.unsupported(node, f"'{_target_name(node)}' over the channel axis")
        return self.channels.get(src)


def _target_name(node: torch.fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", str(target))

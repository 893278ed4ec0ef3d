"""What each ATen op does to channels: one small rule per op, registered in ``graph.RULES``.

A rule gets the :class:`~.graph.Walk` (the trace's state: entries, ties, slices) and one node
of the exported program, and returns the node's channel layout (:class:`~.graph.Chan`, a list
of them, or None). Supporting a new op is one function here with ``@rule(aten.the_op)``; an op
without a rule freezes the channels that reach it and says so.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Sequence

import numpy as np
import torch
import torch.fx

from ..layers import CONVS
from .graph import Chan, Walk, rule

aten = torch.ops.aten
Node = torch.fx.Node


# -- ops that keep every value where it is ---------------------------------------------------

@rule(aten.relu, aten.relu_, aten.relu6, aten.gelu, aten.gelu_, aten.silu, aten.silu_, aten.sigmoid, aten.sigmoid_,
      aten.tanh, aten.tanh_, aten.hardswish, aten.hardswish_, aten.hardsigmoid, aten.hardsigmoid_, aten.hardtanh,
      aten.hardtanh_, aten.leaky_relu, aten.leaky_relu_, aten.elu, aten.elu_, aten.celu, aten.selu, aten.mish,
      aten.mish_, aten.softplus, aten.log_sigmoid, aten.abs, aten.neg, aten.exp, aten.log, aten.sqrt, aten.rsqrt,
      aten.reciprocal, aten.erf, aten.sin, aten.cos, aten.square, aten.sign, aten.clamp, aten.clamp_, aten.clamp_min,
      aten.clamp_max, aten.dropout, aten.dropout_, aten.feature_dropout, aten.alpha_dropout, aten.alias, aten.clone,
      aten.contiguous, aten.detach, aten._to_copy, aten.to, aten.type_as, aten.pow, aten.lift_fresh_copy,
      aten.nan_to_num, aten.threshold)
def elementwise(w: Walk, node: Node) -> Chan | None:
    if node.target.overloadpacket is aten.pow and isinstance(node.args[1], Node):
        return binary(w, node)
    return w.chan(node.args[0])


# -- element-wise binary ops: tie the operands position by position --------------------------

@rule(aten.add, aten.add_, aten.sub, aten.sub_, aten.rsub, aten.mul, aten.mul_, aten.div, aten.div_,
      aten.maximum, aten.minimum, aten.where, aten.eq, aten.ne, aten.gt, aten.lt, aten.ge, aten.le)
def binary(w: Walk, node: Node) -> Chan | None:
    out_shape = w.shape(node)
    if out_shape is None:
        return None
    rank = len(out_shape)
    result: Chan | None = None
    params, untracked = [], []
    for arg in node.args[:3]:
        if w.param(arg) is not None:
            params.append(w.param(arg))
            continue
        shape, chan = w.shape(arg), w.chan(arg)
        if shape is None:
            continue
        if chan is None:
            untracked.append(arg)
            continue
        if len(shape) != rank:
            return w.unsupported(node, f"'{node.target.overloadpacket.__name__}' broadcasting a lower-rank tensor")
        if any(shape[d] == 1 and out_shape[d] != 1 for d in chan.dims()):
            continue  # broadcast along the channel axis: scales every channel alike
        if result is None:
            result = chan
        elif result.axis != chan.axis or result.entries.shape != chan.entries.shape:
            return w.unsupported(node, f"'{node.target.overloadpacket.__name__}' of tensors with different channel layouts")
        else:
            w.tie(result.entries, chan.entries)
    for p in params:
        if result is not None and not per_channel_param(w, p, result, rank):
            return w.unsupported(node, f"'{node.target.overloadpacket.__name__}' with parameter '{p.module}.{p.tensor}'")
    for arg in untracked:
        if result is not None and not untracked_operand(w, arg, result, rank):
            return w.unsupported(node, f"'{node.target.overloadpacket.__name__}' with per-channel values it cannot follow")
    return result if result is not None else w.fresh(node)


#: ops that only relabel a tensor's shape or dtype: a parameter seen through them is still itself
_RELABELS = (aten.view, aten.reshape, aten._unsafe_view, aten.unsqueeze, aten.squeeze, aten.flatten, aten.alias,
             aten.detach, aten.clone, aten.contiguous, aten._to_copy, aten.to, aten.type_as, aten.expand)


def untracked_operand(w: Walk, arg: Node, chan: Chan, rank: int) -> bool:
    """An operand that carries no channel entries: fine when it is the same for every channel,
    or a 1-D parameter reshaped to line up with them (``gamma.view(1, -1, 1, 1)``)."""
    shape = w.shape(arg)
    offset = rank - len(shape)
    if chan.entries.ndim != 1 or chan.axis < offset or shape[chan.axis - offset] == 1:
        return True
    source = arg
    while isinstance(source, Node) and source.op == "call_function" and \
            getattr(source.target, "overloadpacket", None) in _RELABELS:
        source = source.args[0]
    p = w.param(source)
    if p is None or w.tensor_of(p).ndim != 1 or w.tensor_of(p).numel() != len(chan.entries) \
            or shape[chan.axis - offset] != len(chan.entries) or math.prod(shape) != len(chan.entries):
        return False
    w.slice(p, 0, chan.entries, "through")
    return True


def per_channel_param(w: Walk, p: Any, chan: Chan, rank: int) -> bool:
    """A parameter broadcast against the channels (layer scale, a position embedding): its
    axis that lines up with the channel axis follows the channels (a *through* slice)."""
    value = w.tensor_of(p)
    if value.ndim > rank or chan.entries.ndim != 1:
        return False
    offset = rank - value.ndim
    if chan.axis < offset or value.shape[chan.axis - offset] == 1:
        return True  # the same value for every channel
    if value.shape[chan.axis - offset] != len(chan.entries):
        return False
    w.slice(p, chan.axis - offset, chan.entries, "through")
    return True


# -- layers with weights ---------------------------------------------------------------------

@rule(aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution)
def conv(w: Walk, node: Node) -> Chan | None:
    a = w.bind(node)
    chan, weight = w.chan(a["input"]), w.param(a["weight"])
    if a.get("transposed"):
        return w.unsupported(node, "transposed convolution")
    if weight is None:
        return w.unsupported(node, "convolution whose weight is computed in forward()")
    if chan is None or chan.axis != 1 or chan.entries.ndim != 1:
        return w.unsupported(node, f"convolution '{weight.module}' on a tensor whose axis 1 is not channels")
    groups, cin = int(a.get("groups", 1)), len(chan.entries)
    if groups > 1 and not isinstance(w.modules.get(weight.module), CONVS):
        w.sized(node, chan)  # `groups` comes from the code, not from a conv module that surgery resizes
    bias = w.param(a.get("bias"))
    cout = w.shape(node)[1]
    if groups > 1 and groups == cin:
        # depthwise: output channel o reads input channel o // (cout / cin) alone
        entries = np.repeat(chan.entries, cout // cin)
        for p in (weight, bias):
            if p is not None:
                w.slice(p, 0, entries, "through")
        return Chan(entries, 1)
    w.slice(weight, 1, chan.entries, "in", groups)
    out = w.fresh(node, producer=weight.module)
    w.slice(weight, 0, out.entries, "out")
    if bias is not None:
        w.slice(bias, 0, out.entries, "out")
    if groups > 1:  # every group of the conv must keep the same number of inputs and outputs
        w.equal_counts(np.split(chan.entries, groups))
        w.equal_counts(np.split(out.entries, groups))
    return out


@rule(aten.linear)
def linear(w: Walk, node: Node) -> Chan | None:
    a = w.bind(node)
    chan, weight, bias = w.chan(a["input"]), w.param(a["weight"]), w.param(a.get("bias"))
    rank = len(w.shape(node))
    if weight is None:
        return w.unsupported(node, "linear layer whose weight is computed in forward()")
    if chan is None or chan.entries.ndim != 1 or chan.axis != rank - 1:
        return w.unsupported(node, f"Linear '{weight.module}' whose input features are not channels")
    w.slice(weight, 1, chan.entries, "in")
    out = w.fresh(node, producer=weight.module, axis=rank - 1)
    w.slice(weight, 0, out.entries, "out")
    if bias is not None:
        w.slice(bias, 0, out.entries, "out")
    return out


# -- per-channel normalisation ---------------------------------------------------------------

@rule(aten.batch_norm, aten._native_batch_norm_legit_no_training, aten._native_batch_norm_legit,
      aten.native_batch_norm, aten.instance_norm)
def batch_norm(w: Walk, node: Node) -> Any:
    a = w.bind(node)
    chan = w.chan(a["input"])
    if chan is None or chan.axis != 1 or chan.entries.ndim != 1:
        return w.unsupported(node, "batch norm on a tensor whose axis 1 is not channels")
    for key in ("weight", "bias", "running_mean", "running_var"):
        p = w.param(a.get(key))
        if p is not None:
            w.slice(p, 0, chan.entries, "through")
    if node.target.overloadpacket in (aten.batch_norm, aten.instance_norm):
        return chan
    return [chan, None, None]  # (output, saved mean, saved invstd)


@rule(aten.group_norm)
def group_norm(w: Walk, node: Node) -> Chan | None:
    a = w.bind(node)
    chan, num_groups = w.chan(a["input"]), int(a["num_groups"])
    if chan is None or chan.axis != 1 or chan.entries.ndim != 1:
        return w.unsupported(node, "group norm on a tensor whose axis 1 is not channels")
    if num_groups == 1:
        return w.mixing(node, chan, "group norm with one group (normalises over all channels)")
    # statistics are per normalisation group: a channel group is removed whole or kept whole
    for block in np.split(chan.entries, num_groups):
        w.tie(block[:1].repeat(len(block)), block)
    for key in ("weight", "bias"):
        p = w.param(a.get(key))
        if p is not None:
            w.slice(p, 0, chan.entries, "through")
    return chan


@rule(aten.layer_norm, aten.rms_norm)
def layer_norm(w: Walk, node: Node) -> Chan | None:
    a = w.bind(node)
    chan = w.chan(a["input"])
    rank = len(w.shape(node))
    normalised = set(range(rank - len(a["normalized_shape"]), rank))
    if chan is not None and normalised & set(chan.dims()):
        return w.mixing(node, chan, "layer norm over the channel axis")
    return chan


@rule(aten.prelu, aten._prelu_kernel)
def prelu(w: Walk, node: Node) -> Chan | None:
    chan, p = w.chan(node.args[0]), w.param(node.args[1])
    if p is None or w.tensor_of(p).numel() == 1:
        return chan
    if chan is None or chan.axis != 1 or chan.entries.ndim != 1:
        return w.unsupported(node, "PReLU on a tensor whose axis 1 is not channels")
    w.slice(p, 0, chan.entries, "through")
    return chan


# -- ops on the trailing (spatial) axes ------------------------------------------------------

def trailing(k: int):
    """A rule for ops that act on the last ``k`` axes (pooling, resizing, padding)."""

    def on_trailing(w: Walk, node: Node) -> Any:
        chan = w.chan(node.args[0])
        rank = len(w.shape(node.args[0]) or ())
        if chan is not None and set(chan.dims()) & set(range(rank - k, rank)):
            return w.unsupported(node, f"'{node.target.overloadpacket.__name__}' over the channel axis")
        if isinstance(node.meta.get("val"), (tuple, list)):  # (values, indices)
            return [chan, None]
        return chan

    return on_trailing


for _k, _ops in {
    1: (aten.max_pool1d, aten.max_pool1d_with_indices, aten.avg_pool1d, aten.adaptive_avg_pool1d,
        aten.adaptive_max_pool1d, aten.upsample_nearest1d, aten.upsample_linear1d, aten.reflection_pad1d,
        aten.replication_pad1d),
    2: (aten.max_pool2d, aten.max_pool2d_with_indices, aten.avg_pool2d, aten.adaptive_avg_pool2d,
        aten._adaptive_avg_pool2d, aten.adaptive_max_pool2d, aten.upsample_nearest2d, aten.upsample_bilinear2d,
        aten.upsample_bicubic2d, aten._upsample_nearest_exact2d, aten._upsample_bilinear2d_aa,
        aten.reflection_pad2d, aten.replication_pad2d),
    3: (aten.max_pool3d, aten.max_pool3d_with_indices, aten.avg_pool3d, aten.adaptive_avg_pool3d,
        aten.adaptive_max_pool3d, aten.upsample_nearest3d, aten.upsample_trilinear3d, aten.reflection_pad3d,
        aten.replication_pad3d),
}.items():
    rule(*_ops)(trailing(_k))


@rule(aten.pad, aten.constant_pad_nd)
def pad(w: Walk, node: Node) -> Chan | None:
    a = w.bind(node)
    chan, amounts = w.chan(a["self"]), list(a["pad"])
    rank = len(w.shape(node))
    padded = {rank - 1 - i // 2 for i, v in enumerate(amounts) if v != 0}
    if chan is not None and padded & set(chan.dims()):
        return w.unsupported(node, "padding of the channel axis")
    return chan


@rule(aten.roll, aten.flip)
def along_other_axes(w: Walk, node: Node) -> Chan | None:
    chan = w.chan(node.args[0])
    rank = len(w.shape(node))
    a = w.bind(node)
    dims = a.get("dims", [])
    dims = {d % rank for d in (dims if isinstance(dims, Sequence) else [dims])}
    if chan is not None and (not dims or dims & set(chan.dims())):
        return w.unsupported(node, f"'{node.target.overloadpacket.__name__}' over the channel axis")
    return chan


# -- reductions and softmax ------------------------------------------------------------------

@rule(aten.mean, aten.sum, aten.amax, aten.amin, aten.var, aten.std, aten.logsumexp, aten.max, aten.min,
      aten.var_mean, aten.linalg_vector_norm, aten.norm)
def reduction(w: Walk, node: Node) -> Any:
    src = node.args[0]
    chan, before = w.chan(src), w.shape(src)
    a = w.bind(node)
    dims = a.get("dim")
    several = isinstance(node.meta.get("val"), (tuple, list))
    if chan is None:
        return [None, None] if several else None
    if dims is None or (isinstance(dims, Sequence) and not dims) or not isinstance(dims, (int, Sequence)):
        out = w.unsupported(node, f"'{node.target.overloadpacket.__name__}' over all axes")
        return [out, None] if several else out
    dims = {d % len(before) for d in (dims if isinstance(dims, Sequence) else (dims,))}
    if 0 in dims or dims & set(chan.dims()):
        out = w.unsupported(node, f"'{node.target.overloadpacket.__name__}' over the channel axis")
        return [out, None] if several else out
    shift = 0 if a.get("keepdim") else sum(d < chan.axis for d in dims)
    out = Chan(chan.entries, chan.axis - shift)
    return [out, out] if several else out


@rule(aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax, aten.cumsum)
def softmax(w: Walk, node: Node) -> Chan | None:
    chan = w.chan(node.args[0])
    rank = len(w.shape(node))
    dim = w.bind(node)["dim"] % rank
    if chan is not None and dim in chan.dims():
        return w.mixing(node, chan, f"'{node.target.overloadpacket.__name__}' over the channel axis")
    return chan


# -- concatenation and splitting -------------------------------------------------------------

@rule(aten.cat, aten.concat)
def cat(w: Walk, node: Node) -> Chan | None:
    a = w.bind(node)
    tensors, dim = a["tensors"], a.get("dim", 0) % len(w.shape(node))
    parts = [w.chan(t) for t in tensors]
    if any(p is None for p in parts) or len({(p.axis, p.entries.ndim) for p in parts}) != 1:
        return w.unsupported(node, "'cat' of tensors with different channel layouts")
    first = parts[0]
    if first.entries.ndim == 1 and dim == first.axis:
        return Chan(np.concatenate([p.entries for p in parts]), first.axis)
    if dim in first.dims() or dim == 0:
        return w.unsupported(node, f"'cat' along axis {dim}")
    for part in parts[1:]:
        if part.entries.shape != first.entries.shape:
            return w.unsupported(node, "'cat' of tensors with different channel layouts")
        w.tie(first.entries, part.entries)
    return first


@rule(aten.chunk, aten.split, aten.split_with_sizes, aten.tensor_split, aten.unbind)
def split(w: Walk, node: Node) -> list[Chan | None] | None:
    src = node.args[0]
    chan, shape = w.chan(src), w.shape(src)
    a = w.bind(node)
    dim = a.get("dim", 0) % len(shape)
    pieces = node.meta["val"]
    op = node.target.overloadpacket
    if chan is None or dim not in chan.dims():
        if op is aten.unbind and chan is not None:
            return [Chan(chan.entries, chan.axis - (dim < chan.axis))] * len(pieces)
        return [chan] * len(pieces)
    sizes = [int(p.shape[dim]) for p in pieces]
    # chunk(n) recomputes its sizes from the tensor; split(size) keeps a literal size
    even = op is aten.chunk or (op is aten.split and w.called_as(node) == "chunk")
    if not (even and chan.entries.ndim == 1 and len(set(sizes)) == 1):
        w.unsupported(node, f"'{w.called_as(node) or op.__name__}' of the channel axis into fixed sizes")
        return [None] * len(pieces)
    blocks = np.split(chan.entries, len(pieces))
    w.equal_counts(blocks)  # chunk splits the pruned axis evenly: blocks keep equal counts
    return [Chan(b, chan.axis) for b in blocks]


@rule(operator.getitem)
def getitem(w: Walk, node: Node) -> Any:
    container, index = node.args[:2]
    value = w.values.get(container)
    return value[index] if isinstance(value, (list, tuple)) else None


@rule(aten.slice, aten.select, aten.index)
def indexing(w: Walk, node: Node) -> Chan | None:
    """``x[..., a:b]``, ``x[..., i]``, ``x[..., idx]``: fine on any axis but the channel axes
    (a slice that takes a channel axis whole is fine too); ``select`` drops its axis."""
    a = w.bind(node)
    chan, shape = w.chan(a["self"]), w.shape(a["self"])
    if chan is None:
        return None
    op = node.target.overloadpacket
    if op is aten.index:
        dims = [d for d, i in enumerate(a["indices"]) if i is not None]
        if len(dims) == 1 and 0 < dims[0] < chan.axis:  # one tensor index on an axis between batch and channels
            return chan
        return w.unsupported(node, "indexing that selects channels")
    dim = a.get("dim", 0) % len(shape)
    if dim not in chan.dims():
        return Chan(chan.entries, chan.axis - (op is aten.select and dim < chan.axis))
    if op is aten.slice and w.shape(node)[dim] == shape[dim]:
        return chan
    return w.unsupported(node, "indexing that selects channels")


# -- layout changes --------------------------------------------------------------------------

@rule(aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.unsqueeze, aten.squeeze,
      aten.view_as, aten.reshape_as)
def reshape(w: Walk, node: Node) -> Chan | None:
    src = node.args[0]
    before, after = w.shape(src), w.shape(node)
    chan = w.chan(src)
    if chan is None:
        return None
    if before is None or after is None or not after or after[0] != before[0]:
        return w.unsupported(node, f"'{node.target.overloadpacket.__name__}' that changes the batch axis")
    if node.target.overloadpacket in (aten.view, aten.reshape, aten._unsafe_view, aten.unflatten):
        w.sized(node, chan)
    # the entry of every element, moved with the data
    full = np.broadcast_to(chan.entries.reshape(layout(before, chan)), before[1:]).reshape(after[1:])
    dims = [d + 1 for d in range(full.ndim) if full.shape[d] > 1 and not constant_along(full, d)]
    if not dims:
        return Chan(full.reshape(-1)[:1], 1) if full.size else None
    if dims != list(range(dims[0], dims[-1] + 1)):
        return w.unsupported(node, f"'{node.target.overloadpacket.__name__}' that interleaves channels with other axes")
    index = tuple(slice(None) if d + 1 in dims else 0 for d in range(full.ndim))
    entries = np.ascontiguousarray(full[index])
    if entries.ndim > chan.entries.ndim and chan.entries.ndim == 1 and entries.size == chan.entries.size:
        # the channel axis is split into blocks: tie each column so the blocks stay aligned
        columns = entries.reshape(entries.shape[0], -1)
        for col in columns.T:
            w.tie(col[:1].repeat(len(col)), col)
    return Chan(entries, dims[0])


@rule(aten.permute, aten.transpose, aten.t, aten.movedim, aten.swapaxes)
def permute(w: Walk, node: Node) -> Chan | None:
    src = node.args[0]
    chan, rank = w.chan(src), len(w.shape(node))
    if chan is None:
        return None
    op = node.target.overloadpacket
    if op in (aten.permute,):
        order = [d % rank for d in node.args[1]]
    else:
        order = list(range(rank))
        if op is aten.t:
            order = order[::-1]
        elif op is aten.movedim:
            order = [d for d in range(rank) if d != node.args[1] % rank]
            order.insert(node.args[2] % rank, node.args[1] % rank)
        else:
            a, b = (d % rank for d in node.args[1:3])
            order[a], order[b] = order[b], order[a]
    if order[0] != 0:
        return w.unsupported(node, f"'{op.__name__}' that moves the batch axis")
    new_positions = [order.index(d) for d in chan.dims()]
    lo = min(new_positions)
    if sorted(new_positions) != list(range(lo, lo + len(new_positions))):
        return w.unsupported(node, f"'{op.__name__}' that separates the channel axes")
    return Chan(np.ascontiguousarray(chan.entries.transpose(np.argsort(new_positions))), lo)


@rule(aten.expand, aten.expand_as, aten.repeat)
def expand(w: Walk, node: Node) -> Chan | None:
    chan, before, after = w.chan(node.args[0]), w.shape(node.args[0]), w.shape(node)
    if chan is None:
        return w.fresh(node)
    if len(before) != len(after) or any(before[d] != after[d] for d in chan.dims()):
        return w.unsupported(node, f"'{node.target.overloadpacket.__name__}' along the channel axis")
    w.sized(node, chan)
    return chan


# -- tensors made from nothing, and shape queries --------------------------------------------

@rule(aten.sym_size, aten.sym_numel, aten.sym_stride, aten.size, aten.dim, aten.numel, aten.zeros, aten.ones,
      aten.empty, aten.full, aten.arange, aten.zeros_like, aten.ones_like, aten.empty_like, aten.full_like,
      aten.rand_like, aten.randn_like, aten.scalar_tensor, aten.tensor, aten._assert_tensor_metadata,
      aten._assert_scalar, aten.sym_constrain_range_for_size)
def constant(w: Walk, node: Node) -> Chan | None:
    return None


def layout(shape: tuple[int, ...], chan: Chan) -> tuple[int, ...]:
    """``shape[1:]`` with 1 on every axis that is not a channel axis (for broadcasting)."""
    return tuple(s if d in chan.dims() else 1 for d, s in enumerate(shape) if d > 0)


def constant_along(array: np.ndarray, axis: int) -> bool:
    return bool((np.take(array, [0], axis=axis) == array).all())

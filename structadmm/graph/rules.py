"""What each ATen op does to channels: one small rule per op, registered in ``registry.RULES``.

A rule gets the :class:`~.registry.Walk` (the trace's state: entries, ties, slices) and one node
of the exported program, and returns the node's channel layout (:class:`~.registry.Chan`, a list
of them, or None). The contract every rule keeps is written in :mod:`.registry`. Supporting a new
op is one function here with ``@rule(aten.the_op)``; an op without a rule freezes the channels that
reach it and says so.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Sequence

import numpy as np
import torch
import torch.fx

from ..layers import CONVS
from .registry import Chan, Opaque, ParamView, Walk, param_view, rule, where

aten = torch.ops.aten
Node = torch.fx.Node


# -- ops that keep every value where it is ---------------------------------------------------

#: ops that map every value on its own (their channels, and a parameter's axes, stay put)
ELEMENTWISE = (aten.relu, aten.relu_, aten.relu6, aten.gelu, aten.gelu_, aten.silu, aten.silu_, aten.sigmoid, aten.sigmoid_,
      aten.tanh, aten.tanh_, aten.hardswish, aten.hardswish_, aten.hardsigmoid, aten.hardsigmoid_, aten.hardtanh,
      aten.hardtanh_, aten.leaky_relu, aten.leaky_relu_, aten.elu, aten.elu_, aten.celu, aten.selu, aten.mish,
      aten.mish_, aten.softplus, aten.log_sigmoid, aten.abs, aten.neg, aten.exp, aten.log, aten.sqrt, aten.rsqrt,
      aten.reciprocal, aten.erf, aten.sin, aten.cos, aten.square, aten.sign, aten.clamp, aten.clamp_, aten.clip, aten.clip_, aten.clamp_min,
      aten.clamp_max, aten.dropout, aten.dropout_, aten.feature_dropout, aten.alpha_dropout, aten.alias, aten.clone,
      aten.contiguous, aten.detach, aten._to_copy, aten.to, aten.type_as, aten.pow, aten.lift_fresh_copy,
      aten.nan_to_num, aten.threshold)


@rule(*ELEMENTWISE)
def elementwise(w: Walk, node: Node) -> Chan | None:
    if node.target.overloadpacket is aten.pow and isinstance(node.args[1], Node):
        return binary(w, node)
    chan = w.chan(node.args[0])
    # tensor operands besides the input (clamp's bounds): per-channel ones follow the channels
    others = [a for a in [*node.args[1:], *node.kwargs.values()] if isinstance(a, Node)]
    rank = len(w.shape(node) or ())
    for arg in others:
        if chan is None:
            w.value(arg)
        elif not w.align(arg, chan, rank):
            return w.unsupported(node, f"'{node.target.overloadpacket.__name__}' with per-channel values it cannot follow")
    return chan


# -- element-wise binary ops: tie the operands position by position --------------------------

@rule(aten.add, aten.add_, aten.sub, aten.sub_, aten.rsub, aten.mul, aten.mul_, aten.div, aten.div_,
      aten.maximum, aten.minimum, aten.where, aten.eq, aten.ne, aten.gt, aten.lt, aten.ge, aten.le, reads_opaque=True)
def binary(w: Walk, node: Node) -> Any:
    out_shape = w.shape(node)
    if out_shape is None:
        return None
    rank = len(out_shape)
    name = node.target.overloadpacket.__name__
    result: Chan | None = None
    others = []
    for arg in node.args[:3]:
        shape, chan = w.shape(arg), w.chan(arg)
        if shape is None:
            continue
        if chan is None:
            others.append(arg)
            continue
        if len(shape) != rank:
            return w.unsupported(node, f"'{name}' broadcasting a lower-rank tensor")
        if any(shape[d] == 1 and out_shape[d] != 1 for d in chan.dims()):
            continue  # broadcast along the channel axis: scales every channel alike
        if result is None:
            result = chan
        elif result.axis != chan.axis or result.entries.shape != chan.entries.shape:
            return w.unsupported(node, f"'{name}' of tensors with different channel layouts")
        else:
            w.tie(result.entries, chan.entries)
    if result is None:
        return without_channels(w, node, others)
    for arg in others:
        if not w.align(arg, result, rank):
            return w.unsupported(node, f"'{name}' with per-channel values it cannot follow")
    return result


def without_channels(w: Walk, node: Node, operands: list[Node]) -> Any:
    """An element-wise op none of whose operands has channels: a parameter combined with
    numbers is still that parameter's view; anything else is opaque (or plain constants)."""
    values = [w.value(a) for a in operands]
    opaque = next((v for v in values if isinstance(v, Opaque)), None)
    if opaque is not None:
        return opaque
    views = [(a, v) for a, v in zip(operands, values) if isinstance(v, ParamView)]
    if not views:
        return None
    arg, view = views[0]
    if len(views) == 1 and w.shape(arg) == w.shape(node):
        return view
    return Opaque(f"values computed from '{view.param.module}.{view.param.tensor}' in forward()")


# -- layers with weights ---------------------------------------------------------------------

@rule(aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution, reads_opaque=True)
def conv(w: Walk, node: Node) -> Chan | None:
    a = w.bind(node)
    chan, weight = w.read(a["input"], 1), w.param(a["weight"])
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
        w.slice(weight, 0, entries, "through", weight=True)
        if bias is not None:
            w.slice(bias, 0, entries, "through")
        return Chan(entries, 1)
    w.slice(weight, 1, chan.entries, "in", groups, weight=True)
    out = w.fresh(node, producer=weight.module)
    w.slice(weight, 0, out.entries, "out", weight=True)
    if bias is not None:
        w.slice(bias, 0, out.entries, "out")
    if groups > 1:  # every group of the conv must keep the same number of inputs and outputs
        w.equal_counts(np.split(chan.entries, groups))
        w.equal_counts(np.split(out.entries, groups))
    return out


@rule(aten.linear, reads_opaque=True)
def linear(w: Walk, node: Node) -> Chan | None:
    a = w.bind(node)
    chan, weight, bias = w.read(a["input"], -1), w.param(a["weight"]), w.param(a.get("bias"))
    rank = len(w.shape(node))
    if weight is None:
        return w.unsupported(node, "linear layer whose weight is computed in forward()")
    if chan is None or chan.entries.ndim != 1 or chan.axis != rank - 1:
        return w.unsupported(node, f"Linear '{weight.module}' whose input features are not channels")
    w.slice(weight, 1, chan.entries, "in", weight=True)
    out = w.fresh(node, producer=weight.module, axis=rank - 1)
    w.slice(weight, 0, out.entries, "out", weight=True)
    if bias is not None:
        w.slice(bias, 0, out.entries, "out")
    return out


@rule(aten.addmm, reads_opaque=True)
def addmm(w: Walk, node: Node) -> Chan | None:
    """``bias + x @ weight`` with the weight stored [in, out] (transformers' ``Conv1D``, GPT-2):
    a Linear whose weight is transposed; ``x`` is 2-D, its features on axis 1."""
    a = w.bind(node)
    chan, weight, bias = w.read(a["mat1"], 1), w.param(a["mat2"]), w.param(a["self"])
    if weight is None:
        return w.unsupported(node, "matrix product whose weight is computed in forward()")
    if chan is None or chan.entries.ndim != 1 or chan.axis != 1:
        return w.unsupported(node, f"matrix product '{weight.module}' whose input features are not channels")
    w.slice(weight, 0, chan.entries, "in", weight=True)
    out = w.fresh(node, producer=weight.module, axis=1)
    w.slice(weight, 1, out.entries, "out", weight=True)
    if bias is not None:
        w.slice(bias, 0, out.entries, "out")
    elif not w.align(a["self"], out, 2):
        return w.unsupported(node, f"matrix product '{weight.module}' with an added term it cannot follow")
    return out


@rule(aten.embedding, reads_opaque=True)
def embedding(w: Walk, node: Node) -> Chan | None:
    """A lookup table makes new channels: its columns, one per feature of the looked-up rows."""
    a = w.bind(node)
    weight, indices = w.param(a["weight"]), w.chan(a["indices"])
    if weight is None or w.tensor_of(weight).ndim != 2:
        return w.unsupported(node, "embedding whose table is computed in forward()")
    if indices is not None:  # row numbers computed from channels: each value picks a row, not a channel
        w.freeze([indices], f"channels used as embedding indices {where(node)}")
    out = w.fresh(node, producer=weight.module, axis=len(w.shape(node)) - 1)
    w.slice(weight, 1, out.entries, "out", weight=True)
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
    if w.param(a.get("weight")) is None and w.param(a.get("bias")) is None:
        # its group count lives only in the module, where no cut of a tensor reaches it
        return w.mixing(node, chan, "group norm without affine parameters")
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
    """Normalising over the channel axis mixes the channels (the statistics): a group that
    reaches it is only prunable as a whole residual stream whose removed channels are zero, and
    only through a ``nn.LayerNorm`` that surgery can make keep its statistics (:mod:`.norms`)."""
    a = w.bind(node)
    chan = w.chan(a["input"])
    rank = len(w.shape(node))
    normalised = set(range(rank - len(a["normalized_shape"]), rank))
    if chan is None or not normalised & set(chan.dims()):
        return chan
    weight, bias = w.param(a.get("weight")), w.param(a.get("bias"))
    module = w.modules.get(weight.module) if weight is not None else None
    if node.target.overloadpacket is not aten.layer_norm or not isinstance(module, torch.nn.LayerNorm) or \
            normalised != {rank - 1} or list(chan.dims()) != [rank - 1] or (bias is not None and bias.module != weight.module):
        return w.mixing(node, chan, "layer norm over the channel axis")
    for p in (weight, bias):
        if p is not None:
            w.slice(p, 0, chan.entries, "through")
    w.normalised(node, chan)
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

@rule(aten.cat, aten.concat, reads_opaque=True)
def cat(w: Walk, node: Node) -> Any:
    a = w.bind(node)
    tensors, rank = list(a["tensors"]), len(w.shape(node))
    dim = a.get("dim", 0) % rank
    chans = [w.chan(t) for t in tensors]
    known = [c for c in chans if c is not None]
    if not known:
        return without_channels(w, node, tensors) if len(tensors) == 1 else \
            Opaque("values concatenated in forward()") if any(w.value(t) is not None for t in tensors) else None
    first = known[0]
    if any(c.axis != first.axis or c.entries.shape[1:] != first.entries.shape[1:] for c in known):
        return w.unsupported(node, "'cat' of tensors with different channel layouts")
    if first.entries.ndim == 1 and dim == first.axis:
        parts = []
        for t, c in zip(tensors, chans):
            if c is None:  # channels no layer makes (an input, a constant): a frozen block of their own
                value = w.value(t)
                reason = value.reason if isinstance(value, Opaque) else "channels concatenated from values no layer makes"
                c = Chan(w.new(w.shape(t)[dim], frozen=reason), dim)
            parts.append(c.entries)
        return Chan(np.concatenate(parts), dim)
    if dim in first.dims():
        return w.unsupported(node, f"'cat' along axis {dim}")
    for t, c in zip(tensors, chans):
        if c is None:
            if not w.align(t, first, rank):  # a class token or padding joined along another axis
                return w.unsupported(node, "'cat' with per-channel values it cannot follow")
        elif c.entries.shape != first.entries.shape:
            return w.unsupported(node, "'cat' of tensors with different channel layouts")
        else:
            w.tie(first.entries, c.entries)
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
    if not (op in (aten.chunk, aten.split, aten.split_with_sizes) and chan.entries.ndim == 1 and len(set(sizes)) == 1):
        return [w.unsupported(node, f"'{w.called_as(node) or op.__name__}' of the channel axis into fixed sizes")] * len(pieces)
    # chunk(n) recomputes its sizes from the tensor; split(size) states a size, which the code may
    # hold in an attribute that a resize rule updates (GPT-2's ``split_size``) or may hard-code:
    # the plan tries it (sized)
    if not (op is aten.chunk or (op is aten.split and w.called_as(node) == "chunk")):
        w.sized(node, chan)
    blocks = np.split(chan.entries, len(pieces))
    w.equal_counts(blocks)  # the pruned axis split evenly: blocks keep equal counts
    return [Chan(b, chan.axis) for b in blocks]


@rule(operator.getitem)
def getitem(w: Walk, node: Node) -> Any:
    container, index = node.args[:2]
    value = w.value(container)
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
    if op is aten.index:  # tensor indices (a gather) on axes that are not channel axes
        dims = [d for d, i in enumerate(a["indices"]) if i is not None]
        masks = any(getattr(i.meta.get("val"), "dtype", None) == torch.bool for i in a["indices"] if isinstance(i, Node))
        if masks or set(dims) & set(chan.dims()):
            return w.unsupported(node, "indexing that selects channels")
        # the indexed axes become the indices' broadcast axes: in their place when they are
        # adjacent, in front otherwise
        index_rank = len(w.shape(node)) - (len(shape) - len(dims))
        if dims == list(range(dims[0], dims[-1] + 1)):
            return Chan(chan.entries, chan.axis + (index_rank - len(dims) if dims[-1] < chan.axis else 0))
        return Chan(chan.entries, chan.axis - sum(d < chan.axis for d in dims) + index_rank)
    dim = a.get("dim", 0) % len(shape)
    if dim not in chan.dims():
        return Chan(chan.entries, chan.axis - (op is aten.select and dim < chan.axis))
    if op is aten.slice and w.shape(node)[dim] == shape[dim]:
        return chan
    return w.unsupported(node, "indexing that selects channels")


# -- layout changes --------------------------------------------------------------------------

_RESHAPES = (aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.unsqueeze, aten.squeeze,
             aten.view_as, aten.reshape_as)
_PERMUTES = (aten.permute, aten.transpose, aten.t, aten.movedim, aten.swapaxes)


@rule(*_RESHAPES)
def reshape(w: Walk, node: Node) -> Chan | None:
    src = node.args[0]
    before, after = w.shape(src), w.shape(node)
    chan = w.chan(src)
    if chan is None:
        return None
    if before is None or after is None or not after:
        return w.unsupported(node, f"'{node.target.overloadpacket.__name__}' to a scalar")
    if node.target.overloadpacket in (aten.view, aten.reshape, aten._unsafe_view, aten.unflatten):
        w.sized(node, chan)
    # the entry of every element, moved with the data
    full = np.broadcast_to(chan.entries.reshape(layout(before, chan)), before).reshape(after)
    dims = [d for d in range(full.ndim) if full.shape[d] > 1 and not constant_along(full, d)]
    if not dims:  # one channel everywhere: every position of axis 1 (or 0) holds it
        axis = min(1, full.ndim - 1)
        return Chan(np.repeat(full.reshape(-1)[:1], full.shape[axis]), axis) if full.size else None
    if dims != list(range(dims[0], dims[-1] + 1)):
        return w.unsupported(node, f"'{node.target.overloadpacket.__name__}' that interleaves channels with other axes")
    index = tuple(slice(None) if d in dims else 0 for d in range(full.ndim))
    entries = np.ascontiguousarray(full[index])
    # the channel axis split into blocks: aligned when read (Walk.chan), or heads (permute)
    split = entries.ndim > chan.entries.ndim and chan.entries.ndim == 1 and entries.size == chan.entries.size
    return Chan(entries, dims[0], split)


def order_of(node: Node, rank: int) -> list[int]:
    """For a permute-like node: the source axis of each result axis."""
    op = node.target.overloadpacket
    if op is aten.permute:
        return [d % rank for d in node.args[1]]
    order = list(range(rank))
    if op is aten.t:
        return order[::-1]
    if op is aten.movedim:
        src, dst = node.args[1] % rank, node.args[2] % rank
        order.remove(src)
        order.insert(dst, src)
        return order
    a, b = (d % rank for d in node.args[1:3])
    order[a], order[b] = order[b], order[a]
    return order


@rule(*_PERMUTES)
def permute(w: Walk, node: Node) -> Chan | None:
    """Axes move with the data. Where a move separates the channel axes (a ``[.., heads,
    head_dim]`` split moved to ``[heads, tokens, head_dim]``), the inner axes join their outer
    one: every head becomes one channel, removed whole."""
    raw = w.value(node.args[0])
    if not isinstance(raw, Chan):
        return None
    order = order_of(node, len(w.shape(node)))
    position = [order.index(d) for d in raw.dims()]  # where each entry axis goes
    if raw.split and not contiguous(position):
        # a channel axis split into [.., heads, head_dim] and the heads moved apart from their
        # features: each head (the axis before the innermost) is one channel, removed whole
        axes = [raw.entries.ndim - 2]
        entries = raw.entries
    else:
        chan = w.chan(node.args[0])
        entries = chan.entries
        axes = [k for k in range(entries.ndim) if not w.one_channel_along(entries, k)] or [0]
    if not contiguous([position[k] for k in axes]):
        run = [axes[0]]  # the outermost axis, and those that stay next to it
        for k in sorted(axes, key=lambda k: position[k]):
            if k not in run and (position[k] == max(position[r] for r in run) + 1 or
                                 position[k] == min(position[r] for r in run) - 1):
                run.append(k)
        axes = sorted(run)
    rest = [k for k in range(entries.ndim) if k not in axes]
    moved = entries.transpose(axes + rest).reshape([entries.shape[k] for k in axes] + [-1])
    for row in moved.reshape(-1, moved.shape[-1]):
        w.tie(row[:1].repeat(len(row)), row)  # inner axes join their outer one
    kept = moved[..., 0]
    by_position = sorted(range(len(axes)), key=lambda i: position[axes[i]])
    return Chan(np.ascontiguousarray(kept.transpose(by_position)), min(position[k] for k in axes))


def contiguous(positions: list[int]) -> bool:
    return sorted(positions) == list(range(min(positions), min(positions) + len(positions)))


@rule(aten.expand, aten.expand_as, aten.repeat)
def expand(w: Walk, node: Node) -> Chan | None:
    chan, before, after = w.chan(node.args[0]), w.shape(node.args[0]), w.shape(node)
    if chan is None:
        return None
    if len(before) != len(after) or any(before[d] != after[d] for d in chan.dims()):
        return w.unsupported(node, f"'{node.target.overloadpacket.__name__}' along the channel axis")
    w.sized(node, chan)
    return chan


# -- attention: products over the last two axes ----------------------------------------------

@rule(aten.matmul, aten.bmm, reads_opaque=True)
def matmul(w: Walk, node: Node) -> Any:
    """``a @ b`` over [..., n, k] x [..., k, m]: channels on ``n`` (of ``a``) or ``m`` (of
    ``b``) become the result's; the rest as :func:`batched_product` says."""
    a, b = node.args[:2]
    if any(len(w.shape(x) or ()) < 2 for x in (a, b, node)):
        return w.unsupported(node, "'matmul' of vectors") if any(w.chan(x) for x in (a, b)) else None
    return batched_product(w, node, [(a, -2), (b, -1)], [], "matmul")


@rule(aten.scaled_dot_product_attention, reads_opaque=True)
def attention(w: Walk, node: Node) -> Any:
    """softmax(q kᵀ / √d + mask) v over [..., tokens, features]: channels on v's features become
    the result's; channels on q's or k's features would change the scale √d, so they freeze;
    the rest (heads on the leading axes, the mask) as :func:`batched_product` says."""
    a = w.bind(node)
    return batched_product(w, node, [(a["query"], None), (a["key"], None), (a["value"], -1)],
                           [a.get("attn_mask")], "scaled_dot_product_attention")


def batched_product(w: Walk, node: Node, operands: list[tuple[Node, int | None]], others: list[Any],
                    name: str) -> Any:
    """A product over the last two axes, batched over the leading ones (matmul, attention).

    Channels on the leading axes (heads) tie across the operands, and ``others`` (a mask) line
    up with them; an operand's channels on its ``free`` axis (negative; None: it has none) pass
    to the same axis of the result; channels on any other axis are mixed away, so they freeze.
    """
    rank = len(w.shape(node))
    leading: Chan | None = None
    free: Chan | None = None
    for arg, own in operands:
        chan = w.chan(arg)
        if chan is None:
            continue
        shape, dims = w.shape(arg), list(chan.dims())
        if max(dims) < len(shape) - 2:
            shifted = Chan(chan.entries, chan.axis + rank - len(shape))
            if leading is None:
                leading = shifted
            elif (leading.axis, leading.entries.shape) != (shifted.axis, shifted.entries.shape):
                return w.unsupported(node, f"'{name}' of tensors with different channel layouts")
            else:
                w.tie(leading.entries, shifted.entries)
        elif own is not None and dims == [len(shape) + own] and free is None:
            free = Chan(chan.entries, rank + own)
        else:
            return w.unsupported(node, f"'{name}' over the channel axis")
    if leading is not None and free is not None:
        return w.unsupported(node, f"'{name}' with channels on two axes")
    if leading is None:
        if free is None and any(w.value(arg) is not None for arg, _ in operands):
            return Opaque(f"values of '{name}' the tracer cannot follow")
        return free
    for arg in [arg for arg, _ in operands] + others:
        if arg is not None and w.chan(arg) is None and not w.align(arg, leading, rank):
            return w.unsupported(node, f"'{name}' with per-channel values it cannot follow")
    for arg in others:  # a mask with channels of its own (a per-head bias a layer computes): cut with the heads
        chan = w.chan(arg)
        if chan is None:
            continue
        shifted = Chan(chan.entries, chan.axis + rank - len(w.shape(arg)))
        if (shifted.axis, shifted.entries.shape) != (leading.axis, leading.entries.shape):
            return w.unsupported(node, f"'{name}' with a mask whose channels are not the heads")
        w.tie(leading.entries, shifted.entries)
    return leading


# -- tensors made from nothing, and shape queries --------------------------------------------

@rule(aten.sym_size, aten.sym_numel, aten.sym_stride, aten.size, aten.dim, aten.numel, aten.zeros, aten.ones,
      aten.empty, aten.full, aten.arange, aten.zeros_like, aten.ones_like, aten.empty_like, aten.full_like,
      aten.rand_like, aten.randn_like, aten.scalar_tensor, aten.tensor, aten._assert_tensor_metadata,
      aten._assert_scalar, aten.sym_constrain_range_for_size)
def constant(w: Walk, node: Node) -> Chan | None:
    """A new tensor, a shape query or a check on an operand's metadata: nothing with channels
    comes out, whatever its operands carry (they are read only for their sizes)."""
    for arg in node.all_input_nodes:
        w.value(arg)
    return None


def layout(shape: tuple[int, ...], chan: Chan) -> tuple[int, ...]:
    """``shape`` with 1 on every axis that is not a channel axis (for broadcasting)."""
    return tuple(s if d in chan.dims() else 1 for d, s in enumerate(shape))


def constant_along(array: np.ndarray, axis: int) -> bool:
    return bool((np.take(array, [0], axis=axis) == array).all())


# -- parameters seen through ops that move their values (graph.PARAM_VIEWS) -----------------

#: a parameter view larger than this many elements is not followed through a reshape
_MAX_VIEW_ELEMENTS = 1 << 22


@param_view(*ELEMENTWISE)
def same_axes(w: Walk, node: Node) -> ParamView | None:
    return w.view(node.args[0])


@param_view(*_RESHAPES)
def reshaped_view(w: Walk, node: Node) -> ParamView | None:
    view, before, after = w.view(node.args[0]), w.shape(node.args[0]), w.shape(node)
    if before is None or after is None or math.prod(before) > _MAX_VIEW_ELEMENTS:
        return None
    axes: list[int | None] = [None] * len(after)
    for d, axis in enumerate(view.axes):
        if axis is None or before[d] == 1:
            continue
        index = np.broadcast_to(np.arange(before[d]).reshape([-1 if i == d else 1 for i in range(len(before))]),
                                before).reshape(after)
        varying = [e for e in range(len(after)) if after[e] > 1 and not constant_along(index, e)]
        if len(varying) == 1 and after[varying[0]] == before[d]:
            axes[varying[0]] = axis
    return ParamView(view.param, tuple(axes))


@param_view(*_PERMUTES)
def permuted_view(w: Walk, node: Node) -> ParamView | None:
    view = w.view(node.args[0])
    return ParamView(view.param, tuple(view.axes[d] for d in order_of(node, len(view.axes))))


@param_view(aten.expand, aten.expand_as, aten.repeat)
def expanded_view(w: Walk, node: Node) -> ParamView | None:
    view, before, after = w.view(node.args[0]), w.shape(node.args[0]), w.shape(node)
    new = len(after) - len(before)
    return ParamView(view.param, (None,) * new + tuple(
        None if before[d] == 1 or after[new + d] != before[d] else axis for d, axis in enumerate(view.axes)))


@param_view(aten.index, aten.select, aten.slice)
def indexed_view(w: Walk, node: Node) -> ParamView | None:
    """Rows picked along one axis (a relative-position table gathered by an index buffer):
    that axis's mapping is lost, the others keep theirs."""
    view, a = w.view(node.args[0]), w.bind(node)
    op = node.target.overloadpacket
    if op is aten.index:
        picked = [d for d, i in enumerate(a["indices"]) if i is not None]
        if len(picked) != 1:
            return None
        d = picked[0]
        rank = len(w.shape(a["indices"][d]) or ())
        return ParamView(view.param, view.axes[:d] + (None,) * rank + view.axes[d + 1:])
    d = a.get("dim", 0) % len(view.axes)
    if op is aten.select:
        return ParamView(view.param, view.axes[:d] + view.axes[d + 1:])
    whole = w.shape(node)[d] == w.shape(node.args[0])[d]
    return ParamView(view.param, view.axes[:d] + ((view.axes[d] if whole else None),) + view.axes[d + 1:])

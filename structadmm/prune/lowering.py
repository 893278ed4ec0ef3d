"""Shape lowering: turn a column-pruned convolution into one that only does its kept columns' work.

Shape-wise sparsity zeroes GEMM columns ``W[:, c, *k]`` of a conv weight ``[F, C, *kernel]``
(see :func:`structadmm.prune.sparsity.project_columns`). A dense conv with zero columns still
does all of their multiply-accumulates. This module owns the surgery that removes them:

* :class:`LoweredConv` computes the same function as a given ``Conv1d``/``Conv2d``/``Conv3d``
  with standard ops only: for every kernel offset that has kept columns it gathers the kept
  input channels, shifts them into place with one (possibly negative) zero pad, concatenates
  the taps on the channel axis and applies ONE 1x1 convolution with the reduced weight
  ``[F, kept_columns]``. Its MACs are ``output_elements * kept_columns``; the gathers, pads and
  the concat move data but do no multiplies.
* :func:`lowering_gain` is the MAC ratio dense / lowered of a conv's current weight.
* :func:`lower_conv` and :func:`lower_convs` apply the rewrite where it pays off (the threshold,
  :func:`min_gain_for` a conv's filter count, is measured: see there); callers check the function
  with :func:`structadmm.prune.surgery.check_same_function`.

Design. Measured on ONNX Runtime CPU (2 threads, graph optimisation ALL, batch 8, interleaved
medians) on a 128->128 3x3 conv on 56x56 with 75 % of its columns pruned (speedup over the dense
conv; ranges are repeated runs on a shared machine) and on VGG-16 at 112x112:

* gather the kept channels of the unpadded input, then one Pad per tap that both shifts (negative
  side crops) and zero-fills: 1.80-2.0x; VGG-16 2.09x. This design.
* pad the input once, gather per tap, slice the tap's window: 1.71-1.80x; VGG-16 1.67x (the Pad
  of all C input channels costs as much as a gather of the kept ones).
* slice each tap's window first, then gather: 1.22x (copies all C channels nine times).
* one gather of all kept channels, then a channel-range-and-window Slice per tap: 1.65-1.72x.
* three column-shifted copies of the input and one row Gather over (channel, row): 1.57-1.65x.
* ``unfold`` + ``index_select`` + MatMul: 0.27x (ONNX has no im2col; the exported unfold gathers
  single elements). Channel-last (NHWC) with per-tap channel gathers: 0.61x (a gather on the
  innermost axis copies single floats).
* MatMul + Add instead of the 1x1 Conv: equal on the single conv but 1.65x instead of 2.09x on
  VGG-16: the exporter folds a following BatchNorm into a Conv, not into a MatMul, and ORT fuses
  the ReLU into the conv.

The 1x1 conv runs at the dense conv's GEMM rate (ORT profile); the rest is memory-bound data
movement, about four passes over the kept columns (gather, pad, concat, ORT's NCHWc reorder). Its
share falls as the filter count F grows, since each moved plane feeds F MACs per position, and it
is why speedup / MAC ratio stays near 0.5 (VGG-16 224x224 at 75 %: 2.17x for a 3.9x MAC ratio;
``benchmarks/results/shape_lowering.md``).
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import StructADMMError
from ..layers import CONVS

__all__ = ["LoweredConv", "lower_conv", "lower_convs", "lowering_gain", "min_gain_for"]

_POINTWISE = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def min_gain_for(filters: int) -> float:
    """The smallest MAC ratio (dense / lowered) at which lowering a conv of ``filters`` output channels
    pays off on ONNX Runtime CPU: ``max(2.5, 32 / sqrt(filters))``. That is 8 (87.5 % of the GEMM columns
    pruned) for 16 filters, 5.7 (82 %) for 32, 4 (75 %) for 64, 2.8 (65 %) for 128 and 2.5 (60 %) from
    164 on.

    Measured with ``benchmarks/shape_lowering.py --parts sweep narrow``: single 3x3 convs C -> C
    (16-512 filters; 14x14 to 112x112) with the columns of smallest norm pruned at 40-93.75 %, dense
    against lowered, ONNX Runtime CPU, 2 threads, batch 8, each model timed alone in its own process
    over 6 rounds (``benchmarks/results/shape_lowering.md``). Where the lowered conv first beats the
    dense one, and how it fares at this rule's threshold:

    * 16 filters (56x56, 112x112): loses at 80 % (0.83x, 0.97x), gains at 87.5 % (1.24x, 1.62x);
    * 32 filters: loses at 75 % (0.78x, 0.79x), gains from 80 % (1.27x, 1.19x) and at 87.5 % (1.39x, 1.71x);
    * 64 filters: 0.82x at 70 % (112x112), gains at 75 % (1.17x at 56x56, 1.30x at 112x112);
    * 128 filters (56x56): 1.01x at 60 %, 1.13x at 65 %;
    * 256 and 512 filters (28x28, 14x14): 0.88x and 1.01x at 40 %, 1.20x and 1.32x at 50 %, 1.41x and
      1.58x at 60 %.

    The break-even rises as the filter count F falls, because the gathers and pads move each kept
    input plane once whatever F is, while that plane feeds F MACs per position: the data movement's
    share grows as F shrinks. The floor of 60 % comes from whole networks, where the wide convs sit on
    small feature maps: a floor of 50 % (lowering 256- and 512-filter convs at 50 %) made ResNet-18
    slower (0.92x against 0.97x unlowered; ``benchmarks/results/zoo_shape_floor2.md``) and VGG-16 no
    faster (1.07x, interval 0.94-1.24; the trial row of shape_lowering.md). Tiny convs, where ORT's per-op overhead dominates,
    need more still (16 filters on 8x8: 0.40x at 60 %, in an earlier in-process sweep); pass
    ``min_gain`` to :func:`lower_conv` to override the rule.
    """
    return max(2.5, 32.0 / math.sqrt(max(int(filters), 1)))


@dataclass(frozen=True)
class _Tap:
    """One kernel offset with kept columns: which input channels it reads and how it shifts them."""

    offset: tuple[int, ...]
    channels: tuple[int, ...]  # kept input channels, ascending
    pads: tuple[int, ...]  # F.pad order (last spatial dim first); negative values crop
    select: str  # "all" | "range" | "index": how the channels are picked
    pad_then_crop: bool  # some crop may exceed the smallest valid input: pad first, crop after


class LoweredConv(nn.Module):
    """A column-pruned ``Conv1d``/``Conv2d``/``Conv3d`` (groups 1, zero padding) without its zero
    columns: per kernel offset a channel gather and a shifting pad, one concat, one 1x1 conv.

    ``weight`` is ``[F, kept_columns, 1, ...]`` and ``bias`` the conv's bias, both trainable.
    Columns are ordered by kernel offset, then by input channel. A conv with no kept column at
    all keeps one (zero) column so the module stays a conv with the right output shape.
    Any input size the conv accepts works.
    """

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        reason = _unlowerable_reason(conv)
        if reason is not None:
            raise StructADMMError(reason)
        weight = conv.weight.detach()
        self.spatial_dims = weight.dim() - 2
        self.in_channels = int(weight.shape[1])
        self.out_channels = int(weight.shape[0])
        self.kernel_size = tuple(int(k) for k in weight.shape[2:])
        self.stride = tuple(conv.stride)
        bounds = _padding(conv)
        self._taps = _taps(_alive_columns(weight), bounds, tuple(conv.dilation))
        for index, tap in enumerate(self._taps):
            if tap.select == "index":
                channels = torch.tensor(tap.channels, dtype=torch.long, device=weight.device)
                self.register_buffer(_index_name(index), channels)
        columns = [weight[(slice(None), list(tap.channels), *tap.offset)] for tap in self._taps]
        reduced = torch.cat(columns, dim=1)
        self.weight = nn.Parameter(
            reduced.reshape(*reduced.shape, *([1] * self.spatial_dims)).clone(),
            requires_grad=conv.weight.requires_grad,
        )
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(),
                                                                requires_grad=conv.bias.requires_grad)

    @property
    def kept_columns(self) -> int:
        return int(self.weight.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [self._shifted(x, index, tap) for index, tap in enumerate(self._taps)]
        columns = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return _POINTWISE[self.spatial_dims](columns, self.weight, self.bias)

    def _shifted(self, x: torch.Tensor, index: int, tap: _Tap) -> torch.Tensor:
        """The tap's input plane for every output position: [N, kept channels, *output]."""
        if tap.select == "index":
            x = torch.index_select(x, 1, getattr(self, _index_name(index)))
        elif tap.select == "range":
            x = x[:, tap.channels[0]: tap.channels[-1] + 1]
        # Gather before shifting: the pad then copies only the kept channels. One Pad both
        # shifts (negative side) and zero-fills (positive side), where a Slice + Pad pair
        # would copy twice.
        if tap.pad_then_crop:
            x = _pad(_pad(x, tuple(max(p, 0) for p in tap.pads)), tuple(min(p, 0) for p in tap.pads))
        elif any(tap.pads):
            x = _pad(x, tap.pads)
        # A strided conv reads every stride-th shifted position; subsampling after the pad
        # keeps all pads static (before it, they would depend on the input size).
        if any(s > 1 for s in self.stride):
            x = x[(slice(None), slice(None), *(slice(None, None, s) for s in self.stride))]
        return x

    def extra_repr(self) -> str:
        total = self.in_channels * math.prod(self.kernel_size)
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, kept_columns={self.kept_columns}/{total}, "
            f"taps={len(self._taps)}, bias={self.bias is not None}"
        )


def _pad(x: torch.Tensor, pads: tuple[int, ...]) -> torch.Tensor:
    """``F.pad(x, pads)`` (zeros; negative pads crop), exported as a Pad with constant pads."""
    if torch.onnx.is_in_onnx_export():
        return _ConstantPad.apply(x, pads)
    return F.pad(x, pads)


class _ConstantPad(torch.autograd.Function):
    """F.pad whose TorchScript ONNX export is one Pad node with constant pads.

    The exporter builds F.pad's pads with runtime ops (a reversing Slice it cannot fold), so
    the padded tensor's spatial size is unknown for the rest of the export and size-dependent
    ops downstream fail (VGG-16's AdaptiveAvgPool2d: "input size not accessible"). Used only
    while exporting, so training never needs a backward.
    """

    @staticmethod
    def forward(ctx: object, x: torch.Tensor, pads: tuple[int, ...]) -> torch.Tensor:
        return F.pad(x, pads)

    @staticmethod
    def symbolic(g: object, x: object, pads: tuple[int, ...]) -> object:
        # F.pad lists (before, after) from the last dim back; ONNX all befores, then all afters.
        pairs = [pads[i: i + 2] for i in range(0, len(pads), 2)][::-1]
        onnx_pads = [0, 0, *(p[0] for p in pairs), 0, 0, *(p[1] for p in pairs)]
        if g.opset < 11:  # before opset 11 the pads are an attribute
            return g.op("Pad", x, pads_i=onnx_pads, mode_s="constant")
        return g.op("Pad", x, g.op("Constant", value_t=torch.tensor(onnx_pads)), mode_s="constant")


def lowering_gain(conv: nn.Module) -> float:
    """MAC ratio dense / lowered for ``conv``'s current weight: all GEMM columns over the
    non-zero ones (both forms produce the same output elements; a conv with no non-zero
    column counts as one, as :class:`LoweredConv` keeps one)."""
    weight = conv.weight.detach()
    alive = _alive_columns(weight)
    return alive.numel() / max(int(alive.sum()), 1)


def lower_conv(conv: nn.Module, *, min_gain: float | None = None) -> nn.Module:
    """A :class:`LoweredConv` for ``conv`` when it has zero columns and ``lowering_gain(conv)
    >= min_gain``; otherwise ``conv`` itself, unchanged.

    Only ``Conv1d``/``Conv2d``/``Conv3d`` with ``groups == 1`` and zero padding are lowered.
    ``min_gain`` defaults to :func:`min_gain_for` the conv's filter count (where lowering was
    measured to pay off); pass a number to use one threshold for every conv. The gain counts as
    reached when the kept columns are at most ``ceil(columns / min_gain)``: a conv pruned at 60 %
    keeps ``round(0.4 * columns)`` columns, whose gain can fall a hair below 2.5.
    """
    if _unlowerable_reason(conv) is not None:
        return conv
    alive = _alive_columns(conv.weight.detach())
    total, kept = alive.numel(), max(int(alive.sum()), 1)
    needed = min_gain_for(conv.out_channels) if min_gain is None else min_gain
    if kept >= total or kept > math.ceil(total / needed - 1e-9):
        return conv
    return LoweredConv(conv)


def lower_convs(model: nn.Module, *, min_gain: float | None = None) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` with every conv that :func:`lower_conv` rewrites replaced by its
    :class:`LoweredConv`; returns the copy and the names of the replaced modules.

    ``model`` itself is not modified. A conv registered under several names is replaced under
    all of them by one shared :class:`LoweredConv`. The copy computes the same function; check
    it with :func:`structadmm.prune.surgery.check_same_function`.
    """
    new = copy.deepcopy(model)
    lowered: dict[int, nn.Module] = {}
    names: list[str] = []
    for name, module in list(new.named_modules(remove_duplicate=False)):
        if id(module) not in lowered:
            lowered[id(module)] = lower_conv(module, min_gain=min_gain)
        replacement = lowered[id(module)]
        if replacement is module:
            continue
        names.append(name)
        if not name:
            return replacement, names  # the model is the conv itself
        parent, _, attr = name.rpartition(".")
        setattr(new.get_submodule(parent), attr, replacement)
    return new, names


# --- helpers ------------------------------------------------------------------------------


def _unlowerable_reason(conv: nn.Module) -> str | None:
    """Why :class:`LoweredConv` cannot represent ``conv`` (None when it can)."""
    if not isinstance(conv, CONVS):
        return f"only Conv1d/Conv2d/Conv3d can be lowered, got {type(conv).__name__}"
    if conv.groups != 1:
        return f"cannot lower a grouped conv (groups={conv.groups}); shape lowering needs groups=1"
    if conv.padding_mode != "zeros":
        return f"cannot lower a conv with padding_mode={conv.padding_mode!r}; only 'zeros' is supported"
    return None


def _alive_columns(weight: torch.Tensor) -> torch.Tensor:
    """Boolean [C, *kernel]: GEMM columns with at least one non-zero weight."""
    return weight.ne(0).any(dim=0)


def _padding(conv: nn.Module) -> list[tuple[int, int]]:
    """(before, after) zero padding per spatial dim, resolving 'same' and 'valid' as torch does."""
    if conv.padding == "valid":
        return [(0, 0)] * len(conv.kernel_size)
    if conv.padding == "same":
        # torch puts the odd element of the total padding after (see _ConvNd.__init__).
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(p, p) for p in conv.padding]


def _taps(alive: torch.Tensor, bounds: list[tuple[int, int]], dilation: tuple[int, ...]) -> list[_Tap]:
    kernel = tuple(alive.shape[1:])
    taps = []
    for offset in itertools.product(*(range(k) for k in kernel)):
        channels = tuple(int(c) for c in alive[(slice(None), *offset)].nonzero().flatten())
        if channels:
            taps.append(_make_tap(offset, channels, alive.shape[0], kernel, bounds, dilation))
    if not taps:  # all columns zero: keep one so the module still has a weight and a shape
        taps.append(_make_tap((0,) * len(kernel), (0,), alive.shape[0], kernel, bounds, dilation))
    return taps


def _make_tap(
    offset: tuple[int, ...],
    channels: tuple[int, ...],
    in_channels: int,
    kernel: tuple[int, ...],
    bounds: list[tuple[int, int]],
    dilation: tuple[int, ...],
) -> _Tap:
    # Output position y of a stride-1 conv reads input y + o*d - before for offset o: pad by
    # before - o*d in front and after - (k-1-o)*d behind (negative = crop), whatever the size.
    pads: list[int] = []
    pad_then_crop = False
    for o, k, d, (before, after) in reversed(list(zip(offset, kernel, dilation, bounds))):
        pads += [before - o * d, after - (k - 1 - o) * d]
        # torch crops before it pads, so a crop longer than the input fails even though the
        # result is non-empty; only big kernels on inputs smaller than their reach get there.
        smallest_input = max(1, d * (k - 1) + 1 - before - after)
        pad_then_crop |= -min(pads[-2:]) > smallest_input
    if len(channels) == in_channels:
        select = "all"
    elif channels[-1] - channels[0] + 1 == len(channels):
        select = "range"  # a Slice: no index tensor to read
    else:
        select = "index"
    return _Tap(offset, channels, tuple(pads), select, pad_then_crop)


def _index_name(index: int) -> str:
    return f"tap{index}_channels"

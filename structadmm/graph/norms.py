"""LayerNorms that keep the statistics of their original width after surgery.

A LayerNorm over a transformer's residual stream averages over every channel. When surgery
removes channels that are zero (pruned in every layer that writes the stream), the sums over
the channels are unchanged but the count is not, so a plain LayerNorm over the narrower stream
would compute a different mean and variance. :class:`WidthLayerNorm` divides by the original
width instead: on the kept channels it computes exactly what the full-width LayerNorm computed.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import replace_module


class WidthLayerNorm(nn.Module):
    """``nn.LayerNorm`` over the last axis whose statistics count ``width`` channels, the kept
    ones plus removed ones that were zero; holds the original module's (sliced) parameters."""

    def __init__(self, norm: nn.LayerNorm, width: int) -> None:
        super().__init__()
        self.weight, self.bias, self.eps, self.width = norm.weight, norm.bias, norm.eps, width
        self.normalized_shape = tuple(norm.weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.sum(-1, keepdim=True) / self.width
        variance = (x * x).sum(-1, keepdim=True) / self.width - mean * mean
        y = (x - mean) * torch.rsqrt(variance + self.eps)
        y = y * self.weight
        return y + self.bias if self.bias is not None else y


def keep_statistics(model: nn.Module, before: dict[str, torch.Size]) -> None:
    """Replace each ``nn.LayerNorm`` whose weight surgery narrowed (``before``: shapes before
    the cut, by full tensor name) by a :class:`WidthLayerNorm` of its original width, in place."""
    for name, module in list(model.named_modules()):
        shape = before.get(f"{name}.weight" if name else "weight")
        if isinstance(module, WidthLayerNorm):  # narrowed again: its width stays the original one
            module.normalized_shape = tuple(module.weight.shape)
        elif isinstance(module, nn.LayerNorm) and shape is not None:
            replace_module(model, name, WidthLayerNorm(module, int(shape[0])))

"""``nn.MultiheadAttention`` rewritten as pieces whose heads surgery can remove.

``nn.MultiheadAttention`` ties the width of its heads to ``embed_dim``, the width of its input
and output: ``in_proj_weight`` must be ``[3 * embed_dim, embed_dim]``. With whole heads removed
that no longer holds, so the module cannot run smaller. :class:`HeadAttention` computes the same
function with the same parameters (the very tensors, under the same names) but lets the heads
be fewer: its projection is one Linear-like product reshaped into ``[3, heads, head_dim]``, so
the channel tracer sees heads as it does in timm's attention.

:func:`heads_attention` swaps it in for every ``nn.MultiheadAttention`` it can stand for, in place
(surgery does that on its own copy of the model); :func:`traced_as_heads` swaps it in only while
the channel tracer runs, and puts the user's modules back afterwards.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import replace_module


class HeadAttention(nn.Module):
    """What ``nn.MultiheadAttention`` computes, with the number of heads free of ``embed_dim``.

    Takes the same arguments and returns ``(output, weights or None)``. Built from an
    ``nn.MultiheadAttention`` whose q, k and v share one packed projection and that has no
    ``bias_k``/``bias_v`` and no ``add_zero_attn`` (:func:`supported`); it holds that module's
    own parameters.
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = mha.embed_dim, mha.num_heads, mha.head_dim
        self.batch_first, self.dropout = mha.batch_first, mha.dropout
        self._qkv_same_embed_dim = False  # keeps torch.nn.TransformerEncoderLayer off its fused fast path
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj
        self.train(mha.training)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        self_attention = query is key and key is value
        batched = query.dim() == 3
        if not batched:
            query, key, value = (t.unsqueeze(0 if self.batch_first else 1) for t in (query, key, value))
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, length, source = query.shape[0], query.shape[1], key.shape[1]
        if self_attention:  # one product, as the tracer follows in timm's attention
            qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)
            q, k, v = qkv.reshape(batch, length, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            weights = self.in_proj_weight.chunk(3)
            biases = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
            q, k, v = (F.linear(t, w, b).reshape(batch, t.shape[1], -1, self.head_dim).transpose(1, 2)
                       for t, w, b in zip((query, key, value), weights, biases))
        mask = _additive_mask(attn_mask, key_padding_mask, batch, length, source, q)
        dropout = self.dropout if self.training else 0.0
        attention = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) * self.head_dim ** -0.5
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                scores = scores.masked_fill(torch.ones(length, source, dtype=torch.bool, device=q.device).triu(1),
                                            float("-inf"))
            attention = scores.softmax(-1)
            out = F.dropout(attention, dropout, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=is_causal and mask is None)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, -1))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(0 if self.batch_first else 1)
        if attention is not None:
            attention = attention.mean(1) if average_attn_weights else attention
            if not batched:
                attention = attention.squeeze(0)
        return out, attention


def _additive_mask(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, batch: int, length: int,
                   source: int, like: torch.Tensor) -> torch.Tensor | None:
    """``nn.MultiheadAttention``'s two masks as one float mask added to the scores
    (boolean True and -inf both mean "may not attend")."""
    mask = None
    for m, shape in ((attn_mask, None), (key_padding_mask, (batch, 1, 1, source))):
        if m is None:
            continue
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=like.dtype, device=like.device).masked_fill(m, float("-inf"))
        m = m.to(like.dtype)
        if shape is not None:
            m = m.reshape(shape)
        elif m.dim() == 3:  # [batch * heads, length, source]
            m = m.reshape(batch, -1, length, source)
        mask = m if mask is None else mask + m
    return mask


def supported(module: nn.Module) -> bool:
    """Whether :class:`HeadAttention` can stand for ``module``."""
    return (type(module) is nn.MultiheadAttention and module._qkv_same_embed_dim and module.bias_k is None
            and module.bias_v is None and not module.add_zero_attn and module.in_proj_weight is not None)


def heads_attention(model: nn.Module) -> nn.Module:
    """Replace every supported ``nn.MultiheadAttention`` in ``model`` by a :class:`HeadAttention`
    holding its parameters, in place; returns ``model``."""
    for name, module in list(model.named_modules()):
        if name and supported(module):
            replace_module(model, name, HeadAttention(module))
    return model


@contextlib.contextmanager
def traced_as_heads(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with its attention swapped for :class:`HeadAttention` while the block runs;
    the original modules are back afterwards, whatever happens."""
    swapped = [(name, module) for name, module in model.named_modules() if name and supported(module)]
    try:
        for name, module in swapped:
            replace_module(model, name, HeadAttention(module))
        yield model
    finally:
        for name, module in swapped:
            replace_module(model, name, module)

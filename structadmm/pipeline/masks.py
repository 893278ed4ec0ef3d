"""Keeping pruned weights at exactly zero while a model trains.

:func:`apply_masks` zeroes the pruned weights, zeroes their gradients (so weight decay and
the loss leave them alone) and re-applies the mask before every forward pass (so momentum
or Adam state accumulated before the mask was set cannot move them back). Call
:meth:`MaskGuard.enforce` after the last optimizer step, or rely on the next forward.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..errors import StructADMMError


class MaskGuard:
    """Handle returned by :func:`apply_masks`; ``remove()`` detaches every hook."""

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor]):
        params = dict(model.named_parameters())
        missing = sorted(set(masks) - set(params))
        if missing:
            raise StructADMMError(f"masks name parameters the model does not have: {', '.join(missing[:5])}")
        self._pairs = [(params[name], mask.to(params[name].device, params[name].dtype)) for name, mask in masks.items()]
        # masks follow the parameters to whatever device training moves them to
        self._handles = [p.register_hook(lambda grad, m=m: grad * m.to(grad.device)) for p, m in self._pairs]
        self._handles.append(model.register_forward_pre_hook(lambda *_: self.enforce()))
        self.enforce()

    @torch.no_grad()
    def enforce(self) -> None:
        for param, mask in self._pairs:
            param.mul_(mask.to(param.device))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> MaskGuard:
    """Zero the masked weights of ``model`` and keep them zero through training."""
    return MaskGuard(model, masks)


def sparsity_of(masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of masked-out entries over all masked parameters."""
    total = sum(m.numel() for m in masks.values())
    return 1.0 - sum(float(m.sum()) for m in masks.values()) / total if total else 0.0

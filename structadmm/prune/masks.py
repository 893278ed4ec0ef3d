"""Keeping pruned weights at exactly zero while a model trains.

:func:`apply_masks` zeroes the pruned weights, then holds them at zero with two hooks:

* a gradient hook on every masked parameter zeroes the gradients of pruned weights, so the
  loss (and anything reading ``.grad``: clipping, logging, DDP's all-reduce) leaves them alone;
* a global optimizer post-step hook (``torch.optim.Optimizer``, every optimizer, also ones
  created later) re-applies the mask right after each ``step()`` of an optimizer that holds a
  masked parameter, so momentum, weight decay or Adam state built up before the mask was set
  cannot move them back.

Nothing runs in ``forward``: the model can be called any number of times before
``backward()`` (gradient accumulation, siamese losses, teacher and student passes of
distillation), and a forward pass never writes into its weights. A loop that changes weights
without a ``torch.optim`` optimizer (a hand-written update, ``load_state_dict``) calls
:meth:`MaskGuard.enforce` afterwards. :meth:`MaskGuard.remove` releases both hooks; the guard
holds the model only weakly, so a model that is dropped without ``remove()`` does not live on.
"""

from __future__ import annotations

import weakref
from typing import Any, Mapping

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.hooks import RemovableHandle

from ..errors import StructADMMError


class _Masked:
    """The masks of one guard, applied after the steps of optimizers that hold their parameters.

    Registered in torch's global optimizer hooks, so it refers to the parameters weakly: a
    model nobody holds any more is freed, and its entry is swept at the next :func:`apply_masks`.
    """

    def __init__(self, pairs: list[tuple[nn.Parameter, torch.Tensor]]):
        self.pairs = [(weakref.ref(param), mask) for param, mask in pairs]
        self.handle: RemovableHandle | None = None

    def alive(self) -> bool:
        return any(ref() is not None for ref, _ in self.pairs)

    @torch.no_grad()
    def enforce(self, only: set[int] | None = None) -> None:
        for i, (ref, mask) in enumerate(self.pairs):
            param = ref()
            if param is None or (only is not None and id(param) not in only):
                continue
            if mask.device != param.device:  # training moved the model: the mask follows once
                mask = mask.to(param.device)
                self.pairs[i] = (ref, mask)
            param.mul_(mask)

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.enforce({id(p) for group in optimizer.param_groups for p in group["params"]})


_registered: list[_Masked] = []  # every live guard's post-step hook, for sweeping dead ones


def _sweep() -> None:
    for masked in [m for m in _registered if not m.alive()]:
        masked.handle.remove()
        _registered.remove(masked)


class MaskGuard:
    """Handle returned by :func:`apply_masks`; ``remove()`` detaches every hook."""

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor]):
        params = dict(model.named_parameters())
        missing = sorted(set(masks) - set(params))
        if missing:
            raise StructADMMError(f"masks name parameters the model does not have: {', '.join(missing[:5])}")
        wrong = [f"{n} {tuple(m.shape)} for {tuple(params[n].shape)}" for n, m in masks.items()
                 if tuple(m.shape) != tuple(params[n].shape)]
        if wrong:
            raise StructADMMError(f"masks do not have their parameters' shapes: {', '.join(wrong[:3])}")
        pairs = [(params[name], mask.detach().to(params[name].device, params[name].dtype))
                 for name, mask in masks.items()]
        # the gradient hooks are the parameters' own: they go with them, they hold no model
        self._handles = [param.register_hook(lambda grad, m=mask: grad * m.to(grad.device))
                         for param, mask in pairs]
        _sweep()
        self._masked = _Masked(pairs)
        self._masked.handle = register_optimizer_step_post_hook(self._masked)
        _registered.append(self._masked)
        self._handles.append(self._masked.handle)
        self.enforce()

    def enforce(self) -> None:
        """Zero the pruned weights now (after an update made without a torch optimizer)."""
        self._masked.enforce()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._masked in _registered:
            _registered.remove(self._masked)


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> MaskGuard:
    """Zero the masked weights of ``model`` and keep them zero through training (module docstring).

    The masks hold from now until ``guard.remove()``, whether or not the returned guard is kept.
    """
    return MaskGuard(model, masks)


def sparsity_of(masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of masked-out entries over all masked parameters."""
    total = sum(m.numel() for m in masks.values())
    return 1.0 - sum(float(m.sum()) for m in masks.values()) / total if total else 0.0

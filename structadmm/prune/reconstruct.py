"""Layer-wise reconstruction: refit the kept weights so that every layer reproduces the dense one.

After a hard prune a layer sees other inputs than the dense model gave it: fewer channels, and
the errors of every pruned layer before it. Reconstruction walks the convolutions and linear layers
in the order the forward pass runs them and, for each, solves a ridge least-squares problem: the
kept weights and bias that best reproduce the *dense* layer's output from the *pruned* model's own
input at that layer (the channel-pruning reconstruction of He, Zhang and Sun, 2017, and ThiNet).
Each layer is refitted before the layers after it see its output, so later layers also correct
what the earlier fits could not.

Only inputs are needed, no labels and no gradient: one forward pass of the dense model and one of
the pruned model, on a batch of unlabeled samples. Pruned weights stay exactly zero (the masks
decide which weights are free), so the masks and the surgery after them are unchanged.

Contract, per layer (``nn.Conv1d/2d/3d`` with zero padding, any groups, and ``nn.Linear``):

* rows (output channels) whose weights are all masked are left as they are, bias included;
* the free weights of a group are the columns (input channel x kernel offset) the mask keeps in
  its kept rows; a layer whose kept rows keep different columns (non-structured sparsity) is
  skipped, as is a layer the forward pass runs more than once, one whose weight another module
  shares (a language model's head tied to its embedding) and one with a padding mode other than
  zeros;
* the fit is ``min ||A w - y||^2 + lam ||w - w0||^2`` over ``samples`` output positions drawn at
  random from the batch, with ``w0`` the current weights and ``lam = ridge * mean(diag(A^T A))``;
  ``w0`` keeps a column that the samples never excite (a channel that is always zero).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..batches import Inputs, run_model
from ..layers import CONVS, eval_mode

__all__ = ["Refit", "reconstruct"]

@dataclass(frozen=True)
class Refit:
    """One layer's reconstruction: its output's error relative to the dense output (root mean square
    of the difference over that of the dense output, at the sampled positions) before and after the
    refit, or why it was skipped (``skipped``; the errors are then None)."""

    name: str
    error_before: float | None
    error_after: float | None
    skipped: str = ""


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (*CONVS, nn.Linear))}


def _why_not(module: nn.Module) -> str:
    if isinstance(module, CONVS):
        if module.padding_mode != "zeros":
            return f"padding mode {module.padding_mode}"
        if isinstance(module.padding, str) and module.padding != "valid":
            return f"padding {module.padding!r}"
    return ""


def _positions(out: torch.Tensor, module: nn.Module, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct output positions (rows of the flattened [batch, *spatial] grid), at most all."""
    if isinstance(module, nn.Linear):
        total = out[..., 0].numel()
    else:
        total = out.shape[0] * out[0, 0].numel()
    return torch.randperm(total, generator=generator)[:count].to(out.device)


def _targets(out: torch.Tensor, module: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """The output at the sampled positions, [positions, channels]."""
    if isinstance(module, nn.Linear):
        return out.reshape(-1, out.shape[-1])[rows]
    return out.movedim(1, -1).reshape(-1, out.shape[1])[rows]


def _patches(x: torch.Tensor, module: nn.Module, out_shape: torch.Size, rows: torch.Tensor) -> torch.Tensor:
    """The layer's input seen by each sampled output position: [positions, in_channels, kernel]
    (kernel offsets flattened in the weight's row-major order; 1 for a linear layer)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])[rows].unsqueeze(-1)
    spatial = out_shape[2:]
    d = len(spatial)
    padding = (0,) * d if module.padding == "valid" else module.padding
    pad = [p for size in reversed(padding) for p in (size, size)]
    xp = F.pad(x, pad) if any(pad) else x
    index = torch.unravel_index(rows, (out_shape[0], *spatial))
    batch, where = index[0], index[1:]
    columns = []
    for offsets in itertools.product(*(range(k) for k in module.kernel_size)):
        coords = [w * s + o * dil for w, s, o, dil in zip(where, module.stride, offsets, module.dilation)]
        columns.append(xp.movedim(1, -1)[(batch, *coords)])  # [positions, in_channels]
    return torch.stack(columns, dim=-1)


def _relative(error: torch.Tensor, target: torch.Tensor) -> float:
    return float(error.square().mean().sqrt() / target.square().mean().sqrt().clamp_min(1e-12))


@torch.no_grad()
def _refit(module: nn.Module, mask: torch.Tensor | None, patches: torch.Tensor, target: torch.Tensor,
           ridge: float) -> str:
    """Solve the layer's ridge problem in place; a reason when the layer is left as it is."""
    weight = module.weight
    out_ch = weight.shape[0]
    groups = getattr(module, "groups", 1)
    in_g = weight.shape[1]
    kernel = patches.shape[-1]
    per_out = out_ch // groups
    w_mask = (torch.ones_like(weight) if mask is None else mask.to(weight.dtype)).reshape(groups, per_out, -1)
    kept_rows = w_mask.any(dim=2)  # [groups, per_out]
    if not bool(kept_rows.any()):
        return "every row pruned"
    # the free columns of a group: those its kept rows keep; every kept row must keep the same ones
    free = (w_mask * kept_rows.unsqueeze(-1)).amax(dim=1)  # [groups, columns]
    if bool(((w_mask != free.unsqueeze(1)) & kept_rows.unsqueeze(-1)).any()):
        return "irregular mask (non-structured sparsity)"
    bias = module.bias
    a = patches.reshape(patches.shape[0], groups, in_g * kernel).transpose(0, 1).double()  # [G, P, c]
    if bias is not None:
        a = torch.cat([a, a.new_ones(a.shape[0], a.shape[1], 1)], dim=2)
        free = torch.cat([free, free.new_ones(groups, 1)], dim=1)
    y = target.reshape(target.shape[0], groups, per_out).transpose(0, 1).double()  # [G, P, per_out]
    w0 = weight.detach().reshape(groups, per_out, -1).double()
    if bias is not None:
        w0 = torch.cat([w0, bias.detach().reshape(groups, per_out, 1).double()], dim=2)
    w0 = w0.transpose(1, 2)  # [G, c, per_out]
    gram = a.transpose(1, 2) @ a
    rhs = a.transpose(1, 2) @ y
    diag = gram.diagonal(dim1=1, dim2=2)
    alive = free.bool().double()
    scale = (diag * alive).sum(dim=1) / alive.sum(dim=1).clamp_min(1)
    lam = (ridge * scale).clamp_min(1e-12)[:, None, None]
    eye = torch.eye(gram.shape[1], dtype=gram.dtype, device=gram.device)
    gram = gram + lam * eye
    rhs = rhs + lam * w0
    # a column the mask removes: cut from the system (its row and column of the Gram matrix), weight 0
    outer = alive.unsqueeze(2) * alive.unsqueeze(1)
    gram = gram * outer + eye * (1 - alive).unsqueeze(2)
    rhs = rhs * alive.unsqueeze(2)
    solution = torch.linalg.solve(gram, rhs).transpose(1, 2)  # [G, per_out, c]
    keep = kept_rows.unsqueeze(-1)
    if bias is not None:
        new_bias = torch.where(kept_rows, solution[..., -1], w0.transpose(1, 2)[..., -1])
        bias.copy_(new_bias.reshape(-1).to(bias.dtype))
        solution = solution[..., :-1]
    old = weight.detach().reshape(groups, per_out, -1).double()
    new = torch.where(keep, solution, old) * w_mask
    weight.copy_(new.reshape(weight.shape).to(weight.dtype))
    return ""


@torch.no_grad()
def reconstruct(model: nn.Module, dense: nn.Module, inputs: Inputs, masks: Mapping[str, torch.Tensor] | None = None,
                *, samples: int = 8192, ridge: float = 1e-3, seed: int = 0) -> list[Refit]:
    """Refit ``model``'s kept conv and linear weights in place so that each layer reproduces
    ``dense``'s output at that layer on ``inputs`` (one batch, as the model takes it).

    ``dense``: the unpruned model, the same architecture with its own weights (left unchanged).
    ``masks``: the pruning masks by parameter name (``"layer.weight"``); a weight without one is
    free everywhere. Returns one :class:`Refit` per layer, in the order the forward pass ran them.
    """
    layers, dense_layers = _layers(model), _layers(dense)
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    shared = {name for name, m in layers.items() if owners.get(id(m.weight), 0) > 1}
    generator = torch.Generator().manual_seed(seed)
    recorded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    calls: dict[str, int] = {}
    order: list[str] = []

    def record(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            calls[name] = calls.get(name, 0) + 1
            if calls[name] == 1:
                order.append(name)
                rows = _positions(out, module, samples, generator)
                recorded[name] = (rows, _targets(out, module, rows).detach().clone())
        return hook

    _run_hooked(dense, inputs, {m: record(n) for n, m in dense_layers.items() if n in layers})

    results: dict[str, Refit] = {}

    def refit(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
            if name in results or name not in recorded:
                return None
            reason = (_why_not(module) or ("run more than once" if calls.get(name, 0) > 1 else "")
                      or ("weight shared with another module" if name in shared else ""))
            rows, target = recorded[name]
            if reason:
                results[name] = Refit(name, None, None, reason)
                return None
            before = _relative(_targets(out, module, rows) - target, target)
            patches = _patches(args[0], module, out.shape, rows)
            mask = None if masks is None else masks.get(f"{name}.weight" if name else "weight")
            reason = _refit(module, mask, patches, target, ridge)
            if reason:
                results[name] = Refit(name, None, None, reason)
                return None
            new = module.forward(args[0])  # not module(): its hooks, this one included, stay out
            results[name] = Refit(name, before, _relative(_targets(new, module, rows) - target, target))
            return new
        return hook

    _run_hooked(model, inputs, {m: refit(n) for n, m in layers.items() if n in recorded})
    return [results[n] for n in order if n in results]


def _run_hooked(model: nn.Module, inputs: Inputs, hooks: dict[nn.Module, Any]) -> None:
    """One forward pass of ``model`` in eval mode, without gradients, with ``hooks`` as forward hooks."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks.items()]
    try:
        with eval_mode(model):
            run_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()

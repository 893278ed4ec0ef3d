"""Quantization-aware retraining: the pruned model trained through the INT8 rounding it will ship with.

When post-training quantization loses too much, the pruned model is retrained for a few epochs
through fake quantization placed where ONNX Runtime's static QDQ quantization
(:func:`structadmm.quantize_onnx`) rounds. Where that is, is read from ORT itself: the model is
exported and quantized once with the same settings (:func:`~structadmm.exporters.quantize.qdq_steps`),
and every step of the QDQ file is mapped back onto the torch model by value:

* every weight ORT stores in int8 (Conv, ConvTranspose, Linear), on ORT's grid computed from the
  weight *as it is now*: symmetric, per output channel (or per tensor), scale = max|w| / 127, or
  / 64 with ``reduce_range`` (see :func:`~structadmm.exporters.quantize.needs_reduced_range`),
  round half to even, clamped, gradients straight through. Symmetric per-channel rounding commutes
  with the per-channel scale a folded BatchNorm applies, so the grid is also the one the folded
  Conv+BN weight gets;
* every activation ORT quantizes (uint8 with a zero point, per tensor): the model's input, the
  outputs of Conv and Linear layers after the ReLU/ReLU6 ORT folds into them, pooling and
  flattening outputs (sharing their input's range, as in ORT), residual sums, other activations,
  and the model's output. Each is fake-quantized at the output of the module that makes it, or,
  for a tensor made by a function call rather than a module (``x + y``, ``torch.relu``), at the
  input of the first module that reads it. Ranges start from ORT's calibration and follow a moving
  min/max while training; ORT calibrates the retrained file again.

What is not mirrored: int32 biases (their rounding step is input scale x weight scale, far below
an output step), int8 initializers of other ops (LayerNorm scales; listed in
:attr:`FakeQuantized.unmatched`), and a tensor made by a function call is rounded for its first
reader only.

Zeros in the weights (pruned channels, non-structured sparsity) stay zero. The result is a
plain float model with the retrained weights, fake quantization removed: exporting it and
quantizing the file with ORT (the same scheme) gives the QDQ model. The caller's model is
never changed.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver
from torch.nn.utils import parametrize

from ..batches import Data, first_batch, make_loader
from ..errors import StructADMMWarning
from ..exporters.onnx_export import export_onnx
from ..exporters.quantize import QdqActivation, QdqSteps, QdqWeight, needs_reduced_range, qdq_steps
from ..layers import CONVS, eval_mode
from .train import train_epochs

__all__ = ["FakeQuantized", "activation_quantizer", "fake_quantize", "int8_grid", "qat_retrain"]

# the layers whose weights ORT can store in int8 (a transposed convolution's output channels are its axis 1)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_WEIGHTED = (*CONVS, *_TRANSPOSED, nn.Linear)


def int8_grid(weight: torch.Tensor, bound: int, axis: int | None) -> torch.Tensor:
    """``weight`` on ONNX Runtime's symmetric int8 weight grid, from its current values: scale =
    max|w| / ``bound`` (127, or 64 with reduce_range) per slice along ``axis`` (None: one scale),
    computed in float64 and stored in float32 as ORT does (1.0 where a slice is all zero); values
    rounded half to even and clamped to [-bound, bound]."""
    w = weight.detach()
    if axis is None:
        absmax = w.abs().amax()
    else:
        absmax = w.abs().amax(dim=[d for d in range(w.dim()) if d != axis], keepdim=True)
    scale = absmax.double() * 2 / (2 * bound)
    scale = torch.where(scale < torch.finfo(torch.float32).tiny, torch.ones_like(scale), scale).float()
    return torch.clamp(torch.round(weight / scale), -bound, bound) * scale


def activation_quantizer() -> FakeQuantize:
    """Per tensor, uint8 with a zero point, ranged by a moving min/max: ORT's QUInt8 activations."""
    return FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8,
                        qscheme=torch.per_tensor_affine)


class _Rounded(nn.Module):
    """A weight parametrization: the weight on ORT's grid (:func:`int8_grid`), zeros kept zero;
    the gradient passes straight through the rounding."""

    def __init__(self, weight: torch.Tensor, bound: int, axis: int | None):
        super().__init__()
        self.bound, self.axis = bound, axis
        self.register_buffer("keep", weight.detach().ne(0).to(weight.dtype))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        kept = weight * self.keep
        return kept + (int8_grid(kept, self.bound, self.axis) - kept).detach()


class FakeQuantized:
    """Fake quantization attached to a model where ORT's QDQ file rounds (:func:`fake_quantize`).

    ``layers``: the modules whose weights are rounded, by name; ``activations``: one quantizer per
    ORT range (tensors that share a scale in ORT share one here), by the ORT scale's name;
    ``points``: where each activation is rounded (``"<module> output"``, ``"<module> input"``,
    ``#n`` for a module's n-th call), by ORT tensor name; ``unmatched``: ORT's steps not mirrored.
    :meth:`remove` takes it all off and leaves the float weights as trained; :meth:`enforce` puts
    the zeros back after a step.
    """

    def __init__(self, model: nn.Module, steps: QdqSteps, example: torch.Tensor, reduce_range: bool = False):
        self.model = model
        self.layers: dict[str, nn.Module] = {}
        self.activations: dict[str, FakeQuantize] = {}
        self.points: dict[str, str] = {}
        self.unmatched: list[str] = list(steps.other)
        sites = _activation_sites(model, example, steps.activations)  # before any rounding: the FP32 values
        bound = 64 if reduce_range else 127
        for weight in steps.weights:
            name = _weight_owner(model, weight, self.layers)
            if name is None:
                self.unmatched.append(weight.node)
                continue
            module = model.get_submodule(name)
            parametrize.register_parametrization(module, "weight", _Rounded(module.weight, bound, weight.axis))
            self.layers[name] = module
        by_module: dict[str, dict[tuple[str, int], FakeQuantize]] = {}
        for activation in steps.activations:
            site = sites.get(activation.tensor)
            if site is None:
                self.unmatched.append(activation.tensor)
                continue
            quantizer = self.activations.get(activation.shared)
            if quantizer is None:
                quantizer = self.activations[activation.shared] = _seeded(activation)
            module, kind, call = site
            by_module.setdefault(module, {}).setdefault((kind, call), quantizer)
            self.points[activation.tensor] = f"{module or '(model)'} {kind}" + (f" #{call + 1}" if call else "")
        self._hooks = _attach(model, by_module)

    def enforce(self) -> None:
        with torch.no_grad():
            for module in self.layers.values():
                rounded = module.parametrizations.weight[0]
                module.parametrizations.weight.original.mul_(rounded.keep)

    def scales(self) -> dict[str, float]:
        """The scale each activation range has settled on, by ORT scale name."""
        return {name: float(q.scale) for name, q in self.activations.items()}

    def remove(self) -> nn.Module:
        for hook in self._hooks:
            hook.remove()
        for module in self.layers.values():
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        self._hooks.clear()
        self.layers.clear()
        self.activations.clear()
        return self.model


def _weight_owner(model: nn.Module, weight: QdqWeight, taken: dict[str, nn.Module]) -> str | None:
    """The module whose weight ORT's is: same shape, and each output channel the torch one times a
    factor (1, or what a folded BatchNorm multiplies it by)."""
    ours = weight.value.astype(np.float64)
    for name, module in model.named_modules():
        if not isinstance(module, _WEIGHTED) or name in taken or tuple(module.weight.shape) != ours.shape:
            continue
        channel = 1 if isinstance(module, _TRANSPOSED) else 0  # torch's output-channel axis
        theirs = module.weight.detach().double().cpu().numpy()
        a = np.moveaxis(ours, channel, 0).reshape(ours.shape[channel], -1)
        b = np.moveaxis(theirs, channel, 0).reshape(theirs.shape[channel], -1)
        factor = (a * b).sum(1) / np.maximum((b * b).sum(1), 1e-300)
        if np.abs(a - factor[:, None] * b).max() <= 1e-4 * max(np.abs(a).max(), 1e-12):
            return name
    return None


def _activation_sites(model: nn.Module, example: torch.Tensor,
                      activations: list[QdqActivation]) -> dict[str, tuple[str, str, int]]:
    """For each ORT activation, where the torch model holds the same values: ``(module name,
    "output" | "input", call index)``, the first module output that matches, else the first
    module input (a tensor made by a function call)."""
    outputs: list[tuple[str, int, torch.Tensor]] = []
    inputs: list[tuple[str, int, torch.Tensor]] = []
    calls: dict[str, int] = {}
    hooks = []

    def record(name: str):
        def before(module: nn.Module, args: tuple) -> None:
            calls[name] = calls.get(name, 0) + 1
            if args and isinstance(args[0], torch.Tensor):
                inputs.append((name, calls[name] - 1, args[0].detach()))

        def after(module: nn.Module, args: tuple, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                outputs.append((name, calls[name] - 1, out.detach()))
        return before, after

    for name, module in model.named_modules():
        before, after = record(name)
        hooks += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        with torch.no_grad(), eval_mode(model):
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    sites = {}
    for activation in activations:
        target = torch.from_numpy(activation.value)
        tolerance = 1e-4 * max(float(target.abs().max()), 1e-3)
        for kind, records in (("output", outputs), ("input", inputs)):
            match = next(((name, call) for name, call, value in records if value.shape == target.shape
                          and float((value.cpu().float() - target).abs().max()) <= tolerance), None)
            if match is not None:
                sites[activation.tensor] = (match[0], kind, match[1])
                break
    return sites


def _seeded(activation: QdqActivation) -> FakeQuantize:
    """An activation quantizer starting from ORT's calibrated range for ``activation``."""
    quantizer = activation_quantizer()
    low = (0 - activation.zero_point) * activation.scale
    high = (255 - activation.zero_point) * activation.scale
    observer = quantizer.activation_post_process
    observer.min_val, observer.max_val = torch.tensor(low), torch.tensor(high)
    quantizer.scale.copy_(torch.tensor([activation.scale]))
    quantizer.zero_point.copy_(torch.tensor([activation.zero_point]))
    return quantizer


def _attach(model: nn.Module, sites: dict[str, dict[tuple[str, int], FakeQuantize]]) -> list[Any]:
    """Hooks that round each module's input or output on the calls named in ``sites`` (by module
    name, then ``("input" | "output", call index)``); call counts start again with every forward
    pass of ``model``."""
    calls: dict[str, int] = {}
    hooks = []

    def quantize(quantizer: FakeQuantize, x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if quantizer.scale.device != x.device:
            quantizer.to(x.device)
        return quantizer(x)

    def hooks_of(name: str, where: dict[tuple[str, int], FakeQuantize]):
        open_calls: list[int] = []

        def before(module: nn.Module, args: tuple) -> tuple | None:
            open_calls.append(calls.get(name, 0))
            calls[name] = open_calls[-1] + 1
            quantizer = where.get(("input", open_calls[-1]))
            return (quantize(quantizer, args[0]), *args[1:]) if quantizer is not None and args else None

        def after(module: nn.Module, args: tuple, out: Any) -> Any:
            quantizer = where.get(("output", open_calls.pop()))
            return quantize(quantizer, out) if quantizer is not None else None
        return before, after

    for name, where in sites.items():
        module = model.get_submodule(name)
        before, after = hooks_of(name, where)
        hooks += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    hooks.append(model.register_forward_pre_hook(lambda module, args: calls.clear(), prepend=True))
    return hooks


def fake_quantize(model: nn.Module, example: Any, *, reduce_range: bool = False, per_channel: bool = True,
                  exclude: tuple[str, ...] | list[str] = ()) -> FakeQuantized:
    """Attach INT8 fake quantization to ``model`` in place, where ORT's static QDQ quantization
    (per-channel weights unless ``per_channel`` is False, 7-bit weights with ``reduce_range``,
    ``exclude``: ONNX node names left in FP32) rounds the model exported from it. ``example``: a
    few real inputs (a batch), to export with and to find each step's place in the torch model."""
    example = example if isinstance(example, torch.Tensor) else torch.as_tensor(example)
    with tempfile.TemporaryDirectory(prefix="structadmm-qat-") as tmp, eval_mode(model):
        path = Path(tmp) / "model.onnx"
        export_onnx(model, example, path)
        steps = qdq_steps(path, example, per_channel=per_channel, reduce_range=reduce_range, exclude=exclude)
    return FakeQuantized(model, steps, example, reduce_range)


def qat_retrain(model: nn.Module, data: Data, epochs: int, *, lr: float = 0.01, batch_size: int = 64,
                seed: int = 0, momentum: float = 0.9, weight_decay: float = 5e-4, reduce_range: bool | None = None,
                per_channel: bool = True, exclude: tuple[str, ...] | list[str] = (),
                teacher: nn.Module | None = None, distill: float = 0.0, temperature: float = 4.0) -> nn.Module:
    """A copy of ``model`` retrained ``epochs`` epochs through INT8 fake quantization, returned as a
    plain float model (eval mode) whose weights suit ORT's INT8 grid; zeros stay zero.

    ``data``: the training data (Dataset, ``(x, y)`` or a DataLoader). ``reduce_range``: 7-bit
    weights, as :func:`~structadmm.quantize_onnx` will quantize them (None: what it picks for
    this CPU); ``per_channel`` and ``exclude`` as it takes them. ``teacher``/``distill``:
    distillation as in masked retraining (see :func:`~structadmm.pipeline.train.train_epochs`).
    A one-line warning names the INT8 steps of ORT's file that could not be mirrored.
    """
    net = copy.deepcopy(model)
    loader = data if isinstance(data, torch.utils.data.DataLoader) else make_loader(data, batch_size, shuffle=True,
                                                                                      seed=seed)
    if reduce_range is None:
        reduce_range = needs_reduced_range()
    example = first_batch(make_loader(loader.dataset, 8, shuffle=False))  # the training order is left as it is
    attached = fake_quantize(net, example, reduce_range=reduce_range, per_channel=per_channel, exclude=exclude)
    if attached.unmatched:
        warnings.warn(StructADMMWarning(
            f"quantization-aware retraining leaves {len(attached.unmatched)} of ORT's INT8 steps in float: "
            f"{', '.join(attached.unmatched[:4])}{' ...' if len(attached.unmatched) > 4 else ''}"), stacklevel=2)
    torch.manual_seed(seed)
    train_epochs(net, loader, epochs, lr=lr, momentum=momentum, weight_decay=weight_decay,
                 after_step=attached.enforce, teacher=teacher, distill=distill, temperature=temperature)
    attached.enforce()
    return attached.remove().eval()

"""Quantization-aware retraining: the pruned model trained through the INT8 rounding it will ship with.

When post-training quantization loses too much, the pruned model is retrained for a few epochs
with PyTorch's own fake quantization (``torch.ao.quantization.FakeQuantize``) placed where
ONNX Runtime's static QDQ quantization (:func:`structadmm.quantize_onnx`) puts its int8 steps:

* every Conv and Linear weight, per output channel, symmetric int8 in [-127, 127] (or
  [-64, 64] with ``reduce_range``, see :func:`~structadmm.exporters.quantize.needs_reduced_range`),
  so the weight grid is exactly ONNX Runtime's (scale = max|w| / 127 or / 64 per channel). Symmetric
  per-channel rounding commutes with the per-channel scale a folded BatchNorm applies, so the
  grid is also the one the folded Conv+BN weight gets;
* the input of every Conv and Linear, per tensor, uint8 with a zero point (moving-average
  min/max), as ORT's calibrated activations.

Zeros in the weights (pruned channels, non-structured sparsity) stay zero. The result is a
plain float model with the retrained weights, fake quantization removed: exporting it and
quantizing the file with ORT (the same scheme) gives the QDQ model. The caller's model is
never changed.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver, PerChannelMinMaxObserver
from torch.nn.utils import parametrize

from ..exporters.quantize import needs_reduced_range
from ..layers import CONVS
from ..batches import Data, make_loader
from .train import train_epochs

__all__ = ["FakeQuantized", "fake_quantize", "qat_retrain"]

# the layers whose weights and inputs ORT quantizes (ConvTranspose's output-channel axis is 1 there: left float)
_QUANTIZED = (*CONVS, nn.Linear)


def weight_quantizer(reduce_range: bool = False) -> FakeQuantize:
    """Per output channel, symmetric int8 in [-127, 127] (7 bits: [-64, 64]): ONNX Runtime's QInt8
    per-channel weights."""
    bound = 64 if reduce_range else 127
    return FakeQuantize(observer=PerChannelMinMaxObserver, quant_min=-bound, quant_max=bound, dtype=torch.qint8,
                        qscheme=torch.per_channel_symmetric, ch_axis=0)


def activation_quantizer() -> FakeQuantize:
    """Per tensor, uint8 with a zero point, ranged by a moving min/max: ORT's QUInt8 activations."""
    return FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8,
                        qscheme=torch.per_tensor_affine)


class _Rounded(nn.Module):
    """A weight parametrization: the weight as its fake quantizer rounds it, zeros kept zero."""

    def __init__(self, weight: torch.Tensor, reduce_range: bool):
        super().__init__()
        self.quantizer = weight_quantizer(reduce_range)
        self.register_buffer("keep", weight.detach().ne(0).to(weight.dtype))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.quantizer(weight * self.keep)


class FakeQuantized:
    """Fake quantization attached to a model (:func:`fake_quantize`); :meth:`remove` takes it off
    and leaves the float weights as trained. :meth:`enforce` puts the zeros back after a step."""

    def __init__(self, model: nn.Module, reduce_range: bool = False):
        self.model = model
        self.layers: dict[str, nn.Module] = {}
        self.inputs: dict[str, FakeQuantize] = {}
        self._hooks: list[Any] = []
        for name, module in model.named_modules():
            if not isinstance(module, _QUANTIZED):
                continue
            parametrize.register_parametrization(module, "weight", _Rounded(module.weight, reduce_range))
            quantizer = activation_quantizer()
            module.add_module("input_quantizer", quantizer)
            self._hooks.append(module.register_forward_pre_hook(_quantize_input))
            self.layers[name], self.inputs[name] = module, quantizer

    def enforce(self) -> None:
        with torch.no_grad():
            for module in self.layers.values():
                rounded = module.parametrizations.weight[0]
                module.parametrizations.weight.original.mul_(rounded.keep)

    def scales(self) -> dict[str, float]:
        """The input scale each layer's activation quantizer has settled on."""
        return {name: float(q.scale) for name, q in self.inputs.items()}

    def remove(self) -> nn.Module:
        for hook in self._hooks:
            hook.remove()
        for module in self.layers.values():
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            del module.input_quantizer
        self._hooks.clear()
        self.layers.clear()
        return self.model


def _quantize_input(module: nn.Module, args: tuple) -> tuple:
    return (module.input_quantizer(args[0]), *args[1:])


def fake_quantize(model: nn.Module, reduce_range: bool = False) -> FakeQuantized:
    """Attach INT8 fake quantization to ``model`` in place (weights and inputs of its Conv/Linear layers)."""
    return FakeQuantized(model, reduce_range)


def qat_retrain(model: nn.Module, data: Data, epochs: int, *, lr: float = 0.01, batch_size: int = 64,
                seed: int = 0, momentum: float = 0.9, weight_decay: float = 5e-4, reduce_range: bool | None = None,
                teacher: nn.Module | None = None, distill: float = 0.0, temperature: float = 4.0) -> nn.Module:
    """A copy of ``model`` retrained ``epochs`` epochs through INT8 fake quantization, returned as a
    plain float model (eval mode) whose weights suit ORT's INT8 grid; zeros stay zero.

    ``data``: the training data (Dataset, ``(x, y)`` or a DataLoader). ``reduce_range``: 7-bit
    weights, as :func:`~structadmm.quantize_onnx` will quantize them (None: what it picks for
    this CPU). ``teacher``/``distill``:
    distillation as in masked retraining (see :func:`~structadmm.pipeline.train.train_epochs`).
    """
    net = copy.deepcopy(model)
    loader = data if isinstance(data, torch.utils.data.DataLoader) else make_loader(data, batch_size, shuffle=True,
                                                                                      seed=seed)
    if reduce_range is None:
        reduce_range = needs_reduced_range()
    attached = fake_quantize(net, reduce_range)
    torch.manual_seed(seed)
    train_epochs(net, loader, epochs, lr=lr, momentum=momentum, weight_decay=weight_decay,
                 after_step=attached.enforce, teacher=teacher, distill=distill, temperature=temperature)
    attached.enforce()
    return attached.remove().eval()

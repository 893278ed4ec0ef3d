"""Every registered model with a small example input, for checks that must cover the whole zoo;
the larger ones are marked slow."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from structadmm.models import get_spec, model_names

#: name -> one sample's shape for these checks (None: the model's own), small so the big models stay quick
ZOO_INPUTS = {
    "digits-cnn": None, "lenet5": None, "alexnet-cifar": None, "resnet20": None, "c3d-small": None,
    "mobilenetv2": (3, 32, 32), "resnet18": (3, 32, 32), "resnet56": None, "resnet50": (3, 32, 32),
    "vgg16": (3, 32, 32), "alexnet": (3, 64, 64), "mnist1d-cnn": None, "vit-digits": None,
}
FAST = {"digits-cnn", "lenet5", "alexnet-cifar", "resnet20", "c3d-small", "mobilenetv2", "mnist1d-cnn", "vit-digits"}


def zoo_case(name: str) -> tuple[nn.Module, torch.Tensor]:
    """The model, seeded and in eval mode, and an example batch of two."""
    spec = get_spec(name)
    torch.manual_seed(0)
    return spec.build().eval(), torch.randn(2, *(ZOO_INPUTS[name] or spec.input_shape))


def zoo_params() -> list:
    """Every registered model (a model without an entry above fails the check that uses it)."""
    return [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in model_names()]

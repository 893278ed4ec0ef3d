"""The model registry: every built-in architecture by name, with the input it expects.

A :class:`ModelSpec` builds a fresh, randomly initialised model and knows the shape of one
input sample, so every stage (tracing, export, benchmarking) can make an example input
without per-model code elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import StructADMMError


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # one sample, no batch dimension
    description: str
    num_classes: int

    def example_input(self, batch: int = 1, seed: int = 0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn((batch, *self.input_shape), generator=gen)


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def model_names() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise StructADMMError(
            f"unknown model {name!r}; choose one of: {', '.join(model_names())}"
        ) from None

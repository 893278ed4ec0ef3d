"""What every model loader returns: the module and what its source says about its input.

Its own module so that every loader (zoo names, ``module:function``, ``.pt2``, ``.onnx``) can
return it without importing another loader.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import StructADMMError

__all__ = ["LoadedModel"]


@dataclass
class LoadedModel:
    """A model ready for the pipeline, with what its source says about its input and output."""

    module: nn.Module
    name: str
    input_shape: tuple[int, ...] | None  # one sample, no batch dimension; None when the source does not say
    num_classes: int | None
    onnx_file: Path | None = None  # the user's .onnx file the module was converted from
    vocab_size: int | None = None  # a text model: its input is token ids below this, not real numbers

    def example_input(self, batch: int = 1, seed: int = 0) -> torch.Tensor:
        """A seeded random batch of the model's input shape (token ids for a text model)."""
        if self.input_shape is None:
            raise StructADMMError(
                f"{self.name} does not say what input it takes; give the shape of one sample "
                "(--input-shape CxHxW on the command line, or return (model, input_shape) from the function)"
            )
        gen = torch.Generator().manual_seed(seed)
        if self.vocab_size is not None:
            return torch.randint(0, self.vocab_size, (batch, *self.input_shape), generator=gen)
        return torch.randn((batch, *self.input_shape), generator=gen)

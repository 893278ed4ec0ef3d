"""Training objectives: what a training step minimises, as one pluggable piece.

An objective is any callable ``objective(outputs, labels, inputs) -> loss``: ``outputs`` is what
the model returned for one batch, ``labels`` the batch's labels (None for data without them) and
``inputs`` the batch's inputs on the training device. :func:`~.train.train_epochs` adds the ADMM
penalty to it; the runner builds its objective in one place, :func:`objective_of`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..batches import Inputs, run_model
from ..errors import StructADMMError

__all__ = ["Distillation", "Labels", "Objective", "objective_of"]


class Objective(Protocol):
    def __call__(self, outputs: Any, labels: torch.Tensor | None, inputs: Inputs) -> torch.Tensor: ...


class Labels:
    """Cross-entropy of the model's class scores against integer labels."""

    def __call__(self, outputs: Any, labels: torch.Tensor | None, inputs: Inputs) -> torch.Tensor:
        if labels is None:
            raise StructADMMError("training data has no labels: give (input, label) pairs")
        return F.cross_entropy(outputs, labels)


@dataclass
class Distillation:
    """Knowledge distillation (Hinton et al.) mixed into ``base``: ``(1 - weight) * base + weight *
    T^2 * KL(teacher_T || student_T)`` at temperature T, the teacher frozen in eval mode."""

    teacher: nn.Module
    weight: float
    temperature: float = 4.0
    base: Objective = Labels()

    def __call__(self, outputs: Any, labels: torch.Tensor | None, inputs: Inputs) -> torch.Tensor:
        t = self.temperature
        with torch.no_grad():
            soft = F.log_softmax(run_model(self.teacher, inputs) / t, dim=1)
        kd = F.kl_div(F.log_softmax(outputs / t, dim=1), soft, reduction="batchmean", log_target=True)
        return (1 - self.weight) * self.base(outputs, labels, inputs) + self.weight * t * t * kd


def objective_of(teacher: nn.Module | None = None, distill: float = 0.0, temperature: float = 4.0) -> Objective:
    """The objective a run trains with: labels, with the dense teacher mixed in when ``distill`` > 0."""
    if teacher is not None and distill > 0:
        return Distillation(teacher, float(distill), float(temperature))
    return Labels()

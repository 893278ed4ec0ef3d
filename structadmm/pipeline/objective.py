"""Training objectives: what a training step minimises, as one pluggable piece.

An objective is any callable ``objective(outputs, labels, inputs) -> loss``: ``outputs`` is what
the model returned for one batch, ``labels`` the batch's labels (None for data without them) and
``inputs`` the batch's inputs on the training device. :func:`~.train.train_epochs` adds the ADMM
penalty to it; the runner builds its objective in one place, :func:`objective_of`.

Three objectives ship:

* :class:`Labels`: cross-entropy against integer class labels (a classifier with labelled data);
* :class:`Distillation`: that cross-entropy with the dense teacher's softened scores mixed in
  (Hinton et al.), the ``distill`` weight of masked retraining;
* :class:`TeacherMatching`: no labels at all. The dense model is the teacher and every output is
  matched: classifier scores with KL at a temperature, every other output with a mean squared
  error divided by the teacher's spread. This is ``objective = "distill"``, which compresses a
  detector, a segmenter, an embedder or an OCR model from unlabeled inputs alone.

:func:`choose_objective` decides what ``objective = "auto"`` means for a given model and data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..batches import Data, Inputs, make_loader, run_model, split_batch
from ..errors import StructADMMError
from ..layers import eval_mode, flat_outputs

__all__ = ["Distillation", "Labels", "Objective", "OutputLoss", "TeacherMatching", "choose_objective",
           "is_class_scores", "objective_of", "resolve_objective"]

#: ``loss(student_outputs, teacher_outputs, inputs) -> loss``: a user's own distillation loss
OutputLoss = Callable[[Any, Any, Inputs], torch.Tensor]


class Objective(Protocol):
    def __call__(self, outputs: Any, labels: torch.Tensor | None, inputs: Inputs) -> torch.Tensor: ...


class Labels:
    """Cross-entropy of the model's class scores against integer labels."""

    def __call__(self, outputs: Any, labels: torch.Tensor | None, inputs: Inputs) -> torch.Tensor:
        if labels is None:
            raise StructADMMError("training data has no labels: give (input, label) pairs, or distil from the "
                                  "dense model instead (objective = \"distill\")")
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


def is_class_scores(output: torch.Tensor) -> bool:
    """Whether ``output`` looks like one row of class scores per sample: floating, [batch, classes]
    with at least two classes."""
    return output.is_floating_point() and output.dim() == 2 and output.shape[1] >= 2


@dataclass
class TeacherMatching:
    """Distillation on every output, no labels: the student is trained to reproduce the teacher.

    The model's outputs and the teacher's are flattened in the same order (tensors, tuples,
    lists, dicts: :func:`~structadmm.layers.flat_outputs`), and each floating output adds one term;
    the terms are averaged, so no output outweighs another by its scale or its size:

    * class scores (``kind`` ``"kl"``, or ``"auto"`` and the model has exactly one output, of
      shape [batch, classes]): ``T^2 * KL(teacher_T || student_T)`` at temperature T. Rows that
      are already probabilities (non-negative, summing to one: a softmax inside the model) are
      compared as probabilities, at T = 1;
    * an output whose values all lie in [0, 1] in both models (``"auto"``: a sigmoid map, such as
      a text detector's): the mean KL divergence between the per-element probabilities;
    * any other output (``"mse"``, or ``"auto"``): the mean squared error divided by the
      teacher's spread, its mean square over the batch and every axis after the channel axis
      (axis 1), per channel: a squared relative error. Box coordinates in pixels and class
      probabilities in one detector output then weigh the same. A channel near zero has its
      spread floored at a thousandth of the mean spread. (The mean square rather than the
      variance: a channel that barely varies over the inputs, as pooled features of an untrained
      net do, would otherwise divide by almost nothing.)

    Integer and boolean outputs (indices, masks) carry no gradient and are not matched.
    ``teacher`` is any callable taking the batch's inputs: a frozen torch module, or the user's
    own ONNX file run in ONNX Runtime (:class:`~structadmm.exporters.OnnxModule`).
    ``loss``: a callable ``loss(student_outputs, teacher_outputs, inputs)`` replaces the terms above.
    """

    teacher: Callable[..., Any]
    temperature: float = 4.0
    kind: Literal["auto", "mse", "kl"] = "auto"
    loss: OutputLoss | None = None

    def __call__(self, outputs: Any, labels: torch.Tensor | None, inputs: Inputs) -> torch.Tensor:
        with torch.no_grad():
            target = run_model(self.teacher, inputs)
        if self.loss is not None:
            return self.loss(outputs, target, inputs)
        student, teacher = flat_outputs(outputs), flat_outputs(target)
        if len(student) != len(teacher):
            raise StructADMMError(f"the model returns {len(student)} outputs but its teacher {len(teacher)}; "
                                  "distillation matches them one for one")
        terms = []
        for index, (s, t) in enumerate(zip(student, teacher)):
            if not s.is_floating_point():
                continue
            t = t.to(device=s.device, dtype=s.dtype)
            if s.shape != t.shape:
                raise StructADMMError(f"output {index} has shape {list(s.shape)} but the teacher's has "
                                      f"{list(t.shape)}")
            scores = self.kind == "kl" or (self.kind == "auto" and len(student) == 1 and is_class_scores(s))
            if scores:
                terms.append(self._kl(s, t))
            elif self.kind == "auto" and _in_unit_interval(t) and _in_unit_interval(s.detach()):
                terms.append(_bernoulli_kl(s, t))
            else:
                terms.append(_scaled_mse(s, t))
        if not terms:
            raise StructADMMError("the model has no floating-point output to distil")
        return torch.stack(terms).mean()

    def _kl(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if _are_probabilities(teacher):
            log_p = torch.log(teacher.clamp_min(1e-8))
            log_q = torch.log(student.clamp_min(1e-8))
            return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
        t = self.temperature
        return t * t * F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                                reduction="batchmean", log_target=True)


def _are_probabilities(rows: torch.Tensor) -> bool:
    return bool((rows >= 0).all()) and bool(torch.allclose(rows.sum(dim=1), torch.ones(()), atol=1e-3))


def _in_unit_interval(values: torch.Tensor) -> bool:
    return bool((values >= 0).all()) and bool((values <= 1).all())


def _bernoulli_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean KL divergence between the teacher's and the student's per-element probabilities (a
    sigmoid map): its gradient does not vanish where the student's sigmoid saturates, as a squared
    error's does, so a sparse map (text on a page) is not learnt as zeros everywhere."""
    eps = 1e-6
    p, q = teacher.clamp(eps, 1 - eps), student.clamp(eps, 1 - eps)
    return (p * (p.log() - q.log()) + (1 - p) * ((1 - p).log() - (1 - q).log())).mean()


def _scaled_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE divided by the teacher's per-channel spread (the whole tensor's for rank < 2)."""
    if teacher.dim() < 2:
        return F.mse_loss(student, teacher) / teacher.square().mean().clamp_min(1e-12)
    channels = teacher.shape[1]
    t = teacher.transpose(0, 1).reshape(channels, -1)
    s = student.transpose(0, 1).reshape(channels, -1)
    spread = t.square().mean(dim=1)
    spread = spread.clamp_min(max(float(spread.mean()) * 1e-3, 1e-12))
    return (((s - t) ** 2).mean(dim=1) / spread).mean()


def objective_of(mode: Literal["labels", "distill"] = "labels", teacher: Callable[..., Any] | None = None, *,
                 distill: float = 0.0, temperature: float = 4.0, kind: Literal["auto", "mse", "kl"] = "auto",
                 loss: OutputLoss | None = None) -> Objective:
    """The objective a run trains with.

    ``mode="labels"``: cross-entropy, with the dense ``teacher`` mixed in when ``distill`` > 0.
    ``mode="distill"``: :class:`TeacherMatching` against ``teacher`` (required), or the user's
    ``loss(student_outputs, teacher_outputs, inputs)``.
    """
    if mode == "distill":
        if teacher is None:
            raise StructADMMError("distillation needs the dense model as its teacher")
        return TeacherMatching(teacher, float(temperature), kind, loss)
    if teacher is not None and distill > 0:
        return Distillation(teacher, float(distill), float(temperature))
    return Labels()


def choose_objective(asked: Literal["labels", "distill", "auto"], outputs: Any, labelled: bool) -> str:
    """What ``objective = asked`` means for a model whose example outputs are ``outputs``, on data
    that has labels (``labelled``) or not: ``"labels"`` or ``"distill"``.

    ``auto`` distils when the data has no labels or the model's output is not one [batch, classes]
    tensor, and otherwise trains on the labels. ``labels`` without labels, or with an output that
    is not class scores, is refused in one line.
    """
    flat = flat_outputs(outputs)
    classifier = len(flat) == 1 and is_class_scores(flat[0])
    if asked == "auto":
        return "labels" if labelled and classifier else "distill"
    if asked == "labels":
        if not labelled:
            raise StructADMMError("objective = \"labels\" but the training data has no labels; give labelled data "
                                  "or distil from the dense model (objective = \"distill\" or \"auto\")")
        if not classifier:
            shapes = ", ".join(str(list(t.shape)) for t in flat)
            raise StructADMMError(f"objective = \"labels\" trains a classifier, but the model returns {shapes}, not "
                                  "one [batch, classes] tensor; distil from the dense model instead "
                                  "(objective = \"distill\" or \"auto\")")
    return asked


def resolve_objective(asked: Literal["labels", "distill", "auto"], model: nn.Module, train: Data,
                      loss: OutputLoss | None = None) -> str | None:
    """:func:`choose_objective` for ``model`` on its training data, read from the data's first two
    samples; a caller's ``loss`` means distillation. None when the model cannot run on them: the
    data check that follows explains why, in one line."""
    if loss is not None or asked == "distill":
        return "distill"
    try:
        x, y = split_batch(next(iter(make_loader(train, 2, shuffle=False))))
        with eval_mode(model), torch.no_grad():
            outputs = run_model(model, tuple(t[:2] for t in x) if isinstance(x, tuple) else x[:2])
    except Exception:  # noqa: BLE001 - bad data or a model that fails on it: the data check explains
        return None
    return choose_objective(asked, outputs, y is not None)

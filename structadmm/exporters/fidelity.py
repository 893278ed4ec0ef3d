"""How closely a pruned model follows its dense one, measured without labels.

A model compressed with the dense model as teacher has no accuracy to report; what it has is
its agreement with that teacher on the same inputs. These figures take outputs already computed
(torch tensors or numpy arrays, from torch or ONNX Runtime alike), so they say nothing about how
the outputs were made; each is pure arithmetic:

* :func:`output_fidelity`: for each output tensor, the relative error ``||d - p|| / ||d||`` and
  the cosine similarity of the dense (``d``) and pruned (``p``) outputs, each taken per sample
  (the tensor's first dimension; the rest flattened) and averaged over the samples;
* :func:`top1_agreement`: the share of samples (of positions, for a dense prediction) on which
  the two models' highest class score is the same class;
* :func:`box_map50`: a detector's mAP at IoU 0.5, the pruned model's boxes scored against the
  dense model's boxes as the ground truth; :func:`yolo_boxes` decodes an Ultralytics-style raw
  head output into such boxes, with class-aware non-maximum suppression.

Outputs are named by where they sit: a lone tensor is ``output``; in tuples and lists an
output's index, in dicts its key, joined with dots for nested ones (``0``, ``1``, ``boxes``,
``aux.0``), in order: tuples and lists by index, dicts in their own (insertion) order,
depth first, as :func:`structadmm.layers.flat_outputs` orders them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from structadmm.errors import StructADMMError

__all__ = [
    "OutputFidelity",
    "box_iou",
    "box_map50",
    "named_outputs",
    "nms",
    "output_fidelity",
    "top1_agreement",
    "yolo_boxes",
]

#: One image's boxes: (xyxy [N, 4], scores [N], classes [N]).
Boxes = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class OutputFidelity:
    """One output's agreement: ``rel_error`` (0 is exact) and ``cosine`` (1 is the same direction),
    both per-sample means."""

    name: str
    rel_error: float
    cosine: float


def _array(value: Any, what: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    raise StructADMMError(f"{what} is {type(value).__name__}, not a tensor or numpy array")


def named_outputs(outputs: Any, prefix: str = "") -> list[tuple[str, np.ndarray]]:
    """``outputs`` (a tensor or array, or tuples, lists and dicts of them) as ``(name, array)``
    pairs, in the order and with the names the module docstring gives."""
    if isinstance(outputs, dict):
        return [pair for key, value in outputs.items() for pair in named_outputs(value, _join(prefix, str(key)))]
    if isinstance(outputs, (tuple, list)):
        return [pair for i, value in enumerate(outputs) for pair in named_outputs(value, _join(prefix, str(i)))]
    return [(prefix or "output", _array(outputs, f"output {prefix or 'output'}"))]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _per_sample(a: np.ndarray) -> np.ndarray:
    """Samples x values, in float64 (a 0-d or 1-d output: one value per sample)."""
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(1, 1) if a.ndim == 0 else a.reshape(len(a), -1)


def output_fidelity(dense_outputs: Any, pruned_outputs: Any) -> list[OutputFidelity]:
    """Relative error and cosine similarity of every output, dense against pruned.

    Both are taken per sample (first dimension), over that sample's values flattened, and
    averaged over the samples. Where a dense sample is all zeros, its relative error is 0 when the
    pruned one is zeros too, else infinite; the cosine of two zero vectors is 1, of a zero and a
    non-zero one 0. Outputs must match in names and shapes.
    """
    dense, pruned = named_outputs(dense_outputs), named_outputs(pruned_outputs)
    if [n for n, _ in dense] != [n for n, _ in pruned]:
        raise StructADMMError(
            f"the dense and pruned outputs differ: {', '.join(n for n, _ in dense)} against "
            f"{', '.join(n for n, _ in pruned)}"
        )
    results = []
    for (name, d), (_, p) in zip(dense, pruned):
        if d.shape != p.shape:
            raise StructADMMError(
                f"output {name} is {list(d.shape)} from the dense model but {list(p.shape)} from the pruned one"
            )
        if d.size == 0:
            raise StructADMMError(f"output {name} is empty ({list(d.shape)}); there is nothing to compare")
        d2, p2 = _per_sample(d), _per_sample(p)
        d_norm, p_norm = np.linalg.norm(d2, axis=1), np.linalg.norm(p2, axis=1)
        diff = np.linalg.norm(d2 - p2, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(d_norm > 0, diff / d_norm, np.where(diff > 0, np.inf, 0.0))
            both = d_norm * p_norm
            cos = np.where(both > 0, (d2 * p2).sum(axis=1) / both, np.where((d_norm == 0) & (p_norm == 0), 1.0, 0.0))
        results.append(OutputFidelity(name, float(rel.mean()), float(np.clip(cos, -1.0, 1.0).mean())))
    return results


def top1_agreement(dense_logits: Any, pruned_logits: Any) -> float:
    """The share of samples whose highest score (over dimension 1, the classes) is the same class
    in both; for scores with more dimensions (samples x classes x H x W), the share of positions."""
    d, p = _array(dense_logits, "the dense logits"), _array(pruned_logits, "the pruned logits")
    if d.shape != p.shape:
        raise StructADMMError(f"cannot compare logits of shape {list(d.shape)} and {list(p.shape)}")
    if d.ndim < 2 or d.shape[0] == 0 or d.shape[1] == 0:
        raise StructADMMError(f"logits must be samples x classes (x ...), not {list(d.shape)}")
    return float((d.argmax(axis=1) == p.argmax(axis=1)).mean())


# --- boxes ---------------------------------------------------------------------------------------


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of every box in ``a`` [N, 4] with every box in ``b`` [M, 4] (xyxy): N x M."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1, 4), np.asarray(b, dtype=np.float64).reshape(-1, 4)
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(bottom_right - top_left, 0, None).prod(axis=2)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(axis=1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy non-maximum suppression: the indices of the boxes kept, highest score first; a box
    is dropped when it overlaps a kept one by more than ``iou``."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    keep: list[int] = []
    while order.size:
        best, order = int(order[0]), order[1:]
        keep.append(best)
        if order.size:
            order = order[box_iou(boxes[best:best + 1], boxes[order])[0] <= iou]
    return np.asarray(keep, dtype=np.int64)


def yolo_boxes(raw_output: Any, conf: float = 0.25, iou: float = 0.45, *, num_classes: int | None = None,
               max_det: int = 300) -> list[Boxes]:
    """Per-image ``(boxes xyxy, scores, classes)`` from an Ultralytics-style raw detection output.

    ``raw_output``: [B, 4 + nc, A], for each of A anchors the box centre and size
    (cx, cy, w, h) then one score per class (already through the sigmoid), as YOLOv8/11's head
    returns in eval mode and exports to ONNX (a tuple or list, as the torch module returns,
    gives its first element). Channels after the class scores (masks, keypoints) are ignored
    when ``num_classes`` is given. Each anchor keeps its best class where that score is above
    ``conf``; then class-aware non-maximum suppression (IoU above ``iou`` within a class) keeps
    at most ``max_det`` boxes per image, highest score first.
    """
    if isinstance(raw_output, (tuple, list)) and raw_output:
        raw_output = raw_output[0]
    raw = _array(raw_output, "the raw detection output").astype(np.float64)
    if raw.ndim != 3 or raw.shape[1] < 5:
        raise StructADMMError(
            f"a raw detection output is batch x (4 + classes) x anchors, not {list(raw.shape)}"
        )
    nc = raw.shape[1] - 4 if num_classes is None else int(num_classes)
    if not 1 <= nc <= raw.shape[1] - 4:
        raise StructADMMError(f"{nc} classes do not fit a raw output of {raw.shape[1]} channels (4 box + classes)")
    images = []
    for pred in raw:
        class_scores = pred[4:4 + nc]  # nc x A
        classes, scores = class_scores.argmax(axis=0), class_scores.max(axis=0)
        kept = scores > conf
        cx, cy, w, h = pred[:4, kept]
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        scores, classes = scores[kept], classes[kept]
        chosen = np.concatenate([np.flatnonzero(classes == c)[nms(boxes[classes == c], scores[classes == c], iou)]
                                 for c in np.unique(classes)]) if len(classes) else np.zeros(0, np.int64)
        chosen = chosen[np.argsort(-scores[chosen], kind="stable")][:max_det]
        images.append((boxes[chosen], scores[chosen], classes[chosen].astype(np.int64)))
    return images


def _image_boxes(entry: Any, i: int, who: str) -> Boxes:
    if not isinstance(entry, (tuple, list)) or len(entry) != 3:
        raise StructADMMError(f"image {i} of the {who} boxes must be (boxes xyxy, scores, classes)")
    boxes, scores, classes = (_array(e, "") if isinstance(e, torch.Tensor) else np.asarray(e) for e in entry)
    boxes = boxes.astype(np.float64).reshape(-1, 4) if boxes.size else np.zeros((0, 4))
    scores, classes = scores.astype(np.float64).reshape(-1), classes.astype(np.int64).reshape(-1)
    if not len(boxes) == len(scores) == len(classes):
        raise StructADMMError(
            f"image {i} of the {who} boxes has {len(boxes)} boxes, {len(scores)} scores and {len(classes)} classes; "
            "they must match one to one"
        )
    return boxes, scores, classes


def box_map50(dense_boxes: Sequence[Any], pruned_boxes: Sequence[Any]) -> float:
    """mAP at IoU 0.5 of the pruned model's boxes, the dense model's boxes taken as ground truth.

    Both are per-image lists of ``(boxes xyxy [N, 4], scores [N], classes [N])`` (the dense
    scores are not used), e.g. from :func:`yolo_boxes`. For each class present in the dense
    boxes, the pruned boxes of that class, over all images, are taken highest score first; one
    is a true positive when it overlaps a dense box of its class and image, not yet matched, by
    IoU 0.5 or more (the best such box), else a false positive. The class's AP is the area under
    its precision-recall curve with precision made non-increasing (all points, as PASCAL VOC
    from 2010); mAP is the mean over those classes. Pruned boxes of a class the dense boxes
    lack do not count. With no dense box at all, it is 1.0 when the pruned model finds none
    either, else 0.0.
    """
    if len(dense_boxes) != len(pruned_boxes):
        raise StructADMMError(f"boxes for {len(dense_boxes)} dense images but {len(pruned_boxes)} pruned ones")
    dense = [_image_boxes(e, i, "dense") for i, e in enumerate(dense_boxes)]
    pruned = [_image_boxes(e, i, "pruned") for i, e in enumerate(pruned_boxes)]
    truth_classes = sorted({int(c) for _, _, classes in dense for c in classes})
    if not truth_classes:
        return 1.0 if all(len(s) == 0 for _, s, _ in pruned) else 0.0
    return float(np.mean([_class_ap(dense, pruned, c) for c in truth_classes]))


def _class_ap(dense: list[Boxes], pruned: list[Boxes], cls: int) -> float:
    truths = [boxes[classes == cls] for boxes, _, classes in dense]
    total = sum(len(t) for t in truths)
    found = [(score, image, box) for image, (boxes, scores, classes) in enumerate(pruned)
             for box, score, c in zip(boxes, scores, classes) if c == cls]
    if not found:
        return 0.0
    found.sort(key=lambda f: -f[0])  # stable: equal scores keep their order
    matched = [np.zeros(len(t), dtype=bool) for t in truths]
    hits = np.zeros(len(found))
    for k, (_, image, box) in enumerate(found):
        if not len(truths[image]):
            continue
        overlaps = box_iou(box[None], truths[image])[0]
        overlaps[matched[image]] = -1.0  # a dense box is matched once
        best = int(overlaps.argmax())
        if overlaps[best] >= 0.5:
            matched[image][best] = True
            hits[k] = 1.0
    true_pos = np.cumsum(hits)
    recall = true_pos / total
    precision = true_pos / np.arange(1, len(found) + 1)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]  # the best precision at this recall or more
    steps = np.diff(np.concatenate([[0.0], recall]))
    return float((steps * envelope).sum())

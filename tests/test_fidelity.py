"""Fidelity without labels: output error and cosine, top-1 agreement, and a detector's mAP@0.5
against the dense model's boxes, on cases whose answer is known by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from structadmm.errors import StructADMMError
from structadmm.exporters.fidelity import (
    OutputFidelity,
    box_iou,
    box_map50,
    named_outputs,
    nms,
    output_fidelity,
    top1_agreement,
    yolo_boxes,
)


def fails(match: str):
    return pytest.raises(StructADMMError, match=match)


# --- outputs -------------------------------------------------------------------------------------


def test_output_names_and_order() -> None:
    t = torch.zeros(2, 3)
    assert [n for n, _ in named_outputs(t)] == ["output"]
    nested = {"boxes": t, "aux": (t, [t, np.zeros((2, 1))]), "logits": t}
    assert [n for n, _ in named_outputs(nested)] == ["boxes", "aux.0", "aux.1.0", "aux.1.1", "logits"]
    assert [n for n, _ in named_outputs((t, t))] == ["0", "1"]
    with fails(r"output aux\.0 is str, not a tensor"):
        named_outputs({"aux": ("text",)})


def test_output_fidelity_by_hand() -> None:
    dense = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    # sample 0: pruned is 0.5 x dense -> error 0.5, cosine 1; sample 1: orthogonal, same norm -> error sqrt(2), cosine 0
    pruned = torch.tensor([[1.5, 2.0], [0.0, 1.0]])
    (result,) = output_fidelity(dense, pruned)
    assert result == OutputFidelity("output", pytest.approx((0.5 + math.sqrt(2)) / 2), pytest.approx(0.5))
    same = output_fidelity({"a": dense, "b": (dense * 2,)}, {"a": dense.numpy(), "b": (dense * 2,)})
    assert [(r.name, r.rel_error, r.cosine) for r in same] == [("a", 0.0, 1.0), ("b.0", 0.0, 1.0)]
    flipped = output_fidelity(dense, -dense)[0]
    assert flipped.rel_error == pytest.approx(2.0) and flipped.cosine == pytest.approx(-1.0)


def test_output_fidelity_is_per_sample_over_flattened_values() -> None:
    rng = np.random.default_rng(0)
    dense = rng.standard_normal((4, 3, 5, 5))
    pruned = dense + 0.1 * rng.standard_normal(dense.shape)
    result = output_fidelity(dense, pruned)[0]
    rows_d, rows_p = dense.reshape(4, -1), pruned.reshape(4, -1)
    rel = np.mean([np.linalg.norm(d - p) / np.linalg.norm(d) for d, p in zip(rows_d, rows_p)])
    cos = np.mean([d @ p / np.linalg.norm(d) / np.linalg.norm(p) for d, p in zip(rows_d, rows_p)])
    assert result.rel_error == pytest.approx(rel) and result.cosine == pytest.approx(cos)
    assert 0.05 < result.rel_error < 0.15 and 0.99 < result.cosine < 1.0


def test_output_fidelity_zero_samples_and_mismatches() -> None:
    dense = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    pruned = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    result = output_fidelity(dense, pruned)[0]
    assert result.rel_error == math.inf and result.cosine == pytest.approx((1 + 0 + 1) / 3)
    assert output_fidelity(dense, dense)[0].rel_error == 0.0
    with fails(r"output 1 is \[2, 3\] from the dense model but \[2, 4\] from the pruned one"):
        output_fidelity((np.ones((2, 3)), np.ones((2, 3))), (np.ones((2, 3)), np.ones((2, 4))))
    with fails(r"the dense and pruned outputs differ: 0, 1 against output"):
        output_fidelity((np.ones(2), np.ones(2)), np.ones(2))


def test_top1_agreement() -> None:
    dense = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    pruned = torch.tensor([[0.2, 0.8], [0.1, 0.9], [0.4, 0.6], [0.9, 0.1]])  # sample 1 changes class
    assert top1_agreement(dense, pruned) == 0.75
    assert top1_agreement(dense.numpy(), dense) == 1.0
    segmentation = np.zeros((1, 3, 2, 2))
    segmentation[0, 1] = 1.0  # every position: class 1
    other = segmentation.copy()
    other[0, 2, 0, 0] = 2.0  # one of four positions: class 2
    assert top1_agreement(segmentation, other) == 0.75
    with fails(r"cannot compare logits of shape \[4, 2\] and \[3, 2\]"):
        top1_agreement(dense, pruned[:3])


# --- boxes ---------------------------------------------------------------------------------------


def image(boxes, classes, scores=None):
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.linspace(0.9, 0.5, len(boxes)) if scores is None else np.asarray(scores, dtype=np.float64)
    return boxes, scores, np.asarray(classes, dtype=np.int64)


FOUR = [[0, 0, 10, 10], [20, 20, 30, 30], [40, 0, 60, 20], [0, 40, 30, 70]]


def test_iou_and_nms() -> None:
    iou = box_iou(np.array([[0, 0, 10, 10]]), np.array([[5, 0, 15, 10], [0, 0, 10, 10], [20, 20, 30, 30]]))
    assert np.allclose(iou, [[50 / 150, 1.0, 0.0]])
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [30, 30, 40, 40], [0, 0, 10, 9]], dtype=float)
    kept = nms(boxes, np.array([0.5, 0.9, 0.8, 0.7]), 0.45)
    assert kept.tolist() == [1, 2]  # box 1 (best) suppresses boxes 0 and 3, which overlap it by more


def test_identical_boxes_score_one() -> None:
    dense = [image(FOUR, [0, 1, 0, 2]), image(FOUR[:2], [1, 1])]
    pruned = [image(FOUR, [0, 1, 0, 2], [0.3, 0.9, 0.8, 0.1]), image(FOUR[:2], [1, 1])]
    assert box_map50(dense, pruned) == 1.0


def test_boxes_shifted_below_iou_half_score_zero() -> None:
    dense = [image(FOUR, [0, 0, 0, 0])]
    # shifted right by half their width: IoU = 1/3 < 0.5
    shifted = np.array(FOUR, dtype=float)
    shifted[:, [0, 2]] += (shifted[:, 2:3] - shifted[:, 0:1]) / 2
    assert np.allclose(np.diag(box_iou(shifted, np.array(FOUR))), 1 / 3)
    assert box_map50(dense, [image(shifted, [0, 0, 0, 0])]) == 0.0
    # shifted by a tenth of their width: IoU = 0.9 / 1.1 > 0.5, all found
    near = np.array(FOUR, dtype=float)
    near[:, [0, 2]] += (near[:, 2:3] - near[:, 0:1]) / 10
    assert box_map50(dense, [image(near, [0, 0, 0, 0])]) == 1.0


def test_half_the_boxes_missing_and_false_positives() -> None:
    dense = [image(FOUR, [0, 0, 0, 0])]
    assert box_map50(dense, [image(FOUR[:2], [0, 0])]) == pytest.approx(0.5)  # precision 1 up to recall 1/2
    # ranked TP 0.9, FP 0.8, TP 0.7, FP 0.6 against 2 dense boxes: precision 1 to recall 1/2, 2/3 to recall 1
    two = [image(FOUR[:2], [0, 0])]
    ranked = [image([FOUR[0], [100, 100, 110, 110], FOUR[1], [200, 200, 210, 210]], [0, 0, 0, 0],
                    [0.9, 0.8, 0.7, 0.6])]
    assert box_map50(two, ranked) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # the same boxes with the false positives ranked last lose nothing
    last = [image(ranked[0][0], [0, 0, 0, 0], [0.9, 0.2, 0.7, 0.1])]
    assert box_map50(two, last) == pytest.approx(1.0)
    # a duplicate of a matched box is a false positive: each dense box is matched once
    duplicate = [image([FOUR[0], FOUR[0], FOUR[1]], [0, 0, 0], [0.9, 0.8, 0.7])]
    assert box_map50(two, duplicate) == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_classes_must_match() -> None:
    dense = [image(FOUR, [0, 0, 1, 1])]
    assert box_map50(dense, [image(FOUR, [1, 1, 0, 0])]) == 0.0  # every box found, every class wrong
    assert box_map50(dense, [image(FOUR, [0, 0, 0, 0])]) == pytest.approx(0.5)  # class 0 whole, class 1 none
    # a class only the pruned model finds is not scored: its boxes cost nothing
    assert box_map50(dense, [image([*FOUR, [90, 90, 99, 99]], [0, 0, 1, 1, 7])]) == 1.0


def test_boxes_are_matched_within_their_image_and_empty_cases() -> None:
    dense = [image(FOUR[:1], [0]), image(np.zeros((0, 4)), [])]
    swapped = [image(np.zeros((0, 4)), []), image(FOUR[:1], [0])]
    assert box_map50(dense, swapped) == 0.0
    nothing = [image(np.zeros((0, 4)), [])]
    assert box_map50(nothing, nothing) == 1.0 and box_map50(nothing, [image(FOUR[:1], [0])]) == 0.0
    with fails(r"boxes for 2 dense images but 1 pruned ones"):
        box_map50(dense, nothing)
    with fails(r"image 0 of the pruned boxes has 1 boxes, 2 scores and 1 classes"):
        box_map50(dense[:1], [(np.zeros((1, 4)), np.zeros(2), np.zeros(1))])


# --- a raw YOLO head -----------------------------------------------------------------------------


def raw_head(nc: int = 3, anchors: int = 64, seed: int = 0) -> np.ndarray:
    """[2, 4 + nc, anchors]: boxes on a 64x64 image, clustered so that many overlap, and sigmoid scores."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(8, 56, (2, 2, anchors // 8)).repeat(8, axis=2) + rng.normal(0, 2, (2, 2, anchors))
    sizes = rng.uniform(6, 20, (2, 2, anchors))
    scores = 1 / (1 + np.exp(-rng.normal(-1, 2, (2, nc, anchors))))
    return np.concatenate([centres, sizes, scores], axis=1).astype(np.float32)


def test_yolo_boxes_decodes_by_hand() -> None:
    # three anchors: two overlapping boxes of class 1 (the weaker suppressed), one of class 0 on the same spot
    raw = np.zeros((1, 6, 4), dtype=np.float32)
    raw[0, :4, 0] = [10, 10, 8, 8]
    raw[0, :4, 1] = [11, 10, 8, 8]
    raw[0, :4, 2] = [10, 10, 8, 8]
    raw[0, :4, 3] = [50, 50, 4, 4]
    raw[0, 4:, 0] = [0.1, 0.9]
    raw[0, 4:, 1] = [0.2, 0.8]
    raw[0, 4:, 2] = [0.7, 0.3]
    raw[0, 4:, 3] = [0.2, 0.1]  # below conf
    ((boxes, scores, classes),) = yolo_boxes(torch.from_numpy(raw))
    assert classes.tolist() == [1, 0] and np.allclose(scores, [0.9, 0.7])
    assert np.allclose(boxes, [[6, 6, 14, 14], [6, 6, 14, 14]])  # cx, cy, w, h -> x1, y1, x2, y2
    assert len(yolo_boxes((raw,), conf=0.05)[0][0]) == 3  # a tuple gives its first element; anchor 3 now kept
    with fails(r"a raw detection output is batch x \(4 \+ classes\) x anchors, not \[1, 4, 3\]"):
        yolo_boxes(np.zeros((1, 4, 3)))


def test_yolo_boxes_match_ultralytics_nms() -> None:
    """The same boxes as Ultralytics' own post-processing (torchvision's NMS) on a random head."""
    pytest.importorskip("torchvision")
    try:
        from ultralytics.utils.nms import non_max_suppression
    except ImportError:
        non_max_suppression = pytest.importorskip("ultralytics.utils.ops").non_max_suppression
    raw = raw_head()
    ours = yolo_boxes(raw, conf=0.25, iou=0.45)
    theirs = non_max_suppression(torch.from_numpy(raw), conf_thres=0.25, iou_thres=0.45)
    assert sum(len(s) for _, s, _ in ours) > 10
    for (boxes, scores, classes), expected in zip(ours, theirs):
        expected = expected.numpy()
        order = np.argsort(-expected[:, 4], kind="stable")
        assert np.allclose(boxes, expected[order, :4], atol=1e-4)
        assert np.allclose(scores, expected[order, 4], atol=1e-6)
        assert classes.tolist() == expected[order, 5].astype(int).tolist()


def test_map_of_decoded_heads() -> None:
    raw = raw_head(seed=1)
    dense = yolo_boxes(raw)
    assert box_map50(dense, yolo_boxes(raw.copy())) == 1.0
    noisy = raw.copy()
    noisy[:, :4] += np.random.default_rng(2).normal(0, 0.5, noisy[:, :4].shape).astype(np.float32)
    close = box_map50(dense, yolo_boxes(noisy))
    assert 0.8 < close <= 1.0  # half a pixel of jitter moves few boxes below IoU 0.5
    far = raw.copy()
    far[:, :2] += 30  # every box moved well away
    assert box_map50(dense, yolo_boxes(far)) == 0.0


# --- through the pipeline ------------------------------------------------------------------------


class TinyDetector(torch.nn.Module):
    """A YOLO-shaped head on a small conv body: [B, 4 + 3 classes, 64 anchors] (an 8 x 8 grid), box
    centres on the grid, class scores through a sigmoid whose bias sets how many anchors pass conf."""

    def __init__(self, class_bias: float) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU())
        self.box = torch.nn.Conv2d(32, 4, 1)
        self.cls = torch.nn.Conv2d(32, 3, 1)
        torch.nn.init.constant_(self.cls.bias, class_bias)
        ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
        self.register_buffer("grid", torch.stack([xs, ys]).reshape(1, 2, 64) * 8 + 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        box = self.box(h).flatten(2)
        centre = self.grid + 4 * torch.tanh(box[:, :2])
        size = 8 + 8 * torch.sigmoid(box[:, 2:])
        return torch.cat([centre, size, torch.sigmoid(3 * self.cls(h).flatten(2))], dim=1)


@pytest.mark.parametrize("class_bias, finds_boxes", [(0.0, True), (-20.0, False)])
def test_a_detector_run_reports_its_boxes_against_the_dense_ones(class_bias: float, finds_boxes: bool,
                                                                 tmp_path) -> None:
    from torch.utils.data import TensorDataset

    from structadmm.pipeline import CompressConfig, compress

    torch.manual_seed(0)
    x = torch.rand(48, 3, 8, 8)
    config = CompressConfig(ratio=0.5, boxes="yolo", dense_epochs=0, admm_rounds=1, admm_epochs=1,
                            retrain_epochs=1, bench_batches=[1], bench_min_runs=2, bench_min_seconds=0.0,
                            bench_isolate=False, channel_multiple=1)
    result = compress(TinyDetector(class_bias), TensorDataset(x[:32]), TensorDataset(x[32:]), config,
                      out_dir=tmp_path / "run")
    fidelity = result.report["fidelity"]
    md = (result.run_dir / "report.md").read_text()
    if finds_boxes:
        assert fidelity["dense_boxes"] > 0 and fidelity["pruned_boxes"] >= 0
        assert 0.0 <= fidelity["box_map50"] <= 1.0
        assert f"dense {fidelity['dense_boxes']} boxes" in md
    else:  # nothing to find: no mAP, rather than a vacuous 1.0
        assert fidelity["dense_boxes"] == 0 and fidelity["box_map50"] is None
        assert "n/a, the dense model finds no box" in md

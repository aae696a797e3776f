"""Metrics on tiny hand-made label maps whose expected values are computed by hand in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wsi_mtl import metrics


def _rect(shape, *boxes):
    """Label map with object k+1 filling boxes[k] = (y0, y1, x0, x1)."""
    out = np.zeros(shape, np.int32)
    for k, (y0, y1, x0, x1) in enumerate(boxes, start=1):
        out[y0:y1, x0:x1] = k
    return out


# ---- AJI / PQ / Dice ---------------------------------------------------------------------------
def test_perfect_match_scores_one():
    t = _rect((8, 8), (0, 2, 0, 2), (4, 7, 3, 8))
    p = t.copy()
    p[p == 1] = 5  # ids need not agree
    assert metrics.aji(t, p) == 1.0
    pq = metrics.panoptic_quality(t, p)
    assert (pq.pq, pq.dq, pq.sq, pq.tp, pq.fp, pq.fn) == (1.0, 1.0, 1.0, 2, 0, 0)
    assert metrics.dice_score(t, p) == 1.0


def test_one_split_object():
    # Truth: one 2x4 object (8 px). Prediction: its left half (4 px, id 1) and right half (4 px, id 2).
    # AJI: both halves have IoU 4/8; the first is paired: C = 4, U = 8; the unpaired half adds
    # its 4 px to U -> AJI = 4 / 12 = 1/3.
    # PQ: no IoU exceeds 0.5 -> TP 0, FP 2, FN 1 -> DQ = PQ = 0 (SQ = 0).
    t = _rect((2, 4), (0, 2, 0, 4))
    p = _rect((2, 4), (0, 2, 0, 2), (0, 2, 2, 4))
    assert metrics.aji(t, p) == pytest.approx(1 / 3)
    pq = metrics.panoptic_quality(t, p)
    assert (pq.tp, pq.fp, pq.fn) == (0, 2, 1)
    assert pq.pq == 0.0 and pq.dq == 0.0
    assert metrics.dice_score(t, p) == 1.0  # foreground identical


def test_one_missed_object():
    # Truth: A (2x2 = 4 px) and B (4 px). Prediction: A only, exactly.
    # AJI: A gives C = 4, U = 4; B overlaps nothing and adds 4 to U -> 4 / 8 = 0.5.
    # PQ: TP 1, FN 1 -> DQ = 1 / (1 + 0.5) = 2/3, SQ = 1, PQ = 2/3.
    # Dice: 2 * 4 / (8 + 4) = 2/3.
    t = _rect((6, 6), (0, 2, 0, 2), (4, 6, 4, 6))
    p = _rect((6, 6), (0, 2, 0, 2))
    assert metrics.aji(t, p) == pytest.approx(0.5)
    pq = metrics.panoptic_quality(t, p)
    assert (pq.tp, pq.fp, pq.fn) == (1, 0, 1)
    assert pq.dq == pytest.approx(2 / 3) and pq.sq == 1.0 and pq.pq == pytest.approx(2 / 3)
    assert metrics.dice_score(t, p) == pytest.approx(2 / 3)


def test_partial_overlap_and_false_positive():
    # Truth: one 2x3 object (6 px). Prediction: a 2x2 object inside it (4 px) and a 1 px speck.
    # IoU = 4/6. AJI: C = 4, U = 6, the speck adds 1 -> 4/7.
    # PQ: TP 1 (IoU 2/3 > 0.5), FP 1 -> DQ = 1 / 1.5 = 2/3, SQ = 2/3, PQ = 4/9.
    t = _rect((4, 6), (0, 2, 0, 3))
    p = _rect((4, 6), (0, 2, 0, 2), (3, 4, 5, 6))
    assert metrics.aji(t, p) == pytest.approx(4 / 7)
    pq = metrics.panoptic_quality(t, p)
    assert pq.sq == pytest.approx(2 / 3) and pq.dq == pytest.approx(2 / 3) and pq.pq == pytest.approx(4 / 9)


def test_empty_maps():
    z = np.zeros((3, 3), int)
    one = _rect((3, 3), (0, 1, 0, 1))
    assert metrics.aji(z, z) == 1.0 and metrics.panoptic_quality(z, z).pq == 1.0
    assert metrics.aji(one, z) == 0.0 and metrics.aji(z, one) == 0.0
    assert metrics.panoptic_quality(one, z).fn == 1


def test_instance_metric_input_errors():
    with pytest.raises(ValueError, match="shape"):
        metrics.aji(np.zeros((2, 2), int), np.zeros((3, 3), int))
    with pytest.raises(TypeError, match="integer"):
        metrics.aji(np.zeros((2, 2), float), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="non-negative"):
        metrics.aji(-np.ones((2, 2), int), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="iou_threshold"):
        metrics.panoptic_quality(np.zeros((2, 2), int), np.zeros((2, 2), int), iou_threshold=0.3)


# ---- GlaS object metrics -------------------------------------------------------------------------
def test_instance_errors_hand_case():
    # Truth on a 6 x 12 map: A (rows 0-1, cols 0-1), B (rows 0-1, cols 2-3) touching A, C (rows 4-5,
    # cols 0-3), D (rows 4-5, cols 10-11).
    # Prediction: one object over A and B (a merge of 2), C cut into halves (a split), nothing on D
    # (missed), and E on empty ground at rows 0-1, cols 8-9 (spurious).
    t = _rect((6, 12), (0, 2, 0, 2), (0, 2, 2, 4), (4, 6, 0, 4), (4, 6, 10, 12))
    p = _rect((6, 12), (0, 2, 0, 4), (4, 6, 0, 2), (4, 6, 2, 4), (0, 2, 8, 10))
    e = metrics.instance_errors(t, p)
    assert e.as_dict() == {"n_true": 4, "n_pred": 4, "merges": 1, "merged_true": 2, "splits": 1, "missed": 1, "spurious": 1}
    # A prediction that covers a true object only by a third is neither a merge nor spurious for it;
    # the true object, two thirds uncovered, is missed.
    t2 = _rect((1, 6), (0, 1, 0, 6))
    p2 = _rect((1, 6), (0, 1, 0, 2))
    e2 = metrics.instance_errors(t2, p2)
    assert (e2.merges, e2.splits, e2.missed, e2.spurious) == (0, 0, 1, 0)


def test_instance_errors_empty_maps():
    t = _rect((4, 4), (0, 2, 0, 2))
    empty = np.zeros((4, 4), np.int32)
    assert metrics.instance_errors(t, empty).as_dict() == {"n_true": 1, "n_pred": 0, "merges": 0, "merged_true": 0, "splits": 0, "missed": 1, "spurious": 0}
    assert metrics.instance_errors(empty, t).spurious == 1
    assert metrics.instance_errors(t, t).as_dict() == {"n_true": 1, "n_pred": 1, "merges": 0, "merged_true": 0, "splits": 0, "missed": 0, "spurious": 0}


def test_object_f1_counts():
    # G1 = 2x5 (10 px), G2 = 2x5 (10 px).
    # S1 covers 6 px of G1 (> 50%) -> TP. S2 covers exactly 5 px of G2 (50%, not more) -> FP and G2
    # is missed (FN). S3 lies on background -> FP. TP 1, FP 2, FN 1 -> F1 = 2 / (2 + 2 + 1) = 0.4.
    t = _rect((8, 10), (0, 2, 0, 5), (4, 6, 0, 5))
    p = np.zeros_like(t)
    p[0:2, 0:3] = 1  # 6 px of G1
    p[4:6, 0:2] = 2  # 4 px of G2 ...
    p[4, 2] = 2  # ... + 1 = 5 px
    p[7, 7:9] = 3
    f1, tp, fp, fn = metrics.object_f1(t, p)
    assert (tp, fp, fn) == (1, 2, 1)
    assert f1 == pytest.approx(0.4)


def test_object_dice_hand_case():
    # G = 4 px; S = those 4 px + 4 more (8 px). Dice(G, S) = 2*4 / 12 = 2/3 from both sides -> 2/3.
    t = _rect((4, 4), (0, 1, 0, 4))
    p = _rect((4, 4), (0, 2, 0, 4))
    assert metrics.object_dice(t, p) == pytest.approx(2 / 3)
    assert metrics.object_dice(t, t) == 1.0
    assert metrics.object_dice(t, np.zeros_like(t)) == 0.0


def test_hausdorff_hand_case():
    # G = columns 0-1 of a 1x6 row, S = columns 0-4: the farthest pixel of S (col 4) is 3 px from G.
    t = np.zeros((1, 6), int)
    t[0, :2] = 1
    p = np.zeros((1, 6), int)
    p[0, :5] = 1
    assert metrics.hausdorff_distance(t > 0, p > 0) == 3.0
    assert metrics.object_hausdorff(t, p) == 3.0
    assert metrics.object_hausdorff(t, t) == 0.0
    assert math.isinf(metrics.object_hausdorff(t, np.zeros_like(t)))


def test_hausdorff_of_unmatched_object_uses_nearest():
    # Truth: one pixel at (0, 0). Prediction: one pixel at (0, 4), no overlap: partner = nearest
    # object; H = 4 from both sides -> 4.
    t = np.zeros((1, 5), int)
    t[0, 0] = 1
    p = np.zeros((1, 5), int)
    p[0, 4] = 7
    assert metrics.object_hausdorff(t, p) == 4.0
    s = metrics.gland_scores(t, p)
    assert (s.tp, s.fp, s.fn, s.f1) == (0, 1, 1, 0.0)


def test_hausdorff_errors():
    with pytest.raises(ValueError, match="non-empty"):
        metrics.hausdorff_distance(np.zeros((2, 2), bool), np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="shape"):
        metrics.hausdorff_distance(np.ones((2, 2), bool), np.ones((3, 2), bool))


# ---- classification -----------------------------------------------------------------------------
def test_accuracy_and_macro_f1():
    t = np.array([0, 0, 1, 1, 2])
    p = np.array([0, 1, 1, 1, 0])
    # class 0: TP 1, FP 1, FN 1 -> 0.5; class 1: TP 2, FP 1 -> 0.8; class 2: TP 0, FN 1 -> 0.
    assert metrics.accuracy(t, p) == pytest.approx(3 / 5)
    np.testing.assert_allclose(metrics.f1_per_class(t, p), [0.5, 0.8, 0.0])
    assert metrics.macro_f1(t, p) == pytest.approx((0.5 + 0.8) / 3)
    cm = metrics.confusion_matrix(t, p, num_classes=4)
    assert cm.shape == (4, 4) and cm[2, 0] == 1 and cm.sum() == 5
    assert np.isnan(metrics.f1_per_class(t, p, num_classes=4)[3])


def test_classification_errors():
    with pytest.raises(ValueError, match="length"):
        metrics.accuracy(np.array([0, 1]), np.array([0]))
    with pytest.raises(TypeError, match="integers"):
        metrics.accuracy(np.array([0.0]), np.array([0]))
    with pytest.raises(ValueError, match="num_classes"):
        metrics.confusion_matrix(np.array([3]), np.array([0]), num_classes=2)
    with pytest.raises(ValueError, match="non-negative"):
        metrics.confusion_matrix(np.array([-1]), np.array([0]))


# ---- point matching -----------------------------------------------------------------------------
def test_match_points_one_to_one_within_radius():
    t = np.array([[0.0, 0.0], [0.0, 5.0], [20.0, 20.0]])
    p = np.array([[0.0, 2.0], [0.0, 4.0], [40.0, 40.0]])
    pairs = metrics.match_points(t, p, radius_px=3)
    # Optimal assignment: t0-p0 (2 px) and t1-p1 (1 px); t2 and p2 are too far.
    assert sorted(map(tuple, pairs.tolist())) == [(0, 0), (1, 1)]
    with pytest.raises(ValueError, match="radius_px"):
        metrics.match_points(t, p, radius_px=0)


def test_point_type_scores_hand_case():
    names = {1: "a", 2: "b"}
    true_yx = np.array([[0, 0], [0, 20], [0, 40], [0, 60]], float)
    true_cls = np.array([1, 1, 2, -1])  # the last point has no class
    pred_yx = np.array([[1, 0], [0, 21], [0, 41], [0, 60], [30, 30]], float)
    pred_cls = np.array([1, 2, 2, 2, 1])
    s = metrics.point_type_scores(true_yx, true_cls, pred_yx, pred_cls, class_names=names, radius_px=6)
    # Detection: 4 matches of 4 true / 5 predicted -> F1 = 8 / 9.
    assert s.detection_f1 == pytest.approx(8 / 9) and s.n_matched == 4
    # Class a: TP 1 (p0); FP 1 (p4 unmatched); FN 1 (t1 predicted as b) -> 2 / (2 + 2) = 0.5.
    # Class b: TP 1 (p2); FP 1 (p1 on a labelled "a"); p3 sits on the unlabelled point: not counted.
    #          FN 0 -> 2 / 3.
    assert s.class_counts["a"] == {"tp": 1, "fp": 1, "fn": 1}
    assert s.class_counts["b"] == {"tp": 1, "fp": 1, "fn": 0}
    assert s.class_f1["a"] == pytest.approx(0.5) and s.class_f1["b"] == pytest.approx(2 / 3)
    assert s.macro_f1 == pytest.approx((0.5 + 2 / 3) / 2)

"""Point matching for nucleus detection and classification (CRCHistoPhenotypes protocol)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

__all__ = ["match_points", "PointTypeScores", "point_type_scores"]


def match_points(true_yx: np.ndarray, pred_yx: np.ndarray, *, radius_px: float) -> np.ndarray:
    """One-to-one matching of points within ``radius_px`` minimising the total distance.

    Parameters
    ----------
    true_yx, pred_yx : (M, 2), (N, 2) float ndarray
        Point coordinates (row, column) in the same pixel grid.
    radius_px
        Largest distance of a match, in pixels.

    Returns
    -------
    (K, 2) int ndarray
        Index pairs ``(i_true, j_pred)``.

    Examples
    --------
    >>> match_points(np.array([[0.0, 0.0], [10, 10]]), np.array([[1.0, 0.0]]), radius_px=3).tolist()
    [[0, 0]]
    """
    true_yx = np.asarray(true_yx, float).reshape(-1, 2)
    pred_yx = np.asarray(pred_yx, float).reshape(-1, 2)
    if radius_px <= 0:
        raise ValueError(f"radius_px must be positive, got {radius_px}")
    if len(true_yx) == 0 or len(pred_yx) == 0:
        return np.zeros((0, 2), dtype=int)
    d = cdist(true_yx, pred_yx)
    big = 1e9
    cost = np.where(d <= radius_px, d, big)
    rows, cols = linear_sum_assignment(cost)
    ok = cost[rows, cols] < big
    return np.stack([rows[ok], cols[ok]], axis=1).astype(int)


@dataclass(frozen=True)
class PointTypeScores:
    """Detection and per-class scores from point matching."""

    detection_f1: float
    detection_precision: float
    detection_recall: float
    class_f1: dict[str, float] = field(default_factory=dict)
    class_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    n_matched: int = 0

    @property
    def macro_f1(self) -> float:
        """Mean of the per-class F1 values that are defined."""
        vals = [v for v in self.class_f1.values() if np.isfinite(v)]
        return float(np.mean(vals)) if vals else float("nan")


def point_type_scores(
    true_yx: np.ndarray,
    true_class: np.ndarray,
    pred_yx: np.ndarray,
    pred_class: np.ndarray,
    *,
    class_names: dict[int, str],
    radius_px: float,
) -> PointTypeScores:
    """Detection F1 and per-class F1 of typed nuclei against labelled centre points.

    Predictions are matched one-to-one to *all* true points (``true_class`` < 0 marks a point with
    no class). For class c: a prediction of class c matched to a true point of class c is a TP; a
    prediction of class c that is unmatched, or matched to a labelled point of another class, is a
    FP; a labelled true point of class c that is unmatched or matched to a prediction of another
    class is a FN. Predictions matched to unlabelled points count for detection only.
    Sums over images are possible through ``class_counts``.
    """
    true_class = np.asarray(true_class, int).ravel()
    pred_class = np.asarray(pred_class, int).ravel()
    pairs = match_points(true_yx, pred_yx, radius_px=radius_px)
    n_true, n_pred = len(true_class), len(pred_class)
    tp_d = len(pairs)
    precision = tp_d / n_pred if n_pred else (1.0 if n_true == 0 else 0.0)
    recall = tp_d / n_true if n_true else 1.0
    det_f1 = 2 * tp_d / (n_true + n_pred) if n_true + n_pred else 1.0
    matched_true = np.full(n_pred, -2)  # class of the matched true point, -2 = unmatched
    matched_true[pairs[:, 1]] = true_class[pairs[:, 0]]
    matched_pred = np.full(n_true, -2)
    matched_pred[pairs[:, 0]] = pred_class[pairs[:, 1]]
    counts: dict[str, dict[str, int]] = {}
    f1: dict[str, float] = {}
    for c, name in class_names.items():
        tp = int(np.sum((pred_class == c) & (matched_true == c)))
        fp = int(np.sum((pred_class == c) & ((matched_true == -2) | ((matched_true >= 0) & (matched_true != c)))))
        fn = int(np.sum((true_class == c) & (matched_pred != c)))
        counts[name] = {"tp": tp, "fp": fp, "fn": fn}
        f1[name] = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else float("nan")
    return PointTypeScores(det_f1, precision, recall, f1, counts, tp_d)

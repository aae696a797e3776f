"""GlaS challenge object metrics (Sirinukunwattana et al. 2017): object F1, Dice and Hausdorff."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ._instance import pair_overlaps

__all__ = ["GlandScores", "gland_scores", "object_f1", "object_dice", "object_hausdorff", "hausdorff_distance"]


@dataclass(frozen=True)
class GlandScores:
    """GlaS object scores of one image: detection F1 (with counts), object Dice, object Hausdorff (px)."""

    f1: float
    precision: float
    recall: float
    tp: int
    fp: int
    fn: int
    object_dice: float
    object_hausdorff: float


def object_f1(true: np.ndarray, pred: np.ndarray) -> tuple[float, int, int, int]:
    """Detection F1 of the GlaS protocol.

    A predicted object is a true positive when it covers more than 50% of the ground-truth object it
    overlaps most; each ground-truth object can be hit once (two disjoint predictions cannot both
    cover more than half of it). Returns ``(f1, tp, fp, fn)``; F1 is 1.0 when both maps are empty.

    Examples
    --------
    >>> t = np.zeros((4, 4), int); t[:, :2] = 1
    >>> object_f1(t, t)
    (1.0, 1, 0, 0)
    """
    true_ids, pred_ids, true_area, _, inter = pair_overlaps(true, pred)
    if true_ids.size == 0 and pred_ids.size == 0:
        return 1.0, 0, 0, 0
    tp = 0
    if true_ids.size and pred_ids.size:
        best = np.argmax(inter, axis=0)  # best true object of each prediction
        cols = np.arange(pred_ids.size)
        hit = inter[best, cols] * 2 > true_area[best]
        tp = int(np.unique(best[hit]).size)
    fp = int(pred_ids.size - tp)
    fn = int(true_ids.size - tp)
    return 2 * tp / (2 * tp + fp + fn), tp, fp, fn


def object_dice(true: np.ndarray, pred: np.ndarray) -> float:
    """GlaS object Dice: area-weighted Dice of each object with its best-overlapping partner, both ways.

    D = 1/2 [sum_i w_i Dice(G_i, S*(G_i)) + sum_j v_j Dice(G*(S_j), S_j)], w_i = |G_i| / sum |G|,
    v_j = |S_j| / sum |S|; an object that overlaps nothing scores 0. 1.0 when both maps are empty,
    0.0 when exactly one is.
    """
    true_ids, pred_ids, true_area, pred_area, inter = pair_overlaps(true, pred)
    if true_ids.size == 0 and pred_ids.size == 0:
        return 1.0
    if true_ids.size == 0 or pred_ids.size == 0:
        return 0.0
    dice = 2.0 * inter / (true_area[:, None] + pred_area[None, :])
    # Partner = object of largest intersection; ties and no-overlap give dice 0 for no overlap anyway.
    d_true = dice[np.arange(true_ids.size), np.argmax(inter, axis=1)]
    d_pred = dice[np.argmax(inter, axis=0), np.arange(pred_ids.size)]
    return 0.5 * (float((true_area * d_true).sum() / true_area.sum()) + float((pred_area * d_pred).sum() / pred_area.sum()))


def hausdorff_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric Hausdorff distance (px) between the pixel sets of two non-empty binary masks.

    Examples
    --------
    >>> a = np.zeros((1, 6), bool); a[0, :2] = True
    >>> b = np.zeros((1, 6), bool); b[0, :5] = True
    >>> hausdorff_distance(a, b)
    3.0
    """
    a = np.asarray(a, bool)
    b = np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")
    if not a.any() or not b.any():
        raise ValueError("hausdorff_distance needs two non-empty masks")
    d_to_b = ndimage.distance_transform_edt(~b)
    d_to_a = ndimage.distance_transform_edt(~a)
    return float(max(d_to_b[a].max(), d_to_a[b].max()))


def object_hausdorff(true: np.ndarray, pred: np.ndarray) -> float:
    """GlaS object Hausdorff distance (px), weighted like :func:`object_dice`.

    An object's partner is the object of the other map it overlaps most, or, when it overlaps none,
    the object nearest in Hausdorff distance. 0.0 when both maps are empty; ``inf`` when exactly
    one is.
    """
    true_ids, pred_ids, true_area, pred_area, inter = pair_overlaps(true, pred)
    if true_ids.size == 0 and pred_ids.size == 0:
        return 0.0
    if true_ids.size == 0 or pred_ids.size == 0:
        return float("inf")
    true = np.asarray(true)
    pred = np.asarray(pred)
    t_masks = _object_masks(true, true_ids)
    p_masks = _object_masks(pred, pred_ids)
    cache: dict[tuple[int, int], float] = {}

    def h(i: int, j: int) -> float:
        if (i, j) not in cache:
            cache[(i, j)] = _hausdorff_in_box(t_masks[i], p_masks[j], true.shape)
        return cache[(i, j)]

    def partner_dist(i: int, overlaps: np.ndarray, n_other: int, forward: bool) -> float:
        if overlaps.max() > 0:
            j = int(np.argmax(overlaps))
            return h(i, j) if forward else h(j, i)
        return min((h(i, j) if forward else h(j, i)) for j in range(n_other))

    h_true = np.array([partner_dist(i, inter[i], pred_ids.size, True) for i in range(true_ids.size)])
    h_pred = np.array([partner_dist(j, inter[:, j], true_ids.size, False) for j in range(pred_ids.size)])
    return 0.5 * (float((true_area * h_true).sum() / true_area.sum()) + float((pred_area * h_pred).sum() / pred_area.sum()))


def _object_masks(labels: np.ndarray, ids: np.ndarray) -> list[tuple[tuple[slice, slice], np.ndarray]]:
    slices = ndimage.find_objects(labels.astype(np.int64))
    out = []
    for i in ids:
        sl = slices[int(i) - 1]
        out.append((sl, labels[sl] == i))
    return out


def _hausdorff_in_box(a: tuple[tuple[slice, slice], np.ndarray], b: tuple[tuple[slice, slice], np.ndarray], shape: tuple[int, ...]) -> float:
    (sa, ma), (sb, mb) = a, b
    y0 = min(sa[0].start, sb[0].start)
    x0 = min(sa[1].start, sb[1].start)
    y1 = max(sa[0].stop, sb[0].stop)
    x1 = max(sa[1].stop, sb[1].stop)
    box_a = np.zeros((y1 - y0 + 2, x1 - x0 + 2), bool)  # one empty pixel of margin
    box_b = np.zeros_like(box_a)
    box_a[sa[0].start - y0 + 1 : sa[0].stop - y0 + 1, sa[1].start - x0 + 1 : sa[1].stop - x0 + 1] = ma
    box_b[sb[0].start - y0 + 1 : sb[0].stop - y0 + 1, sb[1].start - x0 + 1 : sb[1].stop - x0 + 1] = mb
    return hausdorff_distance(box_a, box_b)


def gland_scores(true: np.ndarray, pred: np.ndarray) -> GlandScores:
    """All GlaS object scores of one image (see :func:`object_f1`, :func:`object_dice`, :func:`object_hausdorff`)."""
    f1, tp, fp, fn = object_f1(true, pred)
    precision = tp / (tp + fp) if tp + fp else (1.0 if fn == 0 else 0.0)
    recall = tp / (tp + fn) if tp + fn else 1.0
    return GlandScores(f1, precision, recall, tp, fp, fn, object_dice(true, pred), object_hausdorff(true, pred))

"""Instance segmentation metrics on label maps: Dice, AJI, PQ (with DQ and SQ), and error types."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["dice_score", "aji", "panoptic_quality", "PanopticQuality", "pair_overlaps", "InstanceErrors", "instance_errors"]


def _validate_pair(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    true = np.asarray(true)
    pred = np.asarray(pred)
    if true.shape != pred.shape:
        raise ValueError(f"label maps differ in shape: true {true.shape} vs pred {pred.shape}")
    if true.dtype.kind not in "biu" or pred.dtype.kind not in "biu":
        raise TypeError(f"label maps must be integer or bool arrays, got {true.dtype} and {pred.dtype}")
    if (true.dtype.kind == "i" and true.size and true.min() < 0) or (pred.dtype.kind == "i" and pred.size and pred.min() < 0):
        raise ValueError("label maps must be non-negative (0 = background)")
    return true.astype(np.int64, copy=False), pred.astype(np.int64, copy=False)


def pair_overlaps(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Areas and pairwise intersections of the objects of two label maps.

    Parameters
    ----------
    true, pred : (H, W) int ndarray
        Label maps, 0 = background.

    Returns
    -------
    true_ids, pred_ids : (M,), (N,) int64 ndarray
        Object ids present (background excluded), sorted.
    true_area, pred_area : (M,), (N,) int64 ndarray
        Pixel counts of those objects.
    inter : (M, N) int64 ndarray
        ``inter[i, j]`` = pixels shared by ``true_ids[i]`` and ``pred_ids[j]``.
    """
    true, pred = _validate_pair(true, pred)
    t_ids, t_idx = _compact(true.ravel())
    p_ids, p_idx = _compact(pred.ravel())
    # One histogram of (true, pred) index pairs: O(pixels), no sort (background is index 0).
    joint = np.bincount(t_idx * p_ids.size + p_idx, minlength=t_ids.size * p_ids.size).reshape(t_ids.size, p_ids.size)
    true_area = joint.sum(axis=1)
    pred_area = joint.sum(axis=0)
    return t_ids[1:], p_ids[1:], true_area[1:], pred_area[1:], joint[1:, 1:]


def _compact(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids present (0 always first) and each pixel's index into them."""
    top = int(labels.max(initial=0))
    if top <= 4 * labels.size + 1024:
        counts = np.bincount(labels, minlength=1)
        ids = np.flatnonzero(counts)
        if ids[0] != 0:
            ids = np.concatenate([[0], ids])
        lut = np.zeros(top + 1, np.int64)
        lut[ids] = np.arange(ids.size)
        return ids.astype(np.int64), lut[labels]
    ids, inv = np.unique(np.concatenate([[0], labels]), return_inverse=True)
    return ids.astype(np.int64), inv[1:].astype(np.int64)


def dice_score(true: np.ndarray, pred: np.ndarray) -> float:
    """Binary (foreground) Dice of two label maps: 2|A and B| / (|A| + |B|); 1.0 when both are empty."""
    true, pred = _validate_pair(true, pred)
    a = true > 0
    b = pred > 0
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else 2.0 * float(np.logical_and(a, b).sum()) / denom


def aji(true: np.ndarray, pred: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017).

    Each true object is paired with the predicted object of highest IoU (a predicted object may be
    paired more than once, as in the original definition); C sums their intersections, U their
    unions, and every predicted object never paired adds its area to U. AJI = C / U; 1.0 when both
    maps are empty, 0.0 when exactly one is.

    Examples
    --------
    >>> a = np.zeros((4, 4), int); a[:2, :2] = 1
    >>> aji(a, a)
    1.0
    """
    true_ids, pred_ids, true_area, pred_area, inter = pair_overlaps(true, pred)
    if true_ids.size == 0 and pred_ids.size == 0:
        return 1.0
    if true_ids.size == 0 or pred_ids.size == 0:
        return 0.0
    union = true_area[:, None] + pred_area[None, :] - inter
    iou = inter / union
    best = np.argmax(iou, axis=1)
    rows = np.arange(true_ids.size)
    has = inter[rows, best] > 0
    c = int(inter[rows, best][has].sum())
    u = int(union[rows, best][has].sum()) + int(true_area[~has].sum())
    used = np.zeros(pred_ids.size, dtype=bool)
    used[best[has]] = True
    u += int(pred_area[~used].sum())
    return c / u if u else 1.0


@dataclass(frozen=True)
class PanopticQuality:
    """Panoptic quality and its factors (Kirillov et al. 2019) with the match counts."""

    pq: float
    dq: float
    sq: float
    tp: int
    fp: int
    fn: int


def panoptic_quality(true: np.ndarray, pred: np.ndarray, *, iou_threshold: float = 0.5) -> PanopticQuality:
    """Panoptic quality of an instance segmentation.

    Objects match when their IoU exceeds ``iou_threshold`` (>= 0.5 makes matches unique).
    DQ = TP / (TP + FP/2 + FN/2), SQ = mean IoU of the matches, PQ = DQ * SQ. Both maps empty
    gives 1.0 for all three.

    Examples
    --------
    >>> a = np.zeros((4, 4), int); a[:2, :2] = 1
    >>> panoptic_quality(a, a).pq
    1.0
    """
    if not 0.5 <= iou_threshold < 1.0:
        raise ValueError(f"iou_threshold must be in [0.5, 1) for unique matching, got {iou_threshold}")
    true_ids, pred_ids, true_area, pred_area, inter = pair_overlaps(true, pred)
    if true_ids.size == 0 and pred_ids.size == 0:
        return PanopticQuality(1.0, 1.0, 1.0, 0, 0, 0)
    union = true_area[:, None] + pred_area[None, :] - inter
    iou = np.divide(inter, union, out=np.zeros(inter.shape, dtype=float), where=union > 0)
    matched = iou > iou_threshold
    tp = int(matched.sum())
    fp = int(pred_ids.size - tp)
    fn = int(true_ids.size - tp)
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = float(iou[matched].mean()) if tp else 0.0
    return PanopticQuality(dq * sq, dq, sq, tp, fp, fn)


@dataclass(frozen=True)
class InstanceErrors:
    """What kind of mistakes an instance map makes, counted in objects (see :func:`instance_errors`)."""

    n_true: int
    n_pred: int
    #: predicted objects that hold more than half of each of two or more true objects
    merges: int
    #: true objects inside those merges
    merged_true: int
    #: true objects of which two or more predicted objects each lie more than half inside
    splits: int
    #: true objects more than half on predicted background
    missed: int
    #: predicted objects more than half on true background
    spurious: int

    def as_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.__dict__.items()}


def instance_errors(true: np.ndarray, pred: np.ndarray) -> InstanceErrors:
    """Count merges, splits, missed and spurious objects of ``pred`` against ``true``.

    The counts say why AJI or PQ is low: merged touching objects, over-split ones, objects not
    found at all, or objects found where the truth has none (which may also be unannotated ones).

    Examples
    --------
    >>> t = np.array([[1, 1, 0, 2, 2, 0, 0]]); p = np.array([[5, 5, 5, 5, 5, 0, 7]])
    >>> e = instance_errors(t, p); (e.merges, e.merged_true, e.missed, e.spurious)
    (1, 2, 0, 1)
    """
    true_ids, pred_ids, true_area, pred_area, inter = pair_overlaps(true, pred)
    if true_ids.size == 0 or pred_ids.size == 0:
        return InstanceErrors(int(true_ids.size), int(pred_ids.size), 0, 0, 0, int(true_ids.size), int(pred_ids.size))
    of_true = inter > 0.5 * true_area[:, None]  # most of true i lies in pred j
    of_pred = inter > 0.5 * pred_area[None, :]  # most of pred j lies in true i
    merged = of_true.sum(axis=0) >= 2
    missed = inter.sum(axis=1) * 2 < true_area
    spurious = inter.sum(axis=0) * 2 < pred_area
    return InstanceErrors(
        n_true=int(true_ids.size),
        n_pred=int(pred_ids.size),
        merges=int(merged.sum()),
        merged_true=int(of_true[:, merged].any(axis=1).sum()),
        splits=int((of_pred.sum(axis=1) >= 2).sum()),
        missed=int(missed.sum()),
        spurious=int(spurious.sum()),
    )

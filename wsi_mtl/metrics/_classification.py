"""Classification metrics: accuracy, per-class and macro F1, confusion matrix."""

from __future__ import annotations

import numpy as np

__all__ = ["confusion_matrix", "accuracy", "f1_per_class", "macro_f1"]


def _validate_labels(true: np.ndarray, pred: np.ndarray, num_classes: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    true = np.asarray(true).ravel()
    pred = np.asarray(pred).ravel()
    if true.shape != pred.shape:
        raise ValueError(f"true and pred differ in length: {true.size} vs {pred.size}")
    if true.dtype.kind not in "iu" or pred.dtype.kind not in "iu":
        raise TypeError(f"class labels must be integers, got {true.dtype} and {pred.dtype}")
    if true.size and (true.min() < 0 or pred.min() < 0):
        raise ValueError("class labels must be non-negative")
    n = int(max(true.max(initial=-1), pred.max(initial=-1)) + 1) if num_classes is None else int(num_classes)
    if true.size and max(true.max(), pred.max()) >= n:
        raise ValueError(f"a class label is >= num_classes={n}")
    return true.astype(np.int64), pred.astype(np.int64), n


def confusion_matrix(true: np.ndarray, pred: np.ndarray, *, num_classes: int | None = None) -> np.ndarray:
    """(C, C) int64 counts: rows are true classes, columns predicted classes."""
    true, pred, n = _validate_labels(true, pred, num_classes)
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (true, pred), 1)
    return cm


def accuracy(true: np.ndarray, pred: np.ndarray) -> float:
    """Fraction of correct labels (nan for no samples)."""
    true, pred, _ = _validate_labels(true, pred, None)
    return float((true == pred).mean()) if true.size else float("nan")


def f1_per_class(true: np.ndarray, pred: np.ndarray, *, num_classes: int | None = None) -> np.ndarray:
    """F1 of each class, 2TP / (2TP + FP + FN); nan for a class absent from both ``true`` and ``pred``."""
    cm = confusion_matrix(true, pred, num_classes=num_classes)
    tp = np.diag(cm).astype(float)
    denom = cm.sum(axis=0) + cm.sum(axis=1)
    return np.divide(2 * tp, denom, out=np.full(tp.shape, np.nan), where=denom > 0)


def macro_f1(true: np.ndarray, pred: np.ndarray, *, num_classes: int | None = None) -> float:
    """Mean F1 over the classes present in ``true`` or ``pred``.

    Examples
    --------
    >>> macro_f1(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]))
    0.7333333333333334
    """
    f1 = f1_per_class(true, pred, num_classes=num_classes)
    return float(np.nanmean(f1)) if np.isfinite(f1).any() else float("nan")

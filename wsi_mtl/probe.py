"""Linear probes on frozen encoder features: k-fold cross-validated accuracy and macro F1, and a
classifier saved so that ``wsimtl embed --probe`` applies it as a new head.

Features come from an ``embed`` result folder (``embeddings.zarr`` rows, labelled by patch ``id``)
or from a folder of labelled images, each encoded whole (rescaled from ``image_mpp`` to the
encoder's resolution, reflected at the border up to a multiple of the encoder's stride, pooled).

The classifiers are written here in torch (already a dependency): multinomial logistic regression
(``logreg``) or a one-vs-rest linear SVM with the squared hinge loss (``svm``), both L2-regularised
(strength ``1 / (C * n)``) on standardised features and fitted to convergence with L-BFGS.

>>> rng = np.random.default_rng(0)
>>> X = np.concatenate([rng.normal(0, 1, (30, 4)), rng.normal(3, 1, (30, 4))]); y = np.repeat([0, 1], 30)
>>> head = fit_linear(X, y, ["a", "b"])
>>> float((head.probabilities(X).argmax(1) == y).mean())
1.0
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import write_json_atomic
from .embed._encoders import PROBE_SUFFIX, LinearHead, PatchEncoder
from .errors import InputError
from .metrics import accuracy, macro_f1

__all__ = ["ProbeData", "fit_linear", "cross_validate", "load_labels", "features_from_result", "features_from_images",
           "save_probe", "stratified_folds", "head_accuracy", "is_image_folder", "KINDS"]

log = logging.getLogger(__name__)

KINDS = ("logreg", "svm")
_FILE_COLUMNS = ("file", "image", "path", "filename", "name")


@dataclass
class ProbeData:
    """Features (N x D), integer labels, class names, and per-row keys (file names or patch ids)."""

    features: np.ndarray
    labels: np.ndarray
    classes: list[str]
    keys: list[str]
    head_probs: dict[str, np.ndarray] | None = None  # the encoder's own heads, N x C each
    head_classes: dict[str, list[str]] | None = None


# ---- labels ----------------------------------------------------------------------------------------
def _pick(columns: Sequence[str], given: str | None, candidates: Sequence[str], prefixes: Sequence[str], what: str) -> str:
    if given:
        if given not in columns:
            raise InputError(f"labels file has no column {given!r} (columns: {', '.join(columns)})")
        return given
    for c in candidates:
        if c in columns:
            return c
    for p in prefixes:
        for c in columns:
            if c.lower().startswith(p):
                return c
    raise InputError(f"cannot tell the {what} column of the labels file (columns: {', '.join(columns)}); name it with --{what}-column")


def load_labels(path: str | Path, *, key_column: str | None = None, label_column: str | None = None) -> dict[str, str]:
    """``{key: label}`` from a CSV: the key column is ``file``/``image``/``path``/``name``/``id``, the label
    column ``label``, ``label_name*``, ``label*``, ``grade*`` or ``class*`` (or the ones named)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"cannot read labels file {path}: {exc}") from None
    if not rows:
        raise InputError(f"labels file {path} has no rows")
    columns = [c.strip() for c in rows[0].keys() if c]
    rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in rows]
    key = _pick(columns, key_column, (*_FILE_COLUMNS, "id"), (), "key")
    label = _pick(columns, label_column, ("label",), ("label_name", "label", "grade", "class"), "label")
    out = {r[key]: r[label] for r in rows if r.get(key) and r.get(label)}
    if len(set(out.values())) < 2:
        raise InputError(f"labels file {path} needs at least two classes in column {label!r}")
    return out


def _encode_labels(values: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    classes = sorted(set(values), key=lambda v: (not v.lstrip("-").isdigit(), int(v) if v.lstrip("-").isdigit() else 0, v))
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[v] for v in values], np.int64), classes


# ---- features ----------------------------------------------------------------------------------------
def features_from_result(result_dir: str | Path, labels: dict[str, str]) -> ProbeData:
    """Rows of an ``embed`` result's features whose patch ``id`` has a label."""
    import pandas as pd

    from .embed import PATCHES, open_embeddings

    result_dir = Path(result_dir)
    feats = np.asarray(open_embeddings(result_dir)["features"][:], np.float32)
    ids = pd.read_parquet(result_dir / PATCHES, columns=["id"])["id"].astype(str).tolist()
    rows = [i for i, k in enumerate(ids) if k in labels]
    if not rows:
        raise InputError(f"no patch id of {result_dir} is in the labels file")
    keys = [ids[i] for i in rows]
    y, classes = _encode_labels([labels[k] for k in keys])
    return ProbeData(feats[rows], y, classes, keys)


def _prepare_image(image: np.ndarray, scale: float, multiple: int) -> np.ndarray:
    from .train._augment import resize_image

    if abs(scale - 1.0) > 1e-6:
        image = resize_image(image, (max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale))))
    h, w = image.shape[:2]
    H, W = max(multiple, -(-h // multiple) * multiple), max(multiple, -(-w // multiple) * multiple)
    top, left = (H - h) // 2, (W - w) // 2
    mode = "reflect" if min(h, w) > max(H - h, W - w) else "symmetric"
    return np.pad(image, ((top, H - h - top), (left, W - w - left), (0, 0)), mode=mode)


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read image {path}: {exc}") from None


def features_from_images(folder: str | Path, labels: dict[str, str], encoder: PatchEncoder, *, image_mpp: float | None = None,
                         levels: str = "deepest", batch_size: int = 16, device: torch.device | str = "cpu",
                         precision: torch.dtype | None = None) -> ProbeData:
    """Encode every labelled image of ``folder`` (keys: paths relative to it) whole; see module doc."""
    folder = Path(folder)
    keys = sorted(k for k in labels if (folder / k).is_file())
    missing = [k for k in labels if not (folder / k).is_file()]
    if missing:
        log.warning("%d labelled files not found under %s (first: %s)", len(missing), folder, missing[0])
    if not keys:
        raise InputError(f"no file named in the labels file exists under {folder}")
    scale = (image_mpp or encoder.mpp) / encoder.mpp
    feats: list[np.ndarray] = []
    probs: dict[str, list[np.ndarray]] = {h: [] for h in encoder.head_classes}
    dev = torch.device(device)
    ctx = torch.autocast(dev.type, dtype=precision) if precision is not None else torch.autocast(dev.type, enabled=False)

    def flush(batch: list[np.ndarray]) -> None:
        x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float().to(dev)
        with torch.inference_mode(), ctx:
            f, p = encoder.encode(x, levels)
        f_np = f.float().cpu().numpy()
        feats.append(f_np)
        p_np = {k: v.float().cpu().numpy() for k, v in p.items()}
        p_np.update(encoder.probe_probabilities(f_np, levels))
        for h in probs:
            probs[h].append(p_np[h])

    batch: list[np.ndarray] = []
    for key in keys:  # images of one size go through the encoder together
        image = _prepare_image(_read_image(folder / key), scale, encoder.multiple)
        if batch and (image.shape != batch[0].shape or len(batch) >= batch_size):
            flush(batch)
            batch = []
        batch.append(image)
    if batch:
        flush(batch)
    y, classes = _encode_labels([labels[k] for k in keys])
    return ProbeData(np.concatenate(feats), y, classes, keys, {h: np.concatenate(v) for h, v in probs.items()},
                     dict(encoder.head_classes))


# ---- fitting ----------------------------------------------------------------------------------------
def _standardise(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = X.mean(axis=0)
    scale = X.std(axis=0)
    scale[scale < 1e-8] = 1.0
    return mean, scale


def fit_linear(X: np.ndarray, y: np.ndarray, classes: Sequence[str], *, kind: str = "logreg", C: float = 1.0,
               name: str = "probe", levels: str = "deepest", max_iter: int = 500) -> LinearHead:
    """A linear classifier fitted on ``X`` (N x D) and labels ``y`` (0..len(classes)-1); see module doc."""
    if kind not in KINDS:
        raise InputError(f"probe kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if C <= 0:
        raise InputError(f"C must be positive, got {C}")
    X = np.asarray(X, np.float64)
    if not np.isfinite(X).all():
        raise InputError("features contain NaN or infinite values (damaged patches?): drop those rows first")
    mean, scale = _standardise(X)
    Xt = torch.from_numpy((X - mean) / scale)
    yt = torch.from_numpy(np.asarray(y, np.int64))
    k = len(classes)
    W = torch.zeros(k, X.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    lam = 1.0 / (C * len(X))
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")
    target = torch.nn.functional.one_hot(yt, k).double() * 2 - 1

    def closure() -> torch.Tensor:
        opt.zero_grad()
        z = Xt @ W.T + b
        if kind == "logreg":
            loss = torch.nn.functional.cross_entropy(z, yt)
        else:
            loss = torch.clamp(1 - target * z, min=0).square().sum(dim=1).mean()
        loss = loss + 0.5 * lam * W.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LinearHead(name, [str(c) for c in classes], W.detach().numpy().copy(), b.detach().numpy().copy(), mean, scale, levels)


def stratified_folds(y: np.ndarray, k: int, *, seed: int = 0) -> list[np.ndarray]:
    """Test indices of ``k`` folds, each class dealt round-robin over the folds after a seeded shuffle."""
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    offset = 0
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        for j, i in enumerate(idx):
            folds[(offset + j) % k].append(int(i))
        offset += len(idx)
    return [np.array(sorted(f), np.int64) for f in folds]


def cross_validate(X: np.ndarray, y: np.ndarray, classes: Sequence[str], *, folds: int = 5, kind: str = "logreg",
                   C: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """k-fold stratified cross-validation: accuracy and macro F1 over the pooled out-of-fold predictions,
    and their per-fold values."""
    y = np.asarray(y)
    if len(np.unique(y)) < 2:
        raise InputError("cross-validation needs at least two classes")
    smallest = int(np.bincount(y).min())
    if folds < 2 or smallest < folds:
        raise InputError(f"{folds}-fold cross-validation needs at least {folds} examples of every class (the smallest has {smallest})")
    pred = np.empty_like(y)
    per_fold = []
    for test in stratified_folds(y, folds, seed=seed):
        train = np.setdiff1d(np.arange(len(y)), test)
        head = fit_linear(X[train], y[train], classes, kind=kind, C=C)
        pred[test] = head.probabilities(X[test]).argmax(1)
        per_fold.append({"accuracy": accuracy(y[test], pred[test]), "macro_f1": macro_f1(y[test], pred[test], num_classes=len(classes))})
    return {"folds": folds, "kind": kind, "C": C, "n": int(len(y)), "accuracy": accuracy(y, pred),
            "macro_f1": macro_f1(y, pred, num_classes=len(classes)),
            "accuracy_sd": float(np.std([f["accuracy"] for f in per_fold])), "per_fold": per_fold}


def head_accuracy(data: ProbeData) -> dict[str, dict[str, float]]:
    """Accuracy and macro F1 of each encoder head whose class names include every label's class."""
    out = {}
    for head, classes in (data.head_classes or {}).items():
        if not set(data.classes) <= set(classes):
            continue
        pred_names = np.array(classes)[data.head_probs[head].argmax(1)]  # type: ignore[index]
        index = {c: i for i, c in enumerate(data.classes)}
        pred = np.array([index.get(p, -1) for p in pred_names])
        ok = pred >= 0
        out[head] = {"accuracy": float((pred == data.labels).mean()),
                     "macro_f1": macro_f1(data.labels[ok], pred[ok], num_classes=len(data.classes)) if ok.any() else float("nan")}
    return out


def save_probe(head: LinearHead, path: str | Path, *, encoder: dict[str, Any], cv: dict[str, Any] | None = None) -> Path:
    """Write ``head`` as JSON (``<name>.probe.json``), with the encoder it was fitted on and its scores."""
    path = Path(path)
    if not path.name.endswith(PROBE_SUFFIX):
        path = path.with_name(path.name + PROBE_SUFFIX)
    write_json_atomic(path, {
        "name": head.name, "classes": head.classes, "levels": head.levels, "encoder": encoder,
        "weight": head.weight.tolist(), "bias": head.bias.tolist(), "mean": head.mean.tolist(), "scale": head.scale.tolist(),
        "cross_validation": cv,
    })
    return path


def is_image_folder(path: Path) -> bool:
    return path.is_dir() and not (path / "embeddings.zarr").is_dir()


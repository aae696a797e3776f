"""Evaluate a model on labelled tiles: nuclei (Dice, AJI, PQ), glands (GlaS object scores), nuclear
types (point matching) and tissue classification (accuracy, macro F1)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from tqdm import tqdm

from .. import metrics
from ._augment import resize_labels
from ..errors import InputError
from ..devices import cpu_has_bf16
from ._data import CRCHP_CLASSES, ClsItem, SegItem, Sources, _csv, _read_labels
from ._nuclei_sources import format_nuclei_sources, score_nuclei_sources
from ..network.tta import predict_tta
from ..postprocess import PostprocessParams, instance_type
from ..postprocess import gland_labels, nuclei_labels, params_of

__all__ = ["REFERENCE_IMAGES", "reference_metrics", "evaluate_split", "glas_native_truth", "heads_only", "predict_image", "classify_image", "evaluate_sources", "format_table", "instance_types",
           "nuclei_scores", "summed_errors"]

logger = logging.getLogger(__name__)


def _autocast(enabled: bool | None) -> contextlib.AbstractContextManager[Any]:
    """bfloat16 autocast where ``enabled``; None: where the CPU computes bf16 natively (as ``--precision auto``)."""
    if enabled is None:
        enabled = cpu_has_bf16()
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


@contextlib.contextmanager
def heads_only(model: torch.nn.Module, names: Iterable[str]) -> Iterator[None]:
    """Temporarily restrict ``model`` to the heads ``names`` so that unused decoders are not computed."""
    old = model.config
    keep = set(names)
    model.config = old.replace(heads={k: v for k, v in old.heads.items() if k in keep})
    try:
        yield
    finally:
        model.config = old


@torch.no_grad()
def predict_image(model: torch.nn.Module, image: np.ndarray, *, heads: Iterable[str] | None = None, margin_px: int = 32, bf16: bool | None = None, tta: int = 1) -> dict[str, np.ndarray]:
    """Softmax maps of the ``heads`` (default all) for one whole image at the model's mpp.

    The image is reflected by ``margin_px`` (rounded up so each side is a multiple of the model
    stride) and the maps cropped back. Segmentation heads: (C, H, W) float32; patch heads: the
    dense (C, h, w) map at ``patch_stride_px``. ``tta`` > 1 averages that many dihedral views
    (:func:`~wsi_mtl.network.tta.predict_tta`).
    """
    x, top, left = _padded_input(image, int(model.config.stride), margin_px)
    h, w = image.shape[:2]
    ph, pw = x.shape[-2:]
    was_training = model.training
    model.eval()
    try:
        with heads_only(model, model.config.heads if heads is None else heads), _autocast(bf16):
            out = predict_tta(model, x, views=tta)
    finally:
        model.train(was_training)
    res = {}
    for name, t in out.items():
        a = t[0].float().numpy()
        res[name] = a[:, top : top + h, left : left + w] if a.shape[-2:] == (ph, pw) else _patch_cells(a, model, top, left, h, w)
    return res


def _padded_input(image: np.ndarray, stride: int, margin_px: int) -> tuple[torch.Tensor, int, int]:
    """(1, 3, H', W') float tensor of ``image`` reflected by at least ``margin_px`` up to multiples of ``stride``; top, left offsets."""
    h, w = image.shape[:2]
    ph, pw = -(-(h + 2 * margin_px) // stride) * stride, -(-(w + 2 * margin_px) // stride) * stride
    top, left = (ph - h) // 2, (pw - w) // 2
    x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)[None].float()
    mode = "reflect" if min(h, w) > max(ph - h, pw - w) else "replicate"
    return F.pad(x, (left, pw - w - left, top, ph - h - top), mode=mode), top, left


def tissue_heads(model: torch.nn.Module, params: PostprocessParams) -> list[str]:
    """The tissue head, where the model has one and ``params`` place glands in its map
    (``gland_max_nonglandular`` < 1, :func:`gland_setting`); else none (no map to compute)."""
    return ["Patch-Class"] if "Patch-Class" in model.config.heads and params.gland_max_nonglandular < 1 else []


def gland_setting(model: torch.nn.Module, probs: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """``gland_labels``' tissue arguments from an image's predicted maps (none without ``Patch-Class``):
    glands in tissue where glands do not lie are dropped as in `wsimtl segment`."""
    if "Patch-Class" not in probs:
        return {}
    return {"tissue": probs["Patch-Class"], "tissue_classes": model.config.heads["Patch-Class"].class_names,
            "cell_px": model.config.patch_stride_px}


def _patch_cells(a: np.ndarray, model: torch.nn.Module, top: int, left: int, h: int, w: int) -> np.ndarray:
    """The cells of a dense (C, h', w') patch map that cover the unpadded image."""
    ps = int(model.config.patch_stride_px)
    t0, l0 = top // ps, left // ps
    return a[:, t0 : t0 + max(1, -(-h // ps)), l0 : l0 + max(1, -(-w // ps))]


@torch.no_grad()
def patch_feature_map(model: torch.nn.Module, image: np.ndarray, *, margin_px: int = 0, bf16: bool | None = None, pool: str = "mean") -> np.ndarray:
    """The (C, h, w) window features a patch head with ``pool`` classifies for ``image``, padded
    and cropped exactly as :func:`predict_image` crops its patch maps (eval mode)."""
    x, top, left = _padded_input(image, int(model.config.stride), margin_px)
    was_training = model.training
    model.eval()
    try:
        with _autocast(bf16):
            f = model.patch_features(x, pool)
    finally:
        model.train(was_training)
    return _patch_cells(f[0].float().numpy(), model, top, left, *image.shape[:2])


@torch.no_grad()
def classify_image(model: torch.nn.Module, image: np.ndarray, head: str, *, bf16: bool | None = None, tta: int = 1) -> np.ndarray:
    """Class probabilities (C,) of a tile for one patch head: the mean of the dense patch map."""
    probs = predict_image(model, image, heads=[head], margin_px=0, bf16=bf16, tta=tta)[head]
    return probs.reshape(probs.shape[0], -1).mean(axis=1)


def instance_types(labels: np.ndarray, type_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centroid (row, col) and class of each instance, the class as `wsimtl segment` gives it
    (:func:`~wsi_mtl.postprocess.instance_type`: per-pixel vote, never the background class).

    Returns ``(ids, centroids_yx (N, 2), classes (N,))``.
    """
    ids = np.unique(labels)
    ids = ids[ids != 0]
    if ids.size == 0:
        return ids, np.zeros((0, 2)), np.zeros(0, int)
    index = ids.tolist()
    cents = np.array(ndimage.center_of_mass(np.ones(labels.shape), labels, index)).reshape(-1, 2)
    cls, _ = instance_type(labels, type_prob, never_class=0)
    return ids, cents, cls[ids - 1].astype(int)


def nuclei_scores(true: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """One image's nuclei scores: Dice, AJI, PQ (DQ, SQ) and the error counts
    (:func:`~wsi_mtl.metrics.instance_errors`) of ``pred`` against ``true``."""
    pq = metrics.panoptic_quality(true, pred)
    return {"dice": metrics.dice_score(true, pred), "aji": metrics.aji(true, pred), "pq": pq.pq, "dq": pq.dq, "sq": pq.sq,
            "errors": metrics.instance_errors(true, pred).as_dict()}


def summed_errors(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """The error counts of :func:`nuclei_scores` rows, summed over the images."""
    return {k: sum(r["errors"][k] for r in rows) for k in rows[0]["errors"]}


def _mean(vals: Iterable[float]) -> float:
    v = [x for x in vals if np.isfinite(x)]
    return float(np.mean(v)) if v else float("nan")


def evaluate_sources(
    model: torch.nn.Module,
    data: Sources,
    *,
    gland_truth: Mapping[str, np.ndarray] | None = None,
    type_radius_px: float = 6.0,
    bf16: bool | None = None,
    progress: bool = False,
    per_image: bool = False,
    params: PostprocessParams | None = None,
    tta: int = 1,
) -> dict[str, Any]:
    """Metrics of ``model`` on labelled data (each task only when its data is present).

    Parameters
    ----------
    model
        A :class:`~wsi_mtl.network.MultiTaskNet`.
    data
        Items at the model's mpp: ``seg["nuclei"]`` (instance labels), ``seg["gland"]``,
        ``seg["nuclei_type"]`` (with points), ``cls["lc25000"]``, ``cls["kather2016"]``.
    gland_truth
        Optional native-resolution gland labels by item name: gland predictions are resized to
        them and scored there (GlaS protocol, Hausdorff in native pixels); else at model mpp.
    type_radius_px
        Matching radius of nucleus centres in model pixels (6 px at 20x / 0.5 um/px).
    bf16
        bfloat16 autocast; None (default): where the CPU computes bf16 natively, as ``--precision auto``.
    per_image
        Also return the per-image scores under ``"images"``.
    params
        Post-processing settings (default: the model's own, as `wsimtl segment` uses them).
    tta
        Test-time augmentation views for every prediction (1 = off), as ``wsimtl segment --tta``.

    Returns
    -------
    dict
        ``nuclei`` {dice, aji, pq, dq, sq, n_images, errors (:func:`~wsi_mtl.metrics.instance_errors`
        counts summed over images)}, ``glands`` {f1, precision, recall,
        object_dice, object_hausdorff, patch_glas_accuracy, n_images}, ``nuclei_type``
        {detection_f1, f1 per class, macro_f1}, ``tissue`` {lc25000: {accuracy, macro_f1},
        kather2016: {...}}.
    """
    heads = set(model.config.heads)
    params = params or params_of(model)
    res: dict[str, Any] = {}
    images: dict[str, Any] = {}
    wrap = (lambda it, d: tqdm(it, desc=d, leave=False)) if progress else (lambda it, d: it)

    nuclei: Sequence[SegItem] = data.seg.get("nuclei", [])
    if nuclei and "Nuclei-INST" in heads:
        rows = []
        for item in wrap(nuclei, "nuclei"):
            probs = predict_image(model, item.image, heads=["Nuclei-INST"], bf16=bf16, tta=tta)
            pred = nuclei_labels(probs["Nuclei-INST"], params)
            row = nuclei_scores(item.labels, pred)
            rows.append(row)
            images[f"nuclei/{item.name}"] = row
        res["nuclei"] = {k: _mean(r[k] for r in rows) for k in ("dice", "aji", "pq", "dq", "sq")} | {"n_images": len(rows), "errors": summed_errors(rows)}

    glands: Sequence[SegItem] = data.seg.get("gland", [])
    if glands and "Gland-INST" in heads:
        tp = fp = fn = 0
        dices, hds, correct, n_grade = [], [], 0, 0
        lumen = _LumenScore(model, params)
        grades: dict[str, list[Any]] = {}
        for item in wrap(glands, "glands"):
            probs = predict_image(model, item.image, heads=["Gland-INST", "Patch-GlaS", *lumen.heads(item), *tissue_heads(model, params)], bf16=bf16, tta=tta)
            pred = gland_labels(probs["Gland-INST"], params, **gland_setting(model, probs))
            lumen_row = lumen.add(item, probs, pred)
            truth = item.labels
            if gland_truth is not None and item.name in gland_truth:
                truth = gland_truth[item.name]
                pred = resize_labels(pred, truth.shape)
            s = metrics.gland_scores(truth, pred)
            tp, fp, fn = tp + s.tp, fp + s.fp, fn + s.fn
            dices.append(s.object_dice)
            hds.append(s.object_hausdorff)
            row: dict[str, Any] = {"f1": s.f1, "object_dice": s.object_dice, "object_hausdorff": s.object_hausdorff, **lumen_row}
            grades.setdefault(_grade_of(item), []).append(s)
            if "Patch-GlaS" in probs and "Patch-GlaS" in item.patch:
                p = probs["Patch-GlaS"].reshape(probs["Patch-GlaS"].shape[0], -1).mean(axis=1)
                ok = int(np.argmax(p)) == item.patch["Patch-GlaS"]
                correct += ok
                n_grade += 1
                row["grade_correct"] = bool(ok)
            images[f"glands/{item.name}"] = row
        res["glands"] = {
            "f1": 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0,
            "precision": tp / (tp + fp) if tp + fp else float("nan"),
            "recall": tp / (tp + fn) if tp + fn else float("nan"),
            "object_dice": _mean(dices),
            "object_hausdorff": _mean(hds),
            "patch_glas_accuracy": correct / n_grade if n_grade else float("nan"),
            "n_images": len(glands),
        }
        res["glands"]["by_grade"] = {g: _gland_summary(v) for g, v in sorted(grades.items()) if g}
        if lumen.n_images:
            res["lumen"] = lumen.summary()

    if data.seg.get("nuclei_all") and "Nuclei-INST" in heads:  # per nuclei source; CoNSeP type F1 from typed instances
        res["nuclei_all"] = score_nuclei_sources(model, data.seg["nuclei_all"], params=params, bf16=bf16, tta=tta, type_radius_px=type_radius_px, wrap=wrap, images=images)

    negatives: Sequence[SegItem] = data.seg.get("gland_negative", [])
    if negatives and "Gland-INST" in heads:
        res["non_gland"] = non_gland_area(model, negatives, params=params, bf16=bf16, tta=tta, wrap=wrap, images=images)

    typed: Sequence[SegItem] = data.seg.get("nuclei_type", [])
    if typed and "Nuclei-TYPE" in heads and "Nuclei-INST" in heads:
        names = {v: k for k, v in CRCHP_CLASSES.items()}
        counts = {n: {"tp": 0, "fp": 0, "fn": 0} for n in names.values()}
        det_tp = det_true = det_pred = 0
        for item in wrap(typed, "nuclear types"):
            probs = predict_image(model, item.image, heads=["Nuclei-INST", "Nuclei-TYPE"], bf16=bf16, tta=tta)
            lab = nuclei_labels(probs["Nuclei-INST"], params)
            _, cents, cls = instance_types(lab, probs["Nuclei-TYPE"])
            true_yx = item.points_yx if item.points_yx is not None else np.zeros((0, 2))
            true_cls = np.where(item.point_classes > 0, item.point_classes, -1) if item.point_classes is not None else np.zeros(0, int)
            s = metrics.point_type_scores(true_yx, true_cls, cents, cls, class_names=names, radius_px=type_radius_px)
            for n, c in s.class_counts.items():
                for k in c:
                    counts[n][k] += c[k]
            det_tp += s.n_matched
            det_true += len(true_cls)
            det_pred += len(cls)
            images[f"nuclei_type/{item.name}"] = {"detection_f1": s.detection_f1, **{f"f1_{k}": v for k, v in s.class_f1.items()}}
        f1 = {n: (2 * c["tp"] / (2 * c["tp"] + c["fp"] + c["fn"]) if (2 * c["tp"] + c["fp"] + c["fn"]) else float("nan")) for n, c in counts.items()}
        res["nuclei_type"] = {
            "detection_f1": 2 * det_tp / (det_true + det_pred) if det_true + det_pred else float("nan"),
            "f1": f1,
            "macro_f1": _mean(f1.values()),
            "n_images": len(typed),
        }

    tissue: dict[str, Any] = {}
    for task, items in data.cls.items():
        items = list(items)
        if not items or items[0].head not in heads:
            continue
        true, pred = [], []
        for it in wrap(items, task):
            p = classify_image(model, _pad_to(it, int(model.config.stride)), it.head, bf16=bf16, tta=tta)
            true.append(it.label)
            pred.append(int(np.argmax(p)))
        t, p_ = np.array(true), np.array(pred)
        n_cls = model.config.heads[items[0].head].num_classes
        tissue[task] = {
            "accuracy": metrics.accuracy(t, p_),
            "macro_f1": metrics.macro_f1(t, p_, num_classes=n_cls),
            "confusion": metrics.confusion_matrix(t, p_, num_classes=n_cls).tolist(),
            "n_images": len(items),
        }
    if tissue:
        res["tissue"] = tissue
    if per_image:
        res["images"] = images
    return res


def _grade_of(item: SegItem) -> str:
    """``benign`` / ``malignant`` of a GlaS item (its Patch-GlaS label), "" where unknown."""
    g = item.patch.get("Patch-GlaS")
    return ("benign", "malignant")[g] if g in (0, 1) else ""


def _gland_summary(scores: Sequence[Any]) -> dict[str, Any]:
    """Pooled object F1, mean object Dice and Hausdorff of some images' :func:`~wsi_mtl.metrics.gland_scores`."""
    tp, fp, fn = (sum(getattr(s, k) for s in scores) for k in ("tp", "fp", "fn"))
    return {"f1": 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0, "object_dice": _mean(s.object_dice for s in scores),
            "object_hausdorff": _mean(s.object_hausdorff for s in scores), "n_images": len(scores)}


def lumen_overlap(lumen_prob: np.ndarray, glands: np.ndarray, truth: np.ndarray, params: PostprocessParams) -> tuple[int, int]:
    """The lumen objects `wsimtl segment` makes from ``lumen_prob`` (kept inside ``glands``) against
    the lumen mask ``truth``: (pixels in both, pixels in each summed), the two terms of a Dice."""
    from ..postprocess import gland_lumen_labels

    pred = gland_lumen_labels(lumen_prob, glands, params) > 0
    true = truth > 0
    return int((pred & true).sum()), int(pred.sum() + true.sum())


class _LumenScore:
    """Lumen Dice of a model against the lumen pseudo-labels of gland items (``SegItem.lumen``):
    lumen objects as `wsimtl segment` makes them (kept inside the predicted glands), at the model's mpp."""

    def __init__(self, model: torch.nn.Module, params: PostprocessParams) -> None:
        self.on = "Lumen-INST" in model.config.heads
        self.params = params
        self.inter = self.total = 0
        self.dices: list[float] = []

    @property
    def n_images(self) -> int:
        return len(self.dices)

    def heads(self, item: SegItem) -> list[str]:
        return ["Lumen-INST"] if self.on and item.lumen is not None else []

    def add(self, item: SegItem, probs: Mapping[str, np.ndarray], glands: np.ndarray) -> dict[str, float]:
        if "Lumen-INST" not in probs or item.lumen is None:
            return {}
        inter, total = lumen_overlap(probs["Lumen-INST"], glands, item.lumen, self.params)
        self.inter, self.total = self.inter + inter, self.total + total
        dice = 2 * inter / total if total else 1.0
        self.dices.append(dice)
        return {"lumen_dice": dice}

    def summary(self) -> dict[str, Any]:
        return {"dice": 2 * self.inter / self.total if self.total else 1.0, "dice_mean": _mean(self.dices), "n_images": self.n_images,
                "truth": "pseudo-labels (wsi_mtl.train._lumen), not annotations"}


def non_gland_area(model: torch.nn.Module, items: Sequence[SegItem], *, params: PostprocessParams | None = None, bf16: bool | None = None, tta: int = 1,
                   wrap: Any = None, images: dict[str, Any] | None = None) -> dict[str, Any]:
    """Gland (and lumen) area fraction of tiles that hold no gland: the gland objects `wsimtl segment`
    would draw, pooled over pixels per source and overall (0 is right, every pixel is a false positive)."""
    params = params or params_of(model)
    lumen = "Lumen-INST" in model.config.heads
    per: dict[str, list[int]] = {}
    for item in (wrap(items, "non-gland tiles") if wrap else items):
        probs = predict_image(model, item.image, heads=["Gland-INST", *(["Lumen-INST"] if lumen else []), *tissue_heads(model, params)], bf16=bf16, tta=tta)
        glands = gland_labels(probs["Gland-INST"], params, **gland_setting(model, probs))
        lum = 0
        if lumen:
            from ..postprocess import gland_lumen_labels

            lum = int((gland_lumen_labels(probs["Lumen-INST"], glands, params) > 0).sum())
        g, n = int((glands > 0).sum()), int(glands.size)
        acc = per.setdefault(item.source, [0, 0, 0, 0])
        acc[0] += g
        acc[1] += lum
        acc[2] += n
        acc[3] += 1
        if images is not None:
            images[f"non_gland/{item.source}/{item.name}"] = {"gland_area_fraction": g / n, "lumen_area_fraction": lum / n}

    def row(g: int, lum: int, n: int, k: int) -> dict[str, Any]:
        return {"gland_area_fraction": g / n if n else float("nan"), "lumen_area_fraction": lum / n if n else float("nan"), "n_images": k}

    tot = [sum(v[i] for v in per.values()) for i in range(4)]
    return {**row(*tot), "by_source": {s: row(*v) for s, v in sorted(per.items())}}


def _pad_to(item: ClsItem, stride: int) -> np.ndarray:
    """The tile reflected up to a multiple of ``stride`` (small Kather tiles: 149 -> 160 px)."""
    img = item.image
    h, w = img.shape[:2]
    ph, pw = -(-h // stride) * stride, -(-w // stride) * stride
    if (ph, pw) == (h, w):
        return img
    top, left = (ph - h) // 2, (pw - w) // 2
    return np.pad(img, ((top, ph - h - top), (left, pw - w - left), (0, 0)), mode="reflect")


def format_table(result: Mapping[str, Any]) -> str:
    """A plain-text table of the headline numbers of :func:`evaluate_sources`."""
    lines = [f"{'task':<14}{'metric':<22}{'value':>10}"]

    def add(task: str, metric: str, v: Any) -> None:
        lines.append(f"{task:<14}{metric:<22}{v:>10.4f}" if isinstance(v, float) else f"{task:<14}{metric:<22}{v!s:>10}")

    for k in ("dice", "aji", "pq", "dq", "sq", "n_images"):
        if "nuclei" in result:
            add("nuclei", k, result["nuclei"][k])
    for k, v in (result.get("nuclei", {}).get("errors") or {}).items():
        add("nuclei", k, v)
    for k in ("f1", "precision", "recall", "object_dice", "object_hausdorff", "patch_glas_accuracy", "n_images"):
        if "glands" in result:
            add("glands", k, result["glands"][k])
    for grade, g in (result.get("glands", {}).get("by_grade") or {}).items():
        for k in ("f1", "object_dice", "object_hausdorff"):
            add("glands", f"{k} {grade}", g[k])
    if "nuclei_all" in result:
        format_nuclei_sources(result["nuclei_all"], add)
    if "lumen" in result:
        add("lumen", "dice (pseudo-labels)", result["lumen"]["dice"])
    if "non_gland" in result:
        add("non_gland", "gland_area_fraction", result["non_gland"]["gland_area_fraction"])
        for src, v in result["non_gland"]["by_source"].items():
            add("non_gland", f"gland area {src}"[:21], v["gland_area_fraction"])
        add("non_gland", "lumen_area_fraction", result["non_gland"]["lumen_area_fraction"])
    for task in ("gland", "lumen", "nuclei"):
        if task in result.get("glass", {}):
            add("glass", f"{task} um2 off tissue", result["glass"][task]["outside_tissue_um2"])
            add("glass", f"{task} share of tissue", result["glass"][task]["tissue_fraction"])
    if "nuclei_type" in result:
        nt = result["nuclei_type"]
        add("nuclei_type", "detection_f1", nt["detection_f1"])
        for n, v in nt["f1"].items():
            add("nuclei_type", f"f1 {n}", v)
        add("nuclei_type", "macro_f1", nt["macro_f1"])
    for task, t in result.get("tissue", {}).items():
        add(task, "accuracy", t["accuracy"])
        add(task, "macro_f1", t["macro_f1"])
        add(task, "n_images", t["n_images"])
    return "\n".join(lines)


def glas_native_truth(root: Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    """GlaS gland labels at their native resolution, by image name (for scoring in native pixels)."""
    base = Path(root) / "glands" / "glas"
    by = {r["name"]: r for r in _csv(base / "manifest.csv")}
    return {n: _read_labels(base / by[n]["annotation"]) for n in names if n in by}


#: Evaluation tasks and the loader task names they need.
EVAL_TASKS: dict[str, tuple[str, ...]] = {
    "nuclei": ("nuclei",),
    "glands": ("gland",),
    "nuclei_type": ("nuclei_type",),
    "tissue": ("lc25000", "kather2016"),
    "non_gland": ("gland_negative",),
    "nuclei_all": ("nuclei_all",),  # opt-in: per nuclei source (MoNuSeg all 30, CPM-15, CoNSeP, glioma)
    "glass": (),  # objects on glass: the sample slide segmented as a user would (wsi_mtl.train._glass)
}

#: The slide of ``data_root`` whose objects on glass the ``glass`` task measures.
GLASS_SLIDE = Path("wsi") / "CMU-1-Small-Region.svs"


def evaluate_split(
    model: torch.nn.Module,
    *,
    data_root: Path,
    split: Mapping[str, Sequence[str]],
    source_mpp: Mapping[str, float] | None = None,
    tasks: Iterable[str] | None = None,
    only: Mapping[str, Sequence[str]] | None = None,
    bf16: bool | None = None,
    progress: bool = False,
    per_image: bool = False,
    tta: int = 1,
    params: PostprocessParams | None = None,
) -> dict[str, Any]:
    """Load the held-out ``split`` of ``data_root`` at the model's mpp and score ``model`` on it.

    Parameters
    ----------
    tasks
        Subset of ``nuclei``, ``glands`` (with lumen Dice against the pseudo-labels), ``nuclei_type``,
        ``tissue``, ``non_gland`` (gland area on tiles without glands), ``glass`` (objects outside
        the tissue mask of ``data_root/wsi/CMU-1-Small-Region.svs``) (default all).
    only
        Restrict a source to some of its split names (e.g. ``{"monuseg": [name]}``).
    params
        Post-processing settings (default: the model's own), as :func:`evaluate_sources`.
    """
    from ._config import DEFAULT_SOURCE_MPP
    from ._data import load_sources

    tasks = list(EVAL_TASKS) if tasks is None else list(tasks)
    bad = sorted(set(tasks) - set(EVAL_TASKS))
    if bad:
        raise InputError(f"unknown evaluation tasks {bad}; known: {list(EVAL_TASKS)}")
    split = {k: list(v) for k, v in split.items()}
    for src, names in (only or {}).items():
        split[src] = [n for n in split.get(src, []) if n in set(names)]
    loader_tasks = [t for task in tasks for t in EVAL_TASKS[task]]
    heads = model.config.heads
    lc = list(heads["Patch-LC25000"].class_names) if "Patch-LC25000" in heads else ["lung_aca", "lung_n", "lung_scc"]
    data = load_sources(Path(data_root), mpp=float(model.config.mpp), source_mpp={**DEFAULT_SOURCE_MPP, **(source_mpp or {})}, split=split, part="val", lc_classes=lc, tasks=loader_tasks,
                        lumen="glands" in tasks and "Lumen-INST" in heads)
    truth = glas_native_truth(Path(data_root), split.get("glas", [])) if "glands" in tasks else None
    res = evaluate_sources(model, data, gland_truth=truth, bf16=bf16, progress=progress, per_image=per_image, tta=tta, params=params)
    if "glass" in tasks:
        res["glass"] = _glass(model, Path(data_root) / GLASS_SLIDE, bf16=bf16, params=params)
    return res


def _glass(model: torch.nn.Module, slide: Path, *, bf16: bool | None, params: PostprocessParams | None) -> dict[str, Any]:
    """Objects on glass of ``slide`` (:func:`~wsi_mtl.train._glass.objects_on_glass`); skipped, with a
    warning, where the data folder has no such slide."""
    from ._glass import objects_on_glass

    if not slide.is_file():
        logger.warning("objects on glass not measured: no slide %s", slide)
        return {"skipped": f"no slide {slide}"}
    return objects_on_glass(model, slide, precision="auto" if bf16 is None else "bf16" if bf16 else "fp32", postprocess=params)


#: The validation images whose scores are stored with a shipped model (``expected_metrics.json``).
REFERENCE_IMAGES: dict[str, list[str]] = {"monuseg": ["TCGA-A7-A13E-01Z-00-DX1"], "glas": ["train_4"]}


def reference_metrics(model: torch.nn.Module, *, data_root: Path, split: Mapping[str, Sequence[str]], images: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """Per-image nuclei and gland scores of ``model`` on a few validation images, in float32 (no
    autocast) so that they reproduce across CPUs; stored beside shipped weights and re-checked by
    the tests."""
    images = dict(REFERENCE_IMAGES if images is None else images)
    res = evaluate_split(model, data_root=data_root, split=split, tasks=["nuclei", "glands"], only=images, bf16=False, per_image=True)
    return {"images": images, "bf16": False, "per_image": res["images"]}

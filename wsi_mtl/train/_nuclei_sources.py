"""Nuclei instance sources at the model's mpp (task ``nuclei_all``): all 30 MoNuSeg instance maps,
CPM-15, CoNSeP (tiles rebuilt from their crops, with one nuclear type per instance) and the glioma
patches; and their scores per source (AJI, PQ; CoNSeP nuclear-type F1 from the typed instances).

CoNSeP's 4 types (HoVer-Net's merge of its 7 classes) map onto the model's ``Nuclei-TYPE``
classes (background, epithelial, fibroblast, inflammatory, other) as :data:`CONSEP_TYPES` says:
epithelial -> epithelial, spindle-shaped (fibroblast + muscle + endothelial) -> fibroblast,
inflammatory -> inflammatory, other -> other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ._targets import IGNORE
from ._data import CRCHP_CLASSES, SegItem, _csv, _read_labels, _read_rgb, _rescale, _select, load_cpm15

__all__ = [
    "CONSEP_TYPES",
    "MONUSEG_MASKS",
    "NUCLEI_SOURCES",
    "TypedSegItem",
    "load_monuseg_all",
    "load_consep",
    "load_glioma_nuclei",
    "load_nuclei_sources",
    "typed_points",
    "score_nuclei_sources",
]

#: Nuclei-TYPE class index of each CoNSeP ``type_name`` (the CRCHistoPhenotypes indices).
CONSEP_TYPES: dict[str, int] = {
    "epithelial": CRCHP_CLASSES["epithelial"],
    "spindle": CRCHP_CLASSES["fibroblast"],
    "inflammatory": CRCHP_CLASSES["inflammatory"],
    "other": CRCHP_CLASSES["others"],
}
#: MoNuSeg label maps: ``png`` = the per-nucleus-mask maps for all 30 images (one rasterisation);
#: ``xml`` = the XML-polygon maps for the 13 images that have them, the PNG maps for the other 17.
MONUSEG_MASKS: tuple[str, ...] = ("png", "xml")
#: Sources of task ``nuclei_all``, keyed as in the split file.
NUCLEI_SOURCES: tuple[str, ...] = ("monuseg", "cpm15", "consep", "glioma")

Selector = Callable[[str], Mapping[str, Any]]


@dataclass
class TypedSegItem(SegItem):
    """A ``"nuclei"`` item whose instances carry a nuclear type: ``instance_classes[id]`` is the
    Nuclei-TYPE class of instance ``id`` (index 0 = background = 0; IGNORE = no type known)."""

    instance_classes: np.ndarray | None = None


def load_monuseg_all(root: Path, *, mpp: float, source_mpp: float, names: Sequence[str] | None = None, exclude: Sequence[str] = (), masks: str = "png") -> list[SegItem]:
    """All 30 MoNuSeg training images with instance labels (``masks``: see :data:`MONUSEG_MASKS`)."""
    if masks not in MONUSEG_MASKS:
        raise InputError(f"MoNuSeg masks must be one of {list(MONUSEG_MASKS)}, got {masks!r}")
    base = root / "nuclei" / "monuseg"
    by = {r["name"]: r for r in _csv(base / "manifest_instances.csv")}
    xml = {r["name"]: r["instance_mask"] for r in _csv(base / "manifest.csv") if r.get("instance_mask")} if masks == "xml" else {}
    out = []
    for n in _select(list(by), names, exclude):
        lab = _read_labels(base / xml.get(n, by[n]["instance_mask"]))
        img, lab = _rescale(_read_rgb(base / by[n]["image"]), lab, source_mpp / mpp)
        out.append(SegItem(n, "monuseg", "nuclei", img, lab))
    return out


def _consep_tile(base: Path, crops: Sequence[Mapping[str, str]], shape: tuple[int, int]) -> np.ndarray:
    """A CoNSeP tile image rebuilt by pasting its crops at (x0, y0) in index order."""
    img = np.zeros((*shape, 3), np.uint8)
    seen = np.zeros(shape, bool)
    for c in sorted(crops, key=lambda r: r["name"]):
        x0, y0 = int(c["x0"]), int(c["y0"])
        crop = _read_rgb(base / c["image"])
        h, w = crop.shape[:2]
        if y0 + h > shape[0] or x0 + w > shape[1]:
            raise InputError(f"CoNSeP crop {c['name']} at ({x0}, {y0}) lies outside its {shape[1]}x{shape[0]} tile")
        img[y0 : y0 + h, x0 : x0 + w] = crop
        seen[y0 : y0 + h, x0 : x0 + w] = True
    if not seen.all():
        raise InputError(f"CoNSeP crops of tile {crops[0]['tile']} leave {int((~seen).sum())} pixels uncovered")
    return img


def _consep_lut(rows: Iterable[Mapping[str, str]], max_id: int, tile: str) -> np.ndarray:
    """Nuclei-TYPE class per instance id of one tile (0 for the background, IGNORE for ids without a row)."""
    lut = np.full(max_id + 1, IGNORE, np.uint8)
    lut[0] = 0
    for r in rows:
        i, t = int(r["instance_id"]), r["type_name"]
        if t not in CONSEP_TYPES:
            raise InputError(f"CoNSeP tile {tile}: unknown type {t!r} (known: {list(CONSEP_TYPES)})")
        if 0 < i <= max_id:
            lut[i] = CONSEP_TYPES[t]
    return lut


def load_consep(root: Path, *, mpp: float, source_mpp: float, names: Sequence[str] | None = None, exclude: Sequence[str] = ()) -> list[TypedSegItem]:
    """CoNSeP training tiles (rebuilt from their 16 JPEG crops) with typed instance labels."""
    base = root / "nuclei" / "consep"
    tiles = {r["name"]: r for r in _csv(base / "tiles.csv")}
    crops: dict[str, list[dict[str, str]]] = {}
    for r in _csv(base / "manifest.csv"):
        crops.setdefault(r["tile"], []).append(r)
    types: dict[str, list[dict[str, str]]] = {}
    for r in _csv(base / "instance_types.csv"):
        types.setdefault(r["name"], []).append(r)
    out = []
    for n in _select(list(tiles), names, exclude):
        t = tiles[n]
        lab = _read_labels(base / t["instance_mask"])
        if n not in crops:
            raise InputError(f"CoNSeP tile {n} has no crops in manifest.csv")
        img = _consep_tile(base, crops[n], lab.shape)
        lut = _consep_lut(types.get(n, []), int(lab.max()), n)
        img, lab = _rescale(img, lab, source_mpp / mpp)
        out.append(TypedSegItem(n, "consep", "nuclei", img, lab, instance_classes=lut))
    return out


def load_glioma_nuclei(root: Path, *, mpp: float, source_mpp: float, names: Sequence[str] | None = None, exclude: Sequence[str] = ()) -> list[SegItem]:
    """Glioma patches with their nucleus instance labels."""
    base = root / "nuclei" / "glioma"
    by = {r["name"]: r for r in _csv(base / "manifest.csv")}
    out = []
    for n in _select(list(by), names, exclude):
        img, lab = _rescale(_read_rgb(base / by[n]["image"]), _read_labels(base / by[n]["instance_mask"]), source_mpp / mpp)
        out.append(SegItem(n, "glioma", "nuclei", img, lab))
    return out


def load_nuclei_sources(root: Path, *, mpp: float, source_mpp: Mapping[str, float], sel: Selector, monuseg_masks: str = "png",
                        sources: Sequence[str] = NUCLEI_SOURCES) -> list[SegItem]:
    """Items of task ``nuclei_all``: MoNuSeg (all 30), CPM-15, CoNSeP and glioma, each resampled
    from its ``source_mpp`` (CoNSeP default 0.25, 40x) to ``mpp``; ``sel(source)`` gives the
    ``names`` / ``exclude`` of a source (its split part)."""
    out: list[SegItem] = []
    if "monuseg" in sources:
        out += load_monuseg_all(root, mpp=mpp, source_mpp=source_mpp["monuseg"], masks=monuseg_masks, **sel("monuseg"))
    if "cpm15" in sources:
        out += load_cpm15(root, mpp=mpp, mpp_20x=source_mpp["cpm15_20x"], mpp_40x=source_mpp["cpm15_40x"], **sel("cpm15"))
    if "consep" in sources:
        out += load_consep(root, mpp=mpp, source_mpp=source_mpp.get("consep", 0.25), **sel("consep"))
    if "glioma" in sources:
        out += load_glioma_nuclei(root, mpp=mpp, source_mpp=source_mpp.get("glioma", 0.25), **sel("glioma"))
    return out


def typed_points(labels: np.ndarray, instance_classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroid (row, col) and Nuclei-TYPE class of each instance in ``labels`` (class -1 where
    the instance has none)."""
    ids = np.unique(labels)
    ids = ids[ids != 0]
    if ids.size == 0:
        return np.zeros((0, 2)), np.zeros(0, int)
    cents = np.array(ndimage.center_of_mass(np.ones(labels.shape), labels, ids.tolist())).reshape(-1, 2)
    lut = np.asarray(instance_classes)
    cls = np.where(ids < len(lut), lut[np.minimum(ids, len(lut) - 1)], 0).astype(int)
    return cents, np.where((cls > 0) & (cls != IGNORE), cls, -1)


def _f1(c: Mapping[str, int]) -> float:
    d = 2 * c["tp"] + c["fp"] + c["fn"]
    return 2 * c["tp"] / d if d else float("nan")


def _nanmean(vals: Iterable[float]) -> float:
    v = [x for x in vals if np.isfinite(x)]
    return float(np.mean(v)) if v else float("nan")


class _TypeCounts:
    """Per-class TP/FP/FN of typed instances pooled over the images of one source."""

    def __init__(self, class_names: Mapping[int, str]) -> None:
        self.names = dict(class_names)
        self.counts = {n: {"tp": 0, "fp": 0, "fn": 0} for n in self.names.values()}
        self.tp = self.n_true = self.n_pred = self.n_images = 0

    def add(self, s: Any, n_true: int, n_pred: int) -> None:
        for n, c in s.class_counts.items():
            for k in c:
                self.counts[n][k] += c[k]
        self.tp += s.n_matched
        self.n_true += n_true
        self.n_pred += n_pred
        self.n_images += 1

    def summary(self) -> dict[str, Any]:
        f1 = {n: _f1(c) for n, c in self.counts.items()}
        det = 2 * self.tp / (self.n_true + self.n_pred) if self.n_true + self.n_pred else float("nan")
        return {"detection_f1": det, "f1": f1, "macro_f1": _nanmean(f1.values()), "n_images": self.n_images, "n_true": self.n_true}


def score_nuclei_sources(model: Any, items: Sequence[SegItem], *, params: Any, bf16: bool | None = None, tta: int = 1, type_radius_px: float = 6.0,
                         wrap: Callable[[Any, str], Any] = lambda it, d: it, images: dict[str, Any] | None = None) -> dict[str, Any]:
    """Nuclei scores of ``model`` per source of ``items`` (task ``nuclei_all``).

    Returns ``{"by_source": {source: {dice, aji, pq, dq, sq, n_images, errors}}, "types": {source:
    {detection_f1, f1 per class, macro_f1, n_images}}}``; ``errors`` are the source's
    :func:`~wsi_mtl.metrics.instance_errors` summed over its images (why its AJI is what it is:
    nuclei missed, merged into one, split); types only for sources with typed
    instances (CoNSeP): predicted nuclei typed as `wsimtl segment` types them, matched to the true
    instance centroids within ``type_radius_px`` (HoVer-Net's 12 px at 40x = 6 px at 0.5 um/px).
    """
    from .. import metrics
    from ..postprocess import nuclei_labels
    from ._evaluate import instance_types, nuclei_scores, predict_image, summed_errors

    heads = set(model.config.heads)
    names = {i: n for i, n in enumerate(model.config.heads["Nuclei-TYPE"].class_names) if i > 0} if "Nuclei-TYPE" in heads else {}
    rows: dict[str, list[dict[str, float]]] = {}
    types: dict[str, _TypeCounts] = {}
    for item in wrap(items, "nuclei sources"):
        lut = getattr(item, "instance_classes", None)
        typed = lut is not None and bool(names)
        probs = predict_image(model, item.image, heads=["Nuclei-INST", *(["Nuclei-TYPE"] if typed else [])], bf16=bf16, tta=tta)
        pred = nuclei_labels(probs["Nuclei-INST"], params)
        row = nuclei_scores(item.labels, pred)
        if typed:
            true_yx, true_cls = typed_points(item.labels, lut)
            _, cents, cls = instance_types(pred, probs["Nuclei-TYPE"])
            s = metrics.point_type_scores(true_yx, true_cls, cents, cls, class_names=names, radius_px=type_radius_px)
            types.setdefault(item.source, _TypeCounts(names)).add(s, len(true_cls), len(cls))
            row |= {"type_detection_f1": s.detection_f1, **{f"type_f1_{k}": v for k, v in s.class_f1.items()}}
        rows.setdefault(item.source, []).append(row)
        if images is not None:
            images[f"nuclei_all/{item.source}/{item.name}"] = row
    by_source = {s: {k: _nanmean(r[k] for r in rs) for k in ("dice", "aji", "pq", "dq", "sq")}
                 | {"n_images": len(rs), "errors": summed_errors(rs)} for s, rs in rows.items()}
    return {"by_source": by_source, "types": {s: t.summary() for s, t in types.items()}}


def format_nuclei_sources(result: Mapping[str, Any], add: Callable[[str, str, Any], None]) -> None:
    """Table rows of :func:`score_nuclei_sources` through ``add(task, metric, value)``."""
    for src, v in result.get("by_source", {}).items():
        for k in ("aji", "pq", "dice", "n_images"):
            add("nuclei_all", f"{k} {src}"[:21], v[k])
        for k in ("n_true", "missed", "merged_true", "splits", "spurious"):
            if k in v.get("errors", {}):
                add("nuclei_all", f"{k} {src}"[:21], v["errors"][k])
    for src, t in result.get("types", {}).items():
        add("nuclei_all", f"type det_f1 {src}"[:21], t["detection_f1"])
        for n, v in t["f1"].items():
            add("nuclei_all", f"f1 {n}"[:21], v)
        add("nuclei_all", f"type macro_f1 {src}"[:21], t["macro_f1"])

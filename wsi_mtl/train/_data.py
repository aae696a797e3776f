"""The training sources of ../shared/data, resampled once to the model's mpp and kept in memory,
and the samplers that cut augmented, labelled crops from them (Cerberus-style partial labels)."""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import InputError
from ._augment import random_crop, random_flip_rot, resize_image, resize_labels
from ._lumen import lumen_labels
from ._targets import IGNORE, background_from_labels, binary_targets, inst_targets, split_touching, type_targets_from_points

__all__ = [
    "SegItem",
    "ClsItem",
    "CRCHP_CLASSES",
    "SEG_HEADS",
    "load_monuseg",
    "split_binary_items",
    "load_cpm15",
    "load_crchistophenotypes",
    "load_glas",
    "load_lc25000",
    "load_kather2016",
    "load_glioma",
    "load_gland_negatives",
    "KATHER_NON_GLAND",
    "LC25000_NON_GLAND",
    "load_sources",
    "Sources",
    "sample_seg",
    "sample_cls",
]

logger = logging.getLogger(__name__)

#: Nuclei-TYPE class index of each CRCHistoPhenotypes label (0 = background).
CRCHP_CLASSES: dict[str, int] = {"epithelial": 1, "fibroblast": 2, "inflammatory": 3, "others": 4}
#: Segmentation outputs that get a target map in every segmentation batch.
SEG_HEADS: tuple[str, ...] = ("Nuclei-INST", "Gland-INST", "Lumen-INST", "Nuclei-TYPE")
#: CPM-15 objective power per image (README_training.txt of the challenge).
_CPM15_40X = {f"image{i:02d}" for i in range(8, 16)}
#: Kather classes without glands (stroma, lympho, debris, adipose, empty): "no gland here" tiles.
KATHER_NON_GLAND: tuple[str, ...] = ("stroma", "lympho", "debris", "adipose", "empty")
#: LC25000 classes without glands (squamous-cell carcinoma).
LC25000_NON_GLAND: tuple[str, ...] = ("lung_scc",)


@dataclass
class SegItem:
    """One image for the segmentation heads, already at the model's mpp.

    ``kind`` is ``"nuclei"`` (instance labels), ``"nuclei_binary"`` (foreground mask),
    ``"nuclei_type"`` (TYPE target map from points) or ``"gland"`` (gland instance labels;
    all zero for a tile without glands, task ``gland_negative``). ``lumen``: lumen instance labels
    of a gland item (pseudo-labels, :mod:`~wsi_mtl.train._lumen`), None where lumen is unlabelled.
    """

    name: str
    source: str
    kind: str
    image: np.ndarray  # (H, W, 3) uint8
    labels: np.ndarray  # (H, W): int32 instances, uint8 mask, or uint8 TYPE map
    patch: dict[str, int] = field(default_factory=dict)
    points_yx: np.ndarray | None = None  # (N, 2) float, model pixels (nuclei_type only)
    point_classes: np.ndarray | None = None  # (N,) int, 0 = no class
    lumen: np.ndarray | None = None  # (H, W) int32 lumen instances (gland items), None = unlabelled


@dataclass
class ClsItem:
    """One image with a class label for one patch head, at the model's mpp."""

    name: str
    source: str
    head: str
    label: int
    image: np.ndarray


def _read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read image {path}: {exc}") from None


def _read_labels(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im).astype(np.int32)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read label image {path}: {exc}") from None


def _csv(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as fh:
            return [{k.strip(): (v or "").strip() for k, v in row.items()} for row in csv.DictReader(fh)]
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None


def _scaled_shape(shape: Sequence[int], scale: float) -> tuple[int, int]:
    return max(1, int(round(shape[0] * scale))), max(1, int(round(shape[1] * scale)))


def _rescale(image: np.ndarray, labels: np.ndarray | None, scale: float) -> tuple[np.ndarray, np.ndarray | None]:
    shape = _scaled_shape(image.shape, scale)
    return resize_image(image, shape), (None if labels is None else resize_labels(labels, shape))


def _select(all_names: Sequence[str], names: Sequence[str] | None, exclude: Sequence[str] = ()) -> list[str]:
    if names is None:
        chosen = list(all_names)
    else:
        missing = sorted(set(names) - set(all_names))
        if missing:
            raise InputError(f"unknown names {missing[:5]}{'...' if len(missing) > 5 else ''}")
        chosen = list(names)
    ex = set(exclude)
    return [n for n in chosen if n not in ex]


def load_monuseg(root: Path, *, mpp: float, source_mpp: float, names: Sequence[str] | None = None, exclude: Sequence[str] = (), binary_only: bool = False) -> list[SegItem]:
    """MoNuSeg training images with instance masks (or, ``binary_only``, the others with binary masks)."""
    base = root / "nuclei" / "monuseg"
    rows = _csv(base / "manifest.csv")
    if binary_only:
        rows = [r for r in rows if not r["instance_mask"] and r["binary_mask"]]
    else:
        rows = [r for r in rows if r["instance_mask"]]
    by = {r["name"]: r for r in rows}
    if names is not None and not binary_only:  # a split may name binary-only images (scored by task nuclei_all): skipped here
        binary = {r["name"] for r in _csv(base / "manifest.csv") if not r["instance_mask"]}
        names = [n for n in names if n not in binary]
    out = []
    for n in _select(list(by), names, exclude):
        r = by[n]
        lab = _read_labels(base / (r["binary_mask"] if binary_only else r["instance_mask"]))
        img, lab = _rescale(_read_rgb(base / r["image"]), lab, source_mpp / mpp)
        out.append(SegItem(n, "monuseg", "nuclei_binary" if binary_only else "nuclei", img, lab))
    return out


def split_binary_items(items: Sequence[SegItem], *, h: float = 0.5, sigma: float = 0.5) -> list[SegItem]:
    """``"nuclei"`` items of source ``"monuseg_split"`` from ``"nuclei_binary"`` items (same images).

    :func:`~wsi_mtl.train._targets.split_touching` cuts each mask into nuclei at its necks (on the
    MoNuSeg images that have both masks, the cut binary mask scores AJI 0.74-0.89 against the XML
    instances at 0.5 um/px): their boundaries are estimates, their foreground is the annotators'.
    """
    return [SegItem(it.name, "monuseg_split", "nuclei", it.image, split_touching(it.labels > 0, h=h, sigma=sigma)) for it in items]


def load_cpm15(root: Path, *, mpp: float, mpp_20x: float, mpp_40x: float, names: Sequence[str] | None = None, exclude: Sequence[str] = ()) -> list[SegItem]:
    """CPM-15 tiles with instance masks; 20x images taken at ``mpp_20x``, 40x at ``mpp_40x``."""
    base = root / "nuclei" / "cpm15"
    by = {r["name"]: r for r in _csv(base / "manifest.csv")}
    out = []
    for n in _select(list(by), names, exclude):
        src = mpp_40x if n in _CPM15_40X else mpp_20x
        img, lab = _rescale(_read_rgb(base / "images" / f"{n}.png"), _read_labels(base / "instance_masks" / f"{n}.png"), src / mpp)
        out.append(SegItem(n, "cpm15", "nuclei", img, lab))
    return out


def crchp_points(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """CRCHistoPhenotypes points per image: 0-based (row, col) at source resolution and class (0 = none).

    Detection points within 4 px of a classified point are the same nucleus and are dropped.
    """
    rows = _csv(root / "nuclei" / "crchistophenotypes" / "points.csv")
    det: dict[str, list[tuple[float, float]]] = {}
    cls: dict[str, list[tuple[float, float, int]]] = {}
    for r in rows:
        y, x = float(r["y"]) - 1.0, float(r["x"]) - 1.0  # 1-based x = column, y = row
        lf = r["label_file"]
        if lf == "detection":
            det.setdefault(r["image"], []).append((y, x))
        elif lf in CRCHP_CLASSES:
            cls.setdefault(r["image"], []).append((y, x, CRCHP_CLASSES[lf]))
    out = {}
    for name in set(det) | set(cls):
        c = np.array(cls.get(name, []), float).reshape(-1, 3)
        d = np.array(det.get(name, []), float).reshape(-1, 2)
        if len(c) and len(d):
            dist = np.sqrt(((d[:, None, :] - c[None, :, :2]) ** 2).sum(-1)).min(axis=1)
            d = d[dist > 4.0]
        yx = np.concatenate([c[:, :2], d], axis=0)
        k = np.concatenate([c[:, 2].astype(int), np.zeros(len(d), int)])
        out[name] = (yx, k)
    return out


def load_crchistophenotypes(
    root: Path, *, mpp: float, source_mpp: float, names: Sequence[str] | None = None, exclude: Sequence[str] = (),
    radius_px: float = 4.0, background_px: float | None = 10.0,
) -> list[SegItem]:
    """CRCHistoPhenotypes images with a Nuclei-TYPE target map built from their points."""
    base = root / "nuclei" / "crchistophenotypes"
    by = {r["image"]: r for r in _csv(base / "manifest.csv")}
    points = crchp_points(root)
    scale = source_mpp / mpp
    out = []
    for n in _select(list(by), names, exclude):
        img, _ = _rescale(_read_rgb(base / "images" / f"{n}.png"), None, scale)
        yx, k = points.get(n, (np.zeros((0, 2)), np.zeros(0, int)))
        yx = (yx + 0.5) * scale - 0.5
        tmap = type_targets_from_points(img.shape[:2], yx, k, radius_px=radius_px, background_px=background_px)
        out.append(SegItem(n, "crchistophenotypes", "nuclei_type", img, tmap, points_yx=yx, point_classes=k))
    return out


def load_glas(root: Path, *, mpp: float, source_mpp: float, names: Sequence[str] | None = None, exclude: Sequence[str] = (), grades: Sequence[str] = ("benign", "malignant"),
              lumen: bool = False) -> list[SegItem]:
    """GlaS training images with gland instance labels and the benign/malignant grade (Patch-GlaS);
    ``lumen``: with lumen pseudo-labels derived at the model's mpp (:func:`~wsi_mtl.train._lumen.lumen_labels`)."""
    base = root / "glands" / "glas"
    by = {r["name"]: r for r in _csv(base / "manifest.csv")}
    out = []
    for n in _select(list(by), names, exclude):
        r = by[n]
        img, lab = _rescale(_read_rgb(base / r["image"]), _read_labels(base / r["annotation"]), source_mpp / mpp)
        g = r["grade_glas"]
        patch = {"Patch-GlaS": list(grades).index(g)} if g in grades else {}
        out.append(SegItem(n, "glas", "gland", img, lab, patch=patch, lumen=lumen_labels(img, lab) if lumen else None))
    return out


def _negative(name: str, source: str, image: np.ndarray) -> SegItem:
    """A tile without glands: gland and lumen labels all background."""
    zeros = np.zeros(image.shape[:2], np.int32)
    return SegItem(name, source, "gland", image, zeros, lumen=zeros.copy())


def load_glioma(root: Path, *, mpp: float, source_mpp: float, names: Sequence[str] | None = None, exclude: Sequence[str] = ()) -> list[SegItem]:
    """Glioma patches (brain: no glands) as ``gland_negative`` items."""
    base = root / "nuclei" / "glioma"
    by = {r["name"]: r for r in _csv(base / "manifest.csv")}
    out = []
    for n in _select(list(by), names, exclude):
        img, _ = _rescale(_read_rgb(base / by[n]["image"]), None, source_mpp / mpp)
        out.append(_negative(n, "glioma", img))
    return out


def _mosaics(tiles: Sequence[ClsItem], *, n: int, grid: int = 3, seed: int = 0) -> list[SegItem]:
    """``n`` mosaics of ``grid`` x ``grid`` tiles drawn from ``tiles`` (seeded): tissue next to
    tissue and, where an empty tile is drawn, tissue borders against glass."""
    if not tiles:
        return []
    rng = np.random.default_rng(seed)
    side = min(min(t.image.shape[:2]) for t in tiles)
    out = []
    for i in range(n):
        pick = rng.integers(len(tiles), size=grid * grid)
        rows = [np.concatenate([tiles[int(j)].image[:side, :side] for j in pick[r * grid : (r + 1) * grid]], axis=1) for r in range(grid)]
        out.append(_negative(f"mosaic_{i:03d}", "kather2016_mosaic", np.ascontiguousarray(np.concatenate(rows, axis=0))))
    return out


def load_gland_negatives(
    root: Path, *, mpp: float, source_mpp: Mapping[str, float], split: Mapping[str, Sequence[str]], part: str, lc_classes: Sequence[str], mosaics: int = 40, seed: int = 0,
) -> list[SegItem]:
    """Tiles that hold no gland, for "no gland here" (task ``gland_negative``): LC25000 squamous
    carcinoma, glioma patches, and the Kather non-gland classes (training part: as ``mosaics``
    3 x 3 mosaics, so tiles meet each other and glass; validation part: the tiles themselves)."""
    def sel(src: str) -> dict[str, Sequence[str] | None]:
        return {"names": None, "exclude": split.get(src, [])} if part == "train" else {"names": split.get(src, []), "exclude": ()}

    lc = [it for it in load_lc25000(root, mpp=mpp, source_mpp=source_mpp["lc25000"], classes=lc_classes, **sel("lc25000")) if lc_classes[it.label] in LC25000_NON_GLAND]
    out = [_negative(it.name, "lc25000", it.image) for it in lc]
    out += load_glioma(root, mpp=mpp, source_mpp=source_mpp["glioma"], **sel("glioma"))
    kather_names = {r["file"]: r["label_name_assumed_tfds_order"] for r in _csv(root / "tissue" / "kather2016_like_100" / "labels.csv")}
    kather = [it for it in load_kather2016(root, mpp=mpp, source_mpp=source_mpp["kather2016"], **sel("kather2016")) if kather_names.get(it.name) in KATHER_NON_GLAND]
    if part == "train":
        out += _mosaics(kather, n=mosaics, seed=seed)
    else:
        out += [_negative(it.name, "kather2016", it.image) for it in kather]
    return out


def load_lc25000(root: Path, *, mpp: float, source_mpp: float, classes: Sequence[str], names: Sequence[str] | None = None, exclude: Sequence[str] = ()) -> list[ClsItem]:
    """LC25000 lung tiles (file names relative to the set's folder) for ``Patch-LC25000``."""
    base = root / "tissue" / "lc25000_lung_224"
    by = {r["file"]: r for r in _csv(base / "labels.csv")}
    out = []
    for n in _select(sorted(by), names, exclude):
        img, _ = _rescale(_read_rgb(base / n), None, source_mpp / mpp)
        out.append(ClsItem(n, "lc25000", "Patch-LC25000", list(classes).index(by[n]["label"]), img))
    return out


def load_kather2016(root: Path, *, mpp: float, source_mpp: float, names: Sequence[str] | None = None, exclude: Sequence[str] = ()) -> list[ClsItem]:
    """Kather-2016-like tiles for ``Patch-Class`` (label index in the set's class order)."""
    base = root / "tissue" / "kather2016_like_100"
    by = {r["file"]: r for r in _csv(base / "labels.csv")}
    out = []
    for n in _select(sorted(by), names, exclude):
        img, _ = _rescale(_read_rgb(base / n), None, source_mpp / mpp)
        out.append(ClsItem(n, "kather2016", "Patch-Class", int(by[n]["label_index"]), img))
    return out


@dataclass
class Sources:
    """Loaded data of one split: segmentation items per task and classification items per task."""

    seg: dict[str, list[SegItem]]
    cls: dict[str, list[ClsItem]]

    def summary(self) -> dict[str, int]:
        """Item counts per task."""
        return {**{k: len(v) for k, v in self.seg.items()}, **{k: len(v) for k, v in self.cls.items()}}


def load_sources(
    root: Path,
    *,
    mpp: float,
    source_mpp: Mapping[str, float],
    split: Mapping[str, Sequence[str]],
    part: str,
    lc_classes: Sequence[str],
    radius_px: float = 4.0,
    background_px: float | None = 10.0,
    tasks: Sequence[str] | None = None,
    lumen: bool = False,
) -> Sources:
    """Load every source for ``part`` = ``"train"`` (everything not in ``split``) or ``"val"`` (only ``split``).

    ``tasks`` limits loading to some of nuclei, nuclei_binary, nuclei_split, nuclei_type, gland,
    lc25000, kather2016 (default: all of them). ``nuclei_split`` (the binary-only MoNuSeg masks cut
    into instances, :func:`split_binary_items`) is a training task only, as is ``nuclei_binary``.
    ``gland_negative`` (tiles without glands, :func:`load_gland_negatives`) is loaded only when
    named in ``tasks``; ``lumen`` adds lumen pseudo-labels to the GlaS items.
    """
    if part not in ("train", "val"):
        raise ValueError(f"part must be 'train' or 'val', got {part!r}")
    if not root.is_dir():
        raise InputError(f"data folder {root} not found (set data_root in the config or $WSIMTL_DATA)")
    want = set(tasks) if tasks is not None else {"nuclei", "nuclei_binary", "nuclei_split", "nuclei_type", "gland", "lc25000", "kather2016"}

    def sel(src: str) -> dict[str, Sequence[str] | None]:
        return {"names": None, "exclude": split.get(src, [])} if part == "train" else {"names": split.get(src, []), "exclude": ()}

    seg: dict[str, list[SegItem]] = {}
    cls: dict[str, list[ClsItem]] = {}
    if "nuclei" in want:
        seg["nuclei"] = load_monuseg(root, mpp=mpp, source_mpp=source_mpp["monuseg"], **sel("monuseg"))
        seg["nuclei"] += load_cpm15(root, mpp=mpp, mpp_20x=source_mpp["cpm15_20x"], mpp_40x=source_mpp["cpm15_40x"], **sel("cpm15"))
    if want & {"nuclei_binary", "nuclei_split"} and part == "train":
        # one read of the binary-mask images serves both tasks
        binary = load_monuseg(root, mpp=mpp, source_mpp=source_mpp["monuseg"], binary_only=True, names=None, exclude=split.get("monuseg", []))
        if "nuclei_binary" in want:
            seg["nuclei_binary"] = binary
        if "nuclei_split" in want:
            seg["nuclei_split"] = split_binary_items(binary)
    if tasks is not None and "nuclei_all" in want:  # MoNuSeg (all 30), CPM-15, CoNSeP (typed), glioma
        from ._nuclei_sources import load_nuclei_sources

        seg["nuclei_all"] = load_nuclei_sources(root, mpp=mpp, source_mpp=source_mpp, sel=sel)
    if "nuclei_type" in want:
        seg["nuclei_type"] = load_crchistophenotypes(root, mpp=mpp, source_mpp=source_mpp["crchistophenotypes"], radius_px=radius_px, background_px=background_px, **sel("crchistophenotypes"))
    if "gland" in want:
        seg["gland"] = load_glas(root, mpp=mpp, source_mpp=source_mpp["glas"], lumen=lumen, **sel("glas"))
    if tasks is not None and "gland_negative" in want:
        seg["gland_negative"] = load_gland_negatives(root, mpp=mpp, source_mpp=source_mpp, split=split, part=part, lc_classes=lc_classes)
    if "lc25000" in want:
        cls["lc25000"] = load_lc25000(root, mpp=mpp, source_mpp=source_mpp["lc25000"], classes=lc_classes, **sel("lc25000"))
    if "kather2016" in want:
        cls["kather2016"] = load_kather2016(root, mpp=mpp, source_mpp=source_mpp["kather2016"], **sel("kather2016"))
    return Sources(seg, cls)


def sample_seg(
    rng: np.random.Generator,
    item: SegItem,
    *,
    crop_px: int,
    scale_range: tuple[float, float],
    nuclei_erosion_px: int,
    gland_erosion_px: int,
    type_background: bool = False,
    lumen_erosion_px: int = 3,
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, int]]:
    """An augmented crop of ``item`` with a target map per segmentation head (IGNORE where unlabelled).

    ``type_background`` also labels the Nuclei-TYPE background of nuclei images (costs the TYPE
    decoder in those batches).

    Returns
    -------
    image : (crop_px, crop_px, 3) uint8
    targets : dict head -> (crop_px, crop_px) uint8
    patch : dict patch head -> class index
    """
    fill = IGNORE if item.kind == "nuclei_type" else 0
    maps = [item.labels] if item.lumen is None else [item.labels, item.lumen]
    img, cropped, valid = random_crop(rng, item.image, maps, size_px=crop_px, scale_range=scale_range, fills=[fill] * len(maps))
    img, *cropped, valid = random_flip_rot(rng, [img, *cropped, valid])
    lab = cropped[0]
    shape = (crop_px, crop_px)
    t = {h: np.full(shape, IGNORE, np.uint8) for h in SEG_HEADS}
    if item.kind == "nuclei":
        t["Nuclei-INST"] = inst_targets(lab, erosion_px=nuclei_erosion_px)
        if type_background:
            t["Nuclei-TYPE"] = background_from_labels(lab)
        if getattr(item, "instance_classes", None) is not None:  # typed instances (CoNSeP): class per nucleus
            t["Nuclei-TYPE"] = item.instance_classes[np.minimum(lab, len(item.instance_classes) - 1)]
    elif item.kind == "nuclei_binary":
        t["Nuclei-INST"] = binary_targets(lab)
        if type_background:
            t["Nuclei-TYPE"] = background_from_labels(lab)
    elif item.kind == "nuclei_type":
        t["Nuclei-TYPE"] = lab.astype(np.uint8)
    elif item.kind == "gland":
        t["Gland-INST"] = inst_targets(lab, erosion_px=gland_erosion_px)
        if item.lumen is not None:
            t["Lumen-INST"] = inst_targets(cropped[1], erosion_px=lumen_erosion_px)
    else:
        raise ValueError(f"unknown item kind {item.kind!r}")
    for v in t.values():
        v[~valid] = IGNORE
    return img, t, dict(item.patch)


def sample_cls(rng: np.random.Generator, item: ClsItem, *, crop_px: int, scale_range: tuple[float, float]) -> np.ndarray:
    """An augmented ``crop_px`` square crop of a classification image (reflected where it is smaller)."""
    img, _, _ = random_crop(rng, item.image, [], size_px=crop_px, scale_range=scale_range)
    (img,) = random_flip_rot(rng, [img])
    return img

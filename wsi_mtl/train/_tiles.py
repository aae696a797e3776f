"""A user's own labelled tiles for `wsimtl evaluate --tiles DIR`.

Layouts (``DIR`` holds one task):

- nuclei or glands: ``images/<name>.<png|jpg|tif>`` and ``labels/<name>.<png|tif>``, an instance
  label map of the same size (0 = background, one integer per object);
- tissue: image files anywhere under ``DIR`` and ``labels.csv`` with columns ``file`` (relative
  to ``DIR``) and ``label`` (a class name of the chosen patch head).

Tiles are resampled from ``mpp`` to the model's resolution; gland scores are computed at the
tiles' own resolution (GlaS protocol), as for the validation split.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import InputError
from ._augment import resize_image, resize_labels
from ._data import ClsItem, SegItem, Sources, _read_rgb

__all__ = ["TILE_TASKS", "load_tiles"]

#: Tasks a tiles folder can hold.
TILE_TASKS: tuple[str, ...] = ("nuclei", "glands", "tissue")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def _read_label_map(path: Path) -> np.ndarray:
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            arr = tifffile.imread(path)
        else:
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read label map {path}: {exc}") from None
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"label map {path} must be a single-channel integer image, got shape {arr.shape} {arr.dtype}")
    return arr.astype(np.int32)


def _by_stem(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    if not folder.is_dir():
        raise InputError(f"tiles folder has no {folder.name}/ subfolder: {folder}")
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in suffixes}


def load_tiles(folder: str | Path, *, task: str, mpp: float, model_mpp: float, head: str | None = None,
               class_names: Sequence[str] = ()) -> tuple[Sources, dict[str, np.ndarray]]:
    """Labelled tiles of ``task`` from ``folder`` at ``model_mpp``.

    Parameters
    ----------
    folder
        See the module docstring for the layout.
    task
        ``"nuclei"``, ``"glands"`` or ``"tissue"``.
    mpp
        Microns per pixel of the tiles.
    model_mpp
        The model's resolution.
    head, class_names
        Tissue only: the patch head scored and its class names (labels.csv names must be among them).

    Returns
    -------
    sources, gland_truth
        Items for :func:`~wsi_mtl.train.evaluate_sources` and, for glands, the label maps at the
        tiles' own resolution by name.
    """
    folder = Path(folder)
    if task not in TILE_TASKS:
        raise InputError(f"unknown tiles task {task!r}; choose one of {list(TILE_TASKS)}")
    if not folder.is_dir():
        raise InputError(f"tiles folder not found: {folder}")
    if not mpp or mpp <= 0:
        raise InputError("the tiles' resolution is unknown: pass --mpp (microns per pixel of the tiles)")
    scale = float(mpp) / float(model_mpp)

    def shape_of(arr: np.ndarray) -> tuple[int, int]:
        return max(1, round(arr.shape[0] * scale)), max(1, round(arr.shape[1] * scale))

    if task == "tissue":
        if head is None:
            raise InputError("tissue tiles need a patch head (--head)")
        table = folder / "labels.csv"
        if not table.is_file():
            raise InputError(f"tissue tiles need {table} with columns file,label")
        with open(table, newline="") as fh:
            rows = list(csv.DictReader(fh))
        if not rows or not {"file", "label"} <= set(rows[0]):
            raise InputError(f"{table} must have the columns file and label")
        items = []
        for r in rows:
            if r["label"] not in class_names:
                raise InputError(f"{table}: label {r['label']!r} of {r['file']} is not a class of {head} ({list(class_names)})")
            img = _read_rgb(folder / r["file"])
            items.append(ClsItem(r["file"], "tiles", head, list(class_names).index(r["label"]), resize_image(img, shape_of(img))))
        return Sources({}, {"tiles": items}), {}

    images = _by_stem(folder / "images", _IMAGE_SUFFIXES)
    labels = _by_stem(folder / "labels", (".png", ".tif", ".tiff"))
    if not images:
        raise InputError(f"no images in {folder / 'images'}")
    missing = sorted(set(images) - set(labels))
    if missing:
        raise InputError(f"no label map in {folder / 'labels'} for {missing[:3]}{'...' if len(missing) > 3 else ''}")
    kind = "nuclei" if task == "nuclei" else "gland"
    seg, truth = [], {}
    for name, path in images.items():
        img = _read_rgb(path)
        lab = _read_label_map(labels[name])
        if lab.shape != img.shape[:2]:
            raise InputError(f"label map of {name} is {lab.shape[1]}x{lab.shape[0]} px but the image is {img.shape[1]}x{img.shape[0]}")
        shape = shape_of(img)
        seg.append(SegItem(name, "tiles", kind, resize_image(img, shape), resize_labels(lab, shape)))
        if kind == "gland":
            truth[name] = lab
    return Sources({kind: seg}, {}), truth

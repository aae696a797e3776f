"""Objects and exports from a finished ``predictions.zarr``, without running the network.

:func:`derive_objects` post-processes the stored maps into objects, writes ``objects.parquet``,
the QuPath GeoJSON files and ``preview.png``, stores the tissue class map in the zarr, and records
counts, files and timings in ``run.json``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_path, output_error, write_json_atomic
from .errors import InputError, WsimtlError
from .objects import ObjectBatch

__all__ = ["derive_objects", "PREVIEW_MAX_PX", "TISSUE_CLASSES"]

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.zarr"
RUN_JSON = "run.json"
TABLE = "objects.parquet"
PREVIEW = "preview.png"
#: name of the tissue class map group written into predictions.zarr
TISSUE_CLASSES = "tissue_classes"
#: longest side of preview.png's picture (without the legend), in px
PREVIEW_MAX_PX = 2048
_OUR_FILES = (TABLE, PREVIEW, f"{PREDICTIONS}/{TISSUE_CLASSES}")


class _Timed:
    """Wrap an iterator and add up the seconds spent producing its items."""

    def __init__(self, items: Iterable[ObjectBatch]):
        self._it = iter(items)
        self.seconds = 0.0

    def __iter__(self) -> Iterator[ObjectBatch]:
        return self

    def __next__(self) -> ObjectBatch:
        t0 = time.perf_counter()
        try:
            return next(self._it)
        finally:
            self.seconds += time.perf_counter() - t0


def _check_result_dir(result_dir: Path) -> Path:
    """Return the path of a complete predictions.zarr, or raise InputError naming what is missing."""
    if not result_dir.is_dir():
        raise InputError(f"result folder not found: {result_dir}")
    predictions = result_dir / PREDICTIONS
    if not (predictions / "zarr.json").is_file():
        if (result_dir / f"{PREDICTIONS}.partial").exists():
            raise InputError(
                f"predictions in {result_dir} are incomplete ({PREDICTIONS}.partial): run `wsimtl segment` again to finish them"
            )
        raise InputError(f"no {PREDICTIONS} in {result_dir}: run `wsimtl segment` first")
    return predictions


def _read_attrs(predictions: Path) -> dict[str, Any]:
    """The root ``wsimtl`` attributes of predictions.zarr (InputError where absent)."""
    import zarr

    try:
        root = zarr.open_group(predictions, mode="r")
        attrs = dict(root.attrs.get("wsimtl") or {})
    except Exception as exc:  # zarr raises several unrelated types for a damaged store
        raise InputError(f"cannot read {predictions}: {exc}") from exc
    if not attrs:
        raise InputError(f"{predictions} has no 'wsimtl' attributes: not a wsimtl predictions store")
    return attrs


def _read_run(result_dir: Path) -> dict[str, Any]:
    """run.json as a dict; an empty dict (with a warning) where absent or unreadable."""
    import json

    path = result_dir / RUN_JSON
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        log.warning("no %s in %s: starting a new one", RUN_JSON, result_dir)
    except (OSError, ValueError) as exc:
        log.warning("unreadable %s (%s): starting a new one", path, exc)
    return {}


def _slide_geometry(attrs: dict[str, Any], run: dict[str, Any], predictions: Path) -> tuple[float, int, int]:
    """(mpp, width, height) of the slide at level 0, from the zarr attributes or run.json."""
    slide = {**(run.get("slide") or {}), **(attrs.get("slide") or {})}
    mpp = slide.get("mpp")
    if not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
        raise InputError(f"{predictions} records no slide mpp (attributes wsimtl.slide.mpp)")
    width, height = slide.get("width"), slide.get("height")
    if not (width and height):
        raise InputError(f"{predictions} records no slide size (attributes wsimtl.slide.width/height)")
    return float(mpp), int(width), int(height)


def _thumbnail(
    predictions: Path,
    attrs: dict[str, Any],
    run: dict[str, Any],
    slide: Any,
    *,
    mpp: float,
    width: int,
    height: int,
) -> tuple[np.ndarray, float]:
    """A picture of the slide for the preview and its downsample (level-0 px per picture px).

    From ``slide`` when given, else from the slide file recorded in run.json when it still
    exists, else the tissue mask stored in predictions.zarr (tissue pink on white).
    """
    downsample = max(1.0, max(width, height) / PREVIEW_MAX_PX)
    if slide is None:
        path = (run.get("slide") or {}).get("path") or (attrs.get("slide") or {}).get("path")
        if path and Path(path).is_file():
            from .slide import open_slide

            try:
                opened = open_slide(path, mpp=mpp)
            except WsimtlError as exc:
                log.warning("cannot reopen slide %s for the preview (%s): drawing on the tissue mask", path, exc)
            else:
                try:
                    return np.asarray(opened.thumbnail(mpp=mpp * downsample)), downsample
                except WsimtlError as exc:
                    log.warning("cannot read a thumbnail of %s (%s): drawing on the tissue mask", path, exc)
                finally:
                    opened.close()
    else:
        return np.asarray(slide.thumbnail(mpp=float(slide.mpp) * downsample)), downsample
    return _mask_picture(predictions, width=width, height=height, downsample=downsample), downsample


def _mask_picture(predictions: Path, *, width: int, height: int, downsample: float) -> np.ndarray:
    """The stored tissue mask drawn as pale pink tissue on white at ``downsample``."""
    from PIL import Image

    out_w, out_h = max(1, round(width / downsample)), max(1, round(height / downsample))
    picture = np.full((out_h, out_w, 3), 255, dtype=np.uint8)
    try:
        import zarr

        mask = np.asarray(zarr.open_array(predictions / "tissue_mask" / "0", mode="r")[0]) > 0
    except Exception as exc:  # no mask stored (tissue masking off, or an older store)
        log.info("no tissue mask in %s (%s): preview on white", predictions, exc)
        return picture
    # mask px -> level-0 px: the mask covers at least the slide; crop what lies beyond it
    mask_ds = max(width / mask.shape[1], height / mask.shape[0])
    crop = mask[: math.ceil(height / mask_ds), : math.ceil(width / mask_ds)]
    scaled = np.asarray(Image.fromarray(crop.astype(np.uint8) * 255).resize((out_w, out_h), Image.NEAREST)) > 0
    picture[scaled] = (240, 214, 226)
    return picture


def _store_tissue_map(predictions: Path, attrs: dict[str, Any]) -> str | None:
    """Write the most probable tissue class per Patch-Class cell into ``predictions.zarr``.

    The map is an OME image group ``tissue_classes`` (int16 (1, Y, X), -1 where nothing was
    computed) on the Patch-Class grid; written under a temporary name and renamed into place.
    Returns the group name, or None when the store has no patch-classification head.
    """
    import zarr

    from .postprocess import tissue_class_map
    from .store import ome_image_attrs

    heads = attrs.get("heads") or {}
    patch = [name for name, head in heads.items() if head.get("kind") == "patch"]
    if not patch or not (predictions / patch[0] / "0").exists():
        return None
    name = patch[0]
    source = zarr.open_array(predictions / name / "0", mode="r")
    cell = float(heads[name].get("cell_px", 1))
    downsample = float(attrs.get("downsample", 1.0)) * cell
    final = predictions / TISSUE_CLASSES
    band = int(source.chunks[1])
    with atomic_path(final, fsync=False) as tmp:
        group = zarr.open_group(tmp, mode="w", zarr_format=3, attributes=ome_image_attrs(TISSUE_CLASSES, downsample=downsample))
        group.attrs.update({"wsimtl": {"source": name, "classes": list(heads[name].get("classes", [])), "no_class": -1}})
        target = group.create_array(
            "0", shape=(1, *source.shape[1:]), chunks=(1, *source.chunks[1:]), dtype="int16", fill_value=-1,
            dimension_names=("c", "y", "x"),
        )
        for y0 in range(0, source.shape[1], band):
            target[0, y0 : y0 + band] = tissue_class_map(np.asarray(source[:, y0 : y0 + band]))
        if final.exists():  # an earlier export: replace it (os.replace cannot overwrite a folder)
            shutil.rmtree(final)
    return TISSUE_CLASSES


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _is_ours(entry_path: str) -> bool:
    """Files this module writes (and rewrites): their old run.json entries are replaced."""
    return entry_path in _OUR_FILES or entry_path.endswith((".geojson", ".geojson.gz"))


def derive_objects(
    result_dir: str | os.PathLike[str],
    *,
    workers: int = 1,
    geojson_gz: bool = False,
    slide: Any = None,
    progress: bool = False,
    tasks: Iterable[str] | None = None,
    tissue_map: bool = True,
    postprocess: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Post-process a finished ``predictions.zarr`` into objects and write every export.

    Writes ``objects.parquet``, ``objects.geojson`` plus ``nuclei``/``glands``/``tissue``
    ``.geojson`` (``.geojson.gz`` with ``geojson_gz``), ``preview.png`` and (``tissue_map``)
    ``predictions.zarr/tissue_classes``, then updates ``run.json``: ``objects``
    (``{task: {class_name: count}}``), ``files`` (relative paths with bytes) and
    ``timings_s.objects`` / ``timings_s.export``, and ``postprocess`` (the settings used and the
    user's overrides). Every file is written atomically.

    Parameters
    ----------
    result_dir : path-like
        A slide's result folder holding ``predictions.zarr`` (and normally ``run.json``).
    workers : int, default 1
        Processes for post-processing and for formatting GeoJSON.
    geojson_gz : bool, default False
        Gzip the GeoJSON files.
    slide : Slide, optional
        The open slide, for the preview thumbnail. By default the slide recorded in run.json is
        reopened if it still exists; otherwise the preview is drawn on the stored tissue mask.
    progress : bool, default False
        Show a progress bar over post-processed chunks.
    tasks : iterable of str, optional
        Tasks to extract (all by default).
    tissue_map : bool, default True
        Store the tissue class map in predictions.zarr.
    postprocess : mapping, optional
        Post-processing settings (:class:`~wsi_mtl.postprocess.PostprocessParams` field -> number)
        that replace the model's tuned ones recorded in the store, e.g. ``{"nuclei_split_h": 0}``;
        unknown names and bad values are an :class:`~wsi_mtl.errors.InputError`.

    Returns
    -------
    dict
        ``objects`` (counts), ``rows``, ``files`` (the entries added to run.json) and
        ``timings_s`` (``objects``, ``export``).

    Raises
    ------
    InputError
        The folder, ``predictions.zarr`` or its attributes are missing, or the store is
        incomplete (``predictions.zarr.partial``).
    OutputError
        The disk is full or the folder is not writable.
    """
    if workers < 1:
        raise InputError(f"workers must be at least 1, got {workers}")
    result_dir = Path(result_dir)
    predictions = _check_result_dir(result_dir)
    attrs = _read_attrs(predictions)
    run = _read_run(result_dir)
    mpp, width, height = _slide_geometry(attrs, run, predictions)
    from .export import write_geojson_files, write_preview, write_table
    from .postprocess import PostprocessParams, check_overrides, extract_objects

    overrides = check_overrides(postprocess)
    params = replace(PostprocessParams.from_mapping(attrs.get("postprocess")), **overrides)
    t_start = time.perf_counter()
    kwargs: dict[str, Any] = {"workers": workers, "params": params}
    if tasks is not None:
        kwargs["tasks"] = tuple(tasks)
    batches = _Timed(extract_objects(predictions, **kwargs))
    stream: Iterable[ObjectBatch] = batches
    if progress:
        from tqdm import tqdm

        stream = tqdm(batches, desc="objects", unit="chunk", leave=False)
    table = write_table(stream, result_dir / TABLE, mpp=mpp)
    objects_s = batches.seconds
    export_s = time.perf_counter() - t_start - objects_s

    t0 = time.perf_counter()
    written = [result_dir / TABLE, *write_geojson_files(result_dir / TABLE, result_dir, gz=geojson_gz, workers=workers)]
    thumb, downsample = _thumbnail(predictions, attrs, run, slide, mpp=mpp, width=width, height=height)
    write_preview(thumb, result_dir / TABLE, result_dir / PREVIEW, downsample=downsample)
    written.append(result_dir / PREVIEW)
    export_s += time.perf_counter() - t0

    if tissue_map:
        t0 = time.perf_counter()
        try:
            if _store_tissue_map(predictions, attrs):
                written.append(predictions / TISSUE_CLASSES)
        except OSError as exc:
            raise output_error(exc, predictions / TISSUE_CLASSES) or exc
        objects_s += time.perf_counter() - t0

    entries = [{"path": p.relative_to(result_dir).as_posix(), "bytes": _size(p)} for p in written]
    new_paths = {e["path"] for e in entries}
    files = [f for f in run.get("files", []) if f.get("path") not in new_paths and not _is_ours(str(f.get("path")))]
    for f in files:
        if f.get("path") == PREDICTIONS and (result_dir / PREDICTIONS).exists():
            f["bytes"] = _size(result_dir / PREDICTIONS)
    timings = {"objects": round(objects_s, 3), "export": round(export_s, 3)}
    run["objects"] = table.counts
    run["postprocess"] = {"settings": asdict(params), "overrides": overrides}
    from .postprocess._pool import pool_kind  # processes, or threads in a daemonic Dask worker

    run.setdefault("parameters", {})["postprocess_pool"] = pool_kind(workers)
    run["files"] = files + entries
    run.setdefault("timings_s", {}).update(timings)
    write_json_atomic(result_dir / RUN_JSON, run)
    log.info("derived %d objects in %s (objects %.1f s, export %.1f s)", table.rows, result_dir, objects_s, export_s)
    return {"objects": table.counts, "rows": table.rows, "files": entries, "timings_s": timings}

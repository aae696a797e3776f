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
import threading
import time
from collections.abc import Collection, Iterable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_path, output_error
from .errors import InputError, WsimtlError
from .malloc import limit_arenas, pages_kept, release_freed_pages, small_numpy_pages
from .objects import ObjectBatch
from .results import GEOJSON_SUFFIXES, PREDICTIONS, PREVIEW, RUN_JSON, TABLE, file_entry, read_run, write_run

__all__ = ["derive_objects", "derive_into", "PREVIEW_MAX_PX", "TISSUE_CLASSES"]

log = logging.getLogger(__name__)

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


def _recovered_run(result_dir: Path, attrs: dict[str, Any]) -> dict[str, Any]:
    """A new run.json for maps whose own run.json is missing or unreadable: status ``incomplete``.

    The maps are there but the record of how they were made is not, so the result must not count
    as complete (``wsimtl segment`` will check the maps again); objects can still be exported.
    """
    log.warning("no readable %s in %s: writing a new one marked incomplete", RUN_JSON, result_dir)
    return {
        "status": "incomplete",
        "note": f"{RUN_JSON} was missing or unreadable; rebuilt from {PREDICTIONS} by an export",
        "slide": dict(attrs.get("slide") or {}),
        "model": dict(attrs.get("model") or {}),
        "files": [file_entry(result_dir, result_dir / PREDICTIONS)],
    }


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


def _store_tissue_map(predictions: Path, attrs: dict[str, Any], table: Path, tasks: Collection[str] | None = None) -> list[Path]:
    """The NGFF label images (tissue classes, nuclei, glands, lumen; ``tasks``: only these)
    rasterised from ``table``.

    See :func:`wsi_mtl.export.write_label_images`; returns the label groups written.
    """
    from .export import write_label_images

    return write_label_images(predictions, table, attrs, tasks=tasks)


#: the order in which the background process takes the label images: the nuclei image first (on the
#: 16,384^2 mosaic it costs about as much as the GeoJSON and the preview together: nuclei 1.3 CPU s,
#: glands 0.44, lumen 0.36, tissue 0.08), then the others, largest first, as long as this process
#: has not taken them (:class:`_LabelImages`)
_BACKGROUND_ORDER = ("nuclei", "gland", "lumen", "tissue")


class _LabelImages:
    """:func:`_store_tissue_map`, one label image at a time, from one queue in
    :data:`_BACKGROUND_ORDER` (largest first): with ``background``, a background process (threads
    in a daemonic process) takes the front of the queue, the next once one is done; :meth:`result`
    (this process, after the GeoJSON and the preview) takes the back, one image at a time, and
    first hands the front to the background process if that one is idle (its call-back may not have
    run yet), so that both end at about the same time whatever the slide holds. Without
    ``background`` all of them are written here. A full disk is reported as for any output."""

    def __init__(self, predictions: Path, attrs: dict[str, Any], table: Path, *, background: bool) -> None:
        self.args, self.pool = (predictions, attrs, table), None
        self._lock = threading.RLock()  # a future done before add_done_callback calls back at once
        self._queue: list[str] = list(_BACKGROUND_ORDER)  # not yet begun by either process
        self._sent: list[tuple[str, Future]] = []
        self._refused = False  # the pool refused a task: it is given no more
        if background:
            from .postprocess._pool import single_executor

            try:
                self.pool = single_executor("labels")
                with self._lock:
                    self._send()
            except (OSError, RuntimeError) as exc:  # no process to be had: written here, in turn
                log.warning("label images written after the exports (%s)", exc)
                self.close()
                self.pool = None

    def _idle(self) -> bool:
        """The background process has finished all it was sent and none of it failed (lock held)."""
        return all(f.done() and not f.cancelled() and f.exception() is None for _, f in self._sent)

    def _send(self) -> None:
        """The front of the queue to the background process, where it is idle (lock held): it
        holds one image at a time, and one that failed or refused a task is given nothing more."""
        if self.pool is None or self._refused or not self._queue or not self._idle():
            return
        task = self._queue[0]
        try:
            future = self.pool.submit(_store_tissue_map, *self.args, (task,))
        except RuntimeError:  # BrokenProcessPool, or shut down: the queue is written here
            self._refused = True
            return
        self._queue.pop(0)
        self._sent.append((task, future))
        future.add_done_callback(self._next)

    def _next(self, future: Future) -> None:
        with self._lock:
            self._send()  # nothing after a failed image: result() writes the rest here

    def _take_here(self) -> str | None:
        """The back of the queue for this process, after handing the front to an idle background
        process; None once the queue is empty."""
        with self._lock:
            self._send()
            return self._queue.pop() if self._queue else None

    def result(self) -> list[Path]:
        """Every label image: those not yet begun written here (the smallest first), then the
        background process's."""
        try:
            written: list[Path] = []
            here: list[str] = []
            while (task := self._take_here()) is not None:
                here.append(task)
                written.extend(_store_tissue_map(*self.args, (task,)))
            log.debug("label images here: %s; in the background: %s", ", ".join(here) or "none",
                      ", ".join(task for task, _ in self._sent) or "none")
            for task, future in list(self._sent):
                written.extend(self._background(task, future))
            return sorted(written, key=_label_order)
        except OSError as exc:
            raise output_error(exc, self.args[0] / TISSUE_CLASSES) or exc

    def _background(self, task: str, future: Future) -> list[Path]:
        """A label image of the background process; written here where that process died."""
        from concurrent.futures.process import BrokenProcessPool

        try:
            return future.result()
        except BrokenProcessPool:
            log.warning("the process writing the %s label image died (killed by the system, out of memory?): "
                        "it is written here", task)
            return _store_tissue_map(*self.args, (task,))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _label_order(path: Path) -> int:
    """Position of a written label group in :data:`~wsi_mtl.export.LABEL_IMAGES` order."""
    from .export import LABEL_IMAGES

    names = [name for _, name, _ in LABEL_IMAGES.values()]
    return names.index(path.name) if path.name in names else len(names)


def _is_ours(entry_path: str) -> bool:
    """Files this module writes (and rewrites): their old run.json entries are replaced."""
    return entry_path in _OUR_FILES or entry_path.endswith(GEOJSON_SUFFIXES) or "/labels/" in entry_path


def _geojson_names() -> set[str]:
    """Every GeoJSON file name an export can write (plain and gzipped)."""
    from .export import GEOJSON_FILES

    return {f"{stem}{suffix}" for stem in ("objects", *GEOJSON_FILES) for suffix in GEOJSON_SUFFIXES}


def _gzip_copy(path: Path) -> Path:
    """Write ``path.gz``, a gzipped copy of ``path`` (atomically); return its path."""
    import gzip

    final = path.with_name(path.name + ".gz")
    with atomic_path(final) as tmp, open(path, "rb") as src, open(tmp, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return final


def remove_stale(result_dir: Path, old_files: list[str], written: set[str]) -> list[str]:
    """Remove our GeoJSON files that this export did not write (an earlier export's); return their names."""
    candidates = {p for p in old_files if p.endswith(GEOJSON_SUFFIXES)} | _geojson_names()
    removed = []
    for name in sorted(candidates - written):
        path = result_dir / name
        if path.is_file():
            path.unlink()
            removed.append(name)
    if removed:
        log.info("removed GeoJSON files of an earlier export: %s", ", ".join(removed))
    return removed


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
    ``.geojson`` (and gzipped ``.geojson.gz`` copies with ``geojson_gz``), ``preview.png`` and
    (``tissue_map``) ``predictions.zarr/tissue_classes``, removes GeoJSON files of an earlier
    export that this one did not write, then updates ``run.json``: ``objects``
    (``{task: {class_name: count}}``), ``files`` (relative paths with bytes: exactly what the
    folder holds), ``timings_s.objects`` / ``timings_s.export``, and ``postprocess`` (the settings
    used and the user's overrides). Every file is written atomically. A missing or unreadable
    run.json is replaced by a new one with status ``incomplete``.

    Parameters
    ----------
    result_dir : path-like
        A slide's result folder holding ``predictions.zarr`` (and normally ``run.json``).
    workers : int, default 1
        Processes for post-processing and for formatting GeoJSON.
    geojson_gz : bool, default False
        Also write gzipped copies of the GeoJSON files.
    slide : Slide, optional
        The open slide, for the preview thumbnail. By default the slide recorded in run.json is
        reopened if it still exists; otherwise the preview is drawn on the stored tissue mask.
    progress : bool, default False
        Show a progress bar over post-processed chunks.
    tasks : iterable of str, optional
        Tasks to extract (all by default).
    tissue_map : bool, default True
        Store the NGFF label images (tissue classes, nuclei, glands, lumen) in predictions.zarr.
    postprocess : mapping, optional
        Post-processing settings (:class:`~wsi_mtl.postprocess.PostprocessParams` field -> number)
        that replace the model's tuned ones recorded in the store, e.g. ``{"nuclei_split_h": 0}``;
        unknown names and bad values are an :class:`~wsi_mtl.errors.InputError`.

    Returns
    -------
    dict
        ``objects`` (counts), ``rows``, ``files`` (the entries added to run.json),
        ``removed`` (stale GeoJSON files deleted) and ``timings_s`` (``objects``, ``export``).

    Raises
    ------
    InputError
        The folder, ``predictions.zarr`` or its attributes are missing, or the store is
        incomplete (``predictions.zarr.partial``).
    OutputError
        The disk is full or the folder is not writable.
    """
    result_dir = Path(result_dir)
    run = read_run(result_dir) if result_dir.is_dir() else None
    if run is None and result_dir.is_dir() and (result_dir / PREDICTIONS / "zarr.json").is_file():
        run = _recovered_run(result_dir, _read_attrs(result_dir / PREDICTIONS))
    # the memory settings of segment's processes (wsi_mtl.malloc): chunks extracted here (1 worker)
    # reuse the pages earlier ones freed, given back after; on the 16,384^2 px mosaic's maps
    # `wsimtl export` took 20.9-23.8 CPU s against 27.8-30.8 without any of these
    limit_arenas()
    small_numpy_pages()
    with pages_kept():
        summary = derive_into(result_dir, run if run is not None else {}, workers=workers, geojson_gz=geojson_gz, slide=slide,
                              progress=progress, tasks=tasks, tissue_map=tissue_map, postprocess=postprocess)
    write_run(result_dir, summary.pop("run"))
    summary["removed"] = remove_stale(result_dir, summary.pop("old_files"), {e["path"] for e in summary["files"]})
    return summary


def derive_into(
    result_dir: Path,
    run: dict[str, Any],
    *,
    workers: int = 1,
    geojson_gz: bool = False,
    slide: Any = None,
    progress: bool = False,
    tasks: Iterable[str] | None = None,
    tissue_map: bool = True,
    postprocess: Mapping[str, Any] | None = None,
    extracted: Iterable[ObjectBatch] | None = None,
) -> dict[str, Any]:
    """:func:`derive_objects` into the run record ``run`` (updated in place, not written).

    ``extracted``: the objects already being extracted with the same settings (an
    :class:`~wsi_mtl.postprocess.ObjectStream`, e.g. overlapped with inference by the pipeline)
    instead of extracting them here.

    For callers that hold run.json in memory and write it once (the pipeline). Returns the
    summary of :func:`derive_objects` plus ``run`` and ``old_files`` (the paths ``run`` listed
    before, for :func:`remove_stale` once the caller has written run.json).
    """
    if workers < 1:
        raise InputError(f"workers must be at least 1, got {workers}")
    predictions = _check_result_dir(result_dir)
    attrs = _read_attrs(predictions)
    mpp, width, height = _slide_geometry(attrs, run, predictions)
    from .export import write_geojson_files, write_preview, write_table
    from .postprocess import check_overrides, extract_objects, params_of
    from .store import read_mask

    overrides = check_overrides(postprocess)
    params = params_of(attrs.get("postprocess"), overrides)
    t_start = time.perf_counter()
    kwargs: dict[str, Any] = {"workers": workers, "params": params}
    if tasks is not None:
        kwargs["tasks"] = tuple(tasks)
    if (run.get("parameters") or {}).get("tissue_mask") is False:
        kwargs["tissue_mask"] = False  # run with --no-tissue-mask: objects are not filtered by the mask
    if extracted is None:
        extracted = extract_objects(predictions, **kwargs)
    batches = _Timed(extracted)
    stream: Iterable[ObjectBatch] = batches
    if progress:
        from tqdm import tqdm

        stream = tqdm(batches, desc="objects", unit="chunk", leave=False)
    table = write_table(stream, result_dir / TABLE, mpp=mpp)
    objects_s = batches.seconds
    export_s = time.perf_counter() - t_start - objects_s

    # the pages the objects' assembly and the map pyramids freed go back before the exports start
    # their processes (segment's process keeps them for the network's next tile, wsi_mtl.malloc)
    release_freed_pages()
    # the label images are rasterised beside the GeoJSON and the preview where workers allow
    labels = _LabelImages(predictions, attrs, result_dir / TABLE, background=workers > 1) if tissue_map else None
    # that process takes one of the workers: the GeoJSON's formatting processes get the others (on 2
    # cores none: formatted here, ~0.4 GB less at once for a 16,384^2 px map at 0.5 um/px)
    geojson_workers = workers - 1 if labels is not None and labels.pool is not None else workers  # that pool: workers > 1
    try:
        t0 = time.perf_counter()
        geojson = list(write_geojson_files(result_dir / TABLE, result_dir, workers=geojson_workers))
        written = [result_dir / TABLE, *geojson, *([_gzip_copy(p) for p in geojson] if geojson_gz else [])]
        thumb, downsample = _thumbnail(predictions, attrs, run, slide, mpp=mpp, width=width, height=height)
        write_preview(thumb, result_dir / TABLE, result_dir / PREVIEW, downsample=downsample, tissue_mask=read_mask(predictions))
        written.append(result_dir / PREVIEW)
        export_s += time.perf_counter() - t0
        if labels is not None:
            t0 = time.perf_counter()
            written.extend(labels.result())
            objects_s += time.perf_counter() - t0  # the time it added beyond the exports
    finally:
        if labels is not None:
            labels.close()

    entries = [file_entry(result_dir, p) for p in written]
    new_paths = {e["path"] for e in entries}
    old_files = [str(f.get("path")) for f in run.get("files", [])]
    files = [f for f in run.get("files", []) if f.get("path") not in new_paths and not _is_ours(str(f.get("path")))]
    for f in files:
        if f.get("path") == PREDICTIONS and (result_dir / PREDICTIONS).exists():
            f.update(file_entry(result_dir, result_dir / PREDICTIONS))
    timings = {"objects": round(objects_s, 3), "export": round(export_s, 3)}
    run["objects"] = table.counts
    run["postprocess"] = {"settings": asdict(params), "overrides": overrides}
    # problems that did not stop extraction (e.g. truncated objects), already logged one line each
    kept = [w for w in run.get("warnings", []) if not str(w).startswith("objects: ")]
    run["warnings"] = kept + [f"objects: {w}" for w in getattr(extracted, "warnings", [])]
    from .postprocess._pool import pool_kind  # processes, or threads in a daemonic Dask worker

    run.setdefault("parameters", {})["postprocess_pool"] = pool_kind(workers)
    from .summary import summary_or_warning  # tissue area, composition, nuclei density, glands (wsi_mtl.summary)

    run["summary"] = summary_or_warning(result_dir, run)
    run["files"] = files + entries
    run.setdefault("timings_s", {}).update(timings)
    log.info("derived %d objects in %s (objects %.1f s, export %.1f s)", table.rows, result_dir, objects_s, export_s)
    return {"objects": table.counts, "rows": table.rows, "files": entries, "timings_s": timings, "run": run, "old_files": old_files}

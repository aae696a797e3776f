"""GeoJSON for QuPath, streamed from the object table.

Each object becomes one feature::

    {"type": "Feature", "id": "<uuid>", "geometry": {...},
     "properties": {"objectType": "detection" | "annotation",
                    "classification": {"name": "...", "color": [r, g, b]},
                    "isLocked": false,  (annotations only)
                    "measurements": {"probability": 0.93, "area_um2": 41.2, ...}}}

Nuclei are ``detection`` objects: QuPath's ``cell`` type expects a cell boundary with a
``nucleusGeometry`` inside it, which we do not predict, and detections are what QuPath draws and
measures quickly by the hundred thousand. Glands, lumen and tissue regions are ``annotation``
objects, which QuPath lets a pathologist edit. No property is ever named ``type`` (QuPath would
read it as the object type) and ``objectType`` only appears inside ``properties``.

Coordinates are (x, y) level-0 px rounded to 2 decimals; where rounding would make a polygon
invalid the unrounded coordinates are kept. The document is written in record batches and never
held in memory as a whole. Per batch, orjson writes all coordinates and measurements at once and
each feature is a slice of that text put into a cached %-template (``shapely.to_geojson`` for
holes and multipolygons); without orjson every geometry goes through ``shapely.to_geojson``.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import zlib
from concurrent.futures import ProcessPoolExecutor
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np
import shapely

try:  # a dependency; without it every geometry goes through shapely.to_geojson (slower, same output)
    import orjson
except ImportError:  # pragma: no cover - depends on the environment
    orjson = None

from ..atomic import atomic_path
from ..objects import TASKS
from ._arrow import numpy_of
from ._table import class_groups, iter_table, read_table_info

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["write_geojson", "write_geojson_files", "MEASUREMENTS", "GEOJSON_FILES", "object_type"]

log = logging.getLogger(__name__)

#: table column -> QuPath measurement name (plain ASCII; units in the name)
MEASUREMENTS: dict[str, str] = {
    "probability": "probability",
    "nucleus_probability": "nucleus_probability",
    "area_um2": "area_um2",
    "perimeter_um": "perimeter_um",
    "solidity": "solidity",
    "eccentricity": "eccentricity",
    "truncated": "truncated",  # 1 = cut at the halo edge, 0 = whole
}

#: per-task GeoJSON files written beside ``objects.geojson``: file stem -> tasks
GEOJSON_FILES: dict[str, tuple[str, ...]] = {
    "nuclei": ("nuclei",),
    "glands": ("gland", "lumen"),
    "tissue": ("tissue",),
}

_HEADER = b'{"type":"FeatureCollection","features":[\n'
_FOOTER = b"\n]}\n"
_COLUMNS = ["id", "task", "class_name", "geometry", *MEASUREMENTS]

#: a palette for classes whose colour the table does not record
_FALLBACK_COLORS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230), (128, 128, 0)]


def object_type(task: str) -> str:
    """The QuPath ``objectType`` of a task: ``detection`` for nuclei, else ``annotation``."""
    return "detection" if task == "nuclei" else "annotation"


def _validate_tasks(tasks: Iterable[str] | None) -> frozenset[str]:
    """Normalise a task selection (``None`` = all) and reject unknown names."""
    if tasks is None:
        return frozenset(TASKS)
    if isinstance(tasks, str):
        tasks = [tasks]
    chosen = frozenset(tasks)
    unknown = sorted(chosen - set(TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {list(TASKS)}")
    return chosen


def _rounded(geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates rounded to 0.01 px, and whether each rounded geometry is valid."""
    rounded = shapely.transform(geoms, lambda c: np.round(c, 2))
    return rounded, shapely.is_valid(rounded)


def _round_geometry(geoms: np.ndarray) -> np.ndarray:
    """Round coordinates to 0.01 px, keeping the unrounded geometry wherever rounding breaks validity."""
    rounded, valid = _rounded(geoms)
    if not valid.all():
        rounded[~valid] = geoms[~valid]
    return rounded


#: format coordinates (of single-ring polygons) and measurements with orjson, a batch at a time; the
#: reference path (``shapely.to_geojson`` of the rounded geometry, ``%.12g``) stays for holes,
#: multipolygons and rows whose rounding breaks validity, and for every row when this is off or
#: orjson is not installed; both give the same bytes
_USE_ORJSON = True


def _point_text(rounded_xy: np.ndarray) -> tuple[str, np.ndarray, np.ndarray]:
    """JSON text ``[x,y],[x,y],...`` of (n, 2) coordinates, and each point's start and end offset in it."""
    buf = orjson.dumps(np.ascontiguousarray(rounded_xy, dtype=np.float64), option=orjson.OPT_SERIALIZE_NUMPY)
    starts = np.flatnonzero(np.frombuffer(buf, dtype=np.uint8) == ord("["))[1:]  # the first '[' opens the list
    ends = np.empty_like(starts)
    ends[:-1] = starts[1:] - 1  # the ',' between two points
    ends[-1:] = len(buf) - 1  # the closing ']' of the list
    return buf.decode("ascii"), starts, ends


def _geometry_texts(geoms: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The GeoJSON of each geometry, coordinates rounded as :func:`_round_geometry` does.

    Returns the texts and a mask of the single-ring polygons, whose text is only the ring's
    points (``[x,y],...``; the template adds ``{"type":"Polygon","coordinates":[[`` and ``]]}``);
    every other text is a whole geometry object.
    """
    coords = shapely.get_coordinates(geoms)
    if orjson is None or not _USE_ORJSON or not len(coords):
        return shapely.to_geojson(_round_geometry(geoms)).tolist(), np.zeros(len(geoms), dtype=bool)
    rounded_xy = np.round(coords, 2)
    counts = shapely.get_num_coordinates(geoms)
    last = np.cumsum(counts)
    first = last - counts
    # rounding can only break the validity of a geometry whose coordinates it moved (traced outlines
    # sit on half pixels: most are untouched), so only those are rounded and checked
    moved = np.flatnonzero(np.add.reduceat((rounded_xy != coords).any(axis=1), first) > 0)
    rounded, valid = geoms, np.ones(len(geoms), dtype=bool)
    if len(moved):
        rounded = geoms.copy()
        rounded[moved], valid[moved] = _rounded(geoms[moved])
    simple = valid & (shapely.get_type_id(geoms) == 3) & (shapely.get_num_interior_rings(geoms) == 0)
    text, starts, ends = _point_text(rounded_xy)
    begin, stop = starts[np.minimum(first, len(starts) - 1)].tolist(), ends[last - 1].tolist()
    texts = [text[a:b] for a, b in zip(begin, stop)]
    for i in np.flatnonzero(~simple).tolist():
        texts[i] = shapely.to_geojson(rounded[i] if valid[i] else geoms[i])
    return texts, simple


def _number_texts(values: np.ndarray) -> list[str]:
    """``"%.12g" % v`` of each value (rounded to 4 decimals), formatted a column at a time with orjson.

    orjson writes the shortest text that reads back as the value, which is what ``%.12g`` writes
    for non-integers under 1e8 with 4 decimals; integers go through orjson as int64, and the rest
    (-0, large numbers) through ``%``. Non-finite values get ``""`` (the templates omit them).
    """
    finite = np.isfinite(values)
    if orjson is None or not _USE_ORJSON:
        return ["%.12g" % v if ok else "" for v, ok in zip(values.tolist(), finite.tolist())]
    clean = np.where(finite, values, 0.0)
    whole = clean == np.round(clean)
    odd = finite & ((np.abs(clean) >= np.where(whole, 1e12, 1e8)) | ((clean == 0) & np.signbit(clean)))
    texts = np.array(_orjson_items(clean), dtype=object)
    if whole.any():
        texts[whole] = np.array(_orjson_items(np.where(whole & ~odd, clean, 0.0).astype(np.int64)), dtype=object)[whole]
    texts[~finite] = ""
    out = texts.tolist()
    for i in np.flatnonzero(odd).tolist():
        out[i] = "%.12g" % float(values[i])
    return out


def _orjson_items(array: np.ndarray) -> list[str]:
    """The JSON text of each item of a 1-d numpy array."""
    return orjson.dumps(array, option=orjson.OPT_SERIALIZE_NUMPY)[1:-1].decode("ascii").split(",")


_UUID_RE = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"


class _Templates:
    """%-format templates of whole features, one per (task, class, which measurements are NaN, ring only).

    A template takes ``(id, geometry_json, *measurement_texts)``; a NaN measurement is consumed by a
    ``%.0s`` that prints nothing, so every row formats with one ``%`` whatever its NaNs. With
    ``ring only`` the geometry argument is the points of a single-ring polygon and the template
    writes the Polygon object around them.
    """

    def __init__(self, colors: dict[tuple[str, str], tuple[int, int, int]]):
        self._colors = dict(colors)
        self._cache: dict[tuple[str, str, int, bool], str] = {}

    def _color(self, task: str, class_name: str) -> tuple[int, int, int]:
        color = self._colors.get((task, class_name))
        if color is None:
            # deterministic, so that every worker process picks the same colour for a class
            color = _FALLBACK_COLORS[zlib.crc32(f"{task}/{class_name}".encode()) % len(_FALLBACK_COLORS)]
            self._colors[(task, class_name)] = color
        return color

    def __call__(self, key: tuple[str, str, int, bool]) -> str:
        text = self._cache.get(key)
        if text is None:
            task, class_name, nan_mask, ring_only = key
            props: dict[str, object] = {
                "objectType": object_type(task),
                "classification": {"name": class_name, "color": [int(v) for v in self._color(task, class_name)]},
            }
            if props["objectType"] == "annotation":
                props["isLocked"] = False
            props_open = json.dumps(props, separators=(",", ":"))[:-1].replace("%", "%%")
            members, first = "", True
            for j, name in enumerate(MEASUREMENTS.values()):
                if nan_mask >> j & 1:
                    members += "%.0s"  # consumes the NaN, prints nothing
                else:
                    members += ("" if first else ",") + f'"{name}":%s'
                    first = False
            geometry = '{"type":"Polygon","coordinates":[[%s]]}' if ring_only else "%s"
            text = f'{{"type":"Feature","id":"%s","geometry":{geometry},"properties":{props_open},"measurements":{{{members}}}}}}}'
            self._cache[key] = text
        return text


def _row_templates(
    record: pa.RecordBatch, nan_mask: np.ndarray, ring_only: np.ndarray, templates: _Templates
) -> tuple[np.ndarray, list[str], list[int]]:
    """The task of each row, the distinct templates the rows need and the index of each row's template."""
    keys, _, pair = class_groups(record)  # each row's (task, class)
    codes = (pair.astype(np.int64) << (len(MEASUREMENTS) + 1)) | (nan_mask << 1) | ring_only
    unique, first, which = np.unique(codes, return_index=True, return_inverse=True)
    chosen = [templates((*keys[pair[i]], int(nan_mask[i]), bool(ring_only[i]))) for i in first.tolist()]
    task_arr = np.asarray([task for task, _ in keys], dtype=object)[pair]
    return task_arr, chosen, which.tolist()


def _features(
    table_path: Path, *, batch_rows: int, templates: _Templates, row_groups: list[int] | None = None
) -> Iterable[tuple[np.ndarray, list[str]]]:
    """Yield (task per feature, feature JSON text) for each record batch of the table (or of its ``row_groups``)."""
    import pyarrow.compute as pc

    for record in iter_table(table_path, columns=_COLUMNS, batch_rows=batch_rows, row_groups=row_groups):
        if record.num_rows == 0:
            continue
        geoms = shapely.from_wkb(numpy_of(record.column("geometry")))
        geo_json, ring_only = _geometry_texts(geoms)
        id_col = record.column("id")
        ids = id_col.to_pylist()
        if not pc.all(pc.match_substring_regex(id_col, _UUID_RE)).as_py():
            log.warning("object ids that are not UUIDs: QuPath will not keep them")
            ids = [json.dumps(str(i))[1:-1] for i in ids]
        values, nan_mask = [], np.zeros(record.num_rows, dtype=np.int64)
        for j, column in enumerate(MEASUREMENTS):
            v = numpy_of(record.column(column)).astype(np.float64, copy=False)
            finite = np.isfinite(v)
            nan_mask |= (~finite).astype(np.int64) << j
            values.append(_number_texts(np.round(v, 4)))
        task_arr, chosen, which = _row_templates(record, nan_mask, ring_only, templates)
        texts = [chosen[i] % row for i, row in zip(which, zip(ids, geo_json, *values))]
        empty = shapely.is_empty(geoms)
        if empty.any():
            log.warning("skipped %d empty geometries", int(empty.sum()))
            keep = ~empty
            texts = [t for t, k in zip(texts, keep.tolist()) if k]
            task_arr = task_arr[keep]
        yield task_arr, texts


class _Sink:
    """One GeoJSON output being written: a (possibly gzipped) stream plus its task selection."""

    def __init__(self, fh: IO[bytes], tasks: frozenset[str]):
        self.fh = fh
        self.tasks = tasks
        self.count = 0

    def write(self, texts: Sequence[str]) -> None:
        """Append features, :data:`_WRITE_FEATURES` at a time (no copy of a whole batch's text)."""
        for i in range(0, len(texts), _WRITE_FEATURES):
            part = texts[i : i + _WRITE_FEATURES]
            self.fh.write(((",\n" if self.count else "") + ",\n".join(part)).encode("utf-8"))
            self.count += len(part)


#: features joined and encoded at a time by :meth:`_Sink.write`
_WRITE_FEATURES = 2048


def _open_stream(stack: contextlib.ExitStack, tmp: Path, *, gz: bool) -> IO[bytes]:
    """Open a buffered binary stream at ``tmp``, gzip-compressed when asked."""
    raw = stack.enter_context(open(tmp, "wb", buffering=1 << 20))
    if gz:
        return stack.enter_context(gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0))
    return raw


def _format_row_group(
    table_path: Path, row_group: int, colors: dict[tuple[str, str], tuple[int, int, int]], batch_rows: int
) -> list[tuple[np.ndarray, list[str]]]:
    """Worker-process job: the feature texts of one row group."""
    return list(_features(table_path, batch_rows=batch_rows, templates=_Templates(colors), row_groups=[row_group]))


def _parallel_features(
    table_path: Path, *, colors: dict[tuple[str, str], tuple[int, int, int]], batch_rows: int, workers: int
) -> Iterator[tuple[np.ndarray, list[str]]]:
    """Feature texts formatted by ``workers`` processes, one row group each, yielded in table order.

    At most ``workers`` row groups are in flight (the texts of one row group, ~90 MB for 67,000
    nuclei, wait here until their turn), so memory stays bounded; a worker that dies is survived as
    :func:`~wsi_mtl.postprocess._pool.ordered_results` says.
    """
    import pyarrow.parquet as pq

    from ..postprocess._pool import ordered_results

    n_groups = pq.ParquetFile(table_path).metadata.num_row_groups
    jobs = [(table_path, group, colors, batch_rows) for group in range(n_groups)]
    for texts in ordered_results(_formatting_pool, _format_row_group, jobs,
                                 workers=workers, describe=lambda i: f"row group {i} of {table_path.name}", ahead=1):
        yield from texts


def _formatting_pool(workers: int) -> ProcessPoolExecutor:
    """The processes that format row groups, named ``wsimtl-geojson``."""
    from ..postprocess._pool import _context, name_process

    return ProcessPoolExecutor(max_workers=workers, mp_context=_context(), initializer=name_process, initargs=("geojson",))


def _row_groups(table_path: Path) -> int:
    import pyarrow.parquet as pq

    with pq.ParquetFile(table_path) as parquet:
        return parquet.metadata.num_row_groups


def _children_allowed() -> bool:
    """Whether this process may start worker processes (a daemonic one, such as a Dask worker, may not)."""
    from ..postprocess._pool import children_allowed  # imported only here: the package is heavy (~0.7 CPU s)

    return children_allowed()


def _write_many(
    table_path: Path,
    targets: list[tuple[Path, frozenset[str]]],
    *,
    gz: bool,
    batch_rows: int,
    workers: int = 1,
) -> dict[Path, int]:
    """Write several GeoJSON files in one pass over the table; returns features per file."""
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    info = read_table_info(table_path)
    if workers > 1 and _row_groups(table_path) > 1 and _children_allowed():  # one row group: nothing to share
        features = _parallel_features(table_path, colors=info["colors"], batch_rows=batch_rows, workers=workers)
    else:
        features = _features(table_path, batch_rows=batch_rows, templates=_Templates(info["colors"]))
    with contextlib.ExitStack() as stack:
        sinks: list[tuple[Path, _Sink]] = []
        for final, tasks in targets:
            tmp = stack.enter_context(atomic_path(final))
            sink = _Sink(_open_stream(stack, tmp, gz=gz), tasks)
            sink.fh.write(_HEADER)
            sinks.append((final, sink))
        for task_arr, texts in features:
            for _, sink in sinks:
                if sink.tasks >= set(task_arr):
                    sink.write(texts)
                else:
                    sink.write([t for t, task in zip(texts, task_arr.tolist()) if task in sink.tasks])
        for _, sink in sinks:
            sink.fh.write(_FOOTER)
    counts = {final: sink.count for final, sink in sinks}
    for final, n in counts.items():
        log.info("wrote %d features to %s", n, final)
    return counts


def write_geojson(
    table_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    tasks: Iterable[str] | None = None,
    gz: bool = False,
    batch_rows: int = 32_768,
    workers: int = 1,
) -> int:
    """Write objects of the table as a QuPath-readable GeoJSON FeatureCollection, atomically.

    Parameters
    ----------
    table_path : path-like
        ``objects.parquet`` written by :func:`~wsi_mtl.export.write_table`.
    out_path : path-like
        The ``.geojson`` file (``.geojson.gz`` with ``gz=True``).
    tasks : iterable of str, optional
        Only these tasks (see :data:`~wsi_mtl.objects.TASKS`); all by default.
    gz : bool, default False
        Gzip the stream (not every QuPath version reads ``.geojson.gz``).
    batch_rows : int, default 32768
        Rows read from the table at a time; bounds memory.
    workers : int, default 1
        Processes formatting features (one table row group each, so only for a table of several
        row groups); the output is identical.

    Returns
    -------
    int
        Number of features written.

    Raises
    ------
    ValueError
        An unknown task, ``batch_rows`` or ``workers`` below 1, or ``gz=True`` for a name not
        ending in ``.gz``.
    InputError
        The table does not exist or cannot be read.
    OutputError
        The disk is full or the folder is not writable.
    """
    out_path = Path(out_path)
    if gz and out_path.suffix != ".gz":
        raise ValueError(f"gz=True needs an output name ending in .gz, got {out_path.name}")
    chosen = _validate_tasks(tasks)
    return _write_many(Path(table_path), [(out_path, chosen)], gz=gz, batch_rows=batch_rows, workers=workers)[out_path]


def write_geojson_files(
    table_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    gz: bool = False,
    per_task: bool = True,
    batch_rows: int = 32_768,
    workers: int = 1,
) -> dict[Path, int]:
    """Write ``objects.geojson`` and the per-task files in one pass over the table.

    Per-task files (``nuclei.geojson``, ``glands.geojson`` with glands and lumen,
    ``tissue.geojson``; see :data:`GEOJSON_FILES`) are written only for tasks present in the
    table.

    Parameters
    ----------
    table_path : path-like
        ``objects.parquet`` written by :func:`~wsi_mtl.export.write_table`.
    out_dir : path-like
        Existing folder to write into.
    gz : bool, default False
        Write ``.geojson.gz`` files instead.
    per_task : bool, default True
        Also write the per-task files.
    batch_rows : int, default 32768
        Rows read from the table at a time.
    workers : int, default 1
        Processes formatting features (one table row group each, so only for a table of several
        row groups); the output is identical.

    Returns
    -------
    dict
        ``{path: number of features}`` for every file written.

    Raises
    ------
    ValueError
        ``batch_rows`` or ``workers`` below 1.
    InputError
        The table does not exist or cannot be read.
    OutputError
        The disk is full or the folder is not writable.
    """
    out_dir = Path(out_dir)
    suffix = ".geojson.gz" if gz else ".geojson"
    targets = [(out_dir / f"objects{suffix}", frozenset(TASKS))]
    if per_task:
        present = set(read_table_info(table_path)["counts"])
        for stem, tasks in GEOJSON_FILES.items():
            if present & set(tasks):
                targets.append((out_dir / f"{stem}{suffix}", frozenset(tasks)))
    return _write_many(Path(table_path), targets, gz=gz, batch_rows=batch_rows, workers=workers)


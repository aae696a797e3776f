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
held in memory as a whole. Three writers give the same bytes (tests):

- with numba (a dependency), compiled kernels (:mod:`._geojson_bytes`) read each polygon's rings
  from its WKB and write whole features, a batch into one buffer, from cached templates; a
  polygon whose validity rounding might change (a compiled check of its edges' distances, asked
  only where rounding moves a point), a multipolygon, or WKB the kernel does not read is
  formatted as below and spliced in;
- without numba, orjson writes all coordinates and measurements of a batch at once and each
  feature is a slice of that text put into a cached %-template (``shapely.to_geojson`` for
  multipolygons, holes and geometries that rounding moves);
- without orjson either, every geometry goes through ``shapely.to_geojson``.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import zlib
from concurrent.futures import ProcessPoolExecutor
from collections.abc import Iterable, Iterator
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
from ._arrow import binary_buffers, numpy_of
from ._geojson_bytes import FIELDS, feature_bytes, kernels_available, polygon_rings, rounding_safe, text_bytes
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


def _any_per_row(flags: np.ndarray, point_bounds: np.ndarray) -> np.ndarray:
    """Whether any point of each row (points ``point_bounds[i]:point_bounds[i + 1]``) is flagged."""
    before = np.zeros(len(flags) + 1, np.int64)
    np.cumsum(flags, out=before[1:])
    return before[point_bounds[1:]] > before[point_bounds[:-1]]


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
    moved = np.flatnonzero(_any_per_row((rounded_xy != coords).any(axis=1), np.append(first, last[-1])))
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


def _number_kinds(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(finite, values with 0 where not finite, whole, odd) of ``values``: odd are the finite values
    whose ``%.12g`` text is not their shortest decimal (so neither orjson nor the compiled writer
    formats them): -0, and numbers of 1e8 and more (1e12 and more when whole)."""
    finite = np.isfinite(values)
    clean = np.where(finite, values, 0.0)
    whole = clean == np.round(clean)
    odd = finite & ((np.abs(clean) >= np.where(whole, 1e12, 1e8)) | ((clean == 0) & np.signbit(clean)))
    return finite, clean, whole, odd


def _odd_numbers(values: np.ndarray) -> np.ndarray:
    """The odd values of :func:`_number_kinds`."""
    return _number_kinds(values)[3]


def _number_texts(values: np.ndarray) -> list[str]:
    """``"%.12g" % v`` of each value (rounded to 4 decimals), formatted a column at a time with orjson.

    orjson writes the shortest text that reads back as the value, which is what ``%.12g`` writes
    for non-integers under 1e8 with 4 decimals; integers go through orjson as int64, and the rest
    (-0, large numbers) through ``%``. Non-finite values get ``""`` (the templates omit them).
    """
    finite, clean, whole, odd = _number_kinds(values)
    if orjson is None or not _USE_ORJSON:
        return ["%.12g" % v if ok else "" for v, ok in zip(values.tolist(), finite.tolist())]
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
    """Templates of whole features, one per (task, class, which measurements are NaN, ring only).

    :meth:`parts` gives a template's literal text around its fields (id, geometry, then each
    measurement; a NaN measurement is left out, with the comma before it); calling the object
    gives the same template as a %-format taking ``(id, geometry_json, *measurement_texts)``,
    where a NaN measurement is consumed by a ``%.0s`` that prints nothing, so every row formats
    with one ``%`` whatever its NaNs. With ``ring only`` the geometry is the points of a polygon's
    rings and the template writes the Polygon object around them.
    """

    def __init__(self, colors: dict[tuple[str, str], tuple[int, int, int]]):
        self._colors = dict(colors)
        self._cache: dict[tuple[str, str, int, bool], str] = {}
        self._parts: dict[tuple[str, str, int, bool], list[str]] = {}

    def _color(self, task: str, class_name: str) -> tuple[int, int, int]:
        color = self._colors.get((task, class_name))
        if color is None:
            # deterministic, so that every worker process picks the same colour for a class
            color = _FALLBACK_COLORS[zlib.crc32(f"{task}/{class_name}".encode()) % len(_FALLBACK_COLORS)]
            self._colors[(task, class_name)] = color
        return color

    def parts(self, key: tuple[str, str, int, bool]) -> list[str]:
        """The literal text before each field of the template ``key`` and after the last (10 parts)."""
        parts = self._parts.get(key)
        if parts is None:
            task, class_name, nan_mask, ring_only = key
            props: dict[str, object] = {
                "objectType": object_type(task),
                "classification": {"name": class_name, "color": [int(v) for v in self._color(task, class_name)]},
            }
            if props["objectType"] == "annotation":
                props["isLocked"] = False
            props_open = json.dumps(props, separators=(",", ":"))[:-1]
            opening, closing = ('{"type":"Polygon","coordinates":[[', "]]}") if ring_only else ("", "")
            parts = ['{"type":"Feature","id":"', '","geometry":' + opening,
                     closing + ',"properties":' + props_open + ',"measurements":{']
            first = True
            for j, name in enumerate(MEASUREMENTS.values()):
                if j:
                    parts.append("")
                if not nan_mask >> j & 1:
                    parts[-1] += ("" if first else ",") + f'"{name}":'
                    first = False
            parts.append("}}}")
            self._parts[key] = parts
        return parts

    def __call__(self, key: tuple[str, str, int, bool]) -> str:
        text = self._cache.get(key)
        if text is None:
            parts, nan_mask = self.parts(key), key[2]
            fields = ["%s", "%s"] + ["%.0s" if nan_mask >> j & 1 else "%s" for j in range(len(MEASUREMENTS))]
            text = "".join(p.replace("%", "%%") + f for p, f in zip(parts, fields)) + parts[-1].replace("%", "%%")
            self._cache[key] = text
        return text

    def part_bytes(self, keys: list[tuple[str, str, int, bool]]) -> tuple[np.ndarray, np.ndarray]:
        """The UTF-8 parts of templates ``keys``, one after another, and their (len(keys), 10, 2) spans."""
        data, bounds = text_bytes([p for key in keys for p in self.parts(key)])
        return data, bounds.reshape(len(keys), FIELDS + 1, 2)


def _row_templates(
    record: pa.RecordBatch, nan_mask: np.ndarray, ring_only: np.ndarray
) -> tuple[np.ndarray, list[tuple[str, str, int, bool]], np.ndarray]:
    """The task of each row, the distinct template keys the rows need and the index of each row's key."""
    keys, _, pair = class_groups(record)  # each row's (task, class)
    codes = (pair.astype(np.int64) << (len(MEASUREMENTS) + 1)) | (nan_mask << 1) | ring_only
    unique, first, which = np.unique(codes, return_index=True, return_inverse=True)
    chosen = [(*keys[pair[i]], int(nan_mask[i]), bool(ring_only[i])) for i in first.tolist()]
    task_arr = np.asarray([task for task, _ in keys], dtype=object)[pair]
    return task_arr, chosen, which.reshape(-1)


#: one record batch's features: each one's task, their UTF-8 text joined by ``,\n``, and each
#: feature's start and end in that text
Features = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _ids(record: pa.RecordBatch) -> list[str]:
    """Each row's object id as JSON string content (escaped where an id is not a UUID)."""
    import pyarrow.compute as pc

    id_col = record.column("id")
    ids = id_col.to_pylist()
    if not pc.all(pc.match_substring_regex(id_col, _UUID_RE)).as_py():
        log.warning("object ids that are not UUIDs: QuPath will not keep them")
        ids = [json.dumps(str(i))[1:-1] for i in ids]
    return ids


def _measurements(record: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
    """The (n, 7) measurements rounded to 4 decimals, and each row's mask of NaN measurements."""
    values = np.empty((record.num_rows, len(MEASUREMENTS)))
    nan_mask = np.zeros(record.num_rows, dtype=np.int64)
    for j, column in enumerate(MEASUREMENTS):
        values[:, j] = np.round(numpy_of(record.column(column)).astype(np.float64, copy=False), 4)
        nan_mask |= (~np.isfinite(values[:, j])).astype(np.int64) << j
    return values, nan_mask


def _joined(task_arr: np.ndarray, texts: list[str]) -> Features:
    """A batch's feature texts in the form :func:`_features` yields."""
    data, bounds = text_bytes(texts, ",\n")
    return task_arr, data, bounds[:, 0], bounds[:, 1]


def _text_features(record: pa.RecordBatch, templates: _Templates) -> Features:
    """A record batch's features, formatted in Python (orjson, or shapely alone)."""
    geoms = shapely.from_wkb(numpy_of(record.column("geometry")))
    geo_json, ring_only = _geometry_texts(geoms)
    ids = _ids(record)
    values, nan_mask = _measurements(record)
    texts_of = [_number_texts(values[:, j]) for j in range(len(MEASUREMENTS))]
    task_arr, keys, which = _row_templates(record, nan_mask, ring_only)
    chosen = [templates(key) for key in keys]
    texts = [chosen[i] % row for i, row in zip(which.tolist(), zip(ids, geo_json, *texts_of))]
    empty = shapely.is_empty(geoms)
    if empty.any():
        log.warning("skipped %d empty geometries", int(empty.sum()))
        keep = ~empty
        texts = [t for t, k in zip(texts, keep.tolist()) if k]
        task_arr = task_arr[keep]
    return _joined(task_arr, texts)


def _kernel_geometry(
    offsets: np.ndarray, data: np.ndarray
) -> tuple[tuple[np.ndarray, ...], np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """Which rows' geometry the kernel writes, from their WKB (``data[offsets[i]:offsets[i + 1]]``).

    Returns the rings (:func:`~._geojson_bytes.polygon_rings`), each row's "ring only" flag (the
    kernel's rows and the single-ring polygons of the others), its emptiness, and the GeoJSON of
    the other rows as :func:`_geometry_texts` writes it, as (row, text). The kernel writes a
    polygon where rounding its coordinates to 0.01 cannot change its validity
    (:func:`~._geojson_bytes.rounding_safe`, asked only of those it moves).
    """
    n_rings, xy, ring_ptr, row_rings = polygon_rings(offsets, data)
    rings = (xy, ring_ptr, row_rings)
    point_bounds = ring_ptr[row_rings]
    unreadable = _any_per_row(~(np.abs(xy) < 1e9).all(axis=1), point_bounds)  # NaN too
    moved = _any_per_row((np.round(xy, 2) != xy).any(axis=1), point_bounds)
    ring_only = (n_rings > 0) & ~unreadable
    check = np.flatnonzero(ring_only & moved)
    ring_only[check[~rounding_safe(check, rings)]] = False
    other = np.flatnonzero((n_rings != 0) & ~ring_only)
    empty = n_rings == 0
    if not len(other):
        return rings, ring_only, empty, []
    geoms = shapely.from_wkb([data[offsets[i] : offsets[i + 1]].tobytes() for i in other.tolist()])
    empty[other] = shapely.is_empty(geoms)
    texts, ring_only[other] = _geometry_texts(geoms)
    return rings, ring_only, empty, list(zip(other.tolist(), texts))


def _compiled_features(record: pa.RecordBatch, templates: _Templates) -> Features:
    """A record batch's features, written by the compiled kernels (:mod:`._geojson_bytes`); the
    geometries (:func:`_kernel_geometry`) and numbers (:func:`_odd_numbers`) they leave are
    formatted in Python and written in their place."""
    rings, ring_only, empty, geometry_texts = _kernel_geometry(*binary_buffers(record.column("geometry")))
    values, nan_mask = _measurements(record)
    aux_at = [(i, 1) for i, _ in geometry_texts]  # text written instead of a field, at (row, field)
    aux_texts = [text for _, text in geometry_texts]
    for j in range(len(MEASUREMENTS)):
        for i in np.flatnonzero(_odd_numbers(values[:, j])).tolist():
            aux_at.append((i, 2 + j))
            aux_texts.append("%.12g" % values[i, j])
    aux_bounds = np.full((record.num_rows, FIELDS, 2), -1, np.int64)
    aux_data, spans = text_bytes(aux_texts)
    if aux_at:
        rows, fields = np.array(aux_at).T
        aux_bounds[rows, fields] = spans
    task_arr, keys, which = _row_templates(record, nan_mask, ring_only)
    parts, part_bounds = templates.part_bytes(keys)
    if empty.any():
        log.warning("skipped %d empty geometries", int(empty.sum()))
    keep = np.flatnonzero(~empty)
    text, starts, ends = feature_bytes(keep, which, parts, part_bounds, text_bytes(_ids(record)), rings, values,
                                       (aux_data, aux_bounds))
    return task_arr[keep], text, starts, ends


#: write features with the compiled kernels where numba allows (else the Python formatting below)
_USE_KERNELS = True


def _compiled_writer() -> bool:
    """Whether features are written by the compiled kernels here."""
    return _USE_KERNELS and kernels_available()


def warm_kernels() -> bool:
    """Load the compiled writer's kernels now (compiling them, once per install, where numba's
    cache lacks them) by formatting a few synthetic objects; whether the kernels run here."""
    from ._synthetic import synthetic_batches
    from ._table import _to_record_batch

    if not _compiled_writer():
        return False
    batch = next(synthetic_batches(4, batch_size=4, tasks=("nuclei", "gland"), seed=0))
    _compiled_features(_to_record_batch(batch)[0], _Templates({}))
    return True


def _features(
    table_path: Path, *, batch_rows: int, templates: _Templates, row_groups: list[int] | None = None
) -> Iterable[Features]:
    """Yield the features of each record batch of the table (or of its ``row_groups``)."""
    compiled = _compiled_writer()
    for record in iter_table(table_path, columns=_COLUMNS, batch_rows=batch_rows, row_groups=row_groups):
        if record.num_rows:
            yield _compiled_features(record, templates) if compiled else _text_features(record, templates)


class _Sink:
    """One GeoJSON output being written: a (possibly gzipped) stream plus its task selection."""

    def __init__(self, fh: IO[bytes], tasks: frozenset[str]):
        self.fh = fh
        self.tasks = tasks
        self.count = 0

    def write(self, features: Features) -> None:
        """Append a batch's features of this sink's tasks: runs of consecutive ones straight from
        the batch's text (no copy)."""
        task_arr, text, starts, ends = features
        chosen = np.flatnonzero(np.isin(task_arr, list(self.tasks)))
        if not len(chosen):
            return
        breaks = np.flatnonzero(np.diff(chosen) != 1) + 1
        view = memoryview(text)
        for run in np.split(chosen, breaks):
            if self.count:
                self.fh.write(b",\n")
            self.fh.write(view[starts[run[0]] : ends[run[-1]]])
            self.count += len(run)


def _open_stream(stack: contextlib.ExitStack, tmp: Path, *, gz: bool) -> IO[bytes]:
    """Open a buffered binary stream at ``tmp``, gzip-compressed when asked."""
    raw = stack.enter_context(open(tmp, "wb", buffering=1 << 20))
    if gz:
        return stack.enter_context(gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0))
    return raw


def _format_row_group(
    table_path: Path, row_group: int, colors: dict[tuple[str, str], tuple[int, int, int]], batch_rows: int
) -> list[Features]:
    """Worker-process job: the features of one row group."""
    return list(_features(table_path, batch_rows=batch_rows, templates=_Templates(colors), row_groups=[row_group]))


def _parallel_features(
    table_path: Path, *, colors: dict[tuple[str, str], tuple[int, int, int]], batch_rows: int, workers: int
) -> Iterator[Features]:
    """Features formatted by ``workers`` processes, one row group each, yielded in table order.

    At most ``workers`` row groups are in flight (the text of one row group, ~45 MB for 64,000
    objects, waits here until its turn), so memory stays bounded; a worker that dies is survived as
    :func:`~wsi_mtl.postprocess._pool.ordered_results` says.
    """
    import pyarrow.parquet as pq

    from ..postprocess._pool import ordered_results

    n_groups = pq.ParquetFile(table_path).metadata.num_row_groups
    jobs = [(table_path, group, colors, batch_rows) for group in range(n_groups)]
    for batches in ordered_results(_formatting_pool, _format_row_group, jobs,
                                   workers=workers, describe=lambda i: f"row group {i} of {table_path.name}", ahead=1):
        yield from batches


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
        for batch in features:
            for _, sink in sinks:
                sink.write(batch)
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


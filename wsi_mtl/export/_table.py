"""The object table: object batches streamed into one GeoParquet file.

One row per object, the columns of :data:`wsi_mtl.objects.COLUMNS`, a ``geometry`` column (WKB,
level-0 px) and a ``bbox`` covering column (GeoParquet 1.1), so that ``geopandas.read_parquet``,
pandas and DuckDB read it directly and can skip row groups outside a region.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

from ..atomic import atomic_path
from ..errors import InputError
from ..objects import COLUMNS, TASKS, ObjectBatch
from ._arrow import arrow_array, numpy_of, one_array

__all__ = ["write_table", "read_table_info", "iter_table", "TableSummary", "TABLE_SCHEMA"]

log = logging.getLogger(__name__)

_ARROW_TYPES = {"U": pa.string(), "i": pa.int32(), "f": pa.float64(), "b": pa.bool_()}
_BBOX_TYPE = pa.struct([(k, pa.float64()) for k in ("xmin", "ymin", "xmax", "ymax")])

#: the Arrow schema of ``objects.parquet``
TABLE_SCHEMA: pa.Schema = pa.schema(
    [pa.field(name, _ARROW_TYPES[kind], nullable=False) for name, kind in COLUMNS.items()]
    + [pa.field("geometry", pa.binary(), nullable=False), pa.field("bbox", _BBOX_TYPE)]
)

_GEOM_TYPE_NAMES = {3: "Polygon", 6: "MultiPolygon"}
_DICTIONARY_COLUMNS = ["task", "class_name"]
_DESCRIPTION = (
    "wsimtl objects: one row per nucleus, gland, lumen or tissue region. geometry is in level-0 "
    "pixels of the slide as QuPath shows them (x to the right, y down, origin at the top-left "
    "corner, bounds offset already subtracted); crs is null because these are image coordinates, "
    "not geographic ones: multiply by mpp (micrometres per level-0 pixel) for micrometres. "
    "Measurements are in um and um^2; NaN where not measured."
)


@dataclass(frozen=True)
class TableSummary:
    """What :func:`write_table` wrote.

    Attributes
    ----------
    path : Path
        The GeoParquet file.
    rows : int
        Number of objects.
    counts : dict
        ``{task: {class_name: count}}``, tasks in :data:`~wsi_mtl.objects.TASKS` order, classes
        by class id.
    colors : dict
        ``{(task, class_name): (r, g, b)}`` of every class seen.
    bbox : tuple of float or None
        ``(xmin, ymin, xmax, ymax)`` of all geometry in level-0 px; ``None`` for an empty table.
    """

    path: Path
    rows: int
    counts: dict[str, dict[str, int]]
    colors: dict[tuple[str, str], tuple[int, int, int]] = field(default_factory=dict)
    bbox: tuple[float, float, float, float] | None = None


def _validate_batch(batch: ObjectBatch) -> ObjectBatch:
    """Check one batch against the object record and return it with valid polygonal geometry.

    Invalid polygons are repaired with ``shapely.make_valid``; objects whose geometry is empty
    (or collapses when repaired) are dropped with a warning.
    """
    missing = [name for name in COLUMNS if name not in batch.columns]
    if missing:
        raise ValueError(f"object batch lacks column(s) {missing}; expected all of objects.COLUMNS")
    geometry = np.asarray(batch.geometry, dtype=object)
    n = len(geometry)
    lengths = {name: len(batch.columns[name]) for name in COLUMNS}
    wrong = {name: size for name, size in lengths.items() if size != n}
    if wrong:
        raise ValueError(f"object batch columns {wrong} differ in length from its {n} geometries")
    wkb = None if batch.wkb is None else np.asarray(batch.wkb, dtype=object)
    if wkb is not None and len(wkb) != n:
        raise ValueError(f"object batch has {len(wkb)} WKB geometries for its {n} geometries")
    if n == 0:
        return ObjectBatch({name: np.asarray(batch.columns[name]) for name in COLUMNS}, geometry, batch.colors)
    tasks = np.asarray(batch.columns["task"]).astype(str)
    unknown = sorted(set(np.unique(tasks)) - set(TASKS))
    if unknown:
        raise ValueError(f"object batch has unknown task(s) {unknown}; expected one of {list(TASKS)}")
    if shapely.is_missing(geometry).any():
        raise ValueError("object batch has a missing (None) geometry")
    type_ids = shapely.get_type_id(geometry)
    bad_type = ~np.isin(type_ids, list(_GEOM_TYPE_NAMES))
    if bad_type.any():
        example = geometry[np.flatnonzero(bad_type)[0]].geom_type
        raise ValueError(f"object geometry must be Polygon or MultiPolygon, got {example}")

    invalid = ~shapely.is_valid(geometry) if wkb is None else np.zeros(n, bool)  # WKB: its producer made it valid
    if invalid.any():
        geometry = geometry.copy()
        repaired = shapely.make_valid(geometry[invalid], method="structure", keep_collapsed=False)
        geometry[invalid] = repaired
        log.warning("repaired %d invalid object polygon(s)", int(invalid.sum()))
    keep = ~shapely.is_empty(geometry) & np.isin(shapely.get_type_id(geometry), list(_GEOM_TYPE_NAMES))
    columns = {name: np.asarray(batch.columns[name]) for name in COLUMNS}
    if not keep.all():
        log.warning("dropped %d object(s) with empty geometry", int((~keep).sum()))
        columns = {name: col[keep] for name, col in columns.items()}
        geometry = geometry[keep]
        wkb = None if wkb is None else wkb[keep]
    return ObjectBatch(columns, geometry, batch.colors, wkb=wkb)


def class_groups(table: pa.Table | pa.RecordBatch) -> tuple[list[tuple[str, str]], np.ndarray, np.ndarray]:
    """The (task, class_name) pairs of ``table``'s rows, each once (in the order of their
    dictionary codes), the first row of each, and each row's pair (an index into that list)."""
    tasks, classes = (one_array(table.column(name)).dictionary_encode() for name in ("task", "class_name"))
    width = max(1, len(classes.dictionary))
    codes = numpy_of(tasks.indices).astype(np.int64) * width + numpy_of(classes.indices)
    unique, first, inverse = np.unique(codes, return_index=True, return_inverse=True)
    task_names, class_names = tasks.dictionary.to_pylist(), classes.dictionary.to_pylist()
    return [(task_names[c // width], class_names[c % width]) for c in unique.tolist()], first, inverse.reshape(-1)


def _count_classes(record: pa.RecordBatch, counter: Counter[tuple[str, str]], class_ids: dict[tuple[str, str], int]) -> None:
    """Add a record batch's objects per (task, class) to ``counter``; record each new class's id."""
    keys, first, group = class_groups(record)
    cids = numpy_of(record.column("class_id"))
    for key, i, n in zip(keys, first.tolist(), np.bincount(group, minlength=len(keys)).tolist()):
        counter[key] += n
        class_ids.setdefault(key, int(cids[i]))


def _to_record_batch(batch: ObjectBatch) -> tuple[pa.RecordBatch, np.ndarray]:
    """Convert a validated batch to Arrow (WKB geometry plus its bounding box); also return the (n, 4) bounds."""
    arrays: list[pa.Array] = []
    for name, kind in COLUMNS.items():
        col = batch.columns[name]
        if kind == "U":
            arrays.append(arrow_array(np.asarray(col).astype(str), pa.string()))
        else:
            arrays.append(arrow_array(col, {"i": pa.int32(), "b": pa.bool_()}.get(kind, pa.float64())))
    arrays.append(arrow_array(shapely.to_wkb(batch.geometry) if batch.wkb is None else batch.wkb, pa.binary()))
    bounds = shapely.bounds(batch.geometry).reshape(-1, 4)
    arrays.append(
        pa.StructArray.from_arrays([arrow_array(bounds[:, k], pa.float64()) for k in range(4)], fields=list(_BBOX_TYPE))
    )
    return pa.RecordBatch.from_arrays(arrays, schema=TABLE_SCHEMA), bounds


def write_table(
    batches: Iterable[ObjectBatch],
    path: str | os.PathLike[str],
    *,
    mpp: float,
    row_group_rows: int = 65_536,
) -> TableSummary:
    """Stream object batches into a GeoParquet 1.1 file, written atomically.

    Batches are buffered up to ``row_group_rows`` rows and written as one row group, so memory
    stays bounded whatever the number of objects.

    Parameters
    ----------
    batches : iterable of ObjectBatch
        Objects with level-0 px geometry; consumed once, lazily.
    path : path-like
        The ``.parquet`` file to write (its folder must exist).
    mpp : float
        Micrometres per level-0 pixel of the slide, recorded in the file metadata.
    row_group_rows : int, default 65536
        Rows per Parquet row group.

    Returns
    -------
    TableSummary
        Row count, per-class counts, colours and bounding box.

    Raises
    ------
    ValueError
        ``mpp`` or ``row_group_rows`` is not positive, or a batch does not follow the object
        record (missing column, unequal lengths, unknown task, non-polygonal geometry).
    OutputError
        The disk is full or the folder is not writable.
    """
    if not (isinstance(mpp, numbers.Real) and not isinstance(mpp, bool) and np.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a positive number of micrometres per pixel, got {mpp!r}")
    if row_group_rows < 1:
        raise ValueError(f"row_group_rows must be at least 1, got {row_group_rows}")
    path = Path(path)
    counter: Counter[tuple[str, str]] = Counter()
    class_ids: dict[tuple[str, str], int] = {}
    colors: dict[tuple[str, str], tuple[int, int, int]] = {}
    geom_types: set[str] = set()
    bbox = np.array([np.inf, np.inf, -np.inf, -np.inf])
    rows = 0

    with atomic_path(path) as tmp:
        # dictionaries only where values repeat: tried on WKB and UUIDs they cost ~30% of the write time
        writer = pq.ParquetWriter(tmp, TABLE_SCHEMA, compression="zstd", store_schema=False, use_dictionary=_DICTIONARY_COLUMNS)
        try:
            pending: list[pa.RecordBatch] = []
            pending_rows = 0
            for raw in batches:
                batch = _validate_batch(raw)
                for key, rgb in batch.colors.items():
                    colors[(str(key[0]), str(key[1]))] = tuple(int(v) for v in rgb)  # type: ignore[assignment]
                if len(batch) == 0:
                    continue
                geom_types.update(_GEOM_TYPE_NAMES[t] for t in np.unique(shapely.get_type_id(batch.geometry)))
                record, bounds = _to_record_batch(batch)
                _count_classes(record, counter, class_ids)
                bbox = np.r_[np.minimum(bbox[:2], bounds[:, :2].min(axis=0)), np.maximum(bbox[2:], bounds[:, 2:].max(axis=0))]
                pending.append(record)
                pending_rows += record.num_rows
                rows += record.num_rows
                if pending_rows >= row_group_rows:
                    writer.write_table(pa.Table.from_batches(pending), row_group_size=pending_rows)
                    pending, pending_rows = [], 0
            if pending:
                writer.write_table(pa.Table.from_batches(pending), row_group_size=pending_rows)
            counts = _ordered_counts(counter, class_ids)
            bbox_out = tuple(float(v) for v in bbox) if rows else None
            writer.add_key_value_metadata(
                {
                    "geo": json.dumps(_geo_metadata(sorted(geom_types), bbox_out)),
                    "wsimtl": json.dumps(_wsimtl_metadata(mpp=mpp, counts=counts, colors=colors, class_ids=class_ids)),
                }
            )
        finally:
            writer.close()
    log.info("wrote %d objects to %s", rows, path)
    return TableSummary(path=path, rows=rows, counts=counts, colors=colors, bbox=bbox_out)  # type: ignore[arg-type]


def _ordered_counts(counter: Counter[tuple[str, str]], class_ids: dict[tuple[str, str], int]) -> dict[str, dict[str, int]]:
    """``{task: {class: n}}`` with tasks in TASKS order and classes by class id, then name."""
    counts: dict[str, dict[str, int]] = {}
    for task in TASKS:
        keys = sorted((k for k in counter if k[0] == task), key=lambda k: (class_ids.get(k, 0), k[1]))
        if keys:
            counts[task] = {k[1]: counter[k] for k in keys}
    return counts


def _geo_metadata(geometry_types: list[str], bbox: tuple[float, ...] | None) -> dict[str, Any]:
    """The GeoParquet 1.1.0 ``geo`` file metadata."""
    column: dict[str, Any] = {
        "encoding": "WKB",
        "geometry_types": geometry_types,
        "crs": None,
        "edges": "planar",
        "covering": {"bbox": {k: ["bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}},
    }
    if bbox is not None:
        column["bbox"] = list(bbox)
    return {"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": column}}


def _wsimtl_metadata(
    *,
    mpp: float,
    counts: dict[str, dict[str, int]],
    colors: dict[tuple[str, str], tuple[int, int, int]],
    class_ids: dict[tuple[str, str], int],
) -> dict[str, Any]:
    """Our own file metadata: units, counts and class colours."""
    keys = sorted(set(colors) | set(class_ids), key=lambda k: (TASKS.index(k[0]) if k[0] in TASKS else 99, class_ids.get(k, 0), k[1]))
    classes = [
        {"task": t, "class_name": c, "class_id": class_ids.get((t, c)), "color": list(colors[(t, c)]) if (t, c) in colors else None}
        for (t, c) in keys
    ]
    return {
        "description": _DESCRIPTION,
        "coordinates": "level-0 px",
        "mpp": float(mpp),
        "counts": counts,
        "classes": classes,
    }


def read_table_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read the metadata of an object table without reading its rows.

    Parameters
    ----------
    path : path-like
        An ``objects.parquet`` written by :func:`write_table` (or any GeoParquet file with the
        same columns, in which case ``mpp``, ``counts`` and ``colors`` may be missing).

    Returns
    -------
    dict
        ``rows``, ``mpp`` (or None), ``counts`` ``{task: {class: n}}``, ``colors``
        ``{(task, class): (r, g, b)}`` and ``geo`` (the GeoParquet metadata).

    Raises
    ------
    InputError
        The file does not exist or is not a Parquet file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"object table not found: {path}")
    try:
        meta = pq.ParquetFile(path).metadata
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"not a readable Parquet object table: {path} ({exc})") from exc
    kv = meta.metadata or {}
    ours = json.loads(kv.get(b"wsimtl", b"{}"))
    geo = json.loads(kv.get(b"geo", b"{}"))
    colors = {(c["task"], c["class_name"]): tuple(c["color"]) for c in ours.get("classes", []) if c.get("color")}
    return {
        "rows": meta.num_rows,
        "mpp": ours.get("mpp"),
        "counts": ours.get("counts", {}),
        "colors": colors,
        "geo": geo,
    }


def iter_table(
    path: str | os.PathLike[str], *, columns: Sequence[str], batch_rows: int, row_groups: Sequence[int] | None = None
) -> Iterator[pa.RecordBatch]:
    """Stream record batches of ``columns`` from an object table with bounded memory.

    Pre-buffering and threaded read-ahead are off: with them, pyarrow keeps reading ahead and
    the process grows with the file (about +35% peak RSS at 4x the objects); without them peak
    memory stays at one row group whatever the number of rows.
    """
    read_table_info(path)  # one clear InputError for a missing or unreadable table
    with pq.ParquetFile(path, pre_buffer=False) as parquet:
        groups = list(range(parquet.num_row_groups)) if row_groups is None else list(row_groups)
        yield from parquet.iter_batches(batch_size=batch_rows, row_groups=groups, columns=list(columns), use_threads=False)

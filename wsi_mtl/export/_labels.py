"""NGFF label images in predictions.zarr, rasterised from the object table chunk by chunk.

``write_label_images`` writes, under the image of the head each task comes from:

* ``<Patch-Class>/labels/tissue_classes`` - tissue class per Patch-Class cell (value = position of
  the class in the head's classes + 1, 0 = no tissue region), coloured per class;
* ``Nuclei-INST/labels/nuclei``, ``Gland-INST/labels/glands``, ``Lumen-INST/labels/lumen`` - int32
  instance ids (1, 2, ... in table order, 0 = background) at model resolution, each instance
  coloured by its class with its class name as a property (up to :data:`MAX_LISTED` instances).

A pixel belongs to an object when its centre lies inside the polygon (holes excluded); where
objects overlap the later one wins. Memory holds one label chunk, the object bounding boxes and a
few row groups of the table, whatever the slide size.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import shapely
import zarr

from ..ome import label_group
from ._arrow import binary_buffers, numpy_of, taken
from ._geojson_bytes import polygon_rings, rings_available
from ._scanline import fill_rings
from ._table import read_table_info

__all__ = ["write_label_images", "LABEL_IMAGES", "MAX_LISTED"]

log = logging.getLogger(__name__)

#: task -> (head image it is drawn under, label name, one value per instance)
LABEL_IMAGES: dict[str, tuple[str, str, bool]] = {
    "tissue": ("Patch-Class", "tissue_classes", False),
    "nuclei": ("Nuclei-INST", "nuclei", True),
    "gland": ("Gland-INST", "glands", True),
    "lumen": ("Lumen-INST", "lumen", True),
}
#: seconds per run painted as a slice, per pixel painted in array operations, per tile pixel (measured)
_SLICE_COST, _PIXEL_COST, _TILE_COST = 1e-6, 2e-8, 3e-9
#: instance labels list a colour and class per instance up to this many instances
MAX_LISTED = 100_000
_CACHED_GROUPS = 4


@dataclass
class _Index:
    """Where each object of one task is in the table and which label value it gets."""

    group: np.ndarray  # row group
    row: np.ndarray  # row within the row group
    bounds: np.ndarray  # (n, 4) minx, miny, maxx, maxy in level-0 px
    value: np.ndarray  # label value
    class_code: np.ndarray  # position in ``classes``
    classes: list[str]

    def class_names(self) -> list[str]:
        return [self.classes[k] for k in self.class_code.tolist()]


def _index(parquet: pq.ParquetFile, tasks: set[str], class_values: dict[str, dict[str, int]]) -> dict[str, _Index]:
    """One pass over the table: bounds and label value of every object of ``tasks``."""
    parts: dict[str, list[tuple[Any, ...]]] = {t: [] for t in tasks}  # (group, rows, bounds, class names)
    boxed = "bbox" in parquet.schema_arrow.names  # the geometries' bounds, stored (else decoded here)
    for g in range(parquet.num_row_groups):
        rg = parquet.read_row_group(g, columns=["task", "class_name", "bbox" if boxed else "geometry"], use_threads=False)
        task = np.asarray(rg.column("task").to_pylist(), dtype=object)
        names = rg.column("class_name").to_pylist()
        for t in tasks:
            rows = np.flatnonzero(task == t)
            if len(rows) == 0:
                continue
            parts[t].append((g, rows, _bounds(rg, rows, boxed), [names[i] for i in rows]))
    out: dict[str, _Index] = {}
    for t, chunks in parts.items():
        if not chunks:
            continue
        group = np.concatenate([np.full(len(r), g, dtype=np.int32) for g, r, _, _ in chunks])
        classes = list(dict.fromkeys(n for *_, ns in chunks for n in ns))
        code = np.concatenate([np.array([classes.index(n) for n in ns], dtype=np.int16) for *_, ns in chunks])
        if t in class_values:  # semantic: the class decides the value
            value = np.array([class_values[t].get(n, 0) for n in classes], dtype=np.int64)[code]
        else:
            value = np.arange(1, len(code) + 1, dtype=np.int64)
        rows = np.concatenate([r for _, r, _, _ in chunks]).astype(np.int32)
        out[t] = _Index(group, rows, np.concatenate([b for _, _, b, _ in chunks]).astype(np.float32), value, code, classes)
    return out


def _bounds(rg: Any, rows: np.ndarray, boxed: bool) -> np.ndarray:
    """(n, 4) xmin, ymin, xmax, ymax of a row group's ``rows``: its ``bbox`` column, or the decoded geometries'."""
    if boxed:
        box = taken(rg.column("bbox"), rows)
        return np.stack([numpy_of(box.field(k)) for k in ("xmin", "ymin", "xmax", "ymax")], axis=1)
    return shapely.bounds(shapely.from_wkb(numpy_of(taken(rg.column("geometry"), rows))))


#: (xy, ring, row): every ring vertex of some geometries in row order, (m, 2) level-0 px, the ring
#: of each (an id unique among them) and the row (geometry) it belongs to
Vertices = tuple[np.ndarray, np.ndarray, np.ndarray]


def _shapely_vertices(geoms: np.ndarray) -> Vertices:
    """:data:`Vertices` of shapely geometries (polygons and multipolygons), rows = positions in ``geoms``."""
    parts, owner = shapely.get_parts(geoms, return_index=True)
    rings, ring_part = shapely.get_rings(parts, return_index=True)
    coords, ring_index = shapely.get_coordinates(rings, return_index=True)
    return coords, ring_index.astype(np.int64), owner[ring_part[ring_index]].astype(np.int64)


def _wkb_vertices(wkb: Any) -> Vertices:
    """:data:`Vertices` of a WKB column (an arrow binary array), read by the compiled WKB reader of
    the GeoJSON export; shapely reads what it leaves (multipolygons, big-endian WKB) or everything
    where numba is off. The same vertices either way."""
    offsets, data = binary_buffers(wkb)
    n = len(offsets) - 1
    if not rings_available():
        return _shapely_vertices(shapely.from_wkb(numpy_of(wkb)))
    counts, xy, ring_ptr, row_rings = polygon_rings(offsets, data)
    sizes = np.diff(ring_ptr)
    ring = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
    row = np.repeat(np.arange(n, dtype=np.int64), np.diff(row_rings))[ring]
    odd = np.flatnonzero(counts < 0)
    if len(odd) == 0:
        return xy, ring, row
    oxy, oring, orow = _shapely_vertices(shapely.from_wkb(numpy_of(taken(wkb, odd))))
    order = np.argsort(np.concatenate([row, odd[orow]]), kind="stable")
    return (np.concatenate([xy, oxy])[order], np.concatenate([ring, oring + len(sizes)])[order],
            np.concatenate([row, odd[orow]])[order])


class _Geometries:
    """Ring vertices of one task's objects, a few row groups kept in memory; of each row group only
    that task's rows are read."""

    def __init__(self, parquet: pq.ParquetFile, index: _Index) -> None:
        self.parquet = parquet
        self.index = index
        self.rows = {int(g): index.row[index.group == g] for g in np.unique(index.group)}  # ascending
        self.cache: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()

    def _group(self, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """xy and ring of the group's vertices (:data:`Vertices`, rows = the task's rows of the group,
        in order) and where each row's vertices start (one more entry)."""
        if group not in self.cache:
            col = self.parquet.read_row_group(group, columns=["geometry"], use_threads=False).column("geometry")
            xy, ring, row = _wkb_vertices(taken(col, self.rows[group]))
            start = np.zeros(len(self.rows[group]) + 1, np.int64)
            np.cumsum(np.bincount(row, minlength=len(self.rows[group])), out=start[1:])
            self.cache[group] = (xy, ring + (group << 40), start)  # rings of two groups never share an id
            if len(self.cache) > _CACHED_GROUPS:
                self.cache.popitem(last=False)
        self.cache.move_to_end(group)
        return self.cache[group]

    def vertices(self, objects: np.ndarray) -> Vertices:
        """:data:`Vertices` of the index's objects ``objects`` (positions in the index), object after
        object in that order; rows = positions in ``objects``."""
        owners, pieces = [], []
        groups = self.index.group[objects]
        for g in np.unique(groups).tolist():
            sel = np.flatnonzero(groups == g)
            xy, ring, start = self._group(g)
            at = np.searchsorted(self.rows[g], self.index.row[objects[sel]])
            length = start[at + 1] - start[at]
            take = np.repeat(start[at] - (np.cumsum(length) - length), length) + np.arange(int(length.sum()))
            pieces.append((xy[take], ring[take]))
            owners.append(np.repeat(sel, length))
        if not pieces:
            return np.empty((0, 2)), np.empty(0, np.int64), np.empty(0, np.int64)
        obj = np.concatenate(owners)
        xy, ring = np.concatenate([a for a, _ in pieces]), np.concatenate([b for _, b in pieces])
        if len(obj) > 1 and (obj[1:] < obj[:-1]).any():  # objects not in row group order
            order = np.argsort(obj, kind="stable")
            xy, ring, obj = xy[order], ring[order], obj[order]
        return xy, ring, obj


def _draw_all(tile: np.ndarray, vertices: Vertices, n_geoms: int, values: np.ndarray, *, downsample: float,
              origin: tuple[int, int]) -> None:
    """Set the pixels of ``tile`` whose centres lie in geometry k of ``vertices`` (``n_geoms``
    geometries, vertices in level-0 px) to ``values[k]``, geometry after geometry (a later one
    wins a pixel two cover).

    A scanline fill by the even-odd rule over every ring of each geometry, so holes stay out: each
    edge gives one crossing per pixel row it spans (half-open in y), the crossings of one
    geometry's row sorted by x pair up into runs of pixels. The cost grows with the crossings, not
    with the area; all geometries of a tile are handled in one set of array operations.
    """
    coords, ring_index, obj = vertices
    if len(coords) == 0:
        return
    big = np.bincount(obj, minlength=n_geoms) >= 3  # fewer vertices: nothing to draw
    y = coords[:, 1] / downsample - 0.5 - origin[0]
    x = coords[:, 0] / downsample - 0.5 - origin[1]
    if fill_rings(tile, y, x, ring_index, obj, big, values):  # compiled: the same pixels
        return
    same = (ring_index[1:] == ring_index[:-1]) & (y[1:] != y[:-1]) & big[obj[1:]]  # edges of one ring, not horizontal
    y0, y1, x0, x1, who = y[:-1][same], y[1:][same], x[:-1][same], x[1:][same], obj[1:][same]
    first = np.maximum(np.ceil(np.minimum(y0, y1)), 0)
    last = np.minimum(np.ceil(np.maximum(y0, y1)) - 1, tile.shape[0] - 1)
    count = np.maximum(last - first + 1, 0).astype(np.int64)
    if not count.any():
        return
    edge = np.repeat(np.arange(len(count)), count)
    rows = first[edge] + (np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count))
    xs = x0[edge] + (rows - y0[edge]) * ((x1 - x0) / (y1 - y0))[edge]
    order = np.lexsort((xs, rows, who[edge]))
    rows, xs, who = rows[order].astype(np.int64), np.clip(np.ceil(xs[order]), 0, tile.shape[1]).astype(np.int64), who[edge][order]
    _paint_runs(tile, rows[0::2], xs[0::2], xs[1::2], who[0::2], values)


def _paint_runs(tile: np.ndarray, rows: np.ndarray, starts: np.ndarray, stops: np.ndarray, who: np.ndarray, values: np.ndarray) -> None:
    """Set ``tile[rows[i], starts[i]:stops[i]]`` to ``values[who[i]]``; where runs overlap, the
    run of the highest ``who`` (the later geometry) wins. Many short runs (nuclei) are painted in
    one set of array operations, few long ones (glands) one slice each, whichever costs less."""
    length = np.maximum(stops - starts, 0)
    total = int(length.sum())
    if total == 0:
        return
    if len(length) * _SLICE_COST < total * _PIXEL_COST + tile.size * _TILE_COST:
        for r, c0, c1, k in zip(rows.tolist(), starts.tolist(), stops.tolist(), who.tolist()):  # in order: later wins
            if c1 > c0:
                tile[r, c0:c1] = values[k]
        return
    flat = np.repeat(rows * tile.shape[1] + starts - (np.cumsum(length) - length), length) + np.arange(total)
    owner = np.full(tile.size, -1, np.int64)
    np.maximum.at(owner, flat, np.repeat(who, length))
    drawn = owner >= 0
    tile.reshape(-1)[drawn] = np.asarray(values)[owner[drawn]]


def _buckets(bounds: np.ndarray, *, downsample: float, chunk: tuple[int, int], shape: tuple[int, int]) -> dict[tuple[int, int], np.ndarray]:
    """Object indices per label chunk their bounding box touches, in table order."""
    b = bounds.astype(np.float64) / downsample  # (float32 bounds: one pixel of slack each way)
    lo_y = np.clip(np.floor(b[:, 1] - 1.5), 0, shape[0] - 1).astype(np.int64) // chunk[0]
    hi_y = np.clip(np.ceil(b[:, 3] + 0.5), 0, shape[0] - 1).astype(np.int64) // chunk[0]
    lo_x = np.clip(np.floor(b[:, 0] - 1.5), 0, shape[1] - 1).astype(np.int64) // chunk[1]
    hi_x = np.clip(np.ceil(b[:, 2] + 0.5), 0, shape[1] - 1).astype(np.int64) // chunk[1]
    # one (object, chunk) pair per chunk an object's box touches; most objects touch one
    ny, nx = hi_y - lo_y + 1, hi_x - lo_x + 1
    obj = np.repeat(np.arange(len(bounds)), ny * nx)
    k = np.arange(len(obj)) - np.repeat(np.cumsum(ny * nx) - ny * nx, ny * nx)  # pair's position in its object's block
    cy, cx = lo_y[obj] + k // nx[obj], lo_x[obj] + k % nx[obj]
    key = cy * (int(cx.max(initial=0)) + 1) + cx
    order = np.argsort(key, kind="stable")  # table order within each chunk
    key, obj, cy, cx = key[order], obj[order], cy[order], cx[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    ends = np.r_[starts[1:], len(key)]
    return {(int(cy[a]), int(cx[a])): obj[a:b] for a, b in zip(starts.tolist(), ends.tolist())}


def _rasterise(array: zarr.Array, index: _Index, geoms: _Geometries, *, downsample: float) -> None:
    """Fill the (1, Y, X) label ``array`` chunk by chunk with the objects of ``index``."""
    shape, chunk = array.shape[1:], array.chunks[1:]
    for (cy, cx), members in sorted(_buckets(index.bounds, downsample=downsample, chunk=chunk, shape=shape).items()):
        y0, x0 = cy * chunk[0], cx * chunk[1]
        tile = np.zeros((min(chunk[0], shape[0] - y0), min(chunk[1], shape[1] - x0)), dtype=array.dtype)
        drawn = members[index.value[members] != 0]
        if len(drawn):
            _draw_all(tile, geoms.vertices(drawn), len(drawn), index.value[drawn], downsample=downsample, origin=(y0, x0))
        array[0, y0 : y0 + tile.shape[0], x0 : x0 + tile.shape[1]] = tile


def _rgba(rgb: Any) -> tuple[int, int, int, int]:
    return (*(int(v) for v in list(rgb)[:3]), 255)


def _legend(task: str, index: _Index | None, classes: list[str], palette: dict[tuple[str, str], Any]) -> tuple[list, list]:
    """(colors, properties) of a label image: per class value, or per instance up to MAX_LISTED."""
    fallback = (128, 128, 128)
    if not LABEL_IMAGES[task][2]:
        colors = [(k + 1, _rgba(palette.get((task, c), fallback))) for k, c in enumerate(classes)]
        return colors, [{"label-value": k + 1, "class": c} for k, c in enumerate(classes)]
    if index is None:
        return [], []
    if len(index.value) > MAX_LISTED:
        log.info("%d %s instances: label colours left to the viewer (more than %d)", len(index.value), task, MAX_LISTED)
        return [], []
    rgba = [_rgba(palette.get((task, c), fallback)) for c in index.classes]  # one colour per class
    values, codes = index.value.tolist(), index.class_code.tolist()
    colors = [(v, rgba[k]) for v, k in zip(values, codes)]
    return colors, [{"label-value": v, "class": index.classes[k]} for v, k in zip(values, codes)]


def write_label_images(
    predictions: str | os.PathLike[str], table_path: str | os.PathLike[str], attrs: dict[str, Any], *,
    tasks: Collection[str] | None = None,
) -> list[Path]:
    """Rasterise the objects of ``table_path`` into NGFF label images of ``predictions``.

    Parameters
    ----------
    predictions : path-like
        A finished ``predictions.zarr``.
    table_path : path-like
        Its ``objects.parquet``.
    attrs : dict
        The store's ``wsimtl`` attributes (head names, classes, ``downsample``).
    tasks : collection of str, optional
        Only these tasks' label images (keys of :data:`LABEL_IMAGES`; default: all). Each task
        writes under its own image, so separate calls may write different tasks at the same time.

    Returns
    -------
    list of Path
        The label groups written (a task whose head image is absent is skipped).
    """
    predictions = Path(predictions)
    heads = attrs.get("heads") or {}
    info = read_table_info(table_path)
    targets = {k: v for k, v in _targets(predictions, heads).items() if tasks is None or k in tasks}
    class_values = {"tissue": {c: k + 1 for k, c in enumerate(targets["tissue"][1])}} if "tissue" in targets else {}
    written: list[Path] = []
    with pq.ParquetFile(table_path, pre_buffer=False) as parquet:
        indices = _index(parquet, set(targets), class_values)
        for task, (head, classes) in targets.items():
            image = predictions / head
            base = zarr.open_array(image / "0", mode="r")
            cell = float(heads.get(head, {}).get("cell_px", 1))
            downsample = float(attrs.get("downsample", 1.0)) * cell
            index = indices.get(task)
            colors, properties = _legend(task, index, classes, info["colors"])
            semantic = not LABEL_IMAGES[task][2]
            dtype = ("uint8" if len(classes) < 255 else "uint16") if semantic else "int32"
            name = LABEL_IMAGES[task][1]
            extra = {"task": task, "classes": classes} if semantic else {"task": task, "instances": 0 if index is None else len(index.value)}
            with label_group(image, name, shape=base.shape[1:], chunks=base.chunks[1:], dtype=dtype,
                             colors=colors, properties=properties, attrs=extra) as array:
                if index is not None:
                    _rasterise(array, index, _Geometries(parquet, index), downsample=downsample)
            written.append(image / "labels" / name)
    return written


def _targets(predictions: Path, heads: dict[str, Any]) -> dict[str, tuple[str, list[str]]]:
    """task -> (head image, its class names) for the tasks whose head image is in the store."""
    out: dict[str, tuple[str, list[str]]] = {}
    patch = [name for name, h in heads.items() if h.get("kind") == "patch"]
    for task, (head, _, _) in LABEL_IMAGES.items():
        if task == "tissue":
            head = patch[0] if patch else head
        if (predictions / head / "0").exists():
            out[task] = (head, list((heads.get(head) or {}).get("classes") or []))
    return out

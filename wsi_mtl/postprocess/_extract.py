"""Whole-slide extraction: predictions.zarr -> streamed :class:`~wsi_mtl.objects.ObjectBatch`.

How borders are handled, per task:

* **Nuclei** (model grid). Chunks of ``chunk_px`` with a halo. The watershed of one connected
  blob of foreground depends only on that blob, so an object is exactly what a whole-slide run
  gives once its blob is complete in the read region. A chunk keeps the objects whose bounding-box
  start it owns; while the blob of an owned object touches a read edge inside the slide, the chunk
  is redone with twice the halo (up to ``max_halo_px``). If a blob is still cut at that halo, the
  object is kept when it does not itself touch the edge (a warning is logged), and an object cut
  by the edge is written as the part inside the read region, flagged ``truncated``. The instance
  step runs only on the boxes of the blobs that can hold owned nuclei (plus
  :data:`NUCLEI_CONTEXT_PX`); a chunk whose such blob reaches an open read edge is redone with the
  larger halo before computing anything.
* **Glands and lumen** (model grid by default). The same chunk/halo/ownership scheme, on chunks
  of ``gland_chunk_px`` (default 4096 px, twice the nuclei's: a gland's halo is twice a nucleus
  blob's, and a wider chunk spends less of its work on its halo; on a real-tissue mosaic gland
  chunks of 4096 px take ~2/3 of the CPU time of 2048 px ones, ~0.2 GB more per process): an object
  is complete when its bounding box lies at least ``2 * erosion + 1`` pixels from every inner read
  edge (growing the cores back by the erosion size then sees every core that could compete for a
  pixel, and hole filling sees the whole object); a lumen also needs every gland it overlaps to be
  complete (the lumen-inside-gland test). Glands can be millimetres wide, so a chunk doubles its
  halo on the sides where that fails until it holds, up to ``gland_max_halo_px`` (default 2048 px
  = 1 mm at 0.5 um/px); the other sides keep theirs (an object near one edge costs no read beyond
  the other three).
  An object still cut at that halo is written cut at the halo edge (the part inside the region
  read by the chunk that owns its bounding-box start, so one chunk writes it) and flagged
  ``truncated``. As for nuclei, the steps run only on the part of the read region the owned
  objects need (:func:`_gland_context`). ``gland_downsample`` can run this on an
  area-averaged grid instead (16x fewer pixels at 4), at a cost in accuracy: on GlaS masks through
  3-class maps the median gland IoU is 0.997 on the model grid, 0.97 at 2x and 0.91 at 4x coarser.
* **Tissue** (Patch-Class grid). Per-pixel argmax needs no halo; regions are traced with exact
  pixel-edge outlines, and regions touching a chunk edge are merged with :func:`shapely.union_all`
  after all chunks (exact, because pixel-edge outlines of adjacent parts share their edges), then
  simplified.

Every task: polygons are clipped to the slide's extent, and objects with less than
``min_in_tissue`` of their pixels inside the stored tissue mask are dropped (tissue-class cells
with less than that share of tissue get no class), unless the slide was run without a mask.
Problems that do not stop the run (truncated objects, blobs wider than the nuclei halo) are
counted and reported as one warning line per kind in :attr:`ObjectStream.warnings`.

Chunks run in a process pool with at most ``2 * workers`` chunks in flight, so memory depends on
the chunk size, not on the slide size or the number of objects (except tissue regions that touch
chunk edges, which wait for the merge).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from wsi_mtl.errors import InputError
from wsi_mtl.malloc import release_freed_pages, release_if_larger
from wsi_mtl.objects import COLUMNS, TASKS, ObjectBatch, new_ids
from wsi_mtl.postprocess import _compiled
from wsi_mtl.postprocess._chunks import Chunk, plan_chunks
from wsi_mtl.postprocess._instances import (
    _inside_fraction,
    _mean_foreground,
    _sizes,
    mean_foreground_of_pieces,
    Components,
    box_table,
    core_mask,
    grow_components,
    kept_components,
    labelled_boxes,
    mask_components,
    opened_cores,
    owners,
    relabeled,
    slices_of,
    NECK_REACH_PX,
    nuclei_foreground,
    _nuclei_instances,
    downsample_prob,
    instance_type,
)
from wsi_mtl.postprocess._gland_setting import non_glandular_cells, non_glandular_channels, non_glandular_share
from wsi_mtl.postprocess._polygons import labels_to_polygons, polygon_measurements
from wsi_mtl.postprocess._tissue import NO_CLASS, _finish_regions, _tissue_parts, nearest_sources, tissue_class_map, window_sums

__all__ = [
    "PostprocessParams",
    "check_overrides",
    "HaloTooSmallError",
    "MapsMeta",
    "HeadMeta",
    "extract_objects",
    "objects_from_maps",
    "read_meta",
    "concat_batches",
    "ObjectStream",
]

log = logging.getLogger(__name__)

NUCLEI_INST, NUCLEI_TYPE = "Nuclei-INST", "Nuclei-TYPE"
GLAND_INST, GLAND_TYPE = "Gland-INST", "Gland-TYPE"
LUMEN_INST, PATCH = "Lumen-INST", "Patch-Class"

#: heads each task needs (the type heads are optional)
#: tissue-head class names that mean glass or background: such cells get no tissue region
GLASS_CLASSES = frozenset({"empty", "background", "glass"})

_REQUIRED = {"nuclei": NUCLEI_INST, "gland": GLAND_INST, "lumen": LUMEN_INST, "tissue": PATCH}


class HaloTooSmallError(InputError):
    """An object is larger than the largest halo allowed (no longer raised by extraction, which
    writes such objects flagged ``truncated``; kept for callers that catch it)."""


@dataclass(frozen=True)
class PostprocessParams:
    """Post-processing settings; sizes in model pixels (0.5 um/px for Cerberus) unless noted.

    Attributes
    ----------
    nuclei_min_area_px, nuclei_marker_threshold, nuclei_mask_threshold
        See :func:`~wsi_mtl.postprocess.nuclei_instances`.
    nuclei_split_h, nuclei_min_interior
        ``split_h`` and ``min_interior`` of :func:`~wsi_mtl.postprocess.nuclei_instances`
        (0 = off): cut nuclei at the necks of their distance map, drop unconfident ones.
    gland_threshold, gland_erosion_px, gland_min_area_px, gland_open_px
        See :func:`~wsi_mtl.postprocess.gland_instances` (erosion 5 = Cerberus' 11x11).
    gland_max_nonglandular : float
        Glands whose mean share of tissue in which glands do not lie (stroma, lymphocytes, fat,
        glass, by the tissue head ``Patch-Class``; :mod:`~wsi_mtl.postprocess._gland_setting`) is
        above this are dropped, with the lumen inside them (1 = keep every gland; needs the tissue head).
    gland_min_probability : float
        Glands whose mean gland probability over their pixels (interior + boundary of
        ``Gland-INST``, the measure of the table's ``probability``) is below this are dropped, with
        the lumen inside them (0 = keep every gland).
    lumen_threshold, lumen_erosion_px, lumen_min_area_px, lumen_min_inside
        See :func:`~wsi_mtl.postprocess.lumen_instances`.
    gland_downsample : int
        Glands and lumen are processed on a grid this many model pixels per pixel (1: the model
        grid; larger is faster but less accurate, see the module notes).
    gland_chunk_px, gland_halo_px, gland_max_halo_px
        Owned side of a gland and lumen chunk (rounded up to a multiple of ``gland_downsample``),
        its first and its largest halo, in model pixels. Glands need twice the nuclei's halo, so
        their chunks are twice as wide: less of each chunk's work is halo, at more memory per chunk.
    simplify_px : float
        Polygon simplification tolerance in pixels of the grid each task runs on.
    tissue_min_area_px : int
        Smallest tissue region kept, in Patch-Class pixels.
    min_in_tissue : float
        Nuclei, glands and lumen with less than this fraction of their pixels inside the tissue
        mask are dropped, and Patch-Class cells less than this fraction tissue get no tissue
        class (0 = keep everything; ignored for slides run with ``--no-tissue-mask``).
    tissue_window_cells, tissue_min_window_share
        The tissue head classifies each Patch-Class cell from the ``tissue_window_cells`` wide
        window of cells around it, so at the tissue's edge glass makes up part of what it sees (a
        rim of fat or mucosa along every border against glass). A cell whose window is less than
        ``tissue_min_window_share`` tissue by the mask takes the probabilities, and so the class,
        of the nearest cell whose window is that much tissue, within ``tissue_window_cells // 2 + 1``
        cells (ties: the cell above, then the one to the left); cells with none that near keep
        their own. The tissue map and ``gland_max_nonglandular`` both read these classes. 0 = off,
        the default; a model's runs set it to its tissue head's window
        (``ModelConfig.postprocess_settings``). Needs the tissue mask.
    """

    nuclei_min_area_px: float = 10
    nuclei_marker_threshold: float = 0.5
    nuclei_mask_threshold: float = 0.5
    nuclei_split_h: float = 0
    nuclei_min_interior: float = 0
    gland_threshold: float = 0.5
    gland_erosion_px: float = 5
    gland_min_area_px: float = 400
    gland_open_px: float = 0
    gland_max_nonglandular: float = 1.0
    gland_min_probability: float = 0.0
    lumen_threshold: float = 0.5
    lumen_erosion_px: float = 1
    lumen_min_area_px: float = 40
    lumen_min_inside: float = 0.5
    gland_downsample: int = 1
    gland_chunk_px: int = 4096
    gland_halo_px: int = 1024
    gland_max_halo_px: int = 2048
    simplify_px: float = 0.5
    tissue_min_area_px: int = 1
    min_in_tissue: float = 0.5
    tissue_window_cells: int = 0
    tissue_min_window_share: float = 0.95

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> PostprocessParams:
        """Defaults overridden by the known keys of ``values`` (a model's tuned settings); others are ignored."""
        kinds = _field_kinds()
        values = dict(values or {})
        unknown = sorted(set(values) - set(kinds))
        if unknown:
            log.warning("ignoring unknown post-processing settings %s", unknown)
        return cls(**{k: kinds[k](v) for k, v in values.items() if k in kinds})

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> PostprocessParams:
        """These settings with a user's ``overrides`` (field name -> number; see :func:`check_overrides`)."""
        return replace(self, **check_overrides(overrides))

    def gland_grid(self) -> GlandGrid:
        """The gland and lumen settings in pixels of the grid they are made on (``gland_downsample``)."""
        f = int(self.gland_downsample)
        return GlandGrid(f, math.ceil(self.gland_erosion_px / f), self.gland_open_px / f, self.gland_min_area_px / f**2,
                         math.ceil(self.lumen_erosion_px / f), self.lumen_min_area_px / f**2)


@dataclass(frozen=True)
class GlandGrid:
    """Gland and lumen settings on the grid of ``factor`` model pixels per pixel where glands and
    lumen are made: distances divided by it (growth rounded up to whole pixels), areas by its square."""

    factor: int
    gland_erosion_px: int
    gland_open_px: float
    gland_min_area_px: float
    lumen_erosion_px: int
    lumen_min_area_px: float


def _field_kinds() -> dict[str, type]:
    """``PostprocessParams`` field name -> ``int`` or ``float``."""
    return {f.name: (int if f.type in ("int", int) else float) for f in fields(PostprocessParams)}


def check_overrides(overrides: Mapping[str, Any] | None) -> dict[str, float | int]:
    """A user's post-processing overrides (``PostprocessParams`` field -> number), checked and
    converted to each field's type.

    Raises
    ------
    InputError
        An unknown field, or a value that is not a finite number >= 0 (a whole number for the
        integer fields, >= 1 for ``gland_downsample``).
    """
    kinds = _field_kinds()
    checked: dict[str, float | int] = {}
    for key, value in dict(overrides or {}).items():
        if key not in kinds:
            raise InputError(f"unknown post-processing setting {key!r}; known: {', '.join(kinds)}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise InputError(f"post-processing setting {key} must be a number, got {value!r}") from None
        if not math.isfinite(number) or number < 0:
            raise InputError(f"post-processing setting {key} must be a finite number >= 0, got {value!r}")
        if kinds[key] is int and not number.is_integer():
            raise InputError(f"post-processing setting {key} must be a whole number, got {value!r}")
        if key in ("min_in_tissue", "gland_min_probability", "tissue_min_window_share") and number > 1:
            raise InputError(f"post-processing setting {key} must be a fraction in [0, 1], got {value!r}")
        if key == "tissue_window_cells" and number % 2 == 0 and number > 0:
            raise InputError(f"post-processing setting {key} must be 0 or odd (a window centred on its cell), got {value!r}")
        if key in ("gland_downsample", "gland_chunk_px") and number < 1:
            raise InputError(f"post-processing setting {key} must be >= 1, got {value!r}")
        checked[key] = kinds[key](number)
    return checked


@dataclass(frozen=True)
class HeadMeta:
    """One stored head: array shape (C, H, W), level-0 px per array px, class names, colours."""

    shape: tuple[int, int, int]
    downsample: float
    classes: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class MapsMeta:
    """What post-processing needs to know about a predictions store."""

    slide_mpp: float
    downsample: float
    heads: dict[str, HeadMeta] = field(default_factory=dict)
    #: The model's tuned post-processing settings recorded in the store (``PostprocessParams`` fields).
    postprocess: dict[str, Any] = field(default_factory=dict)
    #: Level-0 (width, height) of the slide: every geometry is clipped to it (None: not clipped).
    slide_size: tuple[int, int] | None = None
    #: Level-0 px per tissue-mask px of the stored mask; None where no mask is used.
    mask_downsample: float | None = None


# ------------------------------------------------------------------------------------ reading


def _ome_scale(attrs: Mapping[str, Any]) -> float | None:
    try:
        ms = (attrs.get("ome") or attrs)["multiscales"][0]
        if any(isinstance(a, dict) and a.get("unit") for a in ms.get("axes", [])):
            return None  # a scale in micrometres (wsi_mtl.ome): the downsample comes from the attributes
        for t in ms["datasets"][0]["coordinateTransformations"]:
            if t.get("type") == "scale":
                return float(t["scale"][-1])
    except (KeyError, IndexError, TypeError):
        return None
    return None


def _mask_downsample(attrs: Mapping[str, Any], slide_mpp: float) -> float | None:
    """Level-0 px per pixel of the stored tissue mask, from its OME scale (in level-0 px, or in
    micrometres where its axes carry a unit); None where unreadable."""
    try:
        ms = (attrs.get("ome") or attrs)["multiscales"][0]
        scale = next(float(t["scale"][-1]) for t in ms["datasets"][0]["coordinateTransformations"] if t.get("type") == "scale")
        in_um = any(isinstance(a, dict) and a.get("unit") for a in ms.get("axes", []))
    except (KeyError, IndexError, TypeError, ValueError, StopIteration):
        log.warning("tissue mask without a readable scale: objects are not filtered by it")
        return None
    return scale / slide_mpp if in_um else scale


def read_meta(predictions_path: str | Path) -> MapsMeta:
    """Read slide mpp, downsample and per-head geometry/classes from a predictions.zarr.

    Raises
    ------
    InputError
        The path is not a readable predictions store or lacks the ``wsimtl`` attributes.
    """
    import zarr

    path = Path(predictions_path)
    if not path.exists():
        raise InputError(f"predictions store not found: {path}")
    try:
        root = zarr.open_group(path, mode="r")
    except Exception as exc:  # zarr raises several unrelated types for a non-store
        raise InputError(f"{path} is not a readable predictions.zarr: {exc}") from exc
    attrs = dict(root.attrs.get("wsimtl", {}))
    if not attrs:
        raise InputError(f"{path} has no 'wsimtl' attributes: not a wsimtl predictions.zarr")
    slide = attrs.get("slide") or {}
    slide_mpp = attrs.get("slide_mpp", slide.get("mpp"))
    ds = attrs.get("downsample")
    if ds is None and slide_mpp and attrs.get("model_mpp"):
        ds = float(attrs["model_mpp"]) / float(slide_mpp)
    if not slide_mpp or not ds:
        raise InputError(f"{path}: the 'wsimtl' attributes lack the slide mpp or the downsample")
    heads: dict[str, HeadMeta] = {}
    for name, info in (attrs.get("heads") or {}).items():
        if name not in root or "0" not in root[name]:
            continue
        arr = root[name]["0"]
        scale = _ome_scale(dict(root[name].attrs))
        head_ds = scale if scale else float(ds) * float(info.get("cell_px", 1))
        classes = tuple(info.get("classes") or info.get("class_names") or ())
        colors = tuple(tuple(int(v) for v in c) for c in info.get("colors") or ())
        heads[name] = HeadMeta(tuple(arr.shape), float(head_ds), classes, colors)
    size = (slide.get("width"), slide.get("height"))
    slide_size = (int(size[0]), int(size[1])) if all(isinstance(v, (int, float)) and v > 0 for v in size) else None
    mask_ds = None
    if "tissue_mask" in root and "0" in root["tissue_mask"]:
        mask_ds = _mask_downsample(dict(root["tissue_mask"].attrs), float(slide_mpp))
    return MapsMeta(float(slide_mpp), float(ds), heads, dict(attrs.get("postprocess") or {}), slide_size, mask_ds)


class _ZarrReader:
    def __init__(self, path: str | Path) -> None:
        import zarr

        self.root = zarr.open_group(Path(path), mode="r")
        self._arrays: dict[str, Any] = {}
        self._mask: np.ndarray | None = None

    def mask(self) -> np.ndarray:
        """The stored tissue mask (2-D bool), read once."""
        if self._mask is None:
            self._mask = np.asarray(self.root["tissue_mask"]["0"][0]) > 0
        return self._mask

    def read(self, head: str, region: tuple[int, int, int, int], channels: slice = slice(None)) -> np.ndarray:
        """``head``'s level-0 map over ``region`` (rows y0:y1, cols x0:x1), ``channels`` only, one
        row of stored chunks at a time: zarr reading a region at once holds every chunk's
        compressed bytes and decoded pixels beside the result (~3x the result: 164 MB at the peak
        of a 16,384^2 mosaic's gland chunk, for 51 MB read); here one row's are held at a time,
        decoded into the result itself (~14% less CPU than through an array per row)."""
        array = self._array(head)
        y0, y1, x0, x1 = region
        spans = _chunk_spans(y0, y1, array.chunks[-2])
        if len(spans) <= 1:
            return np.asarray(array[channels, y0:y1, x0:x1])
        from zarr.core.buffer.cpu import NDBuffer

        out = np.empty((len(range(*channels.indices(array.shape[0]))), y1 - y0, x1 - x0), array.dtype)
        for a, b in spans:  # decoded straight into the result: no row array between
            array.get_basic_selection((channels, slice(a, b), slice(x0, x1)), out=NDBuffer.from_numpy_array(out[:, a - y0 : b - y0]))
        return out

    def pieces(self, head: str, region: tuple[int, int, int, int], channels: slice = slice(None)) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
        """:meth:`read` one stored chunk at a time, row by row: ((its first row and column in
        ``region``), its pixels), with one chunk's bytes held at a time."""
        array = self._array(head)
        y0, y1, x0, x1 = region
        cols = _chunk_spans(x0, x1, array.chunks[-1])
        for a, b in _chunk_spans(y0, y1, array.chunks[-2]):
            for c, d in cols:
                yield (a - y0, c - x0), np.asarray(array[channels, a:b, c:d])

    def dtype(self, head: str) -> np.dtype:
        return self._array(head).dtype

    def _array(self, head: str) -> Any:
        if head not in self._arrays:
            self._arrays[head] = self.root[head]["0"]
        return self._arrays[head]


def _chunk_spans(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    """The pieces (first, end) of [start, stop) cut at multiples of ``size``."""
    cuts = [start, *range((start // size + 1) * size, stop, size)] if stop > start else []
    return list(zip(cuts, [*cuts[1:], stop]))


class _ArrayReader:
    def __init__(self, maps: Mapping[str, np.ndarray], mask: np.ndarray | None = None) -> None:
        self.maps = maps
        self._mask = mask

    def mask(self) -> np.ndarray:
        assert self._mask is not None, "no tissue mask given"
        return self._mask

    def read(self, head: str, region: tuple[int, int, int, int], channels: slice = slice(None)) -> np.ndarray:
        y0, y1, x0, x1 = region
        return np.asarray(self.maps[head][channels, y0:y1, x0:x1])

    def pieces(self, head: str, region: tuple[int, int, int, int], channels: slice = slice(None)) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
        yield (0, 0), self.read(head, region, channels)

    def dtype(self, head: str) -> np.dtype:
        return np.dtype(self.maps[head].dtype)


# ------------------------------------------------------------------------------- chunk workers


@dataclass(frozen=True)
class _Job:
    group: str  # "nuclei" | "glands" | "tissue"
    chunk: Chunk
    tasks: tuple[str, ...]
    max_halo_px: int


@dataclass(frozen=True)
class _Grow:
    """A chunk's answer where an object it may own comes near read edges whose halo can still grow:
    those sides (top, bottom, left, right)."""

    edges: tuple[bool, bool, bool, bool]


def _empty_result() -> dict[str, Any]:
    return {}


def _rows(task: str, class_id: np.ndarray, prob: np.ndarray, polys: np.ndarray, meta: MapsMeta, *,
          nucleus_prob: np.ndarray | None = None, truncated: np.ndarray | None = None) -> dict[str, Any]:
    """Table rows of one task's objects, clipped to the slide (objects left empty are dropped)."""
    n = len(polys)
    cols = {
        "class_id": np.asarray(class_id, np.int32),
        "probability": np.asarray(prob, np.float32),
        "nucleus_probability": np.full(n, np.nan) if nucleus_prob is None else np.asarray(nucleus_prob, np.float64),
        "truncated": np.zeros(n, bool) if truncated is None else np.asarray(truncated, bool),
    }
    polys, keep = _clip_to_slide(np.asarray(polys, dtype=object), meta.slide_size, multi=task == "tissue")
    if not keep.all():
        polys = polys[keep]
        cols = {k: v[keep] for k, v in cols.items()}
    m = polygon_measurements(polys, mpp=meta.slide_mpp, shape_features=task != "tissue")
    return {"task": task, **cols, "geometry": polys, **m}


def _polygonal(geom: shapely.Geometry, multi: bool) -> shapely.Geometry:
    """The polygon parts of a clipped geometry: all of them (``multi``) or the largest."""
    parts = [p for p in shapely.get_parts(geom) if isinstance(p, shapely.Polygon) and not p.is_empty]
    if not parts:
        return shapely.Polygon()
    if not multi:
        return max(parts, key=lambda p: p.area)
    return parts[0] if len(parts) == 1 else shapely.MultiPolygon(parts)


def _clip_to_slide(polys: np.ndarray, size: tuple[int, int] | None, *, multi: bool) -> tuple[np.ndarray, np.ndarray]:
    """Polygons cut to ``[0, width] x [0, height]`` and which of them are left non-empty."""
    if size is None or len(polys) == 0:
        return polys, np.ones(len(polys), bool)
    w, h = size
    b = shapely.bounds(polys)
    out = (b[:, 0] < 0) | (b[:, 1] < 0) | (b[:, 2] > w) | (b[:, 3] > h)
    if out.any():
        polys = polys.copy()
        cut = shapely.intersection(polys[out], shapely.box(0, 0, w, h))
        polys[out] = [_polygonal(g, multi) for g in cut]
    return polys, ~shapely.is_empty(polys) & (shapely.area(polys) > 0)


def _mask_index(reader: Any, meta: MapsMeta, region: tuple[int, int, int, int], grid_ds: float,
                samples: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The tissue mask with a row and a column of glass added, and for each row and column of a
    grid region (``samples`` points each) the mask row or column it samples (nearest; outside the
    mask: the added glass)."""
    mask = reader.mask()
    mh, mw = mask.shape
    padded = np.zeros((mh + 1, mw + 1), bool)
    padded[:mh, :mw] = mask
    offs = (np.arange(samples) + 0.5) / samples
    y0, y1, x0, x1 = region

    def index(a: int, b: int, limit: int) -> np.ndarray:
        pos = ((np.arange(a, b)[:, None] + offs[None, :]) * (grid_ds / meta.mask_downsample)).ravel()
        return np.where(pos < limit, pos.astype(np.int64), limit)

    return padded, index(y0, y1, mh), index(x0, x1, mw)


def _mask_fraction(reader: Any, meta: MapsMeta, region: tuple[int, int, int, int], grid_ds: float, *, samples: int = 1) -> np.ndarray:
    """Share of each pixel of a grid region that the tissue mask calls tissue.

    ``region`` is ``(y0, y1, x0, x1)`` on a grid of ``grid_ds`` level-0 px per pixel; each pixel is
    sampled at ``samples x samples`` points (nearest mask pixel); outside the mask counts as glass.
    Returns float32 (H, W) for ``samples > 1``, else bool.
    """
    counts = _mask_counts(reader, meta, region, grid_ds, samples=samples)
    return counts > 0 if samples == 1 else counts.astype(np.float32) / (samples * samples)


def _mask_counts(reader: Any, meta: MapsMeta, region: tuple[int, int, int, int], grid_ds: float, *, samples: int = 1) -> np.ndarray:
    """How many of the ``samples x samples`` points of each pixel of a grid region the tissue mask
    calls tissue (int64; see :func:`_mask_fraction`)."""
    padded, iy, ix = _mask_index(reader, meta, region, grid_ds, samples)
    y0, y1, x0, x1 = region
    return padded[np.ix_(iy, ix)].reshape(y1 - y0, samples, x1 - x0, samples).sum(axis=(1, 3), dtype=np.int64)


def _in_tissue(reader: Any, meta: MapsMeta, params: PostprocessParams, labels: np.ndarray, ids: np.ndarray,
               region: tuple[int, int, int, int], grid_ds: float, *, clip: bool = False) -> np.ndarray:
    """The ``ids`` of ``labels`` (read at ``region`` of a ``grid_ds`` grid) lying mostly in tissue.

    With ``clip``, the pixels of ``labels`` outside the mask are also set to 0 (in place), so that
    large objects (glands, lumen) end where the tissue ends.
    """
    if meta.mask_downsample is None or params.min_in_tissue <= 0 or len(ids) == 0:
        return ids
    n = int(labels.max(initial=0)) + 1
    if _compiled.available() and labels.ndim == 2 and labels.flags.c_contiguous:  # one pass, no full-size mask
        padded, iy, ix = _mask_index(reader, meta, region, grid_ds)
        total, within = _compiled.tissue_counts(labels, padded, iy, ix, n, clip)
    else:
        inside = _mask_fraction(reader, meta, region, grid_ds)
        total = _sizes(labels, n)
        within = np.bincount(labels[(labels > 0) & inside], minlength=n)
        if clip:
            labels[~inside] = 0
    return ids[within[ids] >= params.min_in_tissue * np.maximum(total[ids], 1)]


def _owned_boxes(box: np.ndarray, chunk: Chunk) -> np.ndarray:
    """The labels (of a :func:`box_table`, local to the chunk's read region) whose bounding-box
    start lies in the chunk's own region; missing labels are not owned."""
    y0, y1, x0, x1 = _local_own(chunk)
    mine = (box[:, 1] > box[:, 0]) & (box[:, 0] >= y0) & (box[:, 0] < y1) & (box[:, 2] >= x0) & (box[:, 2] < x1)
    return np.flatnonzero(mine).astype(np.int64) + 1


def _touches_open_edge(sl: tuple[slice, slice], shape: tuple[int, int], chunk: Chunk, margin: int = 1) -> bool:
    """Whether a crop-local bounding box comes within ``margin`` px of an inner read edge."""
    return bool(_near_open_edge(np.array([[sl[0].start, sl[0].stop, sl[1].start, sl[1].stop]]), shape, chunk, margin)[0])


def _near_open_edge(box: np.ndarray, shape: tuple[int, int], chunk: Chunk, margin: int = 1) -> np.ndarray:
    """Whether each crop-local box (rows of row0, row1, col0, col1) comes within ``margin`` px of
    an inner read edge."""
    return _near_open_edges(box, shape, chunk, margin).any(axis=1)


def _near_open_edges(box: np.ndarray, shape: tuple[int, int], chunk: Chunk, margin: int = 1) -> np.ndarray:
    """(n, 4) bool: whether each crop-local box comes within ``margin`` px of the read region's
    top, bottom, left and right edge where that edge lies inside the map."""
    top, bottom, left, right = chunk.open_edges
    h, w = shape
    return np.stack([top & (box[:, 0] < margin), bottom & (box[:, 1] > h - margin),
                     left & (box[:, 2] < margin), right & (box[:, 3] > w - margin)], axis=1).reshape(-1, 4)


def _sides_to_grow(box: np.ndarray, shape: tuple[int, int], chunk: Chunk, margin: int,
                   growable: tuple[bool, bool, bool, bool]) -> tuple[bool, bool, bool, bool]:
    """The ``growable`` sides that some box comes within ``margin`` px of."""
    near = _near_open_edges(box, shape, chunk, margin).any(axis=0)
    return tuple(bool(n and g) for n, g in zip(near, growable))  # type: ignore[return-value]


#: Context kept around the blobs a nuclei chunk may own, model px. A nucleus depends only on its
#: blob and on pixels a few px around it (neck cutting's smoothing and local maxima,
#: NECK_REACH_PX + 1, reading distance maps of blobs that close), far less than this.
NUCLEI_CONTEXT_PX = 16


def _tighten(inst: np.ndarray, chunk: Chunk, params: PostprocessParams) -> tuple[np.ndarray, Chunk, bool] | None:
    """The part of a nuclei chunk's read region its own nuclei need: the bounding boxes of the
    foreground blobs whose boxes meet the owned region (a nucleus's box start lies in its blob's
    box), grown by :data:`NUCLEI_CONTEXT_PX`; the rest of the halo only completes those blobs.
    Returns the map cropped to it, the chunk reading it and whether one of those blobs comes within
    neck cutting's reach of an open read edge (None: no such blob)."""
    _, box = labelled_boxes(nuclei_foreground(inst, params.nuclei_mask_threshold), labels=False)
    if len(box) == 0:
        return None
    meet = _meeting(box, 0, _local_own(chunk))
    if not meet.any():
        return None
    a, b, l, r = rect = _union(box[meet], NUCLEI_CONTEXT_PX, inst.shape[1:])
    near_edge = _touches_open_edge(_slices(_union(box[meet], 0, inst.shape[1:])), inst.shape[1:], chunk, _neck_reach(params))
    return inst[:, a:b, l:r], _crop_chunk(chunk, rect), near_edge


def _meeting(box: np.ndarray, grow: int, rect: tuple[int, int, int, int]) -> np.ndarray:
    """Which boxes (rows of row0, row1, col0, col1), grown by ``grow`` px, meet ``rect``."""
    y0, y1, x0, x1 = rect
    return (box[:, 0] - grow < y1) & (box[:, 1] + grow > y0) & (box[:, 2] - grow < x1) & (box[:, 3] + grow > x0)


def _meeting_any(box: np.ndarray, others: np.ndarray, grow: int, pairs: int = 1 << 22) -> np.ndarray:
    """Which boxes, grown by ``grow`` px, meet at least one of ``others`` (about ``pairs`` box pairs
    compared at a time)."""
    hit = np.zeros(len(box), bool)
    block = max(1, pairs // max(1, len(box)))
    for i in range(0, len(others), block):
        o = others[i : i + block]
        hit |= ((box[:, None, 0] - grow < o[None, :, 1]) & (box[:, None, 1] + grow > o[None, :, 0])
                & (box[:, None, 2] - grow < o[None, :, 3]) & (box[:, None, 3] + grow > o[None, :, 2])).any(axis=1)
    return hit


def _union(box: np.ndarray, grow: int, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """The rectangle holding every box grown by ``grow`` px, clipped to ``shape``."""
    return (max(0, int(box[:, 0].min()) - grow), min(shape[0], int(box[:, 1].max()) + grow),
            max(0, int(box[:, 2].min()) - grow), min(shape[1], int(box[:, 3].max()) + grow))


def _slices(rect: tuple[int, int, int, int]) -> tuple[slice, slice]:
    return slice(rect[0], rect[1]), slice(rect[2], rect[3])


def _neck_reach(params: PostprocessParams) -> int:
    """How close (px) a blob may come to an open read edge: neck cutting reads a few pixels around it."""
    return 1 + (NECK_REACH_PX if params.nuclei_split_h > 0 else 0)


def _local_own(chunk: Chunk) -> tuple[int, int, int, int]:
    y0, y1, x0, x1 = chunk.own
    return y0 - chunk.read[0], y1 - chunk.read[0], x0 - chunk.read[2], x1 - chunk.read[2]


def _boxes_of(slices: list, ids: Iterable[int]) -> np.ndarray:
    """(row0, row1, col0, col1) of the objects ``ids`` from their ``find_objects`` slices."""
    return np.array([(s[0].start, s[0].stop, s[1].start, s[1].stop) for s in (slices[i - 1] for i in ids)], np.int64).reshape(-1, 4)


def _only(labels: np.ndarray, ids: np.ndarray, box: np.ndarray, *, reuse: bool = True) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """``labels`` holding only ``ids`` (boxes ``box``, one row each; the rest 0), cropped to their
    boxes grown by one pixel: the crop and its rectangle (local). Each object's pixels, outline
    and sums stay as they were, on fewer pixels. With ``reuse`` the caller hands ``labels`` over and
    the crop is made in its buffer (:func:`_crop_in_place`): the two are never held at once, but
    the crop holds the whole buffer (a crop that outlives larger steps is better a copy)."""
    rect = _union(box, 1, labels.shape)
    crop = _crop_in_place(labels, rect) if reuse else labels[_slices(rect)]
    keep = np.zeros(int(crop.max(initial=0)) + 1, bool)
    keep[ids[ids < keep.size]] = True
    lut = np.where(keep, np.arange(keep.size), 0).astype(labels.dtype)
    return relabeled(crop, lut, in_place=reuse), rect  # (a view that is not C-contiguous is copied)


def _crop_in_place(a: np.ndarray, rect: tuple[int, int, int, int]) -> np.ndarray:
    """``a[rect]``, C-contiguous in ``a``'s own buffer where ``a`` is a writeable C-contiguous array
    (its rows moved to the start; ``a`` is spent), else a view."""
    view = a[_slices(rect)]
    if view.flags.c_contiguous or not (a.flags.c_contiguous and a.flags.writeable):
        return view
    h, w = view.shape
    flat, width = a.reshape(-1), a.shape[1]
    for i in range(h):  # row i moves back, never onto a row not yet moved
        start = (rect[0] + i) * width + rect[2]
        flat[i * w : i * w + w] = flat[start : start + w]
    return flat[: h * w].reshape(h, w)


def _crop_chunk(chunk: Chunk, rect: tuple[int, int, int, int]) -> Chunk:
    """The chunk reading only ``rect`` (local to its read region); the edges it adds are open."""
    a, b, l, r = rect
    ry0, rx0 = chunk.read[0], chunk.read[2]
    return replace(chunk, read=(ry0 + a, ry0 + b, rx0 + l, rx0 + r))


def _nuclei_chunk(reader: Any, chunk: Chunk, meta: MapsMeta, params: PostprocessParams, final: bool) -> dict[str, Any] | None:
    inst = reader.read(NUCLEI_INST, chunk.read, channels=slice(1, None))  # interior and boundary: all the steps read
    tight = _tighten(inst, chunk, params) if inst.any() else None
    if tight is None:
        return _empty_result()
    inst, chunk, near_edge = tight  # its inner edges lie NUCLEI_CONTEXT_PX from every blob it may own
    if near_edge and not final:
        return None  # a blob it may own may go on beyond the read region: redone with a larger halo,
        # before any instance is computed (the same objects come out at any halo that holds them)
    labels, comps = _nuclei_instances(
        inst,
        min_area_px=params.nuclei_min_area_px,
        marker_threshold=params.nuclei_marker_threshold,
        mask_threshold=params.nuclei_mask_threshold,
        min_marker_px=1,
        keep_unmarked=True,
        split_h=params.nuclei_split_h,
        min_interior=params.nuclei_min_interior,
    )
    box = box_table(labels)
    owned = _owned_boxes(box, chunk)
    if len(owned) == 0:
        return _empty_result()
    if any(chunk.open_edges):
        comp_of = owners(labels, comps, len(box) + 1)[owned]
        # only at the largest halo can an owned blob still be cut (before it, _tighten asked for more)
        cut = _near_open_edge(box_table(comps)[comp_of - 1], labels.shape, chunk, _neck_reach(params))
        broken = cut & _near_open_edge(box[owned - 1], labels.shape, chunk)
    else:
        cut = broken = np.zeros(len(owned), bool)
    # what is measured from here on (a copy: kept in the label image's buffer, its halo rows would
    # outlive the crop through the measuring, which holds more than cropping there saves)
    labels, rect = _only(labels, owned, box[owned - 1], reuse=False)
    inst, chunk = inst[(slice(None), *_slices(rect))], _crop_chunk(chunk, rect)
    kept = _in_tissue(reader, meta, params, labels, owned, chunk.read, meta.downsample)
    ids, polys = labels_to_polygons(
        labels, offset_yx=(chunk.read[0], chunk.read[2]), downsample=meta.downsample,
        simplify_px=params.simplify_px, label_ids=kept,
    )
    truncated = np.isin(ids, owned[broken])
    fg = _mean_foreground(labels, inst, ids)
    if NUCLEI_TYPE in meta.heads:
        tprob = reader.read(NUCLEI_TYPE, chunk.read)
        cls, prob = instance_type(labels, tprob, never_class=0)  # every detected nucleus gets a nuclear type
        cls, prob = cls[ids - 1], prob[ids - 1]
    else:
        cls, prob = np.ones(len(ids), np.int32), fg
    out: dict[str, Any] = {"nuclei": _rows("nuclei", cls, prob, polys, meta, nucleus_prob=fg, truncated=truncated)}
    # counted by the main process (workers have no log handlers)
    halo = chunk.halo_px
    out["warnings"] = [(code, int(n), halo) for code, n in
                       (("nuclei_truncated", truncated.sum()), ("nuclei_wide_blob", (cut & ~broken).sum())) if n]
    return out


def _coarse_read(reader: Any, head: str, chunk: Chunk, f: int, fine_shape: tuple[int, int]) -> np.ndarray:
    y0, y1, x0, x1 = chunk.read
    region = (y0 * f, min(fine_shape[0], y1 * f), x0 * f, min(fine_shape[1], x1 * f))
    return downsample_prob(reader.read(head, region), f)


def _foreground_read(reader: Any, head: str, chunk: Chunk, f: int, fine_shape: tuple[int, int]) -> np.ndarray:
    """A gland or lumen map's interior and boundary channels (the last two) on the gland grid,
    which is all the gland steps read of them; at ``gland_downsample`` 1 the background channel is
    not read at all (a third less to copy and hold), coarser grids need it to average."""
    if f > 1:
        return _coarse_read(reader, head, chunk, f, fine_shape)[1:]
    return reader.read(head, chunk.read, channels=slice(1, None))


def _mean_foreground_read(reader: Any, head: str, chunk: Chunk, f: int, fine_shape: tuple[int, int], labels: np.ndarray,
                          ids: np.ndarray, *, length: int | None = None) -> np.ndarray:
    """:func:`_mean_foreground` of ``labels`` (over ``chunk``'s read region) on the gland or lumen
    map ``head`` there (:func:`_foreground_read`). A uint8 map on its own grid is read and summed
    one stored chunk at a time (the same means: integer sums), never held whole beside the labels;
    no object, no read."""
    if len(ids) == 0:
        return np.zeros(0)
    if f > 1 or reader.dtype(head) != np.uint8:
        return _mean_foreground(labels, _foreground_read(reader, head, chunk, f, fine_shape), ids, length=length)
    return mean_foreground_of_pieces(labels, reader.pieces(head, chunk.read, channels=slice(1, None)), ids, length=length)


def _gland_context(cores: list[Components], shape: tuple[int, int], chunk: Chunk, params: PostprocessParams,
                   growable: tuple[bool, bool, bool, bool]) -> tuple[tuple[int, int, int, int], list[np.ndarray]] | _Grow | None:
    """The part of a gland chunk's read region (local rows/cols) that its own glands and lumen
    need, from the components of the cores each object grows from (``cores``: those of the gland
    cores after their opening, then of the lumen cores if any, in a region of ``shape``; an object
    lies in its component's box grown by its erosion): the components that can give an object whose
    box starts in the owned region, then every component that could overlap them or compete for
    their pixels, whole, and around them the completeness margin. Returns that rectangle and, per
    entry of ``cores``, which of its components (in ``scipy.ndimage.label`` order) to keep
    (:func:`_kept_labels` labels them). Where one of the
    first, or a gland component that may overlap a lumen among them (the lumen's inside test needs
    it whole), comes within that margin of read edges of the ``growable`` sides: those sides
    (:class:`_Grow`, redo with a larger halo there). None: no such component."""
    grid = params.gland_grid()
    g_er, l_er = grid.gland_erosion_px, grid.lumen_erosion_px
    boxes, firsts = [], []
    own = _local_own(chunk)
    for comps, er in zip(cores, (g_er, l_er)):  # the boxes first: a label image is made only for a crop that is kept
        boxes.append(comps.box)
        firsts.append(_may_start_in(comps.box, er, own, chunk, shape))
    box, first = np.concatenate(boxes), np.concatenate(firsts)
    if not first.any():
        return None
    grow = max(g_er, l_er)
    margin = _gland_margin(grow, params)
    mine = _union(box[first], 0, shape)
    near = _meeting(box, 2 * grow + margin, mine)
    rect = _union(box[near], grow + margin + 1, shape)
    whole = [np.array([mine])]
    if len(boxes) > 1:  # checked here, before any label image: a chunk that must grow learns it cheaply
        whole.append(boxes[0][_meeting_any(boxes[0], boxes[1][firsts[1]], g_er + l_er)])
    more = _sides_to_grow(np.concatenate(whole), shape, chunk, grow + margin, growable)
    if any(more):
        return _Grow(more)
    return rect, np.split(near, np.cumsum([len(b) for b in boxes])[:-1])


def _kept_labels(cores: list[Components | None], k: int, keep: np.ndarray, rect: tuple[int, int, int, int]) -> np.ndarray:
    """The components ``keep`` of ``cores[k]`` in ``rect``, numbered as if the crop were labelled
    (:func:`kept_components`); they leave the list (the caller holds no other reference)."""
    comps, cores[k] = cores[k], None
    assert comps is not None
    return kept_components(comps, keep, rect)


def _gland_margin(erosion: int, params: PostprocessParams) -> int:
    """How far (px of the gland grid) from an open read edge an object grown by ``erosion`` is
    complete: growing back sees every competing core, and the opening looks two radii away."""
    return 2 * erosion + 1 + 2 * math.ceil(params.gland_grid().gland_open_px)


def _may_start_in(box: np.ndarray, grow: int, rect: tuple[int, int, int, int], chunk: Chunk, shape: tuple[int, int]) -> np.ndarray:
    """Which components (boxes, local to ``chunk``'s read region of ``shape``) can give an object
    whose bounding-box start lies in ``rect``: an object grown from a component by up to ``grow``
    px starts at most ``grow`` px above and left of the component's box. A component cut by an
    open right edge may start higher outside the region (any row from its box's start up), one cut
    by an open bottom edge further left; one cut by an open top or left edge starts before the
    region, so outside ``rect``."""
    y0, y1, x0, x1 = rect
    _, bottom, _, right = chunk.open_edges
    any_row = right & (box[:, 3] >= shape[1])
    any_col = bottom & (box[:, 1] >= shape[0])
    return (((box[:, 0] - grow < y1) | any_row) & (box[:, 0] >= y0)
            & ((box[:, 2] - grow < x1) | any_col) & (box[:, 2] >= x0))


def _glands_under(glands: np.ndarray, lumen: np.ndarray, ids: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The glands (labels) that the lumen ``ids`` (boxes ``box``, one row each) overlap."""
    under = [np.unique(glands[sl][lumen[sl] == i]) for i, sl in zip(ids, map(_slices, box))]
    found = np.unique(np.concatenate(under)) if under else np.zeros(0, np.int64)
    return found[found > 0].astype(np.int64)


def _non_glandular(reader: Any, meta: MapsMeta, params: PostprocessParams, glands: np.ndarray, ids: np.ndarray, slices: list,
                   chunk: Chunk) -> np.ndarray:
    """The glands of ``ids`` (complete, in the chunk's read region) lying mostly in tissue where glands
    do not lie (:mod:`._gland_setting`), now set to 0 in ``glands``; none without a tissue head."""
    head = meta.heads.get(PATCH)
    if head is None or len(ids) == 0 or not non_glandular_channels(head.classes):
        return np.zeros(0, np.int64)
    per_cell = round(head.downsample / meta.downsample) / params.gland_downsample  # gland-grid px per tissue cell
    y0, y1, x0, x1 = chunk.read
    box = _boxes_of(slices, ids)
    cy0, cy1 = int((y0 + box[:, 0].min()) // per_cell), int((y0 + box[:, 1].max() - 1) // per_cell) + 1
    cx0, cx1 = int((x0 + box[:, 2].min()) // per_cell), int((x0 + box[:, 3].max() - 1) // per_cell) + 1
    h, w = head.shape[1:]
    cy0, cx0 = min(cy0, h - 1), min(cx0, w - 1)
    cells = non_glandular_cells(_tissue_prob(reader, meta, params, (cy0, max(cy0 + 1, min(cy1, h)), cx0, max(cx0 + 1, min(cx1, w)))), head.classes)
    share = non_glandular_share(glands, ids, slices, cells, per_cell, origin_yx=(y0, x0), cells_origin=(cy0, cx0))
    return _set_to_zero(glands, np.asarray(ids, np.int64)[share > params.gland_max_nonglandular], slices)


def _unconfident(reader: Any, meta: MapsMeta, params: PostprocessParams, glands: np.ndarray, ids: np.ndarray,
                 slices: list, chunk: Chunk) -> np.ndarray:
    """The glands of ``ids`` (complete, in the chunk's read region) whose mean gland probability
    (interior + boundary, over their pixels) is below ``params.gland_min_probability``, now set to
    0 in ``glands``; the gland map is read over their boxes only."""
    ids = np.asarray(ids, np.int64)
    if len(ids) == 0:
        return ids
    rect = _union(_boxes_of(slices, ids), 0, glands.shape)
    # every label the chunk made is counted: the tissue test may have set some to 0 by now, the largest too
    mean = _mean_foreground_read(reader, GLAND_INST, _crop_chunk(chunk, rect), params.gland_grid().factor, meta.heads[GLAND_INST].shape[1:],
                                 glands[_slices(rect)], ids, length=len(slices) + 1)
    return _set_to_zero(glands, ids[mean < params.gland_min_probability], slices)


def _set_to_zero(labels: np.ndarray, ids: np.ndarray, slices: list) -> np.ndarray:
    """Set the labels ``ids`` (boxes ``slices``, index = label - 1) to 0 in ``labels``; returns ``ids``."""
    for i in ids:
        sl = slices[i - 1]
        labels[sl][labels[sl] == i] = 0
    return ids


@dataclass
class _OwnedLumen:
    """The lumen a gland chunk owns, cropped to their boxes (+1 px) before its glands are made."""

    labels: np.ndarray  # the owned lumen only (the rest 0), numbered as in the whole context
    rect: tuple[int, int, int, int]  # the crop, local to the chunk's read region
    ids: np.ndarray  # the owned labels
    box: np.ndarray  # their boxes, one row each, local to the crop
    cut: np.ndarray  # whether each comes near an open read edge


def _owned_lumen(comps: np.ndarray, chunk: Chunk, grid: Any, growable: tuple[bool, bool, bool, bool]) -> _OwnedLumen | _Grow | None:
    """The lumen grown from their kept core components (``comps``, grown in place) that ``chunk``
    owns: cropped to them (:func:`_only`); the sides to grow where one comes near an open read edge
    that can still grow; None where it owns none."""
    er = grid.lumen_erosion_px
    lumen = grow_components(comps, erosion_px=er, min_area_px=grid.lumen_min_area_px, in_place=True)
    box = box_table(lumen)
    ids = _owned_boxes(box, chunk)
    if not len(ids):
        return None
    box = box[ids - 1]
    more = _sides_to_grow(box, lumen.shape, chunk, 2 * er + 1, growable)
    if any(more):
        return _Grow(more)
    cut = _near_open_edge(box, lumen.shape, chunk, 2 * er + 1)
    crop, rect = _only(lumen, ids, box, reuse=False)  # a copy: it is held while the glands are made
    return _OwnedLumen(crop, rect, ids, box - np.array([rect[0], rect[0], rect[2], rect[2]]), cut)


def _inner(rect: tuple[int, int, int, int], sub: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """``sub`` (local to ``rect``) local to what ``rect`` is local to."""
    return rect[0] + sub[0], rect[0] + sub[1], rect[2] + sub[2], rect[2] + sub[3]


def _glands_chunk(reader: Any, chunk: Chunk, meta: MapsMeta, params: PostprocessParams,
                  growable: tuple[bool, bool, bool, bool], tasks: tuple[str, ...]) -> dict[str, Any] | _Grow:
    grid = params.gland_grid()
    f = grid.factor
    fine = meta.heads[GLAND_INST].shape[1:]
    ginst = _foreground_read(reader, GLAND_INST, chunk, f, fine)
    if not ginst.any() and not ("lumen" in tasks and params.lumen_min_inside <= 0):
        return _empty_result()  # no gland here, nor a lumen (which needs a gland unless lumen_min_inside is 0)
    # only the cores' components are kept (not even the masks, with numba): the maps are read again
    # where the objects judged lie (their mean probability)
    shape = ginst.shape[1:]
    cores: list[Components | None] = [mask_components(opened_cores(ginst, params.gland_threshold, grid.gland_open_px))]
    ginst = None
    if "lumen" in tasks and LUMEN_INST in meta.heads:
        cores.append(mask_components(core_mask(_foreground_read(reader, LUMEN_INST, chunk, f, fine), params.lumen_threshold)))
    context = _gland_context(cores, shape, chunk, params, growable)  # type: ignore[arg-type]
    if context is None:
        return _empty_result()
    if isinstance(context, _Grow):
        return context  # an object it may own may be cut by the read region: redone with a larger halo first
    rect, keeps = context
    a, b, l, r = rect  # the halo beyond it only completes what the chunk owns
    chunk = _crop_chunk(chunk, rect)
    # the lumen first, cropped to those owned: the whole region's lumen and gland labels never meet
    lum = _owned_lumen(_kept_labels(cores, 1, keeps[1], rect), chunk, grid, growable) if len(cores) > 1 else None
    if isinstance(lum, _Grow):
        return lum
    g_er = grid.gland_erosion_px
    glands = grow_components(_kept_labels(cores, 0, keeps[0], rect), erosion_px=g_er, min_area_px=grid.gland_min_area_px,
                             in_place=True)
    g_margin = _gland_margin(g_er, params)
    g_box = box_table(glands)
    g_slices = slices_of(g_box)
    g_cut = (g_box[:, 1] > g_box[:, 0]) & _near_open_edge(g_box, glands.shape, chunk, g_margin)
    g_owned = _owned_boxes(g_box, chunk) if "gland" in tasks else np.zeros(0, np.int64)
    need = g_owned  # the glands judged here: with those under an owned lumen, which must be whole for the inside test
    if lum is not None:
        need = np.union1d(g_owned, _glands_under(glands[_slices(lum.rect)], lum.labels, lum.ids, lum.box))
    more = _sides_to_grow(g_box[need - 1], glands.shape, chunk, g_margin, growable)
    if any(more):
        return _Grow(more)
    if params.gland_max_nonglandular < 1:  # glands in tissue where glands do not lie go, with their lumen
        dropped = _non_glandular(reader, meta, params, glands, need, g_slices, chunk)
        g_owned = np.setdiff1d(g_owned, dropped)
    if params.gland_min_probability > 0:  # unconfident glands go, with their lumen
        dropped = _unconfident(reader, meta, params, glands, need, g_slices, chunk)
        g_owned = np.setdiff1d(g_owned, dropped)
    if lum is not None:  # before glands are clipped to the tissue
        inside = _inside_fraction(lum.labels, glands[_slices(lum.rect)])[lum.ids] >= params.lumen_min_inside
        lum.ids, lum.box, lum.cut = lum.ids[inside], lum.box[inside], lum.cut[inside]
    # at the largest halo, what is still cut is written cut at the halo edge, flagged truncated
    # (cut only at sides that cannot grow: the others asked for more above)
    out: dict[str, Any] = {"warnings": []}
    if len(g_owned):
        glands, g_rect = _only(glands, g_owned, g_box[g_owned - 1])  # what is measured from here on
        out["gland"] = _owned_rows("gland", reader, meta, params, glands, g_owned, _crop_chunk(chunk, g_rect), g_cut[g_owned - 1])
    glands = None  # the lumen below need them no more
    if lum is not None and len(lum.ids):
        lumen, l_rect = _only(lum.labels, lum.ids, lum.box)
        out["lumen"] = _owned_rows("lumen", reader, meta, params, lumen, lum.ids, _crop_chunk(chunk, _inner(lum.rect, l_rect)), lum.cut)
    for task in ("gland", "lumen"):
        n = int(out[task]["truncated"].sum()) if task in out else 0
        if n:
            out["warnings"].append((f"{task}_truncated", n, chunk.halo_px * f))
    return out


def _owned_rows(task: str, reader: Any, meta: MapsMeta, params: PostprocessParams, labels: np.ndarray, ids: np.ndarray,
                sub: Chunk, cut: np.ndarray) -> dict[str, Any]:
    """The table rows of a gland chunk's owned glands or lumen ``ids`` (``cut``: whether each is cut
    by the read region), from ``labels`` holding only them, read by ``sub``: clipped to the tissue,
    traced, typed and scored by their mean probability (the map read again over ``sub``)."""
    f = params.gland_grid().factor
    ds = meta.downsample * f
    keep = _in_tissue(reader, meta, params, labels, ids, sub.read, ds, clip=True)
    traced, polys = labels_to_polygons(labels, offset_yx=(sub.read[0], sub.read[2]), downsample=ds,
                                       simplify_px=params.simplify_px, label_ids=keep)
    fine = meta.heads[GLAND_INST].shape[1:]
    if task == "gland" and GLAND_TYPE in meta.heads:
        cls, prob = instance_type(labels, _coarse_read(reader, GLAND_TYPE, sub, f, fine))
        cls, prob = cls[traced - 1], prob[traced - 1]
    else:
        cls = np.ones(len(traced), np.int32)
        prob = _mean_foreground_read(reader, GLAND_INST if task == "gland" else LUMEN_INST, sub, f, fine, labels, traced)
    truncated = np.isin(traced, ids[cut])
    return _rows(task, cls, prob, polys, meta, truncated=truncated)


def _cell_samples(meta: MapsMeta) -> int:
    """Mask points per side sampled in each Patch-Class cell (a cell's tissue share)."""
    return int(min(8, max(1, math.ceil(2 * meta.heads[PATCH].downsample / meta.mask_downsample))))


def _tissue_classes(cls: np.ndarray, meta: MapsMeta) -> np.ndarray:
    """``cls`` (a :func:`tissue_class_map`) with the head's own word for glass as no tissue class."""
    for index, name in enumerate(meta.heads[PATCH].classes):
        if name.lower() in GLASS_CLASSES:
            cls[cls == index] = NO_CLASS
    return cls


def _edge_filled(reader: Any, meta: MapsMeta, params: PostprocessParams, region: tuple[int, int, int, int]) -> np.ndarray:
    """The Patch-Class probabilities of ``region``, those of the cells at the tissue's edge taken
    from the nearest cell whose window is tissue (``tissue_window_cells``, see PostprocessParams).

    The region is read with a margin of half a window plus the reach, so that every window and
    source it looks at is whole: a chunk gives what the whole slide gives."""
    cells = int(params.tissue_window_cells)
    half, reach = cells // 2, cells // 2 + 1
    grow = half + reach
    h, w = meta.heads[PATCH].shape[1:]
    y0, y1, x0, x1 = region
    big = (max(0, y0 - grow), min(h, y1 + grow), max(0, x0 - grow), min(w, x1 + grow))
    prob = reader.read(PATCH, big)
    samples = _cell_samples(meta)
    tissue = window_sums(_mask_counts(reader, meta, big, meta.heads[PATCH].downsample, samples=samples), cells)
    whole = tissue >= params.tissue_min_window_share * cells * cells * samples * samples
    computed = prob.any(axis=0)
    source = whole & (_tissue_classes(tissue_class_map(prob), meta) != NO_CLASS)
    cell, src = nearest_sources(computed & ~whole, source, reach)
    filled = prob.reshape(prob.shape[0], -1).copy()  # never the reader's own maps
    filled[:, cell] = filled[:, src]  # sources have whole windows, so none of them is filled
    a, l = y0 - big[0], x0 - big[2]
    return filled.reshape(prob.shape)[:, a : a + y1 - y0, l : l + x1 - x0]


def _tissue_prob(reader: Any, meta: MapsMeta, params: PostprocessParams, region: tuple[int, int, int, int]) -> np.ndarray:
    """The Patch-Class probabilities of ``region`` as the tissue map and the gland test see them:
    at the tissue's edge those of the tissue beside it (:func:`_edge_filled`), where that is on."""
    if meta.mask_downsample is not None and params.tissue_window_cells > 0:
        return _edge_filled(reader, meta, params, region)
    return reader.read(PATCH, region)


def _tissue_chunk(reader: Any, chunk: Chunk, meta: MapsMeta, params: PostprocessParams) -> dict[str, Any]:
    prob = _tissue_prob(reader, meta, params, chunk.read)  # all 0 where nothing was computed, filled or not
    if not prob.any():
        return _empty_result()
    class_map = tissue_class_map(prob)
    if meta.mask_downsample is not None and params.min_in_tissue > 0:
        share = _mask_fraction(reader, meta, chunk.read, meta.heads[PATCH].downsample, samples=_cell_samples(meta))
        class_map[share < params.min_in_tissue] = NO_CLASS  # glass gets no tissue class
    class_map = _tissue_classes(class_map, meta)
    parts = _tissue_parts(class_map, prob, offset_yx=(chunk.read[0], chunk.read[2]), open_edges=chunk.open_edges)
    touch = parts["touch"]
    out: dict[str, Any] = {}
    if touch.any():
        out["tissue_open"] = {k: v[touch] for k, v in parts.items()}
    done = ~touch & (parts["count"] >= params.tissue_min_area_px)
    if done.any():
        out["tissue"] = _finish_tissue(parts["class_id"][done], parts["prob_sum"][done] / parts["count"][done], parts["geometry"][done], meta, params)
    return out


def _finish_tissue(cls: np.ndarray, prob: np.ndarray, geometry: np.ndarray, meta: MapsMeta, params: PostprocessParams) -> dict[str, Any]:
    polys = _finish_regions(geometry, downsample=meta.heads[PATCH].downsample, simplify_px=params.simplify_px)
    return _rows("tissue", cls, prob, polys, meta)


def _attempt(reader: Any, job: _Job, chunk: Chunk, meta: MapsMeta, params: PostprocessParams) -> dict[str, Any] | Chunk:
    """One try of a nuclei or gland job at ``chunk``'s read region: the result, or the chunk to
    try next where an object it may own is cut (twice the halo, up to the job's largest: a nuclei
    chunk on every side, a gland chunk on the sides where its objects are cut)."""
    growable = chunk.growable(job.max_halo_px)
    if job.group == "nuclei":
        res = _nuclei_chunk(reader, chunk, meta, params, not any(growable))
        res = _Grow(growable) if res is None else res
    else:
        res = _glands_chunk(reader, chunk, meta, params, growable, job.tasks)
    if not isinstance(res, _Grow):
        return res
    log.debug("chunk %s (%s): halos %s too small, doubling on %s", (chunk.row, chunk.col), job.group, chunk.halos, res.edges)
    return chunk.grown(res.edges, job.max_halo_px)


def _run_job(reader: Any, job: _Job, meta: MapsMeta, params: PostprocessParams) -> dict[str, Any]:
    """A job's result, its halo grown as far as it needs; a job that raises gives :func:`failed_result`."""
    try:
        if job.group == "tissue":
            return _tissue_chunk(reader, job.chunk, meta, params)
        res = _attempt(reader, job, job.chunk, meta, params)
        while isinstance(res, Chunk):
            res = _attempt(reader, job, res, meta, params)
        return res
    except Exception as exc:  # noqa: BLE001 - one chunk must not end the slide (see failed_result)
        return failed_result(job, exc, meta, params)


def failed_result(job: _Job, exc: BaseException, meta: MapsMeta, params: PostprocessParams) -> dict[str, Any]:
    """The result of a job that raised: no objects, and a line naming the chunk and the error.

    The slide goes on without that chunk's objects; :func:`_assemble` reports each such line as a
    warning (run.json ``warnings``) and stops the slide only where most chunks failed.
    """
    message = (str(exc).strip().splitlines() or [""])[0]
    return {"failed": [f"{describe_job(job, meta, params)}: {type(exc).__name__}{': ' + message if message else ''}"]}


_READERS: dict[str, _ZarrReader] = {}


def heap_for(job: _Job) -> None:
    """In a pool process, before ``job``: a gland job, the largest, starts on a heap that keeps no
    earlier chunk's pages (given back, :mod:`wsi_mtl.malloc`); a nuclei job reuses them."""
    if job.group == "glands":
        release_freed_pages()


def _worker(path: str, job: _Job, meta: MapsMeta, params: PostprocessParams) -> dict[str, Any]:
    reader = _READERS.get(path)
    if reader is None:
        reader = _READERS[path] = _ZarrReader(path)
    heap_for(job)
    try:
        return packed(_run_job(reader, job, meta, params))
    finally:
        release_if_larger()  # what the chunk freed (kept for its own reuse, wsi_mtl.malloc) goes back past a bound


@dataclass(frozen=True)
class _Wkb:
    """A chunk result's geometry as WKB, for a result that goes to another process: pickled as
    bytes, and read back by one vectorised call (shapely pickles and unpickles each geometry on
    its own: ~15 us a polygon, ~1 s for the 65,000 objects of a 16,384^2 px mosaic)."""

    data: np.ndarray


def packed(res: dict[str, Any]) -> dict[str, Any]:
    """``res`` with the geometry of each of its row sets as :class:`_Wkb` (see :func:`unpacked`)."""
    return {k: {**v, "geometry": _Wkb(shapely.to_wkb(np.asarray(v["geometry"], dtype=object)))}
            if isinstance(v, dict) and "geometry" in v else v for k, v in res.items()}


def unpacked(res: dict[str, Any]) -> dict[str, Any]:
    """``res`` with :func:`packed` geometry as shapely again (the same coordinates), its WKB kept
    beside it as ``wkb`` (the table stores those bytes); other results as they are."""
    return {k: {**v, "geometry": shapely.from_wkb(v["geometry"].data), "wkb": v["geometry"].data}
            if isinstance(v, dict) and isinstance(v.get("geometry"), _Wkb) else v for k, v in res.items()}


# ----------------------------------------------------------------------------------- assembly


def _task_classes(meta: MapsMeta, task: str) -> tuple[tuple[str, ...], tuple[tuple[int, int, int], ...]]:
    """Class names and colours used for a task's class ids."""
    type_head = {"nuclei": NUCLEI_TYPE, "gland": GLAND_TYPE, "tissue": PATCH}.get(task)
    if type_head and type_head in meta.heads and meta.heads[type_head].classes:
        h = meta.heads[type_head]
        colors = h.colors if len(h.colors) == len(h.classes) else ((128, 128, 128),) * len(h.classes)
        return h.classes, colors
    inst = meta.heads.get(_REQUIRED[task])
    color = inst.colors[1] if inst is not None and len(inst.colors) > 1 else (128, 128, 128)
    name = {"nuclei": "nucleus", "gland": "gland", "lumen": "lumen", "tissue": "tissue"}[task]
    return ("background", name), ((0, 0, 0), color)


def _to_batch(rows: dict[str, Any], meta: MapsMeta) -> ObjectBatch:
    task = rows["task"]
    names, colors = _task_classes(meta, task)
    cls = rows["class_id"]
    n = len(cls)
    class_name = np.array([names[c] if 0 <= c < len(names) else str(c) for c in cls], dtype=str)
    columns: dict[str, np.ndarray] = {}
    for name, kind in COLUMNS.items():
        if name == "id":
            columns[name] = new_ids(n)
        elif name == "task":
            columns[name] = np.full(n, task, dtype=f"U{len(task)}")
        elif name == "class_name":
            columns[name] = class_name
        else:
            columns[name] = np.asarray(rows[name], dtype={"i": np.int32, "b": bool}.get(kind, np.float64))
    used = {(task, names[c]): tuple(colors[c]) for c in np.unique(cls) if 0 <= c < len(names)}
    return ObjectBatch(columns=columns, geometry=np.asarray(rows["geometry"], dtype=object), colors=used, wkb=rows.get("wkb"))


def _merge_tissue(open_parts: list[dict[str, np.ndarray]], meta: MapsMeta, params: PostprocessParams) -> dict[str, Any] | None:
    """Union the tissue regions cut by chunk edges, class by class."""
    if not open_parts:
        return None
    parts = {k: np.concatenate([p[k] for p in open_parts]) for k in open_parts[0]}
    cls_out, prob_out, geom_out = [], [], []
    for c in np.unique(parts["class_id"]):
        sel = parts["class_id"] == c
        merged = shapely.get_parts(shapely.union_all(parts["geometry"][sel]))
        tree = shapely.STRtree(merged)
        reps = shapely.point_on_surface(parts["geometry"][sel])
        src, dst = tree.query(reps, predicate="within")
        psum = np.bincount(dst, weights=parts["prob_sum"][sel][src], minlength=len(merged))
        cnt = np.bincount(dst, weights=parts["count"][sel][src], minlength=len(merged))
        keep = cnt >= params.tissue_min_area_px
        cls_out.append(np.full(int(keep.sum()), c, np.int32))
        prob_out.append(psum[keep] / cnt[keep])
        geom_out.append(merged[keep])
    cls = np.concatenate(cls_out)
    if len(cls) == 0:
        return None
    return _finish_tissue(cls, np.concatenate(prob_out), np.concatenate(geom_out), meta, params)


def _available_tasks(meta: MapsMeta) -> tuple[str, ...]:
    tasks = tuple(t for t in TASKS if _REQUIRED[t] in meta.heads)
    if "lumen" in tasks and GLAND_INST not in meta.heads:
        tasks = tuple(t for t in tasks if t != "lumen")
    return tasks


def _check_tasks(tasks: Iterable[str], meta: MapsMeta) -> tuple[str, ...]:
    tasks = tuple(tasks)
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise InputError(f"unknown task(s) {bad}; choose from {list(TASKS)}")
    for t in tasks:
        if _REQUIRED[t] not in meta.heads:
            raise InputError(f"task {t!r} needs the {_REQUIRED[t]!r} head, which the predictions do not hold")
    if "lumen" in tasks and GLAND_INST not in meta.heads:
        raise InputError(f"task 'lumen' needs the {GLAND_INST!r} head (lumen are kept only inside glands)")
    return tuple(t for t in TASKS if t in tasks)


#: First halo of a nuclei chunk, model px. Touching nuclei form connected blobs as wide as an
#: epithelial layer, and a chunk is redone from scratch at twice its halo while an owned nucleus's
#: blob reaches an open edge: on real tissue most chunks needed 512 px or more (a MoNuSeg + GlaS
#: mosaic: every nuclei chunk; glands 1024-2048 px), so starting there costs less than the passes it
#: saves (that mosaic's post-processing CPU 28.0 -> 17.3 s with the gland start at 1024, the same objects).
NUCLEI_HALO_PX = 512


def _plan_jobs(meta: MapsMeta, tasks: tuple[str, ...], *, chunk_px: int, halo_px: int | None, max_halo_px: int | None, params: PostprocessParams) -> list[_Job]:
    jobs: list[_Job] = []
    if "nuclei" in tasks:
        halo = int(halo_px) if halo_px is not None else NUCLEI_HALO_PX
        big = int(max_halo_px) if max_halo_px is not None else max(halo, 1024)
        if big < halo:
            raise ValueError(f"max_halo_px ({big}) must be >= halo_px ({halo})")
        for c in plan_chunks(meta.heads[NUCLEI_INST].shape[1:], chunk_px=chunk_px, halo_px=halo):
            jobs.append(_Job("nuclei", c, ("nuclei",), big))
    gl = tuple(t for t in tasks if t in ("gland", "lumen"))
    if gl:
        f = int(params.gland_downsample)
        if f < 1 or params.gland_chunk_px < 1:
            raise ValueError(f"PostprocessParams.gland_downsample ({f}) and gland_chunk_px ({params.gland_chunk_px}) must be >= 1")
        side = -(-int(params.gland_chunk_px) // f) * f  # whole cells of the gland grid
        h, w = meta.heads[GLAND_INST].shape[1:]
        halo = max(1, math.ceil(params.gland_halo_px / f))
        big = max(halo, math.ceil(params.gland_max_halo_px / f))
        for c in plan_chunks((-(-h // f), -(-w // f)), chunk_px=side // f, halo_px=halo):
            jobs.append(_Job("glands", c, gl, big))
    if "tissue" in tasks:
        for c in plan_chunks(meta.heads[PATCH].shape[1:], chunk_px=chunk_px, halo_px=1):
            jobs.append(_Job("tissue", replace(c, read=c.own, halos=(0, 0, 0, 0)), ("tissue",), 0))
    return jobs


#: warning code -> message (``n`` objects, largest halo ``halo`` in model px)
_WARNINGS = {
    "nuclei_truncated": "{n} nuclei wider than the largest nuclei halo ({halo} model px) were written cut at the halo "
                        "edge and flagged truncated (extract_objects max_halo_px)",
    "nuclei_wide_blob": "{n} nuclei lie in foreground blobs wider than the largest nuclei halo ({halo} model px): kept "
                        "whole, but they may differ slightly from a whole-slide run (extract_objects max_halo_px)",
    "gland_truncated": "{n} glands wider than the largest halo ({halo} model px) were written cut at the halo edge and "
                       "flagged truncated (PostprocessParams.gland_max_halo_px)",
    "lumen_truncated": "{n} lumen wider than the largest halo ({halo} model px) were written cut at the halo edge and "
                       "flagged truncated (PostprocessParams.gland_max_halo_px)",
}


def _warning_lines(counts: dict[str, list[int]]) -> list[str]:
    """One line per kind of warning, in :data:`_WARNINGS` order."""
    return [_WARNINGS[code].format(n=counts[code][0], halo=counts[code][1]) for code in _WARNINGS if code in counts]


def _assemble(results: Iterator[dict[str, Any]], meta: MapsMeta, params: PostprocessParams,
              warnings: list[str] | None = None) -> Iterator[ObjectBatch]:
    """Batches from chunk results; the warnings they count are logged (one line per kind) and
    appended to ``warnings`` once the results are exhausted."""
    open_parts: list[dict[str, np.ndarray]] = []
    counts: dict[str, list[int]] = {}
    failed: list[str] = []
    done = 0
    for res in results:
        done += 1
        for key, rows in unpacked(res).items():
            if key == "failed":
                failed.extend(rows)
            elif key == "warnings":
                for code, n, halo in rows:
                    total = counts.setdefault(code, [0, 0])
                    total[0] += n
                    total[1] = max(total[1], halo)
            elif key == "tissue_open":
                open_parts.append(rows)
            elif len(rows["class_id"]):
                yield _to_batch(rows, meta)
    if 2 * len(failed) > done:  # not one odd chunk: something is wrong with every one
        raise RuntimeError(f"post-processing failed in {len(failed)} of {done} chunks, e.g. {failed[0]}")
    merged = _merge_tissue(open_parts, meta, params)
    if merged is not None and len(merged["class_id"]):
        yield _to_batch(merged, meta)
    lines = _warning_lines(counts) + [f"no objects where post-processing failed: {line}" for line in failed]
    for line in lines:
        log.warning(line)
        if warnings is not None:
            warnings.append(line)


class ObjectStream(Iterator[ObjectBatch]):
    """The batches of :func:`extract_objects`; once they are exhausted, :attr:`warnings` holds one
    line per kind of problem that did not stop the run (e.g. objects flagged ``truncated``)."""

    def __init__(self, make: Any) -> None:
        self.warnings: list[str] = []
        self._it: Iterator[ObjectBatch] = make(self.warnings)

    def __iter__(self) -> ObjectStream:
        return self

    def __next__(self) -> ObjectBatch:
        return next(self._it)


def _pool_results(path: str, jobs: list[_Job], meta: MapsMeta, params: PostprocessParams, workers: int,
                  notes: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Run jobs in a process pool (threads in a daemonic process, see ``_pool``), at most
    ``2 * workers`` in flight, yielding in job order; a worker that dies is survived as
    :func:`~wsi_mtl.postprocess._pool.ordered_results` says."""
    from wsi_mtl.postprocess._pool import chunk_executor, ordered_results, pool_kind

    # threads share one reader (no per-process cache that would outlive this slide); processes open theirs by path
    fn, source = (_run_job, _ZarrReader(path)) if pool_kind(workers) == "threads" else (_worker, path)
    return ordered_results(lambda n: chunk_executor(n)[0], fn, [(source, job, meta, params) for job in jobs],
                           workers=workers, describe=lambda i: describe_job(jobs[i], meta, params), notes=notes)


def job_scale(job: _Job, meta: MapsMeta, params: PostprocessParams) -> float:
    """Model px per px of the grid a job's chunk was planned on (the gland grid, Patch-Class cells)."""
    if job.group == "glands":
        return float(params.gland_downsample)
    if job.group == "tissue":
        return meta.heads[PATCH].downsample / meta.downsample
    return 1.0


def describe_job(job: _Job, meta: MapsMeta, params: PostprocessParams) -> str:
    """Where a job's chunk lies, for a message: its group and owned region in level-0 px (as QuPath shows them)."""
    f = job_scale(job, meta, params) * meta.downsample
    y0, y1, x0, x1 = (round(v * f) for v in job.chunk.own)
    return f"the {job.group} chunk at level-0 x {x0}-{x1}, y {y0}-{y1} px"


def extract_objects(
    predictions_path: str | Path,
    *,
    tasks: Iterable[str] | None = None,
    chunk_px: int = 2048,
    halo_px: int | None = None,
    max_halo_px: int | None = None,
    workers: int = 1,
    params: PostprocessParams | None = None,
    tissue_mask: bool = True,
) -> ObjectStream:
    """Stream the objects of a predictions.zarr as batches (one per chunk and task).

    See the module docstring for how chunk borders are handled; the result equals a whole-slide
    run of the same functions (:func:`objects_from_maps`) object for object.

    Parameters
    ----------
    predictions_path : path
        A ``predictions.zarr`` written by the engine.
    tasks : iterable of str, optional
        Any of ``"nuclei"``, ``"gland"``, ``"lumen"``, ``"tissue"``; default: every task whose
        heads the store holds.
    chunk_px : int
        Owned side of a nuclei chunk in model pixels, of a tissue chunk in Patch-Class pixels
        (glands and lumen: ``params.gland_chunk_px``).
    halo_px : int, optional
        First nuclei halo in model pixels (default :data:`NUCLEI_HALO_PX` = 512, 256 um at 0.5 um/px).
    max_halo_px : int, optional
        Largest nuclei halo a chunk may grow to (default 1024).
    workers : int
        Processes; 1 runs in this process.
    params : PostprocessParams, optional
        Thresholds and sizes; default: the model's tuned settings recorded in the store
        (``postprocess`` attribute), else the defaults.
    tissue_mask : bool
        Drop objects outside the stored tissue mask (``params.min_in_tissue``); False for slides
        run without a mask (a store without a mask is never filtered).

    Returns
    -------
    ObjectStream
        An iterator of ObjectBatch: nuclei batches first, then glands/lumen, then tissue
        regions; its ``warnings`` (one line per kind, also logged) are complete once exhausted.
        Objects wider than the largest halo do not stop the run: they are written cut at the
        halo edge with ``truncated`` set.

    Raises
    ------
    InputError
        Missing store, attributes or a head a task needs; unknown task.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1; got {workers}")
    meta = read_meta(predictions_path)
    if not tissue_mask:
        meta = replace(meta, mask_downsample=None)
    params = params or PostprocessParams.from_mapping(meta.postprocess)
    tasks = _check_tasks(_available_tasks(meta) if tasks is None else tasks, meta)
    jobs = _plan_jobs(meta, tasks, chunk_px=chunk_px, halo_px=halo_px, max_halo_px=max_halo_px, params=params)
    log.info("post-processing %s: %d chunks, tasks %s, %d worker(s)", predictions_path, len(jobs), tasks, workers)
    # arguments are checked now; the work starts when the caller iterates
    return ObjectStream(lambda warnings: _extract_iter(predictions_path, jobs, meta, params, workers, warnings))


def _extract_iter(predictions_path: str | Path, jobs: list[_Job], meta: MapsMeta, params: PostprocessParams, workers: int,
                  warnings: list[str]) -> Iterator[ObjectBatch]:
    if workers == 1:
        reader = _ZarrReader(predictions_path)
        results: Iterator[dict[str, Any]] = (_run_job(reader, j, meta, params) for j in jobs)
    else:
        results = _pool_results(str(predictions_path), jobs, meta, params, workers, notes=warnings)
    yield from _assemble(results, meta, params, warnings)


def objects_from_maps(
    maps: Mapping[str, np.ndarray],
    *,
    slide_mpp: float,
    downsample: float,
    head_downsample: Mapping[str, float] | None = None,
    classes: Mapping[str, tuple[Iterable[str], Iterable[tuple[int, int, int]]]] | None = None,
    tasks: Iterable[str] | None = None,
    params: PostprocessParams | None = None,
    tissue_mask: np.ndarray | None = None,
    mask_downsample: float | None = None,
    slide_size: tuple[int, int] | None = None,
) -> ObjectBatch:
    """Whole-image post-processing of in-memory maps, in one piece (no chunks).

    Parameters
    ----------
    maps : mapping head name -> (C, H, W) ndarray
        ``Nuclei-INST``, ``Nuclei-TYPE``, ``Gland-INST``, ``Gland-TYPE``, ``Lumen-INST``,
        ``Patch-Class`` (any subset the tasks need).
    slide_mpp : float
        Microns per level-0 pixel.
    downsample : float
        Level-0 px per model px.
    head_downsample : mapping, optional
        Level-0 px per array px for heads on another grid; for ``Patch-Class`` the default is
        inferred from the array sizes (``downsample * ceil(H / H_patch)``).
    classes : mapping head -> (names, colours), optional
    tasks, params
        As in :func:`extract_objects`.
    tissue_mask : (H, W) bool ndarray, optional
        Tissue mask at ``mask_downsample`` level-0 px per pixel; objects outside it are dropped
        as in :func:`extract_objects`.
    slide_size : (width, height), optional
        Level-0 slide size every geometry is clipped to.

    Returns
    -------
    ObjectBatch
        Every object of every task (possibly empty).
    """
    params = params or PostprocessParams()
    head_downsample = dict(head_downsample or {})
    classes = dict(classes or {})
    seg = [np.shape(a)[1] for n, a in maps.items() if n != PATCH]
    if PATCH in maps and PATCH not in head_downsample and seg:
        head_downsample[PATCH] = downsample * math.ceil(max(seg) / max(1, np.shape(maps[PATCH])[1]))
    heads = {}
    for name, arr in maps.items():
        names, colors = classes.get(name, ((), ()))
        heads[name] = HeadMeta(tuple(np.shape(arr)), float(head_downsample.get(name, downsample)),
                               tuple(names), tuple(tuple(c) for c in colors))
    if tissue_mask is not None and not mask_downsample:
        raise ValueError("tissue_mask needs mask_downsample (level-0 px per mask px)")
    meta = MapsMeta(float(slide_mpp), float(downsample), heads, slide_size=slide_size,
                    mask_downsample=float(mask_downsample) if tissue_mask is not None else None)
    tasks = _check_tasks(_available_tasks(meta) if tasks is None else tasks, meta)
    size = max(max(np.shape(a)[1:]) for a in maps.values())  # one chunk per task (gland: rounded up to whole gland-grid cells)
    jobs = _plan_jobs(meta, tasks, chunk_px=size, halo_px=1, max_halo_px=1, params=replace(params, gland_chunk_px=size))
    reader = _ArrayReader(maps, None if tissue_mask is None else np.asarray(tissue_mask, bool))
    batches = list(_assemble((_run_job(reader, j, meta, params) for j in jobs), meta, params))
    return concat_batches(batches)


def concat_batches(batches: list[ObjectBatch]) -> ObjectBatch:
    """Concatenate object batches (an empty batch for an empty list)."""
    if not batches:
        cols = {k: np.zeros(0, dtype={"U": str, "i": np.int32, "f": np.float64, "b": bool}[v]) for k, v in COLUMNS.items()}
        return ObjectBatch(columns=cols, geometry=np.empty(0, dtype=object))
    cols = {k: np.concatenate([b.columns[k] for b in batches]) for k in COLUMNS}
    colors: dict[tuple[str, str], tuple[int, int, int]] = {}
    for b in batches:
        colors.update(b.colors)
    return ObjectBatch(columns=cols, geometry=np.concatenate([b.geometry for b in batches]), colors=colors)

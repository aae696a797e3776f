"""Instance label images -> shapely polygons in level-0 pixels, and per-polygon measurements.

Coordinates follow docs/architecture.md: model pixel (i, j) covers level-0
``[j * ds, (j + 1) * ds) x [i * ds, (i + 1) * ds)``, so its centre is ``((j + 0.5) ds, (i + 0.5) ds)``.
Contours are traced through the pixel centres' half-way level (marching squares at 0.5 on each
object's binary mask), so a polygon rasterised back at pixel centres gives the source mask.
"""

from __future__ import annotations

import logging

import numpy as np
import shapely

from wsi_mtl.postprocess import _compiled
from wsi_mtl.postprocess._contours import trace_rings
from wsi_mtl.postprocess._instances import _sizes, _validate_labels

__all__ = ["labels_to_polygons", "polygon_measurements", "rasterize_polygons"]

log = logging.getLogger(__name__)


def _largest_polygon(geom: shapely.Geometry) -> shapely.Polygon:
    """The largest-area Polygon part of any geometry (an empty Polygon when there is none)."""
    parts = [p for p in shapely.get_parts(geom) if isinstance(p, shapely.Polygon) and not p.is_empty]
    if not parts:
        sub = [
            q
            for p in shapely.get_parts(geom)
            if isinstance(p, shapely.GeometryCollection)
            for q in shapely.get_parts(p)
            if isinstance(q, shapely.Polygon)
        ]
        parts = sub
    if not parts:
        return shapely.Polygon()
    return max(parts, key=lambda p: p.area)


def _fix_invalid(polys: np.ndarray) -> np.ndarray:
    bad = ~shapely.is_valid(polys)
    if bad.any():
        log.debug("repairing %d invalid polygons", int(bad.sum()))
        fixed = shapely.make_valid(polys[bad])
        polys[bad] = [_largest_polygon(g) for g in fixed]
    return polys


def labels_to_polygons(
    labels: np.ndarray,
    *,
    offset_yx: tuple[int, int] = (0, 0),
    downsample: float = 1.0,
    simplify_px: float = 0.5,
    holes: bool = True,
    label_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One valid shapely Polygon per instance, in level-0 pixels.

    Boundaries are traced for all instances at once by a vectorised marching squares at level 0.5
    (the same rings :func:`skimage.measure.find_contours` gives on each instance's mask with
    ``fully_connected="high"``: diagonal neighbours stay joined). The outer boundary is the ring of
    largest area; with ``holes`` the holes inside it become interior rings; a disconnected instance
    keeps its largest part. Polygons are simplified within ``simplify_px`` model pixels
    (Douglas-Peucker, topology-preserving where plain simplification would break a polygon) and are
    always valid with closed rings.

    Parameters
    ----------
    labels : (H, W) int ndarray
        Instances (0 = background).
    offset_yx : (int, int)
        Model-pixel position of ``labels[0, 0]`` in the whole map.
    downsample : float
        Level-0 pixels per model pixel.
    simplify_px : float
        Simplification tolerance in model pixels (0 = none).
    holes : bool
        Keep interior rings.
    label_ids : (k,) int ndarray, optional
        Only these labels (default: every label present).

    Returns
    -------
    ids : (n,) int64 ndarray
        The label of each polygon, ascending (labels absent from ``labels`` are skipped).
    polygons : (n,) object ndarray of shapely.Polygon

    Examples
    --------
    >>> lab = np.zeros((4, 4), np.int32); lab[1:3, 1:3] = 7
    >>> ids, polys = labels_to_polygons(lab, downsample=2.0, simplify_px=0)
    >>> ids.tolist(), polys[0].area, polys[0].bounds
    ([7], 14.0, (2.0, 2.0, 6.0, 6.0))
    """
    labels = _validate_labels(labels)
    if downsample <= 0:
        raise ValueError(f"downsample must be > 0 (level-0 px per model px); got {downsample}")
    top = int(labels.max(initial=0))
    if top > 0 and labels.min() < 0:
        raise ValueError("labels must be >= 0 (0 = background)")
    present = _sizes(labels, top + 1) > 0  # entry 0 is never counted
    if label_ids is None:
        want = present
    else:
        ids_in = np.asarray(label_ids, dtype=np.int64)
        ids_in = ids_in[(ids_in > 0) & (ids_in <= top)]
        want = np.zeros(top + 1, bool)
        want[ids_in] = True
        want &= present
    ids = np.flatnonzero(want).astype(np.int64)
    polys = np.empty(len(ids), dtype=object)
    if len(ids) == 0:
        return ids, polys
    ring_label, coords, ring_start, area = trace_rings(labels, want)
    oy, ox = int(offset_yx[0]), int(offset_yx[1])
    # (row, col) pixel-index units -> level-0 (x, y): pixel i spans [i, i + 1) model px
    xy = np.empty_like(coords)
    xy[:, 0] = (coords[:, 1] + (ox + 0.5)) * downsample
    xy[:, 1] = (coords[:, 0] + (oy + 0.5)) * downsample
    pos = np.searchsorted(ids, ring_label)  # polygon index of each ring
    n_rings = np.bincount(pos, minlength=len(ids))
    simple_ring = n_rings[pos] == 1
    if simple_ring.any():
        sel = np.flatnonzero(simple_ring)
        polys[pos[sel]] = shapely.polygons(_rings_of(xy, ring_start, sel))
    if not simple_ring.all():
        where, made = _several_rings(xy, ring_start, area, pos, np.flatnonzero(~simple_ring), holes)
        polys[where] = made
    polys = np.asarray(polys, dtype=object)
    return ids, (_simplify(polys, simplify_px * downsample) if simplify_px > 0 else _fix_invalid(polys))


def _rings_of(xy: np.ndarray, ring_start: np.ndarray, rings: np.ndarray) -> np.ndarray:
    """LinearRings of the traced rings ``rings`` (indices), in that order."""
    lengths = ring_start[rings + 1] - ring_start[rings]
    return shapely.linearrings(xy[_ranges(ring_start, rings)], indices=np.repeat(np.arange(len(rings)), lengths))


def _several_rings(xy: np.ndarray, ring_start: np.ndarray, area: np.ndarray, pos: np.ndarray, rings: np.ndarray,
                   holes: bool) -> tuple[np.ndarray, np.ndarray]:
    """The polygons of objects traced as several rings (``rings``: all their ring indices; ``pos``:
    each ring's polygon index), all at once: the shell is the ring of largest area (the first of
    equal ones), its holes (with ``holes``) the rings of negative area whose first point lies in
    it, in ring order; an invalid result is replaced by the largest polygon of its valid form.
    Returns the polygon indices and their polygons."""
    by_object = rings[np.lexsort((rings, -area[rings], pos[rings]))]  # per object: the shell first
    owner = pos[by_object]
    first = np.r_[True, owner[1:] != owner[:-1]]
    objects, shell_k = owner[first], by_object[first]
    group = np.cumsum(first) - 1  # each ring's object, as an index into ``objects``
    shells = shapely.polygons(_rings_of(xy, ring_start, shell_k))
    hole_k, hole_group = np.zeros(0, np.int64), np.zeros(0, np.int64)
    if holes:
        cand = ~first & (area[by_object] < 0)
        hole_k, hole_group = by_object[cand], group[cand]
        order = np.lexsort((hole_k, hole_group))  # ring order within each object
        hole_k, hole_group = hole_k[order], hole_group[order]
        shapely.prepare(shells)
        inside = shapely.contains_xy(shells[hole_group], xy[ring_start[hole_k], 0], xy[ring_start[hole_k], 1])
        shapely.destroy_prepared(shells)
        hole_k, hole_group = hole_k[inside], hole_group[inside]
    made = shells.copy()
    with_holes = np.unique(hole_group)
    if len(with_holes):
        ring_k = np.concatenate([shell_k[with_holes], hole_k])
        ring_group = np.concatenate([with_holes, hole_group])
        ring_k, ring_group = ring_k[np.argsort(ring_group, kind="stable")], np.sort(ring_group, kind="stable")
        made[with_holes] = shapely.polygons(_rings_of(xy, ring_start, ring_k), indices=np.searchsorted(with_holes, ring_group))
    return objects, _fix_invalid(made)


def _ranges(starts: np.ndarray, sel: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(starts[k], starts[k + 1])`` for k in ``sel`` (vectorised)."""
    lengths = starts[sel + 1] - starts[sel]
    first = np.repeat(starts[sel] - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return first + np.arange(int(lengths.sum()))


def _simplify(polys: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker (fast); topology-preserving simplification where that breaks a polygon,
    and those repaired where still invalid (the others were just found valid)."""
    out = shapely.simplify(polys, tolerance, preserve_topology=False)
    bad = ~shapely.is_valid(out) | shapely.is_empty(out) | (shapely.get_type_id(out) != 3)
    if bad.any():
        out[bad] = _fix_invalid(shapely.simplify(polys[bad], tolerance, preserve_topology=True))
    return out


def polygon_measurements(
    polygons: np.ndarray,
    *,
    mpp: float,
    shape_features: bool = False,
) -> dict[str, np.ndarray]:
    """Vectorised measurements of polygons in level-0 pixels.

    Parameters
    ----------
    polygons : (n,) object ndarray of shapely Polygons/MultiPolygons
    mpp : float
        Microns per level-0 pixel.
    shape_features : bool
        Also compute ``solidity`` (area / convex-hull area) and ``eccentricity`` (of the ellipse
        with the same second moments as the exterior ring, as in ``skimage.measure.regionprops``);
        NaN otherwise.

    Returns
    -------
    dict of (n,) float64 ndarrays
        ``area_um2``, ``perimeter_um``, ``centroid_x_px``, ``centroid_y_px``, ``centroid_x_um``,
        ``centroid_y_um``, ``solidity``, ``eccentricity``.

    Examples
    --------
    >>> m = polygon_measurements(np.array([shapely.box(0, 0, 4, 2)]), mpp=0.5, shape_features=True)
    >>> float(m["area_um2"][0]), float(m["centroid_x_um"][0]), round(float(m["eccentricity"][0]), 4)
    (2.0, 1.0, 0.866)
    """
    if mpp <= 0:
        raise ValueError(f"mpp must be > 0; got {mpp}")
    polygons = np.asarray(polygons, dtype=object)
    n = len(polygons)
    area = shapely.area(polygons) if n else np.zeros(0)
    cen = shapely.get_coordinates(shapely.centroid(polygons)) if n else np.zeros((0, 2))
    out = {
        "area_um2": area * mpp * mpp,
        "perimeter_um": (shapely.length(polygons) if n else np.zeros(0)) * mpp,
        "centroid_x_px": cen[:, 0].copy(),
        "centroid_y_px": cen[:, 1].copy(),
        "centroid_x_um": cen[:, 0] * mpp,
        "centroid_y_um": cen[:, 1] * mpp,
        "solidity": np.full(n, np.nan),
        "eccentricity": np.full(n, np.nan),
    }
    if shape_features and n:
        xy, idx = shapely.get_coordinates(shapely.get_exterior_ring(polygons), return_index=True)  # polygons' only
        hull = _hull_areas(polygons, xy, idx)
        with np.errstate(invalid="ignore", divide="ignore"):
            out["solidity"] = np.where(hull > 0, np.minimum(area / hull, 1.0), np.nan)  # <= 1 despite rounding
        out["eccentricity"] = _ring_eccentricity(xy, idx, n)
    return out


def _hull_areas(polygons: np.ndarray, xy: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``shapely.area(shapely.convex_hull(polygons))``: the polygons' from their exterior rings'
    vertices ``xy`` (of polygon ``idx``) by the compiled hull (the same values, ~4x faster),
    multipolygons and everything without numba by shapely."""
    if not _compiled.available():
        return shapely.area(shapely.convex_hull(polygons))
    n = len(polygons)
    starts = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(idx, minlength=n), out=starts[1:])
    hull = _compiled.hull_areas(xy, starts)
    others = np.flatnonzero(shapely.get_type_id(polygons) != 3)
    if len(others):
        hull[others] = shapely.area(shapely.convex_hull(polygons[others]))
    return hull


def _ring_eccentricity(xy: np.ndarray, idx: np.ndarray, n: int) -> np.ndarray:
    """Eccentricity of the region inside each of ``n`` closed rings (vertices ``xy`` of ring
    ``idx``; a ring without vertices: NaN), from exact polygon moments."""
    if len(xy) == 0:
        return np.full(n, np.nan)
    # each ring is closed: consecutive vertices of the same ring form the edges
    first = np.r_[0, np.flatnonzero(np.diff(idx)) + 1]
    xy = xy - xy[first][np.searchsorted(first, np.arange(len(xy)), side="right") - 1]
    same = idx[:-1] == idx[1:]
    x0, y0 = xy[:-1][same].T
    x1, y1 = xy[1:][same].T
    e = idx[:-1][same]
    cross = x0 * y1 - x1 * y0

    def s(w: np.ndarray) -> np.ndarray:
        return np.bincount(e, weights=w, minlength=n)

    a = s(cross) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = s((x0 + x1) * cross) / (6 * a)
        cy = s((y0 + y1) * cross) / (6 * a)
        mxx = s((x0 * x0 + x0 * x1 + x1 * x1) * cross) / (12 * a) - cx * cx
        myy = s((y0 * y0 + y0 * y1 + y1 * y1) * cross) / (12 * a) - cy * cy
        mxy = s((x0 * y1 + 2 * x0 * y0 + 2 * x1 * y1 + x1 * y0) * cross) / (24 * a) - cx * cy
        half = (mxx + myy) / 2
        root = np.sqrt(((mxx - myy) / 2) ** 2 + mxy**2)
        l1, l2 = half + root, half - root
        ecc = np.sqrt(np.clip(1 - l2 / l1, 0, 1))
    return np.where(np.abs(a) > 0, ecc, np.nan)


def rasterize_polygons(
    polygons: np.ndarray,
    shape: tuple[int, int],
    *,
    downsample: float = 1.0,
    offset_yx: tuple[int, int] = (0, 0),
) -> np.ndarray:
    """Paint polygons (level-0 px) back onto a model-pixel grid by pixel-centre containment.

    Parameters
    ----------
    polygons : (n,) object ndarray of shapely Polygons
    shape : (int, int)
        Output (H, W) in model pixels.
    downsample : float
        Level-0 pixels per model pixel.
    offset_yx : (int, int)
        Model-pixel position of output pixel (0, 0).

    Returns
    -------
    labels : (H, W) int32 ndarray
        Polygon ``k`` painted as ``k + 1`` (later polygons win overlaps).

    Examples
    --------
    >>> rasterize_polygons(np.array([shapely.box(2, 0, 6, 4)]), (2, 4), downsample=2.0)
    array([[0, 1, 1, 0],
           [0, 1, 1, 0]], dtype=int32)
    """
    from skimage.draw import polygon as draw_polygon

    out = np.zeros(shape, np.int32)
    oy, ox = offset_yx
    for k, poly in enumerate(polygons, start=1):
        if poly is None or poly.is_empty:
            continue
        for part in shapely.get_parts(poly):
            ext = np.asarray(part.exterior.coords) / downsample - 0.5
            rr, cc = draw_polygon(ext[:, 1] - oy, ext[:, 0] - ox, shape)
            out[rr, cc] = k
            for ring in part.interiors:
                h = np.asarray(ring.coords) / downsample - 0.5
                rr, cc = draw_polygon(h[:, 1] - oy, h[:, 0] - ox, shape)
                hit = out[rr, cc] == k
                out[rr[hit], cc[hit]] = 0
    return out

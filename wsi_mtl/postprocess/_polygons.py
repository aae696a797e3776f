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
from scipy import ndimage as ndi
from skimage.measure import find_contours

from wsi_mtl.postprocess._instances import _validate_labels

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
    slices: list | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One valid shapely Polygon per instance, in level-0 pixels.

    Each instance is traced in its bounding-box crop (:func:`scipy.ndimage.find_objects`) with
    marching squares at level 0.5 (``fully_connected="high"``, so diagonal neighbours stay joined).
    The outer boundary is the contour of largest area; with ``holes`` the other contours become
    interior rings. A disconnected instance keeps its largest part. Polygons are simplified within
    ``simplify_px`` model pixels (topology preserved) and are always valid with closed rings.

    Parameters
    ----------
    labels : (H, W) int ndarray
        Instances (0 = background).
    offset_yx : (int, int)
        Model-pixel position of ``labels[0, 0]`` in the whole map.
    downsample : float
        Level-0 pixels per model pixel.
    simplify_px : float
        Douglas-Peucker tolerance in model pixels (0 = no simplification).
    holes : bool
        Keep interior rings.
    label_ids : (k,) int ndarray, optional
        Only these labels (default: every label present).
    slices : list, optional
        ``scipy.ndimage.find_objects(labels)`` if already computed.

    Returns
    -------
    ids : (n,) int64 ndarray
        The label of each polygon (labels absent from ``labels`` are skipped).
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
    if slices is None:
        slices = ndi.find_objects(labels)
    if label_ids is None:
        label_ids = np.array([i + 1 for i, s in enumerate(slices) if s is not None], dtype=np.int64)
    else:
        label_ids = np.asarray(label_ids, dtype=np.int64)
        label_ids = label_ids[(label_ids > 0) & (label_ids <= len(slices))]
        label_ids = np.array([i for i in label_ids if slices[i - 1] is not None], dtype=np.int64)
    oy, ox = int(offset_yx[0]), int(offset_yx[1])
    n = len(label_ids)
    simple_coords: list[np.ndarray] = []
    simple_pos: list[int] = []
    polys = np.empty(n, dtype=object)
    for k, lab in enumerate(label_ids):
        sy, sx = slices[lab - 1]
        crop = labels[sy, sx] == lab
        padded = np.pad(crop, 1)
        contours = find_contours(padded, 0.5, fully_connected="high")
        # shift: padded index -> global model index; then -> pixel-centre continuous model coords
        shift = np.array([sy.start + oy - 1 + 0.5, sx.start + ox - 1 + 0.5])
        if len(contours) == 1:
            simple_coords.append(contours[0] + shift)
            simple_pos.append(k)
            continue
        areas = np.array([_signed_area_rc(c) for c in contours])
        order = np.argsort(-areas)
        outer = contours[order[0]] + shift
        inner = [contours[i] + shift for i in order[1:] if areas[i] < 0] if holes else []
        poly = shapely.Polygon(outer[:, ::-1], [h[:, ::-1] for h in inner])
        if not poly.is_valid:
            poly = _largest_polygon(shapely.make_valid(poly))
        polys[k] = poly
    if simple_coords:
        lengths = np.fromiter((len(c) for c in simple_coords), dtype=np.int64, count=len(simple_coords))
        coords = np.concatenate(simple_coords)[:, ::-1]
        rings = shapely.linearrings(coords, indices=np.repeat(np.arange(len(lengths)), lengths))
        polys[np.asarray(simple_pos, dtype=np.int64)] = shapely.polygons(rings)
    if n:
        polys = _scale(polys, downsample)
        if simplify_px > 0:
            polys = _simplify(polys, simplify_px * downsample)
        polys = _fix_invalid(np.asarray(polys, dtype=object))
    return label_ids, polys


def _simplify(polys: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker (fast); topology-preserving simplification where that breaks a polygon."""
    out = shapely.simplify(polys, tolerance, preserve_topology=False)
    bad = ~shapely.is_valid(out) | shapely.is_empty(out) | (shapely.get_type_id(out) != 3)
    if bad.any():
        out[bad] = shapely.simplify(polys[bad], tolerance, preserve_topology=True)
    return out


def _scale(polys: np.ndarray, factor: float) -> np.ndarray:
    if factor == 1.0:
        return polys
    return shapely.transform(polys, lambda xy: xy * factor)


def _signed_area_rc(c: np.ndarray) -> float:
    """Shoelace area of a (row, col) contour; > 0 for outer boundaries from find_contours."""
    y, x = c[:, 0], c[:, 1]
    return 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))


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
        hull = shapely.area(shapely.convex_hull(polygons))
        with np.errstate(invalid="ignore", divide="ignore"):
            out["solidity"] = np.where(hull > 0, area / hull, np.nan)
        out["eccentricity"] = _ring_eccentricity(shapely.get_exterior_ring(polygons))
    return out


def _ring_eccentricity(rings: np.ndarray) -> np.ndarray:
    """Eccentricity of the region inside each closed ring, from exact polygon moments."""
    xy, idx = shapely.get_coordinates(rings, return_index=True)
    n = len(rings)
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

"""Patch-Class probabilities -> tissue class map and one polygon per connected region of a class.

Region outlines follow pixel edges exactly (the union of one box per horizontal run), so parts of
one region computed in different chunks union to exactly the region computed whole; the outline
is simplified only once a region is complete (after a canonical normalisation, so the result does
not depend on how it was assembled).
"""

from __future__ import annotations

import numpy as np
import shapely
from scipy import ndimage as ndi

from wsi_mtl.postprocess._instances import _scale, _validate_prob
from wsi_mtl.postprocess._polygons import _fix_invalid

__all__ = ["tissue_class_map", "tissue_polygons", "window_sums", "nearest_sources"]

#: class-map value of pixels where nothing was computed
NO_CLASS = -1


def tissue_class_map(patch_prob: np.ndarray) -> np.ndarray:
    """Most probable tissue class per pixel; ``-1`` where nothing was computed (all channels 0).

    Parameters
    ----------
    patch_prob : (C, H, W) uint8 or float ndarray
        Patch-Class probabilities on its own grid.

    Returns
    -------
    class_map : (H, W) int16 ndarray
        Class index 0..C-1, or -1 where every channel is 0.

    Examples
    --------
    >>> p = np.zeros((3, 1, 3), np.uint8); p[1, 0, 0] = 200; p[2, 0, 1] = 255
    >>> tissue_class_map(p)
    array([[ 1,  2, -1]], dtype=int16)
    """
    patch_prob = _validate_prob(patch_prob, name="patch_prob")
    cmap = np.argmax(patch_prob, axis=0).astype(np.int16)
    cmap[~np.any(patch_prob > 0, axis=0)] = NO_CLASS
    return cmap


def window_sums(counts: np.ndarray, cells: int) -> np.ndarray:
    """Sum of ``counts`` (2-D integers) over the ``cells`` x ``cells`` window centred on each
    element (``cells`` odd), zero outside the array: exact, from integer cumulative sums.

    >>> window_sums(np.ones((3, 3), np.int64), 3)
    array([[4, 6, 4],
           [6, 9, 6],
           [4, 6, 4]])
    """
    h = cells // 2
    padded = np.zeros((counts.shape[0] + 2 * h + 1, counts.shape[1] + 2 * h + 1), np.int64)
    padded[h + 1 : h + 1 + counts.shape[0], h + 1 : h + 1 + counts.shape[1]] = counts
    c = padded.cumsum(axis=0).cumsum(axis=1)
    rows, cols = counts.shape
    return c[cells : cells + rows, cells : cells + cols] - c[:rows, cells : cells + cols] - c[cells : cells + rows, :cols] + c[:rows, :cols]


def _offsets(reach: int) -> list[tuple[int, int]]:
    """Offsets (dy, dx) within ``reach`` cells (Euclidean, the cell itself excluded), nearest
    first, then by row, then by column."""
    near = [(dy * dy + dx * dx, dy, dx) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1)]
    return [(dy, dx) for d, dy, dx in sorted(near) if 0 < d <= reach * reach]


def nearest_sources(todo: np.ndarray, source: np.ndarray, reach: int) -> tuple[np.ndarray, np.ndarray]:
    """For each ``todo`` cell (2-D bool), the nearest ``source`` cell within ``reach`` cells
    (ties: the smaller row offset, then the smaller column offset).

    Returns the flat indices of the ``todo`` cells that have one and the flat indices of their
    sources, both in raster order of the ``todo`` cells.
    """
    h, w = todo.shape
    ys, xs = np.nonzero(todo)
    found = np.full(len(ys), -1, np.int64)
    padded = np.zeros((h + 2 * reach, w + 2 * reach), bool)
    padded[reach : reach + h, reach : reach + w] = source
    for dy, dx in _offsets(reach):
        open_ = np.flatnonzero(found < 0)
        if len(open_) == 0:
            break
        y, x = ys[open_] + dy, xs[open_] + dx
        hit = padded[y + reach, x + reach]
        found[open_[hit]] = y[hit] * w + x[hit]
    have = found >= 0
    return ys[have] * w + xs[have], found[have]


def _runs_to_polygons(labels: np.ndarray, n: int, offset_yx: tuple[int, int]) -> np.ndarray:
    """Exact pixel-edge polygon of each label 1..n (model-pixel units, unscaled)."""
    h, w = labels.shape
    padded = np.zeros((h, w + 2), labels.dtype)
    padded[:, 1:-1] = labels
    change = np.flatnonzero(np.diff(padded, axis=1).ravel() != 0)
    rows, cols = np.divmod(change, w + 1)
    # each change at (row, col) ends the run of padded[row, col] and starts padded[row, col + 1]
    starts_lab = padded[rows, cols + 1]
    start_mask = starts_lab > 0
    # a run starts at a change whose right-hand value is non-zero; it ends at the next change
    order = np.arange(len(change))
    s_idx = order[start_mask]
    e_idx = s_idx + 1
    run_lab = starts_lab[start_mask]
    y = rows[s_idx] + offset_yx[0]
    x0 = cols[s_idx] + offset_yx[1]
    x1 = cols[e_idx] + offset_yx[1]
    boxes = shapely.box(x0, y, x1, y + 1)
    polys = np.empty(n, dtype=object)
    srt = np.argsort(run_lab, kind="stable")
    bounds = np.searchsorted(run_lab[srt], np.arange(1, n + 2))
    for k in range(n):
        group = boxes[srt[bounds[k] : bounds[k + 1]]]
        polys[k] = shapely.union_all(group) if len(group) > 1 else group[0]
    return polys


def _tissue_parts(
    class_map: np.ndarray,
    patch_prob: np.ndarray,
    *,
    offset_yx: tuple[int, int] = (0, 0),
    open_edges: tuple[bool, bool, bool, bool] = (False, False, False, False),
) -> dict[str, np.ndarray]:
    """Connected regions (4-connectivity) of each class, unsimplified, in grid units.

    Returns columns ``class_id``, ``prob_sum`` (sum of the class probability, 0-1 scale),
    ``count`` (pixels), ``touch`` (bool: region touches one of the ``open_edges`` - top, bottom,
    left, right - of the array, so it may continue beyond it), ``geometry``.
    """
    comp = np.zeros(class_map.shape, np.int32)
    class_of: list[np.ndarray] = []
    total = 0
    for c in np.unique(class_map):
        if c < 0:
            continue
        lab, n = ndi.label(class_map == c)
        comp[lab > 0] = lab[lab > 0] + total
        class_of.append(np.full(n, c, np.int32))
        total += n
    cls = np.concatenate(class_of) if class_of else np.zeros(0, np.int32)
    if total == 0:
        return {
            "class_id": cls,
            "prob_sum": np.zeros(0),
            "count": np.zeros(0, np.int64),
            "touch": np.zeros(0, bool),
            "geometry": np.empty(0, dtype=object),
        }
    fg = comp > 0
    lab = comp[fg].astype(np.int64)
    yy, xx = np.nonzero(fg)
    win = patch_prob[class_map[yy, xx].astype(np.intp), yy, xx]
    prob_sum = np.bincount(lab, weights=win.astype(np.float64) / _scale(patch_prob), minlength=total + 1)[1:]
    count = np.bincount(lab, minlength=total + 1)[1:]
    sides = [comp[0], comp[-1], comp[:, 0], comp[:, -1]]
    edge = np.unique(np.concatenate([side for side, is_open in zip(sides, open_edges) if is_open] or [[0]]))
    touch = np.zeros(total + 1, bool)
    touch[edge] = True
    geometry = _runs_to_polygons(comp, total, offset_yx)
    return {"class_id": cls, "prob_sum": prob_sum, "count": count, "touch": touch[1:], "geometry": geometry}


def _finish_regions(geometry: np.ndarray, *, downsample: float, simplify_px: float) -> np.ndarray:
    """Canonical form, scale to level 0, simplify; valid polygons."""
    if len(geometry) == 0:
        return geometry
    g = shapely.normalize(shapely.simplify(geometry, 0.0))
    if downsample != 1.0:
        g = shapely.transform(g, lambda xy: xy * downsample)
    if simplify_px > 0:
        g = shapely.simplify(g, simplify_px * downsample, preserve_topology=True)
    return _fix_invalid(np.asarray(g, dtype=object))


def tissue_polygons(
    patch_prob: np.ndarray,
    *,
    downsample: float,
    offset_yx: tuple[int, int] = (0, 0),
    min_area_px: int = 1,
    simplify_px: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One polygon (holes kept) per 4-connected region of each tissue class.

    Parameters
    ----------
    patch_prob : (C, H, W) uint8 or float ndarray
        Patch-Class probabilities on its own grid.
    downsample : float
        Level-0 pixels per Patch-Class pixel.
    offset_yx : (int, int)
        Grid position of ``patch_prob[:, 0, 0]``.
    min_area_px : int
        Smallest region kept, in grid pixels.
    simplify_px : float
        Simplification tolerance in grid pixels.

    Returns
    -------
    class_id : (n,) int32 ndarray
    probability : (n,) float64 ndarray
        Mean probability of the class over the region.
    polygons : (n,) object ndarray of shapely Polygons in level-0 px

    Examples
    --------
    >>> p = np.zeros((2, 2, 3), np.uint8); p[0, :, :2] = 255; p[1, :, 2] = 255
    >>> cid, prob, polys = tissue_polygons(p, downsample=10.0)
    >>> cid.tolist(), [g.area for g in polys]
    ([0, 1], [400.0, 200.0])
    """
    patch_prob = _validate_prob(patch_prob, name="patch_prob")
    if downsample <= 0:
        raise ValueError(f"downsample must be > 0; got {downsample}")
    parts = _tissue_parts(tissue_class_map(patch_prob), patch_prob, offset_yx=offset_yx)
    keep = parts["count"] >= min_area_px
    geometry = _finish_regions(parts["geometry"][keep], downsample=downsample, simplify_px=simplify_px)
    prob = parts["prob_sum"][keep] / parts["count"][keep]
    return parts["class_id"][keep], prob, geometry

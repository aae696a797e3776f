"""Scanline fill of polygons into a label tile, compiled with numba: the pixels of ``_labels._draw_all``.

:func:`fill_rings` takes the vertices of every ring of a tile's geometries (in tile pixels, as
``_draw_all`` computes them) and paints each geometry's rows in turn by the even-odd rule: the
crossings of its edges with each pixel row, sorted along the row, pair up into runs, and a later
geometry overwrites an earlier one. ``_draw_all``'s numpy version sorts every crossing of the tile
at once; this one sorts a geometry's few at a time. The kernel is compiled on first use and
cached; without numba, :func:`fill_rings` returns False and the numpy version runs.
"""

from __future__ import annotations

import math

import numpy as np

from .._numba import LazyKernel

__all__ = ["fill_rings"]

def _fill_py(tile, y, x, ring, obj, big, values):  # noqa: ANN001, ANN202 (compiled helper)
    """Paint geometry after geometry (vertices ``y``, ``x`` with their ``ring`` and geometry
    ``obj``, non-decreasing; ``big``: geometries with at least 3 vertices) with ``values``."""
    h, w = tile.shape
    n = len(y)
    s = 0
    while s < n:
        k = obj[s]
        e = s
        while e < n and obj[e] == k:
            e += 1
        if big[k]:
            _fill_one(tile, y, x, ring, s, e, values[k], h, w)
        s = e


def _fill_one(tile, y, x, ring, s, e, value, h, w):  # noqa: ANN001, ANN202 (compiled helper)
    """One geometry's runs (its vertices ``s:e``), painted with ``value``."""
    count = 0
    for i in range(s, e - 1):
        if ring[i + 1] == ring[i] and y[i + 1] != y[i]:
            first = max(math.ceil(min(y[i], y[i + 1])), 0.0)
            last = min(math.ceil(max(y[i], y[i + 1])) - 1.0, h - 1.0)
            if last >= first:
                count += int(last - first) + 1
    if count == 0:
        return
    keys = np.empty(count, np.int64)  # row * (w + 1) + column of each crossing
    c = 0
    for i in range(s, e - 1):
        if ring[i + 1] == ring[i] and y[i + 1] != y[i]:
            y0, y1, x0, x1 = y[i], y[i + 1], x[i], x[i + 1]
            first = max(math.ceil(min(y0, y1)), 0.0)
            last = min(math.ceil(max(y0, y1)) - 1.0, h - 1.0)
            slope = (x1 - x0) / (y1 - y0)
            r = first
            while r <= last:
                col = min(max(math.ceil(x0 + (r - y0) * slope), 0.0), float(w))
                keys[c] = np.int64(r) * (w + 1) + np.int64(col)
                c += 1
                r += 1.0
    keys.sort()
    for j in range(0, count - 1, 2):
        row, a = keys[j] // (w + 1), keys[j] % (w + 1)
        b = keys[j + 1] % (w + 1)
        for col in range(a, b):
            tile[row, col] = value


_KERNEL = LazyKernel(globals(), "_fill_py", "_fill_one")
_compiled = _KERNEL.get  # the compiled fill, compiled on first use; None without numba


def fill_rings(tile: np.ndarray, y: np.ndarray, x: np.ndarray, ring: np.ndarray, obj: np.ndarray, big: np.ndarray,
               values: np.ndarray) -> bool:
    """Paint ``tile`` as ``_labels._draw_all`` does from its vertices (float64 tile px ``y``, ``x``;
    ``ring`` and geometry ``obj`` of each, non-decreasing; ``big`` per geometry: at least 3
    vertices; ``values`` per geometry). False (nothing done) without numba."""
    kernel = _compiled()
    if kernel is None:
        return False
    kernel(tile, np.ascontiguousarray(y, np.float64), np.ascontiguousarray(x, np.float64), np.ascontiguousarray(ring, np.int64),
           np.ascontiguousarray(obj, np.int64), np.ascontiguousarray(big, np.bool_), np.asarray(values).astype(tile.dtype))
    return True

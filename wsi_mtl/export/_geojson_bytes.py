"""GeoJSON features written as bytes by compiled kernels (numba), a record batch at a time.

:func:`polygon_rings` reads the rings of 2-d little-endian WKB polygons in place (no shapely
geometry is made); :func:`rounding_safe` tells which polygons rounding to 0.01 cannot make
invalid; :func:`feature_bytes` writes each feature from its template's literal parts, its id,
its rings' coordinates (rounded to 0.01, as orjson writes them: shortest text, ``.0`` on whole
numbers) and its measurements (rounded to 0.0001, as ``%.12g`` writes them), every field taken
from ``aux`` text instead where the caller gives one. Features are joined by ``,\\n``. Where
:func:`kernels_available` is False (no numba, or ``WSIMTL_NO_NUMBA=1``) the caller formats the
text in Python instead (the same bytes).
"""

from __future__ import annotations

import math
import sys

import numpy as np

from .._numba import LazyKernel

__all__ = ["polygon_rings", "rounding_safe", "feature_bytes", "text_bytes", "kernels_available", "FIELDS"]

#: fields of a feature, in template order: id, geometry and the measurements
FIELDS = 9
_MEASURE0 = 2  # the first measurement field
_SEP0, _SEP1 = 44, 10  # ",\n" between features


def _u32(data, p):  # noqa: ANN001, ANN202 (compiled helper)
    """The little-endian uint32 at ``data[p:p + 4]``."""
    return np.int64(data[p]) | (np.int64(data[p + 1]) << 8) | (np.int64(data[p + 2]) << 16) | (np.int64(data[p + 3]) << 24)


def _scan_py(offsets, data, rings, points):  # noqa: ANN001, ANN202 (compiled helper)
    """Each WKB's number of rings and points where it is a 2-d little-endian polygon whose
    bytes end with its last ring; -1 rings for anything else."""
    for i in range(len(offsets) - 1):
        s, e = offsets[i], offsets[i + 1]
        rings[i], points[i] = -1, 0
        if e - s < 9 or data[s] != 1 or _u32(data, s + 1) != 3:
            continue
        n_rings, p, n_points = _u32(data, s + 5), s + 9, 0
        for _ in range(n_rings):
            if p + 4 > e:
                break
            n = _u32(data, p)
            p += 4 + 16 * n
            n_points += n
        if p == e:
            rings[i], points[i] = n_rings, n_points


def _copy_rings_py(offsets, data, rows, ring_sizes, xy):  # noqa: ANN001, ANN202 (compiled helper)
    """The point count of each ring and the coordinate bytes of the polygons ``rows``, in order."""
    r, q = 0, 0
    for i in rows:
        n_rings, p = _u32(data, offsets[i] + 5), offsets[i] + 9
        for _ in range(n_rings):
            n = _u32(data, p)
            ring_sizes[r] = n
            xy[q : q + 16 * n] = data[p + 4 : p + 4 + 16 * n]
            r += 1
            q += 16 * n
            p += 4 + 16 * n


def _put_whole(out, pos, v):  # noqa: ANN001, ANN202 (compiled helper)
    """Write the digits of ``v`` >= 0 at ``pos``; the position after them."""
    n, w = 1, v
    while w >= 10:
        w //= 10
        n += 1
    for j in range(pos + n - 1, pos - 1, -1):
        out[j] = 48 + v % 10
        v //= 10
    return pos + n


def _put_sign(out, pos, k):  # noqa: ANN001, ANN202 (compiled helper)
    """Write ``-`` where the float ``k`` is negative (-0 too); the position after it and |k| as int."""
    if k < 0 or (k == 0 and math.copysign(1.0, k) < 0):
        out[pos] = 45  # -
        return pos + 1, np.int64(-k)
    return pos, np.int64(k)


def _put_coordinate(out, pos, value):  # noqa: ANN001, ANN202 (compiled helper)
    """``value`` rounded to 2 decimals, as orjson writes a float: shortest digits, ``.0`` when whole."""
    pos, k = _put_sign(out, pos, np.rint(value * 100.0))
    whole = k // 100
    frac = k - whole * 100
    pos = _put_whole(out, pos, whole)
    out[pos] = 46  # .
    tens = frac // 10
    out[pos + 1] = 48 + tens
    if frac - tens * 10 == 0:
        return pos + 2
    out[pos + 2] = 48 + frac - tens * 10
    return pos + 3


def _put_measurement(out, pos, value):  # noqa: ANN001, ANN202 (compiled helper)
    """``value`` rounded to 4 decimals, as ``%.12g`` writes it (below 1e8; whole below 1e12, no .0)."""
    pos, k = _put_sign(out, pos, np.rint(value * 10000.0))
    whole = k // 10000
    frac = k - whole * 10000
    pos = _put_whole(out, pos, whole)
    if frac == 0:
        return pos
    out[pos] = 46  # .
    width = 4
    while frac % 10 == 0:
        frac //= 10
        width -= 1
    for j in range(pos + width, pos, -1):
        out[j] = 48 + frac % 10
        frac //= 10
    return pos + 1 + width


def _put_bytes(out, pos, src, a, b):  # noqa: ANN001, ANN202 (compiled helper)
    out[pos : pos + b - a] = src[a:b]
    return pos + b - a


def _put_rings(out, pos, xy, ring_ptr, r0, r1):  # noqa: ANN001, ANN202 (compiled helper)
    """The points of rings ``r0:r1`` as ``[x,y],...`` with ``],[`` between rings."""
    for r in range(r0, r1):
        if r > r0:
            out[pos], out[pos + 1], out[pos + 2] = 93, 44, 91  # ],[
            pos += 3
        for p in range(ring_ptr[r], ring_ptr[r + 1]):
            if p > ring_ptr[r]:
                out[pos] = 44  # ,
                pos += 1
            out[pos] = 91  # [
            pos = _put_coordinate(out, pos + 1, xy[p, 0])
            out[pos] = 44  # ,
            pos = _put_coordinate(out, pos + 1, xy[p, 1])
            out[pos] = 93  # ]
            pos += 1
    return pos


def _put_row(out, pos, i, t, parts, part_bounds, ids, id_bounds, xy, ring_ptr, row_rings, values, aux, aux_bounds):  # noqa: ANN001, ANN202, E501 (compiled helper)
    """One feature: its template's parts with the fields between them."""
    for f in range(FIELDS):
        pos = _put_bytes(out, pos, parts, part_bounds[t, f, 0], part_bounds[t, f, 1])
        if aux_bounds[i, f, 0] >= 0:
            pos = _put_bytes(out, pos, aux, aux_bounds[i, f, 0], aux_bounds[i, f, 1])
        elif f == 0:
            pos = _put_bytes(out, pos, ids, id_bounds[i, 0], id_bounds[i, 1])
        elif f == 1:
            pos = _put_rings(out, pos, xy, ring_ptr, row_rings[i], row_rings[i + 1])
        elif np.isfinite(values[i, f - _MEASURE0]):
            pos = _put_measurement(out, pos, values[i, f - _MEASURE0])
    return _put_bytes(out, pos, parts, part_bounds[t, FIELDS, 0], part_bounds[t, FIELDS, 1])


def _features_py(rows, templates, parts, part_bounds, ids, id_bounds, xy, ring_ptr, row_rings, values, aux, aux_bounds, out, starts, ends):  # noqa: ANN001, ANN202, E501 (compiled helper)
    """Write the features of ``rows`` joined by ``,\\n`` into ``out`` (large enough); each one's
    span in ``starts``/``ends``; returns the length written."""
    pos = 0
    for j in range(len(rows)):
        if j:
            out[pos], out[pos + 1] = _SEP0, _SEP1
            pos += 2
        starts[j] = pos
        pos = _put_row(out, pos, rows[j], templates[rows[j]], parts, part_bounds, ids, id_bounds, xy, ring_ptr,
                       row_rings, values, aux, aux_bounds)
        ends[j] = pos
    return pos


def _point_segment_d2(px, py, ax, ay, bx, by):  # noqa: ANN001, ANN202 (compiled helper)
    """The squared distance from point p to segment ab."""
    dx, dy = bx - ax, by - ay
    length2 = dx * dx + dy * dy
    t = 0.0 if length2 == 0 else min(1.0, max(0.0, ((px - ax) * dx + (py - ay) * dy) / length2))
    ex, ey = ax + t * dx - px, ay + t * dy - py
    return ex * ex + ey * ey


def _cross(ax, ay, bx, by, cx, cy):  # noqa: ANN001, ANN202 (compiled helper)
    """The sign of the turn a -> b -> c (1 left, -1 right, 0 straight)."""
    v = (bx - ax) * (cy - ay) - (by - ay) * (cx - ax)
    return 1 if v > 0 else (-1 if v < 0 else 0)


def _edges_apart(xy, i, j, tol2):  # noqa: ANN001, ANN202 (compiled helper)
    """Whether the segments from points i and j (to i + 1, j + 1) are more than tol apart."""
    ax, ay, bx, by = xy[i, 0], xy[i, 1], xy[i + 1, 0], xy[i + 1, 1]
    cx, cy, dx, dy = xy[j, 0], xy[j, 1], xy[j + 1, 0], xy[j + 1, 1]
    if (_cross(ax, ay, bx, by, cx, cy) * _cross(ax, ay, bx, by, dx, dy) < 0
            and _cross(cx, cy, dx, dy, ax, ay) * _cross(cx, cy, dx, dy, bx, by) < 0):
        return False  # they cross
    return min(_point_segment_d2(ax, ay, cx, cy, dx, dy), _point_segment_d2(bx, by, cx, cy, dx, dy),
               _point_segment_d2(cx, cy, ax, ay, bx, by), _point_segment_d2(dx, dy, ax, ay, bx, by)) > tol2


def _rounding_safe_py(xy, ring_ptr, row_rings, rows, tol, safe):  # noqa: ANN001, ANN202 (compiled helper)
    """Whether moving every point of each polygon ``rows`` by less than tol / 2 keeps it as valid
    as it is: every two edges more than ``tol`` apart, and of two edges that meet, each one's far
    end more than ``tol`` from the other edge. Edges are swept by x, so only pairs whose x and y
    spans come within tol are measured."""
    tol2 = tol * tol
    most = 1
    for n in range(len(rows)):
        most = max(most, ring_ptr[row_rings[rows[n] + 1]] - ring_ptr[row_rings[rows[n]]])
    starts, ring_of = np.empty(most, np.int64), np.empty(most, np.int64)
    lo, hi, order = np.empty(most), np.empty(most), np.empty(most, np.int64)
    bottom, top = np.empty(most), np.empty(most)
    for n in range(len(rows)):
        ok, m = True, 0
        for r in range(row_rings[rows[n]], row_rings[rows[n] + 1]):
            ok = ok and ring_ptr[r + 1] - ring_ptr[r] >= 4
            for e in range(ring_ptr[r], ring_ptr[r + 1] - 1):  # the edge from point e to e + 1
                starts[m], ring_of[m] = e, r
                lo[m], hi[m] = min(xy[e, 0], xy[e + 1, 0]), max(xy[e, 0], xy[e + 1, 0])
                bottom[m], top[m] = min(xy[e, 1], xy[e + 1, 1]), max(xy[e, 1], xy[e + 1, 1])
                m += 1
        for a in range(m):  # insertion sort by lo: outlines are short and their edges come nearly sorted in runs
            order[a] = a
            b = a
            while b > 0 and lo[order[b - 1]] > lo[a]:
                order[b] = order[b - 1]
                b -= 1
            order[b] = a
        for a in range(m):
            if not ok:
                break
            e, r = starts[order[a]], ring_of[order[a]]
            for b in range(a + 1, m):
                if lo[order[b]] > hi[order[a]] + tol:
                    break
                if bottom[order[b]] > top[order[a]] + tol or bottom[order[a]] > top[order[b]] + tol:
                    continue  # apart in y
                f = starts[order[b]]
                first, last = ring_ptr[r], ring_ptr[r + 1] - 2  # the ring's first and last edge
                if r == ring_of[order[b]] and (abs(e - f) == 1 or (min(e, f) == first and max(e, f) == last)):
                    p, q = (e, f) if (f == e + 1 or (e == last and f == first)) else (f, e)  # p's end is q's start
                    if (_point_segment_d2(xy[q + 1, 0], xy[q + 1, 1], xy[p, 0], xy[p, 1], xy[p + 1, 0], xy[p + 1, 1]) <= tol2
                            or _point_segment_d2(xy[p, 0], xy[p, 1], xy[q, 0], xy[q, 1], xy[q + 1, 0], xy[q + 1, 1]) <= tol2):
                        ok = False
                        break
                elif not _edges_apart(xy, e, f, tol2):
                    ok = False
                    break
        safe[n] = ok


_SCAN = LazyKernel(globals(), "_scan_py", "_u32")
_COPY = LazyKernel(globals(), "_copy_rings_py", "_u32")
_SAFE = LazyKernel(globals(), "_rounding_safe_py", "_point_segment_d2", "_cross", "_edges_apart")
_FEATURES = LazyKernel(globals(), "_features_py", "_put_whole", "_put_sign", "_put_coordinate", "_put_measurement",
                       "_put_bytes", "_put_rings", "_put_row")


def kernels_available() -> bool:
    """Whether the compiled writer can run here (numba allowed, a little-endian machine)."""
    return sys.byteorder == "little" and _FEATURES.get() is not None


def rings_available() -> bool:
    """Whether :func:`polygon_rings` can run here (numba allowed, a little-endian machine)."""
    return sys.byteorder == "little" and _SCAN.get() is not None and _COPY.get() is not None


def polygon_rings(offsets: np.ndarray, data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read the WKB of each row (``data[offsets[i]:offsets[i + 1]]``).

    Returns each row's ring count (-1: not a 2-d little-endian polygon, left to shapely; 0: an
    empty polygon), the (m, 2) float64 coordinates of all polygons' points in row order, the
    point index where each ring starts (one more entry: the end) and the ring index where each
    row's rings start (one more entry).
    """
    n = len(offsets) - 1
    rings, points = np.empty(n, np.int64), np.empty(n, np.int64)
    _SCAN.get()(offsets, data, rings, points)
    polygons = np.flatnonzero(rings > 0)
    row_rings = np.zeros(n + 1, np.int64)
    np.cumsum(np.maximum(rings, 0), out=row_rings[1:])
    ring_sizes = np.empty(row_rings[-1], np.int64)
    xy_bytes = np.empty(16 * int(points[polygons].sum()), np.uint8)
    _COPY.get()(offsets, data, polygons, ring_sizes, xy_bytes)
    ring_ptr = np.zeros(len(ring_sizes) + 1, np.int64)
    np.cumsum(ring_sizes, out=ring_ptr[1:])
    return rings, xy_bytes.view(np.float64).reshape(-1, 2), ring_ptr, row_rings


#: how far rounding to 0.01 can move a point (half the grid's diagonal), with room for float error
_ROUNDING_MOVE = 0.00708


def rounding_safe(rows: np.ndarray, rings: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """Whether rounding the coordinates of each polygon ``rows`` to 0.01 cannot change its validity
    (see :func:`_rounding_safe_py`); False means: check the rounded polygon itself."""
    safe = np.empty(len(rows), np.bool_)
    _SAFE.get()(*rings, np.ascontiguousarray(rows, np.int64), 2 * _ROUNDING_MOVE, safe)
    return safe


def feature_bytes(
    rows: np.ndarray,
    templates: np.ndarray,
    parts: np.ndarray,
    part_bounds: np.ndarray,
    ids: tuple[np.ndarray, np.ndarray],
    rings: tuple[np.ndarray, np.ndarray, np.ndarray],
    values: np.ndarray,
    aux: tuple[np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The features of ``rows`` (in that order) joined by ``,\\n``, and each one's start and end.

    ``templates``: each row's template, whose :data:`FIELDS` + 1 literal parts are
    ``parts[part_bounds[t, j, 0]:part_bounds[t, j, 1]]``; ``ids``: UTF-8 bytes and (n, 2) spans;
    ``rings``: (m, 2) coordinates, ring starts and each row's first ring (from
    :func:`polygon_rings`); ``values``: (n, 7) measurements rounded to 4 decimals (NaN: nothing
    written; every other value finite and under 1e8, or whole and under 1e12, and not -0);
    ``aux``: UTF-8 bytes and (n, :data:`FIELDS`, 2) spans of text written instead of a field
    (start -1: none).
    """
    rows = np.ascontiguousarray(rows, np.int64)
    starts, ends = np.empty(len(rows), np.int64), np.empty(len(rows), np.int64)
    out = np.empty(_size_bound(rows, templates, part_bounds, ids[0], rings, aux[0]), np.uint8)
    size = _FEATURES.get()(
        rows, np.ascontiguousarray(templates, np.int64), parts, part_bounds, ids[0], ids[1], *rings,
        np.ascontiguousarray(values, np.float64), aux[0], aux[1], out, starts, ends,
    )
    return out[:size], starts, ends


#: the most bytes a measurement takes: sign, 8 digits, point and 4 decimals (whole numbers: 12 digits)
_NUMBER_BYTES = 14


def _size_bound(rows: np.ndarray, templates: np.ndarray, part_bounds: np.ndarray, ids: np.ndarray,
                rings: tuple[np.ndarray, np.ndarray, np.ndarray], aux: np.ndarray) -> int:
    """An upper bound of the bytes :func:`feature_bytes` writes for ``rows``: their templates'
    parts, and every id, aux text and point of the batch (a coordinate takes at most a sign, the
    digits of the batch's largest, a point and 2 decimals)."""
    xy, ring_ptr, _ = rings
    part_sizes = (part_bounds[:, :, 1] - part_bounds[:, :, 0]).sum(axis=1)
    finite = np.abs(xy[np.isfinite(xy)])
    digits = len(str(int(finite.max()) + 1)) if len(finite) else 1  # + 1: rounding up can add a digit
    per_row = _NUMBER_BYTES * (FIELDS - _MEASURE0) + 2
    return int(part_sizes[templates[rows]].sum() + len(ids) + len(aux) + len(xy) * (2 * (digits + 4) + 4)
               + 3 * len(ring_ptr) + per_row * len(rows))


def text_bytes(texts: list[str], sep: str = "") -> tuple[np.ndarray, np.ndarray]:
    """The UTF-8 bytes of ``texts`` joined by ``sep``, and each text's (start, end) in them."""
    joined = sep.join(texts)
    data = joined.encode("utf-8")
    lengths = np.fromiter(map(len, texts), np.int64, count=len(texts))
    if len(data) != len(joined):  # not all ASCII: lengths in bytes
        lengths = np.fromiter((len(t.encode("utf-8")) for t in texts), np.int64, count=len(texts))
    bounds = np.zeros((len(texts), 2), np.int64)
    np.cumsum(lengths + len(sep.encode("utf-8")), out=bounds[:, 1])
    bounds[:, 1] -= len(sep.encode("utf-8"))
    bounds[:, 0] = bounds[:, 1] - lengths
    return np.frombuffer(data, np.uint8), bounds

"""Vectorised marching squares over a whole label image: every object's rings in one pass.

Equivalent to :func:`skimage.measure.find_contours` at level 0.5 on each object's binary mask
(``fully_connected="high"``: diagonal neighbours join), but computed for all objects at once with
numpy, which is what makes tracing hundreds of thousands of nuclei affordable (with numba
the same two steps, segments then rings, run compiled: ~2x faster, identical rings). Rings are oriented
counter-clockwise around objects (positive shoelace area in (x, y)) and clockwise around holes.
"""

from __future__ import annotations

import numpy as np

from wsi_mtl.postprocess import _compiled

__all__ = ["trace_rings"]

# corners of a cell (2 x 2 pixel centres) and their bit in the case index
_TL, _TR, _BR, _BL = 1, 2, 4, 8
# edge midpoints of a cell in doubled coordinates relative to the cell's top-left pixel: T, R, B, L
_EDGE_YX = np.array([[0, 1], [1, 2], [2, 1], [1, 0]], dtype=np.int64)
_CORNER_YX = {_TL: (0, 0), _TR: (0, 2), _BR: (2, 2), _BL: (2, 0)}


def _segment_table() -> tuple[np.ndarray, np.ndarray]:
    """For each of the 16 cases, up to two oriented segments (start edge, end edge); -1 = none."""
    start = -np.ones((16, 2), np.int64)
    end = -np.ones((16, 2), np.int64)
    pairs_of_edge = {0: (_TL, _TR), 1: (_TR, _BR), 2: (_BR, _BL), 3: (_BL, _TL)}
    for case in range(1, 15):
        inside = {c for c in (_TL, _TR, _BR, _BL) if case & c}
        crossed = [e for e, (a, b) in pairs_of_edge.items() if ((a in inside) != (b in inside))]
        if len(crossed) == 2:
            segs = [tuple(crossed)]
        elif case == _TL | _BR:  # saddle, object joined: cut the background corners TR and BL
            segs = [(0, 1), (2, 3)]
        else:  # _TR | _BL: cut TL and BR
            segs = [(0, 3), (1, 2)]
        for k, (e1, e2) in enumerate(segs):
            p1, p2 = _EDGE_YX[e1], _EDGE_YX[e2]
            dy, dx = p2 - p1
            score = 0.0
            for c, (cy, cx) in _CORNER_YX.items():
                vy, vx = cy - p1[0], cx - p1[1]
                side = np.sign(dx * vy - dy * vx)  # cross((dx, dy), (vx, vy)) in (x, y)
                score += side if c in inside else -side
            if score < 0:  # object must lie on the left: counter-clockwise outer rings in (x, y)
                e1, e2 = e2, e1
            start[case, k], end[case, k] = e1, e2
    return start, end


_SEG_START, _SEG_END = _segment_table()


def trace_rings(labels: np.ndarray, want: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Closed boundary rings of the wanted labels.

    Parameters
    ----------
    labels : (H, W) int ndarray
    want : (labels.max() + 1,) bool ndarray
        Which labels to trace (``want[0]`` is ignored).

    Returns
    -------
    ring_label : (r,) int64 ndarray
        Label of each ring.
    coords : (m, 2) float64 ndarray
        Ring vertices as (row, col) in pixel-index units of ``labels`` (pixel centres are integers;
        vertices lie half-way between centres), rings concatenated, not repeated at the end.
    ring_start : (r + 1,) int64 ndarray
        Ring ``k`` is ``coords[ring_start[k]:ring_start[k + 1]]``.
    area : (r,) float64 ndarray
        Signed shoelace area in (x=col, y=row): > 0 outer boundary, < 0 hole.
    """
    want = np.asarray(want, bool).copy()
    if want.size:
        want[0] = False
    if _compiled.available() and labels.ndim == 2 and labels.dtype.kind in "iu":
        rings = _compiled.trace_rings(labels, want, _SEG_START, _SEG_END, _EDGE_YX)
        return _empty() if rings is None else rings
    h, w = labels.shape
    p = np.zeros((h + 2, w + 2), np.int64)
    p[1:-1, 1:-1] = labels
    tl, tr, br, bl = p[:-1, :-1], p[:-1, 1:], p[1:, 1:], p[1:, :-1]
    # boundary cells: not all four corners equal
    ci, cj = np.nonzero((tl != tr) | (tl != br) | (tl != bl))
    if len(ci) == 0:
        return _empty()
    corners = np.stack([tl[ci, cj], tr[ci, cj], br[ci, cj], bl[ci, cj]])  # (4, n)
    bits = np.array([_TL, _TR, _BR, _BL], np.int64)[:, None]
    seg_lab, seg_y0, seg_x0, seg_y1, seg_x1 = [], [], [], [], []
    top = int(labels.max(initial=0))
    for k in range(4):
        ref = corners[k]
        ok = want[np.minimum(ref, top)] & (ref <= top) & (ref > 0)
        for j in range(k):
            ok &= corners[j] != ref
        if not ok.any():
            continue
        r = ref[ok]
        case = ((corners[:, ok] == r) * bits).sum(axis=0)
        y, x = 2 * ci[ok], 2 * cj[ok]
        for s in range(2):
            e0 = _SEG_START[case, s]
            has = e0 >= 0
            if not has.any():
                continue
            e0, e1 = e0[has], _SEG_END[case[has], s]
            seg_lab.append(r[has])
            seg_y0.append(y[has] + _EDGE_YX[e0, 0])
            seg_x0.append(x[has] + _EDGE_YX[e0, 1])
            seg_y1.append(y[has] + _EDGE_YX[e1, 0])
            seg_x1.append(x[has] + _EDGE_YX[e1, 1])
    if not seg_lab:
        return _empty()
    lab = np.concatenate(seg_lab)
    y0, x0 = np.concatenate(seg_y0), np.concatenate(seg_x0)
    y1, x1 = np.concatenate(seg_y1), np.concatenate(seg_x1)
    h2, w2 = 2 * (h + 2), 2 * (w + 2)
    k_start = (lab * h2 + y0) * w2 + x0
    k_end = (lab * h2 + y1) * w2 + x1
    order = np.argsort(k_start, kind="stable")
    k_start_sorted = k_start[order]
    nxt_sorted = np.searchsorted(k_start_sorted, k_end[order])  # successor, in sorted positions
    n = len(order)
    # cycle representative = smallest position in the cycle, by pointer doubling
    rep = np.arange(n)
    jump = nxt_sorted.copy()
    while True:
        new = np.minimum(rep, rep[jump])
        if np.array_equal(new, rep):
            break
        rep = new
        jump = jump[jump]
    starts = np.flatnonzero(rep == np.arange(n))
    lengths = np.bincount(rep, minlength=n)[starts]
    by_len = np.argsort(-lengths, kind="stable")
    starts, lengths = starts[by_len], lengths[by_len]
    ring_start = np.zeros(len(starts) + 1, np.int64)
    np.cumsum(lengths, out=ring_start[1:])
    seq = np.empty(n, np.int64)
    cur = starts.copy()
    neg = -lengths  # ascending
    for t in range(int(lengths[0])):
        m = int(np.searchsorted(neg, -t, side="left"))  # rings longer than t come first
        seq[ring_start[:m] + t] = cur[:m]
        cur[:m] = nxt_sorted[cur[:m]]
    seg = order[seq]
    coords = np.stack([y0[seg] / 2.0 - 1.0, x0[seg] / 2.0 - 1.0], axis=1)
    ring_label = lab[order[starts]]
    # shoelace per ring in (x, y)
    ring_of = np.repeat(np.arange(len(starts)), lengths)
    nxt_in_ring = np.arange(n) + 1
    nxt_in_ring[ring_start[1:] - 1] = ring_start[:-1]
    yy, xx = coords[:, 0], coords[:, 1]
    area = 0.5 * np.bincount(ring_of, weights=xx * yy[nxt_in_ring] - xx[nxt_in_ring] * yy, minlength=len(starts))
    return ring_label, coords, ring_start, area


def _empty() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return np.zeros(0, np.int64), np.zeros((0, 2)), np.zeros(1, np.int64), np.zeros(0)

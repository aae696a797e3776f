"""Compiled (numba) versions of post-processing steps, with the same results.

Row runs (:func:`components`): each row's runs of True are found once; components join the runs
of consecutive rows that overlap (union-find, the earliest run the root, so the numbers follow
``scipy.ndimage.label``'s raster order), and their boxes come with them, without a label image
where only boxes are needed.

Packed rows (:func:`open_rows`): 64 pixels to a word, so erosion and dilation by a footprint's rows
are a few shifts, ANDs and ORs per word.

:func:`grow_ranks`: the square growth of glands and lumen as one chamfer transform of (distance,
rank) keys in two raster sweeps.

:func:`edt32`: the Euclidean distance transform (Meijster's two passes, exact integer squared
distances, so the same float32 values as scipy's whatever feature pixel it picks).

:func:`smooth_and_peaks`: the Gaussian smoothing (scipy's own arithmetic) and 3x3 local maxima.

:func:`block_means`: the area means of :func:`~wsi_mtl.postprocess.downsample_prob` in integer sums.

:func:`hull_areas`: the convex-hull area of each ring (monotone chain), summed as GEOS sums it.

:func:`type_votes`, :func:`type_sums`: the nuclear-type vote of
:func:`~wsi_mtl.postprocess.instance_type` and its winners' probabilities, one pass each.

:func:`h_maxima_bool`: ``skimage.morphology.h_maxima`` (3x3 footprint) of a non-negative float32
image. The h-maxima are ``image - rec >= h`` where ``rec`` is the grey reconstruction by dilation of
``image - h - resolution`` under ``image``. skimage sorts every pixel of the image for it; here,
with numba, the positive pixels are reconstructed by two raster scans and a
first-in first-out queue (Vincent's hybrid algorithm), never through a zero. Islands of positive
pixels meet only through pixels of value 0, so all they receive from one another is the constant
``min(max(seed), 0)``. Reconstruction values are seeds or image values, never computed, so the
result is exactly skimage's (``tests/test_postprocess_fast_paths.py``). Without numba, or for
other images, skimage is called.
"""

from __future__ import annotations

import numpy as np

from wsi_mtl._numba import numba_allowed

__all__ = ["available", "edt32", "smooth_and_peaks", "h_maxima_bool", "flood_components", "cut_at_peaks", "crops_on_canvas", "box_table", "tissue_counts", "grow_ranks", "open_rows", "components", "component_runs", "kept_components", "block_means", "core_mask_u8", "label_counts", "label_owners", "relabel_in_place", "trace_rings", "type_votes", "type_sums", "hull_areas", "HAVE_NUMBA"]

#: Whether numba is installed and not switched off by the environment variable
#: ``WSIMTL_NO_NUMBA=1`` (numba's LLVM adds ~140 MB to each process that cuts necks); it is
#: imported, and the kernels compiled or loaded from numba's cache, on first use only.
HAVE_NUMBA = numba_allowed()
_ready = False


def available() -> bool:
    """Whether the compiled kernels can be used (imports numba on the first call)."""
    if HAVE_NUMBA:
        _kernels()
    return HAVE_NUMBA


def _kernels() -> None:
    """Replace the plain-Python kernels by numba's (``cache=True``), once; without numba they stay."""
    global HAVE_NUMBA, _ready, _reconstruct, _edt, _reflect, _smooth_peaks, _border_sum, _top
    global _push, _pop, _side, _flood, _flood_components, _label4, _cut_at_peaks, _box_table, _grow, _open, _crops_on_canvas, _tissue_counts
    global _next_run, _root, _runs, _boxes_of_runs, _components, _kept_runs, _block_means, _label_counts, _relabel, _label_sums, _label_owners
    global _shift_into, _row_spans, _ring_segments, _chain_rings, _successors, _slot, _type_votes, _type_sums, _grown_queue, _grow_near, _grow_row
    global _core, _hull_areas, _hull_push, _geos_hull_area
    if _ready:
        return
    _ready = True
    try:
        import numba
    except ImportError:  # found but broken: the callers take skimage's and scipy's paths
        HAVE_NUMBA = False
        return
    jit = numba.njit(cache=True, nogil=True)
    _reflect = jit(_reflect_py)
    _border_sum, _top = jit(_border_sum_py), jit(_top_py)
    _reconstruct, _edt, _smooth_peaks = jit(_reconstruct_py), jit(_edt_py), jit(_smooth_peaks_py)
    _push, _pop, _flood, _label4 = jit(_push_py), jit(_pop_py), jit(_flood_py), jit(_label4_py)
    _flood_components, _cut_at_peaks = jit(_flood_components_py), jit(_cut_at_peaks_py)
    _crops_on_canvas, _tissue_counts = jit(_crops_on_canvas_py), jit(_tissue_counts_py)
    _box_table, _grow, _side, _open = jit(_box_table_py), jit(_grow_py), jit(_side_py), jit(_open_py)
    _next_run, _root, _runs, _boxes_of_runs = jit(_next_run_py), jit(_root_py), jit(_runs_py), jit(_boxes_of_runs_py)
    _components, _kept_runs, _block_means = jit(_components_py), jit(_kept_runs_py), jit(_block_means_py)
    _label_counts, _relabel, _label_sums = jit(_label_counts_py), jit(_relabel_py), jit(_label_sums_py)
    _label_owners = jit(_label_owners_py)
    _shift_into, _row_spans = jit(_shift_into_py), jit(_row_spans_py)
    _slot = jit(_slot_py)
    _successors = jit(_successors_py)
    _ring_segments, _chain_rings = jit(_ring_segments_py), jit(_chain_rings_py)
    _type_votes, _type_sums = jit(_type_votes_py), jit(_type_sums_py)
    _grown_queue, _grow_near, _grow_row = jit(_grown_queue_py), jit(_grow_near_py), jit(_grow_row_py)
    _core = jit(_core_py)
    _hull_push, _geos_hull_area = jit(_hull_push_py), jit(_geos_hull_area_py)
    _hull_areas = jit(_hull_areas_py)


def _sk_h_maxima(image: np.ndarray, h: float) -> np.ndarray:
    """skimage's h-maxima, imported only where the compiled path does not apply (skimage's
    morphology takes ~0.17 s to import in each process that starts)."""
    from skimage.morphology import h_maxima

    return h_maxima(image, h)


def h_maxima_bool(image: np.ndarray, h: float) -> np.ndarray:
    """``skimage.morphology.h_maxima(image, h).astype(bool)`` (default footprint), compiled for a
    2-D float32 ``image`` >= 0 when numba is installed."""
    if not available() or image.ndim != 2 or image.dtype != np.float32 or image.size == 0 or h <= 0:
        return _sk_h_maxima(image, h).astype(bool)
    low = image.min()
    if not low >= 0:  # negative or NaN: not the islands this path assumes
        return _sk_h_maxima(image, h).astype(bool)
    if h > np.ptp(image):
        return np.zeros(image.shape, bool)
    # the seed exactly as skimage makes it (then stored in the image's float type)
    resolution = 2 * np.finfo(image.dtype).resolution * np.abs(image)
    seed = np.asarray(image - h - resolution).astype(np.float32)
    img = np.ascontiguousarray(image)
    _kernels()
    rec = _reconstruct(img, np.ascontiguousarray(seed))
    if low == 0:  # islands and zeros receive the best seed through the zeros, capped at 0
        floor = min(seed.max(), np.float32(0))
        np.maximum(rec, floor, out=rec)
        rec[img == 0] = floor
    residue = image - rec
    return residue >= h


def edt32(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.distance_transform_edt(mask).astype(np.float32)`` for a 2-D ``mask`` with a
    False pixel (needs numba: check :data:`HAVE_NUMBA`)."""
    _kernels()
    return _edt(np.ascontiguousarray(mask, dtype=np.bool_))


def _edt_py(mask: np.ndarray) -> np.ndarray:
    """Distance of each pixel to the nearest False pixel as float32 (of the float64 square root of
    the exact integer squared distance; Meijster et al. 2000). Along a row, only the run of True
    pixels between two False ones is searched: no pixel beyond a False one can be nearer."""
    hgt, wid = mask.shape
    far = hgt + wid  # more than any distance when the mask has a False pixel
    g = np.zeros((hgt, wid), np.int32)  # vertical distances, whole rows at a time (vectorised)
    top = np.int32(far)
    for x in range(wid):
        g[0, x] = top if mask[0, x] else np.int32(0)
    for y in range(1, hgt):
        prev, cur, m = g[y - 1], g[y], mask[y]
        for x in range(wid):
            v = min(prev[x] + np.int32(1), top)
            cur[x] = v if m[x] else np.int32(0)
    for y in range(hgt - 2, -1, -1):
        nxt, cur = g[y + 1], g[y]
        for x in range(wid):
            cur[x] = min(cur[x], nxt[x] + np.int32(1))  # 0 off the mask stays 0
    out = np.zeros((hgt, wid), np.float32)
    s = np.empty(wid + 2, np.int64)
    t = np.empty(wid + 2, np.int64)
    for y in range(hgt):
        gy = g[y]
        a, x = _next_run(mask[y], 0)
        while a < wid:
            lo = a - 1 if a > 0 else a
            hi = x if x < wid else x - 1  # inclusive
            # lower envelope of (u - i)^2 + g(i)^2 over i in lo..hi
            q = 0
            s[0] = lo
            t[0] = lo
            for u in range(lo + 1, hi + 1):
                gu = np.int64(gy[u])
                while q >= 0:
                    gi = np.int64(gy[s[q]])
                    if (t[q] - s[q]) ** 2 + gi * gi > (t[q] - u) ** 2 + gu * gu:
                        q -= 1
                    else:
                        break
                if q < 0:
                    q = 0
                    s[0] = u
                    t[0] = lo
                else:
                    i = s[q]
                    gi = np.int64(gy[i])
                    w = 1 + (u * u - i * i + gu * gu - gi * gi) // (2 * (u - i))
                    if w <= hi:
                        q += 1
                        s[q] = u
                        t[q] = w
            for u in range(hi, lo - 1, -1):
                if u >= a and u < x:
                    gi = np.int64(gy[s[q]])
                    out[y, u] = np.float32(np.sqrt(np.float64((u - s[q]) ** 2 + gi * gi)))
                if u == t[q]:
                    q -= 1
            a, x = _next_run(mask[y], x)
    return out


def gaussian_weights(sigma: float, radius: int) -> np.ndarray:
    """The 1-D kernel ``scipy.ndimage.gaussian_filter`` correlates with (order 0)."""
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (sigma * sigma) * x**2)
    return (phi / phi.sum())[::-1].copy()


def smooth_and_peaks(dist: np.ndarray, core: np.ndarray, sigma: float, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """``d = gaussian_filter(dist, sigma, truncate=radius / sigma) * core`` (float32 ``dist``) and
    ``(d == maximum_filter(d, size=3)) & core``, with scipy's arithmetic (per axis, in float64 over
    the symmetric pairs of the kernel, each pass stored as float32, borders reflected); needs numba."""
    w = gaussian_weights(sigma, radius)
    _kernels()
    return _smooth_peaks(np.ascontiguousarray(dist, np.float32), np.ascontiguousarray(core, np.bool_), w)


def _reflect_py(i: int, n: int) -> int:
    while i < 0 or i >= n:
        i = -i - 1 if i < 0 else 2 * n - i - 1
    return i


def _smooth_peaks_py(dist: np.ndarray, core: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Every inner loop runs over whole rows or shifted views of them with a counter from 0: numba
    # wraps negative indices, and the test that needs (x - j may be < 0) keeps a loop from being
    # vectorised (3-5x slower here). Each pixel's sum is taken in the same order as before.
    hgt, wid = dist.shape
    r = w.size // 2
    wr = w[r]
    tmp = np.empty((hgt, wid), np.float32)
    acc = np.empty(wid, np.float64)
    for y in range(hgt):  # axis 0, along columns: every pixel of the row, its reflected neighbour rows
        d = dist[y]
        for x in range(wid):
            acc[x] = np.float64(d[x]) * wr
        for j in range(r, 0, -1):
            a = dist[_reflect(y - j, hgt)]
            b = dist[_reflect(y + j, hgt)]
            wj = w[r - j]
            for x in range(wid):
                acc[x] += (np.float64(a[x]) + np.float64(b[x])) * wj
        t = tmp[y]
        for x in range(wid):
            t[x] = np.float32(acc[x])
    out = np.zeros((hgt, wid), np.float32)
    lo = min(r, wid)
    hi = max(wid - r, lo)
    n = hi - lo
    for y in range(hgt):  # axis 1, kept on the core only: the inner columns from shifted views
        t = tmp[y]
        mid = t[lo:hi]
        for k in range(n):
            acc[k] = np.float64(mid[k]) * wr
        for j in range(r, 0, -1):
            a = t[lo - j : hi - j]
            b = t[lo + j : hi + j]
            wj = w[r - j]
            for k in range(n):
                acc[k] += (np.float64(a[k]) + np.float64(b[k])) * wj
        o = out[y, lo:hi]
        c = core[y, lo:hi]
        for k in range(n):
            o[k] = np.float32(acc[k]) if c[k] else np.float32(0.0)
        for x in range(lo):  # the border columns, reflected
            if core[y, x]:
                out[y, x] = _border_sum(t, x, w)
        for x in range(hi, wid):
            if core[y, x]:
                out[y, x] = _border_sum(t, x, w)
    peaks = np.zeros((hgt, wid), np.bool_)
    for y in range(hgt):  # 3x3 local maxima on the core
        if y == 0 or y == hgt - 1 or wid < 3:
            for x in range(wid):
                if core[y, x]:
                    peaks[y, x] = _top(out, y, x)
            continue
        for x in (0, wid - 1):
            if core[y, x]:
                peaks[y, x] = _top(out, y, x)
        above, row, below = out[y - 1], out[y], out[y + 1]
        a0, a1, a2 = above[: wid - 2], above[1 : wid - 1], above[2:]
        r0, r1, r2 = row[: wid - 2], row[1 : wid - 1], row[2:]
        b0, b1, b2 = below[: wid - 2], below[1 : wid - 1], below[2:]
        c = core[y, 1 : wid - 1]
        p = peaks[y, 1 : wid - 1]
        for k in range(wid - 2):
            v = r1[k]
            p[k] = c[k] & (a0[k] <= v) & (a1[k] <= v) & (a2[k] <= v) & (r0[k] <= v) & (r2[k] <= v) & (b0[k] <= v) & (b1[k] <= v) & (b2[k] <= v)
    return out, peaks


def _border_sum_py(t: np.ndarray, x: int, w: np.ndarray) -> np.float32:
    """The axis-1 sum at column ``x`` of row ``t``, its neighbours reflected at the row's ends."""
    r = w.size // 2
    wid = t.size
    acc = np.float64(t[x]) * w[r]
    for j in range(r, 0, -1):
        acc += (np.float64(t[_reflect(x - j, wid)]) + np.float64(t[_reflect(x + j, wid)])) * w[r - j]
    return np.float32(acc)


def _top_py(out: np.ndarray, y: int, x: int) -> bool:
    """Whether no pixel of the 3x3 window at (y, x) (within the array) is above it."""
    hgt, wid = out.shape
    v = out[y, x]
    for yy in range(max(y - 1, 0), min(y + 2, hgt)):
        for xx in range(max(x - 1, 0), min(x + 2, wid)):
            if out[yy, xx] > v:
                return False
    return True


def _reconstruct_py(image: np.ndarray, seed: np.ndarray, cap: int = 1024) -> np.ndarray:
    """Grey reconstruction by dilation (8-connectivity) of ``seed`` under ``image`` by Vincent's
    hybrid algorithm (1993): a raster scan and an anti-raster scan, each taking the largest of the
    pixel's own and its already scanned 8-neighbours' values (capped by ``image``), then a
    first-in first-out propagation (a circular queue of ``cap`` items, doubled when full) from the
    pixels the second scan leaves above a neighbour it could raise. Only pixels with ``image > 0``
    take part (islands; paths through zeros are the caller's); zeros keep their seed."""
    hgt, wid = image.shape
    rec = seed.copy()
    for y in range(hgt):  # raster: neighbours above and to the left
        for x in range(wid):
            if image[y, x] <= 0:
                continue
            m = rec[y, x]
            for dy, dx in ((-1, -1), (-1, 0), (-1, 1), (0, -1)):
                yy, xx = y + dy, x + dx
                if 0 <= yy and 0 <= xx < wid and image[yy, xx] > 0 and rec[yy, xx] > m:
                    m = rec[yy, xx]
            rec[y, x] = m if m < image[y, x] else image[y, x]
    queue = np.empty(cap, np.int64)
    head = 0
    size = 0
    for y in range(hgt - 1, -1, -1):  # anti-raster: neighbours below and to the right
        for x in range(wid - 1, -1, -1):
            if image[y, x] <= 0:
                continue
            m = rec[y, x]
            for dy, dx in ((1, 1), (1, 0), (1, -1), (0, 1)):
                yy, xx = y + dy, x + dx
                if yy < hgt and 0 <= xx < wid and image[yy, xx] > 0 and rec[yy, xx] > m:
                    m = rec[yy, xx]
            v = m if m < image[y, x] else image[y, x]
            rec[y, x] = v
            for dy, dx in ((1, 1), (1, 0), (1, -1), (0, 1)):
                yy, xx = y + dy, x + dx
                if yy < hgt and 0 <= xx < wid and image[yy, xx] > 0 and rec[yy, xx] < v and rec[yy, xx] < image[yy, xx]:
                    if size == cap:
                        queue, head, cap = _grown_queue(queue, head, size), 0, 2 * cap
                    queue[(head + size) % cap] = y * wid + x
                    size += 1
                    break
    while size > 0:
        p = queue[head]
        head = (head + 1) % cap
        size -= 1
        y, x = p // wid, p % wid
        v = rec[y, x]
        for dy in range(-1, 2):
            for dx in range(-1, 2):
                yy, xx = y + dy, x + dx
                if (dy == 0 and dx == 0) or not (0 <= yy < hgt and 0 <= xx < wid):
                    continue
                lim = image[yy, xx]
                if lim > 0 and rec[yy, xx] < v and rec[yy, xx] != lim:
                    rec[yy, xx] = v if v < lim else lim
                    if size == cap:
                        queue, head, cap = _grown_queue(queue, head, size), 0, 2 * cap
                    queue[(head + size) % cap] = yy * wid + xx
                    size += 1
    return rec


def _grown_queue_py(queue, head, size):  # noqa: ANN001, ANN202 (compiled helper)
    """A circular queue's ``size`` items from ``head``, in order, at the start of one twice as long."""
    out = np.empty(2 * queue.size, np.int64)
    for i in range(size):
        out[i] = queue[(head + i) % queue.size]
    return out


def flood_components(surface: np.ndarray, markers: np.ndarray, components: np.ndarray, which: np.ndarray,
                     labels: np.ndarray, offset: int) -> None:
    """For each component ``c`` in ``which``: ``labels[box][m] = watershed(surface[box],
    markers[box], mask=m) + offset`` with ``m = components[box] == c`` (4-connectivity), flooded
    exactly as skimage floods (see :func:`_flood_py`); in place, needs numba."""
    _kernels()
    boxes = _boxes(components, which)
    src = surface if surface.dtype == np.uint8 else _ranks(surface)  # uint8 values are their own keys
    _flood_components(np.ascontiguousarray(src), np.ascontiguousarray(markers, np.int32),
                      np.ascontiguousarray(components, np.int32), np.asarray(which, np.int64), boxes, labels, offset)


def cut_at_peaks(dist: np.ndarray, peaks: np.ndarray, ids: np.ndarray, places: np.ndarray, shapes: np.ndarray,
                 origins: np.ndarray, labels: np.ndarray, first: int) -> int:
    """Neck cutting's last step for every crop ``k`` laid on one canvas (rows/cols ``places[k]``,
    size ``shapes[k]``, object ``ids == k + 1`` ringed by zeros, top-left of its box in ``labels``
    one pixel inside, at ``origins[k]``): the 4-connected components of ``peaks`` on the object,
    numbered in raster order, flood ``-dist`` on it; a crop with two or more writes its pieces but
    the first into ``labels`` (in place) as ``first``, ``first + 1``, ... Returns the next free
    label. The same pieces and numbers as ``ndi.label`` and skimage's watershed; needs numba."""
    _kernels()
    return int(_cut_at_peaks(_ranks(-np.asarray(dist, np.float32)), np.ascontiguousarray(peaks, np.bool_),
                             np.ascontiguousarray(ids, np.int32), np.asarray(places, np.int64),
                             np.asarray(shapes, np.int64), np.asarray(origins, np.int64), labels, first))


def crops_on_canvas(labels: np.ndarray, dist: np.ndarray, ids: np.ndarray, box: np.ndarray, places: np.ndarray,
                    shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Neck cutting's canvas: object ``ids[k]`` (box ``box[k]``: row0, row1, col0, col1) drawn with
    a border of one pixel at ``places[k]`` of a ``shape`` canvas: ``dist`` on its pixels (0 around)
    and ``k + 1`` on its pixels in the second canvas (int32); needs numba."""
    _kernels()
    d_c = np.zeros(shape, dist.dtype)
    id_c = np.zeros(shape, np.int32)
    _crops_on_canvas(np.ascontiguousarray(labels), np.ascontiguousarray(dist), np.asarray(ids, np.int64),
                     np.asarray(box, np.int64), np.asarray(places, np.int64), d_c, id_c)
    return d_c, id_c


def _crops_on_canvas_py(labels, dist, ids, box, places, d_c, id_c):  # noqa: ANN001, ANN202 (compiled helper)
    for k in range(len(ids)):
        i, r, c = ids[k], places[k, 0] + 1, places[k, 1] + 1
        y0, x0 = box[k, 0], box[k, 2]
        for y in range(y0, box[k, 1]):
            for x in range(x0, box[k, 3]):
                if labels[y, x] == i:
                    d_c[r + y - y0, c + x - x0] = dist[y, x]
                    id_c[r + y - y0, c + x - x0] = k + 1


def tissue_counts(labels: np.ndarray, mask: np.ndarray, rows: np.ndarray, cols: np.ndarray, n: int,
                  clip: bool) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of each label 0..n-1 (entry 0 not counted) and how many of them the coarse ``mask``
    calls tissue, pixel ``(y, x)`` reading ``mask[rows[y], cols[x]]``; with ``clip`` the label
    pixels outside the mask are set to 0 in place. One pass; needs numba."""
    _kernels()
    return _tissue_counts(labels, np.ascontiguousarray(mask), np.asarray(rows, np.int64), np.asarray(cols, np.int64), n, clip)


def _tissue_counts_py(labels, mask, rows, cols, n, clip):  # noqa: ANN001, ANN202 (compiled helper)
    total = np.zeros(n, np.int64)
    within = np.zeros(n, np.int64)
    h, w = labels.shape
    for y in range(h):
        m = mask[rows[y]]
        for x in range(w):
            v = labels[y, x]
            if v <= 0:
                continue
            total[v] += 1
            if m[cols[x]]:
                within[v] += 1
            elif clip:
                labels[y, x] = 0
    return total, within


def box_table(labels: np.ndarray, n: int) -> np.ndarray:
    """Boxes (row0, row1, col0, col1) of labels 1..n, row ``k`` for label ``k + 1``; a missing
    label's row is (height, 0, width, 0). One pass; needs numba."""
    _kernels()
    return _box_table(np.ascontiguousarray(labels), n)[1:]


def _boxes(labels: np.ndarray, which: np.ndarray) -> np.ndarray:
    """Rows of :func:`box_table` for the labels ``which``."""
    which = np.asarray(which, np.int64)
    n = int(which.max(initial=0))
    return _box_table(np.ascontiguousarray(labels), n)[which] if len(which) else np.zeros((0, 4), np.int64)


def _box_table_py(labels: np.ndarray, n: int) -> np.ndarray:
    """Row/col extents of labels 1..n (index = label); labels above ``n`` are ignored."""
    hgt, wid = labels.shape
    box = np.empty((n + 1, 4), np.int64)
    box[:, 0] = hgt
    box[:, 1] = 0
    box[:, 2] = wid
    box[:, 3] = 0
    for y in range(hgt):
        for x in range(wid):
            v = labels[y, x]
            if v <= 0 or v > n:
                continue
            if y < box[v, 0]:
                box[v, 0] = y
            box[v, 1] = y + 1
            if x < box[v, 2]:
                box[v, 2] = x
            if x + 1 > box[v, 3]:
                box[v, 3] = x + 1
    return box


def _ranks(values: np.ndarray) -> np.ndarray:
    """int32 keys in the order of ``values`` (uint8, or values exact in float32: -0.0 = 0.0), so
    that the flood compares one integer where skimage compares float64 values."""
    if values.dtype == np.uint8:
        return values.astype(np.int32)
    bits = (np.asarray(values, np.float32) + np.float32(0)).view(np.int32)  # + 0 turns -0.0 into 0.0
    return np.where(bits < 0, bits ^ np.int32(0x7FFFFFFF), bits)


def _push_py(keys, where, n, key, index):  # noqa: ANN001, ANN202 (compiled helper)
    """Push onto a binary min-heap of ``n`` items exactly as skimage's watershed heap does (same
    positions, so equal keys leave it in the same order); returns the new size."""
    child = n
    while child > 0:
        parent = (child + 1) // 2 - 1
        if not key < keys[parent]:
            break
        keys[child], where[child] = keys[parent], where[parent]
        child = parent
    keys[child], where[child] = key, index
    return n + 1


def _pop_py(keys, where, n):  # noqa: ANN001, ANN202 (compiled helper)
    """Drop the root (read it first) as skimage's heap does: the last item sifts down from the root."""
    n -= 1
    key, index = keys[n], where[n]
    i = 0
    while True:
        left = 2 * i + 1
        if left >= n:
            break
        small = left if keys[left] < key else -1
        right = left + 1
        if right < n and keys[right] < (key if small < 0 else keys[left]):
            small = right
        if small < 0:
            break
        keys[i], where[i] = keys[small], where[small]
        i = small
    keys[i], where[i] = key, index
    return n


def _side_py(p, j, stride):  # noqa: ANN001, ANN202 (compiled helper)
    """The ``j``-th 4-neighbour of raveled pixel ``p`` in skimage's order: up, left, right, down."""
    return p - stride if j == 0 else (p - 1 if j == 1 else (p + 1 if j == 2 else p + stride))


def _flood_py(rank, out, msk, stride, keys, where):  # noqa: ANN001, ANN202 (compiled helper)
    """skimage's marker watershed (no compactness, no lines) on a raveled crop whose border is
    outside ``msk``: markers (``out != 0``) enter in raster order at age 0, each pixel takes its
    label when pushed, at ``max(its value, the value it was reached from)``, ties by age; 4
    neighbours in skimage's order. The heap key is ``rank << 32 | age``; ``keys/where`` hold at
    least as many items as ``msk`` has pixels."""
    n = 0
    for p in range(out.size):
        if out[p] != 0:
            n = _push(keys, where, n, np.int64(rank[p]) << 32, p)
    age = 1
    while n > 0:
        v, p = keys[0] >> 32, where[0]
        n = _pop(keys, where, n)
        for j in range(4):
            q = _side(p, j, stride)
            if not msk[q] or out[q] != 0:
                continue
            age += 1
            out[q] = out[p]
            n = _push(keys, where, n, ((np.int64(rank[q]) if rank[q] > v else v) << 32) + age, q)


def _flood_components_py(surface, markers, components, which, boxes, labels, offset):  # noqa: ANN001, ANN202
    size = 1
    for j in range(which.size):
        size = max(size, (boxes[j, 1] - boxes[j, 0] + 2) * (boxes[j, 3] - boxes[j, 2] + 2))
    rank, out = np.zeros(size, np.int32), np.zeros(size, np.int32)
    msk = np.zeros(size, np.bool_)
    keys, where = np.empty(size, np.int64), np.empty(size, np.int64)
    for j in range(which.size):
        c, r0, r1, c0, c1 = which[j], boxes[j, 0], boxes[j, 1], boxes[j, 2], boxes[j, 3]
        stride = c1 - c0 + 2
        m = (r1 - r0 + 2) * stride
        msk[:m] = False
        out[:m] = 0
        for y in range(r0, r1):
            for x in range(c0, c1):
                if components[y, x] == c:
                    p = (y - r0 + 1) * stride + x - c0 + 1
                    msk[p] = True
                    out[p] = markers[y, x]
                    rank[p] = surface[y, x]
        _flood(rank[:m], out[:m], msk[:m], stride, keys, where)
        for y in range(r0, r1):
            for x in range(c0, c1):
                if components[y, x] == c:
                    labels[y, x] = out[(y - r0 + 1) * stride + x - c0 + 1] + offset


def _label4_py(seed, out, stride, stack):  # noqa: ANN001, ANN202 (compiled helper)
    """4-connected components of ``seed`` (a raveled crop with a False border) into ``out``,
    numbered in the raster order of their first pixel as ``ndi.label`` numbers them; their count."""
    k = 0
    for p in range(seed.size):
        if not seed[p] or out[p] != 0:
            continue
        k += 1
        out[p] = k
        top = 1
        stack[0] = p
        while top > 0:
            top -= 1
            q = stack[top]
            for j in range(4):
                r = _side(q, j, stride)
                if seed[r] and out[r] == 0:
                    out[r] = k
                    stack[top] = r
                    top += 1
    return k


def _cut_at_peaks_py(low, peaks, ids, places, shapes, origins, labels, first):  # noqa: ANN001, ANN202
    size = 1
    for k in range(places.shape[0]):
        size = max(size, shapes[k, 0] * shapes[k, 1])
    rank, out = np.empty(size, np.int32), np.empty(size, np.int32)
    msk, seed = np.empty(size, np.bool_), np.empty(size, np.bool_)
    keys, where = np.empty(size, np.int64), np.empty(size, np.int64)
    nxt = first
    for k in range(places.shape[0]):
        r, c, h, w = places[k, 0], places[k, 1], shapes[k, 0], shapes[k, 1]
        for y in range(h):
            for x in range(w):
                p = y * w + x
                msk[p] = ids[r + y, c + x] == k + 1
                seed[p] = msk[p] and peaks[r + y, c + x]
                rank[p] = low[r + y, c + x]
                out[p] = 0
        n_markers = _label4(seed[: h * w], out[: h * w], w, where)
        if n_markers < 2:
            continue
        _flood(rank[: h * w], out[: h * w], msk[: h * w], w, keys, where)
        for y in range(1, h - 1):
            for x in range(1, w - 1):
                piece = out[y * w + x]
                if piece > 1:
                    labels[origins[k, 0] + y - 1, origins[k, 1] + x - 1] = piece + nxt - 2
        nxt += n_markers - 1
    return nxt


#: :func:`grow_ranks` keys: (steps taken << 24) | (2**24 - 1 - rank), so the smallest key is the
#: nearest rank, the largest of equally near ones; ranks below 2**24, at most 125 steps per sweep pair
_KEY_SHIFT = 24
GROW_MAX_RANK = (1 << _KEY_SHIFT) - 1
_GROW_MAX_STEPS = 125


def grow_ranks(r: np.ndarray, steps: int, *, in_place: bool = False, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """``steps`` times, all at once: each 0 pixel with a nonzero 8-neighbour takes the largest
    neighbour value (``maximum_filter(r, 3)`` where ``r`` is 0; outside the array counts as 0).

    That is: each 0 pixel within chessboard distance ``steps`` of a nonzero one takes the largest
    value among its nearest nonzero pixels (at distance ``k`` a pixel's nonzero neighbours are those
    at ``k - 1``, whose values are, by induction, the largest among theirs at ``k - 1``, and every
    value at distance ``k`` is reached that way). Found as one chamfer distance transform of
    (distance, -value) keys in two raster sweeps, whatever ``steps`` (one step: pushed from each nonzero
    pixel to its neighbours). Values in 0..GROW_MAX_RANK. A new array of ``r``'s dtype; with
    ``in_place``, an int32 ``r`` whose rows are contiguous (a crop of a C-ordered array too) is grown
    where it is (and returned), so that no second array of its size is made. ``box`` (row0, row1,
    col0, col1): only that part of ``r`` is grown (as ``r[row0:row1, col0:col1]`` alone), in place
    in a C-ordered ``r``, whose rows the kernels then read as contiguous (~2x faster than through a
    crop's strides). Needs numba."""
    _kernels()
    if box is not None:  # as numpy slices it: clipped to the array
        box = (*slice(box[0], box[1]).indices(r.shape[0])[:2], *slice(box[2], box[3]).indices(r.shape[1])[:2])
    if box is not None and not (in_place and r.flags.c_contiguous and r.dtype == np.int32 and r.flags.writeable):
        grown = grow_ranks(r[box[0] : box[1], box[2] : box[3]], steps, in_place=in_place)
        if in_place:
            r[box[0] : box[1], box[2] : box[3]] = grown
            return r
        return grown
    own = in_place and r.ndim == 2 and r.dtype == np.int32 and r.flags.writeable and r.strides[1] == r.itemsize
    y0, y1, x0, x1 = box if box is not None else (0, r.shape[0], 0, r.shape[1])
    if steps <= _GROW_NEAR_STEPS:  # from each pixel's neighbours, no distance map
        out = r if own else np.array(r, order="C")
        for _ in range(steps):
            _grow_near(out, y0, y1, x0, x1)
        return out
    out = r if own else np.array(r, np.int32, order="C")  # the keys are int32, made in the output itself
    for done in range(0, steps, _GROW_MAX_STEPS):  # one step after another: sweeps of <= 125 compose
        _grow(out, y0, y1, x0, x1, min(_GROW_MAX_STEPS, steps - done))
    return out if out.dtype == r.dtype else out.astype(r.dtype)


#: Steps :func:`grow_ranks` takes one by one (a pass over the pixels, each 0 one taking the largest
#: of its neighbours) rather than by sweeps: faster for one step of sparse cores (lumen: 0.16-0.29 ->
#: 0.09 s per 25 MP pushing each nonzero pixel to its neighbours in a copy; 0.10-0.11 s per 36 MP
#: where it is, with the rows' largest per column first, against 0.20-0.48 s for that copying pass),
#: slower from two steps of dense ones (glands).
_GROW_NEAR_STEPS = 1


def _grow_near_py(r, y0, y1, x0, x1):  # noqa: ANN001, ANN202 (compiled helper)
    """One step of :func:`grow_ranks` where ``r[y0:y1, x0:x1]`` is: each 0 pixel takes the largest of
    its nonzero 8-neighbours. Rows above and at ``y`` are read from copies made before they change
    (the row below is not changed yet); per column the largest of the three rows first (a pass that
    vectorises), then per 0 pixel the largest of its three columns."""
    h, w = y1 - y0, x1 - x0
    above, here, column = np.zeros(w, r.dtype), np.empty(w, r.dtype), np.empty(w, r.dtype)
    for y in range(h):
        row = r[y0 + y, x0:x1]
        here[:] = row
        if y + 1 < h:
            below = r[y0 + y + 1, x0:x1]
            for x in range(w):
                column[x] = max(max(above[x], here[x]), below[x])
        else:
            for x in range(w):
                column[x] = max(above[x], here[x])
        for x in range(w):
            if here[x] == 0:
                best = column[x]
                if x > 0:
                    best = max(best, column[x - 1])
                if x + 1 < w:
                    best = max(best, column[x + 1])
                if best:
                    row[x] = best
        above, here = here, above
    return r


def _grow_py(k, y0, y1, x0, x1, steps):  # noqa: ANN001, ANN202 (compiled helper)
    """:func:`grow_ranks` in place on ``k[y0:y1, x0:x1]`` (int32): its ranks become keys, swept, and
    back. Rows are taken as ``k[y, x0:x1]``: contiguous where ``k`` is C-ordered."""
    h, w = y1 - y0, x1 - x0
    one = np.int32(1 << _KEY_SHIFT)
    low = np.int32((1 << _KEY_SHIFT) - 1)
    far = np.int32((steps + 1) << _KEY_SHIFT)  # not reached (and outside the array): never a value
    for y in range(h):
        row = k[y0 + y, x0:x1]
        for x in range(w):
            v = row[x]
            row[x] = far if v == 0 else low - v
    # Each sweep takes a row's three neighbours in the row before (independent along the row, so
    # the loop vectorises) and then its neighbour in the row (a scan): per pixel the same minimum
    # as over all four at once, since that neighbour's value is final when it is read. The first
    # and last columns have two neighbours in the row before (outside the array is never nearer).
    for y in range(h):  # from above, then from the left
        row = k[y0 + y, x0:x1]
        if y > 0:
            _grow_row(row, k[y0 + y - 1, x0:x1], one)
        for x in range(1, w):
            row[x] = min(row[x], row[x - 1] + one)
    for y in range(h - 1, -1, -1):  # from below, then from the right
        row = k[y0 + y, x0:x1]
        if y < h - 1:
            _grow_row(row, k[y0 + y + 1, x0:x1], one)
        for x in range(w - 2, -1, -1):
            row[x] = min(row[x], row[x + 1] + one)
    for y in range(h):
        row = k[y0 + y, x0:x1]
        for x in range(w):
            v = row[x]
            row[x] = low - (v & low) if v < far else 0


def _grow_row_py(row, src, one):  # noqa: ANN001, ANN202 (compiled helper)
    """``row`` of :func:`_grow_py`'s keys takes its three neighbours in the row ``src``, one step on."""
    w = row.size
    if w == 1:
        row[0] = min(row[0], src[0] + one)
        return
    row[0] = min(row[0], min(src[0], src[1]) + one)
    s0, s1, s2, inner = src[: w - 2], src[1 : w - 1], src[2:], row[1 : w - 1]
    for x in range(w - 2):
        inner[x] = min(inner[x], min(min(s0[x], s1[x]), s2[x]) + one)
    row[w - 1] = min(row[w - 1], min(src[w - 2], src[w - 1]) + one)


def trace_rings(labels: np.ndarray, want: np.ndarray, seg_start: np.ndarray, seg_end: np.ndarray,
                edge_yx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """:func:`wsi_mtl.postprocess._contours.trace_rings` (its case tables passed in) in two compiled
    passes: the oriented segments of every boundary cell, then the rings they chain into, in the
    same order, from the same start, with the same areas; None where there is no ring. Needs numba."""
    _kernels()
    lab, ends = _ring_segments(np.ascontiguousarray(labels), want, seg_start, seg_end, edge_yx)
    return _chain_rings(lab, ends, labels.shape[0], labels.shape[1]) if lab.size else None


def _ring_segments_py(labels, want, seg_start, seg_end, edge_yx):  # noqa: ANN001, ANN202 (compiled helper)
    """Each boundary cell's oriented segments (label, then start and end y, x in doubled
    coordinates of the image padded by one) for each wanted label among its corners."""
    h, w = labels.shape
    top = want.size - 1
    cap = 16
    lab = np.empty(cap, np.int64)
    ends = np.empty((cap, 4), np.int64)
    n = 0
    corners = np.empty(4, np.int64)
    for i in range(h + 1):
        for j in range(w + 1):
            tl = labels[i - 1, j - 1] if i > 0 and j > 0 else 0
            tr = labels[i - 1, j] if i > 0 and j < w else 0
            br = labels[i, j] if i < h and j < w else 0
            bl = labels[i, j - 1] if i < h and j > 0 else 0
            if tl == tr and tl == br and tl == bl:
                continue
            corners[0], corners[1], corners[2], corners[3] = tl, tr, br, bl
            for k in range(4):
                ref = corners[k]
                if ref <= 0 or ref > top or not want[ref]:
                    continue
                dup = False
                for jj in range(k):
                    if corners[jj] == ref:
                        dup = True
                if dup:
                    continue
                case = 0
                for c in range(4):  # bits TL 1, TR 2, BR 4, BL 8
                    if corners[c] == ref:
                        case += 1 << c
                for s in range(2):
                    e0 = seg_start[case, s]
                    if e0 < 0:
                        continue
                    e1 = seg_end[case, s]
                    if n == cap:  # grow the tables
                        cap *= 2
                        lab2, ends2 = np.empty(cap, np.int64), np.empty((cap, 4), np.int64)
                        lab2[:n], ends2[:n] = lab, ends
                        lab, ends = lab2, ends2
                    lab[n] = ref
                    ends[n, 0], ends[n, 1] = 2 * i + edge_yx[e0, 0], 2 * j + edge_yx[e0, 1]
                    ends[n, 2], ends[n, 3] = 2 * i + edge_yx[e1, 0], 2 * j + edge_yx[e1, 1]
                    n += 1
    return lab[:n], ends[:n]


def _chain_rings_py(lab, ends, h, w):  # noqa: ANN001, ANN202 (compiled helper)
    """Segments chained into rings: each ring starts at its segment of smallest (label, y, x)
    key, rings longest first (ties in that order), vertices and shoelace areas as the numpy version."""
    n = lab.size
    h2, w2 = 2 * (h + 2), 2 * (w + 2)
    ks = (lab * h2 + ends[:, 0]) * w2 + ends[:, 1]
    ke = (lab * h2 + ends[:, 2]) * w2 + ends[:, 3]
    nxt = _successors(ks, ke)
    seen = np.zeros(n, np.bool_)
    starts, lengths = np.empty(n, np.int64), np.empty(n, np.int64)
    r = 0
    for p in range(n):  # each ring once, from its segment of smallest key
        if seen[p]:
            continue
        q, m, best = p, 0, p
        while not seen[q]:
            seen[q] = True
            m += 1
            if ks[q] < ks[best]:
                best = q
            q = nxt[q]
        starts[r], lengths[r] = best, m
        r += 1
    by_key = np.argsort(ks[starts[:r]])  # keys are unique
    by_len = by_key[np.argsort(-lengths[:r][by_key], kind="mergesort")]  # stable: longest first, then by key
    starts, lengths = starts[:r][by_len], lengths[:r][by_len]
    ring_start = np.zeros(r + 1, np.int64)
    for k in range(r):
        ring_start[k + 1] = ring_start[k] + lengths[k]
    coords = np.empty((n, 2), np.float64)
    area = np.zeros(r, np.float64)
    ring_label = np.empty(r, np.int64)
    for k in range(r):
        q = starts[k]
        ring_label[k] = lab[q]
        for t in range(lengths[k]):
            coords[ring_start[k] + t, 0] = ends[q, 0] / 2.0 - 1.0
            coords[ring_start[k] + t, 1] = ends[q, 1] / 2.0 - 1.0
            q = nxt[q]
        a = 0.0
        b0, b1 = ring_start[k], ring_start[k + 1]
        for t in range(b0, b1):
            u = t + 1 if t + 1 < b1 else b0
            a += coords[t, 1] * coords[u, 0] - coords[u, 1] * coords[t, 0]
        area[k] = 0.5 * a
    return ring_label, coords, ring_start, area


def _slot_py(key, bits, mask):  # noqa: ANN001, ANN202 (compiled helper)
    """A key's first slot in a table of ``2 ** bits``: its bits folded (nearby points of a ring,
    whose keys differ in their low bits, land in different slots)."""
    return (key ^ (key >> bits) ^ (key >> (2 * bits))) & mask


def _successors_py(ks, ke):  # noqa: ANN001, ANN202 (compiled helper)
    """For each segment, the segment whose start key ``ks`` (unique) is its end key ``ke``: a hash
    table of the start keys (open addressing, at most half full), ~2x faster than sorting them."""
    n = ks.size
    bits = 1
    while (1 << bits) < 2 * n:
        bits += 1
    mask = (1 << bits) - 1
    slots = np.full(mask + 1, -1, np.int64)
    for s in range(n):
        p = _slot(ks[s], bits, mask)
        while slots[p] >= 0:
            p = (p + 1) & mask
        slots[p] = s
    nxt = np.empty(n, np.int64)
    for s in range(n):
        key = ke[s]
        p = _slot(key, bits, mask)
        while ks[slots[p]] != key:  # every end is some segment's start: the rings are closed
            p = (p + 1) & mask
        nxt[s] = slots[p]
    return nxt


def core_mask_u8(interior: np.ndarray, boundary: np.ndarray, limit: float) -> np.ndarray:
    """``interior - boundary > limit`` of two 2-D uint8 maps taken as integers (a new bool array), in
    one pass without the int16 temporaries numpy makes. Needs numba."""
    _kernels()
    out = np.empty(interior.shape, np.bool_)
    _core(interior, boundary, float(limit), out)
    return out


def _core_py(a, b, limit, out):  # noqa: ANN001, ANN202 (compiled helper)
    h, w = a.shape
    for y in range(h):
        for x in range(w):
            out[y, x] = np.int32(a[y, x]) - np.int32(b[y, x]) > limit


def label_counts(labels: np.ndarray, length: int) -> np.ndarray | None:
    """Pixels per label (int64, ``length`` entries, entry 0 left 0) in one pass; None where a
    label is negative or not below ``length``. Needs numba."""
    _kernels()
    counts, fit = _label_counts(np.ascontiguousarray(labels).ravel(), length)
    return counts if fit else None


def _label_counts_py(flat, length):  # noqa: ANN001, ANN202 (compiled helper)
    counts = np.zeros(length, np.int64)
    for i in range(flat.size):
        v = flat[i]
        if v < 0 or v >= length:
            return counts, False
        counts[v] += 1
    counts[0] = 0
    return counts, True


def label_owners(labels: np.ndarray, values: np.ndarray, length: int) -> np.ndarray | None:
    """``out[labels[p]] = values[p]`` over the pixels with a label > 0, the last in raster order
    winning (as numpy's assignment through an index array), int64 with ``length`` entries (0 for a
    label without pixels), in one pass; None where a label is negative or not below ``length``.
    Needs numba."""
    _kernels()
    out, fit = _label_owners(np.ascontiguousarray(labels).ravel(), np.ascontiguousarray(values).ravel(), length)
    return out if fit else None


def _label_owners_py(flat, values, length):  # noqa: ANN001, ANN202 (compiled helper)
    out = np.zeros(length, np.int64)
    for i in range(flat.size):
        v = flat[i]
        if v == 0:
            continue
        if v < 0 or v >= length:
            return out, False
        out[v] = values[i]
    return out, True


def label_sums(labels: np.ndarray, values: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Pixels per label and the sum of integer ``values`` (same shape) over them (both int64,
    ``length`` entries, entry 0 left 0), in one pass; None where a label is negative or not below
    ``length``. Needs numba."""
    _kernels()
    flat = np.ascontiguousarray(labels).ravel()
    counts, sums, fit = _label_sums(flat, np.ascontiguousarray(values).ravel(), length)
    return (counts, sums) if fit else None


def _label_sums_py(flat, values, length):  # noqa: ANN001, ANN202 (compiled helper)
    counts = np.zeros(length, np.int64)
    sums = np.zeros(length, np.int64)
    for i in range(flat.size):
        v = flat[i]
        if v < 0 or v >= length:
            return counts, sums, False
        counts[v] += 1
        sums[v] += values[i]
    counts[0] = 0
    sums[0] = 0
    return counts, sums, True


def type_votes(labels: np.ndarray, prob: np.ndarray, n: int, never: int) -> np.ndarray:
    """Votes (n + 1, C) of the pixels of labels 1..n for the class of their largest ``prob``
    (uint8, (C, H, W)), the first of equal ones, class ``never`` (-1: none) excluded, as
    ``np.argmax`` counts them; one pass, needs numba."""
    _kernels()
    return _type_votes(np.ascontiguousarray(labels), np.ascontiguousarray(prob), n, never)


def _type_votes_py(labels, prob, n, never):  # noqa: ANN001, ANN202 (compiled helper)
    c = prob.shape[0]
    counts = np.zeros((n + 1, c), np.int64)
    hgt, wid = labels.shape
    for y in range(hgt):
        for x in range(wid):
            v = labels[y, x]
            if v <= 0:
                continue
            best = -1
            top = 0
            for k in range(c):
                if k != never and (best < 0 or prob[k, y, x] > top):
                    best = k
                    top = prob[k, y, x]
            counts[v, best] += 1
    return counts


def type_sums(labels: np.ndarray, prob: np.ndarray, winner: np.ndarray, never: int) -> np.ndarray:
    """Per label 0..len(winner) (entry 0 left 0), the float64 sum over its pixels, in raster order,
    of ``prob[winner[label - 1]]`` (uint8, (C, H, W)); with ``never`` >= 0 each divided by the
    pixel's sum over the other classes (1 / (C - 1) where that is 0). Needs numba."""
    _kernels()
    return _type_sums(np.ascontiguousarray(labels), np.ascontiguousarray(prob), np.asarray(winner, np.int64), never)


def _type_sums_py(labels, prob, winner, never):  # noqa: ANN001, ANN202 (compiled helper)
    c = prob.shape[0]
    sums = np.zeros(winner.size + 1, np.float64)
    hgt, wid = labels.shape
    for y in range(hgt):
        for x in range(wid):
            v = labels[y, x]
            if v <= 0:
                continue
            p = np.float64(prob[winner[v - 1], y, x])
            if never >= 0:
                among = np.float64(0.0)
                for k in range(c):
                    among += np.float64(prob[k, y, x])
                among -= np.float64(prob[never, y, x])
                p = p / among if among > 0 else 1.0 / (c - 1)
            sums[v] += p
    return sums


def relabel_in_place(labels: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """``labels[:] = lut[labels]`` for a C-contiguous ``labels`` of ``lut``'s dtype, without the
    temporary fancy indexing makes (a third of its time); needs numba."""
    _kernels()
    if not labels.flags.c_contiguous or labels.dtype != lut.dtype:
        raise ValueError("relabel_in_place needs C-contiguous labels of the table's dtype")
    _relabel(labels.reshape(-1), lut)
    return labels


def _relabel_py(flat, lut):  # noqa: ANN001, ANN202 (compiled helper)
    for i in range(flat.size):
        flat[i] = lut[flat[i]]


def open_rows(mask: np.ndarray, halves: np.ndarray) -> np.ndarray:
    """Binary opening of a 2-D ``mask`` (outside = False) by a symmetric footprint given as the
    half-widths of its centred rows (``halves[k]`` for row offset ``k - len(halves) // 2``), e.g. a
    disk: the same set as ``scipy.ndimage.binary_opening``. Rows are packed 64 pixels to a word;
    each row's AND (erosion) or OR (dilation) over every footprint width is made once by shifting
    the words, then footprint rows combine word by word. A new array; needs numba."""
    _kernels()
    m = np.ascontiguousarray(mask, dtype=np.bool_)
    h, w = m.shape
    words = max(1, -(-w // 64))
    packed = np.zeros((h, 8 * words), np.uint8)  # bit b of word i: pixel 64 i + b
    packed[:, : -(-w // 8)] = np.packbits(m, axis=1, bitorder="little")
    out = _open(packed.view("<u8"), np.ascontiguousarray(halves, dtype=np.int64))
    return np.unpackbits(out.view(np.uint8), axis=1, count=w, bitorder="little").view(np.bool_)


def _shift_into_py(src, s, out):  # noqa: ANN001, ANN202 (compiled helper)
    """``out``'s pixel x = ``src``'s pixel x + s, over one packed row (0 beyond it)."""
    n = src.size
    q = s // 64
    b = np.uint64(s - 64 * q)
    c = np.uint64(64) - b
    for i in range(n):
        j = i + q
        v = np.uint64(0)
        if 0 <= j < n:
            v = src[j] >> b
        if b != 0 and 0 <= j + 1 < n:
            v |= src[j + 1] << c
        out[i] = v


def _row_spans_py(rows, halves, conj):  # noqa: ANN001, ANN202 (compiled helper)
    """For each half-width ``k`` in ``halves``: every packed row ANDed (``conj``) or ORed with
    itself shifted by -k..k (``spans[slot[k]]``), widening one pixel on each side at a time."""
    h, n = rows.shape
    top = 0
    for k in halves:
        top = max(top, k)
    slot = np.full(top + 1, -1, np.int64)
    m = 0
    for k in halves:
        if slot[k] < 0:
            slot[k] = m
            m += 1
    spans = np.empty((m, h, n), np.uint64)
    cur, left, right = np.empty(n, np.uint64), np.empty(n, np.uint64), np.empty(n, np.uint64)
    for y in range(h):
        cur[:] = rows[y]
        for k in range(top + 1):
            if k > 0:
                _shift_into(rows[y], k, left)
                _shift_into(rows[y], -k, right)
                for i in range(n):
                    if conj:
                        cur[i] = cur[i] & left[i] & right[i]
                    else:
                        cur[i] = cur[i] | left[i] | right[i]
            if slot[k] >= 0:
                spans[slot[k], y] = cur
    return spans, slot


def _open_py(bits, halves):  # noqa: ANN001, ANN202 (compiled helper)
    h, n = bits.shape
    r = len(halves) // 2
    spans, slot = _row_spans(bits, halves, True)
    eroded = np.zeros((h, n), np.uint64)
    for y in range(r, h - r):  # rows nearer the edge than r read outside: False
        for i in range(n):
            v = spans[slot[halves[0]], y - r, i]
            for k in range(1, len(halves)):
                v &= spans[slot[halves[k]], y + k - r, i]
            eroded[y, i] = v
    spans, slot = _row_spans(eroded, halves, False)
    out = np.zeros((h, n), np.uint64)
    for y in range(h):  # the footprint is symmetric: row y takes row y - dy widened by dy's half-width
        for k in range(len(halves)):
            yy = y - (k - r)
            if 0 <= yy < h:
                src = spans[slot[halves[k]], yy]
                for i in range(n):
                    out[y, i] |= src[i]
    return out


def components(mask: np.ndarray, *, labels: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
    """``scipy.ndimage.label(mask)`` (4-connected, numbered in the raster order of their first
    pixels) with every component's bounding box (row0, row1, col0, col1; row ``k`` for label
    ``k + 1``), from row runs; without ``labels`` only the boxes. Needs numba."""
    _kernels()
    lab, box = _components(np.ascontiguousarray(mask, dtype=np.bool_), labels)
    return (lab if labels else None), box


def component_runs(mask: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """The row runs of ``mask`` (row, first col, end col, number of their component, as
    :func:`components` numbers them) and every component's box: what :func:`kept_components` paints
    from, in far less memory than the mask for blobs. Needs numba."""
    _kernels()
    ys, x0s, x1s, parent = _runs(np.ascontiguousarray(mask, dtype=np.bool_))
    ids, box = _boxes_of_runs(ys, x0s, x1s, parent)
    return (ys, x0s, x1s, ids), box


def kept_components(runs: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], lut: np.ndarray,
                    rect: tuple[int, int, int, int]) -> np.ndarray:
    """``lut[labels]`` (int32) for the components of :func:`component_runs`'s ``runs``, in the rows
    ``rect[0]:rect[1]`` and columns ``rect[2]:rect[3]`` only: painted from the runs, with no label
    image of the whole mask. Needs numba."""
    _kernels()
    y0, y1, x0, x1 = (int(v) for v in rect)
    return _kept_runs(*runs, np.asarray(lut, np.int32), y0, y1, x0, x1)


def _kept_runs_py(ys, x0s, x1s, ids, new, y0, y1, x0, x1):  # noqa: ANN001, ANN202 (compiled helper)
    """A (y1 - y0, x1 - x0) int32 image of the runs whose component ``new`` numbers (not 0), clipped."""
    out = np.zeros((y1 - y0, x1 - x0), np.int32)
    for i in range(len(ys)):
        v = new[ids[i]]
        y = ys[i]
        if v == 0 or y < y0 or y >= y1:
            continue
        a, b = max(x0s[i], x0), min(x1s[i], x1)
        if a < b:
            out[y - y0, a - x0 : b - x0] = v
    return out


def _root_py(parent, i):  # noqa: ANN001, ANN202 (compiled helper)
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def _next_run_py(row, x):  # noqa: ANN001, ANN202 (compiled helper)
    """The first run of True in ``row`` at or after column ``x``: (start, end); (len, len) if none."""
    w = len(row)
    while x < w and not row[x]:
        x += 1
    a = x
    while x < w and row[x]:
        x += 1
    return a, x


def _runs_py(m):  # noqa: ANN001, ANN202 (compiled helper)
    """The runs of True of each row (row, first col, end col), in raster order, and the union-find
    parents joining runs of consecutive rows that overlap (4-connectivity)."""
    h, w = m.shape
    n = 0
    for y in range(h):
        for x in range(w):
            if m[y, x] and (x == 0 or not m[y, x - 1]):
                n += 1
    ys, x0s, x1s = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64)
    parent = np.arange(n)
    k, prev0, prev1 = 0, 0, 0  # the runs of the row above are prev0..prev1-1
    for y in range(h):
        first = k
        a, x = _next_run(m[y], 0)
        while a < w:
            ys[k], x0s[k], x1s[k] = y, a, x
            k += 1
            a, x = _next_run(m[y], x)
        j = prev0
        for i in range(first, k):  # both rows' runs are sorted by column
            while j < prev1 and x1s[j] <= x0s[i]:
                j += 1
            q = j
            while q < prev1 and x0s[q] < x1s[i]:
                ri, rq = _root(parent, i), _root(parent, q)
                if ri != rq:  # the earlier run stays the root
                    parent[max(ri, rq)] = min(ri, rq)
                q += 1
            if q > j:
                j = q - 1  # the last run above may meet the next run of this row too
        prev0, prev1 = first, k
    return ys, x0s, x1s, parent


def _boxes_of_runs_py(ys, x0s, x1s, parent):  # noqa: ANN001, ANN202 (compiled helper)
    """Per run, the number of its component (1.. in raster order of the components' first runs),
    and each component's box."""
    n = len(ys)
    ids = np.zeros(n, np.int64)
    count = 0
    for i in range(n):  # roots are their component's first run
        r = _root(parent, i)
        if r == i:
            count += 1
            ids[i] = count
        else:
            ids[i] = ids[r]
    box = np.empty((count, 4), np.int64)
    for c in range(count):
        box[c, 0], box[c, 1], box[c, 2], box[c, 3] = 1 << 62, -1, 1 << 62, -1
    for i in range(n):
        c = ids[i] - 1
        box[c, 0] = min(box[c, 0], ys[i])
        box[c, 1] = max(box[c, 1], ys[i] + 1)
        box[c, 2] = min(box[c, 2], x0s[i])
        box[c, 3] = max(box[c, 3], x1s[i])
    return ids, box


def _components_py(m, want_labels):  # noqa: ANN001, ANN202 (compiled helper)
    ys, x0s, x1s, parent = _runs(m)
    ids, box = _boxes_of_runs(ys, x0s, x1s, parent)
    if not want_labels:
        return np.zeros((1, 1), np.int32), box
    lab = np.zeros(m.shape, np.int32)
    for i in range(len(ys)):
        lab[ys[i], x0s[i] : x1s[i]] = ids[i]
    return lab, box


def block_means(prob: np.ndarray, factor: int) -> np.ndarray:
    """:func:`~wsi_mtl.postprocess.downsample_prob` of a (C, H, W) uint8 map, one row of blocks at a
    time: per ``factor x factor`` block, each channel's sum over the pixels with a channel above 0
    (the others add 0) divided by their count, rounded half to even as ``np.rint`` (integer
    arithmetic: the same values as float64's). Needs numba."""
    _kernels()
    return _block_means(np.ascontiguousarray(prob), int(factor))


def _block_means_py(prob, f):  # noqa: ANN001, ANN202 (compiled helper)
    c, h, w = prob.shape
    hh, ww = (h + f - 1) // f, (w + f - 1) // f
    out = np.zeros((c, hh, ww), np.uint8)
    sums = np.zeros((c, ww), np.uint32)  # one row of blocks at a time
    counts = np.zeros(ww, np.int32)
    for by in range(hh):
        sums[:] = 0
        counts[:] = 0
        for y in range(by * f, min(h, by * f + f)):
            for bx in range(ww):
                n = 0
                for x in range(bx * f, min(w, bx * f + f)):
                    any_on = 0
                    for k in range(c):
                        v = prob[k, y, x]
                        sums[k, bx] += v
                        any_on |= v
                    n += any_on != 0
                counts[bx] += n
        for bx in range(ww):
            n = counts[bx]
            if n == 0:
                continue
            for k in range(c):
                s = sums[k, bx]
                q = s // n
                r2 = 2 * (s - q * n)
                if r2 > n or (r2 == n and q % 2 == 1):
                    q += 1
                out[k, by, bx] = q
    return out


def hull_areas(xy: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Convex-hull area of each closed ring ``xy[starts[k]:starts[k + 1]]`` (float64 (m, 2), the
    last point repeating the first), the values of ``shapely.area(shapely.convex_hull(ring))``: the
    hull by Andrew's monotone chain without collinear points, its area by GEOS's formula from the
    vertex GEOS starts at (lowest y, then lowest x) going as GEOS goes, so the same float sums
    (identical on the 16,384² mosaic's 64,385 nuclei, glands and lumen, on and off the half-pixel
    grid). Fewer than 3 distinct hull points: 0. Needs numba."""
    _kernels()
    out = np.empty(len(starts) - 1)
    _hull_areas(np.ascontiguousarray(xy, np.float64), np.ascontiguousarray(starts, np.int64), out)
    return out


def _hull_areas_py(xy, starts, out):  # noqa: ANN001, ANN202 (compiled helper)
    for k in range(len(out)):
        s, e = starts[k], starts[k + 1] - 1  # the closing point dropped
        out[k] = 0.0
        if e - s < 3:
            continue
        x, y = xy[s:e, 0], xy[s:e, 1]
        order = np.argsort(y, kind="mergesort")
        order = order[np.argsort(x[order], kind="mergesort")]  # by x, then y
        hx, hy = np.empty(2 * (e - s)), np.empty(2 * (e - s))
        t = 0
        for i in range(e - s):  # the lower chain, then the upper: counter-clockwise, collinear points left out
            t = _hull_push(hx, hy, t, 2, x[order[i]], y[order[i]])
        lower = t + 1
        for i in range(e - s - 2, -1, -1):
            t = _hull_push(hx, hy, t, lower, x[order[i]], y[order[i]])
        n = t - 1  # distinct hull vertices (the last one pushed is the first again)
        if n >= 3:
            out[k] = _geos_hull_area(hx, hy, n)


def _hull_push_py(hx, hy, t, floor, px, py):  # noqa: ANN001, ANN202 (compiled helper)
    """Push (px, py) on the hull stack of ``t`` points, first popping the points it turns clockwise
    or straight from (never below ``floor``); the new count."""
    while t >= floor and (hx[t - 1] - hx[t - 2]) * (py - hy[t - 2]) - (hy[t - 1] - hy[t - 2]) * (px - hx[t - 2]) <= 0:
        t -= 1
    hx[t], hy[t] = px, py
    return t + 1


def _geos_hull_area_py(hx, hy, n):  # noqa: ANN001, ANN202 (compiled helper)
    """The area of the counter-clockwise hull ``hx[:n], hy[:n]`` as GEOS computes it for its hull
    ring: from the lowest (then leftmost) vertex, clockwise, x taken relative to that vertex's."""
    p = 0
    for i in range(1, n):
        if hy[i] < hy[p] or (hy[i] == hy[p] and hx[i] < hx[p]):
            p = i
    total = 0.0
    for j in range(1, n):
        total += (hx[(p - j) % n] - hx[p]) * (hy[(p - j + 1) % n] - hy[(p - j - 1) % n])
    return abs(total / 2)


# plain Python until _kernels() compiles them
_reflect, _border_sum, _top = _reflect_py, _border_sum_py, _top_py
_reconstruct, _edt, _smooth_peaks = _reconstruct_py, _edt_py, _smooth_peaks_py
_push, _pop, _flood, _label4 = _push_py, _pop_py, _flood_py, _label4_py
_flood_components, _cut_at_peaks, _box_table, _grow, _side = _flood_components_py, _cut_at_peaks_py, _box_table_py, _grow_py, _side_py
_crops_on_canvas, _tissue_counts = _crops_on_canvas_py, _tissue_counts_py
_open, _next_run, _root, _runs, _boxes_of_runs = _open_py, _next_run_py, _root_py, _runs_py, _boxes_of_runs_py
_components, _kept_runs, _block_means = _components_py, _kept_runs_py, _block_means_py
_label_counts, _relabel, _label_sums, _label_owners = _label_counts_py, _relabel_py, _label_sums_py, _label_owners_py
_shift_into, _row_spans = _shift_into_py, _row_spans_py
_ring_segments, _chain_rings, _successors, _slot = _ring_segments_py, _chain_rings_py, _successors_py, _slot_py
_type_votes, _type_sums = _type_votes_py, _type_sums_py
_grown_queue, _grow_near, _grow_row = _grown_queue_py, _grow_near_py, _grow_row_py
_core = _core_py
_hull_push, _geos_hull_area, _hull_areas = _hull_push_py, _geos_hull_area_py, _hull_areas_py

"""Probability maps -> instance label images (nuclei, glands, lumen) and per-instance types.

All functions take probability maps as ``(C, H, W)`` arrays, either ``uint8`` holding
``round(255 * p)`` (the predictions.zarr encoding) or floating point in [0, 1]. Thresholds are
always given as probabilities. Pixels where every channel is 0 were not computed; they are
background for every function here. The steps that read only interior and boundary also take
those two channels alone (the last two of a three-channel map), as the chunks read them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from . import _compiled
from ._compiled import h_maxima_bool

__all__ = [
    "nuclei_instances",
    "split_at_necks",
    "gland_instances",
    "drop_unconfident_glands",
    "lumen_instances",
    "instance_type",
    "label_to_3class",
    "downsample_prob",
    "remove_small_instances",
    "remove_unconfident_instances",
]


def _sk_watershed(image: np.ndarray, markers: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``skimage.segmentation.watershed``, imported on first use: it imports skimage's morphology
    (~0.1-0.2 s in each process that starts), which the compiled paths do not need."""
    from skimage.segmentation import watershed

    return watershed(image, markers, mask=mask)


def _watershed(image: np.ndarray, markers: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``skimage.segmentation.watershed(image, markers, mask=mask)`` (4-connectivity) for small
    crops: the same flooding routine on the same padded inputs, without the per-call checks that
    dominate its cost on a nucleus-sized crop (``tests/test_postprocess_fast_paths.py``)."""
    if _flood is None:
        return _sk_watershed(image, markers, mask)
    h, w = image.shape
    img = np.zeros((h + 2, w + 2), np.float64)
    img[1:-1, 1:-1] = image
    msk = np.zeros((h + 2, w + 2), np.int8)
    msk[1:-1, 1:-1] = mask
    out = np.zeros((h + 2, w + 2), np.int32)
    out[1:-1, 1:-1] = np.where(mask, markers, 0)
    # the 4 neighbours in the order skimage sorts them (by distance, then footprint order)
    neighbours = np.array([-(w + 2), -1, 1, w + 2], np.intp)
    strides = np.array([w + 2, 1], np.intp)
    try:
        _flood(img.ravel(), np.flatnonzero(out), neighbours, msk.ravel(), strides, 0.0, out.ravel(), False)
    except (TypeError, ValueError):  # another signature of skimage's private routine
        return _sk_watershed(image, markers, mask)
    return out[1:-1, 1:-1].copy()


try:  # skimage's flooding routine itself, as skimage.segmentation.watershed calls it
    from skimage.segmentation._watershed_cy import watershed_raveled as _flood
except ImportError:  # another skimage layout: the public function
    _flood = None


def _validate_prob(prob: np.ndarray, *, channels: int | None = None, name: str = "prob") -> np.ndarray:
    """Check a (C, H, W) probability map and return it as an ndarray."""
    prob = np.asarray(prob)
    if prob.ndim != 3:
        raise ValueError(f"{name} must be (C, H, W); got shape {prob.shape}")
    if channels is not None and prob.shape[0] != channels:
        raise ValueError(f"{name} must have {channels} channels (background, interior, boundary); got {prob.shape[0]}")
    if not (prob.dtype == np.uint8 or np.issubdtype(prob.dtype, np.floating)):
        raise TypeError(f"{name} must be uint8 (255 * p) or floating point; got {prob.dtype}")
    return prob


def _scale(prob: np.ndarray) -> float:
    """Value that stands for probability 1 in ``prob``'s encoding."""
    return 255.0 if prob.dtype == np.uint8 else 1.0


def _validate_labels(labels: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D (H, W) array; got shape {labels.shape}")
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must be an integer label image; got {labels.dtype} (use scipy.ndimage.label on a mask)")
    if shape is not None and labels.shape != tuple(shape):
        raise ValueError(f"labels shape {labels.shape} does not match the probability map's {tuple(shape)}")
    return labels


def _relabel_sequential(labels: np.ndarray) -> np.ndarray:
    """Renumber the labels present to 1..n, keeping their order."""
    present = np.bincount(labels.ravel()) > 0
    present[0] = False
    lut = np.zeros(present.size, dtype=np.int32)
    lut[present] = np.arange(1, int(present.sum()) + 1, dtype=np.int32)
    return relabeled(labels, lut)


def relabeled(labels: np.ndarray, lut: np.ndarray, *, in_place: bool = False) -> np.ndarray:
    """``lut[labels]`` (a new C-ordered array of ``lut``'s dtype) for non-negative integer labels
    below ``len(lut)``: a copy renumbered in place with numba (half the time of the
    gather, which makes a temporary index array). ``in_place``: C-contiguous ``labels`` of ``lut``'s
    dtype are renumbered where they are (and returned), with numba."""
    if _compiled.available() and labels.ndim == 2 and labels.dtype.kind in "iu" and lut.dtype.kind in "iu":
        own = in_place and labels.dtype == lut.dtype and labels.flags.c_contiguous and labels.flags.writeable
        return _compiled.relabel_in_place(labels if own else np.array(labels, dtype=lut.dtype, order="C"), lut)
    return lut[labels]


def _remove_small(labels: np.ndarray, min_area_px: float) -> np.ndarray:
    if min_area_px <= 0 or labels.max(initial=0) == 0:
        return labels
    sizes = np.bincount(labels.ravel())
    small = sizes < min_area_px
    small[0] = False
    if small.any():
        labels = labels.copy()
        labels[small[labels]] = 0
    return labels


def remove_small_instances(labels: np.ndarray, min_area_px: float) -> np.ndarray:
    """Drop the instances of ``labels`` smaller than ``min_area_px`` pixels and renumber the rest
    1..n in their order (the last step of :func:`nuclei_instances` and :func:`gland_instances`)."""
    return _relabel_sequential(_remove_small(_validate_labels(labels), min_area_px))


#: Smoothing (px) of the distance map :func:`split_at_necks` cuts; its Gaussian reaches
#: ``NECK_REACH_PX`` pixels, so an object's split can depend on pixels that close to it.
NECK_SIGMA_PX = 0.5
NECK_REACH_PX = 2


def _contacts(labels: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another nonzero label."""
    out = np.zeros(labels.shape, bool)
    rows = (labels[1:] != labels[:-1]) & (labels[1:] > 0) & (labels[:-1] > 0)
    out[1:] |= rows
    out[:-1] |= rows
    cols = (labels[:, 1:] != labels[:, :-1]) & (labels[:, 1:] > 0) & (labels[:, :-1] > 0)
    out[:, 1:] |= cols
    out[:, :-1] |= cols
    return out


def split_at_necks(labels: np.ndarray, h: float) -> np.ndarray:
    """Cut each object of ``labels`` at the necks of its distance map.

    Each object's distance to its own edge (pixels touching another object count as edge),
    smoothed by a Gaussian of :data:`NECK_SIGMA_PX`, is flooded from its h-maxima
    (``skimage.morphology.h_maxima``): an object made of two overlapping discs gets one peak per
    disc and is cut at the neck, while a peak rising less than ``h`` px above the saddle to a
    higher one does not count. Only objects with at least two local maxima of the distance are
    examined (an object with one cannot have two h-maxima), which keeps the cost near that of a
    few whole-array filters. New pieces are numbered after ``labels.max()``; the first piece
    keeps the object's label. Labels are not renumbered.

    Parameters
    ----------
    labels : (H, W) int ndarray
        Instances, 0 = background.
    h : float
        Least height of a peak above its saddle, in pixels (> 0).

    Examples
    --------
    >>> yy, xx = np.mgrid[:15, :25]
    >>> two = ((yy - 7) ** 2 + (xx - 7) ** 2 < 36) | ((yy - 7) ** 2 + (xx - 17) ** 2 < 36)
    >>> int(split_at_necks(two.astype(np.int32), 0.5).max())
    2
    """
    labels = _validate_labels(labels)
    if h <= 0:
        raise ValueError(f"h must be > 0, got {h}")
    return _split_at_necks(labels, h)


def _split_at_necks(labels: np.ndarray, h: float, skip: np.ndarray | None = None) -> np.ndarray:
    """:func:`split_at_necks`; objects ``i`` with ``skip[i]`` are never cut (they still shape their
    neighbours' distance maps). New pieces are numbered in label order, so skipping objects whose
    pieces would all be dropped later leaves the other pieces' order, and so any sequential
    renumbering, unchanged."""
    n = int(labels.max(initial=0))
    if n == 0:
        return labels
    core = (labels > 0) & ~_contacts(labels)
    dist, tops = _smooth_and_peaks(_edt32(core), core)
    # local maxima, labelled 4-connected so that no component spans two objects
    peaks, n_peaks = label4(tops)
    if n_peaks < 2:
        return labels
    owner = owners(peaks, labels, n_peaks + 1)
    examine = np.bincount(owner[1:], minlength=n + 1) >= 2
    if skip is not None:
        examine &= ~skip
    candidates = np.flatnonzero(examine)
    if len(candidates) == 0:
        return labels
    box = object_boxes(labels, candidates)
    # h-maxima of every candidate at once: each crop (its box and a 1 px border of zeros) goes onto
    # one canvas, side by side. A reconstruction's result does not depend on the order it visits
    # pixels, and crops ringed by zeros cannot raise each other's, so the maxima are those of each
    # crop alone (tests/test_postprocess_arrays.py); the watershed stays per crop, as its ties
    # between equal heights are broken in an order that would depend on the other crops.
    sides = np.stack([box[:, 1] - box[:, 0] + 2, box[:, 3] - box[:, 2] + 2], axis=1)
    places, shape = _shelf_pack([(hh, ww) for hh, ww in sides.tolist()])  # the canvas is ~2x smaller when crops go tallest first
    if _compiled.available():  # the crops drawn straight onto the canvas, cut in one compiled loop
        at = np.array(places, np.int64)
        d_c, ids = _compiled.crops_on_canvas(labels, dist, candidates, box, at, shape)
        out = labels.copy()
        _compiled.cut_at_peaks(d_c, h_maxima_bool(d_c, h), ids, at, sides, np.ascontiguousarray(box[:, [0, 2]]), out, n + 1)
        return out
    slices = [(slice(r0, r1), slice(c0, c1)) for r0, r1, c0, c1 in box.tolist()]
    labels_p, dist_p = np.pad(labels, 1), np.pad(dist, 1)
    crops = []
    for i, sl in zip(candidates, slices):
        wide = (slice(sl[0].start, sl[0].stop + 2), slice(sl[1].start, sl[1].stop + 2))
        obj = labels_p[wide] == i
        crops.append((int(i), sl, obj, np.where(obj, dist_p[wide], 0)))
    d_c = _on_canvas([c[3] for c in crops], places, shape)
    peaks_c = h_maxima_bool(d_c, h)  # skimage's h_maxima
    several = _several_maxima(peaks_c, [c[2] for c in crops], places, shape)
    out = labels.copy()
    nxt = n + 1
    for (i, sl, obj, d), (r, c), go in zip(crops, places, several):
        if not go:
            continue
        markers, k = ndi.label(peaks_c[r : r + d.shape[0], c : c + d.shape[1]] & obj)
        if k < 2:
            continue
        pieces = _watershed(-d, markers, obj)[1:-1, 1:-1]
        new = pieces > 1
        out[sl][new] = pieces[new] + (nxt - 2)
        nxt += k - 1
    return out


def _several_maxima(peaks_c: np.ndarray, objs: list[np.ndarray], places: list[tuple[int, int]],
                    shape: tuple[int, int]) -> np.ndarray:
    """Whether each crop's ``peaks & object`` has two or more 4-connected components, from one
    labelling of the canvas (crops' objects are ringed by zeros there, so none spans two)."""
    ids = _on_canvas([np.where(o, k + 1, 0).astype(np.int32) for k, o in enumerate(objs)], places, shape)
    comps, n_comps = ndi.label(peaks_c & (ids > 0))
    owner = np.zeros(n_comps + 1, np.int64)
    on = comps > 0
    owner[comps[on]] = ids[on]
    return np.bincount(owner[1:], minlength=len(objs) + 1)[1:] >= 2


def _on_canvas(images: list[np.ndarray], places: list[tuple[int, int]], shape: tuple[int, int]) -> np.ndarray:
    canvas = np.zeros(shape, images[0].dtype)
    for img, (r, c) in zip(images, places):
        canvas[r : r + img.shape[0], c : c + img.shape[1]] = img
    return canvas


def _smooth_and_peaks(edt: np.ndarray, core: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distance map neck cutting floods (``edt`` smoothed by :data:`NECK_SIGMA_PX`, 0 off
    ``core``) and its local maxima on ``core`` (3x3); compiled with numba, same values."""
    if _compiled.available() and core.ndim == 2 and core.size:
        return _compiled.smooth_and_peaks(edt, core, NECK_SIGMA_PX, NECK_REACH_PX)
    dist = ndi.gaussian_filter(edt, NECK_SIGMA_PX, truncate=NECK_REACH_PX / NECK_SIGMA_PX)
    dist *= core
    return dist, (dist == ndi.maximum_filter(dist, size=3)) & core


def _edt32(mask: np.ndarray) -> np.ndarray:
    """``distance_transform_edt(mask).astype(np.float32)`` where ``mask`` has a False pixel:
    scipy's feature transform, with the distances (the same float64 square roots) taken from it
    on the mask's pixels only; with numba, Meijster's exact transform."""
    if _compiled.available() and not mask.all():
        return _compiled.edt32(mask)
    near = ndi.distance_transform_edt(mask, return_distances=False, return_indices=True)
    out = np.zeros(mask.shape, np.float32)  # 0 off the mask, as there
    ys, xs = np.nonzero(mask)
    dy = near[0][ys, xs] - ys
    dx = near[1][ys, xs] - xs
    out[ys, xs] = np.sqrt(dy * dy + dx * dx, dtype=np.float64)
    return out


def _shelf_pack(shapes: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """Top-left corners for boxes of ``shapes`` laid in rows on one canvas, tallest first (little
    space lost in each row), and the canvas shape."""
    # a narrow canvas (half the side of a square one) wastes ~11% of its area here, a wide one ~35%
    width = max(max(w for _, w in shapes), int(np.sqrt(sum(hh * w for hh, w in shapes))) // 2)
    places: list[tuple[int, int]] = [(0, 0)] * len(shapes)
    r, c, row_h = 0, 0, 0
    for k in sorted(range(len(shapes)), key=lambda k: -shapes[k][0]):
        hh, w = shapes[k]
        if c + w > width:
            r, c, row_h = r + row_h, 0, 0
        places[k] = (r, c)
        c += w
        row_h = max(row_h, hh)
    return places, (r + row_h, width)


def _drop_unconfident(labels: np.ndarray, interior: np.ndarray, min_interior: float) -> np.ndarray:
    """Zero the objects whose highest ``interior`` value is below ``min_interior`` (same units)."""
    n = int(labels.max(initial=0))
    if n == 0:
        return labels
    keep = _reaches(labels, interior, min_interior, n)
    keep[0] = False
    return np.where(keep[labels], labels, 0).astype(labels.dtype)


def remove_unconfident_instances(labels: np.ndarray, inst_prob: np.ndarray, min_interior: float) -> np.ndarray:
    """Drop the instances of ``labels`` whose highest interior probability (``inst_prob[1]``, a
    probability threshold whatever the map's encoding) is below ``min_interior``; the rest keep
    their numbers (the ``min_interior`` step of :func:`nuclei_instances`)."""
    inst_prob = _validate_prob(inst_prob, channels=3, name="inst_prob")
    labels = _validate_labels(labels, inst_prob.shape[1:])
    return _drop_unconfident(labels, inst_prob[1], min_interior * _scale(inst_prob)) if min_interior > 0 else labels


def _doomed(labels: np.ndarray, interior: np.ndarray, min_peak: float, min_area_px: float) -> np.ndarray:
    """Objects (index = label) that are dropped whatever they are cut into: smaller than
    ``min_area_px``, or with no ``interior`` value reaching ``min_peak`` (> 0). Every piece of such
    an object is as small or as unsure, so neck cutting may skip them."""
    n = int(labels.max(initial=0))
    doomed = _sizes(labels, n + 1) < min_area_px
    if min_peak > 0:
        doomed |= ~_reaches(labels, interior, min_peak, n)
    doomed[0] = True
    return doomed


def _sizes(labels: np.ndarray, length: int) -> np.ndarray:
    """Pixels per label (index = label, ``length`` entries; entry 0 is not counted): one compiled
    pass with numba, else counted over the object pixels only (most of a map is background)."""
    if _compiled.available():
        counts = _compiled.label_counts(labels, length)
        if counts is not None:
            return counts
    return np.bincount(labels[labels > 0], minlength=length)


def _mean_in_labels(labels: np.ndarray, values: np.ndarray, ids: np.ndarray, scale: float, *, length: int | None = None) -> np.ndarray:
    """The mean of ``values`` over the pixels of each label of ``ids``, divided by ``scale``
    (``length``: labels counted, default ``labels.max() + 1``; more where some of ``ids`` may be gone)."""
    if len(ids) == 0:
        return np.zeros(0)
    counts, sums = _counts_and_sums(labels, values, int(labels.max(initial=0)) + 1 if length is None else length)
    return sums[ids] / np.maximum(counts[ids], 1) / scale


def _counts_and_sums(labels: np.ndarray, values: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of each label (index = label, ``n`` entries) and the sum of ``values`` over them."""
    if values.dtype.kind in "iu" and values.shape == labels.shape and _compiled.available():
        found = _compiled.label_sums(labels, values, n)  # one pass; integer sums, exact as bincount's float64 ones
        if found is not None:
            return found
    on = labels > 0  # over the objects' pixels only (same sums: background adds to entry 0)
    return _sizes(labels, n), np.bincount(labels[on], weights=values[on].astype(np.float64), minlength=n)


def _mean_foreground(labels: np.ndarray, inst_prob: np.ndarray, ids: np.ndarray, *, length: int | None = None) -> np.ndarray:
    """Each label of ``ids``: the mean over its pixels of ``inst_prob``'s interior + boundary
    probability (a probability, whatever the map's encoding; uint8 maps summed as integers, in one
    compiled pass). ``inst_prob``: the background, interior and boundary channels, or only the last
    two. ``length`` as in :func:`_mean_in_labels`. uint8 maps are summed a few rows at a time (no
    full-size sum; integer sums, the same in any order)."""
    s = _scale(inst_prob)
    if s != 255.0 or labels.ndim != 2 or len(ids) == 0:
        fg = inst_prob[-2].astype(np.uint16 if s == 255.0 else np.float64) + inst_prob[-1]
        return _mean_in_labels(labels, fg, ids, s, length=length)
    return mean_foreground_of_pieces(labels, [((0, 0), inst_prob)], ids, length=length)


def mean_foreground_of_pieces(labels: np.ndarray, pieces: Iterable[tuple[tuple[int, int], np.ndarray]], ids: np.ndarray, *,
                              length: int | None = None) -> np.ndarray:
    """:func:`_mean_foreground` of a uint8 map given in pieces ((first row, first column), pixels),
    e.g. as read one stored chunk at a time (one piece is held at a time); ``length`` as there:
    summed as they come, a few rows at a time. Integer sums: the same means however the map is cut."""
    n = int(labels.max(initial=0)) + 1 if length is None else length
    counts, sums = np.zeros(n, np.int64), np.zeros(n, np.float64)
    for (y0, x0), inst_prob in pieces:
        h, w = inst_prob.shape[1:]
        for y in range(0, h, _MASK_ROWS):
            rows = slice(y, min(y + _MASK_ROWS, h))
            c, t = _counts_and_sums(labels[y0 + rows.start : y0 + rows.stop, x0 : x0 + w],
                                    inst_prob[-2, rows].astype(np.uint16) + inst_prob[-1, rows], n)
            counts += c
            sums += t
        del inst_prob  # before the next piece is read
    return sums[ids] / np.maximum(counts[ids], 1) / 255.0


def _reaches(labels: np.ndarray, values: np.ndarray, least: float, n: int) -> np.ndarray:
    """Whether some pixel of each object (index = label, 0..n) has ``values >= least``."""
    return np.bincount(labels[values >= least], minlength=n + 1) > 0


def nuclei_foreground(inst_prob: np.ndarray, mask_threshold: float) -> np.ndarray:
    """The nuclei mask: ``interior + boundary > mask_threshold`` (a probability, whatever the
    map's encoding; ``inst_prob``: the background, interior and boundary channels, or only the last
    two); its 4-connected blobs are flooded one by one."""
    s = _scale(inst_prob)
    return inst_prob[-2].astype(np.float32 if s == 1.0 else np.uint16) + inst_prob[-1] > mask_threshold * s


def find_objects(labels: np.ndarray) -> list[tuple[slice, slice] | None]:
    """``ndi.find_objects(labels)`` for 2-D labels (None for a missing label); one compiled pass
    with numba, several times faster on a chunk-sized map."""
    n = int(labels.max(initial=0))
    if not _compiled.available() or labels.ndim != 2 or n == 0:
        return ndi.find_objects(labels)
    return slices_of(_compiled.box_table(labels, n))


def slices_of(box: np.ndarray) -> list[tuple[slice, slice] | None]:
    """The ``find_objects`` slices of a :func:`box_table` (None for a missing label)."""
    return [(slice(a, b), slice(c, d)) if b > a else None for a, b, c, d in box.tolist()]


def box_table(labels: np.ndarray) -> np.ndarray:
    """Bounding boxes (row0, row1, col0, col1) of labels 1..max as an array (row ``k`` for label
    ``k + 1``), the values of ``find_objects``; a missing label's row has ``row1 <= row0``."""
    n = int(labels.max(initial=0))
    if n == 0:
        return np.zeros((0, 4), np.int64)
    if _compiled.available() and labels.ndim == 2:
        return _compiled.box_table(labels, n)
    box = np.tile(np.array([[labels.shape[0], 0, labels.shape[1], 0]], np.int64), (n, 1))
    for k, sl in enumerate(ndi.find_objects(labels)):
        if sl is not None:
            box[k] = (sl[0].start, sl[0].stop, sl[1].start, sl[1].stop)
    return box


def label4(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """``ndi.label(mask)`` (4-connected, raster-ordered numbers): the labels (int32) and their count,
    from the compiled row runs of :func:`labelled_boxes` where numba is there (~1.7x faster)."""
    if _compiled.available() and mask.ndim == 2:
        comps, box = _compiled.components(mask)
        return comps, len(box)
    return ndi.label(mask)


def owners(labels: np.ndarray, values: np.ndarray, length: int) -> np.ndarray:
    """``out[labels[p]] = values[p]`` for every pixel with a label (int64, ``length`` entries, 0 for
    labels without pixels): e.g. the component holding each marker, where every marker lies in one
    (where a label meets several values, the last in raster order). One compiled pass with numba."""
    if _compiled.available() and labels.shape == values.shape:
        out = _compiled.label_owners(labels, values, length)
        if out is not None:
            return out
    on = labels > 0
    out = np.zeros(length, np.int64)
    out[labels[on]] = values[on]
    return out


def labelled_boxes(mask: np.ndarray, *, labels: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
    """``ndi.label(mask)`` (4-connected, raster-ordered numbers) and the bounding box (row0, row1,
    col0, col1) of each component (row ``k`` for label ``k + 1``); without ``labels`` only the
    boxes. One compiled pass over the row runs with numba."""
    if _compiled.available() and mask.ndim == 2:
        return _compiled.components(mask, labels=labels)
    comps, n = ndi.label(mask)
    box = object_boxes(comps, np.arange(1, n + 1)) if n else np.zeros((0, 4), np.int64)
    return (comps if labels else None), box


@dataclass(frozen=True)
class Components:
    """A mask's components (:func:`mask_components`): their boxes (as :func:`labelled_boxes` gives
    them) and what :func:`kept_components` paints them from: their row runs (compiled kernels),
    else the mask itself."""

    box: np.ndarray
    runs: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
    mask: np.ndarray | None = None


def mask_components(mask: np.ndarray) -> Components:
    """The components of a 2-D ``mask``, found once: with numba the mask is not needed afterwards."""
    if _compiled.available():
        runs, box = _compiled.component_runs(mask)
        return Components(box, runs=runs)
    return Components(labelled_boxes(mask, labels=False)[1], mask=mask)


def kept_components(comps: Components, keep: np.ndarray, rect: tuple[int, int, int, int]) -> np.ndarray:
    """The components of ``comps`` numbered as :func:`labelled_boxes` numbers them, those that ``keep``
    names (index = number - 1) renumbered 1..k in that order and the others 0, cropped to ``rect``
    (row0, row1, col0, col1). With numba no label image of the whole mask is made; none at all where
    nothing is kept."""
    if not np.any(keep):
        return np.zeros((rect[1] - rect[0], rect[3] - rect[2]), np.int32)
    lut = np.zeros(len(keep) + 1, np.int32)
    lut[1:][keep] = np.arange(1, int(np.count_nonzero(keep)) + 1, dtype=np.int32)
    if comps.runs is not None:
        return _compiled.kept_components(comps.runs, lut, rect)
    assert comps.mask is not None
    labels, _ = labelled_boxes(comps.mask)
    crop = labels[rect[0] : rect[1], rect[2] : rect[3]]
    return relabeled(crop, lut, in_place=crop.shape == labels.shape)


def object_boxes(labels: np.ndarray, which: np.ndarray) -> np.ndarray:
    """Bounding boxes (row0, row1, col0, col1) of the labels ``which`` (each present), as
    ``ndi.find_objects`` gives them: rows of :func:`box_table`."""
    which = np.asarray(which, np.int64)
    return box_table(labels)[which - 1] if len(which) else np.zeros((0, 4), np.int64)


def _nuclei_instances(
    inst_prob: np.ndarray,
    *,
    min_area_px: float,
    marker_threshold: float,
    mask_threshold: float,
    min_marker_px: int,
    keep_unmarked: bool,
    split_h: float = 0.0,
    min_interior: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Nuclei labels and the foreground-mask components they come from (for halo checks).

    Each 4-connected foreground component is handled on its own: with one marker it is one
    nucleus, with none it is one nucleus when ``keep_unmarked``, with several it is flooded by a
    watershed run on the component's bounding-box crop alone. The result for a component therefore
    depends only on that component's pixels, never on what else lies in the array (a single
    watershed over the whole array breaks ties between equal grey levels by the state of one
    shared priority queue, so a crop and the whole image could split a clump differently).
    With ``split_h`` the nuclei are then cut at their necks (:func:`split_at_necks`), which also
    reads pixels up to :data:`NECK_REACH_PX` away from a blob. ``inst_prob``: the background,
    interior and boundary channels, or only the last two.
    """
    s = _scale(inst_prob)
    interior = inst_prob[-2]
    mask = nuclei_foreground(inst_prob, mask_threshold)
    components, n_comp = label4(mask)
    markers, n_markers = label4((interior > marker_threshold * s) & mask)
    if min_marker_px > 1 and n_markers:
        markers = _remove_small(markers, min_marker_px)
    labels = np.zeros(mask.shape, np.int32)
    if n_comp == 0:
        return labels, components.astype(np.int32)
    # markers per component (a marker lies inside exactly one component)
    m_comp = owners(markers, components, n_markers + 1)  # _remove_small drops markers, never renumbers them
    per_comp = np.bincount(m_comp[1:][m_comp[1:] > 0], minlength=n_comp + 1)
    lut = np.arange(n_comp + 1, dtype=np.int32)
    lut[per_comp > 1] = 0
    if not keep_unmarked:
        lut[per_comp == 0] = 0
    lut[0] = 0
    labels = relabeled(components, lut)
    multi = np.flatnonzero(per_comp > 1)
    if len(multi):
        surface = 255 - interior if s == 255.0 else -interior.astype(np.float32)  # low where the interior is confident
        _flood_blobs(surface, markers, components, multi, labels, n_comp)
    if split_h > 0:
        labels = _split_at_necks(labels, split_h, skip=_doomed(labels, interior, min_interior * s, min_area_px))
    sure = _reaches(labels, interior, min_interior * s, int(labels.max(initial=0))) if min_interior > 0 else None
    return _keep_large(labels, min_area_px, sure), components.astype(np.int32, copy=False)


def _flood_blobs(surface: np.ndarray, markers: np.ndarray, components: np.ndarray, which: np.ndarray,
                 labels: np.ndarray, offset: int) -> None:
    """Each blob ``c`` of ``which``: its pixels in ``labels`` become the watershed of ``surface``
    from its markers on its bounding-box crop alone, plus ``offset`` (in place; compiled with
    numba, the same floods)."""
    if _compiled.available():
        _compiled.flood_components(surface, markers, components, which, labels, offset)
        return
    slices = find_objects(components)
    for c in which:
        sl = slices[c - 1]
        m = components[sl] == c
        labels[sl][m] = _watershed(surface[sl], markers[sl], m)[m] + offset


def nuclei_instances(
    inst_prob: np.ndarray,
    *,
    min_area_px: float = 10,
    marker_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    min_marker_px: int = 1,
    keep_unmarked: bool = True,
    split_h: float = 0.0,
    min_interior: float = 0.0,
) -> np.ndarray:
    """Marker-controlled watershed of a nuclei INST map.

    Markers are the connected components (4-connectivity) of ``interior > marker_threshold``;
    the mask is ``interior + boundary > mask_threshold``. Each 4-connected blob of the mask is one
    nucleus when it holds one marker; a blob with several markers is split by a watershed of the
    negated interior probability run on that blob alone (so the result for a blob never depends
    on the rest of the array); a blob without a marker is one nucleus when ``keep_unmarked``.
    With ``split_h`` > 0 each nucleus is then cut at the necks of its distance map
    (:func:`split_at_necks`: touching nuclei whose markers merged); with ``min_interior`` > 0 the
    nuclei whose interior probability never reaches it are dropped. Objects smaller than
    ``min_area_px`` are removed last.

    Parameters
    ----------
    inst_prob : (3, H, W) uint8 or float ndarray
        Background, eroded interior and boundary-band probabilities.
    min_area_px : float
        Smallest object kept, in model pixels.
    marker_threshold, mask_threshold : float
        Probability thresholds for markers and mask.
    min_marker_px : int
        Markers smaller than this are dropped before flooding.
    keep_unmarked : bool
        Keep foreground blobs that hold no marker.
    split_h : float
        Least peak height (px) for :func:`split_at_necks`; 0 = no cutting.
    min_interior : float
        Least highest interior probability of a nucleus kept; 0 = keep all.

    Returns
    -------
    labels : (H, W) int32 ndarray
        0 = background, objects 1..n.

    Examples
    --------
    >>> p = np.zeros((3, 5, 9), np.uint8); p[0] = 255
    >>> p[:, 1:4, 1:8] = 0; p[2, 1:4, 1:8] = 255
    >>> p[1, 2, 2] = p[1, 2, 6] = 255; p[2, 2, 2] = p[2, 2, 6] = 0
    >>> int(nuclei_instances(p, min_area_px=1).max())
    2
    """
    inst_prob = _validate_prob(inst_prob, channels=3, name="inst_prob")
    labels, _ = _nuclei_instances(
        inst_prob,
        min_area_px=min_area_px,
        marker_threshold=marker_threshold,
        mask_threshold=mask_threshold,
        min_marker_px=min_marker_px,
        keep_unmarked=keep_unmarked,
        split_h=split_h,
        min_interior=min_interior,
    )
    return labels


def _fill_holes_per_label(labels: np.ndarray, *, in_place: bool = False) -> np.ndarray:
    """Fill background holes inside each object with that object's label.

    A hole of object ``i`` is a 4-connected component of the pixels that are not ``i`` inside its
    bounding box that does not reach the box's edge (``scipy.ndimage.binary_fill_holes``); only its
    background pixels are filled, and the largest label wins a pixel two objects enclose (labels
    are filled from the largest down, each only where no larger one filled). An object can have a
    hole only where a 4-connected background component that does not reach the array's edge lies
    strictly inside its box, so only those objects are examined. ``in_place``: fill ``labels``
    itself (else a copy, made only if a hole is found).
    """
    out = labels if in_place else None
    slices = find_objects(labels)
    for i in reversed(_may_enclose(labels, slices)):
        sl = slices[i - 1]
        crop = (labels if out is None else out)[sl]
        add = _holes(crop == i) & (crop == 0)  # filling never changes an object's own pixels
        if add.any():
            if out is None:
                out = labels.copy()
            out[sl][add] = i
    return labels if out is None else out


def _holes(mask: np.ndarray) -> np.ndarray:
    """Pixels outside ``mask`` whose 4-connected component does not reach the array's edge."""
    comps, box = labelled_boxes(~mask)
    if len(box) == 0:
        return np.zeros(mask.shape, bool)
    enclosed = np.zeros(len(box) + 1, bool)
    enclosed[1:] = _off_edge(box, mask.shape)
    return enclosed[comps]


def _off_edge(box: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Which boxes (row0, row1, col0, col1) do not reach the edge of an array of ``shape``."""
    return (box[:, 0] > 0) & (box[:, 1] < shape[0]) & (box[:, 2] > 0) & (box[:, 3] < shape[1])


def _may_enclose(labels: np.ndarray, slices: list) -> list[int]:
    """Labels whose bounding box strictly holds the box of a background component that does not
    reach the array's edge (the objects that can have holes), in increasing order."""
    boxes = np.array([(s[0].start, s[0].stop, s[1].start, s[1].stop) if s is not None else (0, 0, 0, 0) for s in slices])
    if len(boxes) == 0:
        return []
    hb = _enclosed_background(labels)
    if len(hb) == 0:
        return []
    found = np.zeros(len(boxes), bool)
    for k in range(0, len(hb), 256):  # blocks keep the (objects x holes) tables small
        b = hb[k : k + 256]
        inside = (
            (boxes[:, None, 0] < b[None, :, 0]) & (b[None, :, 1] < boxes[:, None, 1])
            & (boxes[:, None, 2] < b[None, :, 2]) & (b[None, :, 3] < boxes[:, None, 3])
        )
        found |= inside.any(axis=1)
    return [int(i) + 1 for i in np.flatnonzero(found)]


def _enclosed_background(labels: np.ndarray) -> np.ndarray:
    """Boxes (row0, row1, col0, col1) of the 4-connected background components of 2-D ``labels``
    that do not reach the array's edge (compiled: from row runs, without a label image)."""
    _, box = labelled_boxes(labels == 0, labels=False)
    return box[_off_edge(box, labels.shape)]


def _disk_rows(radius: int) -> list[tuple[int, int]]:
    """``skimage.morphology.disk(radius)`` (the pixels with ``dx² + dy² <= radius²``) as (row
    offset, half-width) of its centred rows, without importing skimage's morphology (~0.17 s in
    each process that starts)."""
    r = int(radius)
    return [(dy, math.isqrt(r * r - dy * dy)) for dy in range(-r, r + 1)]


def _shifted_rows(mask: np.ndarray, radius: int, erode: bool) -> np.ndarray:
    """Binary erosion (``erode``) or dilation of ``mask`` by ``disk(radius)``, outside = False.

    The disk is a stack of centred rows: each row width's 1-D minimum (maximum) along x is taken
    once, then shifted by every row offset and combined with AND (OR): the same set as
    ``scipy.ndimage.binary_erosion`` / ``binary_dilation`` with that footprint, in a few passes.
    """
    m = mask.view(np.uint8)
    filt = ndi.minimum_filter1d if erode else ndi.maximum_filter1d
    along: dict[int, np.ndarray] = {}
    out = np.full(mask.shape, erode, bool)
    h = mask.shape[0]
    for dy, half in _disk_rows(radius):
        if half not in along:
            along[half] = filt(m, 2 * half + 1, axis=1, mode="constant", cval=0).view(bool)
        rows = along[half]
        # erosion reads p + (dy, dx); dilation reads p - (dy, dx) (the disk is symmetric)
        src = dy if erode else -dy
        lo, hi = min(h, max(0, -src)), max(0, min(h, h - src))
        hi = max(lo, hi)
        if erode:
            out[:lo] = False
            out[hi:] = False
            out[lo:hi] &= rows[lo + src : hi + src]
        else:
            out[lo:hi] |= rows[lo + src : hi + src]
    return out


def _open_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """``scipy.ndimage.binary_opening(mask, structure=disk(radius))``, by rows of the disk
    (compiled with numba)."""
    if _compiled.available() and mask.ndim == 2:
        return _compiled.open_rows(mask, np.array([half for _, half in _disk_rows(radius)]))
    return _shifted_rows(_shifted_rows(np.ascontiguousarray(mask, bool), radius, True), radius, False)


def _expand_labels_square(labels: np.ndarray, distance: int, *, raster_ordered: bool = False,
                          in_place: bool = False) -> np.ndarray:
    """Grow labels into background by a square of radius ``distance`` without merging.

    The inverse of the square erosion of the Cerberus targets: ``distance`` steps of a 3x3
    dilation into background pixels only, so each background pixel within chessboard distance
    ``distance`` of an object takes the label of a nearest object. Ties go to the object whose
    first pixel comes last in raster order: a rule that does not depend on label numbers or on
    where the array was cropped, so a chunk gives exactly what the whole image gives.
    ``raster_ordered``: the labels already increase with that order (as ``ndi.label`` numbers
    them, or a crop of such labels that keeps their numbers), so the numbers are the ranks.
    ``in_place``: ``labels`` may be grown where it is (the compiled path), else a new array.
    """
    n = int(labels.max(initial=0))
    if n == 0 or distance < 1:
        return labels
    # only the box of the objects grown by ``distance`` can change
    d = int(distance)
    ys, xs = np.flatnonzero(labels.any(axis=1)), np.flatnonzero(labels.any(axis=0))
    box = (slice(max(0, ys[0] - d), ys[-1] + d + 1), slice(max(0, xs[0] - d), xs[-1] + d + 1))
    if raster_ordered and n <= _compiled.GROW_MAX_RANK and _compiled.available() and labels.ndim == 2:  # the numbers are the ranks
        if in_place and labels.dtype == np.int32 and labels.flags.c_contiguous:
            _compiled.grow_ranks(labels, d, in_place=True, box=(box[0].start, box[0].stop, box[1].start, box[1].stop))  # where it is
            return labels
        grown = _compiled.grow_ranks(labels[box], d)
        if grown.shape == labels.shape:
            return grown
        out = labels.copy()
        out[box] = grown
        return out
    out = labels.copy()
    small = np.uint8 if n < 255 else np.int16 if n < np.iinfo(np.int16).max else np.int32  # narrower is faster to filter
    if raster_ordered:
        rank = np.arange(n + 1, dtype=small)
        back = np.arange(n + 1, dtype=labels.dtype)
    else:
        rank, back = _first_pixel_ranks(labels, n, small)
    out[box] = back[_grow_ranks(rank[labels[box]], d)]
    return out


def _first_pixel_ranks(labels: np.ndarray, n: int, small: type) -> tuple[np.ndarray, np.ndarray]:
    """label -> rank of its first pixel in raster order (0 = background), and rank -> label."""
    first = np.full(n, np.iinfo(np.int64).max, np.int64)
    width = labels.shape[1]
    for i, sl in enumerate(find_objects(labels)):
        if sl is not None:
            row = sl[0].start
            col = sl[1].start + int(np.argmax(labels[row, sl[1]] == i + 1))
            first[i] = row * width + col
    rank = np.empty(n + 1, small)
    rank[0] = 0
    order = np.argsort(first, kind="stable")
    rank[order + 1] = np.arange(1, n + 1, dtype=small)
    back = np.zeros(n + 1, labels.dtype)
    back[rank[1:]] = np.arange(1, n + 1, dtype=labels.dtype)
    return rank, back


def _grow_ranks(r: np.ndarray, steps: int) -> np.ndarray:
    """``steps`` times: each 0 pixel with a nonzero 8-neighbour takes the largest neighbour value
    (``maximum_filter(r, 3)`` kept only where ``r`` was 0), updating only the ring of pixels
    reached at each step (compiled with numba: two raster sweeps, the same result)."""
    if _compiled.available() and r.ndim == 2 and int(r.max(initial=0)) <= _compiled.GROW_MAX_RANK:
        return _compiled.grow_ranks(r, steps)
    h, w = r.shape
    w2 = w + 2
    padded = np.zeros((h + 2, w2), r.dtype)
    padded[1:-1, 1:-1] = r
    flat = padded.ravel()
    inside = np.zeros((h + 2, w2), bool)
    inside[1:-1, 1:-1] = True
    inside = inside.ravel()
    offsets = np.array([-w2 - 1, -w2, -w2 + 1, -1, 1, w2 - 1, w2, w2 + 1], np.intp)
    zero = r == 0
    first = ndi.maximum_filter((~zero).view(np.uint8), size=3, mode="constant").view(bool) & zero
    yy, xx = np.nonzero(first)
    ring = (yy + 1) * w2 + xx + 1
    mark = np.zeros(flat.size, bool)
    for step in range(steps):
        if len(ring) == 0:
            break
        around = ring[:, None] + offsets
        flat[ring] = flat[around].max(axis=1)  # all read before any is written
        if step + 1 == steps:
            break
        cand = around.ravel()
        cand = cand[(flat[cand] == 0) & inside[cand]]
        mark[cand] = True
        ring = np.flatnonzero(mark)
        mark[ring] = False
    return padded[1:-1, 1:-1]


def opened_cores(inst_prob: np.ndarray, threshold: float, open_px: float = 0) -> np.ndarray:
    """:func:`core_mask` opened with ``disk(open_px)`` (``open_px`` < 1: not opened): the pixels whose
    components :func:`gland_instances` labels."""
    core = core_mask(inst_prob, threshold)
    return _open_disk(core, int(open_px)) if open_px >= 1 else core


def core_mask(inst_prob: np.ndarray, threshold: float) -> np.ndarray:
    """Gland or lumen cores: ``interior - boundary > threshold`` (a probability, whatever the
    map's encoding), before any opening. ``inst_prob``: the background, interior and boundary
    channels, or only the last two."""
    s = _scale(inst_prob)
    if s == 255.0 and inst_prob.ndim == 3 and _compiled.available():
        return _compiled.core_mask_u8(inst_prob[-2], inst_prob[-1], threshold * s)
    work = np.int16 if s == 255.0 else np.float32
    out = np.empty(inst_prob.shape[1:], bool)
    for y in range(0, out.shape[0], _MASK_ROWS):  # a few rows at a time: no full-size temporaries
        rows = slice(y, y + _MASK_ROWS)
        out[rows] = inst_prob[-2, rows].astype(work) - inst_prob[-1, rows].astype(work) > threshold * s
    return out


#: rows of a map per step of :func:`core_mask` and :func:`_mean_foreground`
_MASK_ROWS = 256


def _core_instances(
    inst_prob: np.ndarray,
    *,
    threshold: float,
    erosion_px: float,
    min_area_px: float,
    open_px: float = 0,
) -> np.ndarray:
    labels = ndi.label(opened_cores(inst_prob, threshold, open_px))[0]
    return grow_components(labels, erosion_px=erosion_px, min_area_px=min_area_px, in_place=True)


def grow_components(labels: np.ndarray, *, erosion_px: float, min_area_px: float, in_place: bool = False) -> np.ndarray:
    """The instances of :func:`gland_instances` from the components of its (opened) cores, labelled
    1..n in the raster order of their first pixels (as ``scipy.ndimage.label`` numbers them): grown
    back by ``erosion_px``, holes filled, those under ``min_area_px`` dropped. ``in_place``: made in
    ``labels`` itself where it can be (no second array of its size), else in a new array."""
    fresh = erosion_px >= 1 and bool(labels.max(initial=0))  # a new array from here on: filled in place
    if fresh:
        labels = _expand_labels_square(labels, int(erosion_px), raster_ordered=True, in_place=in_place)
    fresh = fresh or in_place or labels.dtype != np.int32
    labels = _fill_holes_per_label(labels.astype(np.int32, copy=False), in_place=fresh)
    return _keep_large(labels, min_area_px, in_place=fresh)


def _keep_large(labels: np.ndarray, min_area_px: float, also: np.ndarray | None = None, *, in_place: bool = False) -> np.ndarray:
    """``_relabel_sequential(_remove_small(labels, min_area_px))`` with one count and one lookup;
    ``also`` (index = label), when given, must hold too (e.g. :func:`_drop_unconfident`'s test).
    ``in_place``: int32 ``labels`` may be renumbered where they are (compiled with numba)."""
    sizes = _sizes(labels, int(labels.max(initial=0)) + 1)
    keep = sizes >= min_area_px if min_area_px > 0 else sizes > 0
    if also is not None:
        keep &= also[: keep.size]
    keep[0] = False
    lut = np.zeros(sizes.size, np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    if in_place and labels.dtype == np.int32 and labels.flags.c_contiguous and _compiled.available():
        return _compiled.relabel_in_place(labels, lut)
    return relabeled(labels, lut)


def drop_unconfident_glands(labels: np.ndarray, prob: np.ndarray, min_probability: float) -> np.ndarray:
    """Gland ``labels`` without those whose mean gland probability (``prob``'s interior +
    boundary channels, over their pixels) is below ``min_probability``, renumbered 1..n in order."""
    n = int(labels.max(initial=0))
    if n == 0 or min_probability <= 0:
        return labels
    prob = _validate_prob(prob, channels=3)
    keep = _mean_foreground(labels, prob, np.arange(n + 1)) >= min_probability
    keep[0] = False
    return _keep_large(labels, 0, also=keep)


def gland_instances(
    inst_prob: np.ndarray,
    *,
    threshold: float = 0.5,
    erosion_px: float = 5.0,
    min_area_px: float = 100,
    open_px: float = 0,
) -> np.ndarray:
    """Gland instances: components of ``interior - boundary > threshold`` grown back and filled.

    Cerberus eroded gland interiors with an 11x11 element at 0.5 um/px, so cores are grown back by
    ``erosion_px`` (5 model px at 0.5 um/px) with the same square: each background pixel within
    chessboard distance ``erosion_px`` takes its nearest object's label (objects never merge);
    background holes inside an object are then filled.

    Parameters
    ----------
    inst_prob : (3, H, W) uint8 or float ndarray
        Background, eroded interior, boundary-band probabilities.
    threshold : float
        Threshold on ``interior - boundary``.
    erosion_px : float
        Distance the cores are grown by, in pixels of ``inst_prob`` (rounded down; < 1: none).
    min_area_px : float
        Smallest object kept (after growing), in pixels of ``inst_prob``.
    open_px : float
        Radius of a disk the cores are opened with before labelling (cuts thin bridges between
        touching glands whose boundary band is weak; < 1: none).

    Returns
    -------
    labels : (H, W) int32 ndarray
        0 = background, objects 1..n.

    Examples
    --------
    >>> p = np.zeros((3, 12, 12), np.uint8)
    >>> p[1, 3:9, 3:9] = 255
    >>> int((gland_instances(p, erosion_px=2, min_area_px=1) > 0).sum())
    100
    """
    inst_prob = _validate_prob(inst_prob, channels=3, name="inst_prob")
    return _core_instances(inst_prob, threshold=threshold, erosion_px=erosion_px, min_area_px=min_area_px, open_px=open_px)


def _inside_fraction(labels: np.ndarray, container: np.ndarray) -> np.ndarray:
    """Fraction of each label's pixels (index = label) that lie where ``container`` is non-zero."""
    n = int(labels.max(initial=0)) + 1
    total = _sizes(labels, n)  # objects are a small part of a map: counted over their pixels only
    inside = np.bincount(labels[(labels > 0) & (container > 0)], minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / np.maximum(total, 1), 0.0)


def lumen_instances(
    inst_prob: np.ndarray,
    *,
    gland_labels: np.ndarray | None = None,
    threshold: float = 0.5,
    erosion_px: float = 1.0,
    min_area_px: float = 20,
    min_inside: float = 0.5,
) -> np.ndarray:
    """Lumen instances, as :func:`gland_instances`, kept only inside glands.

    Cerberus eroded lumen with a 3x3 element, so cores are grown back by 1 px at 0.5 um/px.
    A lumen is kept when at least ``min_inside`` of its pixels lie inside ``gland_labels`` (when
    given).

    Parameters
    ----------
    inst_prob : (3, H, W) uint8 or float ndarray
        Lumen INST probabilities.
    gland_labels : (H, W) int ndarray, optional
        Gland instances on the same grid; ``None`` keeps every lumen.
    threshold, erosion_px, min_area_px : float
        As in :func:`gland_instances`.
    min_inside : float
        Fraction of a lumen's pixels that must lie inside a gland.

    Returns
    -------
    labels : (H, W) int32 ndarray

    Examples
    --------
    >>> p = np.zeros((3, 10, 10), np.uint8); p[1, 1:4, 1:4] = 255; p[1, 6:9, 6:9] = 255
    >>> g = np.zeros((10, 10), np.int32); g[:5, :5] = 1
    >>> lab = lumen_instances(p, gland_labels=g, erosion_px=0, min_area_px=1)
    >>> int(lab.max()), int(lab[2, 2])
    (1, 1)
    """
    inst_prob = _validate_prob(inst_prob, channels=3, name="inst_prob")
    labels = _core_instances(inst_prob, threshold=threshold, erosion_px=erosion_px, min_area_px=min_area_px)
    if gland_labels is not None:
        gland_labels = _validate_labels(gland_labels, inst_prob.shape[1:])
        frac = _inside_fraction(labels, gland_labels)
        drop = frac < min_inside
        drop[0] = False
        if drop.any():
            labels = _relabel_sequential(np.where(drop[labels], 0, labels))
    return labels


def instance_type(
    labels: np.ndarray,
    type_prob: np.ndarray,
    *,
    ignore_class: int | None = 0,
    never_class: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Class of each instance by majority vote of the per-pixel argmax.

    A pixel votes for its most probable class. ``ignore_class`` (the no-label class 0) wins only
    when no pixel of the instance voted for another class. ``never_class`` takes no votes at all:
    each pixel votes for its most probable other class (nuclei: the instance map says what is a
    nucleus, the type map only which type). The probability is the mean probability of the
    winning class over the instance's pixels; with ``never_class`` it is the class's probability
    among the other classes (each pixel's ``p_class / sum of p over classes != never_class``), i.e.
    the confidence of the type given that the object is one.

    Parameters
    ----------
    labels : (H, W) int ndarray
        Instances 1..n (0 = background).
    type_prob : (C, H, W) uint8 or float ndarray
        Class probabilities on the same grid.
    ignore_class : int or None
        Class that loses every vote it does not win alone.
    never_class : int or None
        Class that is never the answer (no pixel votes for it).

    Returns
    -------
    class_id : (n,) int32 ndarray
        Entry ``i`` is the class of label ``i + 1``.
    probability : (n,) float32 ndarray
        Mean probability (0-1) of that class inside the instance (among the classes other than
        ``never_class`` when given: pixels where those are all 0 count as uniform); NaN for
        absent labels.

    Examples
    --------
    >>> lab = np.array([[1, 1, 1, 2]])
    >>> tp = np.zeros((3, 1, 4), np.uint8); tp[1, 0, :2] = 200; tp[2, 0, 2:] = 255
    >>> instance_type(lab, tp)[0]
    array([1, 2], dtype=int32)
    """
    type_prob = _validate_prob(type_prob, name="type_prob")
    labels = _validate_labels(labels, type_prob.shape[1:])
    n = int(labels.max(initial=0))
    c = type_prob.shape[0]
    if n == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.float32)
    if _compiled.available() and type_prob.dtype == np.uint8 and labels.ndim == 2:
        return _instance_type_compiled(labels, type_prob, n, ignore_class, never_class)
    fg = labels > 0
    lab = labels[fg].astype(np.int64)
    probs = type_prob[:, fg]  # (C, m)
    if never_class is not None and 0 <= never_class < c and c > 1:
        ballot = probs.astype(np.float32)
        ballot[never_class] = -1.0
        vote = np.argmax(ballot, axis=0)
    else:
        vote = np.argmax(probs, axis=0)
    counts = np.bincount(lab * c + vote, minlength=(n + 1) * c).reshape(n + 1, c)[1:]
    if ignore_class is not None and 0 <= ignore_class < c:
        others = counts.sum(axis=1) - counts[:, ignore_class]
        counts[others > 0, ignore_class] = -1
    winner = np.argmax(counts, axis=1).astype(np.int32)
    win_prob = probs[winner[lab - 1], np.arange(lab.size)].astype(np.float64)
    scale = _scale(type_prob)
    if never_class is not None and 0 <= never_class < c and c > 1:
        among = probs.sum(axis=0, dtype=np.float64) - probs[never_class]
        with np.errstate(invalid="ignore", divide="ignore"):
            win_prob = np.where(among > 0, win_prob / among, 1.0 / (c - 1))
        scale = 1.0
    sums = np.bincount(lab, weights=win_prob, minlength=n + 1)[1:]
    sizes = np.bincount(lab, minlength=n + 1)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (sums / sizes / scale).astype(np.float32)
    return winner, mean


def _instance_type_compiled(labels: np.ndarray, type_prob: np.ndarray, n: int, ignore_class: int | None,
                            never_class: int | None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`instance_type` of uint8 probabilities in two compiled passes (votes, then the
    winners' probabilities summed in the same order as ``np.bincount``): the same results."""
    c = type_prob.shape[0]
    never = never_class if never_class is not None and 0 <= never_class < c and c > 1 else -1
    counts = _compiled.type_votes(labels, type_prob, n, never)[1:]
    if ignore_class is not None and 0 <= ignore_class < c:
        others = counts.sum(axis=1) - counts[:, ignore_class]
        counts[others > 0, ignore_class] = -1
    winner = np.argmax(counts, axis=1).astype(np.int32)
    sums = _compiled.type_sums(labels, type_prob, winner, never)[1:]
    sizes = _sizes(labels, n + 1)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (sums / sizes / (1.0 if never >= 0 else _scale(type_prob))).astype(np.float32)
    return winner, mean


def label_to_3class(labels: np.ndarray, *, erosion_px: int = 1) -> np.ndarray:
    """Cerberus-style INST target from an instance label image.

    Each object is eroded by a ``(2 * erosion_px + 1)`` square (a pixel is interior when every
    pixel of that square carries its label); the removed pixels form the boundary band.

    Parameters
    ----------
    labels : (H, W) int ndarray
        Instances (0 = background).
    erosion_px : int
        Erosion radius: 1 for nuclei and lumen (3x3), 5 for glands (11x11) at 0.5 um/px.

    Returns
    -------
    prob : (3, H, W) uint8 ndarray
        One-hot background / interior / boundary as 0 or 255.

    Examples
    --------
    >>> lab = np.zeros((5, 5), np.int32); lab[1:4, 1:4] = 1
    >>> label_to_3class(lab)[1]
    array([[  0,   0,   0,   0,   0],
           [  0,   0,   0,   0,   0],
           [  0,   0, 255,   0,   0],
           [  0,   0,   0,   0,   0],
           [  0,   0,   0,   0,   0]], dtype=uint8)
    """
    labels = _validate_labels(labels)
    if erosion_px < 0:
        raise ValueError(f"erosion_px must be >= 0; got {erosion_px}")
    size = 2 * int(erosion_px) + 1
    lo = ndi.minimum_filter(labels, size=size, mode="constant", cval=0)
    hi = ndi.maximum_filter(labels, size=size, mode="constant", cval=0)
    fg = labels > 0
    interior = fg & (lo == hi)
    out = np.zeros((3,) + labels.shape, np.uint8)
    out[0][~fg] = 255
    out[1][interior] = 255
    out[2][fg & ~interior] = 255
    return out


def downsample_prob(prob: np.ndarray, factor: int) -> np.ndarray:
    """Area-average a (C, H, W) probability map by an integer factor, ignoring uncomputed pixels.

    Each output pixel is the mean over the computed input pixels (any channel non-zero) of its
    ``factor x factor`` block; blocks cut by the array edge average what they hold; blocks with no
    computed pixel are all zero (not computed).

    Parameters
    ----------
    prob : (C, H, W) uint8 or float ndarray
    factor : int
        Block size (>= 1).

    Returns
    -------
    out : (C, ceil(H / factor), ceil(W / factor)) ndarray of ``prob``'s dtype

    Examples
    --------
    >>> p = np.zeros((2, 2, 4), np.uint8); p[0, :, :2] = 255; p[1, :, :2] = 0; p[1, 0, 2] = 100
    >>> downsample_prob(p, 2)[:, 0]
    array([[255,   0],
           [  0, 100]], dtype=uint8)
    """
    prob = _validate_prob(prob)
    if int(factor) != factor or factor < 1:
        raise ValueError(f"factor must be a positive integer; got {factor}")
    factor = int(factor)
    if factor == 1:
        return prob
    if prob.dtype == np.uint8 and _compiled.available():
        return _compiled.block_means(prob, factor)
    c, h, w = prob.shape
    hh, ww = -(-h // factor), -(-w // factor)
    sums = np.zeros((c, hh, ww), np.float64)
    counts = np.zeros((hh, ww), np.int32)
    for dy in range(factor):  # one strided slice per block offset: an offset outside a cut block adds nothing
        for dx in range(factor):
            part = prob[:, dy::factor, dx::factor]
            ph, pw = part.shape[1:]
            sums[:, :ph, :pw] += part
            counts[:ph, :pw] += np.any(part > 0, axis=0)
    mean = sums / np.maximum(counts, 1)
    if prob.dtype == np.uint8:
        return np.rint(mean).astype(np.uint8)
    return mean.astype(prob.dtype)

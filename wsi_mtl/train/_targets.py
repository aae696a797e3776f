"""Training targets in the Cerberus convention, built from instance labels and centre points."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.morphology import h_maxima
from skimage.segmentation import watershed

__all__ = ["IGNORE", "FOREGROUND", "inst_targets", "binary_targets", "split_touching", "type_targets_from_points", "background_from_labels"]

#: Target value of a pixel that does not contribute to any loss.
IGNORE = 255
#: Target value of an INST pixel known to be foreground (interior or boundary, undecided).
FOREGROUND = 254


def inst_targets(labels: np.ndarray, *, erosion_px: int = 3) -> np.ndarray:
    """3-class INST target of an instance label map: 0 background, 1 eroded interior, 2 boundary band.

    A pixel is interior when every pixel of the ``erosion_px`` x ``erosion_px`` square around it
    belongs to the same object (so each object is eroded on its own and touching objects are
    separated by boundary); the rest of each object is boundary. Objects are not eroded at the
    array edge (they may continue outside a crop).

    Parameters
    ----------
    labels : (H, W) int ndarray
        Instance labels, 0 = background.
    erosion_px
        Odd side of the square structuring element (3 for nuclei and lumen, 11 for glands).

    Returns
    -------
    (H, W) uint8 ndarray

    Examples
    --------
    >>> lab = np.zeros((5, 5), int); lab[1:4, 1:4] = 7
    >>> inst_targets(lab, erosion_px=3)
    array([[0, 0, 0, 0, 0],
           [0, 2, 2, 2, 0],
           [0, 2, 1, 2, 0],
           [0, 2, 2, 2, 0],
           [0, 0, 0, 0, 0]], dtype=uint8)
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    if labels.dtype.kind not in "biu":
        raise TypeError(f"labels must be an integer array, got {labels.dtype}")
    if erosion_px < 1 or erosion_px % 2 == 0:
        raise ValueError(f"erosion_px must be a positive odd integer, got {erosion_px}")
    fg = labels > 0
    out = np.zeros(labels.shape, dtype=np.uint8)
    out[fg] = 2
    if erosion_px == 1:
        out[fg] = 1
        return out
    lab = labels.astype(np.int32, copy=False)
    hi = ndimage.maximum_filter(lab, size=erosion_px, mode="nearest")
    lo = ndimage.minimum_filter(lab, size=erosion_px, mode="nearest")
    out[fg & (hi == lab) & (lo == lab)] = 1
    return out


def binary_targets(mask: np.ndarray) -> np.ndarray:
    """INST target of a foreground-only mask: 0 background, :data:`FOREGROUND` where ``mask``.

    Used for images whose annotation does not separate touching objects: the loss then only asks
    for interior + boundary probability on foreground pixels.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    return np.where(mask > 0, FOREGROUND, 0).astype(np.uint8)


def split_touching(mask: np.ndarray, *, h: float = 0.5, sigma: float = 0.5) -> np.ndarray:
    """Instance labels from a foreground mask whose touching objects are not separated.

    Each pixel's distance to the background, smoothed by a Gaussian of ``sigma`` px, is flooded
    (watershed of the negated distance) from its h-maxima (``skimage.morphology.h_maxima``): a
    blob of two overlapping discs gets one marker per disc and splits at its neck, while a peak
    that rises less than ``h`` px above the saddle to a higher one marks nothing and is flooded
    from it. Marker-free blobs stay one object each.

    Parameters
    ----------
    mask : (H, W) bool or int ndarray
        Foreground (> 0).
    h, sigma
        Height of the distance maxima kept as markers and the smoothing, in pixels.

    Returns
    -------
    (H, W) int32 ndarray, 0 = background, objects 1..n

    Examples
    --------
    >>> yy, xx = np.mgrid[:15, :25]
    >>> two = ((yy - 7) ** 2 + (xx - 7) ** 2 < 36) | ((yy - 7) ** 2 + (xx - 17) ** 2 < 36)
    >>> int(ndimage.label(two)[1]), int(split_touching(two).max())
    (1, 2)
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    if h <= 0 or sigma < 0:
        raise ValueError(f"h must be > 0 and sigma >= 0, got h={h}, sigma={sigma}")
    fg = mask > 0
    dist = ndimage.distance_transform_edt(fg)
    if sigma > 0:
        dist = ndimage.gaussian_filter(dist, sigma)
    markers, _ = ndimage.label(h_maxima(dist, h).astype(bool) & fg)
    labels = watershed(-dist, markers, mask=fg).astype(np.int32)
    loose, n_loose = ndimage.label(fg & (labels == 0))
    if n_loose:
        labels = np.where(loose > 0, loose + labels.max(), labels).astype(np.int32)
    return labels


def background_from_labels(labels: np.ndarray) -> np.ndarray:
    """TYPE target from instance labels without classes: 0 on background, :data:`IGNORE` on objects."""
    return np.where(np.asarray(labels) > 0, IGNORE, 0).astype(np.uint8)


def type_targets_from_points(
    shape: tuple[int, int],
    points_yx: np.ndarray,
    classes: np.ndarray,
    *,
    radius_px: float = 4.0,
    background_px: float | None = 10.0,
) -> np.ndarray:
    """Per-pixel TYPE target from labelled nucleus centre points.

    A disk of ``radius_px`` around each point gets its class (``classes`` >= 1), or :data:`IGNORE`
    for a point without class (``classes`` <= 0); pixels farther than ``background_px`` from every
    point are background (0); the rest is :data:`IGNORE`. ``background_px=None`` leaves all
    non-disk pixels ignored. Where disks overlap, the nearest point wins.

    Parameters
    ----------
    shape
        (H, W) of the target.
    points_yx : (N, 2) float ndarray
        0-based (row, column) of the centres in target pixels.
    classes : (N,) int ndarray
        Class index of each point (1..C-1), <= 0 for "nucleus of unknown class".

    Examples
    --------
    >>> type_targets_from_points((1, 9), np.array([[0.0, 1.0]]), np.array([2]), radius_px=1, background_px=4)
    array([[  2,   2,   2, 255, 255, 255,   0,   0,   0]], dtype=uint8)
    """
    h, w = int(shape[0]), int(shape[1])
    points_yx = np.asarray(points_yx, float).reshape(-1, 2)
    classes = np.asarray(classes, int).ravel()
    if len(classes) != len(points_yx):
        raise ValueError(f"{len(points_yx)} points but {len(classes)} classes")
    out = np.full((h, w), IGNORE if background_px is not None else IGNORE, dtype=np.uint8)
    if len(points_yx) == 0:
        if background_px is not None:
            out[:] = 0
        return out
    seeds = np.zeros((h, w), dtype=np.int32)
    rc = np.clip(np.rint(points_yx).astype(int), 0, [h - 1, w - 1])
    seeds[rc[:, 0], rc[:, 1]] = np.arange(1, len(rc) + 1)
    dist, (iy, ix) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    nearest = seeds[iy, ix] - 1
    cls = np.where(classes > 0, classes, IGNORE).astype(np.uint8)
    disk = dist <= radius_px
    out[disk] = cls[nearest[disk]]
    if background_px is not None:
        out[dist > background_px] = 0
    return out

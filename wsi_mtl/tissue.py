"""Tissue mask of an H&E slide from a low-resolution thumbnail.

Tissue is what is stained: saturated and not white. The saturation threshold comes from Otsu's
method on the thumbnail, with a floor so that an all-background slide stays empty. An image with no
background (a tile that is tissue from edge to edge) has no mode for Otsu to split off: when that
pass finds nothing, faintly stained pixels in H&E hues count (pale stroma, fat, mucus), while
grey or tinted glass stays empty. Pen marks
(green/blue hues), black borders and dark debris are rejected, then the mask is closed, opened and
cleaned of specks smaller than ``min_tissue_um2``.

Examples
--------
>>> mask = TissueMask(mask=np.array([[False, True], [False, False]]), mpp=8.0)
>>> mask.fraction
0.25
>>> mask.any_in(0, 0, 16, 16, mpp=0.5), mask.any_in(0, 16, 16, 32, mpp=0.5)  # (y0, x0, y1, x1)
(False, True)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

if TYPE_CHECKING:
    from .slide import Slide

__all__ = ["TissueMask", "compute_tissue_mask", "tissue_mask_from_image", "boxes_on_grid"]

logger = logging.getLogger(__name__)

#: saturation below this is never tissue, whatever Otsu says (white/grey background, glass)
_MIN_SATURATION = 0.08
#: the Otsu threshold is not allowed above this (heavily stained slides still keep pale stroma)
_MAX_SATURATION = 0.25
#: pixels brighter than this in every channel are background
_WHITE_LEVEL = 225
#: pixels darker than this (max channel) are a black border, pen or debris
_BLACK_LEVEL = 50
#: saturation of faint tissue, used when Otsu's threshold finds none (an image with no background)
_FAINT_SATURATION = 0.03
#: hues (degrees) that count as faint H&E (from mucus blue-purple through pink to red)
_HE_HUES = (235.0, 15.0)
#: closing radius (um) of the faint pass: joins the membranes around fat cells into tissue
_FAT_CELL_UM = 48.0
#: hues (degrees) of green/blue pen ink (blue: green > red); H&E lies in roughly 240-360 and 0-40 degrees
_PEN_HUES = (65.0, 235.0)


@dataclass(frozen=True, eq=False)
class TissueMask:
    """A boolean tissue mask on the pixel grid at ``mpp`` (pixel (i, j) covers level-0
    [j * ds, (j + 1) * ds) x [i * ds, (i + 1) * ds) with ds = mpp / slide.mpp).

    Attributes
    ----------
    mask : (H, W) bool ndarray
        True where there is tissue.
    mpp : float
        Microns per mask pixel.
    threshold : float
        Saturation threshold used (0-1); NaN when not computed from an image.
    """

    mask: NDArray[np.bool_]
    mpp: float
    threshold: float = field(default=float("nan"))

    def __post_init__(self) -> None:
        mask = np.asarray(self.mask)
        if mask.ndim != 2:
            raise ValueError(f"tissue mask must be 2-D, got shape {mask.shape}")
        if not (math.isfinite(self.mpp) and self.mpp > 0):
            raise ValueError(f"tissue mask mpp must be positive, got {self.mpp}")
        object.__setattr__(self, "mask", mask.astype(bool, copy=False))

    @property
    def fraction(self) -> float:
        """Fraction of mask pixels that are tissue (0 for an empty mask)."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def empty(self) -> bool:
        """True when no pixel is tissue."""
        return not self.mask.any()

    def _window(self, y0: float, x0: float, y1: float, x1: float, mpp: float) -> tuple[int, int, int, int]:
        if not (math.isfinite(mpp) and mpp > 0):
            raise ValueError(f"mpp must be positive, got {mpp}")
        if y1 < y0 or x1 < x0:
            raise ValueError(f"region must have y1 >= y0 and x1 >= x0, got ({y0}, {x0}, {y1}, {x1})")
        s = mpp / self.mpp  # mask px per region px
        h, w = self.mask.shape
        eps = 1e-9
        return (max(0, math.floor(y0 * s + eps)), max(0, math.floor(x0 * s + eps)),
                min(h, math.ceil(y1 * s - eps)), min(w, math.ceil(x1 * s - eps)))

    def any_in(self, y0: float, x0: float, y1: float, x1: float, *, mpp: float) -> bool:
        """Does the half-open region [y0, y1) x [x0, x1), in px at ``mpp``, touch any tissue pixel?"""
        i0, j0, i1, j1 = self._window(y0, x0, y1, x1, mpp)
        return bool(i1 > i0 and j1 > j0 and self.mask[i0:i1, j0:j1].any())

    def fraction_in(self, y0: float, x0: float, y1: float, x1: float, *, mpp: float) -> float:
        """Fraction of the mask pixels touched by the region (px at ``mpp``) that are tissue."""
        i0, j0, i1, j1 = self._window(y0, x0, y1, x1, mpp)
        if i1 <= i0 or j1 <= j0:
            return 0.0
        return float(self.mask[i0:i1, j0:j1].mean())

    def at_mpp(self, mpp: float, *, shape: tuple[int, int] | None = None) -> NDArray[np.bool_]:
        """The mask resampled (nearest) to the pixel grid at ``mpp``.

        Parameters
        ----------
        mpp : float
            Target microns per pixel.
        shape : (height, width), optional
            Output shape; defaults to the mask's extent at ``mpp`` (rounded up).

        Returns
        -------
        mask : bool ndarray of ``shape``
            Pixel (i, j) is the mask pixel containing its centre (False outside the mask).
        """
        if not (math.isfinite(mpp) and mpp > 0):
            raise ValueError(f"mpp must be positive, got {mpp}")
        s = mpp / self.mpp
        h, w = self.mask.shape
        if shape is None:
            shape = (max(1, math.ceil(h / s - 1e-9)), max(1, math.ceil(w / s - 1e-9)))
        rows = np.floor((np.arange(shape[0]) + 0.5) * s).astype(np.int64)
        cols = np.floor((np.arange(shape[1]) + 0.5) * s).astype(np.int64)
        out = np.zeros(shape, bool)
        ri, ci = rows < h, cols < w
        out[np.ix_(ri, ci)] = self.mask[np.ix_(rows[ri], cols[ci])]
        return out


def _hsv(image: NDArray[np.uint8]) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32]]:
    """Hue (degrees), saturation and value (0-1) of an RGB uint8 image."""
    rgb = image.astype(np.float32) / 255.0
    cmax, cmin = rgb.max(axis=2), rgb.min(axis=2)
    delta = cmax - cmin
    sat = np.where(cmax > 0, delta / np.maximum(cmax, 1e-6), 0.0).astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.maximum(delta, 1e-6)
    hue = np.where(cmax == r, ((g - b) / safe) % 6, np.where(cmax == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60.0
    return hue.astype(np.float32), sat, cmax


def _otsu(values: NDArray[np.float32]) -> float:
    from skimage.filters import threshold_otsu

    if values.size == 0 or float(values.max() - values.min()) < 1e-6:
        return _MIN_SATURATION
    return float(threshold_otsu(values, nbins=256))


def tissue_mask_from_image(image: NDArray[np.uint8], *, mpp: float, min_tissue_um2: float = 10_000.0,
                           min_hole_um2: float = 2_000.0) -> TissueMask:
    """Tissue mask of an RGB thumbnail.

    Parameters
    ----------
    image : (H, W, 3) uint8 ndarray
        RGB thumbnail; white is background.
    mpp : float
        Microns per thumbnail pixel (sets the morphology scale).
    min_tissue_um2 : float
        Tissue pieces smaller than this area (um^2) are dropped as specks.
    min_hole_um2 : float
        Holes smaller than this inside tissue are filled.

    Returns
    -------
    TissueMask
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
    if not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be positive, got {mpp}")
    hue, sat, val = _hsv(image)
    # a light blur keeps JPEG chroma noise on glass from passing the threshold pixel by pixel
    sat = ndimage.gaussian_filter(sat, 1.0)
    rgb_min = image.min(axis=2)
    rgb_max = image.max(axis=2)
    usable = rgb_max >= _BLACK_LEVEL  # black borders, black pen and shadows are never tissue
    pen = (hue >= _PEN_HUES[0]) & (hue <= _PEN_HUES[1]) & (sat > 0.2)
    candidates = sat[usable & ~pen]
    threshold = float(np.clip(_otsu(candidates), _MIN_SATURATION, _MAX_SATURATION))
    tissue = _clean(usable & ~pen & (sat > threshold) & (rgb_min < _WHITE_LEVEL), mpp, min_tissue_um2, min_hole_um2)
    if not tissue.any():
        # no background mode to split from, Otsu cut inside the tissue: an image that is tissue from
        # edge to edge (pale stroma, fat, mucus). Faint H&E-coloured pixels count; glass stays empty.
        threshold = _FAINT_SATURATION
        speck_um2 = min(min_tissue_um2, 0.02 * image.shape[0] * image.shape[1] * mpp * mpp)  # a tile is small
        tissue = _clean(usable & _faint_he(image), mpp, speck_um2, min_hole_um2, close_um=_FAT_CELL_UM)
        logger.info("no tissue at Otsu's threshold; faint-tissue pass found %.1f%%", 100 * tissue.mean())
    logger.debug("tissue mask: saturation threshold %.3f, %.1f%% tissue", threshold, 100 * tissue.mean())
    return TissueMask(mask=tissue, mpp=float(mpp), threshold=threshold)


def _faint_he(image: NDArray[np.uint8]) -> NDArray[np.bool_]:
    """Pixels faintly stained in H&E hues (pink to purple, ~235-360 and 0-15 degrees) on a blurred image;
    grey, yellowish or bluish glass is not."""
    smooth = ndimage.gaussian_filter(image.astype(np.float32), (1.0, 1.0, 0.0))
    hue, sat, _ = _hsv(np.clip(smooth + 0.5, 0, 255).astype(np.uint8))
    return (sat > _FAINT_SATURATION) & ((hue >= _HE_HUES[0]) | (hue <= _HE_HUES[1]))


def _clean(tissue: NDArray[np.bool_], mpp: float, min_tissue_um2: float, min_hole_um2: float, *,
           close_um: float = 16.0) -> NDArray[np.bool_]:
    """Close (``close_um``: 16 um joins fragmented pale stroma), open, drop specks, fill small holes."""
    px_area = mpp * mpp
    radius = max(1, round(close_um / mpp))
    tissue = ndimage.binary_closing(np.pad(tissue, radius), _disk(radius))[radius:-radius, radius:-radius]
    tissue = ndimage.binary_opening(tissue, _disk(1))
    tissue = _remove_small(tissue, max(1, int(min_tissue_um2 / px_area)))
    holes = ~tissue
    tissue |= ~_remove_small(holes, max(1, int(min_hole_um2 / px_area)), keep_border=True)
    return tissue


def _disk(radius: int) -> NDArray[np.bool_]:
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return (yy * yy + xx * xx) <= radius * radius + radius * 0.5


def _remove_small(mask: NDArray[np.bool_], min_px: int, *, keep_border: bool = False) -> NDArray[np.bool_]:
    """Drop 8-connected components smaller than ``min_px`` (optionally keep those touching the border)."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_px
    keep[0] = False
    if keep_border:
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        keep[border[border > 0]] = True
    return keep[labels]


def boxes_on_grid(boxes: Iterable[tuple[float, float, float, float]], shape: tuple[int, int], ds: float) -> NDArray[np.bool_]:
    """A (H, W) mask of the grid pixels (``ds`` level-0 px each) whose centre lies in a level-0 box (x, y, w, h)."""
    out = np.zeros(shape, bool)
    h, w = shape
    for x, y, bw, bh in boxes:
        j0, i0 = math.ceil(x / ds - 0.5), math.ceil(y / ds - 0.5)
        j1, i1 = math.ceil((x + bw) / ds - 0.5), math.ceil((y + bh) / ds - 0.5)
        out[max(0, i0):min(h, i1), max(0, j0):min(w, j1)] = True
    return out


def compute_tissue_mask(slide: Slide, *, mask_mpp: float = 8.0, min_tissue_um2: float = 10_000.0) -> TissueMask:
    """Tissue mask of a slide from its thumbnail at ``mask_mpp``.

    Parameters
    ----------
    slide : Slide
        An open slide.
    mask_mpp : float
        Microns per mask pixel (coarse: 4-16 um is typical). Never finer than the slide itself.
    min_tissue_um2 : float
        Specks smaller than this (um^2) are dropped.

    Returns
    -------
    TissueMask
        Empty (``mask.any()`` is False) for an all-background slide; the caller decides whether
        that is an error. Tiles of the thumbnail's level that cannot be decoded count as tissue.
    """
    if not (isinstance(mask_mpp, (int, float)) and math.isfinite(mask_mpp) and mask_mpp > 0):
        raise ValueError(f"mask_mpp must be a positive number of microns per pixel, got {mask_mpp!r}")
    mask_mpp = max(float(mask_mpp), slide.mpp)
    damaged: list[tuple[int, int, int, int]] = []
    thumb = slide.thumbnail(mpp=mask_mpp, damaged=damaged)
    result = tissue_mask_from_image(thumb, mpp=mask_mpp, min_tissue_um2=min_tissue_um2)
    if damaged:  # unreadable in the thumbnail: counted as tissue, so that its tiles are tried and reported
        unknown = boxes_on_grid(damaged, result.mask.shape, mask_mpp / slide.mpp)
        result = TissueMask(mask=result.mask | unknown, mpp=result.mpp, threshold=result.threshold)
    logger.info("%s: %.1f%% tissue at %.3g um/px", slide.path.name, 100 * result.fraction, mask_mpp)
    return result

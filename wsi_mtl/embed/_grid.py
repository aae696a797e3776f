"""The patch grid of ``embed``: pure geometry, no I/O.

Patches are squares of ``patch_px`` pixels at the embedding resolution (``mpp``), their top-left
corners on a lattice of step ``stride_px`` starting at the slide's origin; the lattice covers the
whole slide (the last row and column may stick out and are read as white). A patch is kept when
the tissue mask covers more than ``min_tissue`` of it.

>>> g = PatchGrid(height=500, width=300, patch_px=224, stride_px=224)
>>> g.rows, g.cols
(3, 2)
>>> g.origin(4)
(224, 448)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = ["PatchGrid", "patch_table", "tissue_fractions"]


@dataclass(frozen=True)
class PatchGrid:
    """A lattice of patches over a ``height`` x ``width`` image (px at the embedding mpp)."""

    height: int
    width: int
    patch_px: int
    stride_px: int

    def __post_init__(self) -> None:
        if self.patch_px < 1 or self.stride_px < 1:
            raise ValueError("patch size and stride must be positive")

    def _count(self, extent: int) -> int:
        return max(1, math.ceil(max(0, extent - self.patch_px) / self.stride_px) + 1)

    @property
    def rows(self) -> int:
        return self._count(self.height)

    @property
    def cols(self) -> int:
        return self._count(self.width)

    def origin(self, index: int) -> tuple[int, int]:
        """(x, y) top-left of patch ``index`` (row-major) in px at the embedding mpp."""
        r, c = divmod(index, self.cols)
        return c * self.stride_px, r * self.stride_px

    def origins(self) -> np.ndarray:
        """All (x, y) top-lefts, row-major, as an (rows * cols) x 2 int64 array."""
        ys, xs = np.meshgrid(np.arange(self.rows) * self.stride_px, np.arange(self.cols) * self.stride_px, indexing="ij")
        return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)


def tissue_fractions(tissue: object, xy: np.ndarray, size: int, *, mpp: float) -> np.ndarray:
    """``tissue.fraction_in`` of every ``size`` px square with top-left ``xy`` (N x 2, px at ``mpp``),
    from a summed-area table of the mask (same windows and values, without a Python loop per patch)."""
    mask = np.asarray(tissue.mask, bool)  # type: ignore[attr-defined]
    s = mpp / float(tissue.mpp)  # type: ignore[attr-defined]
    h, w = mask.shape
    eps = 1e-9
    x, y = xy[:, 0].astype(np.float64), xy[:, 1].astype(np.float64)
    i0 = np.clip(np.floor(y * s + eps), 0, h).astype(np.int64)
    j0 = np.clip(np.floor(x * s + eps), 0, w).astype(np.int64)
    i1 = np.clip(np.ceil((y + size) * s - eps), 0, h).astype(np.int64)
    j1 = np.clip(np.ceil((x + size) * s - eps), 0, w).astype(np.int64)
    sat = np.zeros((h + 1, w + 1), np.int64)
    sat[1:, 1:] = mask.cumsum(0, dtype=np.int64).cumsum(1)
    count = sat[i1, j1] - sat[i0, j1] - sat[i1, j0] + sat[i0, j0]
    area = np.maximum(i1 - i0, 0) * np.maximum(j1 - j0, 0)
    return np.where(area > 0, count / np.maximum(area, 1), 0.0).astype(np.float32)


def patch_table(grid: PatchGrid, *, downsample: float, tissue: object | None, mpp: float, min_tissue: float) -> pd.DataFrame:
    """The kept patches: ``id``, ``x``, ``y``, ``width``, ``height`` (level-0 px), ``tissue_fraction``
    and ``gx``, ``gy`` (top-left at the embedding mpp, for reading).

    ``tissue`` is a :class:`wsi_mtl.tissue.TissueMask` (None keeps every patch, fraction 1).
    """
    xy = grid.origins()
    p = grid.patch_px
    if tissue is None:
        frac = np.ones(len(xy), np.float32)
    else:
        frac = tissue_fractions(tissue, xy, p, mpp=mpp)
    keep = np.ones(len(xy), bool) if tissue is None else frac > min_tissue
    xy, frac = xy[keep], frac[keep]
    size = int(round(p * downsample))
    return pd.DataFrame({
        "id": np.arange(len(xy), dtype=np.int64),
        "x": np.round(xy[:, 0] * downsample).astype(np.int64),
        "y": np.round(xy[:, 1] * downsample).astype(np.int64),
        "width": np.full(len(xy), size, np.int64),
        "height": np.full(len(xy), size, np.int64),
        "tissue_fraction": frac,
        "gx": xy[:, 0],
        "gy": xy[:, 1],
    })

"""The small reader interface every slide backend implements."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

__all__ = ["SlideReader", "NotMyFormat", "MppCandidate", "rgba_to_rgb", "plausible_mpp"]

#: (mpp_x, mpp_y, source) found in a file's metadata, in the reader's order of trust.
MppCandidate = tuple[float, float, str]


class NotMyFormat(Exception):
    """Raised by a reader's ``open`` when the file is not in a format it reads (try the next one)."""


def plausible_mpp(value: float | None) -> bool:
    """True for a finite microns-per-pixel in (0.01, 50) um; default print resolutions (72 dpi) are not."""
    return value is not None and math.isfinite(value) and 0.01 < value < 50.0


def rgba_to_rgb(rgba: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Composite straight (not premultiplied) RGBA onto white; alpha 0 becomes white.

    Examples
    --------
    >>> rgba_to_rgb(np.array([[[10, 20, 30, 0], [10, 20, 30, 255]]], np.uint8)).tolist()
    [[[255, 255, 255], [10, 20, 30]]]
    """
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha[..., None].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * a + 255.0 * (1.0 - a)
    return np.rint(rgb).astype(np.uint8)


class SlideReader(ABC):
    """One open slide file in one backend: geometry, metadata and level reads.

    Readers know nothing about target mpp or bounds; :class:`wsi_mtl.slide.Slide` does that on top.
    ``read_region`` must be safe to call from several threads at once.
    """

    #: backend name shown to users ("openslide", "tifffile", "pillow")
    backend: ClassVar[str]
    #: True when the format has real pyramid levels that make thumbnails cheap
    pyramidal: bool = True
    #: the reader's own tile decoder with its cache (a :class:`~wsi_mtl.slide._tiles.SegmentReader`), if it has one
    _tiles: Any = None

    def __init__(self, path: Path) -> None:
        self.path = path
        self.levels: list[tuple[int, int, float]] = []
        self.format: str = "unknown"
        self.vendor: str | None = None
        self.properties: dict[str, str] = {}
        self.associated_images: list[str] = []
        self.bounds: tuple[int, int, int, int] | None = None
        self.mpp_candidates: list[MppCandidate] = []
        self.objective_power: float | None = None
        #: what decodes the pixels ("openslide", "tifffile-tiles", "tifffile-zarr", "pillow")
        self.decoder: str = self.backend

    @classmethod
    @abstractmethod
    def open(cls, path: Path) -> SlideReader:
        """Open ``path``; raise :class:`NotMyFormat` if this backend does not read it, or a
        :class:`wsi_mtl.errors.SlideError` if it does but the file is broken."""

    @property
    def shape(self) -> tuple[int, int]:
        """Level-0 (height, width) of the whole image (ignoring bounds)."""
        w, h, _ = self.levels[0]
        return h, w

    @abstractmethod
    def read_region(self, level: int, y: int, x: int, height: int, width: int) -> NDArray[np.uint8]:
        """Pixels of ``level`` at level coordinates [y, y + height) x [x, x + width) as (h, w, 3) uint8.

        Any position is allowed: pixels outside the level are white. A decode failure raises
        :class:`wsi_mtl.errors.DamagedRegionError` and leaves the reader usable.
        """

    def limit_cache(self, nbytes: int) -> None:
        """Keep at most ``nbytes`` of decoded tiles in the cache of the reader's own tile decoder
        (``_tiles``), where it has one."""
        if self._tiles is not None:
            self._tiles.limit_cache(nbytes)

    def plan_reads(self, level: int, boxes: list[tuple[int, int, int, int]]) -> None:
        """Announce reads to come (``level`` px: y, x, height, width) to the reader's own tile
        decoder, where it has one, so that its cache keeps what they share."""
        if self._tiles is not None:
            self._tiles.plan_reads(level, boxes)

    def close(self) -> None:  # noqa: B027 - optional for readers without resources
        """Release file handles."""

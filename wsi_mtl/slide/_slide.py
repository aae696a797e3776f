"""``open_slide`` and :class:`Slide`: one slide read at any target mpp in bounds coordinates."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from ..errors import (
    DamagedRegionError,
    InputError,
    MissingMppError,
    SlideError,
    UnsupportedSlideError,
)
from ._base import NotMyFormat, SlideReader, plausible_mpp
from ._reduce import reduce_rgb

__all__ = ["Slide", "open_slide", "SUPPORTED_FORMATS"]

logger = logging.getLogger(__name__)

SUPPORTED_FORMATS = (
    "Aperio SVS (JPEG, JPEG 2000), Hamamatsu NDPI/VMS, MIRAX MRXS, Leica SCN, Philips TIFF, Ventana BIF, "
    "DICOM, generic tiled TIFF, OME-TIFF, plain TIFF, PNG, JPEG"
)

#: a pyramid level is usable when its downsample exceeds the target by at most this fraction
_LEVEL_TOLERANCE = 0.01
#: thumbnails of non-pyramidal slides are read in bands of about this many source pixels
_BAND_PIXELS = 32 * 2**20


def _reader_classes() -> list[type[SlideReader]]:
    from ._image import PillowReader
    from ._openslide import OpenSlideReader
    from ._tiff import TiffReader

    return [OpenSlideReader, TiffReader, PillowReader]


def _prefers_tifffile(path: Path) -> bool:
    """OME-TIFF goes to tifffile first: OpenSlide would read it as generic TIFF without OME metadata."""
    from ._tiff import is_ome_tiff

    return is_ome_tiff(path)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise SlideError(f"slide not found: {path}")
    if path.is_dir():
        raise SlideError(f"{path} is a directory, not a slide file")
    if not os.access(path, os.R_OK):
        raise SlideError(f"cannot read {path}: permission denied")
    if path.stat().st_size == 0:
        raise SlideError(f"{path} is empty (0 bytes)")


def _resolve_mpp(reader: SlideReader, override: float | None) -> tuple[float, str]:
    if override is not None:
        return override, "override"
    for mpp_x, mpp_y, source in reader.mpp_candidates:
        if plausible_mpp(mpp_x) and plausible_mpp(mpp_y):
            if abs(mpp_x - mpp_y) > 0.01 * max(mpp_x, mpp_y):
                logger.warning("%s has non-square pixels (mpp x %.4g, y %.4g); using their mean", reader.path.name, mpp_x, mpp_y)
            return (mpp_x + mpp_y) / 2, source
        logger.debug("ignoring implausible mpp %s x %s from %s", mpp_x, mpp_y, source)
    power = reader.objective_power
    if power is not None and math.isfinite(power) and power > 0:
        mpp = 10.0 / power
        logger.warning("%s has no microns-per-pixel in its metadata; assuming %.4g um/px from objective power %gx "
                       "(pass --mpp to set it)", reader.path.name, mpp, power)
        return mpp, "objective-power"
    raise MissingMppError(f"{reader.path} has no microns-per-pixel in its metadata; pass --mpp")


def _validate_mpp_override(mpp: float | None) -> float | None:
    if mpp is None:
        return None
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        raise InputError(f"mpp must be a number of microns per pixel, got {mpp!r}") from None
    if not plausible_mpp(value):
        raise InputError(f"mpp must be between 0.01 and 50 microns per pixel, got {mpp}")
    return value


_BACKENDS = ("openslide", "tifffile", "pillow")


def open_slide(path: str | os.PathLike, *, mpp: float | None = None, backend: str | None = None) -> Slide:
    """Open a whole-slide image (or a plain image) with the first backend that reads it.

    Parameters
    ----------
    path : path-like
        Slide file.
    mpp : float, optional
        Microns per pixel at level 0; overrides the metadata (``mpp_source == "override"``).
    backend : {"openslide", "tifffile", "pillow"}, optional
        Use only this backend; by default they are tried in that order (OME-TIFF: tifffile first).

    Returns
    -------
    slide : Slide

    Raises
    ------
    SlideError
        Missing, a directory, empty, unreadable, truncated.
    UnsupportedSlideError
        No backend reads the file.
    MissingMppError
        Neither metadata nor ``mpp`` gives microns per pixel.
    InputError
        ``mpp`` is not a plausible positive number.
    """
    path = Path(path)
    override = _validate_mpp_override(mpp)
    if backend is not None and backend not in _BACKENDS:
        raise InputError(f"backend must be one of {', '.join(_BACKENDS)}, got {backend!r}")
    _check_file(path)
    classes = _reader_classes()
    if backend is not None:
        classes = [c for c in classes if c.backend == backend]
    elif _prefers_tifffile(path):
        classes.sort(key=lambda c: c.backend != "tifffile")
    reader: SlideReader | None = None
    for cls in classes:
        try:
            reader = cls.open(path)
            break
        except NotMyFormat:
            logger.debug("%s: not a %s file", path, cls.backend)
    if reader is None:
        if backend is not None:
            raise UnsupportedSlideError(f"{path} cannot be read by the {backend} backend")
        raise UnsupportedSlideError(f"{path} is not a slide format wsimtl reads (supported: {SUPPORTED_FORMATS})")
    try:
        return Slide(reader, mpp=override)
    except BaseException:
        reader.close()
        raise


class Slide:
    """An open slide: level-0 geometry inside the bounds, mpp with its source, reads at any mpp.

    Use :func:`open_slide` to create one. ``read`` and ``thumbnail`` may be called from several
    threads at once. Use as a context manager or call :meth:`close`.

    Attributes
    ----------
    path : Path
    width, height : int
        Level-0 size in px (the bounds size where the format has bounds).
    mpp : float
        Microns per level-0 pixel.
    mpp_source : str
        "openslide", "tiff-resolution", "ome", "aperio" (ImageDescription read by tifffile),
        "image-resolution" (PNG/JPEG dpi), "objective-power" (10 / power, with a warning) or "override".
    backend : str
        "openslide", "tifffile" or "pillow": who parsed the format and its metadata.
    decoder : str
        What decodes the pixels: "openslide", "tifffile-tiles" (direct tile decoding, also used under
        OpenSlide for Aperio and generic TIFF, where it is several times faster), "tifffile-zarr", "pillow".
    vendor : str or None
        Format vendor as OpenSlide names it ("aperio", "hamamatsu", "mirax", ...), "ome-tiff", "tiff" or
        the image format ("png", "jpeg").
    objective_power : float or None
    offset : (int, int)
        Level-0 (x, y) of the bounds' top-left in the file; added to every read.
    levels : list of (width, height, downsample)
        Pyramid levels of the file, largest first.
    """

    def __init__(self, reader: SlideReader, *, mpp: float | None = None) -> None:
        self._reader = reader
        self.path = reader.path
        self.backend = reader.backend
        self.decoder = reader.decoder
        self.vendor = reader.vendor
        self.objective_power = reader.objective_power
        self.levels = list(reader.levels)
        full_w, full_h, _ = self.levels[0]
        if reader.bounds is not None:
            bx, by, bw, bh = reader.bounds
            self.offset = (bx, by)
            self.width, self.height = bw, bh
        else:
            self.offset = (0, 0)
            self.width, self.height = full_w, full_h
        if self.width <= 0 or self.height <= 0:
            raise SlideError(f"{self.path} has an empty image ({self.width} x {self.height} px)")
        self.mpp, self.mpp_source = _resolve_mpp(reader, mpp)
        self._closed = False

    # -- geometry -----------------------------------------------------------------------------
    def best_level(self, downsample: float) -> int:
        """Index of the level with the largest downsample <= ``downsample`` (1% tolerance)."""
        best = 0
        for i, (_, _, ds) in enumerate(self.levels):
            if ds <= downsample * (1 + _LEVEL_TOLERANCE) and ds > self.levels[best][2]:
                best = i
        return best

    def size_at(self, mpp: float) -> tuple[int, int]:
        """(height, width) in px of the whole slide at ``mpp`` (rounded up)."""
        mpp = self._check_mpp(mpp)
        scale = self.mpp / mpp
        return max(1, math.ceil(self.height * scale - 1e-6)), max(1, math.ceil(self.width * scale - 1e-6))

    def _check_mpp(self, mpp: float) -> float:
        if isinstance(mpp, bool) or not isinstance(mpp, (int, float, np.floating, np.integer)) \
                or not math.isfinite(float(mpp)) or float(mpp) <= 0:
            raise ValueError(f"mpp must be a positive number of microns per pixel, got {mpp!r}")
        return float(mpp)

    # -- reading ------------------------------------------------------------------------------
    def read(self, x: int, y: int, width: int, height: int, *, mpp: float) -> NDArray[np.uint8]:
        """Read a region on the pixel grid at ``mpp``.

        Parameters
        ----------
        x, y : int
            Top-left of the region in px at ``mpp`` (level-0 = x * mpp / slide.mpp, from the bounds' origin).
        width, height : int
            Region size in px at ``mpp`` (> 0).
        mpp : float
            Target microns per pixel.

        Returns
        -------
        region : (height, width, 3) uint8 ndarray
            RGB; outside the slide (or its bounds) and transparent pixels are white.

        Raises
        ------
        DamagedRegionError
            The region's pixels cannot be decoded; the slide stays usable for other regions.
        """
        if self._closed:
            raise ValueError(f"{self.path} is closed")
        mpp = self._check_mpp(mpp)
        for name, value in (("x", x), ("y", y), ("width", width), ("height", height)):
            if not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
        if width <= 0 or height <= 0:
            raise ValueError(f"region size must be positive, got {width} x {height}")
        ds = mpp / self.mpp
        out = np.full((height, width, 3), 255, np.uint8)
        inside = self._inside(x, y, width, height, ds)
        if inside is None:
            return out
        i0, i1, j0, j1 = inside
        try:
            out[i0:i1, j0:j1] = self._read_inside(x + j0, y + i0, j1 - j0, i1 - i0, ds)
        except DamagedRegionError as exc:
            if exc.image is not None:
                out[i0:i1, j0:j1] = exc.image
                raise DamagedRegionError(
                    f"{self.path.name}: {len(exc.boxes)} damaged tile(s) in region x={round(x * ds)}, y={round(y * ds)}, "
                    f"w={round(width * ds)}, h={round(height * ds)} (level-0 px) left white: {exc}",
                    image=out, boxes=exc.boxes, reasons=exc.reasons) from exc
            raise DamagedRegionError(
                f"{self.path.name}: region x={round(x * ds)}, y={round(y * ds)}, w={round(width * ds)}, h={round(height * ds)} "
                f"(level-0 px) cannot be decoded: {exc}") from exc
        return out

    def plan_reads(self, regions: Iterable[tuple[int, int, int, int]], *, mpp: float) -> None:
        """Announce the reads to come (``x, y, width, height`` at ``mpp``, as :meth:`read` takes them):
        readers that cache decoded tiles then keep a tile until the last of these reads that needs it,
        and do not keep tiles only one of them needs (memory for what neighbouring reads share, not
        for all the cache could hold)."""
        ds = self._check_mpp(mpp) / self.mpp
        by_level: dict[int, list[tuple[int, int, int, int]]] = {}
        for x, y, width, height in regions:
            inside = self._inside(x, y, width, height, ds)
            if inside is not None:
                i0, i1, j0, j1 = inside
                level, ly, lx, lh, lw, _ = self._level_box(x + j0, y + i0, j1 - j0, i1 - i0, ds)
                by_level.setdefault(level, []).append((ly, lx, lh, lw))
        for level, boxes in by_level.items():
            self._reader.plan_reads(level, boxes)

    def _inside(self, x: int, y: int, width: int, height: int, ds: float) -> tuple[int, int, int, int] | None:
        """The rows and columns (i0, i1, j0, j1) of a region at downsample ``ds`` whose pixel centres
        lie inside the slide (bounds); None where none does."""
        j0 = max(0, math.ceil(-x - 0.5))
        j1 = min(width, math.ceil(self.width / ds - x - 0.5))
        i0 = max(0, math.ceil(-y - 0.5))
        i1 = min(height, math.ceil(self.height / ds - y - 0.5))
        return None if j1 <= j0 or i1 <= i0 else (i0, i1, j0, j1)

    def _level_box(self, x: int, y: int, width: int, height: int,
                   ds: float) -> tuple[int, int, int, int, int, tuple[float, float, float, float] | None]:
        """Where a region inside the slide is read: level, y, x, height, width in its pixels, and the
        continuous box to resample within them (None: the same resolution, a plain crop)."""
        level = self.best_level(ds)
        lds = self.levels[level][2]
        ratio = ds / lds
        ox, oy = self.offset
        lx0, ly0 = (ox + x * ds) / lds, (oy + y * ds) / lds
        lx1, ly1 = lx0 + width * ratio, ly0 + height * ratio
        if abs(ratio - 1) * max(width, height) < 0.5:
            # same resolution as the level (within half a pixel over the region): plain crop
            return level, round(ly0), round(lx0), height, width, None
        # integer source box covering the continuous one; the reader pads white outside the level
        ix0, iy0 = math.floor(lx0 + 1e-6), math.floor(ly0 + 1e-6)
        ix1, iy1 = max(math.ceil(lx1 - 1e-6), ix0 + 1), max(math.ceil(ly1 - 1e-6), iy0 + 1)
        return level, iy0, ix0, iy1 - iy0, ix1 - ix0, (lx0 - ix0, ly0 - iy0, lx1 - ix0, ly1 - iy0)

    def _read_inside(self, x: int, y: int, width: int, height: int, ds: float) -> NDArray[np.uint8]:
        """Read a region that lies inside the slide (centres of all its pixels are in bounds)."""
        level, ly, lx, lh, lw, box = self._level_box(x, y, width, height, ds)
        if box is None:
            return self._level_read(level, ly, lx, lh, lw, lambda src: src)
        ratio = ds / self.levels[level][2]
        return self._level_read(level, ly, lx, lh, lw, lambda src: _resample(src, width, height, box, ratio))

    def _level_read(self, level: int, y: int, x: int, height: int, width: int,
                    finish: Callable[[NDArray[np.uint8]], NDArray[np.uint8]]) -> NDArray[np.uint8]:
        """``finish(reader.read_region(...))``; a partly damaged read is finished too and re-raised
        with its damaged boxes in level-0 px of the slide (from its bounds' origin)."""
        try:
            return finish(self._reader.read_region(level, y, x, height, width))
        except DamagedRegionError as exc:
            if exc.image is None:
                raise
            lds = self.levels[level][2]
            ox, oy = self.offset
            boxes = []
            for bx, by, bw, bh in exc.boxes:
                x0, y0 = math.floor(bx * lds) - ox, math.floor(by * lds) - oy
                x1, y1 = math.ceil((bx + bw) * lds) - ox, math.ceil((by + bh) * lds) - oy
                boxes.append((x0, y0, x1 - x0, y1 - y0))
            raise DamagedRegionError(str(exc), image=finish(exc.image), boxes=boxes, reasons=exc.reasons) from exc

    def thumbnail(self, *, mpp: float, damaged: list[tuple[int, int, int, int]] | None = None) -> NDArray[np.uint8]:
        """The whole slide at ``mpp`` (from the coarsest suitable level; banded for flat images).

        Damaged tiles under a readable rest are left white and their level-0 boxes (x, y, w, h)
        appended to ``damaged`` when given.

        Returns
        -------
        image : (ceil(height * slide.mpp / mpp), ceil(width * slide.mpp / mpp), 3) uint8 ndarray
        """
        h, w = self.size_at(mpp)
        ds = mpp / self.mpp
        level_width, _, lds = self.levels[self.best_level(ds)]
        source_px_per_row = max(1.0, level_width * ds / lds)  # source pixels behind one output row
        band = max(1, int(_BAND_PIXELS / source_px_per_row))
        if band >= h:
            return self._read_lenient(0, 0, w, h, mpp, damaged)
        out = np.empty((h, w, 3), np.uint8)
        for y in range(0, h, band):
            out[y:y + band] = self._read_lenient(0, y, w, min(band, h - y), mpp, damaged)
        return out

    def _read_lenient(self, x: int, y: int, width: int, height: int, mpp: float,
                      damaged: list[tuple[int, int, int, int]] | None) -> NDArray[np.uint8]:
        """:meth:`read`, with damaged tiles left white when the rest of the region is readable."""
        try:
            return self.read(x, y, width, height, mpp=mpp)
        except DamagedRegionError as exc:
            if exc.image is None:
                raise
            logger.info("%s", exc)
            if damaged is not None:
                damaged.extend(exc.boxes)
            return exc.image

    # -- metadata -----------------------------------------------------------------------------
    @property
    def associated_images(self) -> list[str]:
        """Names of the associated images (label, macro, thumbnail, ...)."""
        return list(self._reader.associated_images)

    @property
    def properties(self) -> dict[str, str]:
        """Raw metadata properties from the backend."""
        return dict(self._reader.properties)

    def info(self) -> dict[str, Any]:
        """Everything ``wsimtl info`` shows, JSON-serialisable."""
        return {
            "path": str(self.path),
            "format": self._reader.format,
            "backend": self.backend,
            "decoder": self._reader.decoder,
            "vendor": self.vendor,
            "width": self.width,
            "height": self.height,
            "offset": list(self.offset),
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "objective_power": self.objective_power,
            "levels": [{"width": w, "height": h, "downsample": d} for w, h, d in self.levels],
            "associated_images": self.associated_images,
            "size_um": [self.width * self.mpp, self.height * self.mpp],
        }

    def limit_tile_cache(self, nbytes: int) -> None:
        """Keep at most ``nbytes`` of decoded tiles in memory from now on (readers that cache decoded
        tiles keep up to 256 MB by default: worth it where neighbouring reads share tiles, memory that
        grows with the slide where they do not)."""
        self._reader.limit_cache(nbytes)

    def close(self) -> None:
        """Release the file handles; later reads raise ``ValueError``."""
        if not self._closed:
            self._closed = True
            self._reader.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Slide({str(self.path)!r}, {self.width}x{self.height} px, mpp={self.mpp:.4g} ({self.mpp_source}), "
                f"backend={self.backend!r}, levels={len(self.levels)})")


def _resample(src: NDArray[np.uint8], width: int, height: int, box: tuple[float, float, float, float],
              ratio: float) -> NDArray[np.uint8]:
    """Resample ``src`` (h, w, 3) so that ``box`` (x0, y0, x1, y1 in src px) fills (height, width).

    Downsampling averages areas (box filter: every source pixel counts by its overlap); upsampling
    interpolates bilinearly.
    """
    if ratio > 1:
        k = int(round(ratio))
        if abs(ratio - k) < 1e-9 and all(abs(v - round(v)) < 1e-6 for v in box[:2]) \
                and src.shape[1] >= round(box[0]) + width * k and src.shape[0] >= round(box[1]) + height * k:
            x0, y0 = round(box[0]), round(box[1])
            return reduce_rgb(src, k, (x0, y0, x0 + width * k, y0 + height * k))  # no crop copy
        return np.asarray(Image.fromarray(src).resize((width, height), Image.Resampling.BOX, box=box))
    return np.asarray(Image.fromarray(src).resize((width, height), Image.Resampling.BILINEAR, box=box))

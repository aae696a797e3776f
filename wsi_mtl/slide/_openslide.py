"""OpenSlide backend: Aperio SVS, Hamamatsu NDPI, MIRAX, Leica SCN, Philips TIFF, generic tiled TIFF."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from ..errors import DamagedRegionError, SlideError
from ._base import NotMyFormat, SlideReader, rgba_to_rgb

__all__ = ["OpenSlideReader"]

logger = logging.getLogger(__name__)


def _float(props: dict[str, str], key: str) -> float | None:
    try:
        return float(props[key])
    except (KeyError, ValueError):
        return None


class OpenSlideReader(SlideReader):
    """Reader over an ``openslide.OpenSlide`` handle.

    OpenSlide handles are thread-safe, but after a decode error a handle stays in an error state;
    the reader then opens a fresh handle (once per failure) so later reads work.
    """

    backend = "openslide"

    #: vendors whose pyramid levels are plain TIFF pages that tifffile decodes faster
    _DIRECT_VENDORS = ("aperio", "generic-tiff")

    def __init__(self, path: Path, handle, *, direct: bool = True) -> None:  # noqa: ANN001 - openslide.OpenSlide
        super().__init__(path)
        self._handle = handle
        self._generation = 0
        self._lock = threading.Lock()
        self._users: dict[int, int] = {}  # id(handle) -> threads reading through it
        self._retired: list[object] = []  # replaced handles still in use by some thread
        props = dict(handle.properties)
        self.properties = props
        self.format = props.get("openslide.vendor", "unknown")
        self.vendor = self.format
        self.levels = [(int(w), int(h), float(d)) for (w, h), d in zip(handle.level_dimensions, handle.level_downsamples)]
        self.associated_images = sorted(handle.associated_images)
        bx, by = _float(props, "openslide.bounds-x"), _float(props, "openslide.bounds-y")
        bw, bh = _float(props, "openslide.bounds-width"), _float(props, "openslide.bounds-height")
        if None not in (bx, by, bw, bh):
            self.bounds = (int(bx), int(by), int(bw), int(bh))
        mx, my = _float(props, "openslide.mpp-x"), _float(props, "openslide.mpp-y")
        if mx is not None or my is not None:
            self.mpp_candidates.append((mx or my, my or mx, "openslide"))
        res = _tiff_resolution_mpp(props)
        if res is not None:
            self.mpp_candidates.append((res[0], res[1], "tiff-resolution"))
        self.objective_power = _float(props, "openslide.objective-power")
        self._tiff = self._tiles = None
        self.decoder = "openslide"
        if direct and self.vendor in self._DIRECT_VENDORS:
            from ._tiles import open_matching_levels

            found = open_matching_levels(path, [(w, h) for w, h, _ in self.levels])
            if found is not None:
                self._tiff, self._tiles = found
                self.decoder = "tifffile-tiles"
                if self._tiles.truncated():
                    self.close()
                    raise SlideError(f"{path} is truncated: image data ends beyond the end of the file")

    @classmethod
    def open(cls, path: Path, *, direct: bool = True) -> OpenSlideReader:
        import openslide

        try:
            vendor = openslide.OpenSlide.detect_format(str(path))
        except openslide.OpenSlideError:
            vendor = None
        if vendor is None:
            raise NotMyFormat(path)
        try:
            handle = openslide.OpenSlide(str(path))
        except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError) as exc:
            if vendor == "generic-tiff":
                raise NotMyFormat(path) from exc  # let tifffile try (e.g. a stripped or odd TIFF)
            raise SlideError(f"{path} looks like a {vendor} slide but cannot be opened (truncated or damaged?): {exc}") from exc
        return cls(path, handle, direct=direct)

    def _acquire(self) -> tuple[object, int]:
        """The current handle and its generation, counted as in use until :meth:`_release`."""
        with self._lock:
            if self._handle is None:
                raise ValueError(f"{self.path} is closed")
            handle = self._handle
            self._users[id(handle)] = self._users.get(id(handle), 0) + 1
            return handle, self._generation

    def _release(self, handle: object) -> None:
        with self._lock:
            left = self._users[id(handle)] - 1
            if left:
                self._users[id(handle)] = left
                return
            del self._users[id(handle)]
            if handle in self._retired:  # replaced while this thread used it: now nobody does
                self._retired.remove(handle)
                _close_quietly(handle)

    def _reopen(self, generation: int) -> None:
        """Replace the handle after a decode error; the old one closes once no thread uses it."""
        import openslide

        with self._lock:
            if generation != self._generation or self._handle is None:
                return  # another thread already reopened (or the reader was closed)
            old = self._handle
            try:
                self._handle = openslide.OpenSlide(str(self.path))
            except openslide.OpenSlideError as exc:  # pragma: no cover - file vanished meanwhile
                logger.error("cannot reopen %s after a decode error: %s", self.path, exc)
                return
            self._generation += 1
            if self._users.get(id(old)):
                self._retired.append(old)  # closing it under a reading thread would crash
            else:
                _close_quietly(old)

    def read_region(self, level: int, y: int, x: int, height: int, width: int) -> NDArray[np.uint8]:
        import openslide

        if self._tiles is not None:
            return self._tiles.read(level, y, x, height, width)
        ds = self.levels[level][2]
        location = (int(round(x * ds)), int(round(y * ds)))
        # A failed read leaves the shared handle in an error state, possibly because of another
        # thread's damaged region. Replace the shared handle, then decide on a private fresh handle
        # (which no other thread can poison): if that fails too, the damage is in this region.
        handle, generation = self._acquire()
        try:
            return rgba_to_rgb(np.asarray(handle.read_region(location, level, (int(width), int(height)))))
        except openslide.OpenSlideError:
            self._reopen(generation)
        finally:
            self._release(handle)
        private = openslide.OpenSlide(str(self.path))
        try:
            return rgba_to_rgb(np.asarray(private.read_region(location, level, (int(width), int(height)))))
        except openslide.OpenSlideError as exc:
            raise DamagedRegionError(str(exc)) from exc
        finally:
            _close_quietly(private)

    def close(self) -> None:
        with self._lock:
            if self._handle is not None:
                _close_quietly(self._handle)
                self._handle = None
            for handle in self._retired:
                _close_quietly(handle)
            self._retired.clear()
            if self._tiles is not None:
                self._tiles.close()
                self._tiff.close()
                self._tiles = None


def _close_quietly(handle: object) -> None:
    try:
        handle.close()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - an errored handle may fail to close; nothing to recover
        logger.debug("closing an OpenSlide handle failed", exc_info=True)


def _tiff_resolution_mpp(props: dict[str, str]) -> tuple[float, float] | None:
    """mpp from the ``tiff.XResolution``/``tiff.ResolutionUnit`` properties OpenSlide exposes."""
    unit = props.get("tiff.ResolutionUnit", "").lower()
    factor = {"centimeter": 1e4, "inch": 25400.0}.get(unit)
    xr, yr = _float(props, "tiff.XResolution"), _float(props, "tiff.YResolution")
    if factor is None or not xr:
        return None
    yr = yr or xr
    return factor / xr, factor / yr

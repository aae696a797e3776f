"""tifffile backend: OME-TIFF and TIFFs OpenSlide does not read (stripped, SubIFD pyramids, planar)."""

from __future__ import annotations

import contextlib
import logging
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..errors import DamagedRegionError, SlideError, UnsupportedSlideError
from ._base import NotMyFormat, SlideReader, rgba_to_rgb
from ._tiles import SegmentReader, make_strict, segment_readable

__all__ = ["TiffReader", "is_ome_tiff"]

logger = logging.getLogger(__name__)

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_UNIT_TO_UM = {"pm": 1e-6, "nm": 1e-3, "µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6,
               "Å": 1e-4, "\u212b": 1e-4}


def _has_tiff_magic(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) in _TIFF_MAGIC


def ifd_chain_broken(path: Path, *, max_ifds: int = 100_000) -> bool:
    """True if the TIFF's chain of image directories points beyond the end of the file (truncated).

    Walks the IFD offsets only (classic TIFF and BigTIFF), reading a few bytes per directory.
    """
    import struct

    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(16)
        if len(head) < 8 or head[:4] not in _TIFF_MAGIC:
            return False
        order = "<" if head[:2] == b"II" else ">"
        big = head[2:4] in (b"+\x00", b"\x00+")
        if big:
            if len(head) < 16:
                return True
            offset = struct.unpack(order + "Q", head[8:16])[0]
            count_fmt, count_size, entry_size, next_fmt, next_size = "Q", 8, 20, "Q", 8
        else:
            offset = struct.unpack(order + "I", head[4:8])[0]
            count_fmt, count_size, entry_size, next_fmt, next_size = "H", 2, 12, "I", 4
        seen = set()
        while offset and len(seen) < max_ifds:
            if offset in seen:
                return False  # a loop is damage of another kind; tifffile reports it
            seen.add(offset)
            if offset + count_size > size:
                return True
            fh.seek(offset)
            count = struct.unpack(order + count_fmt, fh.read(count_size))[0]
            end = offset + count_size + count * entry_size
            if end + next_size > size:
                return True
            fh.seek(end)
            offset = struct.unpack(order + next_fmt, fh.read(next_size))[0]
    return False


def is_ome_tiff(path: Path) -> bool:
    """True if ``path`` is a TIFF whose first ImageDescription is OME-XML (cheap: reads one IFD)."""
    import tifffile

    try:
        if not _has_tiff_magic(path):
            return False
        with _quiet_tifffile(), tifffile.TiffFile(path) as tif:
            return bool(tif.is_ome)
    except Exception:  # noqa: BLE001 - any parse failure means "not an OME-TIFF we prefer"
        return False


def _ome_metadata(xml: str) -> tuple[tuple[float, float] | None, float | None]:
    """(mpp_x, mpp_y) in um and the objective's nominal magnification from OME-XML."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None, None
    mpp = None
    power = None
    for elem in root.iter():
        tag = elem.tag.rsplit("}", 1)[-1]
        if tag == "Pixels" and mpp is None and "PhysicalSizeX" in elem.attrib:
            try:
                sx = float(elem.attrib["PhysicalSizeX"]) * _UNIT_TO_UM[elem.attrib.get("PhysicalSizeXUnit", "µm")]
                sy = float(elem.attrib.get("PhysicalSizeY", elem.attrib["PhysicalSizeX"])) * _UNIT_TO_UM[
                    elem.attrib.get("PhysicalSizeYUnit", elem.attrib.get("PhysicalSizeXUnit", "µm"))]
                mpp = (sx, sy)
            except (KeyError, ValueError):
                logger.debug("unusable OME PhysicalSize %s", elem.attrib)
        elif tag == "Objective" and power is None and "NominalMagnification" in elem.attrib:
            try:
                power = float(elem.attrib["NominalMagnification"])
            except ValueError:
                pass
    return mpp, power


def _resolution_mpp(page: Any) -> tuple[float, float] | None:
    """mpp from a page's XResolution/YResolution with ResolutionUnit inch or centimeter."""
    tags = page.tags
    if "XResolution" not in tags:
        return None
    unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
    factor = {2: 25400.0, 3: 1e4}.get(unit)
    if factor is None:
        return None

    def value(name: str) -> float:
        num, den = tags[name].value if name in tags else tags["XResolution"].value
        return num / den if den else 0.0

    xr, yr = value("XResolution"), value("YResolution")
    if xr <= 0 or yr <= 0:
        return None
    return factor / xr, factor / yr


def _svs_fields(description: str) -> dict[str, float]:
    """Numeric ``|key = value`` fields of an Aperio ImageDescription."""
    fields = {}
    for part in description.split("|")[1:]:
        key, _, value = part.partition("=")
        try:
            fields[key.strip()] = float(value)
        except ValueError:
            continue
    return fields


@contextlib.contextmanager
def _quiet_tifffile() -> Iterator[None]:
    """tifffile logs a warning per broken IFD while parsing damaged files; we raise one error instead."""
    log = logging.getLogger("tifffile")
    old = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(old)


class TiffReader(SlideReader):
    """Reader over tifffile: direct segment decoding where every level is one interleaved page
    (:class:`~wsi_mtl.slide._tiles.SegmentReader`), else tifffile's zarr view of each level with one
    file handle per thread (tifffile handles are not thread-safe). Both decode JPEG strictly: a
    corrupt segment is a damaged tile, left white and reported with its box."""

    backend = "tifffile"

    def __init__(self, path: Path, tif: Any, *, direct: bool = True) -> None:
        super().__init__(path)
        series = tif.series[0]
        self._series_index = 0
        self._axes = series.axes
        self._check_layout(series)
        self.levels = []
        base_h, base_w = self._yx(series.levels[0].shape)
        for level in series.levels:
            h, w = self._yx(level.shape)
            self.levels.append((w, h, (base_w / w + base_h / h) / 2))
        self.pyramidal = len(self.levels) > 1
        page = series.pages[0] if series.pages else tif.pages[0]
        if tif.is_ome:
            self.format = self.vendor = "ome-tiff"
            mpp, power = _ome_metadata(tif.ome_metadata or "")
            if mpp is not None:
                self.mpp_candidates.append((mpp[0], mpp[1], "ome"))
            self.objective_power = power
        else:
            self.format = self.vendor = "tiff"
            if tif.is_svs:
                self.format = self.vendor = "aperio"
                meta = _svs_fields(page.description)
                if "MPP" in meta:
                    self.mpp_candidates.append((meta["MPP"], meta["MPP"], "aperio"))
                self.objective_power = meta.get("AppMag")
        res = _resolution_mpp(page)
        if res is not None:
            self.mpp_candidates.append((res[0], res[1], "tiff-resolution"))
        self.associated_images = [s.name or f"series{i}" for i, s in enumerate(tif.series[1:], 1)]
        self.properties = {"tifffile.series": series.kind, "tifffile.axes": series.axes,
                           "tifffile.compression": str(page.compression.name if hasattr(page.compression, "name") else page.compression)}
        self._check_complete(tif, series)
        self._closed = False
        self._handles: list[Any] = [tif]
        self._handles_lock = threading.Lock()
        self._local = threading.local()
        self._tiles = None
        pages = [lvl.pages[0] if len(lvl.pages) == 1 else None for lvl in series.levels]
        if direct and series.axes in ("YXS", "YX") and all(p is not None and segment_readable(p) for p in pages):
            self._tiles = SegmentReader(path, pages)
            self.decoder = "tifffile-tiles"
        else:
            self._local.arrays = self._open_arrays(tif)
            self.decoder = "tifffile-zarr"

    def _yx(self, shape: tuple[int, ...]) -> tuple[int, int]:
        return shape[self._axes.index("Y")], shape[self._axes.index("X")]

    def _check_layout(self, series: Any) -> None:
        axes = series.axes
        if "Y" not in axes or "X" not in axes:
            raise UnsupportedSlideError(f"{self.path} has no 2-D image (axes {axes})")
        sample_axis = "S" if "S" in axes else "C" if "C" in axes else None
        self._sample_axis = sample_axis
        if sample_axis is not None:
            n = series.shape[axes.index(sample_axis)]
            if n not in (1, 3, 4):
                raise UnsupportedSlideError(f"{self.path} has {n} channels; wsimtl reads RGB brightfield slides")
        if series.dtype not in (np.uint8, np.uint16):
            raise UnsupportedSlideError(f"{self.path} has {series.dtype} pixels; wsimtl reads 8- or 16-bit RGB slides")

    def _check_complete(self, tif: Any, series: Any) -> None:
        """A truncated file: some level's data lies beyond the end of the file."""
        size = tif.filehandle.size
        for level in series.levels:
            for page in level.pages:
                if page is None or not hasattr(page, "dataoffsets"):
                    continue
                offsets = np.asarray(page.dataoffsets, np.int64)
                counts = np.asarray(page.databytecounts, np.int64)
                if offsets.size and int((offsets + counts).max()) > size:
                    raise SlideError(f"{self.path} is truncated: image data ends beyond the file's {size} bytes")

    def _open_arrays(self, tif: Any) -> list[Any]:
        import zarr

        series = tif.series[self._series_index]
        make_strict(tif, [level.keyframe for level in series.levels])  # corrupt JPEG data is damage
        return [zarr.open(series.aszarr(level=i), mode="r") for i in range(len(series.levels))]

    def _arrays(self) -> list[Any]:
        arrays = getattr(self._local, "arrays", None)
        if arrays is None:
            import tifffile

            if self._closed:
                raise ValueError(f"{self.path} is closed")
            tif = tifffile.TiffFile(self.path)
            with self._handles_lock:
                self._handles.append(tif)
            arrays = self._local.arrays = self._open_arrays(tif)
        return arrays

    @classmethod
    def open(cls, path: Path, *, direct: bool = True) -> TiffReader:
        import tifffile

        if not _has_tiff_magic(path):
            raise NotMyFormat(path)
        if ifd_chain_broken(path):
            raise SlideError(f"{path} is truncated: its image directories point beyond the end of the file")
        with _quiet_tifffile():
            try:
                tif = tifffile.TiffFile(path)
            except Exception as exc:  # noqa: BLE001 - tifffile raises many types on broken files
                raise SlideError(f"{path} is a TIFF that cannot be parsed (truncated or damaged?): {exc}") from exc
            try:
                series = tif.series
            except Exception as exc:  # noqa: BLE001
                tif.close()
                raise SlideError(f"{path} is a TIFF that cannot be parsed (truncated or damaged?): {exc}") from exc
        try:
            if not series:
                raise SlideError(f"{path} is a TIFF without images")
            return cls(path, tif, direct=direct)
        except BaseException:
            tif.close()
            raise

    def read_region(self, level: int, y: int, x: int, height: int, width: int) -> NDArray[np.uint8]:
        if self._closed:
            raise ValueError(f"{self.path} is closed")
        if self._tiles is not None:
            return self._tiles.read(level, y, x, height, width)
        array = self._arrays()[level]
        full_h, full_w = self._yx(array.shape)
        y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + height, full_h), min(x + width, full_w)
        out = np.full((height, width, 3), 255, np.uint8)
        if y1 <= y0 or x1 <= x0:
            return out
        try:
            out[y0 - y:y1 - y, x0 - x:x1 - x] = self._decode_box(array, y0, x0, y1, x1)
        except Exception:  # noqa: BLE001 - codec errors come in many types
            logger.debug("decode failure in %s; reading chunk by chunk", self.path, exc_info=True)
            self._read_chunks(array, out, y, x, (y0, x0, y1, x1))
        return out

    def _read_chunks(self, array: Any, out: NDArray[np.uint8], y: int, x: int, box: tuple[int, int, int, int]) -> None:
        """Fill ``out`` (the region at level (y, x)) over ``box`` one zarr chunk (TIFF segment) at a
        time; raise :class:`DamagedRegionError` with the damaged segments left white and their boxes."""
        y0, x0, y1, x1 = box
        full_h, full_w = self._yx(array.shape)
        ch, cw = self._yx(array.chunks)
        damaged: list[tuple[tuple[int, int, int, int], str]] = []
        for sy in range(y0 // ch * ch, y1, ch):
            for sx in range(x0 // cw * cw, x1, cw):
                ay0, ax0, ay1, ax1 = max(y0, sy), max(x0, sx), min(y1, sy + ch), min(x1, sx + cw)
                try:
                    out[ay0 - y:ay1 - y, ax0 - x:ax1 - x] = self._decode_box(array, ay0, ax0, ay1, ax1)
                except Exception as exc:  # noqa: BLE001
                    damaged.append(((sx, sy, min(cw, full_w - sx), min(ch, full_h - sy)), f"{type(exc).__name__}: {exc}"))
        if not damaged:
            return  # a transient failure of the whole read: every chunk read on its own
        more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
        raise DamagedRegionError(f"tile at x={damaged[0][0][0]}, y={damaged[0][0][1]}: {damaged[0][1]}{more}", image=out,
                                 boxes=[b for b, _ in damaged], reasons=[r for _, r in damaged])

    def _decode_box(self, array: Any, y0: int, x0: int, y1: int, x1: int) -> NDArray[np.uint8]:
        """Level pixels [y0, y1) x [x0, x1) (inside the level) as (h, w, 3) uint8."""
        index: list[Any] = []
        for axis in self._axes:
            index.append(slice(y0, y1) if axis == "Y" else slice(x0, x1) if axis == "X" else
                         slice(None) if axis == self._sample_axis else 0)
        data = np.asarray(array[tuple(index)])
        kept = [a for a in self._axes if a in ("Y", "X") or a == self._sample_axis]
        order = [kept.index("Y"), kept.index("X")] + ([kept.index(self._sample_axis)] if self._sample_axis else [])
        data = data.transpose(order)
        if data.ndim == 2:
            data = data[..., None]
        if data.dtype == np.uint16:
            data = np.rint(data / 257.0).astype(np.uint8)
        if data.shape[2] == 1:
            data = np.repeat(data, 3, axis=2)
        elif data.shape[2] == 4:
            data = rgba_to_rgb(data)
        return data

    def close(self) -> None:
        self._closed = True
        if self._tiles is not None:
            self._tiles.close()
        with self._handles_lock:
            for tif in self._handles:
                tif.close()
            self._handles.clear()



"""Pillow backend: plain images (PNG, JPEG, BMP, ...) held in memory as one level."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError

from ..errors import SlideError
from ._base import NotMyFormat, SlideReader, rgba_to_rgb

__all__ = ["PillowReader", "pad_read"]


def pad_read(image: NDArray[np.uint8], y: int, x: int, height: int, width: int) -> NDArray[np.uint8]:
    """Crop [y, y + height) x [x, x + width) from an (H, W, C) array, white outside it.

    Examples
    --------
    >>> pad_read(np.zeros((2, 2, 3), np.uint8), -1, 1, 2, 2)[..., 0].tolist()
    [[255, 255], [0, 255]]
    """
    h, w = image.shape[:2]
    y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + height, h), min(x + width, w)
    if y0 == y and x0 == x and y1 == y + height and x1 == x + width:
        return image[y0:y1, x0:x1]
    out = np.full((height, width, image.shape[2]), 255, np.uint8)
    if y1 > y0 and x1 > x0:
        out[y0 - y:y1 - y, x0 - x:x1 - x] = image[y0:y1, x0:x1]
    return out


class PillowReader(SlideReader):
    """A plain raster image decoded once into memory (read-only, so thread-safe)."""

    backend = "pillow"
    pyramidal = False

    def __init__(self, path: Path, image: NDArray[np.uint8], fmt: str, info: dict) -> None:
        super().__init__(path)
        self._image = image
        self.format = fmt
        self.vendor = fmt
        h, w = image.shape[:2]
        self.levels = [(w, h, 1.0)]
        self.properties = {f"pillow.{k}": str(v) for k, v in info.items() if isinstance(v, (str, int, float, tuple))}
        dpi = info.get("dpi")
        if isinstance(dpi, tuple) and len(dpi) == 2 and all(float(v) > 0 for v in dpi):
            self.mpp_candidates.append((25400.0 / float(dpi[0]), 25400.0 / float(dpi[1]), "image-resolution"))

    @classmethod
    def open(cls, path: Path) -> PillowReader:
        limit = Image.MAX_IMAGE_PIXELS
        try:
            Image.MAX_IMAGE_PIXELS = None  # slides are big by nature; memory is the real limit
            try:
                img = Image.open(path)
            except (UnidentifiedImageError, ValueError) as exc:
                raise NotMyFormat(path) from exc
            with img:
                fmt = (img.format or "image").lower()
                if fmt == "tiff":
                    raise NotMyFormat(path)  # TIFFs are tifffile's: Pillow would decode one whole page
                try:
                    img.load()
                except (OSError, SyntaxError, ValueError) as exc:
                    raise SlideError(f"{path} cannot be decoded (truncated or damaged?): {exc}") from exc
                info = dict(img.info)
                if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: keep the top 8 bits
                    grey = np.asarray(img).astype(np.float64)
                    top = 65535.0 if img.mode.startswith("I;16") or grey.max() > 255 else 255.0
                    array = np.repeat(np.rint(grey * (255.0 / top)).astype(np.uint8)[..., None], 3, axis=2)
                elif img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                    array = rgba_to_rgb(np.asarray(img.convert("RGBA")))
                else:
                    array = np.asarray(img.convert("RGB"))
        finally:
            Image.MAX_IMAGE_PIXELS = limit
        return cls(path, np.ascontiguousarray(array), fmt, info)

    def read_region(self, level: int, y: int, x: int, height: int, width: int) -> NDArray[np.uint8]:
        return pad_read(self._image, y, x, height, width)

"""Open whole-slide images in any supported format and read regions at a target mpp.

>>> from wsi_mtl.slide import open_slide  # doctest: +SKIP
>>> with open_slide("slide.svs") as slide:  # doctest: +SKIP
...     tile = slide.read(0, 0, 512, 512, mpp=0.5)
"""

from __future__ import annotations

from ._base import SlideReader
from ._image import PillowReader
from ._openslide import OpenSlideReader
from ._slide import SUPPORTED_FORMATS, Slide, open_slide
from ._tiff import TiffReader

__all__ = ["open_slide", "Slide", "SlideReader", "OpenSlideReader", "TiffReader", "PillowReader", "SUPPORTED_FORMATS"]

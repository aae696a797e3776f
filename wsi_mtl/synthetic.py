"""Writers of small test slides with H&E-like texture.

The slides written here open in OpenSlide and tifffile like the real formats they imitate
(Aperio SVS with JPEG or JPEG 2000 tiles, OME-TIFF, a generic tiled pyramidal TIFF), so tests and
benchmarks can exercise every reader without shipping slide files.

Examples
--------
>>> import tempfile, pathlib
>>> image = make_he_texture(512, 768, seed=0)
>>> image.shape, image.dtype
((512, 768, 3), dtype('uint8'))
>>> path = write_svs(pathlib.Path(tempfile.mkdtemp()) / "tiny.svs", image, levels=(1, 4))
>>> path.suffix
'.svs'
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

__all__ = [
    "make_he_texture",
    "downsample_image",
    "write_svs",
    "write_ome_tiff",
    "write_generic_tiff",
    "write_mosaic_slide",
    "truncate_file",
    "damage_tile",
]

logger = logging.getLogger(__name__)

_APERIO_HEADER = "Aperio Image Library v12.0.15"
_WHITE = 255


def _smooth_noise(rng: np.random.Generator, height: int, width: int, *, scale: float) -> NDArray[np.float32]:
    """Smooth random field in [0, 1] with features about ``scale`` px wide, made cheaply at low resolution."""
    small_h = max(2, math.ceil(height / scale) + 2)
    small_w = max(2, math.ceil(width / scale) + 2)
    small = ndimage.gaussian_filter(rng.random((small_h, small_w), dtype=np.float32), 1.0)
    field = ndimage.zoom(small, (height / small_h * 1.0001, width / small_w * 1.0001), order=1)[:height, :width]
    field -= field.min()
    peak = field.max()
    return field / peak if peak > 0 else field


def make_he_texture(height: int, width: int, *, seed: int = 0, tissue_fraction: float = 0.55) -> NDArray[np.uint8]:
    """Procedural H&E-like RGB image: pink fibrous stroma, purple nuclei, white lumen and background.

    Parameters
    ----------
    height, width : int
        Size in pixels (at least 16 each).
    seed : int
        Seed of the random generator; the same seed gives the same image.
    tissue_fraction : float
        Approximate fraction of the image covered by tissue, in (0, 1); the rest is white
        background, always including a margin along the image border.

    Returns
    -------
    image : (height, width, 3) uint8 ndarray
        RGB image.
    """
    if height < 16 or width < 16:
        raise ValueError(f"texture size must be at least 16 x 16 px, got {height} x {width}")
    if not 0.0 < tissue_fraction < 1.0:
        raise ValueError(f"tissue_fraction must be in (0, 1), got {tissue_fraction}")
    rng = np.random.default_rng(seed)
    scale = max(32.0, min(height, width) / 4)
    blob = _smooth_noise(rng, height, width, scale=scale)
    # fade towards the border so that background always surrounds the tissue
    yy = np.minimum(np.arange(height), np.arange(height)[::-1]) / max(1, height)
    xx = np.minimum(np.arange(width), np.arange(width)[::-1]) / max(1, width)
    border = np.clip(np.minimum.outer(yy, xx) * 10, 0, 1).astype(np.float32)
    blob *= border
    threshold = np.quantile(blob, 1.0 - tissue_fraction)
    tissue = blob > threshold

    # lumen: a few white holes inside tissue
    lumen = _smooth_noise(rng, height, width, scale=scale / 3) > 0.8
    lumen &= ndimage.binary_erosion(tissue, iterations=4)

    # stroma: pink base, fibres from anisotropic stretched noise
    fibre = _smooth_noise(rng, height, max(16, width // 8), scale=3.0)
    fibre = ndimage.zoom(fibre, (1, width / fibre.shape[1] * 1.0001), order=1)[:, :width]
    shade = 0.75 + 0.25 * fibre + 0.08 * rng.standard_normal((height, width), dtype=np.float32)
    stroma = np.array([236.0, 160.0, 196.0], np.float32)
    image = np.empty((height, width, 3), np.float32)
    image[:] = stroma
    image *= np.clip(shade, 0.6, 1.1)[..., None]
    image[..., 1] -= 30 * fibre  # darker, more eosin-rich fibres

    # nuclei: purple ellipses, denser near lumen edges (epithelium)
    from skimage.draw import ellipse

    nuclei = np.zeros((height, width), bool)
    n_nuclei = int(tissue.sum() / 700)
    ys = rng.integers(0, height, n_nuclei)
    xs = rng.integers(0, width, n_nuclei)
    for y, x in zip(ys, xs):
        if not tissue[y, x] or lumen[y, x]:
            continue
        ry, rx = rng.uniform(3, 7), rng.uniform(3, 7)
        rr, cc = ellipse(y, x, ry, rx, shape=(height, width), rotation=rng.uniform(0, np.pi))
        nuclei[rr, cc] = True
    nucleus_colour = np.array([95.0, 55.0, 135.0], np.float32)
    noise = rng.standard_normal((height, width, 1), dtype=np.float32) * 10
    image[nuclei] = nucleus_colour + noise[nuclei]

    background = np.array([244.0, 243.0, 245.0], np.float32)
    outside = ~tissue | lumen
    image[outside] = background + rng.standard_normal((int(outside.sum()), 1), dtype=np.float32) * 2
    return np.clip(image, 0, 255).astype(np.uint8)


def downsample_image(image: NDArray[np.uint8], factor: int) -> NDArray[np.uint8]:
    """Area-average an RGB image by an integer factor (edges padded white).

    Parameters
    ----------
    image : (H, W, 3) uint8 ndarray
    factor : int
        Downsample factor, >= 1.

    Returns
    -------
    out : (ceil(H / factor), ceil(W / factor), 3) uint8 ndarray
    """
    if factor < 1 or int(factor) != factor:
        raise ValueError(f"downsample factor must be a positive integer, got {factor}")
    factor = int(factor)
    if factor == 1:
        return image
    h, w = image.shape[:2]
    out_h, out_w = -(-h // factor), -(-w // factor)
    padded = np.full((out_h * factor, out_w * factor, image.shape[2]), _WHITE, np.uint8)
    padded[:h, :w] = image
    blocks = padded.reshape(out_h, factor, out_w, factor, image.shape[2]).astype(np.float32)
    return np.rint(blocks.mean(axis=(1, 3))).astype(np.uint8)


def _validate_levels(levels: Sequence[int]) -> tuple[int, ...]:
    levels = tuple(int(v) for v in levels)
    if not levels or levels[0] != 1 or any(b <= a for a, b in zip(levels, levels[1:])):
        raise ValueError(f"levels must start at 1 and increase strictly, got {levels}")
    return levels


def _validate_image(image: NDArray[np.uint8]) -> NDArray[np.uint8]:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
    return np.ascontiguousarray(image)


def _compression_args(compression: str, quality: int) -> tuple[int | str, dict]:
    if compression == "jpeg":
        return "jpeg", {"level": quality}
    if compression == "jpeg2000":
        # Aperio's own code for a JPEG 2000 codestream holding RGB samples; OpenSlide reads it.
        return 33005, {"level": quality, "codecformat": "J2K"}
    if compression in ("deflate", "zlib"):
        return "zlib", {}
    if compression in ("none", None):
        return None, {}
    raise ValueError(f"compression must be 'jpeg', 'jpeg2000', 'deflate' or 'none', got {compression!r}")


def _atomic_target(path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


def write_svs(
    path: str | os.PathLike,
    image: NDArray[np.uint8],
    *,
    mpp: float | None = 0.25,
    compression: str = "jpeg",
    tile: int = 256,
    levels: Sequence[int] = (1, 4, 16),
    objective_power: float | None = None,
    quality: int = 90,
    label: bool = True,
) -> Path:
    """Write an Aperio-style pyramidal SVS that OpenSlide opens with vendor ``aperio``.

    Parameters
    ----------
    path : path-like
        Output file (written atomically).
    image : (H, W, 3) uint8 ndarray
        Level-0 RGB pixels.
    mpp : float or None
        Microns per pixel at level 0, written as ``MPP = ...``; None leaves it out.
    compression : {"jpeg", "jpeg2000"}
        Tile codec; JPEG 2000 uses Aperio compression 33005 (RGB codestream).
    tile : int
        Tile edge in px (multiple of 16).
    levels : sequence of int
        Downsample factors of the pyramid levels, starting with 1.
    objective_power : float or None
        Written as ``AppMag = ...``; None leaves it out.
    quality : int
        Codec quality (JPEG 1-100; JPEG 2000 PSNR-like level).
    label : bool
        Also write a small label and a macro associated image.

    Returns
    -------
    path : Path
    """
    import tifffile

    image = _validate_image(image)
    levels = _validate_levels(levels)
    if tile % 16:
        raise ValueError(f"tile must be a multiple of 16, got {tile}")
    codec, codec_args = _compression_args(compression, quality)
    path = Path(path)
    tmp = _atomic_target(path)
    height, width = image.shape[:2]
    codec_name = "J2K" if compression == "jpeg2000" else "JPEG"
    fields = []
    if objective_power is not None:
        fields.append(f"AppMag = {objective_power:g}")
    if mpp is not None:
        fields.append(f"MPP = {mpp:.4f}")
    fields.append("Filename = synthetic")
    suffix = "".join(f"|{f}" for f in fields)
    thumb_factor = max(1, math.ceil(max(height, width) / 768))
    try:
        with tifffile.TiffWriter(tmp, bigtiff=image.nbytes > 2**31) as tif:
            for i, factor in enumerate(levels):
                level = downsample_image(image, factor)
                lh, lw = level.shape[:2]
                resized = "" if i == 0 else f" -> {lw}x{lh}"
                desc = (f"{_APERIO_HEADER}\r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}){resized} "
                        f"{codec_name}/RGB Q={quality}{suffix}")
                tif.write(level, tile=(tile, tile), photometric="rgb", compression=codec, compressionargs=codec_args,
                          description=desc, metadata=None)
                if i == 0:
                    thumb = downsample_image(image, thumb_factor)
                    tif.write(thumb, photometric="rgb", compression="jpeg", compressionargs={"level": 85},
                              description=f"{_APERIO_HEADER}\r\n{width}x{height} -> {thumb.shape[1]}x{thumb.shape[0]} - |",
                              metadata=None, rowsperstrip=16)
            if label:
                rng = np.random.default_rng(0)
                label_img = np.full((96, 128, 3), 230, np.uint8)
                label_img[20:76, 20:108] = rng.integers(0, 2, (56, 88, 1), dtype=np.uint8) * 255
                tif.write(label_img, photometric="rgb", compression="lzw", description=f"{_APERIO_HEADER}\r\nlabel 128x96",
                          metadata=None, subfiletype=1, rowsperstrip=16)
                macro = downsample_image(image, max(1, math.ceil(max(height, width) / 256)))
                tif.write(macro, photometric="rgb", compression="jpeg", metadata=None, subfiletype=9, rowsperstrip=16,
                          description=f"{_APERIO_HEADER}\r\nmacro {macro.shape[1]}x{macro.shape[0]}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _resolution(mpp: float | None) -> dict:
    if mpp is None:
        return {}
    pixels_per_cm = 1e4 / mpp
    return {"resolution": (pixels_per_cm, pixels_per_cm), "resolutionunit": "CENTIMETER"}


def write_generic_tiff(
    path: str | os.PathLike,
    image: NDArray[np.uint8],
    *,
    mpp: float | None = 0.25,
    compression: str = "jpeg",
    tile: int | None = 256,
    levels: Sequence[int] = (1, 4, 16),
    quality: int = 90,
) -> Path:
    """Write a plain tiled pyramidal TIFF: one page per level, mpp in XResolution/ResolutionUnit (cm).

    ``tile=None`` writes a single-level stripped TIFF (``levels`` must then be ``(1,)``), which
    OpenSlide does not read. Parameters are as in :func:`write_svs`. Returns the path.
    """
    import tifffile

    image = _validate_image(image)
    levels = _validate_levels(levels)
    if tile is None and len(levels) > 1:
        raise ValueError("a stripped (tile=None) TIFF has one level only; pass levels=(1,)")
    codec, codec_args = _compression_args(compression, quality)
    path = Path(path)
    tmp = _atomic_target(path)
    try:
        with tifffile.TiffWriter(tmp, bigtiff=image.nbytes > 2**31) as tif:
            for i, factor in enumerate(levels):
                level = downsample_image(image, factor)
                res_mpp = None if mpp is None else mpp * factor
                tif.write(level, tile=None if tile is None else (tile, tile), photometric="rgb", compression=codec,
                          compressionargs=codec_args, metadata=None, subfiletype=0 if i == 0 else 1, **_resolution(res_mpp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_ome_tiff(
    path: str | os.PathLike,
    image: NDArray[np.uint8],
    *,
    mpp: float | None = 0.25,
    compression: str = "jpeg",
    tile: int = 256,
    levels: Sequence[int] = (1, 4, 16),
    quality: int = 90,
) -> Path:
    """Write a pyramidal OME-TIFF (levels in SubIFDs) with ``PhysicalSizeX/Y`` in um.

    Parameters are as in :func:`write_svs`. Returns the path.
    """
    import tifffile

    image = _validate_image(image)
    levels = _validate_levels(levels)
    codec, codec_args = _compression_args(compression, quality)
    path = Path(path)
    tmp = _atomic_target(path)
    metadata: dict = {"axes": "YXS"}
    if mpp is not None:
        metadata.update(PhysicalSizeX=mpp, PhysicalSizeY=mpp, PhysicalSizeXUnit="µm", PhysicalSizeYUnit="µm")
    try:
        with tifffile.TiffWriter(tmp, ome=True, bigtiff=image.nbytes > 2**31) as tif:
            options = dict(tile=(tile, tile), photometric="rgb", compression=codec, compressionargs=codec_args)
            tif.write(image, subifds=len(levels) - 1, metadata=metadata, **options, **_resolution(mpp))
            for factor in levels[1:]:
                tif.write(downsample_image(image, factor), subfiletype=1, metadata=None, **options,
                          **_resolution(None if mpp is None else mpp * factor))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _load_source(path: Path, multiple: int) -> NDArray[np.uint8]:
    from PIL import Image

    with Image.open(path) as img:
        arr = np.asarray(img.convert("RGB"))
    h = arr.shape[0] // multiple * multiple
    w = arr.shape[1] // multiple * multiple
    if h == 0 or w == 0:
        raise ValueError(f"mosaic source {path} is smaller than {multiple} px")
    return np.ascontiguousarray(arr[:h, :w])


def write_mosaic_slide(
    path: str | os.PathLike,
    *,
    sources: Sequence[str | os.PathLike],
    height: int,
    width: int,
    mpp: float = 0.25,
    cell: int = 512,
    tile: int = 256,
    levels: Sequence[int] = (1, 4, 16),
    tissue_fraction: float = 0.6,
    compression: str = "jpeg",
    quality: int = 90,
    seed: int = 0,
) -> Path:
    """Write a large Aperio-style SVS tiled from real images, streaming tiles (flat memory).

    The slide is a grid of ``cell`` x ``cell`` px cells; each tissue cell holds a crop of a
    randomly chosen source image (flipped at random), background cells are white. Every pyramid
    level is an exact area-average of level 0, generated per tile without holding the slide.

    Parameters
    ----------
    path : path-like
        Output ``.svs`` file.
    sources : sequence of path-like
        RGB images (PNG, JPEG, TIFF) to tile; at least one.
    height, width : int
        Level-0 size in px.
    mpp : float
        Microns per pixel written into the description.
    cell : int
        Mosaic cell edge in px; a multiple of the largest level factor and of ``tile``.
    tile, levels, compression, quality :
        As in :func:`write_svs`.
    tissue_fraction : float
        Approximate fraction of cells holding tissue.
    seed : int
        Seed of the layout.

    Returns
    -------
    path : Path
    """
    import tifffile

    levels = _validate_levels(levels)
    if not sources:
        raise ValueError("write_mosaic_slide needs at least one source image")
    if height < 1 or width < 1:
        raise ValueError(f"slide size must be positive, got {height} x {width}")
    if cell % levels[-1] or cell % tile:
        raise ValueError(f"cell ({cell}) must be a multiple of the largest level factor ({levels[-1]}) and of tile ({tile})")
    codec, codec_args = _compression_args(compression, quality)
    rng = np.random.default_rng(seed)
    biggest = levels[-1]
    images = [_load_source(Path(p), biggest) for p in sources]
    pyramids = [{f: downsample_image(img, f) for f in levels} for img in images]
    rows, cols = -(-height // cell), -(-width // cell)
    layout_field = _smooth_noise(rng, rows, cols, scale=max(2.0, min(rows, cols) / 3))
    has_tissue = layout_field > np.quantile(layout_field, 1.0 - tissue_fraction)
    if rows > 2 and cols > 2:
        has_tissue[[0, -1], :] = False
        has_tissue[:, [0, -1]] = False
    choice = rng.integers(0, len(images), (rows, cols))
    flips = rng.integers(0, 4, (rows, cols))
    offsets = rng.random((rows, cols, 2))

    def cell_pixels(r: int, c: int, factor: int) -> NDArray[np.uint8]:
        size = cell // factor
        out = np.full((size, size, 3), _WHITE, np.uint8)
        if not has_tissue[r, c]:
            return out
        src = pyramids[choice[r, c]][factor]
        sh, sw = src.shape[:2]
        # offsets in level-0 units that are multiples of the largest factor, identical on all levels
        oy = int(offsets[r, c, 0] * max(0, sh * factor - cell) / biggest) * biggest // factor
        ox = int(offsets[r, c, 1] * max(0, sw * factor - cell) / biggest) * biggest // factor
        crop = src[oy:oy + size, ox:ox + size]
        if flips[r, c] & 1:
            crop = crop[::-1]
        if flips[r, c] & 2:
            crop = crop[:, ::-1]
        out[:crop.shape[0], :crop.shape[1]] = crop
        return out

    def tiles(factor: int) -> Iterator[NDArray[np.uint8]]:
        lh, lw = -(-height // factor), -(-width // factor)
        csize = cell // factor
        for ty in range(0, lh, tile):
            for tx in range(0, lw, tile):
                out = np.full((tile, tile, 3), _WHITE, np.uint8)
                y = ty
                while y < min(ty + tile, lh):
                    r, yy = divmod(y, csize)
                    h = min(csize - yy, ty + tile - y, lh - y)
                    x = tx
                    while x < min(tx + tile, lw):
                        c, xx = divmod(x, csize)
                        w = min(csize - xx, tx + tile - x, lw - x)
                        out[y - ty:y - ty + h, x - tx:x - tx + w] = cell_pixels(r, c, factor)[yy:yy + h, xx:xx + w]
                        x += w
                    y += h
                yield out

    path = Path(path)
    tmp = _atomic_target(path)
    suffix = f"|AppMag = {10 / mpp:g}|MPP = {mpp:.4f}|Filename = mosaic"
    try:
        with tifffile.TiffWriter(tmp, bigtiff=height * width * 3 > 2**31) as tif:
            for i, factor in enumerate(levels):
                lh, lw = -(-height // factor), -(-width // factor)
                desc = (f"{_APERIO_HEADER}\r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) -> {lw}x{lh} "
                        f"JPEG/RGB Q={quality}{suffix}")
                tif.write(tiles(factor), shape=(lh, lw, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                          compression=codec, compressionargs=codec_args, description=desc, metadata=None)
                logger.info("mosaic level %d (%d x %d) written", factor, lw, lh)
                if i == 0:  # Aperio puts a stripped thumbnail second; readers rely on it
                    thumb_factor = levels[-1] * 2
                    th, tw = -(-height // thumb_factor), -(-width // thumb_factor)
                    thumb = np.full((th, tw, 3), _WHITE, np.uint8)
                    csize = cell // levels[-1]
                    for r in range(rows):
                        for c in range(cols):
                            block = downsample_image(cell_pixels(r, c, levels[-1]), 2)
                            y, x = r * csize // 2, c * csize // 2
                            part = block[:max(0, th - y), :max(0, tw - x)]
                            thumb[y:y + part.shape[0], x:x + part.shape[1]] = part
                    tif.write(thumb, photometric="rgb", compression="jpeg", rowsperstrip=16, metadata=None,
                              description=f"{_APERIO_HEADER}\r\n{width}x{height} -> {tw}x{th} - |")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def truncate_file(src: str | os.PathLike, dst: str | os.PathLike, *, fraction: float = 0.5) -> Path:
    """Copy the first ``fraction`` of ``src``'s bytes to ``dst`` (a slide cut off mid-transfer).

    Returns the path of ``dst``.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    data = Path(src).read_bytes()
    dst = Path(dst)
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def damage_tile(src: str | os.PathLike, dst: str | os.PathLike, *, level: int = 0,
                tile_index: int = 1) -> tuple[int, int, int, int]:
    """Copy ``src`` to ``dst`` with one tile's compressed bytes zeroed, so that it cannot be decoded.

    Parameters
    ----------
    src, dst : path-like
        A tiled TIFF-based slide and the damaged copy to write.
    level : int
        Pyramid level (series 0 of tifffile) holding the tile.
    tile_index : int
        Index of the tile in the level's row-major tile order.

    Returns
    -------
    box : (x, y, width, height)
        The damaged tile's extent in level-0 px.
    """
    import shutil

    import tifffile

    shutil.copyfile(src, dst)
    with tifffile.TiffFile(dst) as tif:
        levels = tif.series[0].levels
        if not 0 <= level < len(levels):
            raise ValueError(f"level must be in [0, {len(levels)}), got {level}")
        page = levels[level].pages[0]
        if not page.is_tiled:
            raise ValueError(f"{src} level {level} is not tiled")
        if not 0 <= tile_index < len(page.dataoffsets):
            raise ValueError(f"tile_index must be in [0, {len(page.dataoffsets)}), got {tile_index}")
        offset, count = page.dataoffsets[tile_index], page.databytecounts[tile_index]
        tiles_across = -(-page.imagewidth // page.tilewidth)
        row, col = divmod(tile_index, tiles_across)
        factor = levels[0].shape[1] / page.imagewidth
        box = (round(col * page.tilewidth * factor), round(row * page.tilelength * factor),
               round(page.tilewidth * factor), round(page.tilelength * factor))
    with open(dst, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\x00" * count)
    return box

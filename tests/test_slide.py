"""Slide API: a contract test class run once per backend and format, plus errors and edge cases."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_mtl.errors import (
    DamagedRegionError,
    InputError,
    MissingMppError,
    SlideError,
    UnsupportedSlideError,
)
from wsi_mtl.slide import OpenSlideReader, Slide, SlideReader, TiffReader, open_slide
from wsi_mtl.slide._base import rgba_to_rgb
from wsi_mtl.slide._slide import _resample
from wsi_mtl.synthetic import downsample_image, make_he_texture, write_svs

CMU_MD5 = "1ad6e35c9d17e4d85fb7e3143b328efe"


def reference(image: np.ndarray, x: int, y: int, width: int, height: int, ds: float) -> np.ndarray:
    """Area-averaged region of a level-0 image at downsample ``ds``, white outside."""
    pad = int(np.ceil(ds)) + 2
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), constant_values=255)
    box = (x * ds + pad, y * ds + pad, (x + width) * ds + pad, (y + height) * ds + pad)
    return np.asarray(Image.fromarray(padded).resize((width, height), Image.Resampling.BOX, box=box))


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


class SlideContract:
    """Every backend must pass these; subclasses name the fixture and what to expect."""

    fixture: str
    backend: str
    vendor: str
    mpp_source: str
    n_levels: int = 3
    tolerance: float = 4.0  # mean absolute difference allowed for lossy codecs

    decoder: str = "tifffile-tiles"

    def open(self, path: Path) -> Slide:
        return open_slide(path)

    @pytest.fixture
    def slide(self, request: pytest.FixtureRequest):
        with self.open(request.getfixturevalue(self.fixture)) as slide:
            assert slide.decoder == self.decoder
            yield slide

    def test_geometry_and_metadata(self, slide: Slide, he_image: np.ndarray) -> None:
        assert (slide.height, slide.width) == he_image.shape[:2]
        assert slide.offset == (0, 0)
        assert slide.backend == self.backend
        assert slide.vendor == self.vendor
        assert slide.mpp == pytest.approx(0.25, rel=1e-3)
        assert slide.mpp_source == self.mpp_source
        assert len(slide.levels) == self.n_levels
        assert slide.levels[0] == (1536, 1024, 1.0)
        for (w, h, ds), factor in zip(slide.levels, (1, 4, 16)):
            assert ds == pytest.approx(factor, rel=0.01)
            assert (w, h) == (-(-1536 // factor), -(-1024 // factor))

    def test_read_level0_matches_pixels(self, slide: Slide, he_image: np.ndarray) -> None:
        region = slide.read(300, 200, 400, 300, mpp=0.25)
        assert region.shape == (300, 400, 3) and region.dtype == np.uint8
        assert mean_abs(region, he_image[200:500, 300:700]) < self.tolerance

    @pytest.mark.parametrize("mpp", [0.5, 1.0, 0.7, 4.0, 8.0])
    def test_read_at_target_mpp(self, slide: Slide, he_image: np.ndarray, mpp: float) -> None:
        ds = mpp / 0.25
        x, y = int(200 / ds), int(100 / ds)
        width, height = int(1000 / ds), int(800 / ds)
        region = slide.read(x, y, width, height, mpp=mpp)
        assert region.shape == (height, width, 3)
        assert mean_abs(region, reference(he_image, x, y, width, height, ds)) < self.tolerance + 1.5

    def test_upsampling_below_level0_mpp(self, slide: Slide, he_image: np.ndarray) -> None:
        region = slide.read(400, 400, 64, 64, mpp=0.125)
        assert region.shape == (64, 64, 3)
        assert mean_abs(region[::2, ::2], he_image[200:232, 200:232]) < self.tolerance + 6

    def test_outside_is_white(self, slide: Slide, he_image: np.ndarray) -> None:
        region = slide.read(-50, -20, 100, 60, mpp=0.25)
        assert (region[:20] == 255).all() and (region[:, :50] == 255).all()
        assert mean_abs(region[20:, 50:], he_image[:40, :50]) < self.tolerance + 2
        far = slide.read(10_000, 10_000, 32, 32, mpp=0.5)
        assert (far == 255).all()
        edge = slide.read(1536 // 2 - 10, 1024 // 2 - 10, 40, 40, mpp=0.5)
        assert (edge[10:, :] == 255).all() and (edge[:, 10:] == 255).all()

    def test_thumbnail(self, slide: Slide, he_image: np.ndarray) -> None:
        thumb = slide.thumbnail(mpp=8.0)
        assert thumb.shape == (32, 48, 3)
        assert mean_abs(thumb, downsample_image(he_image, 32)) < self.tolerance + 2

    def test_concurrent_reads_equal_sequential(self, slide: Slide) -> None:
        boxes = [(x, y, 128, 128) for x in range(0, 768, 192) for y in range(0, 512, 128)]
        expected = [slide.read(*box, mpp=0.5) for box in boxes]
        results: dict[int, list[np.ndarray]] = {}

        def work(k: int) -> None:
            results[k] = [slide.read(*box, mpp=0.5) for box in boxes]

        threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for k in range(3):
            for got, want in zip(results[k], expected):
                np.testing.assert_array_equal(got, want)

    def test_info_is_json(self, slide: Slide) -> None:
        info = json.loads(json.dumps(slide.info()))
        assert info["backend"] == self.backend
        assert info["mpp_source"] == self.mpp_source
        assert info["width"] == 1536 and info["height"] == 1024
        assert len(info["levels"]) == self.n_levels
        assert isinstance(info["associated_images"], list)

    def test_reader_read_region_pads_white(self, slide: Slide, he_image: np.ndarray) -> None:
        reader: SlideReader = slide._reader
        assert reader.shape == (1024, 1536)
        block = reader.read_region(0, -8, -8, 16, 16)
        assert (block[:8] == 255).all() and (block[:, :8] == 255).all()
        assert mean_abs(block[8:, 8:], he_image[:8, :8]) < self.tolerance + 4

    def test_read_after_close_raises(self, request: pytest.FixtureRequest) -> None:
        slide = self.open(request.getfixturevalue(self.fixture))
        slide.close()
        slide.close()  # idempotent
        with pytest.raises(ValueError, match="closed"):
            slide.read(0, 0, 8, 8, mpp=0.25)


class TestSvsJpeg(SlideContract):
    fixture, backend, vendor, mpp_source = "svs_jpeg", "openslide", "aperio", "openslide"

    def test_aperio_extras(self, slide: Slide) -> None:
        assert slide.objective_power == 40
        assert slide.associated_images == ["label", "macro", "thumbnail"]


class TestSvsJpegOpenSlideDecoder(SlideContract):
    """The same SVS with pixels decoded by OpenSlide itself (used for NDPI, MIRAX, SCN, ...)."""

    fixture, backend, vendor, mpp_source, decoder = "svs_jpeg", "openslide", "aperio", "openslide", "openslide"

    def open(self, path: Path) -> Slide:
        return Slide(OpenSlideReader.open(path, direct=False))


class TestSvsTifffileBackend(SlideContract):
    fixture, backend, vendor, mpp_source = "svs_jpeg", "tifffile", "aperio", "aperio"

    def open(self, path: Path) -> Slide:
        return open_slide(path, backend="tifffile")


class TestSvsJpeg2000(SlideContract):
    """JPEG 2000 SVS: OpenSlide decodes (faster than imagecodecs here, and it caches tiles)."""

    fixture, backend, vendor, mpp_source, decoder = "svs_j2k", "openslide", "aperio", "openslide", "openslide"
    tolerance = 1.5


@pytest.mark.slow  # JPEG 2000 decoding without OpenSlide's tile cache: ~20 ms CPU per 256 px tile
class TestSvsJpeg2000Tifffile(TestSvsJpeg2000):
    decoder = "tifffile-tiles"
    backend, mpp_source = "tifffile", "aperio"

    def open(self, path: Path) -> Slide:
        return open_slide(path, backend="tifffile")


class TestOmeTiffZarr(SlideContract):
    """OME-TIFF through tifffile's zarr view (the route for planar, multi-page or odd layouts)."""

    fixture, backend, vendor, mpp_source, decoder = "ome_tiff", "tifffile", "ome-tiff", "ome", "tifffile-zarr"

    def open(self, path: Path) -> Slide:
        return Slide(TiffReader.open(path, direct=False))


class TestOmeTiff(SlideContract):
    fixture, backend, vendor, mpp_source = "ome_tiff", "tifffile", "ome-tiff", "ome"


class TestGenericTiff(SlideContract):
    fixture, backend, vendor, mpp_source = "generic_tiff", "openslide", "generic-tiff", "openslide"


class TestPng(SlideContract):
    fixture, backend, vendor, mpp_source, decoder = "png_image", "pillow", "png", "image-resolution", "pillow"
    n_levels = 1
    tolerance = 0.5

    def test_geometry_and_metadata(self, slide: Slide, he_image: np.ndarray) -> None:
        assert slide.levels == [(1536, 1024, 1.0)]
        assert slide.mpp == pytest.approx(0.25, rel=1e-3)
        assert slide.backend == "pillow" and slide.mpp_source == "image-resolution"


# -- bounds offset, through a minimal in-memory reader ------------------------------------------
class ArrayReader(SlideReader):
    """In-memory single-level reader with OpenSlide-like bounds, to test Slide's coordinate logic."""

    backend = "array"

    def __init__(self, image: np.ndarray, bounds: tuple[int, int, int, int] | None) -> None:
        super().__init__(Path("array.tif"))
        self.image = image
        h, w = image.shape[:2]
        self.levels = [(w, h, 1.0), (w // 2, h // 2, 2.0)]
        self.half = downsample_image(image, 2)
        self.bounds = bounds
        self.mpp_candidates = [(0.5, 0.5, "openslide")]

    @classmethod
    def open(cls, path: Path) -> ArrayReader:  # pragma: no cover - not used through open_slide
        raise NotImplementedError

    def read_region(self, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        from wsi_mtl.slide._image import pad_read

        return pad_read(self.image if level == 0 else self.half, y, x, height, width)


def test_bounds_offset_is_added_and_outside_bounds_is_white() -> None:
    image = make_he_texture(256, 320, seed=3)
    slide = Slide(ArrayReader(image, (40, 32, 200, 160)))
    assert (slide.width, slide.height, slide.offset) == (200, 160, (40, 32))
    np.testing.assert_array_equal(slide.read(0, 0, 50, 30, mpp=0.5), image[32:62, 40:90])
    region = slide.read(190, 150, 20, 20, mpp=0.5)
    np.testing.assert_array_equal(region[:10, :10], image[182:192, 230:240])
    assert (region[10:] == 255).all() and (region[:, 10:] == 255).all()
    np.testing.assert_array_equal(slide.read(0, 0, 20, 20, mpp=1.0), downsample_image(image, 2)[16:36, 20:40])
    assert slide.thumbnail(mpp=1.0).shape == (80, 100, 3)


def test_best_level_uses_tolerance() -> None:
    slide = Slide(ArrayReader(make_he_texture(64, 64, seed=0), None))
    assert slide.best_level(1.0) == 0
    assert slide.best_level(1.99) == 1  # within 1 %
    assert slide.best_level(1.9) == 0
    assert slide.best_level(100.0) == 1


def test_resample_integer_and_fractional_boxes() -> None:
    src = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    out = _resample(src, 4, 4, (0.0, 0.0, 8.0, 8.0), 2.0)
    np.testing.assert_allclose(out, downsample_image(src, 2), atol=1)
    frac = _resample(src, 3, 3, (0.5, 0.5, 6.5, 6.5), 2.0)
    assert frac.shape == (3, 3, 3)
    up = _resample(src, 16, 16, (0.0, 0.0, 8.0, 8.0), 0.5)
    assert up.shape == (16, 16, 3)


def test_rgba_to_rgb_blends_on_white() -> None:
    rgba = np.array([[[0, 0, 0, 0], [100, 100, 100, 255], [0, 0, 0, 128]]], np.uint8)
    assert rgba_to_rgb(rgba).tolist() == [[[255, 255, 255], [100, 100, 100], [127, 127, 127]]]


def test_transparent_png_pixels_are_white(tmp_path: Path) -> None:
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[:, 15:] = (200, 100, 150, 255)
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba).save(path)
    with open_slide(path, mpp=0.5) as slide:
        region = slide.read(0, 0, 30, 20, mpp=0.5)
    assert (region[:, :15] == 255).all()
    assert (region[:, 15:] == (200, 100, 150)).all()


def test_grey_and_16_bit_png(tmp_path: Path) -> None:
    grey = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (8, 1))
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    for name in ("grey.png", "grey16.png"):
        with open_slide(tmp_path / name, mpp=1.0) as slide:
            region = slide.read(0, 0, 16, 8, mpp=1.0)
        assert region.shape == (8, 16, 3)
        np.testing.assert_array_equal(region[..., 1], grey)


# -- mpp ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_image() -> np.ndarray:
    return make_he_texture(256, 256, seed=1)


def test_mpp_override_wins(svs_jpeg: Path) -> None:
    with open_slide(svs_jpeg, mpp=0.5) as slide:
        assert (slide.mpp, slide.mpp_source) == (0.5, "override")


@pytest.mark.parametrize("bad", [0, -1, float("nan"), 1000.0, "abc"])
def test_bad_mpp_override_raises(svs_jpeg: Path, bad: object) -> None:
    with pytest.raises(InputError, match="mpp"):
        open_slide(svs_jpeg, mpp=bad)  # type: ignore[arg-type]


def test_objective_power_fallback_warns(tmp_path: Path, small_image: np.ndarray, caplog: pytest.LogCaptureFixture) -> None:
    path = write_svs(tmp_path / "nompp.svs", small_image, mpp=None, objective_power=20, levels=(1, 4))
    with caplog.at_level(logging.WARNING, logger="wsi_mtl.slide"):
        with open_slide(path) as slide:
            assert (slide.mpp, slide.mpp_source) == (0.5, "objective-power")
    assert "objective power 20x" in caplog.text


def test_missing_mpp_raises(tmp_path: Path, small_image: np.ndarray) -> None:
    path = write_svs(tmp_path / "nompp.svs", small_image, mpp=None, objective_power=None, levels=(1, 4))
    with pytest.raises(MissingMppError, match="no microns-per-pixel in its metadata; pass --mpp"):
        open_slide(path)
    with open_slide(path, mpp=0.3) as slide:
        assert slide.mpp_source == "override"


def test_png_without_resolution_needs_mpp(tmp_path: Path, small_image: np.ndarray) -> None:
    path = tmp_path / "plain.png"
    Image.fromarray(small_image).save(path)  # no pHYs
    with pytest.raises(MissingMppError):
        open_slide(path)


def test_jpeg_at_72_dpi_is_not_a_resolution(tmp_path: Path, small_image: np.ndarray) -> None:
    path = tmp_path / "photo.jpg"
    Image.fromarray(small_image).save(path, dpi=(72, 72))
    with pytest.raises(MissingMppError):
        open_slide(path)
    with open_slide(path, mpp=0.5) as slide:
        assert slide.vendor == "jpeg" and slide.read(0, 0, 16, 16, mpp=1.0).shape == (16, 16, 3)


def test_stripped_tiff_with_resolution_goes_to_tifffile(tmp_path: Path, small_image: np.ndarray) -> None:
    from wsi_mtl.synthetic import write_generic_tiff

    path = write_generic_tiff(tmp_path / "flat.tif", small_image, mpp=0.5, tile=None, levels=(1,), compression="none")
    with open_slide(path) as slide:
        assert (slide.backend, slide.mpp_source) == ("tifffile", "tiff-resolution")
        assert slide.mpp == pytest.approx(0.5)
        np.testing.assert_array_equal(slide.read(10, 20, 30, 40, mpp=0.5), small_image[20:60, 10:40])


# -- bad inputs ---------------------------------------------------------------------------------
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SlideError, match="slide not found"):
        open_slide(tmp_path / "nope.svs")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(SlideError, match="is a directory"):
        open_slide(tmp_path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.svs"
    path.write_bytes(b"")
    with pytest.raises(SlideError, match="empty"):
        open_slide(path)


def test_text_file_is_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "notes.svs"
    path.write_text("this is not a slide\n" * 20)
    with pytest.raises(UnsupportedSlideError, match=r"notes\.svs is not a slide format.*Aperio SVS"):
        open_slide(path)


@pytest.mark.parametrize("fixture", ["svs_jpeg", "svs_j2k", "ome_tiff", "generic_tiff", "png_image"])
@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_truncated_slide(request: pytest.FixtureRequest, tmp_path: Path, truncate_slide, fixture: str,
                         fraction: float) -> None:
    src: Path = request.getfixturevalue(fixture)
    dst = truncate_slide(src, tmp_path / f"cut{''.join(src.suffixes)}", fraction=fraction)
    with pytest.raises(SlideError, match="truncated") as info:
        with open_slide(dst, mpp=0.25) as slide:
            slide.read(0, 0, slide.width, slide.height, mpp=0.25)
    assert str(dst) in str(info.value)


def test_ifd_chain_walker(tmp_path: Path, svs_jpeg: Path) -> None:
    import tifffile

    from wsi_mtl.slide._tiff import ifd_chain_broken

    assert not ifd_chain_broken(svs_jpeg)
    for bigtiff in (False, True):
        path = tmp_path / f"two{bigtiff}.tif"
        with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
            tif.write(np.zeros((32, 32, 3), np.uint8), photometric="rgb")
            tif.write(np.zeros((16, 16, 3), np.uint8), photometric="rgb")
        assert not ifd_chain_broken(path)
        with tifffile.TiffFile(path) as tif:
            second_ifd = tif.pages[1].offset
        data = path.read_bytes()
        cut = tmp_path / f"cut{bigtiff}.tif"
        cut.write_bytes(data[:second_ifd + 4])
        assert ifd_chain_broken(cut)
    not_tiff = tmp_path / "x.bin"
    not_tiff.write_bytes(b"\x89PNG....")
    assert not ifd_chain_broken(not_tiff)


@pytest.mark.parametrize(("fixture", "decoder"), [
    ("svs_jpeg", "tifffile-tiles"), ("svs_jpeg", "openslide"), ("svs_j2k", "openslide"),
    ("ome_tiff", "tifffile-tiles"), ("ome_tiff", "tifffile-zarr"),
])
def test_damaged_tile_raises_and_slide_recovers(request: pytest.FixtureRequest, tmp_path: Path, damage_slide,
                                                he_image: np.ndarray, fixture: str, decoder: str) -> None:
    src: Path = request.getfixturevalue(fixture)
    dst = tmp_path / f"damaged{''.join(src.suffixes)}"
    x, y, w, h = damage_slide(src, dst, level=0, tile_index=1)
    assert (x, y, w, h) == (256, 0, 256, 256)
    if decoder == "openslide":
        opened = Slide(OpenSlideReader.open(dst, direct=False))
    elif decoder == "tifffile-zarr":
        opened = Slide(TiffReader.open(dst, direct=False))
    else:
        opened = open_slide(dst)
    with opened as slide:
        assert slide.decoder == decoder
        with pytest.raises(DamagedRegionError, match=r"region x=300, y=10, w=50, h=50 \(level-0 px\)"):
            slide.read(300, 10, 50, 50, mpp=0.25)
        good = slide.read(0, 300, 200, 200, mpp=0.25)  # the reader recovered
        assert mean_abs(good, he_image[300:500, :200]) < 4
        with pytest.raises(DamagedRegionError):
            slide.read(150, 5, 100, 100, mpp=0.5)  # damaged again, still a clean error
        assert slide.read(0, 0, 128, 128, mpp=4.0).shape == (128, 128, 3)  # coarser level is intact


def test_read_argument_validation(svs_jpeg: Path) -> None:
    with open_slide(svs_jpeg) as slide:
        with pytest.raises(ValueError, match="size must be positive"):
            slide.read(0, 0, 0, 10, mpp=0.5)
        with pytest.raises(TypeError, match="x must be an integer"):
            slide.read(1.5, 0, 10, 10, mpp=0.5)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="mpp must be"):
            slide.read(0, 0, 10, 10, mpp=0)
        with pytest.raises(ValueError, match="mpp must be"):
            slide.thumbnail(mpp=-2)
        with pytest.raises(ValueError, match="mpp must be"):
            slide.read(0, 0, 10, 10, mpp=float("inf"))
        assert slide.thumbnail(mpp=100.0).shape == (3, 4, 3)  # very coarse previews are fine


def test_backend_choice(svs_jpeg: Path, png_image: Path) -> None:
    with open_slide(svs_jpeg, backend="openslide") as slide:
        assert slide.backend == "openslide"
    with pytest.raises(UnsupportedSlideError, match="cannot be read by the pillow backend"):
        open_slide(svs_jpeg, backend="pillow")
    with pytest.raises(UnsupportedSlideError, match="cannot be read by the openslide backend"):
        open_slide(png_image, backend="openslide")
    with pytest.raises(InputError, match="backend must be one of"):
        open_slide(svs_jpeg, backend="bioformats")


@pytest.mark.parametrize("fixture", ["svs_jpeg", "svs_j2k", "generic_tiff"])
def test_direct_tiles_equal_openslide_pixels(request: pytest.FixtureRequest, fixture: str) -> None:
    path = request.getfixturevalue(fixture)
    with open_slide(path, backend="tifffile") as fast, Slide(OpenSlideReader.open(path, direct=False)) as reference_slide:
        assert fast.decoder == "tifffile-tiles" and reference_slide.decoder == "openslide"
        for box, mpp in [((0, 0, 1536, 1024), 0.25), ((100, 50, 300, 200), 1.0), ((0, 0, 96, 64), 4.0)]:
            a, b = fast.read(*box, mpp=mpp), reference_slide.read(*box, mpp=mpp)
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


# -- the real sample ----------------------------------------------------------------------------
@pytest.mark.shared_data
def test_cmu_small_region(cmu_small: Path) -> None:
    with open_slide(cmu_small) as slide:
        assert (slide.width, slide.height) == (2220, 2967)
        assert slide.mpp == pytest.approx(0.499, abs=1e-3) and slide.mpp_source == "openslide"
        assert slide.vendor == "aperio" and slide.objective_power == 20
        assert set(slide.associated_images) == {"label", "macro", "thumbnail"}
        thumb = slide.thumbnail(mpp=8.0)
        assert thumb.shape == (186, 139, 3)
        assert 0 < (thumb.mean(axis=2) < 200).mean() < 0.9  # tissue and background both present
        tile = slide.read(500, 500, 256, 256, mpp=1.0)
        assert tile.shape == (256, 256, 3) and tile.std() > 5


@pytest.mark.shared_data
def test_cmu_direct_tiles_equal_openslide(cmu_small: Path) -> None:
    with open_slide(cmu_small) as fast, Slide(OpenSlideReader.open(cmu_small, direct=False)) as reference_slide:
        assert fast.decoder == "tifffile-tiles"
        a = fast.read(0, 0, 2220, 2967, mpp=fast.mpp)
        b = reference_slide.read(0, 0, 2220, 2967, mpp=fast.mpp)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


def test_thumbnail_never_decodes_level0(svs_jpeg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open_slide(svs_jpeg) as slide:
        levels_read: list[int] = []
        original = slide._reader.read_region

        def spy(level: int, *args: int) -> np.ndarray:
            levels_read.append(level)
            return original(level, *args)

        monkeypatch.setattr(slide._reader, "read_region", spy)
        slide.thumbnail(mpp=8.0)
        slide.thumbnail(mpp=1.0)
    assert levels_read and 0 not in levels_read


def test_flat_thumbnail_is_read_in_bands(png_image: Path, monkeypatch: pytest.MonkeyPatch, he_image: np.ndarray) -> None:
    import wsi_mtl.slide._slide as slide_module

    monkeypatch.setattr(slide_module, "_BAND_PIXELS", 1536 * 100)
    with open_slide(png_image) as slide:
        banded = slide.thumbnail(mpp=1.0)
    assert banded.shape == (256, 384, 3)
    assert mean_abs(banded, downsample_image(he_image, 4)) < 1


def test_ome_units_and_objective() -> None:
    from wsi_mtl.slide._tiff import _ome_metadata

    xml = ('<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Instrument><Objective '
           'NominalMagnification="40"/></Instrument><Image><Pixels PhysicalSizeX="250" PhysicalSizeXUnit="nm" '
           'PhysicalSizeY="0.00025" PhysicalSizeYUnit="mm"/></Image></OME>')
    (mx, my), power = _ome_metadata(xml)
    assert mx == pytest.approx(0.25) and my == pytest.approx(0.25) and power == 40
    assert _ome_metadata("<not xml") == (None, None)
    assert _ome_metadata('<OME><Image><Pixels PhysicalSizeX="1" PhysicalSizeXUnit="parsec"/></Image></OME>') == (None, None)


def test_tiff_resolution_in_inches(tmp_path: Path) -> None:
    import tifffile

    image = make_he_texture(64, 64, seed=0)
    path = tmp_path / "inch.tif"
    tifffile.imwrite(path, image, photometric="rgb", resolution=(50800, 50800), resolutionunit="INCH")  # 0.5 um
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx(0.5) and slide.mpp_source in ("tiff-resolution", "openslide")
    path72 = tmp_path / "dpi72.tif"
    tifffile.imwrite(path72, image, photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    with pytest.raises(MissingMppError):
        open_slide(path72)


def test_openslide_tiff_resolution_property_fallback() -> None:
    from wsi_mtl.slide._openslide import _tiff_resolution_mpp

    assert _tiff_resolution_mpp({"tiff.ResolutionUnit": "centimeter", "tiff.XResolution": "40000",
                                 "tiff.YResolution": "40000"}) == (0.25, 0.25)
    assert _tiff_resolution_mpp({"tiff.ResolutionUnit": "inch", "tiff.XResolution": "101600"}) == (0.25, 0.25)
    assert _tiff_resolution_mpp({"tiff.ResolutionUnit": "none", "tiff.XResolution": "1"}) is None
    assert _tiff_resolution_mpp({}) is None


def test_segment_cache_is_a_byte_bounded_lru() -> None:
    from wsi_mtl.slide._tiles import _SegmentCache

    cache = _SegmentCache(capacity=300)
    a, b, c = (np.zeros(100, np.uint8) for _ in range(3))
    cache.put((0, 1), a)
    cache.put((0, 2), b)
    cache.put((0, 3), c)
    assert cache.get((0, 1)) == (a, True)  # refreshes (0, 1)
    cache.put((0, 4), np.zeros(100, np.uint8))  # evicts the least recently used: (0, 2)
    assert cache.get((0, 2))[0] is None and cache.get((0, 3))[0] is c and cache.get((0, 1))[0] is a
    cache.put((0, 5), np.zeros(1000, np.uint8))  # larger than the whole cache: not kept
    assert cache.get((0, 5))[0] is None
    assert not a.flags.writeable  # cached segments are shared read-only
    assert (cache.hits, cache.misses) == (3, 2)


def test_limit_tile_cache_evicts_and_never_grows_the_cache(svs_jpeg: Path) -> None:
    with open_slide(svs_jpeg) as slide:
        cache = slide._reader._tiles._cache
        slide.read(0, 0, 1024, 1024, mpp=0.25)
        assert cache._bytes > 100_000
        slide.limit_tile_cache(100_000)
        assert cache.capacity == 100_000 and cache._bytes <= 100_000  # least recently used dropped at once
        slide.limit_tile_cache(10**9)  # a limit, not a size: the cache stays as small as it was made
        assert cache.capacity == 100_000
        slide.read(0, 0, 1024, 1024, mpp=0.25)
        assert cache._bytes <= 100_000


def test_planned_reads_keep_only_the_tiles_they_share(svs_jpeg: Path) -> None:
    """After plan_reads, a decoded tile is kept until the last announced read that needs it: the
    second read of shared tiles hits the cache, tiles one read needs are never kept, the cache is
    empty once the plan is read, and the pixels are those of reads without a plan."""
    regions = [(x, y, 700, 700) for y in (0, 600) for x in (0, 600)]  # neighbours overlapping by 100 px
    with open_slide(svs_jpeg) as slide:
        slide.limit_tile_cache(0)
        want = [slide.read(*r, mpp=0.25) for r in regions]
    with open_slide(svs_jpeg) as slide:
        cache = slide._reader._tiles._cache
        slide.plan_reads(regions, mpp=0.25)
        got = []
        for r in regions:
            got.append(slide.read(*r, mpp=0.25))
            assert all(cache._uses[0][key[1]] > 0 for key in cache._items)  # only tiles still wanted
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
        level = slide._reader._tiles._levels[0]  # 256 px tiles
        tiles = [{row * level.cols + col for row in range(y // 256, (min(y + 700, level.height) - 1) // 256 + 1)
                  for col in range(x // 256, (min(x + 700, level.width) - 1) // 256 + 1)} for x, y, _, _ in regions]
        reads = sum(len(t) for t in tiles)
        assert cache.misses == len(set().union(*tiles)) and cache.hits == reads - cache.misses > 0
        assert cache._bytes == 0 and not cache._items
        slide.read(0, 0, 300, 300, mpp=0.25)  # reads no plan names: kept as before any plan
        assert cache._items
    coarse = [(x, y, 350, 350) for y in (0, 300) for x in (0, 300)]  # at 0.5 um/px: resampled reads
    with open_slide(svs_jpeg) as slide:
        cache = slide._reader._tiles._cache
        slide.plan_reads(coarse, mpp=0.5)
        for r in coarse:
            slide.read(*r, mpp=0.5)
        assert cache.hits > 0 and cache._bytes == 0 and not cache._items  # the plan named exactly the tiles read


def test_repeated_reads_hit_the_segment_cache(svs_jpeg: Path) -> None:
    with open_slide(svs_jpeg) as slide:
        cache = slide._reader._tiles._cache
        first = slide.read(100, 100, 300, 300, mpp=0.25)
        misses = cache.misses
        second = slide.read(100, 100, 300, 300, mpp=0.25)
        assert cache.misses == misses and cache.hits >= 4
        np.testing.assert_array_equal(first, second)
        first[:] = 0  # callers own what read() returns
        np.testing.assert_array_equal(slide.read(100, 100, 300, 300, mpp=0.25), second)


def test_openslide_damage_in_one_thread_does_not_fail_others(svs_jpeg: Path, tmp_path: Path, damage_slide) -> None:
    """A decode error poisons an OpenSlide handle; concurrent good reads must still succeed."""
    dst = tmp_path / "damaged.svs"
    damage_slide(svs_jpeg, dst, level=0, tile_index=1)
    errors: list[BaseException] = []
    damaged = [0]
    with Slide(OpenSlideReader.open(dst, direct=False)) as slide:
        expected = slide.read(0, 512, 256, 256, mpp=0.25)

        def bad() -> None:
            for _ in range(15):
                try:
                    slide.read(300, 0, 64, 64, mpp=0.25)
                except DamagedRegionError:
                    damaged[0] += 1

        def good() -> None:
            try:
                for _ in range(15):
                    np.testing.assert_array_equal(slide.read(0, 512, 256, 256, mpp=0.25), expected)
            except BaseException as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

        threads = [threading.Thread(target=bad)] + [threading.Thread(target=good) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert damaged[0] == 15
    assert not errors, errors[0]


@pytest.mark.parametrize("k", [2, 3])
def test_reduce_rgb_gives_pillows_reduce(k: int) -> None:
    """The compiled 2x2 reduction (and Pillow for other factors) returns Image.reduce's bytes, for
    boxes anywhere in the source, including its last rows and columns."""
    from wsi_mtl.slide import _reduce

    rng = np.random.default_rng(k)
    src = rng.integers(0, 256, (101, 87, 3), dtype=np.uint8)
    src[:5] = 255  # the sum's upper end: 4 x 255 + 2 fits the kernel's uint16
    for x0, y0 in [(0, 0), (1, 3), (87 - 4 * k, 101 - 6 * k)]:
        box = (x0, y0, x0 + (87 - x0) // k * k, y0 + (101 - y0) // k * k)
        ref = np.asarray(Image.fromarray(src).reduce(k, box=box))
        got = _reduce.reduce_rgb(src, k, box)
        assert got.dtype == np.uint8 and np.array_equal(got, ref), (x0, y0)
    if k == 2 and _reduce._compiled() is not None:
        box = (1, 1, 81, 99)
        got = _reduce._compiled()(src.reshape(101, -1), 1, 1, 49, 40).reshape(49, 40, 3)
        assert np.array_equal(got, np.asarray(Image.fromarray(src).reduce(2, box=box)))


def test_resample_by_two_uses_the_compiled_reduction(monkeypatch: pytest.MonkeyPatch) -> None:
    from wsi_mtl.slide import _slide

    calls = []
    real = _slide.reduce_rgb
    monkeypatch.setattr(_slide, "reduce_rgb", lambda *a: calls.append(a[1]) or real(*a))
    src = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    out = _resample(src, 30, 31, (2.0, 1.0, 62.0, 63.0), 2.0)
    assert calls == [2]
    assert np.array_equal(out, np.asarray(Image.fromarray(src).reduce(2, box=(2, 1, 62, 63))))

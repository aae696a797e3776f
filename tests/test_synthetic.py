"""Synthetic slide writers: every file opens in OpenSlide and tifffile independently, with the right
levels, mpp and pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from wsi_mtl import synthetic
from wsi_mtl.synthetic import (
    damage_tile,
    downsample_image,
    make_he_texture,
    truncate_file,
    write_generic_tiff,
    write_mosaic_slide,
    write_ome_tiff,
    write_svs,
)


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_texture_is_he_like_and_deterministic() -> None:
    image = make_he_texture(400, 600, seed=5)
    assert image.shape == (400, 600, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, make_he_texture(400, 600, seed=5))
    assert not np.array_equal(image, make_he_texture(400, 600, seed=6))
    background = image.min(axis=2) > 225
    assert 0.25 < background.mean() < 0.75  # both tissue and background
    assert background[0].all() and background[:, -1].all()  # white margin
    tissue = image[~background].astype(int)
    assert (tissue[:, 0] > tissue[:, 1]).mean() > 0.9  # pink/purple: red above green
    nuclei = (image[..., 0] < 140) & (image[..., 2] > image[..., 1])  # dark purple
    assert nuclei.mean() > 0.01


def test_texture_validation() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        make_he_texture(8, 100)
    with pytest.raises(ValueError, match="tissue_fraction"):
        make_he_texture(64, 64, tissue_fraction=1.5)


def test_downsample_image() -> None:
    image = np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)
    out = downsample_image(image, 2)
    assert out.shape == (3, 3, 3)
    assert out[0, 0, 0] == round(image[:2, :2, 0].mean())
    assert out[2, 0, 0] == round((int(image[4, 0, 0]) + int(image[4, 1, 0]) + 2 * 255) / 4)  # white padding
    assert downsample_image(image, 1) is image
    with pytest.raises(ValueError, match="positive integer"):
        downsample_image(image, 0)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return make_he_texture(600, 800, seed=11)


@pytest.mark.parametrize(("compression", "tolerance", "codec"), [("jpeg", 4.0, 7), ("jpeg2000", 1.5, 33005)])
def test_svs_opens_in_openslide_and_tifffile(tmp_path: Path, image: np.ndarray, compression: str,
                                             tolerance: float, codec: int) -> None:
    path = write_svs(tmp_path / "s.svs", image, mpp=0.25, compression=compression, levels=(1, 4), objective_power=40)
    with openslide.OpenSlide(path) as slide:
        assert slide.properties["openslide.vendor"] == "aperio"
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        assert slide.properties["openslide.objective-power"] == "40"
        assert slide.level_dimensions == ((800, 600), (200, 150))
        assert set(slide.associated_images) == {"thumbnail", "label", "macro"}
        level0 = np.asarray(slide.read_region((0, 0), 0, (800, 600)))[..., :3]
        level1 = np.asarray(slide.read_region((0, 0), 1, (200, 150)))[..., :3]
    assert mean_abs(level0, image) < tolerance
    assert mean_abs(level1, downsample_image(image, 4)) < tolerance
    with tifffile.TiffFile(path) as tif:
        assert tif.is_svs
        assert tif.pages[0].description.startswith("Aperio Image Library")
        assert "|MPP = 0.2500|" in tif.pages[0].description and "AppMag = 40" in tif.pages[0].description
        assert tif.pages[0].compression == codec and tif.pages[0].is_tiled
        assert len(tif.series[0].levels) == 2
        assert mean_abs(tif.series[0].levels[0].asarray(), image) < tolerance


def test_svs_without_metadata(tmp_path: Path, image: np.ndarray) -> None:
    path = write_svs(tmp_path / "bare.svs", image, mpp=None, objective_power=None, levels=(1,), label=False)
    with openslide.OpenSlide(path) as slide:
        assert "openslide.mpp-x" not in slide.properties
        assert "openslide.objective-power" not in slide.properties
        assert slide.level_count == 1 and set(slide.associated_images) == {"thumbnail"}


def test_ome_tiff(tmp_path: Path, image: np.ndarray) -> None:
    path = write_ome_tiff(tmp_path / "s.ome.tif", image, mpp=0.5, levels=(1, 2, 4))
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        assert 'PhysicalSizeX="0.5"' in tif.ome_metadata and "PhysicalSizeXUnit=\"µm\"" in tif.ome_metadata
        levels = tif.series[0].levels
        assert [lv.shape for lv in levels] == [(600, 800, 3), (300, 400, 3), (150, 200, 3)]
        assert mean_abs(levels[2].asarray(), downsample_image(image, 4)) < 4
    with openslide.OpenSlide(path) as slide:  # OpenSlide sees the base image as a generic TIFF
        assert slide.dimensions == (800, 600)
        assert mean_abs(np.asarray(slide.read_region((0, 0), 0, (800, 600)))[..., :3], image) < 4


def test_generic_tiff(tmp_path: Path, image: np.ndarray) -> None:
    path = write_generic_tiff(tmp_path / "g.tif", image, mpp=0.5, levels=(1, 4), compression="deflate")
    with openslide.OpenSlide(path) as slide:
        assert slide.properties["openslide.vendor"] == "generic-tiff"
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert slide.level_dimensions == ((800, 600), (200, 150))
        np.testing.assert_array_equal(np.asarray(slide.read_region((0, 0), 0, (800, 600)))[..., :3], image)
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].tags["ResolutionUnit"].value == 3
        np.testing.assert_array_equal(tif.series[0].levels[0].asarray(), image)
        np.testing.assert_array_equal(tif.series[0].levels[1].asarray(), downsample_image(image, 4))


def test_writer_validation(tmp_path: Path, image: np.ndarray) -> None:
    with pytest.raises(ValueError, match="levels must start at 1"):
        write_svs(tmp_path / "a.svs", image, levels=(2, 4))
    with pytest.raises(ValueError, match="levels must start at 1"):
        write_svs(tmp_path / "a.svs", image, levels=(1, 4, 4))
    with pytest.raises(ValueError, match="compression must be"):
        write_svs(tmp_path / "a.svs", image, compression="webp")
    with pytest.raises(ValueError, match="multiple of 16"):
        write_svs(tmp_path / "a.svs", image, tile=100)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        write_ome_tiff(tmp_path / "a.ome.tif", image[..., 0])
    with pytest.raises(ValueError, match="one level only"):
        write_generic_tiff(tmp_path / "a.tif", image, tile=None, levels=(1, 2))
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_mosaic_streams_real_looking_tiles(tmp_path: Path) -> None:
    sources = []
    for seed in range(3):
        src = tmp_path / f"src{seed}.png"
        Image.fromarray(make_he_texture(544, 544, seed=seed, tissue_fraction=0.9)).save(src)
        sources.append(src)
    path = write_mosaic_slide(tmp_path / "mosaic.svs", sources=sources, height=1500, width=2600, levels=(1, 4, 16))
    with openslide.OpenSlide(path) as slide:
        assert slide.properties["openslide.vendor"] == "aperio"
        assert slide.level_dimensions == ((2600, 1500), (650, 375), (163, 94))
        assert "thumbnail" in slide.associated_images
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        level0 = np.asarray(slide.read_region((0, 0), 0, (2600, 1500)))[..., :3]
        level1 = np.asarray(slide.read_region((0, 0), 1, (650, 375)))[..., :3]
    assert mean_abs(level1, downsample_image(level0, 4)) < 4  # levels agree
    assert (level0[:512] > 240).all()  # the border cells are background
    with tifffile.TiffFile(path) as tif:
        assert tif.is_svs and len(tif.series[0].levels) == 3
    cells = level0[:1024, :2560].reshape(2, 512, 5, 512, 3)
    filled = cells.std(axis=(1, 3, 4)) > 10
    assert filled.any() and not filled.all()


def test_mosaic_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one source"):
        write_mosaic_slide(tmp_path / "m.svs", sources=[], height=100, width=100)
    with pytest.raises(ValueError, match="multiple of the largest level factor"):
        write_mosaic_slide(tmp_path / "m.svs", sources=["x.png"], height=100, width=100, cell=500)
    with pytest.raises(ValueError, match="slide size must be positive"):
        write_mosaic_slide(tmp_path / "m.svs", sources=["x.png"], height=0, width=100)


@pytest.mark.shared_data
def test_mosaic_from_glas(tmp_path: Path, shared_data: Path) -> None:
    sources = sorted((shared_data / "glands" / "glas").rglob("*.bmp"))[:4] or sorted(
        (shared_data / "glands" / "glas").rglob("*.png"))[:4]
    if not sources:
        pytest.skip("no GlaS images found under shared data")
    path = write_mosaic_slide(tmp_path / "glas.svs", sources=sources, height=1536, width=1536, mpp=0.62, levels=(1, 4))
    with openslide.OpenSlide(path) as slide:
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.62)
        assert slide.level_count == 2


def test_truncate_and_damage_helpers(tmp_path: Path, image: np.ndarray) -> None:
    src = write_svs(tmp_path / "s.svs", image, levels=(1, 4))
    cut = truncate_file(src, tmp_path / "cut.svs", fraction=0.25)
    assert cut.stat().st_size == int(src.stat().st_size * 0.25)
    with pytest.raises(ValueError, match="fraction"):
        truncate_file(src, tmp_path / "x.svs", fraction=1.0)
    box = damage_tile(src, tmp_path / "bad.svs", level=1, tile_index=0)
    assert box == (0, 0, 1024, 1024)
    with openslide.OpenSlide(tmp_path / "bad.svs") as slide, pytest.raises(openslide.OpenSlideError):
        slide.read_region((0, 0), 1, (16, 16))
    with pytest.raises(ValueError, match="level must be"):
        damage_tile(src, tmp_path / "bad2.svs", level=5)
    with pytest.raises(ValueError, match="tile_index must be"):
        damage_tile(src, tmp_path / "bad3.svs", tile_index=999)
    flat = write_generic_tiff(tmp_path / "flat.tif", image, tile=None, levels=(1,))
    with pytest.raises(ValueError, match="not tiled"):
        damage_tile(flat, tmp_path / "bad4.tif")


def test_public_names() -> None:
    assert set(synthetic.__all__) >= {"make_he_texture", "write_svs", "write_ome_tiff", "write_generic_tiff",
                                      "write_mosaic_slide"}

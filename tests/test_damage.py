"""Damaged tiles: corrupt JPEG data is detected as OpenSlide does, stored as "no data", and a slide
that is mostly unreadable fails (exit 15) instead of finishing with no objects."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from wsi_mtl import synthetic
from wsi_mtl.damage import MAX_DAMAGED_FRACTION, check_damage, damaged_fraction
from wsi_mtl.engine import _blank_damaged, damaged_regions
from wsi_mtl.errors import DamagedRegionError, DamagedSlideError
from wsi_mtl.slide import open_slide
from wsi_mtl.tiling import Tile
from wsi_mtl.tissue import TissueMask, compute_tissue_mask

FAST = ["--device", "cpu", "--tile-size", "256", "--batch-size", "1", "--quiet"]


def zero_every(src: Path, dst: Path, *, start: int = 300_000, step: int = 100_000, length: int = 1500) -> Path:
    """Copy ``src`` with ``length`` bytes zeroed every ``step`` bytes from ``start`` (disk-sector damage)."""
    data = bytearray(src.read_bytes())
    for offset in range(start, len(data), step):
        data[offset:offset + length] = bytes(min(length, len(data) - offset))
    dst.write_bytes(bytes(data))
    return dst


def zero_level0_tiles(src: Path, dst: Path) -> None:
    """Copy ``src`` with the compressed bytes of every level-0 tile zeroed."""
    shutil.copyfile(src, dst)
    with tifffile.TiffFile(dst) as tif:
        page = tif.series[0].levels[0].pages[0]
        spans = list(zip(page.dataoffsets, page.databytecounts))
    with open(dst, "r+b") as fh:
        for offset, count in spans:
            fh.seek(offset)
            fh.write(bytes(count))


def openslide_refused_tiles(path: Path) -> set[tuple[int, int, int, int]]:
    """Level-0 boxes of the tiles OpenSlide refuses to read (each read on a fresh handle: an error
    leaves an OpenSlide handle unusable)."""
    import openslide

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        tw, th, width, height = page.tilewidth, page.tilelength, page.imagewidth, page.imagelength
    refused = set()
    for y in range(0, height, th):
        for x in range(0, width, tw):
            handle = openslide.OpenSlide(path)
            try:
                handle.read_region((x, y), 0, (tw, th))
            except openslide.OpenSlideError:
                refused.add((x, y, min(tw, width - x), min(th, height - y)))
            finally:
                handle.close()
    return refused


# -- strict JPEG decoding -----------------------------------------------------------------------

def test_strict_decoding_keeps_the_pixels(svs_jpeg):
    with open_slide(svs_jpeg) as slide:
        level = slide._reader._tiles._levels[0]
        assert level.strict is not None, "JPEG tiles must be decoded strictly"
        strict = slide.read(0, 0, slide.width, slide.height, mpp=slide.mpp)
        level.strict = None
        slide._reader._tiles._cache = None
        plain = slide.read(0, 0, slide.width, slide.height, mpp=slide.mpp)
    np.testing.assert_array_equal(strict, plain)


def test_strict_decoding_keeps_the_pixels_of_the_sample(cmu_small):
    with open_slide(cmu_small) as slide:
        strict = slide.read(0, 0, slide.width, slide.height, mpp=slide.mpp)
        slide._reader._tiles._levels[0].strict = None
        slide._reader._tiles._cache = None
        plain = slide.read(0, 0, slide.width, slide.height, mpp=slide.mpp)
    np.testing.assert_array_equal(strict, plain)


@pytest.mark.parametrize("photometric", ["rgb", "ycbcr", "minisblack"])
def test_strict_decoding_of_jpeg_tiffs(tmp_path, photometric):
    from wsi_mtl.slide._tiles import SegmentReader

    image = synthetic.make_he_texture(512, 768, seed=1)
    data = image[..., 1] if photometric == "minisblack" else image
    path = tmp_path / "j.tif"
    tifffile.imwrite(path, data, tile=(256, 256), compression="jpeg", photometric=photometric)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        reader = SegmentReader(path, [page], cache_bytes=0)
        assert reader._levels[0].strict is not None
        strict = reader.read(0, 0, 0, 512, 768)
        reader._levels[0].strict = None
        np.testing.assert_array_equal(strict, reader.read(0, 0, 0, 512, 768))
        offset, count = int(page.dataoffsets[4]), int(page.databytecounts[4])
    reader.close()
    raw = bytearray(path.read_bytes())
    raw[offset + count // 2:offset + count // 2 + 200] = bytes(200)  # inside the entropy-coded data
    path.write_bytes(bytes(raw))
    with tifffile.TiffFile(path) as tif:
        reader = SegmentReader(path, [tif.pages[0]], cache_bytes=0)
        with pytest.raises(DamagedRegionError) as info:
            reader.read(0, 0, 0, 512, 768)
        reader.close()
    assert info.value.boxes == [(256, 256, 256, 256)] and "Corrupt JPEG data" in info.value.reasons[0]


def test_corrupt_jpeg_tiles_are_the_ones_openslide_refuses(cmu_small, tmp_path):
    bad = zero_every(cmu_small, tmp_path / "zeroed.svs")
    refused = openslide_refused_tiles(bad)
    assert len(refused) >= 5  # the zeroed bytes fall inside JPEG tile data
    with open_slide(bad) as slide:
        with pytest.raises(DamagedRegionError) as info:
            slide.read(0, 0, slide.width, slide.height, mpp=slide.mpp)
        clean = open_slide(cmu_small).read(0, 0, slide.width, slide.height, mpp=slide.mpp)
    assert set(info.value.boxes) == refused
    assert all("Corrupt JPEG data" in r for r in info.value.reasons)
    image = info.value.image
    inside = np.zeros(image.shape[:2], bool)
    for x, y, w, h in refused:
        inside[y:y + h, x:x + w] = True
    assert (image[inside] == 255).all(), "damaged tiles are left white, not noise"
    np.testing.assert_array_equal(image[~inside], clean[~inside])


def test_damaged_thumbnail_tiles_count_as_tissue(tmp_path):
    background = np.full((512, 512, 3), 255, np.uint8)
    background[:256, :256] = synthetic.make_he_texture(256, 256, seed=3)
    src = synthetic.write_svs(tmp_path / "one.svs", background, mpp=0.5, levels=(1,))
    bad = tmp_path / "bad.svs"
    box = synthetic.damage_tile(src, bad, level=0, tile_index=3)  # a background tile
    with open_slide(bad) as slide:
        tissue = compute_tissue_mask(slide, mask_mpp=8.0)
    ds = 16  # level-0 px per mask px
    x, y, w, h = box
    assert tissue.mask[y // ds:(y + h) // ds, x // ds:(x + w) // ds].all()


# -- "no data" in the maps ----------------------------------------------------------------------

def test_blank_damaged_zeroes_exactly_the_damaged_cells():
    tile = Tile(row=0, col=1, y0=0, x0=100, height=100, width=100)
    cores = {"pixel": np.full((2, 100, 100), 7, np.uint8), "patch": np.full((3, 25, 25), 7, np.uint8)}
    # level-0 box x 240..280, y 20..60 at 2 level-0 px per model px: model x 120..140, y 10..30
    _blank_damaged(cores, tile, [{"x": 240, "y": 20, "width": 40, "height": 40}], 2.0, {"pixel": 1, "patch": 4})
    pixel = cores["pixel"][0] == 0
    assert pixel[10:30, 20:40].all() and pixel.sum() == 400
    patch = cores["patch"][0] == 0
    assert patch[2:8, 5:10].all() and patch.sum() == 30  # cells touched by the box, rounded outwards


def test_damaged_regions_are_flattened_and_listed_once():
    a = {"x": 0, "y": 0, "width": 10, "height": 10, "error": "e"}
    b = {"x": 10, "y": 0, "width": 10, "height": 10, "error": "e"}
    whole = {"x": 50, "y": 50, "width": 20, "height": 20, "error": "w"}
    assert damaged_regions([{"regions": [a, b]}, {"regions": [b]}, whole]) == [a, b, whole]


# -- warn or fail -------------------------------------------------------------------------------

def test_damaged_fraction_is_of_the_tissue():
    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True  # left half is tissue; mask px = 16 level-0 px at 0.5 um/px
    tissue = TissueMask(mask=mask, mpp=8.0)
    left = {"x": 0, "y": 0, "width": 80, "height": 80}
    right = {"x": 80, "y": 0, "width": 80, "height": 160}
    assert damaged_fraction([left], tissue, slide_mpp=0.5) == pytest.approx(0.5)
    assert damaged_fraction([right], tissue, slide_mpp=0.5) == 0.0
    empty = TissueMask(mask=np.zeros((10, 10), bool), mpp=8.0)
    assert damaged_fraction([left], empty, slide_mpp=0.5) == pytest.approx(0.25)  # whole extent


def test_check_damage_warns_once_below_and_fails_above(caplog, monkeypatch):
    monkeypatch.delenv("WSIMTL_MAX_DAMAGED_FRACTION", raising=False)
    tissue = TissueMask(mask=np.ones((10, 10), bool), mpp=8.0)
    few = [{"x": 0, "y": 0, "width": 160, "height": 16 * 4}]  # 40%
    with caplog.at_level(logging.WARNING):
        assert check_damage(few, tissue, slide_mpp=0.5, name="s.svs") == pytest.approx(0.4)
    assert len(caplog.records) == 1 and "s.svs" in caplog.records[0].getMessage()
    assert check_damage([], tissue, slide_mpp=0.5, name="s.svs") == 0.0
    many = [{"x": 0, "y": 0, "width": 160, "height": 16 * 6}]  # 60%
    assert 0.4 < MAX_DAMAGED_FRACTION < 0.6
    with pytest.raises(DamagedSlideError) as info:
        check_damage(many, tissue, slide_mpp=0.5, name="s.svs")
    assert info.value.exit_code == 15 and "60%" in str(info.value) and "\n" not in str(info.value)
    monkeypatch.setenv("WSIMTL_MAX_DAMAGED_FRACTION", "0.3")
    with pytest.raises(DamagedSlideError):
        check_damage(few, tissue, slide_mpp=0.5, name="s.svs")


# -- end to end ---------------------------------------------------------------------------------

def wsimtl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wsi_mtl", *args], capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_zeroed_sample_reports_the_refused_tiles_and_stores_no_data(cmu_small, tmp_path):
    import zarr

    bad = zero_every(cmu_small, tmp_path / "zeroed.svs")
    # engine tiles of 768 px (fewer than 256 px ones): the damaged regions are the slide's own JPEG tiles, whatever the engine's
    proc = wsimtl("segment", str(bad), "-o", str(tmp_path / "out"), "--no-objects", "--device", "cpu", "--tile-size", "768",
                  "--batch-size", "1", "--quiet")
    assert proc.returncode == 0, proc.stderr
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("WARNING")]
    assert len(warnings) == 1 and "damaged regions" in warnings[0], proc.stderr
    run = json.loads((tmp_path / "out" / "zeroed" / "run.json").read_text())
    boxes = {(r["x"], r["y"], r["width"], r["height"]) for r in run["damaged_regions"]}
    assert boxes == openslide_refused_tiles(bad)
    assert 0 < run["inference"]["damaged_fraction"] <= MAX_DAMAGED_FRACTION
    maps = zarr.open_group(tmp_path / "out" / "zeroed" / "predictions.zarr", mode="r")
    ds = maps.attrs["wsimtl"]["downsample"]
    for name, head in maps.attrs["wsimtl"]["heads"].items():
        data = maps[name]["0"]
        f = ds * head["cell_px"]
        assert np.asarray(data).any(), name
        for x, y, w, h in boxes:  # map cells wholly inside a damaged tile hold no data
            i0, j0, i1, j1 = int(np.ceil(y / f)), int(np.ceil(x / f)), int((y + h) // f), int((x + w) // f)
            assert not np.asarray(data[:, i0:i1, j0:j1]).any(), (name, x, y)


@pytest.mark.slow
def test_unreadable_slide_fails_with_its_own_exit_code_and_a_failed_batch_row(tmp_path):
    image = synthetic.make_he_texture(512, 512, seed=5)
    folder = tmp_path / "slides"
    folder.mkdir()
    good = synthetic.write_svs(tmp_path / "good.svs", image, mpp=0.5, levels=(1, 4))
    zero_level0_tiles(good, folder / "dead.svs")
    shutil.copyfile(good, folder / "partly.svs")
    synthetic.damage_tile(good, folder / "partly.svs", level=0, tile_index=0)  # 1 of 4 tiles

    proc = wsimtl("segment", str(folder / "dead.svs"), "-o", str(tmp_path / "one"), "--no-tissue-mask", "--no-objects", *FAST)
    assert proc.returncode == DamagedSlideError.exit_code, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING")]
    assert len(errors) == 1 and "unreadable" in errors[0] and "Traceback" not in proc.stderr, proc.stderr
    run = tmp_path / "one" / "dead" / "run.json"
    assert not run.exists() or json.loads(run.read_text()).get("status") != "complete"

    proc = wsimtl("batch", str(folder), "-o", str(tmp_path / "batch"), "--no-tissue-mask", "--no-objects", *FAST)
    assert proc.returncode == 3, proc.stderr
    with (tmp_path / "batch" / "batch_summary.csv").open(newline="") as fh:
        rows = {row["id"]: row for row in csv.DictReader(fh)}
    assert rows["dead"]["status"] == "failed" and "unreadable" in rows["dead"]["error"]
    assert rows["partly"]["status"] == "done"
    partly = json.loads((tmp_path / "batch" / "partly" / "run.json").read_text())
    assert len(partly["damaged_regions"]) == 1 and partly["status"] == "complete"


# -- tifffile's zarr view (multi-page levels, planar layouts) -----------------------------------

def write_zarr_layout(path: Path, layout: str) -> tuple[Path, np.ndarray]:
    """A 512 x 768 JPEG slide, 128 px tiles, that wsimtl reads through tifffile's zarr view:
    "channels" (OME-TIFF, one page per channel, SubIFD pyramid), "planar" (separate RGB planes in
    one page), "stripped" (planar, in strips). Returns the path and the image it was made from."""
    image = synthetic.make_he_texture(512, 768, seed=1)
    planes = np.ascontiguousarray(np.moveaxis(image, 2, 0))
    if layout == "channels":
        meta = {"axes": "CYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5}
        with tifffile.TiffWriter(path, ome=True) as tw:
            tw.write(planes, subifds=1, tile=(128, 128), compression="jpeg", photometric="minisblack", metadata=meta)
            tw.write(planes[:, ::2, ::2], subfiletype=1, tile=(128, 128), compression="jpeg", photometric="minisblack")
    else:
        chunks = {"tile": (128, 128)} if layout == "planar" else {"rowsperstrip": 128}
        tifffile.imwrite(path, planes, photometric="rgb", planarconfig="separate", compression="jpeg",
                         resolution=(20000, 20000), resolutionunit="CENTIMETER", **chunks)
    return path, image


def damage_segment(path: Path, *, level: int = 0, page: int = 0, segment: int = 0) -> None:
    """Zero a third of one JPEG segment's entropy-coded bytes in place (libjpeg warns, imagecodecs decodes noise)."""
    with tifffile.TiffFile(path) as tif:
        target = tif.series[0].levels[level].pages[page]
        offset, count = int(target.dataoffsets[segment]), int(target.databytecounts[segment])
    with open(path, "r+b") as fh:
        fh.seek(offset + count // 3)
        fh.write(bytes(count // 3))


def tifffile_level(path: Path, level: int) -> np.ndarray:
    """tifffile's own (lenient, imagecodecs) decode of a level as (h, w, 3)."""
    data = tifffile.imread(path, level=level)
    return np.moveaxis(data, 0, 2) if data.shape[0] == 3 else data


@pytest.mark.parametrize("layout", ["channels", "planar", "stripped"])
def test_zarr_view_decodes_jpeg_strictly_with_the_same_pixels(tmp_path, layout):
    path, _ = write_zarr_layout(tmp_path / f"{layout}.tif", layout)
    with open_slide(path, backend="tifffile") as slide:
        assert slide.decoder == "tifffile-zarr"
        for level, (width, height, ds) in enumerate(slide.levels):
            image = slide.read(0, 0, width, height, mpp=slide.mpp * ds)
            np.testing.assert_array_equal(image, tifffile_level(path, level))
        arrays = slide._reader._arrays()
        keyframe = slide._reader._handles[0].series[0].levels[0].keyframe
        assert "strict_page_decode" in keyframe.decode.__qualname__, "JPEG segments must be decoded strictly"
        assert len(arrays) == len(slide.levels)


@pytest.mark.parametrize(("layout", "page", "segment", "box"), [
    ("channels", 1, 9, (384, 128, 128, 128)),  # green channel, row 1, column 3 of 6 tiles
    ("planar", 0, 48, (0, 0, 128, 128)),       # blue plane (segments 48-71), first tile
    ("stripped", 0, 3, (0, 384, 768, 128)),    # red plane, last strip
])
def test_zarr_view_reports_exactly_the_corrupt_tile(tmp_path, layout, page, segment, box):
    path, _ = write_zarr_layout(tmp_path / f"{layout}.tif", layout)
    clean = tifffile_level(path, 0)
    damage_segment(path, page=page, segment=segment)
    assert tifffile.imread(path).shape[0] == 3, "tifffile alone decodes the corrupt segment without a word"
    with open_slide(path, backend="tifffile") as slide:
        with pytest.raises(DamagedRegionError) as info:
            slide.read(0, 0, slide.width, slide.height, mpp=slide.mpp)
        outside = slide.read(0, 0, 128, 128, mpp=slide.mpp) if box[:2] != (0, 0) else None
    assert info.value.boxes == [box]
    assert "Corrupt JPEG data" in info.value.reasons[0]
    image = info.value.image
    x, y, w, h = box
    inside = np.zeros(image.shape[:2], bool)
    inside[y:y + h, x:x + w] = True
    assert (image[inside] == 255).all(), "the damaged tile is left white, not noise"
    np.testing.assert_array_equal(image[~inside], clean[~inside])
    if outside is not None:  # regions without the damaged tile read as before
        np.testing.assert_array_equal(outside, clean[:128, :128])


def test_zarr_view_damage_in_a_coarser_level_is_reported_in_level0_px(tmp_path):
    path, _ = write_zarr_layout(tmp_path / "channels.ome.tif", "channels")
    damage_segment(path, level=1, page=0, segment=4)  # level 1 is 256 x 384: 3 tiles a row
    with open_slide(path, backend="tifffile") as slide:
        damaged: list[tuple[int, int, int, int]] = []
        thumb = slide.thumbnail(mpp=slide.mpp * 2, damaged=damaged)
    assert damaged == [(256, 256, 256, 256)]
    assert (thumb[128:256, 128:256] == 255).all()


def test_zarr_view_keeps_the_pixels_of_the_sample(cmu_small, monkeypatch):
    from wsi_mtl.slide import _tiff
    from wsi_mtl.slide._tiff import TiffReader

    reader = TiffReader.open(cmu_small, direct=False)  # interleaved YCbCr JPEG tiles through zarr
    h, w = reader.shape
    strict = reader.read_region(0, 0, 0, h, w)
    reader.close()
    monkeypatch.setattr(_tiff, "make_strict", lambda tif, pages: 0)
    reader = TiffReader.open(cmu_small, direct=False)
    np.testing.assert_array_equal(strict, reader.read_region(0, 0, 0, h, w))
    reader.close()


def test_zeroed_sample_through_zarr_reports_the_tiles_openslide_refuses(cmu_small, tmp_path):
    from wsi_mtl.slide._tiff import TiffReader

    bad = zero_every(cmu_small, tmp_path / "zeroed.svs")
    reader = TiffReader.open(bad, direct=False)
    h, w = reader.shape
    with pytest.raises(DamagedRegionError) as info:
        reader.read_region(0, 0, 0, h, w)
    reader.close()
    assert set(info.value.boxes) == openslide_refused_tiles(bad)


@pytest.mark.slow
def test_damaged_ome_tiff_channel_tile_is_reported_and_holds_no_data(tmp_path):
    import zarr

    path, _ = write_zarr_layout(tmp_path / "chan.ome.tif", "channels")
    damage_segment(path, page=1, segment=9)  # level-0 tile at x=384, y=128
    proc = wsimtl("segment", str(path), "-o", str(tmp_path / "out"), "--no-tissue-mask", "--no-objects", *FAST)
    assert proc.returncode == 0, proc.stderr
    run = json.loads((tmp_path / "out" / "chan" / "run.json").read_text())
    boxes = [(r["x"], r["y"], r["width"], r["height"]) for r in run["damaged_regions"]]
    assert boxes == [(384, 128, 128, 128)]
    maps = zarr.open_group(tmp_path / "out" / "chan" / "predictions.zarr", mode="r")
    ds = maps.attrs["wsimtl"]["downsample"]
    for name, head in maps.attrs["wsimtl"]["heads"].items():
        f = ds * head["cell_px"]
        data = np.asarray(maps[name]["0"])
        assert data.any(), name
        assert not data[:, int(np.ceil(128 / f)):int(256 // f), int(np.ceil(384 / f)):int(512 // f)].any(), name

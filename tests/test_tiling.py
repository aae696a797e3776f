"""Tile geometry: cores cover the array exactly once, inputs always have the full size."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_mtl.tiling import kept_fraction, plan_tiles


@pytest.mark.parametrize("shape", [(1, 1), (31, 65), (256, 256), (257, 1000), (999, 333)])
@pytest.mark.parametrize("core,margin", [(32, 0), (64, 32), (128, 96)])
def test_cores_reassemble_the_array(shape, core, margin):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=shape, dtype=np.uint8)
    grid = plan_tiles(*shape, core_px=core, margin_px=margin, stride=32)
    out = np.zeros_like(image)
    hits = np.zeros(shape, dtype=np.int32)
    padded = np.pad(image, ((margin, grid.input_px), (margin, grid.input_px)), constant_values=0)
    for tile in grid.tiles():
        # the input region starts margin before the core and is always input_px wide
        inp = padded[tile.y0 : tile.y0 + grid.input_px, tile.x0 : tile.x0 + grid.input_px]
        assert inp.shape == (grid.input_px, grid.input_px)
        core_out = inp[margin : margin + tile.height, margin : margin + tile.width]
        out[tile.y0 : tile.y0 + tile.height, tile.x0 : tile.x0 + tile.width] = core_out
        hits[tile.y0 : tile.y0 + tile.height, tile.x0 : tile.x0 + tile.width] += 1
    np.testing.assert_array_equal(out, image)
    assert (hits == 1).all()


def test_sweep_awkward_sizes_cover_exactly():
    for size in range(1000, 1100, 7):
        grid = plan_tiles(size, size + 3, core_px=256, margin_px=64, stride=32)
        area = sum(t.height * t.width for t in grid.tiles())
        assert area == size * (size + 3)


def test_keep_predicate_filters_tiles():
    grid = plan_tiles(300, 300, core_px=100, margin_px=0)
    kept = list(grid.tiles(keep=lambda t: t.row == t.col))
    assert [t.key for t in kept] == [(0, 0), (1, 1), (2, 2)]


def test_kept_fraction_against_cerberus_scheme():
    cerberus = plan_tiles(144 * 10, 144 * 10, core_px=144, margin_px=152)
    assert kept_fraction(cerberus) == pytest.approx((144 / 448) ** 2)
    ours = plan_tiles(4096, 4096, core_px=1024, margin_px=128, stride=32)
    assert kept_fraction(ours) == pytest.approx((1024 / 1280) ** 2)
    assert kept_fraction(ours, []) == 0.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(height=0, width=10, core_px=32, margin_px=0), "empty"),
        (dict(height=10, width=10, core_px=48, margin_px=0, stride=32), "core_px=48"),
        (dict(height=10, width=10, core_px=64, margin_px=16, stride=32), "margin_px=16"),
        (dict(height=10, width=10, core_px=64, margin_px=-32, stride=32), "margin_px=-32"),
    ],
)
def test_bad_geometry_is_rejected(kwargs, match):
    h, w = kwargs.pop("height"), kwargs.pop("width")
    with pytest.raises(ValueError, match=match):
        plan_tiles(h, w, **kwargs)


def test_tile_outside_grid():
    grid = plan_tiles(100, 100, core_px=64, margin_px=0)
    with pytest.raises(IndexError):
        grid.tile(2, 0)

"""Tissue classes at the tissue's edge: cells whose classification window holds glass take the
class of the nearest cell whose window is tissue (``tissue_window_cells``), alike whole and chunked."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import shapely

from test_postprocess_extract import TISSUE, _assert_same_objects, _colors, _one_hot, write_predictions
from wsi_mtl.errors import InputError
from wsi_mtl.network import load_model
from wsi_mtl.postprocess import PostprocessParams, concat_batches, extract_objects, objects_from_maps, params_of
from wsi_mtl.postprocess._tissue import nearest_sources, window_sums

ON = PostprocessParams(tissue_window_cells=5)
#: the maps' common arguments: 2 level-0 px per model px, tissue classes named
MAPS = dict(slide_mpp=0.25, downsample=2.0, tasks=("tissue",), classes={"Patch-Class": (TISSUE, _colors(len(TISSUE)))})


def test_window_sums_are_the_sums_over_each_clipped_window():
    rng = np.random.default_rng(0)
    for shape, cells in (((7, 9), 3), ((12, 5), 5), ((1, 1), 5), ((6, 6), 1)):
        counts = rng.integers(0, 65, shape)
        h = cells // 2
        want = np.array([[counts[max(0, y - h) : y + h + 1, max(0, x - h) : x + h + 1].sum() for x in range(shape[1])]
                         for y in range(shape[0])])
        np.testing.assert_array_equal(window_sums(counts, cells), want)


def test_nearest_sources_takes_the_nearest_then_the_upper_then_the_left():
    rng = np.random.default_rng(1)
    for _ in range(20):
        todo, source = rng.random((11, 13)) < 0.4, rng.random((11, 13)) < 0.15
        cell, src = nearest_sources(todo, source, 3)
        got = dict(zip(cell.tolist(), src.tolist()))
        sy, sx = np.nonzero(source)
        for y, x in zip(*np.nonzero(todo)):
            d = (sy - y) ** 2 + (sx - x) ** 2
            near = [(int(d[k]), int(sy[k] - y), int(sx[k] - x), int(sy[k] * 13 + sx[k])) for k in range(len(sy)) if 0 < d[k] <= 9]
            assert got.get(int(y * 13 + x)) == (min(near)[3] if near else None)


def _rimmed() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A 40 x 48 cell tissue block (16 model px per cell, 2 level-0 px per model px) on glass:
    stroma inside, 'fat' in the two outer rings of cells and 'background' (the head's glass) on
    the outermost one, as a windowed head says next to glass; a tissue mask (8 level-0 px per
    pixel) that is tissue on the block only."""
    cls = np.full((48, 56), 0)
    cls[4:44, 4:52] = 3  # fat at the edge
    cls[6:42, 6:50] = 2  # stroma inside
    cls[4, 4:52] = 0  # the outermost tissue row called glass by the head
    mask = np.zeros((192, 224), bool)
    mask[16:176, 16:208] = True  # cells 4..44 x 4..52 (4 mask px per cell)
    maps = {"Nuclei-INST": np.zeros((3, 768, 896), np.uint8), "Patch-Class": _one_hot(cls, len(TISSUE), np.ones(cls.shape, bool))}
    return maps, mask


def _tissue(batch) -> dict[str, float]:
    task, names = batch.columns["task"], batch.columns["class_name"]
    return {n: float(shapely.union_all(batch.geometry[(task == "tissue") & (names == n)]).area) for n in set(names[task == "tissue"])}


def test_the_rim_a_window_with_glass_makes_takes_the_class_of_the_tissue_beside_it():
    maps, mask = _rimmed()
    common = dict(MAPS, tissue_mask=mask, mask_downsample=8.0)
    before = maps["Patch-Class"].copy()
    off = _tissue(objects_from_maps(maps, params=PostprocessParams(), **common))
    on = _tissue(objects_from_maps(maps, params=ON, **common))
    np.testing.assert_array_equal(maps["Patch-Class"], before)  # the caller's maps are left as they were
    block = 40 * 48 * 32**2  # level-0 px^2
    assert set(off) == {"stroma", "fat"} and off["fat"] + off["stroma"] == pytest.approx(block - 48 * 32**2)
    assert on == {"stroma": pytest.approx(block)}  # the head's glass row on tissue is stroma too
    # without the mask nothing tells glass from tissue: the head's classes stand
    assert set(_tissue(objects_from_maps(maps, params=ON, **MAPS))) == {"stroma", "fat"}


def test_a_strip_too_thin_for_a_whole_window_keeps_its_own_classes():
    cls = np.full((20, 30), 0)
    cls[8:11, 2:28] = 3  # three cells high: no window of 5 cells is tissue
    mask = np.zeros((80, 120), bool)
    mask[32:44, 8:112] = True
    maps = {"Nuclei-INST": np.zeros((3, 320, 480), np.uint8), "Patch-Class": _one_hot(cls, len(TISSUE), np.ones(cls.shape, bool))}
    got = objects_from_maps(maps, params=ON, **MAPS, tissue_mask=mask, mask_downsample=8.0)
    assert set(_tissue(got)) == {"fat"}


def test_chunks_give_the_edge_classes_of_the_whole_slide(tmp_path: Path):
    rng = np.random.default_rng(3)
    from scipy import ndimage as ndi

    cls = np.argmax(ndi.gaussian_filter(rng.random((4, 60, 70)), (0, 3, 3)), axis=0)
    mask = ndi.gaussian_filter(rng.random((240, 280)), 8) > 0.5
    computed = np.ones(cls.shape, bool)
    computed[-3:] = False  # the last rows were never computed
    maps = {"Nuclei-INST": np.zeros((3, 960, 1120), np.uint8), "Patch-Class": _one_hot(cls, len(TISSUE), computed)}
    whole = objects_from_maps(maps, params=ON, **MAPS, tissue_mask=mask, mask_downsample=8.0)
    store = write_predictions(tmp_path, maps, patch_cell_px=16, core_px=64, mask=mask, mask_downsample=8.0)
    chunked = concat_batches(list(extract_objects(store, tasks=("tissue",), chunk_px=16, params=ON)))
    _assert_same_objects(whole, chunked)
    plain = objects_from_maps(maps, params=PostprocessParams(), **MAPS, tissue_mask=mask, mask_downsample=8.0)
    assert _tissue(plain) != _tissue(whole)  # the setting changed something here


def test_a_model_runs_with_its_tissue_heads_window_and_the_setting_is_checked():
    model = load_model("wsimtl-small")
    assert model.config.postprocess_settings["tissue_window_cells"] == model.config.arch_params.patch_cells == 5
    assert params_of(model).tissue_window_cells == 5
    assert params_of(model, {"tissue_window_cells": 0}).tissue_window_cells == 0
    cfg = model.config.replace(extra={**model.config.extra, "postprocess": {"tissue_window_cells": 3}})
    assert cfg.postprocess_settings["tissue_window_cells"] == 3  # a model's own setting wins
    for bad in ({"tissue_window_cells": 4}, {"tissue_min_window_share": 1.5}):
        with pytest.raises(InputError, match="tissue_"):
            PostprocessParams().with_overrides(bad)


def _gland_at_the_edge() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A gland three fifths in a rim of 'stroma' (tissue where glands do not lie) that a windowed
    head puts along the tissue's edge, the rest in the 'tumour' inside (cells of 16 model px; 2
    level-0 px per model px)."""
    from wsi_mtl.postprocess import label_to_3class

    cls = np.zeros((16, 16), np.int64)
    cls[2:14, 2:14] = 2  # stroma along the edge
    cls[4:12, 4:12] = 1  # tumour inside
    mask = np.zeros((64, 64), bool)
    mask[8:56, 8:56] = True  # cells 2..13
    gland = np.zeros((256, 256), np.int32)
    gland[100:150, 36:84] = 1  # columns 36..63 in the rim (cells 2-3), 64..83 inside
    maps = {"Gland-INST": label_to_3class(gland, erosion_px=5), "Patch-Class": _one_hot(cls, len(TISSUE), np.ones(cls.shape, bool))}
    return maps, mask


@pytest.mark.parametrize("chunked", [False, True])
def test_the_gland_test_reads_the_edge_classes_the_tissue_map_shows(tmp_path: Path, chunked: bool):
    maps, mask = _gland_at_the_edge()
    base = PostprocessParams(gland_min_area_px=50, gland_max_nonglandular=0.5, gland_chunk_px=64, gland_halo_px=32)

    def glands(params: PostprocessParams) -> int:
        if chunked:
            store = write_predictions(tmp_path / str(params.tissue_window_cells), maps, core_px=64, mask=mask, mask_downsample=8.0)
            got = concat_batches(list(extract_objects(store, tasks=("gland",), chunk_px=64, params=params)))
        else:
            got = objects_from_maps(maps, params=params, **dict(MAPS, tasks=("gland",)), tissue_mask=mask, mask_downsample=8.0)
        return int((got.columns["task"] == "gland").sum())

    assert glands(base) == 0  # mostly in 'stroma': dropped
    assert glands(replace(base, tissue_window_cells=5)) == 1  # in the tumour the tissue map shows there

"""Whole-slide figures of `wsimtl evaluate`: gland area on tiles without glands, gland scores per
grade, lumen Dice against pseudo-labels, and objects on glass."""

from __future__ import annotations

import numpy as np
import pytest
import shapely

from wsi_mtl.network import create_model
from wsi_mtl.postprocess import PostprocessParams, gland_labels
from wsi_mtl.train import SegItem
from wsi_mtl.train import _evaluate
from wsi_mtl.train._data import _negative
from wsi_mtl.train._glass import area_outside

PARAMS = PostprocessParams(gland_threshold=0.5, gland_erosion_px=0, gland_min_area_px=10, gland_open_px=0, lumen_threshold=0.5, lumen_erosion_px=0,
                           lumen_min_area_px=4, lumen_min_inside=0.5)


def _fake_maps(square: tuple[slice, slice] | None, lumen: tuple[slice, slice] | None = None):
    """A predict_image stand-in: gland interior on ``square`` and lumen interior on ``lumen``."""

    def predict(model, image, *, heads=None, **kw):
        h, w = image.shape[:2]
        out = {}
        for name, where in (("Gland-INST", square), ("Lumen-INST", lumen)):
            p = np.zeros((3, h, w), np.float32)
            p[0] = 1.0
            if where is not None:
                p[:, where[0], where[1]] = np.array([0.0, 1.0, 0.0])[:, None, None]
            out[name] = p
        out["Patch-GlaS"] = np.full((2, 1, 1), 0.5, np.float32)
        return {k: v for k, v in out.items() if heads is None or k in heads}

    return predict


def test_non_gland_area_pools_pixels_per_source(monkeypatch):
    monkeypatch.setattr(_evaluate, "predict_image", _fake_maps((slice(10, 30), slice(10, 30)), (slice(15, 20), slice(15, 20))))
    items = [_negative("a", "glioma", np.zeros((60, 60, 3), np.uint8)), _negative("b", "glioma", np.zeros((40, 40, 3), np.uint8)),
             _negative("c", "lc25000", np.zeros((50, 50, 3), np.uint8))]
    model = create_model("wsimtl_small", seed=0)
    images: dict = {}
    res = _evaluate.non_gland_area(model, items, params=PARAMS, images=images)
    g = int((gland_labels(_fake_maps((slice(10, 30), slice(10, 30)))(None, np.zeros((60, 60, 3)))["Gland-INST"], PARAMS) > 0).sum())
    assert g >= 20 * 20
    assert res["by_source"]["glioma"]["gland_area_fraction"] == pytest.approx(2 * g / (60 * 60 + 40 * 40))
    assert res["by_source"]["lc25000"]["gland_area_fraction"] == pytest.approx(g / 2500)
    assert res["gland_area_fraction"] == pytest.approx(3 * g / (3600 + 1600 + 2500)) and res["n_images"] == 3
    assert 0 < res["lumen_area_fraction"] < res["gland_area_fraction"]
    assert set(images) == {"non_gland/glioma/a", "non_gland/glioma/b", "non_gland/lc25000/c"}
    monkeypatch.setattr(_evaluate, "predict_image", _fake_maps(None))
    assert _evaluate.non_gland_area(model, items, params=PARAMS)["gland_area_fraction"] == 0.0


def test_gland_scores_per_grade_and_lumen_dice(monkeypatch):
    monkeypatch.setattr(_evaluate, "predict_image", _fake_maps((slice(10, 30), slice(10, 30)), (slice(15, 25), slice(15, 25))))
    truth = np.zeros((60, 60), np.int32)
    truth[10:30, 10:30] = 1
    lumen = np.zeros((60, 60), np.int32)
    lumen[15:25, 15:20] = 1  # half of the predicted lumen
    benign = SegItem("b", "glas", "gland", np.zeros((60, 60, 3), np.uint8), truth, patch={"Patch-GlaS": 0}, lumen=lumen)
    wrong = np.zeros((60, 60), np.int32)
    wrong[40:58, 40:58] = 1  # the prediction misses this gland
    malignant = SegItem("m", "glas", "gland", np.zeros((60, 60, 3), np.uint8), wrong, patch={"Patch-GlaS": 1}, lumen=np.zeros((60, 60), np.int32))
    from wsi_mtl.train import Sources

    res = _evaluate.evaluate_sources(create_model("wsimtl_small", seed=0), Sources({"gland": [benign, malignant]}, {}), params=PARAMS, bf16=False)
    by = res["glands"]["by_grade"]
    assert by["benign"]["f1"] == pytest.approx(1.0) and by["malignant"]["f1"] == 0.0
    assert by["benign"]["n_images"] == by["malignant"]["n_images"] == 1
    pred = 100  # the 10 x 10 predicted lumen lies in the predicted gland
    assert res["lumen"]["dice"] == pytest.approx(2 * 50 / (pred + 50 + pred))
    assert res["lumen"]["n_images"] == 2 and "pseudo-labels" in res["lumen"]["truth"]
    assert "lumen" in _evaluate.format_table(res) and "f1 malignant" in _evaluate.format_table(res)


def test_area_outside_counts_object_pixels_off_the_tissue_mask():
    tissue = np.zeros((4, 4), bool)
    tissue[:, :2] = True  # left half tissue, mask pixel = 10 level-0 px
    inside = shapely.box(0, 0, 20, 40)
    straddling = shapely.box(10, 0, 30, 20)
    total, outside = area_outside([inside], tissue, 10.0, subdivide=2)
    assert (total, outside) == (32, 0)
    total, outside = area_outside([straddling], tissue, 10.0, subdivide=2)
    assert total == 16 and outside == 8
    total, outside = area_outside([inside, straddling], tissue, 10.0, subdivide=2)  # overlap counted once
    assert (total, outside) == (40, 8)
    assert area_outside([], tissue, 10.0, subdivide=2) == (0, 0)


def test_glass_is_skipped_with_a_note_without_the_slide(tmp_path):
    res = _evaluate._glass(create_model("wsimtl_small", seed=0), tmp_path / "none.svs", bf16=False, params=None)
    assert "skipped" in res


@pytest.mark.slow
def test_objects_on_glass_of_the_sample_slide(cmu_small):
    from wsi_mtl.network import load_model
    from wsi_mtl.train._glass import objects_on_glass

    res = objects_on_glass(load_model("wsimtl-small"), cmu_small, precision="fp32")
    assert res["tissue_area_mm2"] > 0.1 and 0.5 <= res["grid_um"] <= 2.0
    for task in ("gland", "lumen", "nuclei"):
        r = res[task]
        assert 0 <= r["outside_tissue_um2"] <= r["area_um2"] and 0 <= r["outside_fraction"] <= 1
        assert r["tissue_fraction"] == pytest.approx(r["area_um2"] / (res["tissue_area_mm2"] * 1e6))
    assert res["nuclei"]["n_objects"] > 100

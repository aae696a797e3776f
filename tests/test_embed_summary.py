"""Slide summaries (wsi_mtl.summary): tissue area, composition, nuclei density, glands; batch columns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from wsi_mtl.summary import slide_summary, summary_columns, summary_or_warning


@pytest.fixture
def result(tmp_path: Path) -> Path:
    """A result folder: a 10 x 20 mask of 16 level-0 px per pixel at 0.25 um/px (4 um/px), half tissue, and objects."""
    import geopandas as gpd
    from shapely.geometry import Point

    d = tmp_path / "r"
    d.mkdir()
    root = zarr.open_group(str(d / "predictions.zarr"), mode="w")
    g = root.create_group("tissue_mask")
    g.attrs["wsimtl"] = {"downsample": 16.0}
    mask = np.zeros((1, 10, 20), np.uint8)
    mask[0, :, :10] = 255  # 100 px of 16 um^2 = 1600 um^2 = 0.0016 mm^2
    g.create_array("0", shape=mask.shape, dtype="uint8")[...] = mask
    (d / "run.json").write_text(json.dumps({"slide": {"mpp": 0.25}}))
    rows = [("tissue", "tumor", 1200.0), ("tissue", "stroma", 400.0), ("gland", "gland", 800.0), ("gland", "gland", 200.0),
            ("lumen", "lumen", 100.0)] + [("nuclei", "epithelial", 30.0)] * 4 + [("nuclei", "inflammatory", 20.0)] * 2
    gpd.GeoDataFrame({"task": [r[0] for r in rows], "class_name": [r[1] for r in rows], "area_um2": [r[2] for r in rows]},
                     geometry=[Point(i, i) for i in range(len(rows))]).to_parquet(d / "objects.parquet")
    return d


def test_summary_values(result: Path) -> None:
    s = slide_summary(result)
    assert s["tissue_area_mm2"] == pytest.approx(0.0016)
    assert s["tissue_fraction_tumor"] == 0.75 and s["tissue_fraction_stroma"] == 0.25
    assert s["nuclei_per_mm2"] == pytest.approx(6 / 0.0016) and s["nuclei_per_mm2_epithelial"] == pytest.approx(4 / 0.0016)
    assert s["gland_count"] == 2 and s["gland_area_fraction"] == pytest.approx(1000 / 1600, abs=1e-4)
    assert s["lumen_area_fraction"] == pytest.approx(100 / 1600, abs=1e-4) and s["lumen_to_gland_area"] == 0.1
    assert summary_columns(s)["summary_gland_count"] == 2


def test_summary_without_inputs(tmp_path: Path, result: Path) -> None:
    assert slide_summary(tmp_path) == {}
    (result / "objects.parquet").write_bytes(b"broken")
    assert summary_or_warning(result) == {}


def test_batch_summary_has_summary_columns(tmp_path: Path) -> None:
    from wsi_mtl.cohort import read_summary, update_summary
    from wsi_mtl.cohort._slide import SlideOutcome

    row = SlideOutcome("s.svs", "s", "done", summary={"tissue_area_mm2": 1.25, "gland_count": 3}).row()
    update_summary(tmp_path, [row])
    got = read_summary(tmp_path)["s"]
    assert got["summary_tissue_area_mm2"] == "1.25" and got["summary_gland_count"] == "3"

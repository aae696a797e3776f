"""On the real sample slide every object lies within the slide and the tissue, and glass gets no
tissue class (issue 16, items 3, 4 and 11)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
from scipy import ndimage as ndi

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "wsimtl-small"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (MODEL_DIR / "weights.safetensors").exists(), reason="no shipped weights in models/wsimtl-small"),
]


@pytest.fixture()
def sample_result(sample_segmented: tuple[Path, str]) -> Path:
    """The sample slide segmented with the shipped model and default options (once per session)."""
    return sample_segmented[0]


def _mask_geometry(result: Path, dilate_px: int) -> shapely.Geometry:
    """The stored tissue mask, dilated by ``dilate_px`` mask pixels, as level-0 polygons."""
    import zarr

    from wsi_mtl.postprocess._extract import read_meta

    mask = np.asarray(zarr.open_array(result / "predictions.zarr" / "tissue_mask" / "0", mode="r")[0]) > 0
    mask = ndi.binary_dilation(mask, iterations=dilate_px)
    ds = read_meta(result / "predictions.zarr").mask_downsample
    ys, xs = np.nonzero(mask)
    return shapely.union_all(shapely.box(xs * ds, ys * ds, (xs + 1) * ds, (ys + 1) * ds))


def test_every_object_within_the_slide_and_the_tissue(sample_result: Path):
    import geopandas as gpd

    run = json.loads((sample_result / "run.json").read_text())
    width, height = run["slide"]["width"], run["slide"]["height"]
    table = gpd.read_parquet(sample_result / "objects.parquet")
    xmin, ymin, xmax, ymax = table.total_bounds
    assert xmin >= 0 and ymin >= 0 and xmax <= width and ymax <= height
    tissue = _mask_geometry(sample_result, dilate_px=2)
    geoms = table.geometry.values
    outside = shapely.area(shapely.difference(geoms, tissue)) / shapely.area(geoms)
    # nuclei: each at least half inside the mask, so within a nucleus of the 2-px dilated mask
    assert (outside < 0.02).all(), table.assign(outside=outside).nlargest(3, "outside")[["task", "area_um2", "outside"]]
    assert run["postprocess"]["settings"]["min_in_tissue"] == 0.5
    # glass (about 65% of this slide) gets no tissue class: the regions cover about the mask
    regions = shapely.union_all(geoms[table.task.values == "tissue"])
    assert regions.area <= 1.05 * tissue.area and regions.area < 0.5 * width * height


def test_nuclear_probability_is_the_type_confidence(sample_result: Path):
    import geopandas as gpd

    table = gpd.read_parquet(sample_result / "objects.parquet")
    nuclei = table[table.task == "nuclei"]
    # the share of the type among the nuclear types is at least 1 / (number of types) on average
    assert len(nuclei) > 1000 and nuclei.probability.median() > 0.5 and (nuclei.probability < 0.05).mean() < 0.01
    assert nuclei.nucleus_probability.between(0, 1).all() and nuclei.nucleus_probability.median() > 0.5
    assert table.loc[table.task != "nuclei", "nucleus_probability"].isna().all()
    shaped = table[table.task.isin(["nuclei", "gland", "lumen"])]
    assert shaped.solidity.between(0, 1).all() and shaped.eccentricity.notna().all()
    assert not table.truncated.any()

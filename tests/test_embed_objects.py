"""Per-object embeddings: rasterising, pooling, and the join with objects.parquet."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from shapely.geometry import Point, Polygon, box

from wsi_mtl.embed import embed_objects, load_encoder
from wsi_mtl.embed._objects import pool_levels, rasterize
from wsi_mtl.errors import InputError
from wsi_mtl.network import create_model


def test_rasterize_counts_pixel_centres_and_holes() -> None:
    square = box(0, 0, 20, 10)  # level-0 px; scale 2 -> 10 x 5 model px
    assert rasterize(square, 0, 0, 8, 12, 2.0).sum() == 50
    ring = Polygon([(0, 0), (40, 0), (40, 40), (0, 40)], [[(10, 10), (30, 10), (30, 30), (10, 30)]])
    m = rasterize(ring, 0, 0, 20, 20, 2.0)
    assert m.sum() == 400 - 100 and not m[5:15, 5:15].any()
    assert rasterize(square, 4, 0, 8, 12, 2.0).sum() == 30  # window starting at model px x=4


def test_pool_levels_weights_cells_by_pixels() -> None:
    fmap = np.arange(2 * 2 * 2, dtype=np.float32).reshape(2, 2, 2)  # C=2, 2 x 2 cells of 4 px
    mask = np.zeros((8, 8), bool)
    mask[0:4, 2:6] = True  # 8 px in cell (0,0), 8 px in cell (0,1)
    s = pool_levels([fmap], mask, 0, 0, [4])
    assert np.allclose(s, [8 * 0 + 8 * 1, 8 * 4 + 8 * 5])


@pytest.fixture
def result(tmp_path: Path, svs_jpeg: Path) -> Path:
    """A segment-like result folder: run.json naming the slide and three objects (level-0 px, 0.25 um/px)."""
    import geopandas as gpd

    d = tmp_path / "res"
    d.mkdir()
    (d / "run.json").write_text(json.dumps({"status": "complete", "slide": {"path": str(svs_jpeg), "mpp": 0.25, "mpp_source": "aperio"},
                                            "files": []}))
    geoms = [box(256, 256, 512, 384),  # model px 128..256 x 128..192: whole 32-px cells of tile (0, 0) at core 256
             box(400, 100, 700, 300),  # crosses the tiles (0, 0) and (0, 1) at core 256 (model px 256)
             Point(1001, 1001).buffer(0.3)]  # thinner than a pixel: takes its centroid's pixel
    gdf = gpd.GeoDataFrame({"id": ["a", "b", "c"], "task": ["gland", "nuclei", "nuclei"],
                            "centroid_x_px": [g.centroid.x for g in geoms], "centroid_y_px": [g.centroid.y for g in geoms]},
                           geometry=geoms)
    gdf.to_parquet(d / "objects.parquet")
    return d


@pytest.mark.slow
def test_object_features_are_the_mean_over_their_pixels(result: Path, svs_jpeg: Path) -> None:
    from wsi_mtl.slide import open_slide

    net = create_model("wsimtl_small", seed=1).eval()
    res = embed_objects(result, model=net, device="cpu", precision="fp32", progress=False, core_px=256, margin_px=64)
    emb = pd.read_parquet(result / "object_embeddings.parquet")
    assert emb["id"].tolist() == ["a", "b", "c"] and emb["pixels"].tolist() == [128 * 64, 150 * 100, 1]  # b: counted once over two tiles
    assert res.info["objects"] == 3 and res.info["dim"] == 192
    enc = load_encoder(net)
    with open_slide(svs_jpeg) as slide:
        image = slide.read(-64, -64, 384, 384, mpp=0.5)
    with torch.no_grad():
        x4 = enc._levels(torch.from_numpy(image).permute(2, 0, 1)[None].float())[-1][0].numpy()
    cells = x4[:, (128 + 64) // 32:(192 + 64) // 32, (128 + 64) // 32:(256 + 64) // 32]  # rows 6..7, cols 6..9
    f = emb[[f"f{j}" for j in range(192)]].to_numpy()
    assert np.allclose(f[0], cells.reshape(192, -1).mean(1), rtol=1e-4, atol=1e-5)
    assert np.isfinite(f).all()
    joined = pd.read_parquet(result / "objects.parquet").merge(emb, on="id")
    assert len(joined) == 3
    run = json.loads((result / "run.json").read_text())
    assert run["embed_objects"]["objects"] == 3 and "object_embeddings.parquet" in {f["path"] for f in run["files"]}


def test_object_errors(result: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no objects of task"):
        embed_objects(result, tasks=["lumen"], progress=False)
    (result / "objects.parquet").unlink()
    with pytest.raises(InputError, match="no objects.parquet"):
        embed_objects(result, progress=False)
    with pytest.raises(InputError, match="not a segment result"):
        embed_objects(tmp_path / "nowhere", progress=False)


def test_cli_objects_needs_a_result_folder(tmp_path: Path, svs_jpeg: Path) -> None:
    from wsi_mtl.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["embed", str(svs_jpeg), "--objects"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["embed", str(tmp_path), "--objects"])
    assert exc.value.code == 2  # no run.json naming a slide

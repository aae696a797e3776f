"""``embed``: patch grid, features and head probabilities, outputs, resume, damaged regions, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr

from wsi_mtl.embed import PatchGrid, embed_slide, head_columns, load_encoder, patch_table
from wsi_mtl.embed._store import EmbeddingStore
from wsi_mtl.errors import DamagedRegionError, InputError
from wsi_mtl.network import create_model
from wsi_mtl.tissue import TissueMask


@pytest.fixture(scope="module")
def net():
    return create_model("wsimtl_small", seed=3).eval()


def test_grid_covers_the_image_and_keeps_tissue() -> None:
    g = PatchGrid(height=100, width=250, patch_px=64, stride_px=32)
    assert (g.rows, g.cols) == (3, 7)  # last patches reach 128 >= 100 and 256 >= 250
    assert g.origins()[-1].tolist() == [192, 64]
    mask = TissueMask(np.array([[True, False, False, False]]), mpp=64.0)  # 1 x 4 mask px of 64 px at mpp 1
    t = patch_table(PatchGrid(64, 256, 64, 64), downsample=2.0, tissue=mask, mpp=1.0, min_tissue=0.0)
    assert t["id"].tolist() == [0] and t[["x", "y", "width", "height"]].iloc[0].tolist() == [0, 0, 128, 128]
    assert t["tissue_fraction"].iloc[0] == 1.0


def test_head_probabilities_equal_the_network_forward(net) -> None:
    enc = load_encoder(net)
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 3, 224, 224)).astype(np.float32))
    feats, probs = enc.encode(x)
    with torch.no_grad():
        logits = net(x, heads=list(enc.head_classes))
        x4 = net.backbone(x / 255.0)[-1]
    assert set(probs) == {"Patch-Class", "Patch-LC25000", "Patch-GlaS"}
    for name, p in probs.items():
        assert torch.allclose(p, torch.softmax(logits[name].flatten(1), 1), atol=1e-6)
    assert torch.allclose(feats, x4.mean(dim=(-2, -1)), atol=1e-6)
    all_feats, _ = enc.encode(x, "all")
    assert all_feats.shape == (3, sum(enc.level_dims)) and torch.allclose(all_feats[:, -feats.shape[1]:], feats)


def _embed(slide: Path, out: Path, net, **kw):
    kw.setdefault("precision", "fp32")
    return embed_slide(slide, out, model=net, device="cpu", progress=False, batch_size=4, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("stride", [224, 96])
def test_patch_features_equal_the_patch_alone(tmp_path, svs_jpeg, net, stride) -> None:
    from wsi_mtl.slide import open_slide

    res = _embed(svs_jpeg, tmp_path, net, stride=stride)
    d = res.result_dir
    table = pd.read_parquet(d / "patches.parquet")
    feats = zarr.open_group(str(d / "embeddings.zarr"), mode="r")["features"][:]
    assert len(table) == feats.shape[0] == res.info["patches"] > 0
    enc = load_encoder(net)
    with open_slide(svs_jpeg) as slide:
        ds = 0.5 / slide.mpp
        for i in (0, len(table) // 2, len(table) - 1):
            row = table.iloc[i]
            image = slide.read(int(round(row.x / ds)), int(round(row.y / ds)), 224, 224, mpp=0.5)
            alone, probs = enc.encode(torch.from_numpy(image).permute(2, 0, 1)[None].float())
            assert np.allclose(feats[i], alone[0].numpy(), rtol=1e-4, atol=1e-5)
            cols = head_columns("Patch-Class", enc.head_classes["Patch-Class"])
            assert np.allclose(row[cols].to_numpy(float), probs["Patch-Class"][0].numpy(), atol=1e-5)
    run = json.loads((d / "run.json").read_text())
    assert {f["path"] for f in run["files"]} >= {"embeddings.zarr", "patches.parquet"}
    finite = feats[np.isfinite(feats).all(1)]
    assert np.allclose(run["embed"]["slide_vector"]["mean"], finite.mean(0), rtol=1e-4, atol=1e-6)
    assert np.allclose(run["embed"]["slide_vector"]["max"], finite.max(0), rtol=1e-5, atol=1e-6)


def test_outputs_attributes_and_skip(tmp_path, svs_jpeg, net) -> None:
    res = _embed(svs_jpeg, tmp_path, net, levels="all", float16=True)
    g = zarr.open_group(str(res.result_dir / "embeddings.zarr"), mode="r")
    assert g["features"].dtype == np.float16 and g["features"].shape[1] == sum(net.config.arch_params.encoder_widths)
    assert g.attrs["mpp"] == 0.5 and g.attrs["patch_size_px"] == 224 and len(g.attrs["encoder"]["weights_sha256"]) == 64
    table = pd.read_parquet(res.result_dir / "patches.parquet")
    assert {"id", "x", "y", "width", "height", "tissue_fraction", "p_patch_glas_benign"} <= set(table.columns)
    assert (table["width"] == 448).all()  # 224 px at 0.5 um/px on a 0.25 um/px slide
    assert (table["tissue_fraction"] > 0).all()
    again = _embed(svs_jpeg, tmp_path, net, levels="all", float16=True)
    assert again.info["fingerprint"] == res.info["fingerprint"]
    assert (res.result_dir / "embeddings.zarr").stat().st_mtime_ns == (again.result_dir / "embeddings.zarr").stat().st_mtime_ns


@pytest.mark.slow
def test_resume_from_finished_chunks(tmp_path, svs_jpeg, net, monkeypatch) -> None:
    import wsi_mtl.embed._slide as mod

    monkeypatch.setattr(mod, "_CHUNK_ROWS", 4)
    real = EmbeddingStore.write_chunk
    calls = {"n": 0}

    def failing(self, chunk, features, probs):
        if calls["n"] == 1:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(self, chunk, features, probs)

    monkeypatch.setattr(EmbeddingStore, "write_chunk", failing)
    with pytest.raises(KeyboardInterrupt):
        _embed(svs_jpeg, tmp_path, net)
    assert (tmp_path / "jpeg" / "embeddings.zarr.partial").is_dir() and not (tmp_path / "jpeg" / "embeddings.zarr").exists()
    monkeypatch.setattr(EmbeddingStore, "write_chunk", real)
    resumed = _embed(svs_jpeg, tmp_path, net)
    assert resumed.info["chunks_resumed"] == 1
    fresh = _embed(svs_jpeg, tmp_path / "fresh", net)
    a = zarr.open_group(str(resumed.result_dir / "embeddings.zarr"), mode="r")["features"][:]
    b = zarr.open_group(str(fresh.result_dir / "embeddings.zarr"), mode="r")["features"][:]
    assert np.allclose(a, b, atol=1e-6)


def test_damaged_patch_is_no_data_and_the_run_goes_on(tmp_path, svs_jpeg, net, monkeypatch) -> None:
    from wsi_mtl.slide import Slide

    real = Slide.read

    def read(self, x, y, width, height, *, mpp):
        if x == 0 and y == 224:
            raise DamagedRegionError("tile cannot be decoded")
        return real(self, x, y, width, height, mpp=mpp)

    monkeypatch.setattr(Slide, "read", read)
    res = _embed(svs_jpeg, tmp_path, net, tissue_mask=False)
    table = pd.read_parquet(res.result_dir / "patches.parquet")
    feats = zarr.open_group(str(res.result_dir / "embeddings.zarr"), mode="r")["features"][:]
    bad = table.index[table["damaged"]].tolist()
    assert len(bad) == 1 and len(res.info["damaged_patches"]) == 1
    assert np.isnan(feats[bad[0]]).all() and np.isfinite(np.delete(feats, bad[0], axis=0)).all()
    assert np.isfinite(res.info["slide_vector"]["mean"]).all()


def test_bad_options_are_one_line_errors(tmp_path, svs_jpeg, net) -> None:
    with pytest.raises(InputError, match="multiple of 32"):
        _embed(svs_jpeg, tmp_path, net, patch_size=100)
    with pytest.raises(InputError, match="levels"):
        _embed(svs_jpeg, tmp_path, net, levels="some")


def test_cli_embed_and_errors(tmp_path, svs_jpeg) -> None:
    from wsi_mtl.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["embed", str(tmp_path), "-o", str(tmp_path / "o")])
    assert exc.value.code == 2
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, bad)
    with pytest.raises(SystemExit) as exc:
        main(["embed", str(svs_jpeg), "--model", str(bad), "-o", str(tmp_path / "o"), "-q"])
    assert exc.value.code == 20


@pytest.mark.parametrize("stride", [224, 96])
def test_block_reads_give_the_pixels_of_each_patch_read_alone(svs_jpeg, stride) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from wsi_mtl.embed._slide import _BLOCK_PATCHES, _exact_blocks, _prefetched
    from wsi_mtl.slide import open_slide

    with open_slide(svs_jpeg) as slide:
        assert _exact_blocks(slide, 0.5) and not _exact_blocks(slide, 0.7)  # 2x reduction vs 2.8x resampling
        h, w = slide.size_at(0.5)
        table = patch_table(PatchGrid(h, w, 224, stride), downsample=0.5 / slide.mpp, tissue=None, mpp=0.5, min_tissue=0.0)
        table = table.drop(index=[1, len(table) // 2]).reset_index(drop=True)  # gaps split blocks
        with ThreadPoolExecutor(2) as pool:
            got = list(_prefetched(pool, slide, table, iter(range(len(table))), 224, 0.5, 8, stride=stride, block=_BLOCK_PATCHES))
        assert [r for r, _, _ in got] == list(range(len(table)))
        for r, image, error in got:
            alone = slide.read(int(table["gx"].iat[r]), int(table["gy"].iat[r]), 224, 224, mpp=0.5)
            assert error is None and np.array_equal(image, alone)


def test_tile_cache_is_bounded_during_embed(svs_jpeg) -> None:
    from wsi_mtl.embed._slide import _TILE_CACHE_BYTES, _bound_tile_cache
    from wsi_mtl.slide import open_slide

    with open_slide(svs_jpeg) as slide:
        cache = slide._reader._tiles._cache
        assert cache.capacity > _TILE_CACHE_BYTES
        _bound_tile_cache(slide)  # through Slide.limit_tile_cache
        assert cache.capacity == _TILE_CACHE_BYTES


@pytest.mark.parametrize("mask_mpp", [8.0, 3.3])
def test_tissue_fractions_equal_the_mask_window_fractions(mask_mpp) -> None:
    from wsi_mtl.embed._grid import tissue_fractions

    tissue = np.random.default_rng(1).random((37, 53)) > 0.6
    tissue[:, :40] = False  # the first patches of every row see no tissue
    mask = TissueMask(tissue, mpp=mask_mpp)
    grid = PatchGrid(height=int(37 * mask_mpp / 0.5) + 100, width=int(53 * mask_mpp / 0.5), patch_px=224, stride_px=96)
    xy = grid.origins()
    expected = np.array([mask.fraction_in(y, x, y + 224, x + 224, mpp=0.5) for x, y in xy], np.float32)
    got = tissue_fractions(mask, xy, 224, mpp=0.5)
    assert 0 < (got > 0).sum() < len(got) and (got == 0).any()
    assert np.array_equal(got, expected)

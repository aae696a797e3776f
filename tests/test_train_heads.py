"""Patch heads refit on frozen inference features: kept only where held-out tiles improve."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_mtl.network import create_model
from wsi_mtl.train import ClsItem, Sources, classify_image
from wsi_mtl.train import _heads
from wsi_mtl.train._evaluate import patch_feature_map, predict_image


def _tiles(rng: np.random.Generator, n: int, size: int = 64) -> list[ClsItem]:
    """Three classes told apart by colour, with noise."""
    colours = [(200, 60, 60), (60, 200, 60), (60, 60, 200)]
    out = []
    for i in range(n):
        c = i % 3
        img = np.clip(np.array(colours[c])[None, None] + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        out.append(ClsItem(f"t{i}", "syn", "Patch-LC25000", c, img))
    return out


def test_patch_feature_map_is_what_predict_classifies():
    model = create_model("wsimtl_small", seed=0).eval()
    img = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    feats = torch.from_numpy(patch_feature_map(model, img, margin_px=32, bf16=False))[None]
    head = model.decoder_head[model.config.heads["Patch-LC25000"].decoder]
    with torch.no_grad():
        via_feats = torch.softmax(head(feats), dim=1)[0].numpy()
    direct = predict_image(model, img, heads=["Patch-LC25000"], margin_px=32, bf16=False)["Patch-LC25000"]
    assert via_feats.shape == direct.shape
    np.testing.assert_allclose(via_feats, direct, atol=1e-5)


@pytest.mark.slow
def test_refit_learns_a_separable_head_and_keeps_it():
    torch.manual_seed(0)
    model = create_model("wsimtl_small", seed=0)
    rng = np.random.default_rng(1)
    train, test = _tiles(rng, 30), _tiles(rng, 30)
    acc = lambda: np.mean([int(np.argmax(classify_image(model, t.image, t.head, bf16=False))) == t.label for t in test])
    before = acc()
    seg_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("decoder_head.")}
    report = _heads.refit_patch_heads(model, Sources({}, {"lc25000": train}), epochs=15, bf16=False, seed=3)
    r = report["Patch-LC25000"]
    assert r.n_tiles == 30 and r.n_holdout == 6 and r.kept
    assert r.accuracy_after >= r.accuracy_before
    assert acc() >= 0.9 > before
    for k, v in model.state_dict().items():  # the encoder and every other head are untouched
        if k in seg_before:
            torch.testing.assert_close(v, seg_before[k], rtol=0, atol=0)
    assert set(report) == {"Patch-LC25000"}


def test_refit_that_does_worse_on_held_out_tiles_is_not_kept(monkeypatch):
    model = create_model("wsimtl_small", seed=0)
    rng = np.random.default_rng(2)
    head = model.decoder_head[model.config.heads["Patch-LC25000"].decoder]
    before = {k: v.clone() for k, v in head.state_dict().items()}

    def sabotage(h, x, y, **kw):  # a "refit" that always answers one class with certainty
        with torch.no_grad():
            h.conv2.weight.zero_()
            h.conv2.bias.copy_(torch.tensor([50.0, -50.0, -50.0]))

    monkeypatch.setattr(_heads, "_fit", sabotage)
    tiles = [t for t in _tiles(rng, 30) if t.label != 0]
    report = _heads.refit_patch_heads(model, Sources({}, {"lc25000": tiles}), bf16=False)
    assert report["Patch-LC25000"].accuracy_after == 0.0 and not report["Patch-LC25000"].kept
    for k, v in head.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_refit_takes_non_square_gland_images_with_patch_labels():
    from wsi_mtl.train import SegItem

    model = create_model("wsimtl_small", seed=0)
    rng = np.random.default_rng(5)
    items = [SegItem(f"g{i}", "syn", "gland", t.image[:, :48].copy(), np.zeros((64, 48), np.int32), patch={"Patch-GlaS": t.label % 2})
             for i, t in enumerate(_tiles(rng, 10))]
    report = _heads.refit_patch_heads(model, Sources({"gland": items}, {}), epochs=2, bf16=False)
    assert set(report) == {"Patch-GlaS"} and report["Patch-GlaS"].n_tiles == 10


def test_refit_to_mean_std_pool_changes_the_head_and_the_config(tmp_path):
    from wsi_mtl.network import load_model, save_model
    from wsi_mtl.train._loop import _config_of_state

    model = create_model("wsimtl_small", seed=0)
    rng = np.random.default_rng(4)
    train, test = _tiles(rng, 30), _tiles(rng, 15)
    report = _heads.refit_patch_heads(model, Sources({}, {"lc25000": train}), epochs=4, bf16=False, seed=3, pools=("mean_std",))
    r = report["Patch-LC25000"]
    assert r.pool_before == "mean" and set(r.candidates) == {"mean", "mean_std"}  # the head's own pool is always a candidate
    assert r.kept and r.pool_after == "mean_std", r.to_dict()  # seeded: on these tiles the fresh mean_std head wins
    spec = model.config.heads["Patch-LC25000"]
    head = model.decoder_head[spec.decoder]
    width = model.config.arch_params.encoder_widths[4]
    assert spec.pool == "mean_std" and head.bn1.num_features == 2 * width
    assert model.config.heads["Patch-Class"].pool == "mean"  # other heads keep theirs
    acc = np.mean([int(np.argmax(classify_image(model, t.image, t.head, bf16=False))) == t.label for t in test])
    assert acc >= 0.9
    # what predict classifies is the mean_std feature map
    feats = torch.from_numpy(patch_feature_map(model, test[0].image, margin_px=32, bf16=False, pool="mean_std"))[None]
    with torch.no_grad():
        via = torch.softmax(head(feats), dim=1)[0].numpy()
    np.testing.assert_allclose(via, predict_image(model, test[0].image, heads=["Patch-LC25000"], margin_px=32, bf16=False)["Patch-LC25000"], atol=1e-5)
    # a state dict of the refit model tells its pools; the saved folder loads with them
    assert _config_of_state(create_model("wsimtl_small").config, model.state_dict()).heads["Patch-LC25000"].pool == "mean_std"
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m")
    np.testing.assert_allclose(classify_image(again, test[0].image, "Patch-LC25000", bf16=False),
                               classify_image(model, test[0].image, "Patch-LC25000", bf16=False), atol=1e-5)


def test_gland_cells_are_the_cells_mostly_inside_glands():
    glands = np.zeros((70, 100), np.int32)
    glands[0:32, 0:24] = 1  # 3/4 of cell (0, 0)
    glands[32:64, 32:64] = 2  # all of cell (1, 1)
    glands[64:70, 96:100] = 3  # all of the partial corner cell (2, 3)
    glands[64:70, 0:16] = 4  # half of the partial cell (2, 0)
    cells = _heads.gland_cells(glands, 32, 0.75)
    assert cells.shape == (3, 4)
    assert set(zip(*np.nonzero(cells))) == {(0, 0), (1, 1), (2, 3)}
    assert set(zip(*np.nonzero(_heads.gland_cells(glands, 32, 0.8)))) == {(1, 1), (2, 3)}


def _gland_image(rng: np.random.Generator, gland_colour: tuple[int, int, int], size: int = 320) -> tuple[np.ndarray, np.ndarray]:
    """Stroma-coloured tissue with one square gland of ``gland_colour`` in the middle (and its labels)."""
    img = np.empty((size, size, 3), float)
    img[:] = (230, 150, 190)
    labels = np.zeros((size, size), np.int32)
    labels[110:210, 100:215] = 1
    img[labels > 0] = gland_colour
    return np.clip(img + rng.normal(0, 25, img.shape), 0, 255).astype(np.uint8), labels


@pytest.mark.slow
def test_tissue_head_learns_the_gland_cells_of_glas_images():
    from wsi_mtl.train import SegItem

    model = create_model("wsimtl_small", seed=0)
    names = list(model.config.heads["Patch-Class"].class_names)
    mucosa, tumor = names.index("mucosa"), names.index("tumor")
    rng = np.random.default_rng(7)
    benign, malignant = (120, 60, 160), (40, 40, 110)
    tiles = []
    for i in range(12):  # stroma and adipose tiles, as the Kather tiles teach them
        c, colour = [(names.index("stroma"), (230, 150, 190)), (names.index("adipose"), (245, 240, 245))][i % 2]
        img = np.clip(np.array(colour)[None, None] + rng.normal(0, 25, (160, 160, 3)), 0, 255).astype(np.uint8)
        tiles.append(ClsItem(f"k{i}", "syn", "Patch-Class", c, img))
    items = [SegItem(f"g{i}", "glas", "gland", *_gland_image(rng, [benign, malignant][i % 2]), patch={"Patch-GlaS": i % 2}) for i in range(10)]
    data = Sources({"gland": items}, {"kather2016": tiles})

    plain = _heads.refit_patch_heads(create_model("wsimtl_small", seed=0), data, heads=["Patch-Class"], epochs=1, bf16=False)
    assert plain["Patch-Class"].n_tiles == 12 and plain["Patch-Class"].n_gland_images == 0  # GlaS images teach only Patch-GlaS

    report = _heads.refit_patch_heads(model, data, heads=["Patch-Class"], gland_share=0.75, epochs=15, bf16=False, seed=1)
    r = report["Patch-Class"]
    assert set(report) == {"Patch-Class"} and r.n_tiles == 22 and r.n_gland_images == 10 and r.n_holdout == 4 and r.kept
    for colour, want in ((benign, mucosa), (malignant, tumor)):
        img, labels = _gland_image(rng, colour)
        prob = predict_image(model, img, heads=["Patch-Class"], margin_px=32, bf16=False)["Patch-Class"]
        inside = _heads.gland_cells(labels, 32, 0.75)
        assert int(np.argmax(prob[:, inside].mean(axis=1))) == want
        corners = prob[:, [0, 0, -1, -1], [0, -1, 0, -1]]  # cells whose 5-cell windows hold no gland
        assert not np.any(np.argmax(corners, axis=0) == want)

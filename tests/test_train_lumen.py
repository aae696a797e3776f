"""Lumen pseudo-labels (wsi_mtl.train._lumen) and the "no gland here" training tiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_mtl.errors import InputError
from wsi_mtl.network import create_model, get_model_config
from wsi_mtl.train import SegItem, Sources, TrainConfig, load_config, make_seg_batch
from wsi_mtl.train._data import _mosaics, _negative, sample_seg
from wsi_mtl.train._lumen import lumen_labels, optical_density


def _gland_image(size: int = 120) -> tuple[np.ndarray, np.ndarray]:
    """A purple ring gland (radius 40) with a pale centre (radius 15) on pink stroma, plus white glass in a corner."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = (200, 120, 170)
    img[r < 40] = (110, 60, 140)
    img[r < 15] = (235, 225, 235)
    img[:6, :6] = (250, 250, 250)
    glands = (r < 40).astype(np.int32)
    return img, glands


def test_optical_density_is_zero_at_the_white_point_and_grows_with_stain():
    img, _ = _gland_image()
    od = optical_density(img)
    assert od.shape == img.shape[:2] and od.min() >= 0
    assert od[60, 60] < od[60, 60 + 25] < 1.5 and od[1, 1] < 0.01
    with pytest.raises(ValueError):
        optical_density(img[..., 0])


def test_the_pale_centre_of_a_gland_is_its_lumen_and_stays_inside_it():
    img, glands = _gland_image()
    lab = lumen_labels(img, glands)
    assert lab.max() == 1
    assert (glands[lab > 0] > 0).all()
    yy, xx = np.mgrid[:120, :120]
    centre = np.hypot(yy - 60, xx - 60) < 13
    assert lab[centre].all()
    assert not lab[np.hypot(yy - 60, xx - 60) > 18].any()  # epithelium and stroma: no lumen


def test_pale_spots_in_the_epithelial_rim_and_outside_glands_are_not_lumen():
    img, glands = _gland_image()
    yy, xx = np.mgrid[:120, :120]
    rim_spot = np.hypot(yy - 60, xx - 92) < 5  # a goblet-like vacuole 32 px from the centre, 8 px from the outline
    img[rim_spot] = (235, 225, 235)
    img[np.hypot(yy - 8, xx - 110) < 6] = (240, 235, 240)  # pale stroma outside the gland
    lab = lumen_labels(img, glands)
    assert lab.max() == 1 and not lab[rim_spot].any()
    assert not lab[glands == 0].any()


def test_no_glands_no_lumen_and_sizes_must_agree():
    img, glands = _gland_image()
    assert not lumen_labels(img, np.zeros_like(glands)).any()
    with pytest.raises(ValueError, match="differ"):
        lumen_labels(img, glands[:-1])


def test_two_glands_get_their_own_lumen_ids():
    img, glands = _gland_image()
    both = np.concatenate([img, img], axis=1)
    lab = lumen_labels(both, np.concatenate([glands, 2 * glands], axis=1))
    assert sorted(np.unique(lab).tolist()) == [0, 1, 2]
    assert lab[60, 60] != lab[60, 180]


def test_negative_items_teach_background_for_gland_and_lumen():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (100, 100, 3), dtype=np.uint8)
    item = _negative("t", "lc25000", img)
    _, t, patch = sample_seg(rng, item, crop_px=64, scale_range=(1.0, 1.0), nuclei_erosion_px=3, gland_erosion_px=11)
    assert (t["Gland-INST"] == 0).all() and (t["Lumen-INST"] == 0).all()
    assert (t["Nuclei-INST"] == 255).all() and patch == {}
    # a tile smaller than the crop: the padding is ignored, not background
    _, t, _ = sample_seg(rng, _negative("s", "glioma", img[:40, :40]), crop_px=64, scale_range=(1.0, 1.0), nuclei_erosion_px=3, gland_erosion_px=11)
    assert (t["Gland-INST"] == 255).any() and (t["Gland-INST"] == 0).sum() == 40 * 40


def test_gland_items_with_lumen_labels_target_the_lumen_head():
    img, glands = _gland_image()
    item = SegItem("g", "glas", "gland", img, glands, patch={"Patch-GlaS": 0}, lumen=lumen_labels(img, glands))
    rng = np.random.default_rng(1)
    _, t, _ = sample_seg(rng, item, crop_px=96, scale_range=(1.0, 1.0), nuclei_erosion_px=3, gland_erosion_px=11)
    lum, gl = t["Lumen-INST"], t["Gland-INST"]
    assert {0, 1, 2} <= set(np.unique(lum).tolist()) <= {0, 1, 2, 255}
    assert (gl[(lum == 1) | (lum == 2)] != 0).all()  # every lumen pixel of the crop lies in the gland
    without = SegItem("g", "glas", "gland", img, glands)
    _, t2, _ = sample_seg(np.random.default_rng(1), without, crop_px=96, scale_range=(1.0, 1.0), nuclei_erosion_px=3, gland_erosion_px=11)
    assert (t2["Lumen-INST"] == 255).all() and np.array_equal(t2["Gland-INST"], gl)  # same crop drawn: the lumen layer costs no random draw


def test_mosaics_join_tiles_and_keep_glass():
    from wsi_mtl.train import ClsItem

    tiles = [ClsItem(f"k{i}", "kather2016", "Patch-Class", 7 if i == 0 else 1, np.full((30, 31, 3), 250 if i == 0 else 120, np.uint8)) for i in range(3)]
    out = _mosaics(tiles, n=5, seed=3)
    assert len(out) == 5 and all(m.image.shape == (90, 90, 3) and not m.labels.any() and not m.lumen.any() for m in out)
    assert any((m.image == 250).any() and (m.image == 120).any() for m in out)
    assert _mosaics([], n=3) == []


def test_mixed_batches_draw_glands_and_negatives():
    img, glands = _gland_image()
    data = Sources({"gland": [SegItem("g", "glas", "gland", img, glands, patch={"Patch-GlaS": 1}, lumen=lumen_labels(img, glands))],
                    "gland_negative": [_negative("n", "glioma", img)]}, {})
    cfg = TrainConfig(seg_batch=8, seg_crop_px=64, scale_range=(1.0, 1.0), seg_mixture={"gland": 0.5, "gland_negative": 0.5}, schedule=("seg",))
    b = make_seg_batch(np.random.default_rng(0), data, cfg, get_model_config("wsimtl_small").patch_heads)
    labelled = (b.patch["Patch-GlaS"] >= 0).numpy()
    assert 0 < labelled.sum() < 8
    lum = b.seg["Lumen-INST"].numpy()
    assert (lum[~labelled] == 0).all() and (b.seg["Gland-INST"].numpy()[~labelled] == 0).all()


def test_config_keys_of_a_lumen_run(tmp_path):
    p = tmp_path / "configs" / "c.yaml"
    p.parent.mkdir()
    p.write_text("untrained_heads: []\nlumen_labels: true\nseg_mixture: {gland: 1, gland_negative: 1}\ncopy_modules: {decoder_head.Lumen: decoder_head.Gland}\n")
    cfg = load_config(p)
    assert cfg.untrained_heads == () and cfg.lumen_labels and cfg.copy_modules == {"decoder_head.Lumen": "decoder_head.Gland"}
    p.write_text("lumen_labels: true\n")  # Lumen-INST is untrained by default
    with pytest.raises(InputError, match="untrained_heads"):
        load_config(p)
    p.write_text("lumen_erosion_px: 4\n")
    with pytest.raises(InputError, match="lumen_erosion_px"):
        load_config(p)


def test_loader_tasks_follow_the_schedule():
    from wsi_mtl.train._loop import _loader_tasks

    assert _loader_tasks(TrainConfig()) is None
    cfg = TrainConfig(schedule=("seg", "cls"), seg_mixture={"gland": 0.6, "gland_negative": 0.4, "nuclei": 0.0}, cls_mixture={"lc25000": 1.0})
    assert _loader_tasks(cfg) == ["gland", "gland_negative", "lc25000"]


def test_copy_modules_start_the_lumen_decoder_as_the_gland_one(tmp_path):
    from wsi_mtl.train import load_initial_weights
    from wsi_mtl.train._loop import _trainable

    src = create_model("wsimtl_small", seed=2)
    torch.save({"model": src.state_dict(), "step": 7}, tmp_path / "src.pt")
    model = create_model("wsimtl_small", seed=0)
    steps = load_initial_weights(model, tmp_path / "src.pt", copy_modules={"decoder_head.Lumen": "decoder_head.Gland", "output_head.Lumen": "output_head.Gland"})
    assert steps == 7
    own, s = model.state_dict(), src.state_dict()
    lumen_keys = [k for k in own if k.startswith(("decoder_head.Lumen.", "output_head.Lumen."))]
    assert lumen_keys and all(torch.equal(own[k], s[k.replace("Lumen", "Gland", 1)]) for k in lumen_keys)
    assert any(not torch.equal(s[k], own[k]) for k in lumen_keys)  # the source's own lumen tensors were not taken
    assert all(torch.equal(own[k], s[k]) for k in own if "Lumen" not in k)
    with pytest.raises(InputError, match="copy_modules"):
        load_initial_weights(model, tmp_path / "src.pt", copy_modules={"decoder_head.Lumenx": "decoder_head.Gland"})
    with pytest.raises(InputError, match="copy_modules"):
        load_initial_weights(model, tmp_path / "src.pt", copy_modules={"decoder_head.Lumen": "decoder_head.Patch-GlaS"})
    # with no untrained heads the lumen decoder trains
    trainable = _trainable(model, ["decoder_head.Lumen"], ())
    assert trainable and len(trainable) == sum(1 for n, _ in model.named_parameters() if n.startswith("decoder_head.Lumen."))
    assert _trainable(create_model("wsimtl_small", seed=0), ["decoder_head.Lumen"]) == []

"""Per-task crop sizes, tuned post-processing settings and where they are used."""

from __future__ import annotations

import json

import numpy as np
import pytest

from wsi_mtl.errors import InputError
from wsi_mtl.network import get_model_config
from wsi_mtl.postprocess import PostprocessParams, extract_objects
from wsi_mtl.train import SegItem, Sources, TrainConfig, load_config, make_seg_batch
from wsi_mtl.postprocess import gland_labels, params_of
from wsi_mtl.train._tune import choose_params

from test_postprocess_extract import write_predictions


def _disks(size: int, centres: list[tuple[int, int]], radius: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    lab = np.zeros((size, size), np.int32)
    for k, (cy, cx) in enumerate(centres, start=1):
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = k
    return lab


def _weak_inst(labels: np.ndarray, interior: float) -> np.ndarray:
    """A 3-class INST map whose object pixels have interior probability ``interior`` (rest boundary)."""
    p = np.zeros((3,) + labels.shape, np.float32)
    obj = labels > 0
    p[0][~obj] = 1.0
    p[1][obj] = interior
    p[2][obj] = 1.0 - interior
    return p


def test_task_crop_and_batch_override_named_tasks_only():
    rng = np.random.default_rng(0)
    img = np.full((200, 200, 3), 200, np.uint8)
    lab = _disks(200, [(50, 50), (140, 120)], 30)
    data = Sources({"gland": [SegItem("g", "syn", "gland", img, lab)], "nuclei": [SegItem("n", "syn", "nuclei", img, lab)]}, {})
    cfg = TrainConfig(seg_batch=4, seg_crop_px=64, task_crop_px={"gland": 128}, task_batch={"gland": 2}, scale_range=(1.0, 1.0))
    heads = get_model_config("wsimtl_small").patch_heads
    g = make_seg_batch(rng, data, cfg, heads, task="gland")
    n = make_seg_batch(rng, data, cfg, heads, task="nuclei")
    assert g.images.shape == (2, 3, 128, 128) and g.seg["Gland-INST"].shape == (2, 128, 128)
    assert n.images.shape == (4, 3, 64, 64)


@pytest.mark.parametrize("bad", [{"task_crop_px": {"gland": 100}}, {"task_crop_px": {"glands": 128}}, {"task_batch": {"gland": 0}}])
def test_task_overrides_are_checked(tmp_path, bad):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(InputError, match="task_"):
        load_config(path)


def test_from_mapping_overrides_known_fields_and_ignores_others(caplog):
    p = PostprocessParams.from_mapping({"gland_threshold": 0.3, "nuclei_min_area_px": 6, "bogus": 1})
    assert p.gland_threshold == 0.3 and p.nuclei_min_area_px == 6.0 and isinstance(p.nuclei_min_area_px, float)
    assert p.gland_erosion_px == PostprocessParams().gland_erosion_px
    assert "bogus" in caplog.text
    assert PostprocessParams.from_mapping(None) == PostprocessParams()


def test_choose_params_finds_the_threshold_that_recovers_weak_glands():
    lab = _disks(160, [(40, 40), (110, 110)], 28)
    item = SegItem("g", "syn", "gland", np.zeros((160, 160, 3), np.uint8), lab)
    prob = _weak_inst(lab, 0.6)  # interior - boundary = 0.2: the default threshold 0.5 finds nothing
    assert gland_labels(prob).max() == 0
    grid = {"gland_threshold": (0.5, 0.1), "gland_erosion_px": (5.0,), "gland_min_area_px": (100.0,)}
    best, score, default = choose_params("glands", [item], [prob], grid)
    assert best == {"gland_threshold": 0.1, "gland_erosion_px": 5.0, "gland_min_area_px": 100.0}
    assert default < score
    assert gland_labels(prob, PostprocessParams(**best)).max() == 2


def test_lumen_tuning_grows_cores_back_by_the_training_erosion_and_keeps_them_in_glands():
    """Lumen maps made of pseudo-labels eroded by 3 px (as the head learnt them): the tuned setting
    grows cores back by 3 px, beats the 1 px default, and a lumen outside every gland is dropped."""
    from wsi_mtl.postprocess import label_to_3class
    from wsi_mtl.train._tune import choose_lumen_params

    glands = _disks(160, [(40, 40), (110, 110)], 30)
    truth = _disks(160, [(40, 40), (110, 110)], 12)
    stray = _disks(160, [(20, 140)], 10)  # lumen-like space outside any gland
    prob = label_to_3class(np.maximum(truth, 3 * (stray > 0)).astype(np.int32), erosion_px=3).astype(np.float32)
    item = SegItem("g", "syn", "gland", np.zeros((160, 160, 3), np.uint8), glands, lumen=truth)
    grid = {"lumen_threshold": (0.5,), "lumen_erosion_px": (1.0, 3.0, 4.0), "lumen_min_area_px": (20.0,), "lumen_min_inside": (0.5,)}
    best, score, before = choose_lumen_params([item], [(prob, glands)], PostprocessParams(), grid)
    assert best["lumen_erosion_px"] == 3.0
    assert score > before and score > 0.95  # the stray lumen (about 1/3 of the truth's area) would cost more


@pytest.mark.parametrize("true_in_stroma", [False, True])
def test_gland_setting_tuning_drops_glands_in_stroma_unless_true_glands_lie_there(true_in_stroma):
    """Predicted glands: two true ones (in tumour cells) and a false one in stroma cells. The strictest
    setting wins while only the false gland lies in stroma; where a true gland lies in stroma too,
    dropping costs more than it gains and the filter stays off."""
    from wsi_mtl.postprocess._gland_setting import non_glandular_cells
    from wsi_mtl.train._tune import choose_setting_params

    pred = _disks(160, [(40, 40), (40, 120), (120, 120)], 20)  # the third is false
    truth = pred * (pred < 3)
    cls = np.zeros((3, 10, 10), np.float32)  # tumour, stroma, fat; cells of 16 px
    cls[0] = 1.0
    cls[:, 5:, 5:] = [[[0.0]], [[0.9]], [[0.1]]]  # stroma around the false gland
    if true_in_stroma:
        cls[:, :5, 5:] = [[[0.0]], [[1.0]], [[0.0]]]  # and around the second true gland
    cells = non_glandular_cells(cls, ["tumour", "stroma", "fat"])
    item = SegItem("g", "syn", "gland", np.zeros((160, 160, 3), np.uint8), truth)
    best, score, off = choose_setting_params([item], [pred], [(cells, 16.0)], {"gland_max_nonglandular": (0.5, 0.95, 1.0)})
    assert best == {"gland_max_nonglandular": 1.0 if true_in_stroma else 0.5}
    assert (score == off) if true_in_stroma else (score > off)


def test_model_settings_reach_evaluation_and_extract_objects(tmp_path):
    class _M:
        config = get_model_config("wsimtl_small").replace(extra={"postprocess": {"gland_threshold": 0.1, "gland_min_area_px": 100.0}})

    assert params_of(_M()).gland_threshold == 0.1
    lab = _disks(160, [(40, 40), (110, 110)], 28)
    maps = {"Gland-INST": np.round(255 * _weak_inst(lab, 0.6)).astype(np.uint8)}
    default_dir, tuned_dir = tmp_path / "a", tmp_path / "b"
    write_predictions(default_dir, maps)
    write_predictions(tuned_dir, maps)
    import zarr

    root = zarr.open_group(tuned_dir / "predictions.zarr", mode="r+")
    root.attrs["wsimtl"] = dict(root.attrs["wsimtl"]) | {"postprocess": {"gland_threshold": 0.1, "gland_min_area_px": 100.0}}

    def glands(d):
        return sum(len(b) for b in extract_objects(d / "predictions.zarr", tasks=["gland"]))

    assert glands(default_dir) == 0
    assert glands(tuned_dir) == 2


def test_shipped_config_tunes_at_export():
    from pathlib import Path

    from wsi_mtl.train._recipe import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "configs" / "wsimtl-small.yaml")
    tuning = [s.config for s in recipe.stages if s.config.tune_postprocess]
    assert tuning, "no stage of the recipe tunes post-processing at export"
    glands = [s.config for s in recipe.stages if s.config.tune_postprocess and s.config.tune_images.get("gland", 1) and not s.tune_only]
    # glands need more context than nuclei (224 px crops): a gland-only schedule entry's own crop, or
    # mixed seg batches' crop, in a stage that trains and tunes glands (a tune_only stage draws no crops)
    assert glands and all(c.task_crop_px.get("gland", c.seg_crop_px) >= 320 for c in glands)


def test_refit_batchnorm_averages_statistics_and_keeps_weights():
    import torch

    from test_train_loop import _cfg, _synthetic_sources
    from wsi_mtl.network import create_model
    from wsi_mtl.train._loop import refit_batchnorm

    model = create_model(get_model_config("wsimtl_small"), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = _cfg(schedule=("nuclei", "gland", "cls"))
    refit_batchnorm(model, cfg, _synthetic_sources(), batches=6)
    after = model.state_dict()
    assert not model.training
    for k, v in after.items():
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(v, before[k]), k  # weights untouched
    stem = "backbone.bn1.running_mean"
    assert not torch.equal(after[stem], before[stem])  # the encoder saw every batch
    assert int(after["backbone.bn1.num_batches_tracked"]) == 6
    lumen = [k for k in after if k.startswith("decoder_head.Lumen.") and k.endswith("running_mean")]
    assert lumen and all(torch.equal(after[k], before[k]) for k in lumen)  # untrained decoder kept as is
    nuclei = [k for k in after if k.startswith("decoder_head.Nuclei.") and k.endswith("num_batches_tracked")]
    assert nuclei and all(int(after[k]) == 2 for k in nuclei)  # only its own task's batches


def test_opening_splits_glands_joined_by_a_thin_bridge():
    from wsi_mtl.postprocess import gland_instances

    lab = _disks(120, [(60, 30), (60, 90)], 22)
    lab[58:62, 30:90] = 1  # a 4 px bridge: one blob
    prob = _weak_inst((lab > 0).astype(np.int32), 1.0)
    assert gland_instances(prob, min_area_px=100).max() == 1
    split = gland_instances(prob, min_area_px=100, open_px=4)
    assert split.max() == 2
    assert split[60, 30] != split[60, 90]


def test_gland_sweep_reuses_grown_instances_with_identical_scores():
    from dataclasses import replace

    from wsi_mtl import metrics
    from wsi_mtl.train._tune import GLAND_GRID, _combos, _gland_score, _GrownGlands

    rng = np.random.default_rng(4)
    items, maps = [], []
    for seed in range(2):
        lab = _disks(160, [(40, 40), (45, 110), (120, 70), (118, 130)], 22 + seed * 4)
        p = _weak_inst(lab, 0.8) + rng.uniform(0, 0.35, (3, 160, 160)).astype(np.float32)
        items.append(SegItem(f"g{seed}", "syn", "gland", np.zeros((160, 160, 3), np.uint8), lab))
        maps.append(p / p.sum(0, keepdims=True))
    cache = _GrownGlands()
    for combo in _combos(GLAND_GRID):
        params = replace(PostprocessParams(), **combo)
        tp = fp = fn = 0
        dices = []
        for item, prob in zip(items, maps):
            pred = gland_labels(prob, params)
            _, t, f, n = metrics.object_f1(item.labels, pred)
            tp, fp, fn = tp + t, fp + f, fn + n
            dices.append(metrics.object_dice(item.labels, pred))
        direct = (2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0) + float(np.mean(dices))
        assert _gland_score(items, maps, params, cache) == pytest.approx(direct, abs=1e-12), combo
    assert cache.key == tuple(GLAND_GRID[k][-1] for k in ("gland_threshold", "gland_erosion_px", "gland_open_px"))


def test_nuclei_sweep_reuses_instances_with_identical_scores():
    """The tuner's cached instances (filtered per confidence and size) score exactly as the
    post-processing run afresh for every setting of the grid."""
    from dataclasses import replace

    from wsi_mtl import metrics
    from wsi_mtl.postprocess import label_to_3class
    from wsi_mtl.postprocess import nuclei_labels
    from wsi_mtl.train._tune import NUCLEI_GRID, _combos, _GrownNuclei, _nuclei_score

    rng = np.random.default_rng(7)
    items, maps = [], []
    for seed in range(2):
        lab = _disks(64, [(16, 16), (16, 27), (45, 40), (48, 12)], 6 + seed)
        merged = (lab > 0).astype(np.int32)  # touching nuclei share one interior
        p = label_to_3class(merged, erosion_px=1).astype(np.float32) / 255 + rng.uniform(0, 0.4, (3, 64, 64)).astype(np.float32)
        items.append(SegItem(f"n{seed}", "syn", "nuclei", np.zeros((64, 64, 3), np.uint8), lab))
        maps.append(p / p.sum(0, keepdims=True))
    cache = _GrownNuclei()
    combos = _combos(NUCLEI_GRID)
    assert len(combos) == int(np.prod([len(v) for v in NUCLEI_GRID.values()]))
    for combo in combos[::7] + combos[-3:]:
        params = replace(PostprocessParams(), **combo)
        direct = [0.5 * (metrics.aji(it.labels, nuclei_labels(m, params)) + metrics.panoptic_quality(it.labels, nuclei_labels(m, params)).pq)
                  for it, m in zip(items, maps)]
        assert _nuclei_score(items, maps, params, cache) == pytest.approx(float(np.mean(direct)), abs=1e-12), combo
    assert cache.key == tuple(NUCLEI_GRID[k][-1] for k in ("nuclei_marker_threshold", "nuclei_mask_threshold", "nuclei_split_h"))


def test_confidence_tuning_drops_faint_false_glands_and_keeps_every_gland_when_none_are_faint():
    """A true gland and a false one of lower mean probability: the confidence candidates (over
    the chosen gland settings) drop the false one; where every gland is true, the filter stays off."""
    from functools import partial

    from wsi_mtl.train._tune import CONFIDENCE_GRID, _best, _gland_score, _GrownGlands

    both = _disks(160, [(40, 40), (110, 110)], 28)
    truth = np.where(both == 1, 1, 0).astype(np.int32)
    prob = _weak_inst(both, 0.9)
    prob[1][both == 2], prob[2][both == 2], prob[0][both == 2] = 0.45, 0.2, 0.35  # 0.65 where drawn, less once grown
    base = PostprocessParams(gland_threshold=0.1, gland_erosion_px=5.0, gland_min_area_px=100.0)
    item = SegItem("g", "syn", "gland", np.zeros((160, 160, 3), np.uint8), truth)
    best, score = _best(CONFIDENCE_GRID, partial(_gland_score, [item], [prob], grown=_GrownGlands()), base)
    assert best["gland_min_probability"] > 0 and score > _gland_score([item], [prob], base)
    assert gland_labels(prob, PostprocessParams(**{**base.__dict__, **best})).max() == 1
    clean = SegItem("g", "syn", "gland", np.zeros((160, 160, 3), np.uint8), both)
    best, _ = _best(CONFIDENCE_GRID, partial(_gland_score, [clean], [prob], grown=_GrownGlands()), base)
    assert best == {"gland_min_probability": 0.0}

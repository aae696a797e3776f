"""Task ``nuclei_all`` (issue 17): MoNuSeg (all 30), CPM-15, CoNSeP with typed instances, glioma,
the v2 validation split, and the per-source scores."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from wsi_mtl.errors import InputError
from wsi_mtl.train import load_split
from wsi_mtl.train._config import DEFAULT_SOURCE_MPP
from wsi_mtl.train._data import SegItem, load_sources, sample_seg
from wsi_mtl.train._nuclei_sources import (
    CONSEP_TYPES,
    TypedSegItem,
    _consep_tile,
    load_consep,
    load_glioma_nuclei,
    load_monuseg_all,
    typed_points,
)
from wsi_mtl.train._targets import IGNORE

REPO = Path(__file__).resolve().parents[1]
SPLIT_V1 = REPO / "configs" / "splits" / "validation.yaml"
SPLIT_V2 = REPO / "configs" / "splits" / "validation-v2.yaml"


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_consep_types_land_on_the_model_type_classes() -> None:
    names = json.loads((REPO / "models" / "wsimtl-small" / "config.json").read_text())["heads"]["Nuclei-TYPE"]["class_names"]
    got = {t: names[i] for t, i in CONSEP_TYPES.items()}
    assert got == {"epithelial": "epithelial", "spindle": "fibroblast", "inflammatory": "inflammatory", "other": "other"}


def _typed_item() -> TypedSegItem:
    lab = np.zeros((64, 64), np.int32)
    lab[10:20, 10:20] = 1
    lab[40:52, 30:44] = 2
    lab[5:9, 50:56] = 3  # no type known
    lut = np.array([0, CONSEP_TYPES["epithelial"], CONSEP_TYPES["inflammatory"], IGNORE], np.uint8)
    img = np.full((64, 64, 3), 200, np.uint8)
    return TypedSegItem("t", "consep", "nuclei", img, lab, instance_classes=lut)


@pytest.mark.parametrize("type_background", [False, True])
def test_typed_instances_give_a_type_target_per_nucleus(type_background: bool) -> None:
    item = _typed_item()
    _, t, _ = sample_seg(np.random.default_rng(1), item, crop_px=64, scale_range=(1.0, 1.0), nuclei_erosion_px=3, gland_erosion_px=3, type_background=type_background)
    typ, inst = t["Nuclei-TYPE"], t["Nuclei-INST"]
    assert set(np.unique(typ[inst == 0]).tolist()) <= {0, IGNORE}
    fg = typ[inst > 0]
    assert {CONSEP_TYPES["epithelial"], CONSEP_TYPES["inflammatory"], IGNORE} == set(np.unique(fg).tolist())
    # each nucleus has one class: area of the 10x10 epithelial and the 12x14 inflammatory nucleus
    assert (typ == CONSEP_TYPES["epithelial"]).sum() == 100 and (typ == CONSEP_TYPES["inflammatory"]).sum() == 168


def test_typed_points_are_instance_centroids_with_their_class() -> None:
    item = _typed_item()
    yx, cls = typed_points(item.labels, item.instance_classes)
    np.testing.assert_allclose(yx[0], [14.5, 14.5])
    assert cls.tolist() == [CONSEP_TYPES["epithelial"], CONSEP_TYPES["inflammatory"], -1]


def test_consep_crops_must_cover_their_tile(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    crops = [{"name": "t_000", "tile": "t", "image": "a.png", "x0": "0", "y0": "0"}]
    assert _consep_tile(tmp_path, crops, (8, 8)).shape == (8, 8, 3)
    with pytest.raises(InputError, match="uncovered"):
        _consep_tile(tmp_path, crops, (8, 12))
    with pytest.raises(InputError, match="outside"):
        _consep_tile(tmp_path, [{**crops[0], "x0": "4"}], (8, 8))


def test_split_v2_keeps_every_validation_name_and_holds_out_each_nuclei_source(shared_data: Path) -> None:
    v1, v2 = load_split(SPLIT_V1), load_split(SPLIT_V2)
    for src, names in v1.items():
        assert set(names) <= set(v2[src]), src
    n_all = {"monuseg": len(_rows(shared_data / "nuclei/monuseg/manifest_instances.csv")), "cpm15": len(_rows(shared_data / "nuclei/cpm15/manifest.csv")),
             "consep": len(_rows(shared_data / "nuclei/consep/tiles.csv")), "glioma": len(_rows(shared_data / "nuclei/glioma/manifest.csv"))}
    assert n_all == {"monuseg": 30, "cpm15": 15, "consep": 27, "glioma": 52}
    for src, n in n_all.items():
        assert 0.18 <= len(v2[src]) / n <= 0.3, src
    assert set(yaml.safe_load(SPLIT_V2.read_text())) == set(v2)  # every known source written out


def test_consep_tile_is_rebuilt_from_its_crops_with_its_types(shared_data: Path) -> None:
    base = shared_data / "nuclei" / "consep"
    (item,) = load_consep(shared_data, mpp=0.25, source_mpp=0.25, names=["train_2"])
    assert item.image.shape == (1000, 1000, 3) and item.labels.shape == (1000, 1000)
    crop = next(r for r in _rows(base / "manifest.csv") if r["name"] == "train_2_015")
    with Image.open(base / crop["image"]) as im:
        np.testing.assert_array_equal(item.image[744:, 744:], np.asarray(im.convert("RGB")))
    counts = {r["type_name"]: 0 for r in _rows(base / "instance_types.csv")}
    for r in _rows(base / "instance_types.csv"):
        if r["name"] == "train_2":
            counts[r["type_name"]] += 1
    lut = item.instance_classes
    assert {t: int((lut[1:] == i).sum()) for t, i in CONSEP_TYPES.items()} == counts
    (half,) = load_consep(shared_data, mpp=0.5, source_mpp=0.25, names=["train_2"])
    assert half.image.shape == (500, 500, 3) and half.labels.max() <= len(half.instance_classes) - 1


def test_monuseg_all_30_instance_maps_and_the_xml_convention(shared_data: Path) -> None:
    name = "TCGA-A7-A13E-01Z-00-DX1"  # has an XML map too
    (png,) = load_monuseg_all(shared_data, mpp=0.25, source_mpp=0.25, names=[name])
    (xml,) = load_monuseg_all(shared_data, mpp=0.25, source_mpp=0.25, names=[name], masks="xml")
    assert png.labels.shape == xml.labels.shape == (1000, 1000)
    assert (xml.labels > 0).sum() > (png.labels > 0).sum()  # XML maps: the one-pixel outline ring
    with pytest.raises(InputError, match="masks"):
        load_monuseg_all(shared_data, mpp=0.5, source_mpp=0.25, names=[name], masks="binary")
    rows = _rows(shared_data / "nuclei/monuseg/manifest_instances.csv")
    assert len(rows) == 30 and all(r["instance_mask"] for r in rows)


def test_glioma_nuclei_are_instances_at_the_model_mpp(shared_data: Path) -> None:
    (item,) = load_glioma_nuclei(shared_data, mpp=0.5, source_mpp=0.25, names=["gbm40_01"])
    assert item.image.shape == (256, 256, 3) and item.kind == "nuclei"
    assert len(np.unique(item.labels)) > 50


def test_nuclei_all_validation_part_is_the_v2_split(shared_data: Path) -> None:
    split = load_split(SPLIT_V2)
    data = load_sources(shared_data, mpp=0.5, source_mpp=DEFAULT_SOURCE_MPP, split=split, part="val", lc_classes=["lung_aca", "lung_n", "lung_scc"], tasks=["nuclei_all"])
    got: dict[str, list[str]] = {}
    for it in data.seg["nuclei_all"]:
        got.setdefault(it.source, []).append(it.name)
    assert {s: sorted(v) for s, v in got.items()} == {s: sorted(split[s]) for s in ("monuseg", "cpm15", "consep", "glioma")}
    assert all(isinstance(it, TypedSegItem) for it in data.seg["nuclei_all"] if it.source == "consep")
    assert list(data.seg) == ["nuclei_all"]


def test_v2_split_with_the_old_nuclei_task_scores_the_xml_images_and_cpm15(shared_data: Path) -> None:
    split = load_split(SPLIT_V2)
    data = load_sources(shared_data, mpp=0.5, source_mpp=DEFAULT_SOURCE_MPP, split=split, part="val", lc_classes=["lung_aca", "lung_n", "lung_scc"], tasks=["nuclei"])
    names = [it.name for it in data.seg["nuclei"]]
    assert names == load_split(SPLIT_V1)["monuseg"] + split["cpm15"]  # the binary-only MoNuSeg images are nuclei_all's


def test_a_nuclei_all_batch_teaches_types_where_instances_are_typed() -> None:
    from wsi_mtl.network import get_model_config
    from wsi_mtl.train import TrainConfig
    from wsi_mtl.train._data import Sources
    from wsi_mtl.train._loop import _loader_tasks, make_seg_batch

    typed = _typed_item()
    plain = SegItem("p", "glioma", "nuclei", typed.image.copy(), typed.labels.copy())
    cfg = TrainConfig(seg_batch=2, seg_crop_px=64, scale_range=(1.0, 1.0), hed_sigma=0.0, hed_bias=0.0, blur_p=0.0, bf16=False,
                      schedule=("seg",), seg_mixture={"nuclei_all": 1.0, "gland": 0.5})
    assert _loader_tasks(cfg) == ["nuclei_all", "gland"]  # the opt-in task is loaded
    b = make_seg_batch(np.random.default_rng(0), Sources({"nuclei_all": [typed]}, {}), cfg, get_model_config("wsimtl_small").patch_heads, task="nuclei_all")
    assert {1, 3} <= set(b.seg["Nuclei-TYPE"].unique().tolist()) <= {0, 1, 3, IGNORE}
    b = make_seg_batch(np.random.default_rng(0), Sources({"nuclei_all": [plain]}, {}), cfg, get_model_config("wsimtl_small").patch_heads, task="nuclei_all")
    assert not ({1, 2, 3, 4} & set(b.seg["Nuclei-TYPE"].unique().tolist()))  # untyped sources teach no class


@pytest.mark.slow
def test_scores_per_source_and_type_f1_of_typed_instances() -> None:
    import torch

    from wsi_mtl.network import create_model
    from wsi_mtl.postprocess import params_of
    from wsi_mtl.train._evaluate import format_table
    from wsi_mtl.train._nuclei_sources import score_nuclei_sources

    torch.manual_seed(0)
    model = create_model("wsimtl_small", seed=0)
    typed = _typed_item()
    plain = SegItem("p", "glioma", "nuclei", typed.image.copy(), typed.labels.copy())
    images: dict = {}
    res = score_nuclei_sources(model, [typed, plain], params=params_of(model), bf16=False, images=images)
    assert set(res["by_source"]) == {"consep", "glioma"} and res["by_source"]["glioma"]["n_images"] == 1
    assert 0.0 <= res["by_source"]["consep"]["aji"] <= 1.0
    errors = res["by_source"]["consep"]["errors"]
    assert errors["n_true"] == int(typed.labels.max()) and errors == images["nuclei_all/consep/t"]["errors"]
    assert set(errors) >= {"missed", "merges", "merged_true", "splits", "spurious"}
    t = res["types"]["consep"]
    assert set(t["f1"]) == {"epithelial", "fibroblast", "inflammatory", "other"} and t["n_true"] == 3
    assert set(res["types"]) == {"consep"} and set(images) == {"nuclei_all/consep/t", "nuclei_all/glioma/p"}
    table = format_table({"nuclei_all": res})
    assert "aji consep" in table and "missed consep" in table and "merged_true consep" in table


def test_source_mixture_draws_sources_by_weight_not_by_image_count() -> None:
    """``source_mixture``: a source with one image and weight 0.5 gives about half the samples,
    whatever the other source's image count; a weight-0 source gives none."""
    from wsi_mtl.train._loop import _pick_item

    items = [SegItem(f"g{i}", "glioma", "nuclei", np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.int32)) for i in range(30)]
    items.append(SegItem("c", "consep", "nuclei", np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.int32)))
    rng = np.random.default_rng(0)
    drawn = [_pick_item(rng, items, {"consep": 0.5, "glioma": 0.5}).source for _ in range(2000)]
    assert 0.45 < drawn.count("consep") / 2000 < 0.55
    uniform = [_pick_item(rng, items, None).source for _ in range(2000)]
    assert uniform.count("consep") < 150  # 1 image in 31
    assert {_pick_item(rng, items, {"consep": 0.0, "glioma": 1.0}).source for _ in range(200)} == {"glioma"}
    assert {_pick_item(rng, items, {"cpm15": 1.0}).source for _ in range(50)} == {"glioma", "consep"}  # no such source here: uniform


def test_source_mixture_and_nuclei_all_tuning_are_checked_when_read(tmp_path: Path) -> None:
    from wsi_mtl.train import load_config
    from wsi_mtl.train._loop import _tune_tasks

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "arch": "wsimtl_small"}))
    cfg = load_config(path, source_mixture={"nuclei_all": {"consep": 1.0}}, tune_images={"nuclei_all": 4, "gland": 0})
    assert _tune_tasks(cfg) == ["nuclei_all", "gland"]
    assert _tune_tasks(load_config(path)) == ["nuclei", "gland"]
    with pytest.raises(InputError, match="source_mixture"):
        load_config(path, source_mixture={"lc25000": {"a": 1.0}})
    with pytest.raises(InputError, match="source_mixture"):
        load_config(path, source_mixture={"nuclei_all": {"consep": 0.0}})
    with pytest.raises(InputError, match="tune_images"):
        load_config(path, tune_images={"nuclei": 4, "nuclei_all": 4})


def test_stage15_config_reads_and_its_sources_exist() -> None:
    """The nuclei stage's config is valid, trains only the nuclei parts and names only real sources."""
    from wsi_mtl.train import load_config
    from wsi_mtl.train._nuclei_sources import NUCLEI_SOURCES

    cfg = load_config(REPO / "configs" / "wsimtl-small-stage15.yaml")
    assert set(cfg.source_mixture["nuclei_all"]) == set(NUCLEI_SOURCES)
    assert all("Nuclei" in m for m in cfg.trainable) and cfg.ship_rule
    assert Path(cfg.splits).name == "validation-v2.yaml"


def test_checkpoint_score_counts_every_nuclei_source() -> None:
    from wsi_mtl.train._loop import score_of

    m = {"nuclei_all": {"by_source": {"monuseg": {"aji": 0.6}, "consep": {"aji": 0.2}}, "types": {"consep": {"macro_f1": 0.4}}}}
    assert score_of(m) == pytest.approx(0.4)
    assert score_of({"nuclei": {"aji": 0.5}, **m}) == pytest.approx(0.425)


def test_post_processing_recovers_real_nuclei_from_their_training_targets(shared_data: Path) -> None:
    """The nuclei AJI ceiling of the representation: each validation image's true nuclei turned into
    the 3-class maps the network is trained to give (interior eroded by 3 px, boundary band) and
    put through the shipped model's post-processing come back as nearly the same nuclei. Measured
    at these settings: MoNuSeg 0.937, CoNSeP 0.837 (every image of the v2 split), against the
    network's 0.521 and 0.332: the nuclei gap is the network's maps, not the post-processing."""
    from wsi_mtl import metrics
    from wsi_mtl.network.config import ModelConfig
    from wsi_mtl.postprocess import nuclei_labels, params_of
    from wsi_mtl.train._nuclei_sources import load_nuclei_sources
    from wsi_mtl.train._targets import inst_targets

    config = ModelConfig.from_json((REPO / "models" / "wsimtl-small" / "config.json").read_text())
    params = params_of(config.extra.get("postprocess"))
    split = yaml.safe_load(SPLIT_V2.read_text())
    items = load_nuclei_sources(shared_data, mpp=0.5, source_mpp=DEFAULT_SOURCE_MPP, sel=lambda s: {"names": split.get(s, [])},
                                sources=("monuseg", "consep"))
    aji: dict[str, list[float]] = {}
    for item in items:
        target = inst_targets(item.labels, erosion_px=3)
        perfect = np.stack([(target == k) for k in range(3)]).astype(np.uint8) * 255
        aji.setdefault(item.source, []).append(metrics.aji(item.labels, nuclei_labels(perfect, params)))
    assert len(aji["monuseg"]) == 6 and len(aji["consep"]) == 5
    assert np.mean(aji["monuseg"]) >= 0.90 and np.mean(aji["consep"]) >= 0.80

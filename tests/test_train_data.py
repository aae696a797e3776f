"""The training sources read from ../shared/data (skipped with a reason where it is absent)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from wsi_mtl.metrics import aji
from wsi_mtl.train import load_split, load_sources, split_touching
from wsi_mtl.train._augment import resize_labels

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("WSIMTL_DATA", REPO.parent / "shared" / "data"))
MONUSEG = DATA / "nuclei" / "monuseg"

pytestmark = [
    pytest.mark.shared_data,
    pytest.mark.skipif(not (MONUSEG / "manifest.csv").is_file(), reason=f"MoNuSeg not found under {DATA} (set WSIMTL_DATA)"),
]


def _manifest() -> list[dict[str, str]]:
    with open(MONUSEG / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_nuclei_split_items_are_the_binary_only_images_cut_into_instances():
    split = load_split(REPO / "configs" / "splits" / "validation.yaml")
    data = load_sources(DATA, mpp=0.5, source_mpp={"monuseg": 0.25}, split=split, part="train", lc_classes=[], tasks=["nuclei_binary", "nuclei_split"])
    binary = {i.name: i for i in data.seg["nuclei_binary"]}
    cut = {i.name: i for i in data.seg["nuclei_split"]}
    expected = {r["name"] for r in _manifest() if r["binary_mask"] and not r["instance_mask"]}
    assert set(cut) == set(binary) == expected and not set(cut) & set(split["monuseg"])
    for name, item in cut.items():
        assert item.kind == "nuclei" and item.source == "monuseg_split"
        np.testing.assert_array_equal(item.labels > 0, binary[name].labels > 0)  # foreground is the annotators'
        np.testing.assert_array_equal(item.image, binary[name].image)
    # the cut separates touching nuclei: more objects than 4-connected mask components overall
    n_objects = sum(int(i.labels.max()) for i in cut.values())
    n_components = sum(ndimage.label(i.labels > 0)[1] for i in cut.values())
    assert n_objects > 1.1 * n_components
    assert not load_sources(DATA, mpp=0.5, source_mpp={"monuseg": 0.25}, split=split, part="val", lc_classes=[], tasks=["nuclei_split"]).seg


def test_a_nuclei_split_batch_teaches_boundaries_and_nothing_else():
    import torch

    from wsi_mtl.train import TrainConfig, make_seg_batch

    split = load_split(REPO / "configs" / "splits" / "validation.yaml")
    data = load_sources(DATA, mpp=0.5, source_mpp={"monuseg": 0.25}, split=split, part="train", lc_classes=[], tasks=["nuclei_split"])
    cfg = TrainConfig(seg_batch=4, seg_crop_px=96, schedule=("nuclei_split",))
    b = make_seg_batch(np.random.default_rng(0), data, cfg, [], task="nuclei_split")
    assert b.images.shape == (4, 3, 96, 96)
    assert {0, 1, 2} <= set(torch.unique(b.seg["Nuclei-INST"]).tolist()) <= {0, 1, 2, 255}
    assert all((b.seg[h] == 255).all() for h in ("Gland-INST", "Lumen-INST", "Nuclei-TYPE"))


@pytest.mark.slow
def test_split_binary_masks_approach_the_xml_instances():
    """On images with both masks, the cut binary mask scores as the loader's docstring says."""
    rows = [r for r in _manifest() if r["instance_mask"] and r["binary_mask"]][:3]
    assert rows
    for r in rows:
        inst = np.asarray(Image.open(MONUSEG / r["instance_mask"])).astype(np.int32)
        binary = np.asarray(Image.open(MONUSEG / r["binary_mask"])) > 0
        shape = (inst.shape[0] // 2, inst.shape[1] // 2)  # 0.25 -> 0.5 um/px
        truth = resize_labels(inst, shape)
        mask = resize_labels(binary.astype(np.int32), shape) > 0
        cut, whole = aji(truth, split_touching(mask)), aji(truth, ndimage.label(mask)[0])
        assert cut > 0.7 and cut > whole, (r["name"], cut, whole)

"""Tissue mask: detection on synthetic and real slides, rejection of background/pen/border, helpers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wsi_mtl.slide import open_slide
from wsi_mtl.synthetic import downsample_image, make_he_texture, write_svs
from wsi_mtl.tissue import TissueMask, compute_tissue_mask, tissue_mask_from_image


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def truth_at(image: np.ndarray, factor: int) -> np.ndarray:
    """Tissue truth of a synthetic texture: not background-white, area-averaged to the mask grid."""
    stained = (image.min(axis=2) < 225).astype(np.uint8)[..., None].repeat(3, axis=2) * 255
    return downsample_image(stained, factor)[..., 0] > 127


@pytest.mark.parametrize("fixture", ["svs_jpeg", "ome_tiff", "png_image"])
def test_mask_matches_synthetic_tissue(request: pytest.FixtureRequest, he_image: np.ndarray, fixture: str) -> None:
    with open_slide(request.getfixturevalue(fixture)) as slide:
        result = compute_tissue_mask(slide, mask_mpp=2.0)
    assert result.mpp == 2.0 and result.mask.shape == (128, 192) and result.mask.dtype == bool
    truth = truth_at(he_image, 8)
    assert iou(result.mask, truth) > 0.85
    assert 0.3 < result.fraction < 0.75
    assert not result.mask[0].any() and not result.mask[:, 0].any()  # the white margin is background


def test_default_mask_mpp_is_coarse(svs_jpeg: Path) -> None:
    with open_slide(svs_jpeg) as slide:
        result = compute_tissue_mask(slide)
    assert result.mpp == 8.0 and result.mask.shape == (32, 48)
    assert 0.3 < result.fraction < 0.75


def test_mask_mpp_never_finer_than_slide(tmp_path: Path) -> None:
    image = make_he_texture(128, 128, seed=2)
    path = write_svs(tmp_path / "coarse.svs", image, mpp=4.0, levels=(1,))
    with open_slide(path) as slide:
        result = compute_tissue_mask(slide, mask_mpp=1.0)
    assert result.mpp == 4.0 and result.mask.shape == (128, 128)


@pytest.mark.parametrize("noise", [0, 3])
def test_all_background_gives_empty_mask(tmp_path: Path, noise: int) -> None:
    rng = np.random.default_rng(0)
    image = np.clip(242 + rng.normal(0, noise, (512, 512, 3)), 0, 255).astype(np.uint8)
    path = write_svs(tmp_path / "blank.svs", image, mpp=0.5, levels=(1, 4))
    with open_slide(path) as slide:
        result = compute_tissue_mask(slide, mask_mpp=4.0)
    assert result.empty and result.fraction == 0.0


def test_pen_marks_and_black_border_are_not_tissue() -> None:
    image = np.full((200, 300, 3), 245, np.uint8)
    image[60:140, 40:120] = (200, 110, 170)  # H&E-pink tissue
    image[20:40, 150:290] = (40, 160, 60)  # green pen
    image[150:170, 150:290] = (40, 60, 190)  # blue pen
    image[:, -8:] = 10  # black scanner border
    image[:8, :] = 0
    result = tissue_mask_from_image(image, mpp=4.0)
    truth = np.zeros((200, 300), bool)
    truth[60:140, 40:120] = True
    assert iou(result.mask, truth) > 0.9
    assert not result.mask[:, 140:].any()


def test_specks_are_removed_and_small_holes_filled() -> None:
    image = np.full((200, 200, 3), 245, np.uint8)
    image[50:150, 50:150] = (190, 100, 160)
    image[95:100, 95:100] = 245  # a 5x5 px hole (400 um^2 at 4 um/px) gets filled
    image[10:13, 10:13] = (120, 60, 140)  # a 3x3 px speck (144 um^2) is dropped
    result = tissue_mask_from_image(image, mpp=4.0)
    assert result.mask[97, 97]
    assert not result.mask[:20, :20].any()


def test_pale_tissue_on_white_is_found() -> None:
    image = np.full((100, 100, 3), 246, np.uint8)
    image[30:70, 30:70] = (232, 205, 222)  # faint eosin
    result = tissue_mask_from_image(image, mpp=8.0, min_tissue_um2=1_000)
    assert result.mask[35:65, 35:65].all()
    assert not result.mask[:20].any()


@pytest.mark.shared_data
def test_cmu_sample_mask(cmu_small: Path) -> None:
    with open_slide(cmu_small) as slide:
        result = compute_tissue_mask(slide)
    assert result.mask.shape == (186, 139)
    assert 0.2 < result.fraction < 0.6
    assert not result.mask[:, :10].any()  # the left side of this slide is bare glass


# -- TissueMask helpers (pure) ------------------------------------------------------------------
def make_mask() -> TissueMask:
    mask = np.zeros((4, 6), bool)
    mask[1, 2] = True  # covers [8, 16) x [16, 24) in px at mpp 1 (mask mpp 8)
    return TissueMask(mask=mask, mpp=8.0)


@pytest.mark.parametrize(("region", "expected"), [
    ((8, 16, 16, 24), True),
    ((0, 0, 8, 16), False),  # half-open: ends exactly where the tissue pixel starts
    ((15, 23, 40, 40), True),
    ((16, 24, 40, 40), False),
    ((-100, -100, 9, 17), True),
    ((100, 100, 200, 200), False),
    ((8, 16, 8, 24), False),  # empty region
])
def test_any_in(region: tuple[int, int, int, int], expected: bool) -> None:
    assert make_mask().any_in(*region, mpp=1.0) is expected


def test_any_in_other_mpp_and_fraction_in() -> None:
    mask = make_mask()
    assert mask.any_in(2, 4, 3, 5, mpp=4.0)  # [8, 12) x [16, 20) um/4 -> inside pixel (1, 2)
    assert not mask.any_in(0, 0, 1, 4, mpp=8.0)
    assert mask.fraction_in(0, 0, 16, 24, mpp=1.0) == pytest.approx(1 / 6)
    assert mask.fraction_in(50, 50, 60, 60, mpp=8.0) == 0.0
    assert mask.fraction == pytest.approx(1 / 24)


def test_at_mpp_nearest() -> None:
    mask = make_mask()
    fine = mask.at_mpp(4.0)
    assert fine.shape == (8, 12)
    assert fine[2:4, 4:6].all() and fine.sum() == 4
    coarse = mask.at_mpp(16.0, shape=(3, 4))
    assert coarse.shape == (3, 4) and coarse.sum() == 0  # centre of coarse px (0, 1) is mask px (1, 3)
    assert mask.at_mpp(8.0).tolist() == mask.mask.tolist()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"mask": np.zeros((2, 2, 2), bool), "mpp": 8.0}, "2-D"),
    ({"mask": np.zeros((2, 2), bool), "mpp": 0.0}, "mpp must be positive"),
])
def test_tissue_mask_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TissueMask(**kwargs)


def test_helper_validation() -> None:
    mask = make_mask()
    with pytest.raises(ValueError, match="mpp must be positive"):
        mask.any_in(0, 0, 1, 1, mpp=-1.0)
    with pytest.raises(ValueError, match="y1 >= y0"):
        mask.any_in(5, 0, 1, 1, mpp=1.0)
    with pytest.raises(ValueError, match="mpp must be positive"):
        mask.at_mpp(0.0)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        tissue_mask_from_image(np.zeros((4, 4), np.uint8), mpp=8.0)
    with pytest.raises(ValueError, match="mpp must be positive"):
        tissue_mask_from_image(np.zeros((4, 4, 3), np.uint8), mpp=0.0)


def test_compute_rejects_bad_mask_mpp(svs_jpeg: Path) -> None:
    with open_slide(svs_jpeg) as slide, pytest.raises(ValueError, match="mask_mpp"):
        compute_tissue_mask(slide, mask_mpp=-8.0)


@pytest.mark.shared_data
def test_kather_tiles_tissue_vs_empty(shared_data: Path) -> None:
    import csv

    from PIL import Image

    folder = shared_data / "tissue" / "kather2016_like_100"
    if not (folder / "labels.csv").is_file():
        pytest.skip(f"{folder} not present")
    fractions: dict[str, list[float]] = {}
    with open(folder / "labels.csv") as fh:
        for row in csv.DictReader(fh):
            name = row["label_name_assumed_tfds_order"]
            if name not in ("tumor", "stroma", "lympho", "empty"):
                continue
            image = np.asarray(Image.open(folder / row["file"]).convert("RGB"))[::4, ::4]
            result = tissue_mask_from_image(np.ascontiguousarray(image), mpp=2.0, min_tissue_um2=200)
            fractions.setdefault(name, []).append(result.fraction)
    for name in ("tumor", "stroma", "lympho"):
        assert np.mean(fractions[name]) > 0.9, name
    assert np.mean(fractions["empty"]) < 0.4  # noisy grey glass tiles


# -- images that are tissue from edge to edge (no background for Otsu to split off) -------------

def _tile_png(path: Path, image: np.ndarray) -> Path:
    """A 1000 x 1000 px tile (to be opened at 0.25 um/px) made from ``image``."""
    from PIL import Image

    Image.fromarray(image).resize((1000, 1000), Image.Resampling.BICUBIC).save(path)
    return path


def _kather(shared_data: Path, name: str) -> list[np.ndarray]:
    import csv

    from PIL import Image

    folder = shared_data / "tissue" / "kather2016_like_100"
    if not (folder / "labels.csv").is_file():
        pytest.skip(f"{folder} not present")
    with open(folder / "labels.csv") as fh:
        files = [row["file"] for row in csv.DictReader(fh) if row["label_name_assumed_tfds_order"] == name]
    return [np.asarray(Image.open(folder / f).convert("RGB")) for f in files]


def _mucus(seed: int = 0) -> np.ndarray:
    """Pale blue-purple wisps, like mucus pools: low saturation everywhere, no glass."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    n = ndimage.gaussian_filter(rng.normal(0, 1, (500, 500)), 6)
    n /= n.std()
    return np.stack([228 + 10 * n, 226 + 10 * n, 240 + 6 * n], -1).clip(0, 255).astype(np.uint8)


def _mask_of_tile(path: Path) -> TissueMask:
    with open_slide(path, mpp=0.25) as slide:
        return compute_tissue_mask(slide, mask_mpp=8.0)


@pytest.mark.shared_data
@pytest.mark.parametrize("name,pale", [("stroma", 0.85), ("adipose", 0.0), ("debris", 0.0)])
def test_edge_to_edge_tissue_tiles_are_not_rejected(shared_data: Path, tmp_path: Path, name: str, pale: float) -> None:
    """Pale stroma (Kather stroma blended 85% towards white), fat and debris/mucus tiles all keep tissue
    (each as the 8 um/px thumbnail of a 1000 px tile at 0.25 um/px; the first also through a file)."""
    from PIL import Image

    for i, image in enumerate(_kather(shared_data, name)):
        image = (image.astype(np.float32) * (1 - pale) + 255 * pale).astype(np.uint8)
        if i == 0:
            assert not _mask_of_tile(_tile_png(tmp_path / f"{name}.png", image)).empty
        thumb = np.asarray(Image.fromarray(image).resize((32, 32), Image.Resampling.BOX))
        assert not tissue_mask_from_image(thumb, mpp=8.0).empty, f"{name} tile {i} rejected"


def test_mucus_tile_is_not_rejected(tmp_path: Path) -> None:
    result = _mask_of_tile(_tile_png(tmp_path / "mucus.png", _mucus()))
    assert result.fraction > 0.9


@pytest.mark.parametrize("colour", [(250, 250, 250), (245, 240, 230), (235, 238, 245)])
def test_grey_and_tinted_glass_tiles_stay_empty(tmp_path: Path, colour: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(1)
    glass = np.clip(np.array(colour) + rng.normal(0, 2, (500, 500, 3)), 0, 255).astype(np.uint8)
    assert _mask_of_tile(_tile_png(tmp_path / "glass.png", glass)).empty

"""preview.png: the thumbnail with objects in their class colours, a legend and a scale bar."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
import shapely
from PIL import Image

from wsi_mtl.errors import InputError
from wsi_mtl.export import write_preview, write_table
from wsi_mtl.objects import COLUMNS, ObjectBatch

RED, GREEN, BLUE, MAGENTA = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 0, 255)


def _batch(task: str, classes: list[str], polys: list[shapely.Geometry], colors: dict) -> ObjectBatch:
    n = len(polys)
    cols: dict[str, np.ndarray] = {
        "id": np.array([str(uuid.uuid4()) for _ in range(n)]),
        "task": np.array([task] * n),
        "class_name": np.array(classes),
        "class_id": np.ones(n, dtype=np.int32),
        **{name: np.full(n, 0.9) for name, kind in COLUMNS.items() if kind == "f"},
    }
    return ObjectBatch(cols, np.array(polys, dtype=object), colors)


@pytest.fixture()
def table(tmp_path: Path) -> Path:
    """Level-0 scene 4000 x 3000 px: a tissue region with a hole, a gland, a lumen and nuclei."""
    tissue = shapely.box(0, 0, 2000, 3000).difference(shapely.box(800, 800, 1200, 1200))
    batches = [
        _batch("tissue", ["tumour"], [tissue], {("tissue", "tumour"): MAGENTA, ("tissue", "stroma"): (0, 128, 128)}),
        _batch("gland", ["gland"], [shapely.box(2400, 400, 3600, 1600)], {("gland", "gland"): GREEN}),
        _batch("lumen", ["lumen"], [shapely.box(2800, 800, 3200, 1200)], {("lumen", "lumen"): BLUE}),
        _batch(
            "nuclei",
            ["epithelial", "epithelial", "inflammatory"],
            # two tiny nuclei (dots on the thumbnail) and one large one (an outline)
            [shapely.Point(3000, 2500).buffer(12), shapely.Point(3400, 2500).buffer(12), shapely.Point(1000, 2000).buffer(120)],
            {("nuclei", "epithelial"): RED, ("nuclei", "inflammatory"): BLUE},
        ),
    ]
    path = tmp_path / "objects.parquet"
    write_table(batches, path, mpp=0.5)
    return path


def _near(img: np.ndarray, y: int, x: int, rgb: tuple[int, int, int], r: int = 2) -> bool:
    """Is colour ``rgb`` within ``r`` px of (y, x)? (a line on a pixel edge may fall either side)"""
    window = img[y - r : y + r + 1, x - r : x + r + 1]
    return bool((window == rgb).all(axis=2).any())


def _thumb() -> np.ndarray:
    return np.full((300, 400, 3), 235, dtype=np.uint8)  # downsample 10


def test_preview_draws_classes_in_their_colours(table: Path, tmp_path: Path) -> None:
    out = tmp_path / "preview.png"
    counts = write_preview(_thumb(), table, out, downsample=10.0, legend=False)
    assert counts == {
        "nuclei": {"epithelial": 2, "inflammatory": 1},
        "gland": {"gland": 1},
        "lumen": {"lumen": 1},
        "tissue": {"tumour": 1, "stroma": 0},
    }
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert img.shape == (300, 400, 3)
    # tissue: translucent magenta fill, but not inside its hole
    inside, hole, outside = img[200, 50], img[100, 100], img[280, 380]
    assert inside[1] < 235 and inside[0] > inside[1] and inside[2] > inside[1]
    assert list(hole) == [235, 235, 235] and list(outside) == [235, 235, 235]
    # gland outline green at x = 240 (level-0 2400), lumen outline blue at x = 280
    assert _near(img, 100, 240, GREEN) and _near(img, 100, 280, BLUE)
    # small nuclei are filled dots at their centres; the big one is an outline (centre untouched)
    assert _near(img, 250, 300, RED, 1) and _near(img, 250, 340, RED, 1)
    assert tuple(img[200, 100])[2] != 255
    ring = img[200 - 12 : 200 + 13, 100 - 12 : 100 + 13].reshape(-1, 3)
    assert any(tuple(px) == BLUE for px in ring)


def test_preview_with_legend_is_wider(table: Path, tmp_path: Path) -> None:
    out = tmp_path / "preview.png"
    write_preview(_thumb(), table, out, downsample=10.0, colors={("gland", "gland"): (1, 2, 3)})
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape[1] > 400 + 100 and img.shape[0] >= 300
    assert _near(img, 100, 240, (1, 2, 3))  # colours given override the table's
    panel = img[:, 400:]
    assert (panel == (255, 255, 255)).all(axis=2).mean() > 0.7  # mostly white with swatches and text
    assert (panel == MAGENTA).all(axis=2).any()  # tissue swatch outline


def test_preview_scale_bar(table: Path, tmp_path: Path) -> None:
    out = tmp_path / "preview.png"
    write_preview(_thumb(), table, out, downsample=10.0, legend=False)
    img = np.asarray(Image.open(out).convert("RGB"))
    # 5 um per thumbnail px: 15% of 400 px = 300 um -> a 200 um bar of 40 px, black, lower left
    black = (img[250:, :120] == 0).all(axis=2)
    assert black.any(axis=0).sum() >= 40


def test_preview_empty_table(tmp_path: Path) -> None:
    table = tmp_path / "objects.parquet"
    write_table([], table, mpp=0.5)
    counts = write_preview(_thumb(), table, tmp_path / "p.png", downsample=10.0)
    assert counts == {}
    assert Image.open(tmp_path / "p.png").size[0] > 400


@pytest.mark.parametrize(
    ("thumb", "match"),
    [
        (np.zeros((10, 10), dtype=np.uint8), "shape"),
        (np.zeros((10, 10, 3), dtype=np.float32), "uint8"),
        (np.zeros((0, 10, 3), dtype=np.uint8), "shape"),
    ],
)
def test_preview_bad_thumbnail(table: Path, tmp_path: Path, thumb: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        write_preview(thumb, table, tmp_path / "p.png", downsample=10.0)
    assert not (tmp_path / "p.png").exists()


@pytest.mark.parametrize("downsample", [0.0, -2.0, float("nan")])
def test_preview_bad_downsample(table: Path, tmp_path: Path, downsample: float) -> None:
    with pytest.raises(ValueError, match="downsample"):
        write_preview(_thumb(), table, tmp_path / "p.png", downsample=downsample)


def test_preview_missing_table(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="object table not found"):
        write_preview(_thumb(), tmp_path / "none.parquet", tmp_path / "p.png", downsample=10.0)


def test_preview_interrupted_leaves_no_file(table: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_save(self: Image.Image, fp: object, *args: object, **kwargs: object) -> None:
        Path(str(fp)).write_bytes(b"\x89PNG half")
        raise OSError("encoder died")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="encoder died"):
        write_preview(_thumb(), table, tmp_path / "preview.png", downsample=10.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["objects.parquet"]

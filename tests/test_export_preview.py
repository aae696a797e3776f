"""preview.png: slide, tissue map, glands and lumen, nuclei density panels, a legend and a scale bar."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
import shapely
from PIL import Image

from wsi_mtl.errors import InputError
from wsi_mtl.export import write_preview, write_table
from wsi_mtl.export._preview import _panel_layout
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
        **{name: np.zeros(n, dtype=bool) for name, kind in COLUMNS.items() if kind == "b"},
    }
    centroids = shapely.get_coordinates(shapely.centroid(np.array(polys, dtype=object)))  # as polygon_measurements gives them
    cols["centroid_x_px"], cols["centroid_y_px"] = centroids[:, 0], centroids[:, 1]
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


def _thumb() -> np.ndarray:
    return np.full((300, 400, 3), 235, dtype=np.uint8)  # downsample 10


GREY = 246  # the pale grey copy of a 235 grey thumbnail: 255 - 20 x 0.45


def _panels(img: np.ndarray, thumb_hw: tuple[int, int] = (300, 400), scale: float = 0.5) -> dict[str, np.ndarray]:
    """The four panel pictures of a preview, by title (each at ``scale`` x the thumbnail)."""
    h, w = round(thumb_hw[0] * scale), round(thumb_hw[1] * scale)
    origins, _, _ = _panel_layout(w, h, 4)
    names = ("slide", "tissue", "glands", "nuclei")
    return {n: img[y : y + h, x : x + w].astype(int) for n, (x, y) in zip(names, origins)}


def _tinted(px: np.ndarray, rgb: tuple[int, int, int]) -> bool:
    """Has ``px`` moved from the grey background clearly towards ``rgb`` (cosine > 0.9)?"""
    moved, towards = px.astype(float) - GREY, np.asarray(rgb, dtype=float) - GREY
    return bool(np.linalg.norm(moved) > 30 and moved @ towards / (np.linalg.norm(moved) * np.linalg.norm(towards)) > 0.9)


def test_preview_panels_show_each_task_apart(table: Path, tmp_path: Path) -> None:
    out = tmp_path / "preview.png"
    counts = write_preview(_thumb(), table, out, downsample=10.0, legend=False)
    assert counts == {
        "nuclei": {"epithelial": 2, "inflammatory": 1},
        "gland": {"gland": 1},
        "lumen": {"lumen": 1},
        "tissue": {"tumour": 1, "stroma": 0},
    }
    img = np.asarray(Image.open(out).convert("RGB"))
    origins, size, _ = _panel_layout(200, 150, 4)
    assert img.shape == (size[1], size[0], 3) and len({x for x, _ in origins}) == 2  # 2 x 2 for a 4:3 slide
    p = _panels(img)  # panel px = 20 level-0 px
    assert (p["slide"][:100] == 235).all()  # the slide panel is the thumbnail alone (a scale bar at its foot)
    # tissue map: magenta fill, not in its hole, nothing on the rest; no nucleus or gland colours
    assert _tinted(p["tissue"][100, 25], MAGENTA) and (p["tissue"][50, 50] == GREY).all()
    assert (p["tissue"][:, 110:] == GREY).all()
    # glands and lumen: green gland body, blue lumen, grey elsewhere (no tissue fill)
    assert _tinted(p["glands"][30, 130], GREEN) and _tinted(p["glands"][50, 150], BLUE)
    assert (p["glands"][100, 25] == GREY).all()
    # nuclei density: the cell of the two epithelial nuclei is red, the inflammatory one blue
    assert _tinted(p["nuclei"][125, 150], RED) and _tinted(p["nuclei"][100, 50], BLUE)
    assert (p["nuclei"][30, 130] == GREY).all() and (p["nuclei"][100, 25] == GREY).all()


def test_tissue_fills_stay_inside_the_tissue_mask(table: Path, tmp_path: Path) -> None:
    out = tmp_path / "preview.png"
    mask = np.zeros((30, 40), dtype=bool)  # 100 level-0 px per mask px
    mask[:, :10] = True  # tissue only at level-0 x < 1000
    write_preview(_thumb(), table, out, downsample=10.0, legend=False, tissue_mask=(mask, 100.0))
    p = _panels(np.asarray(Image.open(out).convert("RGB")))
    assert _tinted(p["tissue"][140, 25], MAGENTA)  # level-0 x 500: tissue
    assert (p["tissue"][140, 75] == GREY).all()  # level-0 x 1500: glass, though inside the region


def test_preview_with_legend_is_wider(table: Path, tmp_path: Path) -> None:
    out = tmp_path / "preview.png"
    write_preview(_thumb(), table, out, downsample=10.0, colors={("gland", "gland"): (1, 2, 3)})
    img = np.asarray(Image.open(out).convert("RGB"))
    _, (width, height), _ = _panel_layout(200, 150, 4)
    assert img.shape[1] > width + 100 and img.shape[0] >= height
    assert _tinted(_panels(img)["glands"][30, 130].astype(int), (1, 2, 3))  # colours given override the table's
    panel = img[:, width:]
    assert (panel == (255, 255, 255)).all(axis=2).mean() > 0.7  # mostly white with swatches and text
    assert (panel == RED).all(axis=2).any()  # epithelial swatch


def test_preview_scale_bar(table: Path, tmp_path: Path) -> None:
    out = tmp_path / "preview.png"
    write_preview(_thumb(), table, out, downsample=10.0, legend=False)
    slide = _panels(np.asarray(Image.open(out).convert("RGB")))["slide"]
    # 10 um per panel px: 15% of 200 px = 300 um -> a 200 um bar of 20 px, black, lower left
    black = (slide[100:, :80] == 0).all(axis=2)
    assert black.any(axis=0).sum() >= 20


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


@pytest.mark.parametrize(("kwargs", "match"), [({"scale": 0.0}, "scale"), ({"scale": 2.0}, "scale"),
                                               ({"tissue_mask": (np.zeros(5, dtype=bool), 10.0)}, "tissue_mask")])
def test_preview_bad_options(table: Path, tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        write_preview(_thumb(), table, tmp_path / "p.png", downsample=10.0, **kwargs)
    assert not (tmp_path / "p.png").exists()


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

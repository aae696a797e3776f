"""derive_objects: predictions.zarr -> objects.parquet, GeoJSON, preview.png, tissue map, run.json."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import wsi_mtl.postprocess as postprocess
from wsi_mtl import derive
from wsi_mtl.derive import derive_objects
from wsi_mtl.errors import InputError
from wsi_mtl.export import LABEL_IMAGES, read_table_info, synthetic_batches
from wsi_mtl.objects import ObjectBatch

try:
    from test_export_geojson import assert_qupath_geojson
except ImportError:  # tests collected as a package
    from .test_export_geojson import assert_qupath_geojson  # type: ignore[no-redef]

ALL_TASKS = ("nuclei", "gland", "lumen", "tissue")
SLIDE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"
TISSUE_CLASSES = ["tumour", "stroma", "lymphocytes"]
#: the NGFF label images derive writes into this store (its heads: Nuclei-INST, Patch-Class)
LABEL_PATHS = ["predictions.zarr/Patch-Class/labels/tissue_classes", "predictions.zarr/Nuclei-INST/labels/nuclei"]


def make_result_dir(tmp_path: Path, *, width: int = 4000, height: int = 3000, slide_path: str = "/nonexistent/slide.svs") -> Path:
    """A finished result folder as the engine leaves it: predictions.zarr (status maps) + run.json."""
    import zarr

    from wsi_mtl.store import HeadLayout, PredictionStore

    result_dir = tmp_path / "slide"
    result_dir.mkdir()
    ds, ps = 2.0, 16  # slide 0.25 mpp, model 0.5 mpp; Patch-Class every 16 model px
    mh, mw = int(np.ceil(height / ds)), int(np.ceil(width / ds))
    heads_attrs = {
        "Nuclei-INST": {"kind": "segmentation", "classes": ["background", "nucleus"], "colors": [[0, 0, 0], [255, 0, 0]], "cell_px": 1},
        "Patch-Class": {"kind": "patch", "classes": TISSUE_CLASSES, "colors": [[200, 0, 200], [255, 140, 0], [0, 0, 255]], "cell_px": ps},
    }
    attrs = {
        "heads": heads_attrs,
        "slide": {"path": slide_path, "width": width, "height": height, "mpp": 0.25, "mpp_source": "test", "offset": [0, 0]},
        "model_mpp": 0.5,
        "downsample": ds,
        "tissue_mask_mpp": 8.0,
    }
    store = PredictionStore(
        result_dir, heads=[HeadLayout("Nuclei-INST", 2, 1), HeadLayout("Patch-Class", 3, ps)], height=mh, width=mw,
        core_px=256, downsample=ds, fingerprint={"test": 1}, attrs=attrs,
    )
    mask = np.zeros((int(np.ceil(height * 0.25 / 8)), int(np.ceil(width * 0.25 / 8))), dtype=bool)
    mask[10:80, 10:60] = True
    store.write_mask("tissue_mask", mask, downsample=32.0)
    store.finalize()
    store.close()
    patch = zarr.open_array(result_dir / "predictions.zarr" / "Patch-Class" / "0", mode="r+")
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=patch.shape, dtype=np.uint8)
    data[:, :3, :] = 0  # nothing computed in the top rows
    patch[...] = data
    run = {"status": "maps", "slide": {"path": slide_path, "mpp": 0.25, "width": width, "height": height},
           "objects": {}, "timings_s": {"inference": 1.5}, "files": [{"path": "predictions.zarr", "bytes": 1}]}
    (result_dir / "run.json").write_text(json.dumps(run))
    return result_dir


def fake_extract(n: int = 600, *, width: int = 4000, height: int = 3000, calls: list | None = None, fail_after: int | None = None):
    def extract_objects(predictions_path: Path, *, workers: int = 1, tasks: tuple[str, ...] | None = None, params: Any = None) -> Iterator[ObjectBatch]:
        if calls is not None:
            calls.append({"path": Path(predictions_path), "workers": workers, "tasks": tasks, "params": params})
        extent = min(width, height)
        for i, batch in enumerate(synthetic_batches(n, batch_size=200, tasks=ALL_TASKS, extent_px=extent, seed=1)):
            if fail_after is not None and i >= fail_after:
                raise RuntimeError("post-processing crashed")
            yield batch

    return extract_objects


@pytest.fixture(autouse=True)
def small_preview(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep previews small: PNG encoding of a full-size preview dominates these tests."""
    monkeypatch.setattr(derive, "PREVIEW_MAX_PX", 512)


@pytest.fixture()
def result_dir(tmp_path: Path) -> Path:
    return make_result_dir(tmp_path)


def test_derive_writes_everything_and_updates_run_json(result_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(postprocess, "extract_objects", fake_extract(calls=calls), raising=False)
    summary = derive_objects(result_dir, workers=2)
    assert calls == [{"path": result_dir / "predictions.zarr", "workers": 2, "tasks": None, "params": postprocess.PostprocessParams()}]
    info = read_table_info(result_dir / "objects.parquet")
    assert summary["rows"] == info["rows"] == 600
    assert summary["objects"] == info["counts"] and set(summary["objects"]) == set(ALL_TASKS)
    for name in ("objects.geojson", "nuclei.geojson", "glands.geojson", "tissue.geojson"):
        doc = json.loads((result_dir / name).read_text())
        assert_qupath_geojson(doc)
    assert (result_dir / "preview.png").stat().st_size > 0

    run = json.loads((result_dir / "run.json").read_text())
    assert run["objects"] == summary["objects"]
    assert run["status"] == "maps" and run["timings_s"]["inference"] == 1.5  # the engine's fields are kept
    assert set(run["timings_s"]) == {"inference", "objects", "export"}
    paths = [f["path"] for f in run["files"]]
    assert paths == ["predictions.zarr", "objects.parquet", "objects.geojson", "nuclei.geojson", "glands.geojson",
                     "tissue.geojson", "preview.png", *LABEL_PATHS]
    for entry in run["files"]:
        assert entry["bytes"] > 1 and (result_dir / entry["path"]).exists()
    assert summary["files"] == run["files"][1:]
    assert not [p for p in result_dir.iterdir() if ".partial-" in p.name]


def test_label_images_alike_written_beside_the_exports_and_after_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With workers the nuclei label image is rasterised in a process of their own while the GeoJSON
    and the preview are written, the others after them: the same arrays and metadata as one
    process writing them all in turn."""
    import zarr

    monkeypatch.setattr(postprocess, "extract_objects", fake_extract(), raising=False)
    for w in (1, 2):
        (tmp_path / str(w)).mkdir()
    dirs = [make_result_dir(tmp_path / str(w)) for w in (1, 2)]
    for d, w in zip(dirs, (1, 2)):
        derive_objects(d, workers=w)
    for path in LABEL_PATHS:
        a, b = (zarr.open_group(d / path, mode="r") for d in dirs)
        assert dict(a.attrs) == dict(b.attrs)
        assert sorted(a.array_keys()) == sorted(b.array_keys())
        for key in a.array_keys():
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))
    assert np.asarray(zarr.open_group(dirs[1] / LABEL_PATHS[1], mode="r")["0"]).max() > 0


def test_label_images_written_in_turn_where_no_process_can_start(result_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wsi_mtl.postprocess import _pool

    def refused(role: str) -> None:
        raise OSError("Resource temporarily unavailable")

    monkeypatch.setattr(postprocess, "extract_objects", fake_extract(), raising=False)
    monkeypatch.setattr(_pool, "single_executor", refused)
    derive_objects(result_dir, workers=2)
    run = json.loads((result_dir / "run.json").read_text())
    assert all(path in [f["path"] for f in run["files"]] for path in LABEL_PATHS)


def test_freed_pages_go_back_after_the_table_and_before_the_exports(result_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """segment's process keeps freed pages for the network's next tile: what the objects' assembly
    and the map pyramids freed goes back once the table is written, before the label image and
    GeoJSON processes start beside it (16,384^2 px at 0.5 um/px: ~0.39 GB here)."""
    import wsi_mtl.export as export

    calls: list[str] = []
    monkeypatch.setattr(postprocess, "extract_objects", fake_extract(), raising=False)
    write_table, write_geojson_files = export.write_table, export.write_geojson_files
    monkeypatch.setattr(export, "write_table", lambda *a, **k: (calls.append("table"), write_table(*a, **k))[1])
    monkeypatch.setattr(export, "write_geojson_files", lambda *a, **k: (calls.append("geojson"), write_geojson_files(*a, **k))[1])
    monkeypatch.setattr(derive, "release_freed_pages", lambda: calls.append("given back"))
    monkeypatch.setattr(derive._LabelImages, "__init__", _recording_init(derive._LabelImages.__init__, calls))
    derive_objects(result_dir, workers=2)
    assert calls == ["table", "given back", "label images", "geojson"]


@pytest.mark.parametrize(("workers", "refused", "formatting"), [(1, False, 1), (2, False, 1), (3, False, 2), (2, True, 2)])
def test_the_label_image_process_takes_one_worker_from_the_geojson(result_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  workers: int, refused: bool, formatting: int) -> None:
    """While the label image is rasterised in a process of its own, the GeoJSON is formatted by one
    worker fewer (on 2 workers: in this process, no pool beside it); where that process could not
    start, by every worker."""
    import wsi_mtl.export as export
    from wsi_mtl.postprocess import _pool

    asked: list[int] = []
    monkeypatch.setattr(postprocess, "extract_objects", fake_extract(), raising=False)
    real = export.write_geojson_files
    monkeypatch.setattr(export, "write_geojson_files", lambda *a, **k: (asked.append(k["workers"]), real(*a, **k))[1])
    if refused:
        monkeypatch.setattr(_pool, "single_executor", lambda role: (_ for _ in ()).throw(OSError("no process")))
    derive_objects(result_dir, workers=workers)
    assert asked == [formatting]


def _recording_init(init: Any, calls: list[str]) -> Any:
    def recorded(self: Any, *args: Any, **kwargs: Any) -> None:
        calls.append("label images")
        init(self, *args, **kwargs)

    return recorded


def test_gz_adds_copies_and_a_plain_export_removes_them(result_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--geojson-gz adds gzipped copies; a later export without it leaves exactly what run.json lists."""
    import gzip

    monkeypatch.setattr(postprocess, "extract_objects", fake_extract(), raising=False)
    derive_objects(result_dir)
    summary = derive_objects(result_dir, geojson_gz=True)
    run = json.loads((result_dir / "run.json").read_text())
    paths = [f["path"] for f in run["files"]]
    assert len(paths) == len(set(paths)) and paths.count("objects.parquet") == 1
    for stem in ("objects", "nuclei", "glands", "tissue"):
        assert f"{stem}.geojson" in paths and f"{stem}.geojson.gz" in paths
        assert gzip.decompress((result_dir / f"{stem}.geojson.gz").read_bytes()) == (result_dir / f"{stem}.geojson").read_bytes()
    assert summary["removed"] == []

    (result_dir / "mine.geojson").write_text("{}")  # a user's file: never ours, never removed
    summary = derive_objects(result_dir)
    run = json.loads((result_dir / "run.json").read_text())
    listed = {f["path"] for f in run["files"]}
    on_disk = {p.name for p in result_dir.iterdir() if p.name not in ("run.json", "mine.geojson")}
    assert (result_dir / "mine.geojson").exists()
    assert on_disk == listed - set(LABEL_PATHS)
    assert not any(p.endswith(".gz") for p in listed)
    assert sorted(summary["removed"]) == ["glands.geojson.gz", "nuclei.geojson.gz", "objects.geojson.gz", "tissue.geojson.gz"]


def test_tissue_class_map_stored(result_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import zarr

    import geopandas

    monkeypatch.setattr(postprocess, "extract_objects", fake_extract(50), raising=False)
    derive_objects(result_dir)
    root = zarr.open_group(result_dir / "predictions.zarr", mode="r")
    stored = np.asarray(root["Patch-Class/labels/tissue_classes"]["0"])  # an NGFF label of the Patch-Class image
    source = np.asarray(root["Patch-Class"]["0"])
    assert stored.dtype == np.uint8 and stored.shape == (1, *source.shape[1:])
    # each tissue region of the table is drawn with its class (position in the head's classes + 1)
    regions = geopandas.read_parquet(result_dir / "objects.parquet").query("task == 'tissue'")
    assert len(regions)
    for geom, name in zip(regions.geometry, regions.class_name):
        point = geom.representative_point()
        assert stored[0, int(point.y // 32), int(point.x // 32)] == TISSUE_CLASSES.index(name) + 1
    group_attrs = root["Patch-Class/labels/tissue_classes"].attrs.asdict()
    assert group_attrs["wsimtl"]["classes"] == TISSUE_CLASSES
    scale = group_attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert scale[-1] == 8.0  # 32 level-0 px per cell (2 per model px x 16 model px per cell) x 0.25 um


def test_no_tissue_map_when_disabled(result_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(postprocess, "extract_objects", fake_extract(50), raising=False)
    summary = derive_objects(result_dir, tissue_map=False)
    assert not (result_dir / "predictions.zarr" / "Patch-Class" / "labels").exists()
    assert not [f for f in summary["files"] if "/labels/" in f["path"]]


def test_preview_from_tissue_mask_without_slide(result_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    monkeypatch.setattr(postprocess, "extract_objects", fake_extract(0), raising=False)
    derive_objects(result_dir)
    img = np.asarray(Image.open(result_dir / "preview.png").convert("RGB"))
    # 4000 x 3000 level-0 px -> a 512 x 384 picture (downsample 7.8125), drawn at half size in the
    # preview's slide panel: the tissue mask (rows 10-80, cols 10-60 of 32 px cells, i.e. level-0
    # x 320-1920, y 320-2560) is a pale pink box of about 102 x 143 px
    pink = np.argwhere((img == (240, 214, 226)).all(axis=2))
    assert len(pink)
    (y0, x0), (y1, x1) = pink.min(axis=0), pink.max(axis=0)
    assert abs((x1 - x0 + 1) - 1600 / 7.8125 / 2) <= 2 and abs((y1 - y0 + 1) - 2240 / 7.8125 / 2) <= 2


def test_preview_from_given_slide(result_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    class FakeSlide:
        mpp = 0.25

        def __init__(self) -> None:
            self.asked: list[float] = []

        def thumbnail(self, *, mpp: float) -> np.ndarray:
            self.asked.append(mpp)
            ds = mpp / self.mpp
            return np.full((int(np.ceil(3000 / ds)), int(np.ceil(4000 / ds)), 3), (10, 20, 30), dtype=np.uint8)

    slide = FakeSlide()
    monkeypatch.setattr(postprocess, "extract_objects", fake_extract(0), raising=False)
    derive_objects(result_dir, slide=slide)
    assert slide.asked == [pytest.approx(0.25 * 4000 / 512)]
    img = np.asarray(Image.open(result_dir / "preview.png").convert("RGB"))
    assert tuple(img[100, 200]) == (10, 20, 30)


@pytest.mark.shared_data
@pytest.mark.skipif(not SLIDE.is_file(), reason=f"sample slide not found at {SLIDE}")
def test_preview_reopens_recorded_slide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    from wsi_mtl.slide import open_slide

    with open_slide(SLIDE) as s:  # type: ignore[attr-defined]
        width, height = s.width, s.height
    result_dir = make_result_dir(tmp_path, width=width, height=height, slide_path=str(SLIDE))
    monkeypatch.setattr(postprocess, "extract_objects", fake_extract(100, width=width, height=height), raising=False)
    derive_objects(result_dir)
    img = np.asarray(Image.open(result_dir / "preview.png").convert("RGB"))
    ds = max(width, height) / 512
    picture = img[: round(height / ds), : round(width / ds)]
    assert picture.std() > 20  # a real H&E thumbnail, not a flat mask picture


def test_interrupted_derive_leaves_run_json_and_no_outputs(result_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = (result_dir / "run.json").read_text()
    monkeypatch.setattr(postprocess, "extract_objects", fake_extract(fail_after=1), raising=False)
    with pytest.raises(RuntimeError, match="crashed"):
        derive_objects(result_dir)
    assert (result_dir / "run.json").read_text() == before
    assert sorted(p.name for p in result_dir.iterdir()) == ["predictions.zarr", "run.json"]


@pytest.mark.parametrize("damage", ["missing", "unreadable", "not an object"])
def test_missing_or_unreadable_run_json_gives_an_incomplete_result(result_dir: Path, monkeypatch: pytest.MonkeyPatch, damage: str) -> None:
    """Objects are exported, but a rebuilt run.json never makes the result count as complete."""
    from wsi_mtl.results import is_complete

    run_json = result_dir / "run.json"
    if damage == "missing":
        run_json.unlink()
    else:
        run_json.write_text('{"status": "complete", "files": [' if damage == "unreadable" else "[1, 2]")
    monkeypatch.setattr(postprocess, "extract_objects", fake_extract(30), raising=False)
    derive_objects(result_dir)
    run = json.loads(run_json.read_text())
    assert run["status"] == "incomplete" and run["objects"]
    assert [f["path"] for f in run["files"]][:2] == ["predictions.zarr", "objects.parquet"]
    assert run["slide"]["mpp"] == 0.25
    assert not is_complete(result_dir)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="result folder not found"):
        derive_objects(tmp_path / "nope")


def test_missing_predictions(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"no predictions.zarr in .*: run `wsimtl segment` first"):
        derive_objects(tmp_path)


def test_incomplete_predictions(tmp_path: Path) -> None:
    (tmp_path / "predictions.zarr.partial").mkdir()
    with pytest.raises(InputError, match=r"incomplete \(predictions.zarr.partial\)"):
        derive_objects(tmp_path)


def test_store_without_attributes(tmp_path: Path) -> None:
    import zarr

    zarr.open_group(tmp_path / "predictions.zarr", mode="w", zarr_format=3)
    with pytest.raises(InputError, match="no 'wsimtl' attributes"):
        derive_objects(tmp_path)


def test_unreadable_store(tmp_path: Path) -> None:
    (tmp_path / "predictions.zarr").mkdir()
    (tmp_path / "predictions.zarr" / "zarr.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot read"):
        derive_objects(tmp_path)


def test_store_without_mpp_or_size(tmp_path: Path) -> None:
    import zarr

    root = zarr.open_group(tmp_path / "predictions.zarr", mode="w", zarr_format=3)
    root.attrs["wsimtl"] = {"slide": {"width": 10, "height": 10}}
    with pytest.raises(InputError, match="no slide mpp"):
        derive_objects(tmp_path)
    root.attrs["wsimtl"] = {"slide": {"mpp": 0.5}}
    with pytest.raises(InputError, match="no slide size"):
        derive_objects(tmp_path)


def test_bad_workers(result_dir: Path) -> None:
    with pytest.raises(InputError, match="workers"):
        derive_objects(result_dir, workers=0)


def test_timed_iterator_counts_producer_time() -> None:
    import time

    def slow():
        for i in range(3):
            time.sleep(0.01)
            yield i

    timed = derive._Timed(slow())
    assert list(timed) == [0, 1, 2]
    assert timed.seconds >= 0.03


# --- end to end with the real post-processing ------------------------------------------------


def _maps_result_dir(tmp_path: Path) -> tuple[Path, list[tuple[int, int]]]:
    """A predictions.zarr with 24 separate round nuclei, 2 glands and two tissue regions.

    Model grid 384 x 384 px at 0.5 um/px over a level-0 slide of 768 x 768 px at 0.25 um/px.
    Returns the result folder and the nuclei centres (model px, (y, x)).
    """
    from skimage.draw import disk

    from wsi_mtl.postprocess import label_to_3class
    from wsi_mtl.store import HeadLayout, PredictionStore

    h = w = 384
    nuc = np.zeros((h, w), np.int32)
    centres = [(20 + 40 * (k // 6), 20 + 40 * (k % 6)) for k in range(24)]
    for k, c in enumerate(centres):
        nuc[disk(c, 7, shape=(h, w))] = k + 1
    gl = np.zeros((h, w), np.int32)
    gl[disk((300, 100), 50, shape=(h, w))] = 1
    gl[disk((300, 280), 45, shape=(h, w))] = 2

    def one_hot(cls: np.ndarray, n: int) -> np.ndarray:
        out = np.zeros((n, *cls.shape), np.uint8)
        for c in range(n):
            out[c][cls == c] = 230
            out[(c + 1) % n][cls == c] = 25
        return out

    tissue = np.ones((h // 16, w // 16), np.int64)
    tissue[:, : w // 32] = 2
    maps = {
        "Nuclei-INST": label_to_3class(nuc, erosion_px=1),
        "Nuclei-TYPE": one_hot(np.where(nuc > 0, 1, 0), 3),
        "Gland-INST": label_to_3class(gl, erosion_px=5),
        "Gland-TYPE": one_hot(np.where(gl > 0, 1, 0), 2),
        "Patch-Class": one_hot(tissue, 3),
    }
    classes = {"Nuclei-TYPE": ["nolabel", "epithelial", "other"], "Gland-TYPE": ["nolabel", "gland"],
               "Patch-Class": ["background", "tumour", "stroma"]}
    kinds = {"Nuclei-INST": "inst", "Gland-INST": "inst", "Nuclei-TYPE": "type", "Gland-TYPE": "type", "Patch-Class": "patch"}
    heads, heads_attrs = [], {}
    for name, arr in maps.items():
        cell = 16 if name == "Patch-Class" else 1
        names = classes.get(name, ["background", "interior", "boundary"])
        heads.append(HeadLayout(name, arr.shape[0], cell))
        colors = [[(60 * i) % 256, (120 * i) % 256, (200 * i) % 256] for i in range(len(names))]
        heads_attrs[name] = {"kind": kinds[name], "classes": names, "colors": colors, "cell_px": cell}
    attrs = {"heads": heads_attrs, "slide": {"mpp": 0.25, "width": 2 * w, "height": 2 * h, "path": "/gone/slide.svs"},
             "model_mpp": 0.5, "downsample": 2.0}
    result_dir = tmp_path / "e2e"
    result_dir.mkdir()
    store = PredictionStore(result_dir, heads=heads, height=h, width=w, core_px=128, downsample=2.0,
                            fingerprint={"test": 1}, attrs=attrs)
    for name, arr in maps.items():
        store.root[name]["0"][...] = arr
    store.finalize()
    store.close()
    return result_dir, centres


def test_end_to_end_with_real_postprocessing(tmp_path: Path) -> None:
    import shapely

    pytest.importorskip("wsi_mtl.postprocess._extract", reason="chunked extract_objects not available")
    result_dir, centres = _maps_result_dir(tmp_path)
    summary = derive_objects(result_dir)
    assert summary["objects"]["nuclei"] == {"epithelial": 24}
    assert sum(summary["objects"]["gland"].values()) == 2
    assert set(summary["objects"]["tissue"]) == {"tumour", "stroma"}
    doc = json.loads((result_dir / "nuclei.geojson").read_text())
    shapes = assert_qupath_geojson(doc)
    assert len(shapes) == 24
    # nuclei land where they were drawn: level-0 centre = (model px + 0.5) * 2
    found = np.array(sorted((s.centroid.y, s.centroid.x) for s in shapes))
    expected = np.array(sorted(((y + 0.5) * 2, (x + 0.5) * 2) for y, x in centres))
    assert np.abs(found - expected).max() < 1.0
    expected_area = np.pi * (7 * 2) ** 2
    assert all(abs(shapely.area(s) / expected_area - 1) < 0.15 for s in shapes)
    run = json.loads((result_dir / "run.json").read_text())
    assert run["objects"] == summary["objects"]
    assert "predictions.zarr/Patch-Class/labels/tissue_classes" in [f["path"] for f in run["files"]]


def test_disk_full_while_storing_tissue_map(result_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from wsi_mtl.errors import OutputError

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(postprocess, "extract_objects", fake_extract(10), raising=False)
    monkeypatch.setattr(derive, "_store_tissue_map", full)
    with pytest.raises(OutputError, match="disk full while writing .*tissue_classes"):
        derive_objects(result_dir)


def test_label_images_of_a_background_process_that_died_are_written_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """The nuclei label image's process killed (out of memory): written in this process, with a warning."""
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    calls: list[tuple[str, ...]] = []

    def store(predictions: Path, attrs: dict, table: Path, tasks: Any = None) -> list[Path]:
        calls.append(tuple(tasks))
        return [predictions / t / "labels" / t for t in tasks]

    monkeypatch.setattr(derive, "_store_tissue_map", store)
    labels = derive._LabelImages(tmp_path / "p.zarr", {}, tmp_path / "t.parquet", background=False)
    died: Future = Future()
    died.set_exception(BrokenProcessPool("a process in the pool was terminated abruptly"))
    labels._sent = [("nuclei", died)]  # as a pool that took the nuclei image leaves it
    labels._queue.remove("nuclei")
    with caplog.at_level("WARNING", logger="wsi_mtl.derive"):
        written = labels.result()
    assert calls == [("tissue",), ("lumen",), ("gland",), ("nuclei",)]  # the others here as always, then nuclei here too
    assert {p.name for p in written} == {"nuclei", "tissue", "lumen", "gland"}
    assert "died" in caplog.text


def _threaded_label_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hold: threading.Event | None, held: str = "nuclei"):
    """_LabelImages on a one-thread pool whose label images are recorded by thread (the ``held``
    image held in the background until ``hold`` is set, if given)."""
    from concurrent.futures import ThreadPoolExecutor

    from wsi_mtl.postprocess import _pool

    calls: list[tuple[str, tuple[str, ...]]] = []

    def store(predictions: Path, attrs: dict, table: Path, tasks: Any = None) -> list[Path]:
        where = "background" if threading.current_thread().name.startswith("labels") else "here"
        if hold is not None and held in tasks and where == "background":
            assert hold.wait(10)
        calls.append((where, tuple(tasks)))
        return [predictions / t / "labels" / LABEL_IMAGES[t][1] for t in tasks]

    monkeypatch.setattr(derive, "_store_tissue_map", store)
    monkeypatch.setattr(_pool, "single_executor", lambda role: ThreadPoolExecutor(1, thread_name_prefix=role))
    return derive._LabelImages(tmp_path / "p.zarr", {}, tmp_path / "t.parquet", background=True), calls


def test_label_images_not_begun_by_the_background_process_are_written_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the background process is still on the nuclei image, this process writes all the
    others once it asks for the result (after its GeoJSON and preview); nothing is written twice."""
    hold = threading.Event()
    labels, calls = _threaded_label_images(tmp_path, monkeypatch, hold)
    threading.Timer(0.2, hold.set).start()  # the nuclei image goes on while this process writes the rest
    try:
        written = labels.result()
    finally:
        labels.close()
    assert calls == [("here", ("tissue",)), ("here", ("lumen",)), ("here", ("gland",)), ("background", ("nuclei",))]
    assert [p.name for p in written] == [name for _, name, _ in LABEL_IMAGES.values()]  # in their order


def test_an_idle_background_process_is_handed_the_next_label_image_before_this_process_writes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The background process done with the nuclei image before its call-back sent it the next:
    this process hands it the glands (the next largest) and writes the lumen and tissue images
    itself, one at a time, instead of all three while the background process idles."""
    hold = threading.Event()
    monkeypatch.setattr(derive._LabelImages, "_next", lambda self, future: None)  # the call-back not yet run
    labels, calls = _threaded_label_images(tmp_path, monkeypatch, hold, held="gland")
    for _ in range(1000):  # until the nuclei image is written (at most 10 s)
        if calls and labels._sent[0][1].done():
            break
        time.sleep(0.01)
    threading.Timer(0.2, hold.set).start()  # the glands go on in the background while this process writes
    try:
        written = labels.result()
    finally:
        labels.close()
    assert calls == [("background", ("nuclei",)), ("here", ("tissue",)), ("here", ("lumen",)), ("background", ("gland",))]
    assert [p.name for p in written] == [name for _, name, _ in LABEL_IMAGES.values()]


def test_the_background_process_takes_the_next_label_image_once_one_is_done(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A background process that is done with the nuclei image goes on with the glands, lumen and
    tissue in turn; what it wrote is not written again here."""
    labels, calls = _threaded_label_images(tmp_path, monkeypatch, None)
    for _ in range(1000):  # until the thread has written all four (at most 10 s)
        if len(calls) == 4:
            break
        time.sleep(0.01)
    try:
        written = labels.result()
    finally:
        labels.close()
    assert calls == [("background", (t,)) for t in ("nuclei", "gland", "lumen", "tissue")]
    assert [p.name for p in written] == [name for _, name, _ in LABEL_IMAGES.values()]


def test_a_late_call_back_does_not_hand_a_busy_background_process_a_second_label_image(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The nuclei image's call-back running after this process handed the glands over: the
    background process, busy with the glands, is not sent the lumen too (one image at a time)."""
    hold = threading.Event()
    call_back = derive._LabelImages._next
    monkeypatch.setattr(derive._LabelImages, "_next", lambda self, future: None)  # held back, run by hand below
    labels, calls = _threaded_label_images(tmp_path, monkeypatch, hold, held="gland")
    nuclei = labels._sent[0][1]
    for _ in range(1000):  # until the nuclei image is written (at most 10 s)
        if nuclei.done():
            break
        time.sleep(0.01)
    try:
        assert labels._take_here() == "tissue"  # the glands handed over first
        derive._store_tissue_map(*labels.args, ("tissue",))  # written here, as result() would
        call_back(labels, nuclei)
        assert [task for task, _ in labels._sent] == ["nuclei", "gland"]
        hold.set()
        labels.result()
    finally:
        hold.set()
        labels.close()
    assert sorted(calls) == [("background", ("gland",)), ("background", ("nuclei",)), ("here", ("lumen",)), ("here", ("tissue",))]


def test_the_label_image_queue_holds_every_label_image() -> None:
    """The queue both processes take from names every label image there is, each once."""
    assert sorted(derive._BACKGROUND_ORDER) == sorted(LABEL_IMAGES)


def test_a_pool_that_refuses_the_next_label_image_leaves_the_rest_here_and_is_still_shut_down(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A background pool that took the nuclei image and then refuses more (broken): this process
    writes the others, nothing is lost, and the pool is still shut down at the end."""
    from concurrent.futures import Future, ThreadPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from wsi_mtl.postprocess import _pool

    calls: list[tuple[str, ...]] = []
    shut: list[bool] = []

    class OneTask(ThreadPoolExecutor):
        def submit(self, fn, *args, **kwargs) -> Future:  # noqa: ANN001, ANN002, ANN003
            if getattr(self, "took", False):
                raise BrokenProcessPool("a process in the pool was terminated abruptly")
            self.took = True
            return super().submit(fn, *args, **kwargs)

        def shutdown(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            shut.append(True)
            super().shutdown(*args, **kwargs)

    def store(predictions: Path, attrs: dict, table: Path, tasks: Any = None) -> list[Path]:
        calls.append(tuple(tasks))
        return [predictions / t / "labels" / LABEL_IMAGES[t][1] for t in tasks]

    monkeypatch.setattr(derive, "_store_tissue_map", store)
    monkeypatch.setattr(_pool, "single_executor", lambda role: OneTask(1))
    labels = derive._LabelImages(tmp_path / "p.zarr", {}, tmp_path / "t.parquet", background=True)
    try:
        written = labels.result()
    finally:
        labels.close()
    assert sorted(calls) == sorted([("nuclei",), ("tissue",), ("lumen",), ("gland",)])  # each once
    assert [p.name for p in written] == [name for _, name, _ in LABEL_IMAGES.values()]
    assert shut == [True]


def test_derive_runs_with_segments_memory_settings_and_gives_kept_pages_back(result_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An export sets the memory settings of segment's processes (one arena, numpy's small pages)
    and keeps freed pages only while it derives: they go back before it returns."""
    from contextlib import contextmanager

    events: list[str] = []

    @contextmanager
    def kept():  # noqa: ANN202
        events.append("keep")
        yield
        events.append("give back")

    monkeypatch.setattr(derive, "limit_arenas", lambda: events.append("arenas"))
    monkeypatch.setattr(derive, "small_numpy_pages", lambda: events.append("small pages"))
    monkeypatch.setattr(derive, "pages_kept", kept)
    real = derive.derive_into
    monkeypatch.setattr(derive, "derive_into", lambda *a, **k: (events.append("derive"), real(*a, **k))[1])
    derive_objects(result_dir)
    assert events == ["arenas", "small pages", "keep", "derive", "give back"]

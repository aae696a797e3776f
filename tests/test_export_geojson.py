"""GeoJSON for QuPath: every feature follows QuPath's reader rules and matches the table."""

from __future__ import annotations

import csv
import gzip
import json
import math
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely

from wsi_mtl.export import _geojson, synthetic_batches, write_geojson, write_geojson_files, write_table
from wsi_mtl.objects import COLUMNS, TASKS, ObjectBatch

ALL_TASKS = ("nuclei", "gland", "lumen", "tissue")
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GLAS = DATA / "glands" / "glas"


def assert_qupath_feature(feature: dict[str, Any]) -> shapely.Geometry:
    """Check one feature against the rules QuPath's GeoJSON reader relies on; return its geometry."""
    assert set(feature) == {"type", "id", "geometry", "properties"}, feature.keys()
    assert feature["type"] == "Feature"
    assert str(uuid.UUID(feature["id"])) == feature["id"]
    props = feature["properties"]
    assert "type" not in props, "QuPath reads a 'type' property as the object type"
    assert props["objectType"] in ("detection", "annotation")
    cls = props["classification"]
    assert set(cls) == {"name", "color"} and isinstance(cls["name"], str) and cls["name"]
    assert len(cls["color"]) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in cls["color"])
    meas = props["measurements"]
    assert isinstance(meas, dict)
    for name, value in meas.items():
        assert name.isascii() and isinstance(value, (int, float)) and not isinstance(value, bool)
        assert math.isfinite(value), (name, value)
    geometry = feature["geometry"]
    assert geometry["type"] in ("Polygon", "MultiPolygon")
    polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
    for polygon in polygons:
        for ring in polygon:
            assert ring[0] == ring[-1] and len(ring) >= 4, "rings must be closed"
    shape = shapely.from_geojson(json.dumps(geometry))
    assert shape.is_valid and not shape.is_empty
    return shape


def assert_qupath_geojson(doc: dict[str, Any]) -> list[shapely.Geometry]:
    """Check a whole document: a FeatureCollection of QuPath features; return their geometries."""
    assert set(doc) == {"type", "features"} and doc["type"] == "FeatureCollection"
    shapes = [assert_qupath_feature(f) for f in doc["features"]]
    ids = [f["id"] for f in doc["features"]]
    assert len(set(ids)) == len(ids)
    return shapes


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("table") / "objects.parquet"
    write_table(synthetic_batches(1500, batch_size=400, tasks=ALL_TASKS, extent_px=30_000, seed=5), path, mpp=0.25)
    return path


def test_features_follow_qupath_rules_and_match_table(table: Path, tmp_path: Path) -> None:
    out = tmp_path / "objects.geojson"
    n = write_geojson(table, out, batch_rows=300)
    doc = json.loads(out.read_text())
    shapes = assert_qupath_geojson(doc)
    rows = pq.read_table(table)
    assert n == len(doc["features"]) == rows.num_rows
    # same objects, in the same order: ids, classes, object types, geometry within rounding
    assert [f["id"] for f in doc["features"]] == rows.column("id").to_pylist()
    assert [f["properties"]["classification"]["name"] for f in doc["features"]] == rows.column("class_name").to_pylist()
    expected_types = ["detection" if t == "nuclei" else "annotation" for t in rows.column("task").to_pylist()]
    assert [f["properties"]["objectType"] for f in doc["features"]] == expected_types
    source = shapely.from_wkb(rows.column("geometry").to_numpy())
    assert (shapely.hausdorff_distance(np.array(shapes, dtype=object), source) <= 0.0071).all()
    # measurements: values rounded to 4 decimals; NaN omitted (solidity of glands, lumen, tissue)
    for feature, area, solidity in zip(doc["features"], rows.column("area_um2").to_pylist(), rows.column("solidity").to_pylist()):
        meas = feature["properties"]["measurements"]
        assert meas["area_um2"] == pytest.approx(area, abs=1e-4)
        assert set(meas) <= {"probability", "nucleus_probability", "area_um2", "perimeter_um", "solidity", "eccentricity", "truncated"}
        assert ("solidity" in meas) == (not math.isnan(solidity))
    colors = {f["properties"]["classification"]["name"]: f["properties"]["classification"]["color"] for f in doc["features"]}
    assert colors["epithelial"] == [255, 0, 0] and colors["tumour"] == [200, 0, 200]
    locked = {f["properties"]["objectType"]: "isLocked" in f["properties"] for f in doc["features"]}
    assert locked == {"detection": False, "annotation": True}


def test_coordinates_rounded_to_two_decimals(table: Path, tmp_path: Path) -> None:
    out = tmp_path / "objects.geojson"
    write_geojson(table, out)
    coords = np.array([xy for f in json.loads(out.read_text())["features"] for xy in f["geometry"]["coordinates"][0]])
    assert np.allclose(coords, np.round(coords, 2), atol=1e-9, rtol=0)


def test_rounding_that_breaks_validity_keeps_exact_coordinates(tmp_path: Path) -> None:
    # a sliver 0.004 px thick: rounded to 0.01 it collapses onto a line
    sliver = shapely.Polygon([(0, 0), (10, 0), (10, 0.004), (5, 0.003), (0, 0.004)])
    square = shapely.box(20.123, 20.456, 30.789, 30.001)
    assert sliver.is_valid
    n = 2
    cols: dict[str, np.ndarray] = {
        "id": np.array([str(uuid.uuid4()) for _ in range(n)]),
        "task": np.array(["lumen"] * n),
        "class_name": np.array(["lumen"] * n),
        "class_id": np.ones(n, dtype=np.int32),
        **{name: np.full(n, np.nan) for name, kind in COLUMNS.items() if kind == "f"},
        **{name: np.zeros(n, bool) for name, kind in COLUMNS.items() if kind == "b"},
    }
    table = tmp_path / "t.parquet"
    write_table([ObjectBatch(cols, np.array([sliver, square], dtype=object))], table, mpp=1.0)
    out = tmp_path / "o.geojson"
    write_geojson(table, out)
    features = json.loads(out.read_text())["features"]
    shapes = [assert_qupath_feature(f) for f in features]
    assert shapely.equals_exact(shapes[0], sliver, tolerance=0)
    assert shapely.equals_exact(shapes[1], shapely.box(20.12, 20.46, 30.79, 30.0), tolerance=1e-9)
    assert features[0]["properties"]["measurements"] == {"truncated": 0}  # NaN omitted, still an object


def test_per_task_files_in_one_pass(table: Path, tmp_path: Path) -> None:
    written = write_geojson_files(table, tmp_path)
    names = {p.name: n for p, n in written.items()}
    assert set(names) == {"objects.geojson", "nuclei.geojson", "glands.geojson", "tissue.geojson"}
    docs = {name: json.loads((tmp_path / name).read_text()) for name in names}
    for name, doc in docs.items():
        assert len(assert_qupath_geojson(doc)) == names[name]
    tasks = dict(zip(pq.read_table(table).column("id").to_pylist(), pq.read_table(table).column("task").to_pylist()))
    assert {tasks[f["id"]] for f in docs["nuclei.geojson"]["features"]} == {"nuclei"}
    assert {tasks[f["id"]] for f in docs["glands.geojson"]["features"]} == {"gland", "lumen"}
    assert {tasks[f["id"]] for f in docs["tissue.geojson"]["features"]} == {"tissue"}
    assert names["nuclei.geojson"] + names["glands.geojson"] + names["tissue.geojson"] == names["objects.geojson"]


def test_per_task_files_only_for_present_tasks(tmp_path: Path) -> None:
    table = tmp_path / "objects.parquet"
    write_table(synthetic_batches(50, tasks=("nuclei",)), table, mpp=0.25)
    written = write_geojson_files(table, tmp_path)
    assert sorted(p.name for p in written) == ["nuclei.geojson", "objects.geojson"]


def test_task_selection(table: Path, tmp_path: Path) -> None:
    out = tmp_path / "tissue.geojson"
    n = write_geojson(table, out, tasks=["tissue"])
    doc = json.loads(out.read_text())
    assert n == len(doc["features"]) > 0
    assert {f["properties"]["objectType"] for f in doc["features"]} == {"annotation"}


def test_gzip_round_trip(table: Path, tmp_path: Path) -> None:
    write_geojson(table, tmp_path / "o.geojson")
    n = write_geojson(table, tmp_path / "o.geojson.gz", gz=True)
    with gzip.open(tmp_path / "o.geojson.gz", "rt", encoding="utf-8") as fh:
        doc = json.load(fh)
    assert doc == json.loads((tmp_path / "o.geojson").read_text())
    assert n == len(doc["features"])
    (tmp_path / "set").mkdir()
    written = write_geojson_files(table, tmp_path / "set", gz=True)
    assert sorted(p.name for p in written) == [f"{s}.geojson.gz" for s in ("glands", "nuclei", "objects", "tissue")]
    for path in written:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            assert_qupath_geojson(json.load(fh))


def test_empty_table_gives_empty_collection(tmp_path: Path) -> None:
    table = tmp_path / "objects.parquet"
    write_table([], table, mpp=0.25)
    assert write_geojson(table, tmp_path / "o.geojson") == 0
    assert json.loads((tmp_path / "o.geojson").read_text()) == {"type": "FeatureCollection", "features": []}


def test_non_ascii_class_name(tmp_path: Path) -> None:
    batch = next(synthetic_batches(3, tasks=("tissue",)))
    batch.columns["class_name"] = np.array(["Tumör \"core\""] * 3)
    batch.colors = {("tissue", "Tumör \"core\""): (1, 2, 3)}
    table = tmp_path / "t.parquet"
    write_table([batch], table, mpp=0.25)
    write_geojson(table, tmp_path / "o.geojson")
    doc = json.loads((tmp_path / "o.geojson").read_text(encoding="utf-8"))
    assert [f["properties"]["classification"] for f in doc["features"]] == [{"name": "Tumör \"core\"", "color": [1, 2, 3]}] * 3


def test_interrupted_export_leaves_no_file(table: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = _geojson._features

    def failing(*args: Any, **kwargs: Any):
        gen = real(*args, **kwargs)
        yield next(gen)
        raise RuntimeError("killed")

    monkeypatch.setattr(_geojson, "_features", failing)
    with pytest.raises(RuntimeError, match="killed"):
        write_geojson_files(table, tmp_path, batch_rows=100)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(table: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown task"):
        write_geojson(table, tmp_path / "o.geojson", tasks=["stroma"])
    with pytest.raises(ValueError, match="ending in .gz"):
        write_geojson(table, tmp_path / "o.geojson", gz=True)
    with pytest.raises(ValueError, match="batch_rows"):
        write_geojson(table, tmp_path / "o.geojson", batch_rows=0)
    assert list(tmp_path.iterdir()) == []


def test_object_type_per_task() -> None:
    assert [_geojson.object_type(t) for t in TASKS] == ["detection", "annotation", "annotation", "annotation"]


# --- real gland masks: polygons rasterised back from the GeoJSON match their instances ---------


def _instance_polygons(labels: np.ndarray) -> tuple[list[int], list[shapely.Polygon]]:
    """One polygon per instance label (outer contour of its largest part), level-0 px convention."""
    from skimage import measure

    ids, polys = [], []
    for region in measure.regionprops(labels):
        y0, x0, y1, x1 = region.bbox
        mask = np.pad(region.image, 1)
        contours = measure.find_contours(mask.astype(np.uint8), 0.5)
        ring = max(contours, key=len)
        # contour (row, col) in the padded crop -> level-0 continuous (x, y): pixel centre is +0.5
        xy = np.stack([ring[:, 1] - 1 + x0 + 0.5, ring[:, 0] - 1 + y0 + 0.5], axis=1)
        poly = shapely.make_valid(shapely.Polygon(xy))
        if poly.geom_type != "Polygon":
            poly = max(shapely.get_parts(poly), key=lambda g: g.area)
        ids.append(region.label)
        polys.append(poly)
    return ids, polys


def _rasterise(shape: shapely.Geometry, height: int, width: int) -> np.ndarray:
    """Pixels whose centre (x + 0.5, y + 0.5 in level-0 px) lies inside ``shape``."""
    out = np.zeros((height, width), dtype=bool)
    x0, y0, x1, y1 = shape.bounds
    x0, y0 = max(0, int(x0)), max(0, int(y0))
    x1, y1 = min(width, int(np.ceil(x1)) + 1), min(height, int(np.ceil(y1)) + 1)
    ys, xs = np.mgrid[y0:y1, x0:x1]
    shapely.prepare(shape)
    out[y0:y1, x0:x1] = shapely.contains_xy(shape, xs + 0.5, ys + 0.5)
    return out


@pytest.mark.shared_data
@pytest.mark.skipif(not (GLAS / "manifest.csv").is_file(), reason=f"GlaS masks not found at {GLAS}")
def test_glas_polygons_round_trip(tmp_path: Path) -> None:
    from PIL import Image

    with open(GLAS / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))[:3]
    batches, masks = [], {}
    for row in rows:
        labels = np.asarray(Image.open(GLAS / row["annotation"])).astype(np.int32)
        ids, polys = _instance_polygons(labels)
        n = len(polys)
        oids = [str(uuid.uuid4()) for _ in range(n)]
        for oid, label in zip(oids, ids):
            masks[oid] = labels == label
        cols: dict[str, np.ndarray] = {
            "id": np.array(oids),
            "task": np.array(["gland"] * n),
            "class_name": np.array([row["grade_glas"]] * n),
            "class_id": np.ones(n, dtype=np.int32),
            **{name: np.full(n, np.nan) for name, kind in COLUMNS.items() if kind == "f"},
            **{name: np.zeros(n, bool) for name, kind in COLUMNS.items() if kind == "b"},
        }
        cols["area_um2"] = shapely.area(np.array(polys, dtype=object)) * 0.62**2
        batches.append(ObjectBatch(cols, np.array(polys, dtype=object), {("gland", row["grade_glas"]): (0, 160, 0)}))
    table = tmp_path / "objects.parquet"
    write_table(batches, table, mpp=0.62)
    out = tmp_path / "objects.geojson"
    write_geojson(table, out)
    doc = json.loads(out.read_text())
    shapes = assert_qupath_geojson(doc)
    assert len(shapes) == len(masks) > 10
    ious = []
    for feature, shape in zip(doc["features"], shapes):
        truth = masks[feature["id"]]
        drawn = _rasterise(shape, *truth.shape)
        ious.append((truth & drawn).sum() / (truth | drawn).sum())
    assert np.median(ious) >= 0.98
    assert min(ious) >= 0.95, sorted(ious)[:5]


def test_parallel_formatting_gives_identical_files(tmp_path: Path) -> None:
    table = tmp_path / "objects.parquet"
    write_table(synthetic_batches(900, batch_size=150, tasks=ALL_TASKS, extent_px=20_000, seed=9), table,
                mpp=0.25, row_group_rows=200)
    assert pq.ParquetFile(table).metadata.num_row_groups == 3  # 300-row groups (two batches each)
    (tmp_path / "serial").mkdir()
    (tmp_path / "parallel").mkdir()
    serial = write_geojson_files(table, tmp_path / "serial", batch_rows=100)
    parallel = write_geojson_files(table, tmp_path / "parallel", batch_rows=100, workers=2)
    assert [p.name for p in serial] == [p.name for p in parallel]
    for a, b in zip(serial, parallel):
        assert serial[a] == parallel[b]
        assert a.read_bytes() == b.read_bytes()
    with pytest.raises(ValueError, match="workers"):
        write_geojson(table, tmp_path / "o.geojson", workers=0)


def test_a_sink_writes_its_tasks_features_as_one_text() -> None:
    """A sink writes the runs of its tasks' features straight from each batch's text: the same
    bytes as those features joined at once, across batches, runs and empty batches."""
    import io

    rng = np.random.default_rng(4)
    batches, expected = [], []
    for b, n in enumerate((20, 0, 7, 1, 15)):
        tasks = rng.choice(["nuclei", "gland", "tissue"], n).astype(object)
        texts = [f'{{"id": "{b}-{i}-ü"}}' for i in range(n)]
        batches.append(_geojson._joined(tasks, texts))
        expected += [t for t, task in zip(texts, tasks) if task != "tissue"]
    sink = _geojson._Sink(io.BytesIO(), frozenset({"nuclei", "gland"}))
    for batch in batches:
        sink.write(batch)
    assert sink.fh.getvalue() == ",\n".join(expected).encode()
    assert sink.count == len(expected) > 20


def test_parallel_formatting_keeps_one_row_group_per_worker_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A row group's texts wait in the writing process until their turn: one per worker at most."""
    from wsi_mtl.postprocess import _pool

    table = tmp_path / "objects.parquet"
    write_table(synthetic_batches(900, batch_size=150, tasks=ALL_TASKS, extent_px=20_000, seed=9), table,
                mpp=0.25, row_group_rows=200)
    asked, real = [], _pool.ordered_results
    monkeypatch.setattr(_pool, "ordered_results", lambda *a, **k: asked.append(k.get("ahead")) or real(*a, **k))
    assert write_geojson_files(table, tmp_path, batch_rows=100, workers=2)[tmp_path / "objects.geojson"] == 900
    assert asked == [1]


def test_a_table_of_one_row_group_is_formatted_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers format whole row groups: with one there is nothing to share, and no pool starts."""
    from wsi_mtl.export import _geojson

    table = tmp_path / "objects.parquet"
    write_table(synthetic_batches(300, batch_size=150, tasks=ALL_TASKS, extent_px=20_000, seed=9), table, mpp=0.25)
    assert pq.ParquetFile(table).metadata.num_row_groups == 1
    calls = []
    real = _geojson._parallel_features
    monkeypatch.setattr(_geojson, "_parallel_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    serial = write_geojson_files(table, tmp_path, batch_rows=100, workers=2)
    assert calls == [] and serial[tmp_path / "objects.geojson"] == 300


def _mixed_objects(n: int, seed: int) -> ObjectBatch:
    """Real-shaped objects of every kind the writer meets: nuclei and glands (random jagged rings,
    negative and integer coordinates among them), lumen with a hole, tissue multipolygons, a sliver
    that rounding would break, and NaN measurements."""
    rng = np.random.default_rng(seed)
    geoms, tasks = [], []
    for i in range(n):
        kind = i % 10
        cx, cy = rng.uniform(-500, 90_000, 2)
        vertices = 325 if kind == 1 else 15
        angles = np.sort(rng.uniform(0, 2 * np.pi, vertices))
        radius = rng.uniform(4, 40) * rng.uniform(0.8, 1.2, vertices)
        ring = shapely.Polygon(np.c_[cx + radius * np.cos(angles), cy + radius * np.sin(angles)])
        if not ring.is_valid:
            ring = ring.convex_hull
        if kind == 2:  # integer coordinates
            ring = shapely.box(round(cx), round(cy), round(cx) + 7, round(cy) + 5)
        if kind == 3:
            geoms.append(ring.difference(shapely.Point(cx, cy).buffer(2)))
        elif kind == 4:
            geoms.append(shapely.MultiPolygon([ring, shapely.affinity.translate(ring, 200, 0)]))
        elif kind == 5:
            cx, cy = round(cx), round(cy)
            geoms.append(shapely.Polygon([(cx, cy), (cx + 10, cy), (cx + 10, cy + 0.004), (cx + 5, cy + 0.003), (cx, cy + 0.004)]))
        else:
            geoms.append(ring)
        tasks.append({1: "gland", 3: "lumen", 4: "tissue"}.get(kind, "nuclei"))
    cols: dict[str, np.ndarray] = {
        "id": np.array([str(uuid.UUID(int=int(rng.integers(2**62)), version=4)) for _ in range(n)]),
        "task": np.array(tasks),
        "class_name": np.array([f"{t}_{i % 3}" for i, t in enumerate(tasks)]),
        "class_id": (np.arange(n) % 3).astype(np.int32),
        **{name: rng.uniform(0, 1e4, n) * rng.choice([1.0, np.nan, 1e-5, 0.0], n, p=[0.7, 0.1, 0.1, 0.1])
           for name, kind in COLUMNS.items() if kind == "f"},
        **{name: rng.random(n) < 0.2 for name, kind in COLUMNS.items() if kind == "b"},
    }
    return ObjectBatch(cols, np.array(geoms, dtype=object), {})


def _write_three_ways(table: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> list[dict[Path, int]]:
    """All GeoJSON files of ``table`` from the compiled kernels, orjson, and shapely alone
    (``out``/kernels, ``out``/orjson, ``out``/reference)."""
    counts = []
    for name, kernels, orjson in (("kernels", True, True), ("orjson", False, True), ("reference", False, False)):
        monkeypatch.setattr(_geojson, "_USE_KERNELS", kernels)
        monkeypatch.setattr(_geojson, "_USE_ORJSON", orjson)
        (out / name).mkdir()
        counts.append(write_geojson_files(table, out / name, batch_rows=256))
    return counts


def _assert_same_files(counts: list[dict[Path, int]]) -> None:
    first = counts[0]
    for other in counts[1:]:
        assert [p.name for p in first] == [p.name for p in other] and len(first) == 4
        for a, b in zip(first, other):
            assert first[a] == other[b] > 0
            assert a.read_bytes() == b.read_bytes()


def test_fast_coordinates_match_the_reference_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("orjson")
    table = tmp_path / "objects.parquet"
    write_table([_mixed_objects(700, seed=3), _mixed_objects(300, seed=4)], table, mpp=0.25)
    counts = _write_three_ways(table, tmp_path, monkeypatch)
    _assert_same_files(counts)
    for path in counts[0]:
        assert json.loads(path.read_text()) == json.loads((tmp_path / "reference" / path.name).read_text())
    doc = json.loads((tmp_path / "kernels" / "objects.geojson").read_text())
    shapes = assert_qupath_geojson(doc)
    kinds = {s.geom_type + ("+hole" if s.geom_type == "Polygon" and s.interiors else "") for s in shapes}
    assert kinds == {"Polygon", "Polygon+hole", "MultiPolygon"}
    assert any(not f["properties"]["measurements"].get("area_um2", 1) for f in doc["features"])
    monkeypatch.setattr(_geojson, "_USE_ORJSON", True)
    monkeypatch.setattr(_geojson, "orjson", None)  # orjson not installed: the reference path, same bytes
    assert write_geojson(table, tmp_path / "no_orjson.geojson") == counts[0][tmp_path / "kernels" / "objects.geojson"]
    assert (tmp_path / "no_orjson.geojson").read_bytes() == (tmp_path / "kernels" / "objects.geojson").read_bytes()


def test_kernels_write_outlines_on_the_pixel_grid_as_the_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Traced outlines (coordinates on 0.01 px or coarser, -0 and negative among them, holes, big-
    endian WKB) go through the compiled writer, not around it, and give the reference's bytes;
    so do measurements from 1e-5 to 1e14, negative, whole, -0 and NaN."""
    pytest.importorskip("orjson")
    from wsi_mtl.export import _geojson_bytes

    if not _geojson_bytes.kernels_available():
        pytest.skip("numba is not installed or WSIMTL_NO_NUMBA is set: there is no compiled writer to compare")
    batch = _mixed_objects(600, seed=5)
    grids = (2.0, 100.0, 1.0)  # half pixels (traced outlines), 0.01 px, whole pixels
    snapped = np.array([shapely.transform(g, lambda c, s=grids[i % 3]: np.round(c * s) / s)
                        for i, g in enumerate(batch.geometry)], dtype=object)
    snapped[7] = shapely.Polygon([(-0.0, 0.0), (-0.0, 5.5), (-3.25, 5.5), (-0.0, 0.0)])
    batch.geometry = snapped
    rng = np.random.default_rng(6)
    batch.columns["area_um2"] = np.round(10.0 ** rng.uniform(-5, 14, 600) * rng.choice([-1, 1], 600), 4)
    batch.columns["solidity"][:4] = [-0.0, 1e8, 99999999.9999, 1e12]
    wkb = shapely.to_wkb(snapped)
    wkb[::3] = shapely.to_wkb(snapped[::3], byte_order=0)
    batch.wkb = wkb
    table = tmp_path / "objects.parquet"
    write_table([batch], table, mpp=0.25)
    spy = []
    real = _geojson._geometry_texts
    monkeypatch.setattr(_geojson, "_geometry_texts", lambda geoms: spy.append(len(geoms)) or real(geoms))
    counts = _write_three_ways(table, tmp_path, monkeypatch)
    _assert_same_files(counts)
    stored = pq.read_table(table, columns=["geometry"]).column("geometry").to_pylist()
    little_endian_polygons = sum(w[:5] == b"\x01\x03\x00\x00\x00" for w in stored)
    assert 300 < little_endian_polygons < 500
    assert sum(spy[:3]) == 600 - little_endian_polygons  # big-endian WKB and multipolygons go to shapely
    assert sum(spy[3:]) == 2 * 600  # the orjson and reference writers: every row


def test_fast_path_formats_single_ring_polygons() -> None:
    pytest.importorskip("orjson")
    batch = _mixed_objects(40, seed=8)
    texts, ring_only = _geojson._geometry_texts(batch.geometry)
    assert ring_only.sum() >= 20 and not ring_only[3::10].any() and not ring_only[4::10].any()
    assert not ring_only[5::10].any()  # rounding breaks the sliver: its exact coordinates are kept
    for text, only, geom in zip(texts, ring_only, batch.geometry):
        parsed = json.loads('{"type":"Polygon","coordinates":[[%s]]}' % text if only else text)
        assert parsed == json.loads(shapely.to_geojson(_geojson._round_geometry(np.array([geom]))[0]))


def test_measurement_texts_match_percent_g() -> None:
    pytest.importorskip("orjson")
    rng = np.random.default_rng(2)
    values = np.round(np.concatenate([
        rng.uniform(-1, 1, 500), 10.0 ** rng.uniform(-5, 14, 500) * rng.choice([-1, 1], 500),
        [0.0, -0.0, -0.00001, 1.0, 3.0, 1e8, 99999999.9999, 123456789.1234, 999999999999.0, 1e12, 1e15, 2.5e17],
    ]), 4)
    values[::7] = np.nan
    texts = _geojson._number_texts(values)
    expected = ["%.12g" % v if np.isfinite(v) else "" for v in values.tolist()]
    assert texts == expected
    assert _geojson._number_texts(np.array([0.0, 1.0, np.nan, -0.0])) == ["0", "1", "", "-0"]


def _rings_of(geoms: list[shapely.Geometry]) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The compiled reader's view of polygons (rows, then its rings) via their WKB."""
    import pyarrow as pa

    from wsi_mtl.export import _geojson_bytes
    from wsi_mtl.export._arrow import arrow_array, binary_buffers

    wkb = arrow_array(shapely.to_wkb(np.array(geoms, dtype=object)), pa.binary())  # as a table column holds them
    n_rings, *rings = _geojson_bytes.polygon_rings(*binary_buffers(wkb))
    return n_rings, tuple(rings)


def test_rounding_safety_is_never_wrong_and_flags_near_misses() -> None:
    """A polygon called safe stays valid when rounded to 0.01 (thousands of jagged rings and rings
    with holes, at scales where rounding moves points by up to half their spacing); slivers,
    spikes, touching and crossing rings, and tiny rings are not called safe."""
    from wsi_mtl.export import _geojson_bytes

    if not _geojson_bytes.kernels_available():
        pytest.skip("numba is not installed or WSIMTL_NO_NUMBA is set: no compiled writer to check")
    rng = np.random.default_rng(11)
    geoms = []
    for i in range(3000):
        vertices = int(rng.integers(4, 40))
        angles = np.sort(rng.uniform(0, 2 * np.pi, vertices))
        radius = rng.choice([0.02, 0.05, 0.3, 5.0]) * rng.uniform(0.3, 1.0, vertices)
        cx, cy = rng.uniform(-100, 5000, 2)
        ring = shapely.Polygon(np.c_[cx + radius * np.cos(angles), cy + radius * np.sin(angles)])
        if i % 4 == 0 and ring.is_valid:
            ring = ring.difference(shapely.Point(cx, cy).buffer(radius.min() * 0.5, 4))
        if ring.is_valid and not ring.is_empty and ring.geom_type == "Polygon":
            geoms.append(ring)
    n_rings, rings = _rings_of(geoms)
    safe = _geojson_bytes.rounding_safe(np.arange(len(geoms)), rings)
    rounded_valid = shapely.is_valid(shapely.transform(np.array(geoms, dtype=object), lambda c: np.round(c, 2)))
    assert len(geoms) > 2000 and (n_rings >= 1).all()
    assert rounded_valid[safe].all()
    assert (~rounded_valid).sum() > 50 and 0.2 < safe.mean() < 0.95  # the check has work on both sides

    near = [
        shapely.Polygon([(0, 0), (10, 0), (10, 0.004), (5, 0.003), (0, 0.004)]),  # sliver
        shapely.Polygon([(0, 0), (10, 0), (10, 10), (5, 10), (5.004, 0.01), (4.996, 10), (0, 10)]),  # spike
        shapely.Polygon([(0, 0), (10, 0), (10, 10), (0, 10)], [[(0, 5), (3, 4), (3, 6), (0, 5)]]),  # hole touching
        shapely.Polygon([(0, 0), (10, 10), (10, 0), (0, 10)]),  # bowtie: crossing edges
        shapely.Polygon([(0, 0), (0.004, 0), (0, 0.004)]),  # tiny
        shapely.Polygon([(0, 0), (10, 0), (10, 10), (0, 10)], [[(1, 1), (9.99, 1), (9.99, 9), (1, 9)]]),  # hole near shell
    ]
    assert not _geojson_bytes.rounding_safe(np.arange(len(near)), _rings_of(near)[1]).any()
    apart = [shapely.box(0, 0, 10, 10), shapely.Polygon([(0, 0), (10, 0), (10, 10), (0, 10)], [[(1, 1), (9, 1), (9, 9), (1, 9)]])]
    assert _geojson_bytes.rounding_safe(np.arange(2), _rings_of(apart)[1]).all()


def test_warm_kernels_compile_what_a_real_export_runs(table: Path, tmp_path: Path) -> None:
    """The server's warm-up formats features with the argument types of a table's export, so a
    forked GeoJSON process (or a later run, from numba's cache) finds every kernel ready."""
    from wsi_mtl.export import _geojson_bytes

    if not _geojson_bytes.kernels_available():
        pytest.skip("numba is not installed or WSIMTL_NO_NUMBA is set: there are no kernels to warm")
    assert _geojson.warm_kernels()
    kernels = (_geojson_bytes._SCAN, _geojson_bytes._COPY, _geojson_bytes._SAFE, _geojson_bytes._FEATURES)
    before = [list(k.compiled.signatures) for k in kernels]
    assert all(len(s) >= 1 for s in before)
    write_geojson(table, tmp_path / "o.geojson")
    assert [list(k.compiled.signatures) for k in kernels] == before

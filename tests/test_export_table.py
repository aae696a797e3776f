"""objects.parquet: a GeoParquet 1.1 table that geopandas and pandas read directly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely

from wsi_mtl.errors import InputError
from wsi_mtl.export import TABLE_SCHEMA, read_table_info, synthetic_batches, write_table
from wsi_mtl.objects import COLUMNS, ObjectBatch

ALL_TASKS = ("nuclei", "gland", "lumen", "tissue")


def _batches(n: int = 1200, **kw: object) -> list[ObjectBatch]:
    return list(synthetic_batches(n, batch_size=250, tasks=ALL_TASKS, extent_px=20_000, seed=3, **kw))  # type: ignore[arg-type]


def _one(geometry: list[object], **overrides: object) -> ObjectBatch:
    """A batch with one nucleus per geometry, columns filled with plausible values."""
    n = len(geometry)
    cols: dict[str, np.ndarray] = {
        "id": np.array([f"00000000-0000-4000-8000-{i:012d}" for i in range(n)]),
        "task": np.array(["nuclei"] * n),
        "class_name": np.array(["epithelial"] * n),
        "class_id": np.ones(n, dtype=np.int32),
        **{name: np.full(n, 1.0) for name, kind in COLUMNS.items() if kind == "f"},
        **{name: np.zeros(n, bool) for name, kind in COLUMNS.items() if kind == "b"},
    }
    cols.update(overrides)  # type: ignore[arg-type]
    return ObjectBatch(cols, np.array(geometry, dtype=object), {("nuclei", "epithelial"): (255, 0, 0)})


def test_geopandas_reads_table(tmp_path: Path) -> None:
    gpd = pytest.importorskip("geopandas")
    batches = _batches()
    path = tmp_path / "objects.parquet"
    summary = write_table(iter(batches), path, mpp=0.25)
    df = gpd.read_parquet(path)
    assert len(df) == summary.rows == 1200
    assert df.geometry.name == "geometry"
    assert df.crs is None
    assert list(df.columns) == [*COLUMNS, "geometry"]  # geopandas hides the bbox covering column
    expected = np.concatenate([b.geometry for b in batches])
    assert shapely.equals_exact(np.asarray(df.geometry.values), expected, tolerance=0).all()
    assert (df["id"].to_numpy() == np.concatenate([b.columns["id"] for b in batches])).all()
    assert np.allclose(df["area_um2"], np.concatenate([b.columns["area_um2"] for b in batches]))


def test_pandas_reads_table_and_counts_match(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    path = tmp_path / "objects.parquet"
    summary = write_table(_batches(), path, mpp=0.25)
    df = pd.read_parquet(path, columns=["task", "class_name"])
    expected: dict[str, dict[str, int]] = {}
    for (task, cls), n in df.value_counts().items():
        expected.setdefault(task, {})[cls] = int(n)
    assert summary.counts == expected
    assert list(summary.counts) == list(ALL_TASKS)  # TASKS order
    assert list(summary.counts["nuclei"]) == ["epithelial", "inflammatory", "connective"]  # class id order
    assert summary.colors[("gland", "gland")] == (255, 200, 0)


def test_geo_metadata(tmp_path: Path) -> None:
    path = tmp_path / "objects.parquet"
    summary = write_table(_batches(), path, mpp=0.5)
    geo = json.loads(pq.read_schema(path).metadata[b"geo"])
    assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
    col = geo["columns"]["geometry"]
    assert col["encoding"] == "WKB" and col["crs"] is None
    assert set(col["geometry_types"]) <= {"Polygon", "MultiPolygon"} and col["geometry_types"]
    assert col["covering"]["bbox"]["xmin"] == ["bbox", "xmin"]
    assert col["bbox"] == pytest.approx(list(summary.bbox))
    info = read_table_info(path)
    assert info["mpp"] == 0.5 and info["rows"] == 1200 and info["counts"] == summary.counts
    assert info["colors"] == summary.colors
    assert "level-0 pixels" in json.loads(pq.read_schema(path).metadata[b"wsimtl"])["description"]


def test_bbox_column_covers_geometry(tmp_path: Path) -> None:
    path = tmp_path / "objects.parquet"
    write_table(_batches(300), path, mpp=0.25)
    table = pq.read_table(path, columns=["geometry", "bbox"])
    geoms = shapely.from_wkb(table.column("geometry").to_numpy())
    bbox = np.array([[r[k] for k in ("xmin", "ymin", "xmax", "ymax")] for r in table.column("bbox").to_pylist()])
    assert np.allclose(bbox, shapely.bounds(geoms))


def test_row_groups_are_bounded(tmp_path: Path) -> None:
    path = tmp_path / "objects.parquet"
    write_table(_batches(1200), path, mpp=0.25, row_group_rows=500)
    meta = pq.ParquetFile(path).metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert sum(sizes) == 1200 and meta.num_row_groups == 3
    assert max(sizes) <= 500 + 250  # at most one batch over the target


def test_empty_input_gives_readable_empty_table(tmp_path: Path) -> None:
    gpd = pytest.importorskip("geopandas")
    path = tmp_path / "objects.parquet"
    summary = write_table([], path, mpp=0.25)
    assert summary.rows == 0 and summary.counts == {} and summary.bbox is None
    df = gpd.read_parquet(path)
    assert len(df) == 0 and df.geometry.name == "geometry"
    assert pq.read_schema(path).names == TABLE_SCHEMA.names


def test_invalid_polygon_is_repaired_and_empty_dropped(tmp_path: Path) -> None:
    bowtie = shapely.Polygon([(0, 0), (10, 10), (10, 0), (0, 10)])
    square = shapely.box(20, 20, 30, 30)
    empty = shapely.Polygon()
    path = tmp_path / "objects.parquet"
    summary = write_table([_one([bowtie, square, empty])], path, mpp=0.25)
    assert summary.rows == 2
    geoms = shapely.from_wkb(pq.read_table(path).column("geometry").to_numpy())
    assert shapely.is_valid(geoms).all()
    assert shapely.area(geoms[0]) == pytest.approx(50.0)


def test_wkb_from_a_validating_producer_is_stored_as_it_is(tmp_path: Path) -> None:
    """A batch's ``wkb`` (post-processing made the polygons valid) goes into the table byte for
    byte without a second validity test; empty geometries are still dropped, with their WKB."""
    square, empty, far = shapely.box(20, 20, 30, 30), shapely.Polygon(), shapely.box(0, 0, 5, 7)
    geometry = np.array([square, empty, far], dtype=object)
    batch = _one(list(geometry))
    batch.wkb = shapely.to_wkb(geometry)
    summary = write_table([batch], tmp_path / "objects.parquet", mpp=0.25)
    assert summary.rows == 2 and summary.bbox == (0.0, 0.0, 30.0, 30.0)
    stored = pq.read_table(tmp_path / "objects.parquet").column("geometry").to_pylist()
    assert stored == [batch.wkb[0], batch.wkb[2]]
    # the bytes are trusted: a bow-tie handed over as WKB is not repaired (made here, it would be)
    bowtie = shapely.Polygon([(0, 0), (10, 10), (10, 0), (0, 10)])
    trusted = _one([bowtie])
    trusted.wkb = shapely.to_wkb(np.array([bowtie], dtype=object))
    write_table([trusted], tmp_path / "trusted.parquet", mpp=0.25)
    assert pq.read_table(tmp_path / "trusted.parquet").column("geometry").to_pylist() == [trusted.wkb[0]]


def test_wkb_of_another_length_is_refused(tmp_path: Path) -> None:
    batch = _one([shapely.box(0, 0, 1, 1), shapely.box(2, 2, 3, 3)])
    batch.wkb = shapely.to_wkb(np.array([shapely.box(0, 0, 1, 1)], dtype=object))
    with pytest.raises(ValueError, match="1 WKB geometries for its 2"):
        write_table([batch], tmp_path / "objects.parquet", mpp=0.25)


def test_interrupted_write_leaves_no_file(tmp_path: Path) -> None:
    def broken():
        yield from _batches(500)
        raise RuntimeError("post-processing failed")

    path = tmp_path / "objects.parquet"
    with pytest.raises(RuntimeError, match="post-processing failed"):
        write_table(broken(), path, mpp=0.25)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mpp", [0, -1.0, float("nan"), "0.25"])
def test_bad_mpp(tmp_path: Path, mpp: object) -> None:
    with pytest.raises(ValueError, match="mpp must be a positive number"):
        write_table([], tmp_path / "t.parquet", mpp=mpp)  # type: ignore[arg-type]


def test_bad_row_group_rows(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="row_group_rows"):
        write_table([], tmp_path / "t.parquet", mpp=0.25, row_group_rows=0)


def test_batch_missing_column(tmp_path: Path) -> None:
    batch = _one([shapely.box(0, 0, 1, 1)])
    del batch.columns["solidity"]
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['solidity'\]"):
        write_table([batch], tmp_path / "t.parquet", mpp=0.25)
    assert list(tmp_path.iterdir()) == []


def test_batch_unequal_lengths(tmp_path: Path) -> None:
    batch = _one([shapely.box(0, 0, 1, 1)], probability=np.array([0.5, 0.6]))
    with pytest.raises(ValueError, match="differ in length"):
        write_table([batch], tmp_path / "t.parquet", mpp=0.25)


def test_batch_unknown_task(tmp_path: Path) -> None:
    batch = _one([shapely.box(0, 0, 1, 1)], task=np.array(["mitosis"]))
    with pytest.raises(ValueError, match="unknown task"):
        write_table([batch], tmp_path / "t.parquet", mpp=0.25)


def test_batch_point_geometry(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Polygon or MultiPolygon, got Point"):
        write_table([_one([shapely.Point(1, 2)])], tmp_path / "t.parquet", mpp=0.25)


def test_batch_none_geometry(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="missing"):
        write_table([_one([None])], tmp_path / "t.parquet", mpp=0.25)


def test_read_table_info_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="object table not found"):
        read_table_info(tmp_path / "nope.parquet")
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(InputError, match="not a readable Parquet"):
        read_table_info(bad)


def test_synthetic_batches() -> None:
    batches = list(synthetic_batches(25, batch_size=10, tasks=ALL_TASKS, seed=1))
    assert [len(b) for b in batches] == [10, 10, 5]
    for b in batches:
        assert set(b.columns) == set(COLUMNS) and shapely.is_valid(b.geometry).all()
        assert all(len(b.columns[c]) == len(b) for c in COLUMNS)
    again = list(synthetic_batches(25, batch_size=10, tasks=ALL_TASKS, seed=1))
    assert (again[0].columns["id"] == batches[0].columns["id"]).all()
    with pytest.raises(ValueError, match="no synthetic classes"):
        next(synthetic_batches(5, tasks=("mitosis",)))


def test_dictionary_encoding_only_for_repeating_columns(tmp_path: Path) -> None:
    path = tmp_path / "o.parquet"
    write_table(_batches(600), path, mpp=0.25)
    group = pq.ParquetFile(path).metadata.row_group(0)
    encodings = {group.column(i).path_in_schema: group.column(i).encodings for i in range(group.num_columns)}
    assert any("DICTIONARY" in e for e in encodings["task"])
    assert not any("DICTIONARY" in e for e in encodings["geometry"] + encodings["id"])


def test_counts_and_bbox_over_batches(tmp_path: Path) -> None:
    boxes = [shapely.box(i, 2 * i, i + 3, 2 * i + 1) for i in range(6)]
    a = _one(boxes[:3], task=np.array(["gland", "nuclei", "nuclei"]), class_name=np.array(["benign", "b", "a"]),
             class_id=np.array([1, 2, 1], dtype=np.int32))
    b = _one(boxes[3:], task=np.array(["nuclei", "nuclei", "gland"]), class_name=np.array(["a", "a", "benign"]),
             class_id=np.array([1, 1, 1], dtype=np.int32))
    summary = write_table([a, b], tmp_path / "o.parquet", mpp=0.25)
    assert summary.counts == {"nuclei": {"a": 3, "b": 1}, "gland": {"benign": 2}}
    assert list(summary.counts["nuclei"]) == ["a", "b"]  # class id order
    assert summary.bbox == (0.0, 0.0, 8.0, 11.0)

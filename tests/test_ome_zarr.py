"""predictions.zarr as one OME-Zarr 0.5: root index, pyramids, units and NGFF labels."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
import shapely
import zarr

from wsi_mtl.export import write_label_images, write_table
from wsi_mtl.export._labels import _draw_all, _shapely_vertices
from wsi_mtl.objects import COLUMNS, ObjectBatch
from wsi_mtl.ome import level_count, write_chunk, write_pyramid
from wsi_mtl.store import HeadLayout, PredictionStore

pytest.importorskip("ome_zarr_models")
from ome_zarr_models.v05.bioformats2raw import BioFormats2Raw  # noqa: E402
from ome_zarr_models.v05.image import Image  # noqa: E402

MPP, DS, CELL = 0.25, 2.0, 16  # level-0 um/px, level-0 px per model px, model px per Patch-Class cell
H, W = 1100, 700  # model px: two pyramid levels (1100 -> 550)
TISSUE = ["tumour", "stroma", "fat"]
COLORS = {
    ("nuclei", "epithelial"): (200, 0, 0), ("nuclei", "other"): (255, 200, 0), ("gland", "gland"): (0, 160, 0),
    ("lumen", "lumen"): (0, 0, 255), ("tissue", "tumour"): (200, 0, 200), ("tissue", "stroma"): (255, 140, 0),
    ("tissue", "fat"): (250, 240, 120),
}
HEADS = {
    "Nuclei-INST": {"kind": "segmentation", "classes": ["background", "interior", "boundary"], "colors": [[0, 0, 0], [255, 0, 0], [0, 255, 0]], "cell_px": 1},
    "Gland-INST": {"kind": "segmentation", "classes": ["background", "interior", "boundary"], "colors": [[0, 0, 0], [255, 0, 0], [0, 255, 0]], "cell_px": 1},
    "Lumen-INST": {"kind": "segmentation", "classes": ["background", "interior", "boundary"], "colors": [[0, 0, 0], [255, 0, 0], [0, 255, 0]], "cell_px": 1},
    "Patch-Class": {"kind": "patch", "classes": TISSUE, "colors": [list(COLORS[("tissue", c)]) for c in TISSUE], "cell_px": CELL},
}
NUCLEI = [(100, 120, "epithelial"), (900, 400, "other"), (1300, 2100, "epithelial")]  # level-0 (x, y), class
GLAND = shapely.box(200, 1000, 800, 1600).difference(shapely.box(400, 1200, 600, 1400))  # with a hole
LUMEN = shapely.box(420, 1220, 580, 1380)
# tissue regions: unions of Patch-Class cells (32 level-0 px each)
TISSUE_REGIONS = [("tumour", shapely.box(0, 0, 640, 960)), ("fat", shapely.box(640, 0, 1280, 960))]


def _batch(task: str, classes: list[str], polys: list[shapely.Geometry]) -> ObjectBatch:
    n = len(polys)
    cols: dict[str, np.ndarray] = {
        "id": np.array([str(uuid.uuid4()) for _ in range(n)]),
        "task": np.array([task] * n),
        "class_name": np.array(classes),
        "class_id": np.ones(n, dtype=np.int32),
        **{name: np.full(n, 0.9) for name, kind in COLUMNS.items() if kind == "f"},
        **{name: np.zeros(n, dtype=bool) for name, kind in COLUMNS.items() if kind == "b"},
    }
    return ObjectBatch(cols, np.array(polys, dtype=object), {k: v for k, v in COLORS.items() if k[0] == task})


@pytest.fixture()
def result(tmp_path: Path) -> Path:
    """A finished store (random maps) and an object table of a 1400 x 2200 level-0 px slide."""
    attrs = {"heads": HEADS, "slide": {"width": W * 2, "height": H * 2, "mpp": MPP}, "downsample": DS}
    layouts = [HeadLayout(name, 3, info["cell_px"]) for name, info in HEADS.items()]
    store = PredictionStore(tmp_path, heads=layouts, height=H, width=W, core_px=256, downsample=DS,
                            fingerprint={"test": 1}, attrs=attrs)
    rng = np.random.default_rng(0)
    for name in HEADS:
        arr = store.root[name]["0"]
        arr[...] = rng.integers(0, 256, size=arr.shape, dtype=np.uint8)
    store.write_mask("tissue_mask", np.ones((40, 30), dtype=bool), downsample=64.0)
    store.finalize()
    batches = [
        _batch("tissue", [c for c, _ in TISSUE_REGIONS], [g for _, g in TISSUE_REGIONS]),
        _batch("nuclei", [c for *_, c in NUCLEI], [shapely.Point(x, y).buffer(10) for x, y, _ in NUCLEI]),
        _batch("gland", ["gland"], [GLAND]),
        _batch("lumen", ["lumen"], [LUMEN]),
    ]
    write_table(batches, tmp_path / "objects.parquet", mpp=MPP)
    return tmp_path


def _labels(result: Path) -> list[Path]:
    root = zarr.open_group(result / "predictions.zarr", mode="r")
    return write_label_images(result / "predictions.zarr", result / "objects.parquet", dict(root.attrs["wsimtl"]))


def test_level_count() -> None:
    assert level_count(1024, 10) == 1
    assert level_count(1025, 3) == 2
    assert level_count(4096, 4097) == 4


def test_root_lists_every_image_and_each_is_valid(result: Path) -> None:
    root = zarr.open_group(result / "predictions.zarr", mode="r")
    BioFormats2Raw.from_zarr(root)  # the root validates
    series = root["OME"].attrs["ome"]["series"]
    assert series == [*HEADS, "tissue_mask"]
    xml = (result / "predictions.zarr" / "OME" / "METADATA.ome.xml").read_text()
    assert all(f'ID="Image:{name}"' in xml for name in series)
    for name in series:
        image = Image.from_zarr(root[name])
        ms = image.attributes.ome.multiscales[0]
        assert [a.unit for a in ms.axes[1:]] == ["micrometer", "micrometer"]
        first = ms.datasets[0].coordinateTransformations
        ds = DS * HEADS[name]["cell_px"] if name in HEADS else 64.0
        assert first[0].scale[-1] == pytest.approx(ds * MPP)
        assert first[1].translation[-1] == pytest.approx((ds - 1) / 2 * MPP)
        levels = [root[name][d.path].shape[-2:] for d in ms.datasets]
        assert len(levels) == level_count(*root[name]["0"].shape[-2:]) and max(levels[-1]) <= 1024
    nuclei = root["Nuclei-INST"]
    assert [nuclei[p].shape for p in ("0", "1")] == [(3, H, W), (3, H // 2, W // 2)]
    assert root["Nuclei-INST"].attrs["ome"]["omero"]["channels"][1]["label"] == "interior"


def test_level_one_is_the_block_mean(result: Path) -> None:
    root = zarr.open_group(result / "predictions.zarr", mode="r")
    level0 = np.asarray(root["Gland-INST"]["0"][:, :64, :64]).astype(np.float64)
    level1 = np.asarray(root["Gland-INST"]["1"][:, :32, :32])
    expected = np.floor(level0.reshape(3, 32, 2, 32, 2).mean(axis=(2, 4)) + 0.5)
    assert np.array_equal(level1, expected.astype(np.uint8))
    scale1 = root["Gland-INST"].attrs["ome"]["multiscales"][0]["datasets"][1]["coordinateTransformations"]
    # level-1 pixel i is the mean of level-0 pixels 2i, 2i+1: centre half a level-0 pixel further
    assert scale1[0]["scale"][-1] == pytest.approx(2 * DS * MPP)
    assert scale1[1]["translation"][-1] == pytest.approx((DS - 1) / 2 * MPP + DS * MPP / 2)


def test_pyramid_odd_sizes_and_nearest(tmp_path: Path) -> None:
    group = zarr.open_group(tmp_path / "img", mode="w", zarr_format=3)
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": [{"name": "c", "type": "channel"}, {"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
                          "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]}]}]}
    data = np.random.default_rng(1).integers(0, 9, size=(1, 2051, 1031), dtype=np.int32)
    arr = group.create_array("0", shape=data.shape, chunks=(1, 500, 500), dtype="int32", dimension_names=("c", "y", "x"))
    arr[...] = data
    assert write_pyramid(group, how="nearest") == 3
    assert group["1"].shape == (1, 1026, 516) and group["2"].shape == (1, 513, 258)
    assert np.array_equal(group["1"][...], data[:, ::2, ::2])
    assert np.array_equal(group["2"][...], data[:, ::4, ::4])
    assert write_pyramid(group, how="nearest") == 3  # again: levels replaced, not added
    assert sorted(group.array_keys()) == ["0", "1", "2"]
    assert write_pyramid(group, how="nearest", max_levels=1) == 1  # e.g. a label of a single-level image
    assert sorted(group.array_keys()) == ["0"] and len(group.attrs["ome"]["multiscales"][0]["datasets"]) == 1


def test_pyramid_reads_block_by_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wsi_mtl.ome as ome

    group = zarr.open_group(tmp_path / "img", mode="w", zarr_format=3)
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": [{"name": "c", "type": "channel"}, {"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
                          "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]}]}]}
    group.create_array("0", shape=(2, 3000, 2500), chunks=(2, 256, 256), dtype="uint8", dimension_names=("c", "y", "x"))
    seen: list[tuple[int, ...]] = []
    reduce = ome._reduce
    monkeypatch.setattr(ome, "_reduce", lambda block, how: (seen.append(block.shape), reduce(block, how))[1])
    assert write_pyramid(group) == 3
    assert len(seen) == 6 * 5 + 3 * 3 and max(int(np.prod(s)) for s in seen) <= 2 * 512 * 512  # 2 x 2 chunks at a time


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int32"])
def test_write_chunk_stores_what_zarr_stores(tmp_path: Path, dtype: str) -> None:
    """write_chunk and plain assignment leave the same chunk files and values: empty chunks (all
    fill) are not stored, partial edge chunks merge with what is there, rewrites replace."""
    rng = np.random.default_rng(3)
    stores = {}
    for how in ("plain", "write_chunk"):
        arr = zarr.create_array(tmp_path / how, shape=(2, 70, 50), chunks=(2, 32, 32), dtype=dtype, fill_value=7)
        blocks = [((slice(None), slice(0, 32), slice(0, 32)), rng.integers(0, 9, (2, 32, 32))),
                  ((slice(None), slice(0, 32), slice(32, 50)), np.full((2, 32, 18), 7)),  # all fill: not stored
                  ((slice(None), slice(64, 70), slice(32, 50)), rng.integers(0, 9, (2, 6, 18))),  # edge chunk
                  ((slice(None), slice(32, 64), slice(0, 32)), np.full((2, 32, 32), 3)),
                  ((slice(None), slice(32, 64), slice(0, 32)), np.full((2, 32, 32), 7)),  # rewritten as fill: removed
                  ((slice(None), slice(0, 16), slice(32, 48)), np.full((2, 16, 16), 5))]  # part of a stored-empty chunk
        rng = np.random.default_rng(3)
        for sel, block in blocks:
            block = block.astype(dtype)
            if how == "plain":
                arr[sel] = block
            else:
                write_chunk(arr, sel, block)
        files = sorted(str(f.relative_to(tmp_path / how)) for f in (tmp_path / how).rglob("*") if f.is_file() and "c" in f.parts)
        stores[how] = (files, arr[...])
    assert stores["plain"][0] == stores["write_chunk"][0] and len(stores["plain"][0]) == 3
    assert np.array_equal(stores["plain"][1], stores["write_chunk"][1])
    # a fresh chunk: a block of fill values is not written (nor read back differently)
    arr = zarr.create_array(tmp_path / "fresh", shape=(2, 64, 64), chunks=(2, 32, 32), dtype=dtype, fill_value=7)
    write_chunk(arr, (slice(None), slice(0, 32), slice(0, 32)), np.full((2, 32, 32), 7, dtype), fresh=True)
    write_chunk(arr, (slice(None), slice(32, 64), slice(0, 32)), np.full((2, 32, 32), 1, dtype), fresh=True)
    assert [f.name for f in (tmp_path / "fresh").rglob("*") if f.is_file() and "c" in f.parts] == ["0"]
    assert np.array_equal(arr[:, 32:, :32], np.ones((2, 32, 32))) and np.all(arr[:, :32] == 7)


def test_mean_reduction_of_odd_edges() -> None:
    from wsi_mtl.ome import _reduce

    block = np.array([[[10, 20, 200], [30, 40, 100], [7, 9, 255]]], dtype=np.uint8)
    # 2x2 means rounded half up; a last odd row or column averages the pixels it has
    assert _reduce(block, "mean").tolist() == [[[25, 150], [8, 255]]]


def test_compiled_mean_reduction_equals_the_numpy_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pyramids' compiled uint8 2x mean gives numpy's values for odd and even sides, several
    channels and non-contiguous blocks (numba absent: numpy's path alone)."""
    from wsi_mtl import ome

    rng = np.random.default_rng(7)
    blocks = [rng.integers(0, 256, (c, h, w), dtype=np.uint8) for c, h, w in [(3, 64, 64), (5, 31, 17), (1, 1, 9), (2, 7, 1)]]
    blocks.append(rng.integers(0, 256, (4, 40, 50), dtype=np.uint8)[::2, 3:, 1:])
    from wsi_mtl._numba import numba_allowed

    got = [ome._reduce(b, "mean") for b in blocks]
    assert ome._MEAN2.compiled or not numba_allowed()  # the compiled path ran
    monkeypatch.setattr(ome._MEAN2, "compiled", False)
    for b, g in zip(blocks, got):
        want = ome._reduce(b, "mean")
        assert g.dtype == np.uint8 and g.shape == want.shape
        np.testing.assert_array_equal(g, want)


def _draw_shapes(tile: np.ndarray, geoms: np.ndarray, values: np.ndarray, **kw) -> None:
    """``_draw_all`` of shapely geometries."""
    _draw_all(tile, _shapely_vertices(geoms), len(geoms), values, **kw)


def _draw(tile: np.ndarray, geom: shapely.Geometry, value: int, **kw) -> None:
    _draw_shapes(tile, np.array([geom], dtype=object), np.array([value]), **kw)


def test_draw_is_point_in_polygon() -> None:
    rng = np.random.default_rng(2)
    for k in range(40):
        centre, radius = rng.uniform(10, 60, 2), rng.uniform(4, 40)
        angles = np.sort(rng.uniform(0, 2 * np.pi, 14))
        ring = np.c_[centre[0] + radius * rng.uniform(0.4, 1, 14) * np.cos(angles), centre[1] + radius * rng.uniform(0.4, 1, 14) * np.sin(angles)]
        poly = shapely.make_valid(shapely.Polygon(ring))
        if k % 2:
            poly = poly.difference(shapely.Point(*centre).buffer(radius * 0.3))
        tile = np.zeros((40, 50), dtype=np.int32)
        _draw(tile, poly, 5, downsample=1.5, origin=(3, 2))
        yy, xx = np.mgrid[0:40, 0:50]
        inside = shapely.contains_xy(poly, (xx + 2 + 0.5) * 1.5, (yy + 3 + 0.5) * 1.5)
        assert np.array_equal(tile == 5, inside), k


@pytest.mark.parametrize("painter", ["slices", "arrays"])
def test_drawing_a_tile_at_once_equals_drawing_object_after_object(painter: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Overlapping polygons, holes, multipolygons, degenerate and off-tile ones: the later wins,
    whether runs are painted a slice at a time or all at once."""
    from wsi_mtl.export import _labels

    monkeypatch.setattr(_labels, "_SLICE_COST", 1.0 if painter == "arrays" else 0.0)
    rng = np.random.default_rng(3)
    geoms = []
    for k in range(60):
        c, r = rng.uniform(-10, 90, 2), rng.uniform(1, 25)
        g = shapely.Point(*c).buffer(r, quad_segs=int(rng.integers(1, 6)))
        if k % 5 == 0:
            g = g.difference(shapely.Point(*c).buffer(r / 2))
        if k % 7 == 0:
            g = shapely.MultiPolygon([g, shapely.box(c[0] + 30, c[1], c[0] + 34, c[1] + 3)])
        geoms.append(g)
    geoms.append(shapely.LineString([(1, 1), (5, 5)]))
    values = rng.integers(1, 200, len(geoms))
    one_by_one = np.zeros((70, 80), np.int32)
    for g, v in zip(geoms, values):
        _draw(one_by_one, g, int(v), downsample=1.25, origin=(2, 3))
    at_once = np.zeros((70, 80), np.int32)
    _draw_shapes(at_once, np.array(geoms, dtype=object), values, downsample=1.25, origin=(2, 3))
    np.testing.assert_array_equal(at_once, one_by_one)
    assert len(np.unique(at_once)) > 30


def test_label_images(result: Path) -> None:
    written = _labels(result)
    predictions = result / "predictions.zarr"
    assert [p.relative_to(predictions).as_posix() for p in written] == [
        "Patch-Class/labels/tissue_classes", "Nuclei-INST/labels/nuclei", "Gland-INST/labels/glands", "Lumen-INST/labels/lumen"]
    root = zarr.open_group(predictions, mode="r")
    for head in HEADS:
        image = Image.from_zarr(root[head])  # labels included: dtype, levels equal to the image's
        assert image.labels is not None
    nuclei = np.asarray(root["Nuclei-INST/labels/nuclei/0"][0])
    assert nuclei.dtype == np.int32 and nuclei.shape == (H, W)
    for value, (x, y, _) in enumerate(NUCLEI, start=1):
        assert nuclei[int(y / DS), int(x / DS)] == value
        assert (nuclei == value).sum() == pytest.approx(np.pi * (10 / DS) ** 2, rel=0.2)
    assert set(np.unique(nuclei)) == {0, 1, 2, 3}
    label = root["Nuclei-INST/labels/nuclei"].attrs["ome"]["image-label"]
    assert {c["label-value"]: tuple(c["rgba"]) for c in label["colors"]} == {1: (200, 0, 0, 255), 2: (255, 200, 0, 255), 3: (200, 0, 0, 255)}
    assert [p["class"] for p in label["properties"]] == ["epithelial", "other", "epithelial"]
    glands = np.asarray(root["Gland-INST/labels/glands/0"][0])
    assert glands[1100 // 2, 300 // 2] == 1 and glands[1300 // 2, 500 // 2] == 0  # body, hole
    # the gland spans four 256 px chunks: every pixel whose centre lies in it, and no other
    yy, xx = np.mgrid[0:H, 0:W]
    assert np.array_equal(glands == 1, shapely.contains_xy(GLAND, (xx + 0.5) * DS, (yy + 0.5) * DS))
    lumen = np.asarray(root["Lumen-INST/labels/lumen/0"][0])
    assert lumen[1300 // 2, 500 // 2] == 1
    tissue = np.asarray(root["Patch-Class/labels/tissue_classes/0"][0])
    cell = DS * CELL
    assert tissue.dtype == np.uint8
    assert tissue[0, 0] == 1 and tissue[0, int(700 / cell)] == 3 and tissue[int(1000 / cell), 0] == 0
    assert ((tissue == 1).sum(), (tissue == 3).sum()) == (20 * 30, 20 * 30)
    colors = root["Patch-Class/labels/tissue_classes"].attrs["ome"]["image-label"]["colors"]
    assert [c["rgba"][:3] for c in colors] == [list(COLORS[("tissue", c)]) for c in TISSUE]
    assert len(root["Nuclei-INST/labels/nuclei"].attrs["ome"]["multiscales"][0]["datasets"]) == 2


def test_label_images_of_some_tasks(result: Path) -> None:
    """`tasks` writes only those label images (separate calls may write the others meanwhile)."""
    root = zarr.open_group(result / "predictions.zarr", mode="r")
    written = write_label_images(result / "predictions.zarr", result / "objects.parquet", dict(root.attrs["wsimtl"]), tasks=["gland", "lumen"])
    assert [p.name for p in written] == ["glands", "lumen"]
    assert not (result / "predictions.zarr" / "Nuclei-INST" / "labels").exists()
    assert not (result / "predictions.zarr" / "Patch-Class" / "labels").exists()


def test_label_images_rewritten(result: Path) -> None:
    _labels(result)
    _labels(result)
    root = zarr.open_group(result / "predictions.zarr", mode="r")
    assert root["Nuclei-INST/labels"].attrs["ome"]["labels"] == ["nuclei"]
    assert not [p for p in (result / "predictions.zarr" / "Nuclei-INST" / "labels").iterdir() if "partial" in p.name]


@pytest.mark.slow
def test_napari_reader_opens_every_layer(result: Path) -> None:
    reader_module = pytest.importorskip("napari_ome_zarr._reader", reason="napari-ome-zarr (with napari) not installed")
    _labels(result)
    reader = reader_module.napari_get_reader(str(result / "predictions.zarr"))
    assert reader is not None
    layers = reader(str(result / "predictions.zarr"))
    kinds = [kind for _, _, kind in layers]
    assert kinds.count("image") == len(HEADS) + 1 and kinds.count("labels") == 4
    for data, meta, kind in layers:
        assert meta["units"][-2:] == ("micrometer", "micrometer")
        if kind == "labels":
            assert len(data) == (2 if "Patch" not in meta["name"] else 1) and data[0].shape[-2:] in {(H, W), (-(-H // CELL), -(-W // CELL))}
    nuclei = next(meta for _, meta, kind in layers if kind == "labels" and meta["name"].endswith("nuclei"))
    assert nuclei["colormap"][2] == pytest.approx([1.0, 200 / 255, 0.0, 1.0])


@pytest.mark.slow
def test_ome_zarr_reader_finds_images_and_labels(result: Path) -> None:
    io = pytest.importorskip("ome_zarr.io")
    from ome_zarr.reader import Label, Multiscales, Reader

    _labels(result)
    for name in HEADS:
        nodes = list(Reader(io.parse_url(result / "predictions.zarr" / name))())
        image = [n for n in nodes if n.load(Multiscales) and not n.load(Label)]
        labels = [n for n in nodes if n.load(Label)]
        assert len(image) == 1 and len(image[0].data) == level_count(H // HEADS[name]["cell_px"], W // HEADS[name]["cell_px"])
        assert len(labels) == 1


def test_label_chunk_buckets_list_every_chunk_a_box_touches_in_table_order() -> None:
    """_buckets (vectorised) against its definition: each object's box, with one pixel of slack
    each way, lists it in every label chunk it touches, objects in table order."""
    from wsi_mtl.export._labels import _buckets

    rng = np.random.default_rng(0)
    n = 3000
    x0, y0 = rng.uniform(-50, 9000, n), rng.uniform(-50, 7000, n)
    side = rng.choice([10.0, 30.0, 2000.0], n, p=[0.8, 0.15, 0.05])
    bounds = np.stack([x0, y0, x0 + side, y0 + side * rng.uniform(0.5, 1.5, n)], 1).astype(np.float32)
    for downsample, chunk, shape in [(2.0, (512, 512), (3600, 4600)), (16.0, (64, 48), (440, 570))]:
        b = bounds.astype(np.float64) / downsample
        lo_y = np.clip(np.floor(b[:, 1] - 1.5), 0, shape[0] - 1).astype(int) // chunk[0]
        hi_y = np.clip(np.ceil(b[:, 3] + 0.5), 0, shape[0] - 1).astype(int) // chunk[0]
        lo_x = np.clip(np.floor(b[:, 0] - 1.5), 0, shape[1] - 1).astype(int) // chunk[1]
        hi_x = np.clip(np.ceil(b[:, 2] + 0.5), 0, shape[1] - 1).astype(int) // chunk[1]
        want: dict[tuple[int, int], list[int]] = {}
        for i in range(n):
            for cy in range(lo_y[i], hi_y[i] + 1):
                for cx in range(lo_x[i], hi_x[i] + 1):
                    want.setdefault((cy, cx), []).append(i)
        got = _buckets(bounds, downsample=downsample, chunk=chunk, shape=shape)
        assert got.keys() == want.keys()
        for key, members in want.items():
            assert got[key].tolist() == members, key


def test_label_index_bounds_from_the_bbox_column_equal_those_of_the_geometries(result: Path) -> None:
    """The label images take each object's box from the table's ``bbox`` column; a table without
    one has its geometries decoded: the same boxes."""
    import pyarrow.parquet as pq

    from wsi_mtl.export._labels import _bounds

    with pq.ParquetFile(result / "objects.parquet") as parquet:
        rg = parquet.read_row_group(0, columns=["bbox", "geometry"])
    rows = np.arange(rg.num_rows)[::-1][: rg.num_rows - 1]  # a selection, out of order
    decoded = _bounds(rg, rows, False)
    assert np.array_equal(_bounds(rg, rows, True), decoded)
    geoms = shapely.from_wkb(rg.column("geometry").to_numpy(zero_copy_only=False))[rows]
    assert np.array_equal(decoded, shapely.bounds(geoms)) and len(rows) > 5


def test_compiled_scanline_fill_paints_the_pixels_of_the_array_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """Polygons with holes, multipolygons, overlaps (the later wins), shapes cut by the tile's
    edges, slivers and degenerate rings: the compiled fill sets exactly the array version's pixels."""
    from wsi_mtl.export import _labels, _scanline

    if _scanline._compiled() is None:
        pytest.skip("numba not installed or switched off (WSIMTL_NO_NUMBA=1): only the array version runs")
    rng = np.random.default_rng(7)
    geoms = []
    for _ in range(300):
        cx, cy, r = rng.uniform(-20, 150), rng.uniform(-20, 150), rng.uniform(0.3, 25)
        ring = shapely.Point(cx, cy).buffer(r, quad_segs=int(rng.integers(1, 6)))
        if rng.random() < 0.2:
            ring = ring.difference(shapely.Point(cx, cy).buffer(r / 2))
        if rng.random() < 0.1:
            ring = shapely.MultiPolygon([ring, shapely.box(cx + r + 2, cy, cx + r + 9, cy + 0.4)])
        geoms.append(ring)
    geoms.append(shapely.Polygon([(5, 5), (5, 5), (5, 5)]))  # fewer than 3 distinct vertices
    geoms = np.array(geoms, dtype=object)
    values = np.arange(1, len(geoms) + 1, dtype=np.int64)
    for downsample, origin in [(1.0, (0, 0)), (2.0, (7, -3)), (0.7, (31, 40))]:
        compiled = np.zeros((96, 128), np.int32)
        _draw_shapes(compiled, geoms, values, downsample=downsample, origin=origin)
        monkeypatch.setattr(_labels, "fill_rings", lambda *args: False)
        plain = np.zeros((96, 128), np.int32)
        _draw_shapes(plain, geoms, values, downsample=downsample, origin=origin)
        monkeypatch.undo()
        assert np.array_equal(compiled, plain) and len(np.unique(plain)) > 50


def _mixed_geometries(rng: np.random.Generator, n: int) -> list[shapely.Geometry]:
    """Polygons (some with holes), multipolygons and empty polygons in level-0 px."""
    geoms: list[shapely.Geometry] = []
    for k in range(n):
        cx, cy, r = rng.uniform(0, 300), rng.uniform(0, 300), rng.uniform(2, 30)
        g = shapely.Point(cx, cy).buffer(r, quad_segs=int(rng.integers(1, 5)))
        if k % 5 == 1:
            g = g.difference(shapely.Point(cx, cy).buffer(r / 2))
        if k % 7 == 3:
            g = shapely.MultiPolygon([g, shapely.box(cx + r + 2, cy, cx + r + 9, cy + 4)])
        geoms.append(shapely.Polygon() if k % 11 == 5 else g)
    return geoms


@pytest.mark.parametrize("compiled", [True, False])
def test_label_vertices_read_from_the_wkb_are_shapelys(compiled: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The label images read each object's rings from its WKB in the table (the GeoJSON export's
    compiled reader; shapely for multipolygons, big-endian WKB, or without numba): the same
    vertices, rings and objects as shapely's, for objects picked from several row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from wsi_mtl.export import _labels

    if not compiled:
        monkeypatch.setattr(_labels, "rings_available", lambda: False)
    elif not _labels.rings_available():
        pytest.skip("numba not installed or switched off (WSIMTL_NO_NUMBA=1): shapely reads every geometry")
    geoms = _mixed_geometries(np.random.default_rng(4), 60)
    wkb = [shapely.to_wkb(g, byte_order=0 if k % 4 == 2 else 1) for k, g in enumerate(geoms)]  # a quarter big-endian
    tasks = ["nuclei" if k % 3 else "gland" for k in range(len(geoms))]
    table = pa.table({"task": tasks, "class_name": ["a"] * len(geoms), "geometry": pa.array(wkb, pa.binary())})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=7)
    with pq.ParquetFile(tmp_path / "t.parquet") as parquet:
        assert parquet.num_row_groups > 5
        index = _labels._index(parquet, {"nuclei"}, {})["nuclei"]
        mine = np.flatnonzero(np.array(tasks) == "nuclei")
        picked = np.array([0, 3, 4, 9, 10, 11, 17, 25, 30, 31, 39])  # positions in the index, ascending
        xy, ring, obj = _labels._Geometries(parquet, index).vertices(picked)
    want_xy, want_ring, want_obj = _labels._shapely_vertices(np.array([geoms[k] for k in mine[picked]], dtype=object))
    assert np.array_equal(xy, want_xy) and np.array_equal(obj, want_obj)
    assert np.array_equal(ring[1:] != ring[:-1], want_ring[1:] != want_ring[:-1])  # the same rings
    assert len(np.unique(ring)) == len(np.unique(want_ring)) > len(picked)

"""Objects extracted while the maps are still being written equal those extracted afterwards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import shapely
from skimage.draw import disk

from wsi_mtl.errors import InputError
from wsi_mtl.postprocess import PostprocessParams, extract_objects, label_to_3class
from wsi_mtl.postprocess._extract import concat_batches
from wsi_mtl.postprocess._overlap import OverlapExtractor
from wsi_mtl.store import HeadLayout, PredictionStore
from wsi_mtl.tiling import plan_tiles

CORE = 64
SIZE = 384  # 6 x 6 tiles of 64 model px
PARAMS = PostprocessParams(gland_chunk_px=128, gland_halo_px=16, gland_max_halo_px=128, gland_min_area_px=50, min_in_tissue=0.5)
CHUNKS = {"chunk_px": 128, "halo_px": 8, "max_halo_px": 64}


def _maps() -> dict[str, np.ndarray]:
    """Nuclei everywhere (some across tile and chunk edges), glands wider than the first halo, tissue classes."""
    rng = np.random.default_rng(3)
    nuc = np.zeros((SIZE, SIZE), np.int32)
    for k in range(1, 120):
        y, x = rng.integers(4, SIZE - 4, 2)
        nuc[disk((y, x), rng.integers(3, 7), shape=nuc.shape)] = k
    gl = np.zeros((SIZE, SIZE), np.int32)
    for k, (y, x, r) in enumerate([(100, 120, 45), (250, 260, 70), (330, 60, 30)], start=1):
        gl[disk((y, x), r, shape=gl.shape)] = k
    lum = np.zeros_like(gl)
    lum[disk((250, 260), 20, shape=gl.shape)] = 1
    patch = np.zeros((4, SIZE // 16, SIZE // 16), np.uint8)
    cls = (np.arange(SIZE // 16)[:, None] // 8 + np.arange(SIZE // 16)[None, :] // 10) % 3 + 1
    for c in range(4):
        patch[c][cls == c] = 230
    return {"Nuclei-INST": label_to_3class(nuc, erosion_px=1), "Gland-INST": label_to_3class(gl, erosion_px=5),
            "Lumen-INST": label_to_3class(lum, erosion_px=1), "Patch-Class": patch}


def _store(result_dir: Path, maps: dict[str, np.ndarray]) -> PredictionStore:
    heads = [HeadLayout(n, a.shape[0], 16 if n == "Patch-Class" else 1) for n, a in maps.items()]
    names = {"Patch-Class": ["background", "tumour", "stroma", "fat"]}
    attrs = {"heads": {n: {"kind": "x", "classes": names.get(n, ["background", "interior", "boundary"]),
                           "colors": [[0, 0, 0]] * len(names.get(n, "abc")), "cell_px": 16 if n == "Patch-Class" else 1} for n in maps},
             "slide": {"mpp": 0.25, "width": 2 * SIZE, "height": 2 * SIZE}, "model_mpp": 0.5, "downsample": 2.0}
    store = PredictionStore(result_dir, heads=heads, height=SIZE, width=SIZE, core_px=CORE, downsample=2.0,
                            fingerprint={"test": 1}, attrs=attrs)
    mask = np.ones((SIZE // 4, SIZE // 4), bool)
    mask[:, :6] = False  # a strip of glass
    store.write_mask("tissue_mask", mask, downsample=8.0)
    return store


def _key(batch) -> list[tuple]:
    cols = [k for k in batch.columns if k != "id"]
    wkb = shapely.to_wkb(batch.geometry)
    return [tuple(repr(batch.columns[k][i]) for k in cols) + (wkb[i],) for i in range(len(batch))]  # repr: NaN == NaN


def _write_tile(store: PredictionStore, maps: dict[str, np.ndarray], tile) -> None:
    out = {}
    for h in store.heads:
        c = h.cell_px
        out[h.name] = maps[h.name][:, tile.y0 // c : (tile.y0 + tile.height) // c, tile.x0 // c : (tile.x0 + tile.width) // c]
    store.write_tile(tile, out)
    store.mark_done(tile)


@pytest.mark.parametrize("workers", [1, 2])
def test_overlapped_objects_equal_those_extracted_afterwards(tmp_path: Path, workers: int) -> None:
    maps = _maps()
    store = _store(tmp_path, maps)
    grid = plan_tiles(SIZE, SIZE, core_px=CORE, margin_px=0, stride=16)
    tiles = [t for t in grid.tiles() if not (t.row == 0 and t.col == 5)]  # one tile without tissue: never written
    with OverlapExtractor(store.path, tmp_path / "spool", grid_shape=(grid.rows, grid.cols), core_px=CORE,
                          pending=[t.key for t in tiles], workers=workers, params=PARAMS, **CHUNKS) as ex:
        for tile in tiles:
            _write_tile(store, maps, tile)
            ex.tile_done(tile.key)
        ex.drain()
        assert ex.chunks_overlapped >= 1  # the first chunk's tiles were written long before the last tile
        final = store.finalize()
        stream = ex.objects(final, workers=workers)
        overlapped = concat_batches(list(stream))
        warnings = stream.warnings
    assert not (tmp_path / "spool").exists()
    reference = extract_objects(final, params=PARAMS, workers=1, **CHUNKS)
    after = concat_batches(list(reference))
    assert set(after.columns["task"].tolist()) == {"nuclei", "gland", "lumen", "tissue"}
    assert _key(overlapped) == _key(after)  # same objects, same order
    assert warnings == reference.warnings


def test_only_overlap_pool_processes_give_back_freed_pages_after_a_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool process gives back what each chunk freed (past a resident size), and prepares its heap
    for each job as export's chunk workers do (``heap_for``: a gland job starts on given-back
    pages); on a thread (a Dask worker's) the memory is that of the process the network runs in,
    which keeps it for the slide: nothing given back, the heap left as it is."""
    from wsi_mtl.postprocess import _extract, _overlap

    maps = _maps()
    store = _store(tmp_path, maps)
    grid = plan_tiles(SIZE, SIZE, core_px=CORE, margin_px=0, stride=16)
    for tile in grid.tiles():
        _write_tile(store, maps, tile)
    final = store.finalize()
    meta = _extract.read_meta(final)
    job = _extract._plan_jobs(meta, ("nuclei",), params=PARAMS, **CHUNKS)[0]
    calls: list[int] = []
    prepared: list[str] = []
    monkeypatch.setattr(_overlap, "release_if_larger", lambda: calls.append(1))
    monkeypatch.setattr(_extract, "heap_for", lambda j: prepared.append(j.group))
    for in_pool, expected in ((False, 0), (True, 1)):
        monkeypatch.setattr(_overlap, "_IN_POOL_PROCESS", in_pool)
        calls.clear()
        prepared.clear()
        _, done = _overlap._run_spooled(str(final), job, meta, PARAMS, None, 1.0, str(tmp_path / f"part{in_pool}.pkl"))
        assert done and len(calls) == expected
        assert prepared == ["nuclei"] * expected


def test_tiles_before_work_is_where_the_first_chunk_becomes_ready(tmp_path: Path) -> None:
    """The tile count after which the first chunk can run (the network runs on every core until
    then): one tile fewer leaves every chunk waiting, that many lets one start."""
    from wsi_mtl.postprocess._overlap import _Readiness

    store = _store(tmp_path, _maps())
    grid = plan_tiles(SIZE, SIZE, core_px=CORE, margin_px=0, stride=16)
    tiles = [t for t in grid.tiles() if not (t.row == 0 and t.col == 5)]  # never written: counts as written
    with OverlapExtractor(store.path, tmp_path / "spool", grid_shape=(grid.rows, grid.cols), core_px=CORE,
                          pending=[t.key for t in tiles], workers=1, params=PARAMS, **CHUNKS) as ex:
        first = ex.tiles_before_work(t.key for t in tiles)

        def ready_after(n: int) -> bool:
            written = np.ones((grid.rows, grid.cols), bool)
            for t in tiles[n:]:
                written[t.key] = False
            return any(_Readiness(written, CORE).covers(j.chunk.read, ex._scale(j)) for j in ex.jobs)

        assert 1 < first < len(tiles)
        assert not ready_after(first - 1) and ready_after(first)


def test_resumed_store_counts_finished_tiles_as_written(tmp_path: Path) -> None:
    """Tiles written by an interrupted run are ready at once: chunks over them run before any new tile."""
    maps = _maps()
    store = _store(tmp_path, maps)
    grid = plan_tiles(SIZE, SIZE, core_px=CORE, margin_px=0, stride=16)
    tiles = list(grid.tiles())
    for tile in tiles[:18]:  # the top half was written before the interruption
        _write_tile(store, maps, tile)
    with OverlapExtractor(store.path, tmp_path / "spool", grid_shape=(grid.rows, grid.cols), core_px=CORE,
                          pending=[t.key for t in tiles[18:]], workers=1, params=PARAMS, **CHUNKS) as ex:
        ex.drain(stop=False)  # no new tile yet
        assert ex.chunks_overlapped >= 1
        for tile in tiles[18:]:
            _write_tile(store, maps, tile)
            ex.tile_done(tile.key)
        ex.drain()  # the chunks in flight read the store before it is renamed
        final = store.finalize()
        overlapped = concat_batches(list(ex.objects(final)))
    after = concat_batches(list(extract_objects(final, params=PARAMS, workers=1, **CHUNKS)))
    assert len(after) > 100 and _key(overlapped) == _key(after)


def test_overlap_extracts_with_the_settings_its_store_records(tmp_path: Path) -> None:
    """A resumed store keeps the post-processing settings it was begun with (the model's, as
    recorded then); the chunks extracted during inference use those, as the exports do, not the
    settings a newer run would record, with the user's overrides on top."""
    from types import SimpleNamespace

    from wsi_mtl.pipeline import _Overlap

    store = _store(tmp_path, _maps())
    store.update_attrs(postprocess={"tissue_window_cells": 0, "nuclei_min_area_px": 33.0})
    grid = plan_tiles(SIZE, SIZE, core_px=CORE, margin_px=0, stride=16)
    layout = SimpleNamespace(grid=grid, tiles=list(grid.tiles()), attrs={"postprocess": {"tissue_window_cells": 5}})
    overlap = _Overlap(1)
    try:
        assert overlap.start(store, layout, SimpleNamespace(overrides={"nuclei_split_h": 0.5}), tissue_mask=True) is not None
        params = overlap.extractor.params
        assert (params.tissue_window_cells, params.nuclei_min_area_px, params.nuclei_split_h) == (0, 33.0, 0.5)
    finally:
        overlap.close()
        store.close()


def test_finish_runs_every_chunk_left_before_the_store_is_renamed(tmp_path: Path) -> None:
    """Once the network is done, the chunks left run on the written store with ``max_workers``
    processes while the pyramids are written; after the rename nothing is left to run and the
    objects are those extracted afterwards."""
    maps = _maps()
    store = _store(tmp_path, maps)
    grid = plan_tiles(SIZE, SIZE, core_px=CORE, margin_px=0, stride=16)
    tiles = list(grid.tiles())
    with OverlapExtractor(store.path, tmp_path / "spool", grid_shape=(grid.rows, grid.cols), core_px=CORE,
                          pending=[t.key for t in tiles], workers=1, max_workers=2, params=PARAMS, **CHUNKS) as ex:
        for tile in tiles[:-1]:  # the last tile is never reported: finish() counts every tile as written
            _write_tile(store, maps, tile)
            ex.tile_done(tile.key)
        _write_tile(store, maps, tiles[-1])
        during = ex.chunks_overlapped
        ex.finish()
        final = store.finalize(before_rename=ex.drain)
        assert ex.workers == 2 and ex.chunks_overlapped == during < len(ex.jobs)
        assert len(list((tmp_path / "spool").glob("*.pkl"))) == len(ex.jobs)  # every chunk done before the rename
        pools = [ex._pool, *ex._retired]
        stream = ex.objects(final)
        # nothing left to run: both pools (of inference and after it) have ended before the objects are read
        assert ex._pool is None and not any(p.is_alive() for pool in pools for p in (pool._processes or {}).values())
        overlapped = concat_batches(list(stream))
    after = concat_batches(list(extract_objects(final, params=PARAMS, workers=1, **CHUNKS)))
    assert len(after) > 100 and _key(overlapped) == _key(after)


class _HeldPool:
    """An executor that records what it is sent and finishes nothing until told to."""

    def __init__(self, workers: int) -> None:
        self.workers, self.sent, self.ended = workers, [], False

    def submit(self, fn, path, job, *args):
        from concurrent.futures import Future

        fut: Future = Future()
        self.sent.append((job, fut))
        return fut

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.ended = True


def test_pool_runs_as_many_processes_as_chunks_in_flight_and_one_gland_chunk(tmp_path: Path, monkeypatch) -> None:
    """During inference the pool is made for ``workers`` processes (no spare one keeping a chunk's
    pages); finish() sends the rest to a pool of ``max_workers`` and ends the first; a gland chunk
    goes first, never more than one at once, while nuclei and tissue chunks fill the other places."""
    import wsi_mtl.postprocess._overlap as ov

    pools: list[_HeldPool] = []
    monkeypatch.setattr(ov, "_executor", lambda workers, niceness: pools.append(_HeldPool(workers)) or pools[-1])
    maps = _maps()
    store = _store(tmp_path, maps)
    grid = plan_tiles(SIZE, SIZE, core_px=CORE, margin_px=0, stride=16)
    for tile in grid.tiles():
        _write_tile(store, maps, tile)
    ex = OverlapExtractor(store.path, tmp_path / "spool", grid_shape=(grid.rows, grid.cols), core_px=CORE, pending=[],
                          workers=2, max_workers=3, params=PARAMS, **CHUNKS)
    groups = [j.group for j in ex.jobs]
    assert groups.count("glands") >= 2 and groups.count("nuclei") >= 3
    assert [p.workers for p in pools] == [2] and len(pools[0].sent) == 2
    assert [j.group for j, _ in pools[0].sent] == ["glands", "nuclei"]  # the longest first, then the plan's order

    def in_flight() -> list[str]:
        return [ex.jobs[i].group for i in ex._in_flight.values()]

    seen = []
    for _ in range(len(ex.jobs)):
        seen.append(in_flight())
        if len(seen) == 3:
            ex.finish()
            assert [p.workers for p in pools] == [2, 3] and pools[0].ended and not pools[1].ended
        pool = next(p for p in pools if any(not f.done() for _, f in p.sent))
        job, fut = next((j, f) for j, f in pool.sent if not f.done())
        fut.set_result((job.chunk, True))
    assert all(len(f) <= (2 if k < 3 else 3) and f.count("glands") <= 1 for k, f in enumerate(seen))
    assert any(f.count("glands") == 1 and len(f) > 1 for f in seen)  # a gland chunk beside others
    assert len(ex._done) == len(ex.jobs)
    ex._stopped = True
    ex._shutdown()
    assert all(p.ended for p in pools)


def _small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nuclei and tissue chunks of 128 px in both paths, so that a small slide has many and some are done
    during inference (gland chunks: ``postprocess={"gland_chunk_px": 128}``)."""
    import functools

    import wsi_mtl.postprocess as pp
    import wsi_mtl.postprocess._overlap as ov

    monkeypatch.setattr(pp, "extract_objects", functools.partial(pp.extract_objects, chunk_px=128, halo_px=8, max_halo_px=64))
    monkeypatch.setattr(ov, "OverlapExtractor", functools.partial(ov.OverlapExtractor, chunk_px=128, halo_px=8, max_halo_px=64))


def _table_key(result_dir: Path) -> list[tuple]:
    import pyarrow.parquet as pq

    table = pq.read_table(result_dir / "objects.parquet").drop_columns(["id"]).to_pydict()
    return sorted(zip(*(map(repr, v) for v in table.values())))


@pytest.mark.slow
def test_segment_with_and_without_overlap_writes_the_same_objects(he_image, tmp_path, monkeypatch):
    from wsi_mtl import synthetic
    from wsi_mtl.pipeline import segment_slide

    _small_chunks(monkeypatch)
    slide = synthetic.write_svs(tmp_path / "s.svs", he_image, mpp=0.25, compression="jpeg", tile=256, levels=(1, 4))
    common = {"tile_size": 128, "batch_size": 1, "progress": False, "precision": "fp32", "postprocess": {"gland_chunk_px": 128}}
    off = segment_slide(slide, tmp_path / "off", overlap=False, **common)
    on = segment_slide(slide, tmp_path / "on", **common)
    assert off.run["parameters"]["overlap"] is False
    record = on.run["parameters"]["overlap"]
    assert record["chunks"] > 4 and record["workers"] >= 1 and record["torch_threads"] >= 1
    # the network left one thread computes its branches on two (the same maps, so the same objects)
    from wsi_mtl.devices import cpu_count

    assert record["network_branches"] == (record["torch_threads"] == 1 and cpu_count() > 1)
    assert on.run["objects"] == off.run["objects"] and sum(on.run["objects"]["nuclei"].values()) > 0
    assert _table_key(on.result_dir) == _table_key(off.result_dir)
    assert not (on.result_dir / ".objects-spool").exists()
    # the network on every core, the post-processing at the lowest priority: the same objects
    monkeypatch.setenv("WSIMTL_OVERLAP_CORES", "share")
    shared = segment_slide(slide, tmp_path / "share", **common)
    assert shared.run["parameters"]["overlap"]["cores"] == "share" and record["cores"] == "split"
    assert shared.run["parameters"]["overlap"]["torch_threads"] >= record["torch_threads"]
    assert shared.run["parameters"]["overlap"]["network_branches"] is False
    assert _table_key(shared.result_dir) == _table_key(off.result_dir)
    monkeypatch.setenv("WSIMTL_OVERLAP_CORES", "both")
    with pytest.raises(InputError, match="WSIMTL_OVERLAP_CORES"):
        segment_slide(slide, tmp_path / "bad", **common)


@pytest.mark.slow
def test_run_cut_after_inference_resumes_and_derives_the_same_objects(he_image, tmp_path, monkeypatch):
    from wsi_mtl import synthetic
    from wsi_mtl.pipeline import segment_slide
    from wsi_mtl.store import PredictionStore

    _small_chunks(monkeypatch)
    slide = synthetic.write_svs(tmp_path / "s.svs", he_image[:512], mpp=0.25, compression="jpeg", tile=256, levels=(1, 4))
    common = {"tile_size": 128, "batch_size": 1, "progress": False, "precision": "fp32", "postprocess": {"gland_chunk_px": 128}}
    real = PredictionStore.finalize

    def killed(self, **_):
        raise KeyboardInterrupt

    monkeypatch.setattr(PredictionStore, "finalize", killed)
    with pytest.raises(KeyboardInterrupt):
        segment_slide(slide, tmp_path / "out", **common)
    result_dir = tmp_path / "out" / "s"
    assert (result_dir / "predictions.zarr.partial").is_dir() and not (result_dir / ".objects-spool").exists()
    monkeypatch.setattr(PredictionStore, "finalize", real)
    again = segment_slide(slide, tmp_path / "out", **common)
    assert again.run["tiles"]["resumed"] == again.run["tiles"]["with_tissue"]  # every tile came from the cut run
    # an uninterrupted run with the same settings: the same network threads, so the same maps (a
    # run without overlap gives the network every core, and fp32 sums in another order may move a
    # stored probability by one unit)
    reference = segment_slide(slide, tmp_path / "ref", **common)
    assert _table_key(again.result_dir) == _table_key(reference.result_dir)


@pytest.mark.slow
def test_sample_slide_objects_are_the_same_with_and_without_overlap(sample_segmented, tmp_path):
    """The real sample slide with the shipped model and default options (objects extracted while the
    network ran): re-deriving the same maps after inference gives exactly the same objects."""
    import shutil

    from wsi_mtl.derive import derive_objects
    from wsi_mtl.results import read_run

    on_dir = sample_segmented[0]
    on = read_run(on_dir)
    assert on["parameters"]["overlap"]["chunks"] >= 2
    assert sum(on["objects"]["nuclei"].values()) > 100
    off_dir = tmp_path / on_dir.name
    shutil.copytree(on_dir, off_dir)
    derive_objects(off_dir, workers=2)
    assert read_run(off_dir)["objects"] == on["objects"]
    assert _table_key(on_dir) == _table_key(off_dir)


def test_chunks_left_after_inference_survive_their_workers_being_killed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A worker killed (by the system's out-of-memory killer) while the chunks left after inference
    run: the chunks in flight run again and the objects are those extracted afterwards."""
    import os
    import signal

    from test_postprocess_pool import _grandchildren

    maps = _maps()
    store = _store(tmp_path, maps)
    grid = plan_tiles(SIZE, SIZE, core_px=CORE, margin_px=0, stride=16)
    tiles = list(grid.tiles())
    with OverlapExtractor(store.path, tmp_path / "spool", grid_shape=(grid.rows, grid.cols), core_px=CORE,
                          pending=[t.key for t in tiles], workers=1, params=PARAMS, **CHUNKS) as ex:
        for tile in tiles:  # written but never reported: every chunk is left for after inference
            _write_tile(store, maps, tile)
        final = store.finalize(before_rename=ex.drain)
        stream = iter(ex.objects(final, workers=2))
        batches = [next(stream)]
        for pid in _grandchildren():
            os.kill(pid, signal.SIGKILL)
        with caplog.at_level("WARNING", logger="wsi_mtl.postprocess._pool"):
            batches += list(stream)
    assert "a worker process died" in caplog.text
    assert [w for w in stream.warnings if w.startswith("a worker process died")]  # for run.json
    after = concat_batches(list(extract_objects(final, params=PARAMS, workers=1, **CHUNKS)))
    assert _key(concat_batches(batches)) == _key(after)


def test_a_chunk_that_raises_during_inference_gives_a_failed_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The overlapped run of a chunk that raises finishes it as failed (no objects, one line), as
    extraction after inference does, instead of leaving it to fail again after inference."""
    from wsi_mtl.postprocess import _extract as ex
    from wsi_mtl.postprocess._overlap import _attempts

    maps = _maps()
    store = _store(tmp_path, maps)
    final = store.finalize()
    meta = ex.read_meta(final)
    job = next(j for j in ex._plan_jobs(meta, ("nuclei",), chunk_px=128, halo_px=8, max_halo_px=64, params=PARAMS))

    def odd(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise ValueError("unexpected")

    monkeypatch.setattr(ex, "_attempt", odd)
    chunk, res = _attempts(ex._ZarrReader(str(final)), job, meta, PARAMS, None, 1.0)
    assert chunk == job.chunk and res == {"failed": ["the nuclei chunk at level-0 x 0-256, y 0-256 px: ValueError: unexpected"]}

"""Chunk pools: processes normally, threads in a daemonic process (a Dask worker), same objects."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely
from skimage.draw import disk

from test_postprocess_extract import write_predictions
from wsi_mtl.postprocess import concat_batches, extract_objects, label_to_3class
from wsi_mtl.errors import WorkerError
from wsi_mtl.postprocess import _pool
from wsi_mtl.postprocess._pool import _context, chunk_executor, ordered_results, pool_kind


def _nuclei_store(folder: Path) -> Path:
    """A nuclei map of 60 random disks, many across the 64-px chunk borders."""
    rng = np.random.default_rng(5)
    lab = np.zeros((256, 256), np.int32)
    for k in range(1, 61):
        lab[disk((rng.integers(8, 248), rng.integers(8, 248)), rng.integers(4, 9), shape=lab.shape)] = k
    return write_predictions(folder, {"Nuclei-INST": label_to_3class(lab)}, core_px=64)


def _objects(store: Path, workers: int) -> list[str]:
    batch = concat_batches(list(extract_objects(store, tasks=("nuclei",), chunk_px=64, halo_px=8, workers=workers)))
    return sorted(shapely.to_wkt(batch.geometry, rounding_precision=3).tolist())


def _in_daemon(store: str, out: str) -> None:
    """Daemonic child: what a Dask worker sees."""
    pool, kind = chunk_executor(2)
    pool.shutdown()
    result = {"kind": kind, "pool_kind": pool_kind(2), "threads": isinstance(pool, ThreadPoolExecutor), "objects": _objects(Path(store), 2)}
    Path(out).write_text(json.dumps(result))


def test_processes_here_and_in_process_for_one_worker() -> None:
    assert pool_kind(1) == "in-process" and pool_kind(2) == "processes"
    pool, kind = chunk_executor(2)
    with pool:
        assert kind == "processes" and isinstance(pool, ProcessPoolExecutor)
    with pytest.raises(ValueError, match="at least 1 worker"):
        chunk_executor(0)


def test_a_daemonic_process_extracts_on_threads_with_the_same_objects(tmp_path: Path) -> None:
    store = _nuclei_store(tmp_path / "pred")
    expected = _objects(store, 1)
    assert len(expected) > 30
    out = tmp_path / "daemon.json"
    child = mp.get_context("spawn").Process(target=_in_daemon, args=(str(store), str(out)), daemon=True)
    child.start()
    child.join()
    assert child.exitcode == 0
    got = json.loads(out.read_text())
    assert got["kind"] == got["pool_kind"] == "threads" and got["threads"]
    assert got["objects"] == expected
    assert _objects(store, 2) == expected  # and a process pool here


def _loaded_kernels() -> list[str]:
    """Compiled kernels of post-processing this process has loaded (its numba signatures)."""
    from wsi_mtl.postprocess import _compiled

    from wsi_mtl.export import _scanline

    loaded = [k for k, v in vars(_compiled).items() if getattr(v, "signatures", None)]
    return sorted(loaded + (["scanline fill"] if getattr(_scanline._KERNEL.compiled, "signatures", None) else []))


def test_workers_start_with_the_kernels_loaded_by_the_forkserver() -> None:
    """The pool's forkserver imports the warm-up: a worker's first task finds the neck-cutting,
    flooding, growth and polygon kernels already loaded, and the warm-up's maps give every kind
    of object."""
    from wsi_mtl.postprocess import _compiled, _pool, _warm

    if not _compiled.HAVE_NUMBA:
        pytest.skip("numba not installed or switched off (WSIMTL_NO_NUMBA=1): nothing to load")
    assert "wsi_mtl.postprocess._warm" in _pool.PRELOAD and "__main__" in _pool.PRELOAD
    if "forkserver" not in mp.get_all_start_methods():
        pytest.skip("no forkserver on this platform (spawn: every worker loads its own)")
    pool, _ = chunk_executor(2)
    with pool:
        loaded = pool.submit(_loaded_kernels).result()
    for kernel in ("_cut_at_peaks", "_flood_components", "_grow", "_open", "_ring_segments", "_type_votes", "_components",
                   "scanline fill"):
        assert kernel in loaded, kernel
    from wsi_mtl.postprocess import PostprocessParams, objects_from_maps

    batch = objects_from_maps(_warm.warm_maps(), slide_mpp=0.25, downsample=2.0, params=PostprocessParams(nuclei_split_h=0.75))
    tasks = set(np.asarray(batch.columns["task"]).tolist())
    assert {"nuclei", "gland", "lumen", "tissue"} <= tasks


def _reads_at_once() -> int:
    import zarr

    return int(zarr.config.get("async.concurrency"))


def test_chunk_workers_read_few_zarr_chunks_at_once() -> None:
    """Both pools' processes (export's chunk pool, segment's overlap pool) have zarr decode only
    READS_AT_ONCE chunks of a map at a time (each holds a compressed and a decoded chunk); this
    process keeps zarr's own setting."""
    from wsi_mtl.postprocess._overlap import _executor

    before = _reads_at_once()
    assert before != _pool.READS_AT_ONCE  # zarr's default
    for pool in (chunk_executor(2)[0], _executor(1, 0)):
        with pool:
            assert pool.submit(_reads_at_once).result() == _pool.READS_AT_ONCE
    assert _reads_at_once() == before


def _process_name() -> str:
    with open("/proc/self/comm") as f:
        return f.read().strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process names are set with Linux's prctl")
def test_worker_processes_are_named_by_what_they_do() -> None:
    """Every pool a slide starts names its processes (what ``top`` shows on a busy node): both chunk
    pools ``wsimtl-chunks``, the label image's ``wsimtl-labels``, the GeoJSON text's
    ``wsimtl-geojson``; this process keeps its name."""
    from wsi_mtl.export._geojson import _formatting_pool
    from wsi_mtl.postprocess._overlap import _executor

    mine = _process_name()
    for pool, name in ((chunk_executor(2)[0], "wsimtl-chunks"), (_executor(1, 0), "wsimtl-chunks"),
                       (_pool.single_executor("labels"), "wsimtl-labels"), (_formatting_pool(1), "wsimtl-geojson")):
        with pool:
            assert pool.submit(_process_name).result() == name
    assert _process_name() == mine


def test_a_gland_job_starts_on_a_heap_given_back_and_a_nuclei_job_reuses_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk worker keeps a chunk's freed pages for the next chunk (up to a bound); a gland job,
    the largest, starts after they were given back, so it does not stack on a nuclei chunk's pages."""
    from wsi_mtl.postprocess import _extract as ex

    calls: list[str] = []
    monkeypatch.setattr(ex, "release_freed_pages", lambda: calls.append("given back"))
    monkeypatch.setattr(ex, "_run_job", lambda reader, job, meta, params: calls.append(job.group) or {})
    store = write_predictions(tmp_path, {"Nuclei-INST": np.zeros((3, 64, 64), np.uint8), "Gland-INST": np.zeros((3, 64, 64), np.uint8)},
                              core_px=32)
    meta = ex.read_meta(store)
    params = ex.PostprocessParams()
    for job in ex._plan_jobs(meta, ("nuclei", "gland"), chunk_px=64, halo_px=None, max_halo_px=None, params=params):
        ex._worker(str(store), job, meta, params)
    assert calls == ["nuclei", "given back", "glands"]


# -- a worker process that dies (the system's out-of-memory killer) --------------------------------
def _square_or_die_once(marker: str, value: int) -> int:
    """value², except that job 3 kills its own process the first time it runs (``marker`` absent)."""
    if value == 3 and not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return value * value


def _square_or_die(value: int) -> int:
    if value == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return value * value


def _process_pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=workers, mp_context=_context())


class _CountingPool(ThreadPoolExecutor):
    """Threads that record the most jobs submitted and not yet taken back at once."""

    def __init__(self, workers: int, seen: list[int]) -> None:
        super().__init__(max_workers=workers)
        self.seen, self.open = seen, 0

    def submit(self, fn, *args):  # noqa: ANN001, ANN201
        self.open += 1
        self.seen.append(self.open)
        return super().submit(fn, *args)


@pytest.mark.parametrize(("ahead", "most"), [(2, 4), (1, 2)])
def test_ordered_results_keep_ahead_jobs_per_worker_in_flight(ahead: int, most: int) -> None:
    """At most ``ahead * workers`` jobs are in flight (GeoJSON's row groups: one per worker, their
    texts waiting in the caller's process)."""
    seen: list[int] = []
    pools: list[_CountingPool] = []

    def make(n: int) -> _CountingPool:
        pools.append(_CountingPool(n, seen))
        return pools[-1]

    got = []
    for value in ordered_results(make, pow, [(v, 2) for v in range(9)], workers=2, describe=str, ahead=ahead):
        pools[0].open -= 1  # yielded: no longer in flight
        got.append(value)
    assert got == [v * v for v in range(9)]
    assert max(seen) == most


def test_a_worker_killed_once_costs_only_a_rerun_of_the_jobs_in_flight(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    marker = tmp_path / "died"
    jobs = [(str(marker), v) for v in range(9)]
    with caplog.at_level("WARNING", logger="wsi_mtl.postprocess._pool"):
        got = list(ordered_results(_process_pool, _square_or_die_once, jobs, workers=2, describe=lambda i: f"job {i}"))
    assert marker.exists()  # job 3 did kill its worker
    assert got == [v * v for v in range(9)]
    assert "a worker process died" in caplog.text and "one at a time" in caplog.text


def test_a_job_that_kills_the_worker_it_runs_alone_on_is_named() -> None:
    got: list[int] = []
    with pytest.raises(WorkerError, match="job 3 killed the process that ran it alone"):
        for value in ordered_results(_process_pool, _square_or_die, [(v,) for v in range(7)], workers=2,
                                     describe=lambda i: f"job {i}"):
            got.append(value)
    assert got == [0, 1, 4]  # everything before it, in order


def _grandchildren() -> list[int]:
    """Processes whose parent is a child of this one (a forkserver's workers)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    children = {pid for pid, parent in parents.items() if parent == os.getpid()}
    return [pid for pid, parent in parents.items() if parent in children]


@pytest.mark.skipif(not Path("/proc").is_dir() or "forkserver" not in mp.get_all_start_methods(), reason="needs /proc and a forkserver (Linux)")
def test_chunks_survive_their_workers_being_killed_with_the_same_objects(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = _nuclei_store(tmp_path / "pred")
    expected = _objects(store, 1)
    stream = iter(extract_objects(store, tasks=("nuclei",), chunk_px=64, halo_px=8, workers=2))
    batches = [next(stream)]
    killed = _grandchildren()
    assert killed  # the pool's workers
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    with caplog.at_level("WARNING", logger="wsi_mtl.postprocess._pool"):
        batches += list(stream)
    assert "the nuclei chunk at level-0 x" in caplog.text  # the pool broke and its chunks ran again
    assert len(stream.warnings) == 1 and stream.warnings[0].startswith("a worker process died")  # for run.json
    assert sorted(shapely.to_wkt(concat_batches(batches).geometry, rounding_precision=3).tolist()) == expected


# -- a chunk that raises (a bug, or data no step expected) -----------------------------------------
def test_a_chunk_that_raises_loses_only_its_own_objects_with_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wsi_mtl.postprocess import _extract as ex

    store = _nuclei_store(tmp_path / "pred")
    full = concat_batches(list(extract_objects(store, tasks=("nuclei",), chunk_px=64, halo_px=8, workers=1)))
    original = ex._nuclei_chunk

    def odd(reader, chunk, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if chunk.own[:3:2] == (64, 128):
            raise ValueError("a polygon no step expected\nsecond line")
        return original(reader, chunk, *args, **kwargs)

    monkeypatch.setattr(ex, "_nuclei_chunk", odd)
    stream = extract_objects(store, tasks=("nuclei",), chunk_px=64, halo_px=8, workers=1)
    got = concat_batches(list(stream))
    owned = [(x0, y0) for x0, y0, _, _ in shapely.bounds(full.geometry)]
    lost = [64 <= y < 128 and 128 <= x < 192 for x, y in ((x / 2, y / 2) for x, y in owned)]  # level-0 -> map px (downsample 2)
    assert 0 < sum(lost) < len(full) and len(got) == len(full) - sum(lost)
    keep = set(shapely.to_wkt(full.geometry[~np.array(lost)], rounding_precision=3).tolist())
    assert set(shapely.to_wkt(got.geometry, rounding_precision=3).tolist()) == keep
    assert stream.warnings == ["no objects where post-processing failed: the nuclei chunk at level-0 x 256-384, y 128-256 px: "
                               "ValueError: a polygon no step expected"]


def test_most_chunks_failing_stops_the_slide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wsi_mtl.postprocess import _extract as ex

    store = _nuclei_store(tmp_path / "pred")

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise ZeroDivisionError("every chunk")

    monkeypatch.setattr(ex, "_nuclei_chunk", broken)
    with pytest.raises(RuntimeError, match=r"post-processing failed in 16 of 16 chunks, e\.g\. the nuclei chunk at level-0 x 0-128"):
        list(extract_objects(store, tasks=("nuclei",), chunk_px=64, halo_px=8, workers=1))


FORKSERVER = """
import multiprocessing.forkserver as fs
from wsi_mtl.postprocess._pool import chunk_executor, start_forkserver
started = start_forkserver()
pid = fs._forkserver._forkserver_pid
pool, _ = chunk_executor(1)
with pool:
    pool.submit(abs, -1).result()
print(started, pid is not None, fs._forkserver._forkserver_pid == pid)
"""


def test_the_forkserver_started_early_is_the_one_the_chunk_pools_use() -> None:
    """start_forkserver starts the server at once; a chunk pool made later forks from that one."""
    import subprocess
    import sys

    if "forkserver" not in mp.get_all_start_methods():
        pytest.skip("no forkserver on this platform (spawn)")
    out = subprocess.run([sys.executable, "-c", FORKSERVER], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True", "True"]


@pytest.mark.parametrize("args, started", [((), 1), (("--no-objects",), 0)])
def test_segment_starts_the_chunk_server_before_the_network_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, he_image,
                                                                  args: tuple[str, ...], started: int) -> None:
    """`segment` starts the chunk workers' forkserver before anything imports post-processing or
    torch (the checks of the settings and the model, the pipeline), where it will extract objects;
    then it moves what its imports created out of the garbage collector's passes (``gc.freeze``),
    before any work on the slide."""
    import gc

    from click.testing import CliRunner

    from wsi_mtl import pipeline, synthetic
    from wsi_mtl.cli import cli, segment as segment_command

    calls: list[str] = []
    monkeypatch.setattr(_pool, "start_forkserver", lambda: calls.append("server") or True)
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    check_model, check_settings = segment_command.check_model, segment_command._check_settings
    monkeypatch.setattr(segment_command, "check_model", lambda *a, **k: calls.append("model") or check_model(*a, **k))
    monkeypatch.setattr(segment_command, "_check_settings", lambda *a: calls.append("settings") or check_settings(*a))

    def segment_slide(*a, **k):  # noqa: ANN002, ANN003, ANN202
        calls.append("pipeline")
        raise SystemExit(0)

    monkeypatch.setattr(pipeline, "segment_slide", segment_slide)
    slide = synthetic.write_svs(tmp_path / "s.svs", he_image[:256, :256], mpp=0.5, compression="jpeg", tile=256, levels=(1,))
    CliRunner().invoke(cli, ["segment", str(slide), "-o", str(tmp_path / "out"), *args])
    # the second start (as the pipeline is loaded, for callers of load_pipeline) finds the server running
    assert calls == ["server"] * started + ["settings", "model"] + ["server"] * started + ["freeze", "pipeline"]


def test_a_forkserver_that_cannot_start_early_is_left_to_the_first_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """start_forkserver never raises: where the server cannot start (no process to be had) it says
    so and the first pool tries again (and reports what it finds)."""
    from multiprocessing import forkserver

    if "forkserver" not in mp.get_all_start_methods():
        pytest.skip("no forkserver on this platform (spawn)")

    def fail() -> None:
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(forkserver, "ensure_running", fail)
    assert _pool.start_forkserver() is False


def test_results_cross_processes_as_wkb_and_come_back_with_the_same_geometry(tmp_path: Path) -> None:
    import pickle

    from wsi_mtl.postprocess import _extract as ex

    store = _nuclei_store(tmp_path)
    meta = ex.read_meta(store)
    params = ex.PostprocessParams.from_mapping(meta.postprocess)
    job = ex._plan_jobs(meta, ("nuclei",), chunk_px=64, halo_px=8, max_halo_px=None, params=params)[5]
    here = ex._run_job(ex._ZarrReader(store), job, meta, params)
    sent = ex._worker(str(store), job, meta, params)  # what a pool process returns
    assert here["nuclei"]["geometry"].size > 0
    assert isinstance(sent["nuclei"]["geometry"], ex._Wkb)  # not one pickled shapely object per nucleus
    back = ex.unpacked(pickle.loads(pickle.dumps(sent)))
    assert shapely.to_wkb(back["nuclei"]["geometry"]).tolist() == shapely.to_wkb(here["nuclei"]["geometry"]).tolist()
    for name, column in here["nuclei"].items():
        if name != "geometry":
            np.testing.assert_array_equal(back["nuclei"][name], column)
    assert ex.unpacked(here)["nuclei"]["geometry"] is here["nuclei"]["geometry"]  # a result made here passes as it is
    # the batch keeps the bytes that crossed, and the table stores them: the same bytes as before
    batch = ex._to_batch(back["nuclei"], meta)
    assert batch.wkb is not None and batch.wkb.tolist() == shapely.to_wkb(batch.geometry).tolist()
    assert ex._to_batch(here["nuclei"], meta).wkb is None
    from wsi_mtl.export import write_table

    tables = [write_table([b], tmp_path / f"{k}.parquet", mpp=0.25) for k, b in enumerate((batch, ex._to_batch(here["nuclei"], meta)))]
    columns = [pq.read_table(t.path, columns=["geometry", "bbox"]) for t in tables]
    assert columns[0].equals(columns[1])


def test_object_ids_are_distinct_version_4_uuids() -> None:
    import uuid

    from wsi_mtl.objects import new_ids, uuid4_text

    ids = new_ids(20_000)
    assert ids.shape == (20_000,) and len(set(ids.tolist())) == 20_000
    parsed = [uuid.UUID(text) for text in ids[:2000]]
    assert all(u.version == 4 and u.variant == uuid.RFC_4122 and str(u) == text for u, text in zip(parsed, ids))
    assert new_ids(0).shape == (0,)
    raw = np.random.default_rng(3).integers(0, 256, size=(500, 16), dtype=np.uint8)
    assert uuid4_text(raw).tolist() == [str(uuid.UUID(bytes=r.tobytes(), version=4)) for r in raw]

"""Object extraction overlapped with inference: chunks are post-processed as soon as their tiles are written.

:class:`OverlapExtractor` plans the same chunks as :func:`~wsi_mtl.postprocess.extract_objects`
(same chunk size, halos and settings) over the store being written (``predictions.zarr.partial``).
The engine reports each finished tile (:meth:`OverlapExtractor.tile_done`); a chunk is sent to a
small pool once every tile its current read region touches is written (tiles without tissue are
never written and count as ready). A chunk whose halo must grow past what is written returns
"wait" and is sent again, at the halo it reached, when that larger region is ready. Each finished
chunk's result is spooled to a file of its own, so memory does not grow with the slide.

Once the network is done, :meth:`drain` waits for the chunks in flight (the store is then renamed
by the caller) and :meth:`objects` runs the chunks left over on the final store and streams every
chunk's objects in plan order through the same assembly as ``extract_objects``: the objects are
identical to a run that post-processes after inference. Nothing here is resumable: an interrupted
run re-derives the objects from the maps.

Memory: the pool has as many processes as chunks may be in flight (a spare process would keep the
pages of its last chunk), at most one of the chunks in flight is a gland chunk (sent first: the
longest job; one reads up to (gland_chunk_px + 2 * gland_max_halo_px)^2 model px, 8,192^2 and
~0.7 GB resident at the defaults; two at once beside the network's process would set the job's
peak), and the pool ends once the last chunk is done, before the exports.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import shutil
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mtl.malloc import release_if_larger
from wsi_mtl.postprocess import _extract as ex
from wsi_mtl.postprocess._chunks import Chunk
from wsi_mtl.postprocess._pool import _context, children_allowed, ordered_results, start_chunk_worker

__all__ = ["OverlapExtractor", "SPOOL_DIR"]

log = logging.getLogger(__name__)

#: folder (inside the result folder) of the spooled chunk results; removed when the objects are written
SPOOL_DIR = ".objects-spool"


@dataclass(frozen=True)
class _Readiness:
    """Which tiles (rows x cols of ``core_px`` model px) are written, and a job grid's model px per px."""

    ready: np.ndarray
    core_px: int

    def covers(self, region: tuple[int, int, int, int], scale: float) -> bool:
        """Whether every tile under ``region`` (y0, y1, x0, x1 on a grid of ``scale`` model px per px) is written."""
        return bool(self.ready[_tiles_under(region, scale, self.core_px)].all())


def _tiles_under(region: tuple[int, int, int, int], scale: float, core_px: int) -> tuple[slice, slice]:
    """The tile rows and columns under ``region`` (y0, y1, x0, x1 on a grid of ``scale`` model px per px)."""
    y0, y1, x0, x1 = region
    r0, r1 = int(y0 * scale) // core_px, math.ceil(y1 * scale / core_px)
    c0, c1 = int(x0 * scale) // core_px, math.ceil(x1 * scale / core_px)
    return slice(r0, r1), slice(c0, c1)


_READERS: dict[str, Any] = {}


def _reader(path: str) -> Any:
    reader = _READERS.get(path)
    if reader is None:
        reader = _READERS[path] = ex._ZarrReader(path)
    return reader


def _attempts(reader: Any, job: Any, meta: Any, params: Any, readiness: _Readiness | None, scale: float) -> tuple[Any, dict | None]:
    """:func:`_extract._run_job` stopped before a read region that is not written yet: (chunk, result or None)."""
    chunk = job.chunk
    try:
        if job.group == "tissue":
            return job.chunk, ex._tissue_chunk(reader, job.chunk, meta, params)
        while readiness is None or readiness.covers(chunk.read, scale):
            res = ex._attempt(reader, job, chunk, meta, params)
            if not isinstance(res, Chunk):
                return chunk, res
            chunk = res
    except Exception as exc:  # noqa: BLE001 - one chunk must not end the slide (see _extract.failed_result)
        return chunk, ex.failed_result(job, exc, meta, params)
    return chunk, None


def _run_spooled(path: str, job: Any, meta: Any, params: Any, readiness: _Readiness | None, scale: float,
                 spool: str) -> tuple[Any, bool]:
    """Run one job as far as the written tiles allow; a finished result is pickled to ``spool``.

    Returns the chunk reached (its halo) and whether the job finished.
    """
    if _IN_POOL_PROCESS:  # threads share this process's heap: left as it is
        ex.heap_for(job)
    try:
        chunk, res = _attempts(_reader(path), job, meta, params, readiness, scale)
    finally:
        if _IN_POOL_PROCESS:  # on a thread (a Dask worker's) the memory is the network's: kept for the slide
            release_if_larger()
    if res is None:
        return chunk, False
    tmp = f"{spool}.tmp"
    with open(tmp, "wb") as fh:
        pickle.dump(ex.packed(res), fh, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, spool)
    return chunk, True


#: Whether this is a process of the overlap pool (set by :func:`_start_worker`): only such a process
#: gives back after each chunk what the chunk freed, past a bound (:func:`~wsi_mtl.malloc.release_if_larger`).
#: Where chunks run on threads (a daemonic process) they share the process the network runs in,
#: whose freed pages ``segment`` keeps for the slide (:func:`~wsi_mtl.malloc.pages_kept`).
_IN_POOL_PROCESS = False


def _start_worker(niceness: int) -> None:
    """Pool processes yield to the network's threads when both want a core, and reuse the pages a
    chunk frees within that chunk, in small pages, reading few zarr chunks at once
    (:func:`~wsi_mtl.postprocess._pool.start_chunk_worker`)."""
    global _IN_POOL_PROCESS
    _IN_POOL_PROCESS = True
    start_chunk_worker()
    try:
        os.nice(niceness)
    except OSError:  # pragma: no cover - not permitted
        pass


def _executor(workers: int, niceness: int) -> Executor:
    if not children_allowed():  # a daemonic process (Dask worker): threads
        return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wsimtl-overlap")
    return ProcessPoolExecutor(max_workers=workers, mp_context=_context(), initializer=_start_worker, initargs=(niceness,))


class OverlapExtractor:
    """Post-processes the chunks of a store while the engine is still writing it (see the module notes).

    Parameters
    ----------
    predictions_path : path
        The store being written (its attributes, heads and tissue mask already in place).
    spool_dir : path
        Folder for the chunk results (emptied first, removed by :meth:`close`).
    grid_shape : (rows, cols)
        The tile grid; ``core_px`` is a tile core's side in model px.
    pending : iterable of (row, col)
        Tiles that will be written (all other tiles are written already or never).
    workers : int
        Chunks in flight at once while the network runs (processes; threads in a daemonic process).
    max_workers : int, optional
        Chunks in flight at once once the network is done (:meth:`finish`; default ``workers``).
    params, tasks, tissue_mask, chunk_px, halo_px, max_halo_px
        As in :func:`~wsi_mtl.postprocess.extract_objects`.
    niceness : int
        Added to the pool processes' nice value (19: they run only on cores the network leaves idle).
    """

    def __init__(self, predictions_path: str | Path, spool_dir: str | Path, *, grid_shape: tuple[int, int], core_px: int,
                 pending: Iterable[tuple[int, int]], workers: int = 1, params: Any = None, tasks: Iterable[str] | None = None,
                 tissue_mask: bool = True, chunk_px: int = 2048, halo_px: int | None = None,
                 max_halo_px: int | None = None, niceness: int = 5, max_workers: int | None = None) -> None:
        meta = ex.read_meta(predictions_path)
        if not tissue_mask:
            meta = replace(meta, mask_downsample=None)
        self.meta = meta
        self.params = params or ex.PostprocessParams.from_mapping(meta.postprocess)
        self.tasks = ex._check_tasks(ex._available_tasks(meta) if tasks is None else tasks, meta)
        self.jobs = ex._plan_jobs(meta, self.tasks, chunk_px=chunk_px, halo_px=halo_px, max_halo_px=max_halo_px,
                                 params=self.params)
        self.path = str(predictions_path)
        self._paths = {self.path}  # readers cached by path in a thread pool: dropped by close()
        self.spool = Path(spool_dir)
        shutil.rmtree(self.spool, ignore_errors=True)
        self.spool.mkdir(parents=True)
        self.workers = max(1, int(workers))
        self._max_workers = max(self.workers, int(max_workers or 0))  # processes start on demand
        ready = np.ones(grid_shape, bool)
        for r, c in pending:
            ready[r, c] = False
        self._ready = ready
        self._core_px = int(core_px)
        self._chunks = [j.chunk for j in self.jobs]  # the halo each job has reached
        self._waiting = list(range(len(self.jobs)))
        self._done: set[int] = set()
        self._in_flight: dict[Future, int] = {}
        self._lock = threading.RLock()  # a future done before add_done_callback calls back at once
        self._idle = threading.Condition(self._lock)
        self._stopped = False
        self._error: BaseException | None = None
        # as many processes as chunks in flight: a pool of more would start a spare process while a
        # chunk's callback sends the next, and an idle process keeps the pages its last chunk freed
        self._pool: Executor | None = _executor(self.workers, niceness)
        self._retired: list[Executor] = []  # the pool of inference time once finish() replaced it
        self._overlapped: int | None = None  # chunks done when the network finished
        self._notes: list[str] = []  # what went wrong and was survived, for run.json's warnings
        with self._lock:
            self._schedule()

    @property
    def chunks_overlapped(self) -> int:
        """Chunks done while the network ran (before :meth:`finish`)."""
        with self._lock:
            return len(self._done) if self._overlapped is None else self._overlapped

    def tiles_before_work(self, order: Iterable[tuple[int, int]]) -> int:
        """How many tiles of ``order`` (keys in the order the engine writes them, as in a run from
        scratch; tiles not in it count as written) are written before the first chunk can run."""
        position = np.full(self._ready.shape, -1, np.int64)
        for i, key in enumerate(order):
            position[key] = i
        needs = [int(position[_tiles_under(job.chunk.read, self._scale(job), self._core_px)].max(initial=-1)) for job in self.jobs]
        return min(needs) + 1 if needs else 0

    # -- while the network runs ------------------------------------------------------------------
    def _scale(self, job: Any) -> float:
        return ex.job_scale(job, self.meta, self.params)

    def _readiness(self) -> _Readiness:
        return _Readiness(self._ready.copy(), self._core_px)

    def _schedule(self) -> None:
        """Send waiting jobs whose read region is written (lock held), at most ``workers`` in flight
        and one of them a gland job; gland jobs first (the longest: the others run beside them)."""
        if self._stopped or self._pool is None or self._error is not None:
            return
        readiness = None
        glands = any(self.jobs[i].group == "glands" for i in self._in_flight.values())
        for i in sorted(self._waiting, key=lambda i: self.jobs[i].group != "glands"):  # the longest first
            if len(self._in_flight) >= self.workers:
                return
            if glands and self.jobs[i].group == "glands":
                continue  # one gland chunk at a time (see the module notes)
            job = replace(self.jobs[i], chunk=self._chunks[i])
            readiness = readiness or self._readiness()
            if not readiness.covers(job.chunk.read, self._scale(job)):
                continue
            glands = glands or job.group == "glands"
            self._waiting.remove(i)
            fut = self._pool.submit(_run_spooled, self.path, job, self.meta, self.params, readiness, self._scale(job),
                                    str(self._part(i)))
            self._in_flight[fut] = i
            fut.add_done_callback(self._finished)

    def _part(self, i: int) -> Path:
        return self.spool / f"{i:06d}.pkl"

    def _finished(self, fut: Future) -> None:
        with self._lock:
            i = self._in_flight.pop(fut)
            try:
                chunk, done = fut.result()
            except BaseException as exc:  # noqa: BLE001 - re-raised by objects(); the chunk is redone there
                self._error = self._error or exc
                self._waiting.append(i)
            else:
                self._chunks[i] = chunk
                if done:
                    self._done.add(i)
                else:
                    self._waiting.append(i)
                    self._waiting.sort()
            try:
                self._schedule()
            except Exception as exc:  # noqa: BLE001 - e.g. a broken pool: drain() stops waiting, objects() redoes the chunks
                self._error = self._error or exc
            self._idle.notify_all()

    def tile_done(self, key: tuple[int, int]) -> None:
        """The engine wrote tile ``key`` (row, col) and recorded it: send the chunks it completes.

        Never raises (the network goes on): a failure stops the overlap and is reported by :meth:`drain`.
        """
        with self._lock:
            self._ready[key] = True
            try:
                self._schedule()
            except Exception as exc:  # noqa: BLE001 - e.g. a broken pool; the chunks run after inference
                self._error = self._error or exc

    def finish(self) -> None:
        """The network is done (every tile written or never to be): run the chunks left on the store
        as it is, up to ``max_workers`` at once, without waiting (:meth:`drain` waits)."""
        with self._lock:
            self._overlapped = len(self._done)
            self._ready[...] = True
            try:
                self._widen()
                self._schedule()
            except Exception as exc:  # noqa: BLE001 - as in tile_done
                self._error = self._error or exc

    def _widen(self) -> None:
        """Run on ``max_workers`` processes from now on where that is more (lock held): a new pool, at
        normal priority; the old one ends once its chunks in flight are done (:meth:`drain` waits)."""
        if self._pool is None or self._max_workers == self.workers:
            return
        old, self._pool = self._pool, _executor(self._max_workers, 0)
        self.workers = self._max_workers
        old.shutdown(wait=False)
        self._retired.append(old)

    def drain(self, *, stop: bool = True) -> None:
        """Wait for the chunks in flight (after :meth:`finish`: for every chunk, unless one failed);
        with ``stop``, send nothing more (before the store is renamed)."""
        with self._lock:
            finishing = self._overlapped is not None
            self._stopped = self._stopped or (stop and not finishing)
            while self._in_flight or (finishing and self._waiting and self._error is None and not self._stopped):
                self._idle.wait()
            self._stopped = self._stopped or stop
        if self._error is not None and not self._notes:  # said once (drain runs before the rename and again after)
            self._notes.append(f"overlapped post-processing failed ({str(self._error).strip()}): its chunks were redone after inference")
            log.warning(self._notes[-1])

    # -- after the network -----------------------------------------------------------------------
    def objects(self, predictions_path: str | Path, *, workers: int | None = None) -> ex.ObjectStream:
        """Every chunk's objects in plan order; chunks not finished run now on ``predictions_path``
        with ``workers`` processes (default: as many as during inference)."""
        self.drain()
        left = [i for i in range(len(self.jobs)) if i not in self._done]
        if not left or workers and workers != self.workers or self._error is not None:
            self._shutdown()  # idle processes keep the pages of their last chunk: gone before the exports
            self.workers = max(1, int(workers or self.workers))
            self._pool = _executor(self.workers, 0) if left else None
        log.info("post-processing: %d of %d chunks done during inference, %d after it on the store as written, %d left",
                 self.chunks_overlapped, len(self.jobs), len(self._done) - self.chunks_overlapped, len(left))
        path = str(predictions_path)
        self._paths.add(path)
        def assemble(warnings: list[str]) -> Iterator[ex.ObjectBatch]:
            warnings.extend(self._notes)
            return ex._assemble(self._results(path, left, warnings), self.meta, self.params, warnings)

        return ex.ObjectStream(assemble)

    def _results(self, path: str, left: list[int], notes: list[str] | None = None) -> Iterator[dict[str, Any]]:
        """Every job's result in plan order: the spooled ones, and ``left`` run now on ``path``
        (a worker that dies is survived as :func:`~wsi_mtl.postprocess._pool.ordered_results` says)."""
        jobs = [replace(self.jobs[i], chunk=self._chunks[i]) for i in left]
        def make_pool(workers: int) -> Executor:
            """The running pool first (from then on ordered_results shuts it down); after a worker died, a new one."""
            pool, self._pool = self._pool, None
            return pool or _executor(workers, 0)

        runs = ordered_results(make_pool, _run_spooled, [(path, job, self.meta, self.params, None, 1.0, str(self._part(i)))
                                                        for i, job in zip(left, jobs)],
                               workers=self.workers, describe=lambda k: ex.describe_job(jobs[k], self.meta, self.params), notes=notes)
        todo = set(left)
        try:
            for i in range(len(self.jobs)):
                if i in todo:
                    next(runs)
                part = self._part(i)
                with open(part, "rb") as fh:
                    res = pickle.load(fh)
                part.unlink()
                yield res
        finally:
            runs.close()

    def close(self) -> None:
        """Stop the pool and remove the spooled results."""
        with self._lock:
            self._stopped = True
        self._shutdown(cancel=True)
        for path in self._paths:  # a thread pool's readers live in this process
            _READERS.pop(path, None)
        shutil.rmtree(self.spool, ignore_errors=True)

    def _shutdown(self, *, cancel: bool = False) -> None:
        """End the pool (and the one :meth:`_widen` replaced), waiting for their processes."""
        pools, self._retired = [*self._retired, *([self._pool] if self._pool is not None else [])], []
        self._pool = None
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=cancel)

    def __enter__(self) -> OverlapExtractor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

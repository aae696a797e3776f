"""How post-processing runs in parallel: a process pool where this process may start children.

A daemonic process (a Dask worker under its nanny, a ``multiprocessing`` pool worker) may not
start child processes; there the chunks run on threads instead (scikit-image, SciPy and shapely
release the GIL for most of their work). The kind chosen is recorded in run.json
(``parameters.postprocess_pool``).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Literal

from wsi_mtl.errors import WorkerError
from wsi_mtl.malloc import chunk_worker_pages, small_numpy_pages

__all__ = ["PoolKind", "children_allowed", "pool_kind", "chunk_executor", "single_executor", "start_forkserver", "ordered_results",
           "start_chunk_worker", "few_reads_at_once", "READS_AT_ONCE", "name_process"]

log = logging.getLogger(__name__)

PoolKind = Literal["in-process", "processes", "threads"]


def children_allowed() -> bool:
    """Whether this process may start child processes (a daemonic one may not)."""
    return not mp.current_process().daemon


def pool_kind(workers: int) -> PoolKind:
    """How ``workers`` chunk workers run here: ``in-process`` (1), ``processes`` or ``threads``."""
    if workers <= 1:
        return "in-process"
    return "processes" if children_allowed() else "threads"


def chunk_executor(workers: int) -> tuple[Executor, PoolKind]:
    """A pool of ``workers`` processes (one runs jobs again after a pool broke, see
    :func:`ordered_results`), or of threads where this process is daemonic.

    Processes start by ``forkserver`` where the platform has it (else ``spawn``): never ``fork``,
    which copies the threads' locks of a busy parent (reader threads, a Dask worker's loop); they
    reuse the pages a chunk frees within that chunk, take numpy's arrays in small pages and read
    few zarr chunks at once (:func:`start_chunk_worker`).
    """
    if workers < 1:
        raise ValueError(f"a chunk pool needs at least 1 worker; got {workers}")
    if not children_allowed():
        return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wsimtl-chunks"), "threads"
    return ProcessPoolExecutor(max_workers=workers, mp_context=_context(), initializer=start_chunk_worker), "processes"


def name_process(role: str) -> None:
    """Name this process ``wsimtl-<role>`` (Linux: the name ``top``, ``ps -o comm`` and ``pgrep``
    show, at most 15 characters), so that a slide's worker processes can be told apart on a busy
    node: ``wsimtl-chunks`` (objects from chunks of the maps), ``wsimtl-labels`` (label images),
    ``wsimtl-geojson`` (GeoJSON text). Call it in the process's main thread; elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).prctl(_PR_SET_NAME, f"wsimtl-{role}"[:15].encode(), 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - no prctl
        pass


_PR_SET_NAME = 15  # prctl option


def start_chunk_worker() -> None:
    """A chunk pool's process: the pages and the map reads of a process that post-processes chunks
    (:func:`~wsi_mtl.malloc.chunk_worker_pages`, :func:`few_reads_at_once`), named ``wsimtl-chunks``."""
    chunk_worker_pages()
    few_reads_at_once()
    name_process("chunks")


#: zarr chunks a chunk worker reads at once (zarr's ``async.concurrency``, 10 by default), see
#: :func:`few_reads_at_once`
READS_AT_ONCE = 2


def few_reads_at_once() -> None:
    """Have zarr read at most :data:`READS_AT_ONCE` chunks of a map at once in this process (a chunk
    pool's worker): each read holds a compressed and a decoded zarr chunk until it is copied into the
    region. One interior gland chunk of a 32,768^2 px mosaic at its largest read (8,192^2 px): numpy's
    high-water 556 MB with zarr's default against 467 MB, resident 811 against 698 MB."""
    import zarr

    zarr.config.set({"async.concurrency": READS_AT_ONCE})


def single_executor(role: str) -> Executor:
    """One worker beside this process (a step that runs while this process does another): a
    process named ``wsimtl-<role>`` where this process may start children (numpy's arrays in small
    pages there, see :func:`~wsi_mtl.malloc.small_numpy_pages`), else a thread."""
    if not children_allowed():
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"wsimtl-{role}")
    return ProcessPoolExecutor(max_workers=1, mp_context=_context(), initializer=_start_helper, initargs=(role,))


def _start_helper(role: str) -> None:
    small_numpy_pages()
    name_process(role)


def ordered_results(make_pool: Callable[[int], Executor], fn: Callable[..., Any], jobs: Sequence[tuple], *, workers: int,
                    describe: Callable[[int], str], notes: list[str] | None = None, ahead: int = 2) -> Iterator[Any]:
    """``fn(*jobs[i])`` for every job, yielded in job order, at most ``ahead * workers`` in flight on
    ``make_pool(workers)`` (the results done before their turn wait in this process).

    A worker process that dies (killed by the system, most often for lack of memory) breaks its
    pool. The jobs not yet yielded then run again, in order, on a pool of one process with one job
    at a time: less memory at once, and a job that kills that lone worker is known. That job raises
    :class:`~wsi_mtl.errors.WorkerError` naming it (``describe(i)``), as does a pool that keeps
    breaking before it runs anything. Each restart is logged and, with ``notes``, appended to it
    (run.json ``warnings``).
    """
    pool, limit = make_pool(workers), max(1, ahead) * max(1, workers)
    pending: deque[tuple[int, Future]] = deque()
    nxt, restarts = 0, 0
    try:
        while nxt < len(jobs) or pending:
            try:
                while nxt < len(jobs) and len(pending) < limit:
                    pending.append((nxt, pool.submit(fn, *jobs[nxt])))
                    nxt += 1
                result = pending[0][1].result()
            except BrokenProcessPool as exc:
                i = pending[0][0] if pending else nxt
                ran_alone = limit == 1 and bool(pending) and pending[0][1].done()
                restarts += 1
                if ran_alone:
                    raise WorkerError(f"{describe(i)} killed the process that ran it alone (out of memory?)") from exc
                if restarts > _MAX_RESTARTS:
                    raise WorkerError(f"worker processes keep dying (killed by the system, out of memory?) before {describe(i)}") from exc
                note = (f"a worker process died (killed by the system, out of memory?): {describe(i)} and the jobs "
                        "after it ran again, one at a time")
                log.warning(note)
                if notes is not None:
                    notes.append(note)
                pool.shutdown(wait=True, cancel_futures=True)
                pool, limit, nxt = make_pool(1), 1, i
                pending.clear()
                continue
            pending.popleft()
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


#: pools :func:`ordered_results` starts again before it gives up, where none ran a job alone and died
_MAX_RESTARTS = 3


#: modules the forkserver imports before it forks a worker: multiprocessing's default (the main
#: module), post-processing with its compiled kernels loaded (:mod:`._warm`) and the label images
PRELOAD = ("__main__", "wsi_mtl.postprocess._warm", "wsi_mtl.export._labels")


def start_forkserver() -> bool:
    """Start the forkserver of :func:`_context` now, where chunk pools will fork their processes
    from one: its imports and warm-up (~1.2-1.6 CPU s) then run while this process still loads
    (``segment`` starts it before importing torch, on a core otherwise idle). Returns whether one
    is running; one that cannot start now is left to the first pool (which reports it)."""
    if not children_allowed() or "forkserver" not in mp.get_all_start_methods():
        return False
    _context()
    from multiprocessing import forkserver

    try:
        forkserver.ensure_running()
    except (OSError, ValueError) as exc:  # no process to be had now (limits, descriptors)
        log.debug("forkserver not started early: %s", exc)
        return False
    return True


def _context() -> mp.context.BaseContext:
    """``forkserver`` where the platform has it, else ``spawn`` (never ``fork``, see :func:`chunk_executor`).

    The forkserver, started by the first pool, imports :data:`PRELOAD` once; each worker forked
    from it starts with those imports and kernels instead of loading them itself (~1.7 CPU s per
    worker on the benchmark machine). A forkserver already running keeps what it has."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))
    return context

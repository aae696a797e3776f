"""How post-processing runs in parallel: a process pool where this process may start children.

A daemonic process (a Dask worker under its nanny, a ``multiprocessing`` pool worker) may not
start child processes; there the chunks run on threads instead (scikit-image, SciPy and shapely
release the GIL for most of their work). The kind chosen is recorded in run.json
(``parameters.postprocess_pool``).
"""

from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Literal

from wsi_mtl.malloc import keep_freed_pages

__all__ = ["PoolKind", "children_allowed", "pool_kind", "chunk_executor", "single_executor"]

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
    """A pool of ``workers`` (>= 2) processes, or of threads where this process is daemonic.

    Processes start by ``forkserver`` where the platform has it (else ``spawn``): never ``fork``,
    which copies the threads' locks of a busy parent (reader threads, a Dask worker's loop); they
    reuse the pages a chunk frees within that chunk (:func:`~wsi_mtl.malloc.keep_freed_pages`).
    """
    if workers < 2:
        raise ValueError(f"a chunk pool needs at least 2 workers; got {workers}")
    if pool_kind(workers) == "threads":
        return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wsimtl-chunks"), "threads"
    return ProcessPoolExecutor(max_workers=workers, mp_context=_context(), initializer=keep_freed_pages), "processes"


def single_executor() -> Executor:
    """One worker beside this process (a step that runs while this process does another): a
    process where this process may start children, else a thread."""
    if not children_allowed():
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="wsimtl-background")
    return ProcessPoolExecutor(max_workers=1, mp_context=_context())


#: modules the forkserver imports before it forks a worker: multiprocessing's default (the main
#: module), post-processing with its compiled kernels loaded (:mod:`._warm`) and the label images
PRELOAD = ("__main__", "wsi_mtl.postprocess._warm", "wsi_mtl.export._labels")


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

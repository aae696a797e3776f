"""glibc malloc settings for wsimtl's processes.

Fewer arenas for a process that runs the network beside other threads (:func:`limit_arenas`): glibc
gives each thread that allocates concurrently an arena of its own (up to 8 per core), and memory
freed into an arena stays with it. In ``segment`` the network's threads (more of them while
post-processing has no work yet, see :mod:`wsi_mtl.pipeline`), the slide readers and the store
writer each fill arenas, and the process keeps the sum: on a 16,384^2 px mosaic the inference
plateau was 1.75-1.94 GB with the default arenas and 1.6-1.7 GB with two, at the same speed
(``benchmarks/bench_end_to_end.py``); with the network's second branch thread (``model.predict``'s
helper) the peak was 1.77-1.85 GB with two and 1.67-1.68 GB with one, again at the same speed.

Freed pages kept by a process that only post-processes chunks (:func:`keep_freed_pages`): by default
every array above 32 MB is mapped afresh and unmapped when freed, so each of a chunk's many
temporary arrays faults in new zeroed pages; a chunk worker that keeps them reuses its own pages
within a chunk, and gives them back after it where it is resident above :data:`CHUNK_WORKER_KEEP`
(:func:`release_if_larger`; below, the next chunk reuses them). The network's process
keeps them from tile to tile, and gives them back only once it has grown past its working set
(:func:`release_if_grown`).

Small pages for numpy's arrays (:func:`small_numpy_pages`) in ``segment``'s process and the processes
it starts: numpy asks for 2 MB pages for every array of 4 MB or more, and these processes allocate
and free many such arrays; on this project's machine that cost more kernel time than it saved.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["limit_arenas", "ARENAS", "keep_freed_pages", "small_numpy_pages", "chunk_worker_pages", "release_freed_pages",
           "release_if_grown", "release_if_larger", "pages_kept", "CHUNK_WORKER_KEEP", "HEAP_ARRAY_MAX", "NETWORK_TOP_KEEP",
           "NETWORK_GROWTH_MAX"]

#: arenas allowed (``mallopt(M_ARENA_MAX)``) unless ``$MALLOC_ARENA_MAX`` says otherwise
ARENAS = 1
#: the largest block a chunk worker takes from its heap (``mallopt(M_MMAP_THRESHOLD)``) after
#: :func:`keep_freed_pages`; larger ones are still mapped on their own
HEAP_ARRAY_MAX = 1 << 30
#: free memory at the top of the network's process's heap above which it is given back (``mallopt(M_TRIM_THRESHOLD)``)
NETWORK_TOP_KEEP = 128 << 20
#: growth of the network's process past its size after a tile following the last give-back above
#: which :func:`release_if_grown` gives the kept pages back
NETWORK_GROWTH_MAX = 256 << 20
#: resident size up to which a chunk worker keeps the pages a chunk freed for the next chunk
#: (:func:`release_if_larger`)
CHUNK_WORKER_KEEP = 768 << 20
_M_ARENA_MAX, _M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD = -8, -3, -1  # glibc's mallopt parameter numbers
_done: list[bool] = []
_kept: list[bool] = []
_working_set: list[int] = []  # resident bytes after the first tile since the last give-back


@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library, loaded once per process (``OSError`` where it cannot be)."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Allow at most ``arenas`` malloc arenas in this process (arenas made before stay).

    Once per process; nothing where ``$MALLOC_ARENA_MAX`` is set (the user's choice) or where the C
    library is not glibc. Returns whether the limit was set by this call.
    """
    if _done or "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return False
    _done.append(True)
    try:
        return bool(_libc().mallopt(_M_ARENA_MAX, int(arenas)))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def small_numpy_pages() -> bool:
    """Stop numpy asking for 2 MB pages (``madvise(MADV_HUGEPAGE)``, which it does for every array
    of 4 MB or more) in this process; nothing where ``$NUMPY_MADVISE_HUGEPAGE`` is set (the user's
    choice). Returns whether they were asked for until this call.

    ``segment``'s process, its chunk workers (:func:`chunk_worker_pages`) and the process writing the
    nuclei label image: their many large temporary arrays (a chunk's, a tile's) had the kernel
    find, zero and later split 2 MB pages. ``segment`` of the 16,384^2 px mosaic, 3 alternating
    pairs each: the chunk workers alone in small pages took 16.6-17.7 CPU s against 22.1-24.1 (in
    the kernel 3.8-3.9 against 7.8-10.3); then every process in small pages against the workers
    alone: ``segment``'s process 47.8-48.3 against 49.7-52.7 CPU s (kernel 4.0-4.6 against
    6.7-7.0), the label image's 2.1-2.3 against 2.3-2.8, wall 37.7-38.7 against 39.0-42.3 s.
    """
    if "NUMPY_MADVISE_HUGEPAGE" in os.environ:
        return False
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    setter = getattr(multiarray, "_set_madvise_hugepage", None)
    return bool(setter is not None and setter(False))


def chunk_worker_pages() -> None:
    """The memory settings of a process that post-processes chunks (a pool initializer):
    :func:`limit_arenas`, :func:`keep_freed_pages` and :func:`small_numpy_pages`.

    One arena: a chunk's maps are read by zarr's threads, whose own arena would map each array
    larger than its 64 MB heaps afresh and keep the rest apart from the main heap. ``segment`` of the
    16,384^2 px mosaic, 3 alternating pairs: all processes' sampled peak 3.46-3.55 GB against
    3.74-3.81 GB with the default arenas, the workers' CPU time the same (15.7-17.4 against
    16.3-17.1 s); alone, the mosaic's gland and lumen step faulted in 255-278k pages against 470-478k.
    """
    limit_arenas()
    keep_freed_pages()
    small_numpy_pages()


def keep_freed_pages(top_keep: int = 2**31 - 1) -> bool:
    """Serve arrays up to :data:`HEAP_ARRAY_MAX` from the heap and give freed memory back only
    where more than ``top_keep`` bytes lie free at its top, or when :func:`release_freed_pages`
    says so (the default: never by itself).

    Chunk and overlap pool workers (which release after each chunk): a chunk's later arrays reuse
    the pages its earlier ones freed instead of faulting in fresh zeroed ones; on the 16,384^2 px
    mosaic's maps the gland and lumen step took ~15% less CPU time (~25% never releasing, but an
    idle worker then holds its peak). The network's process, with :data:`NETWORK_TOP_KEEP`: a
    tile's activations reuse the last tile's pages (the bare network on that mosaic ~14% faster).
    Once per process; nothing where ``$MALLOC_MMAP_THRESHOLD_`` or ``$MALLOC_TRIM_THRESHOLD_`` is
    set (the user's choice) or where the C library is not glibc. Returns whether it was set by this call.
    """
    if _kept or {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ) or not sys.platform.startswith("linux"):
        return False
    try:
        libc = _libc()
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, HEAP_ARRAY_MAX)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, int(top_keep)))
    except (OSError, AttributeError):  # not glibc
        ok = False
    _kept.append(ok)
    return ok


def release_freed_pages() -> None:
    """Give the memory freed since the last call back to the system (``malloc_trim``), where
    :func:`keep_freed_pages` was set in this process (elsewhere nothing); the next tile measures the
    working set of :func:`release_if_grown` anew (it faults its pages back in)."""
    _working_set.clear()
    if _kept and _kept[0]:
        _libc().malloc_trim(0)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_if_grown(limit: int = NETWORK_GROWTH_MAX) -> bool:
    """After a tile: give the kept pages back (:func:`release_freed_pages`) where the process has
    grown more than ``limit`` bytes since the first tile after the last give-back, elsewhere nothing.

    A heap that keeps a tile's freed pages for the next tile also keeps the pieces no later tile
    fits into: on a 16,384^2 px mosaic the network's process grew ~0.4 GB over 23 tiles. Giving
    everything back after every tile cost 7-9% of inference time; giving it back only past this
    growth bounds the process at its working set plus ``limit``. Returns whether it gave back.
    """
    if not (_kept and _kept[0]):
        return False
    rss = _resident_bytes()
    if not _working_set:
        _working_set.append(rss)
        return False
    if rss - _working_set[0] <= limit:
        return False
    release_freed_pages()
    return True


def release_if_larger(limit: int = CHUNK_WORKER_KEEP) -> bool:
    """After a chunk: give the kept pages back (:func:`release_freed_pages`) where the process is
    resident above ``limit`` bytes, elsewhere keep them for the next chunk. Returns whether it gave back.

    The overlap pool's workers: a nuclei chunk's working set (0.43-0.63 GB resident on the
    16,384^2 px mosaic, bounded by the chunk size) stays for the next chunk instead of being faulted
    in again; a gland chunk's (0.78-1.27 GB) goes back. ``segment`` of that mosaic, 3 alternating
    pairs against giving back after every chunk: the workers 15.5-16.7 against 16.6-17.5 CPU s
    (kernel 2.2-2.5 against 3.7-3.9), all processes' sampled peak 3.78-3.82 against 3.68-3.72 GB
    (never giving back: 14.3-15.9 CPU s, 4.19-4.36 GB). The chunk pool's workers (``export``) on
    that mosaic's maps, 3 pairs: 16.2-17.0 against 16.8-18.4 CPU s, peak 2.75-2.87 against 2.74-2.76 GB.
    """
    if not (_kept and _kept[0]):
        return False
    if _resident_bytes() <= limit:
        return False
    release_freed_pages()
    return True


@contextmanager
def pages_kept(top_keep: int = 2**31 - 1) -> Iterator[None]:
    """:func:`keep_freed_pages` for the block (or each call of a function it decorates), and what it
    kept given back after it (a batch runs slide after slide in one process)."""
    keep_freed_pages(top_keep)
    try:
        yield
    finally:
        release_freed_pages()

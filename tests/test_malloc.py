"""The malloc arena limit: set once per process, never over the user's $MALLOC_ARENA_MAX."""

from __future__ import annotations

import subprocess
import sys

import pytest

CODE = "from wsi_mtl.malloc import limit_arenas; print(limit_arenas(), limit_arenas())"


def _run(env_extra: dict[str, str]) -> str:
    import os

    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | env_extra
    return subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_arena_limit_is_set_once_and_leaves_the_users_setting_alone() -> None:
    assert _run({}) == "True False"  # glibc accepts it; a second call does nothing
    assert _run({"MALLOC_ARENA_MAX": "4"}) == "False False"


RESIDENT = """
import numpy as np

def resident_mb():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 2**20
"""

KEEP = RESIDENT + """
from wsi_mtl.malloc import keep_freed_pages, release_freed_pages

first, again = keep_freed_pages(), keep_freed_pages()
a = np.ones(200 * 2**20, np.uint8)  # 200 MB, touched
before = resident_mb()
del a
kept = resident_mb()
release_freed_pages()
print(first, again, round(before - kept), round(before - resident_mb()))
"""


def _printed(code: str, env_extra: dict[str, str]) -> list[str]:
    """What ``code`` prints in a fresh interpreter, without the user's malloc tuning unless given."""
    import os

    drop = {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"}
    env = {k: v for k, v in os.environ.items() if k not in drop} | env_extra
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_chunk_workers_keep_freed_pages_unless_the_user_set_malloc() -> None:
    """With the setting a freed 200 MB array stays resident for reuse (by default glibc unmaps it
    at once) until the chunk's end releases it; set once per process; the user's
    $MALLOC_MMAP_THRESHOLD_ wins."""
    first, again, freed, released = _printed(KEEP, {})
    assert (first, again) == ("True", "False")
    assert int(freed) < 20 and int(released) > 180
    first, again, freed, released = _printed(KEEP, {"MALLOC_MMAP_THRESHOLD_": "131072"})
    assert (first, again) == ("False", "False")
    assert int(freed) > 180  # glibc's own behaviour: mapped alone, returned when freed


BLOCK = RESIDENT + """
from wsi_mtl.malloc import pages_kept

with pages_kept(128 << 20):
    a = np.ones(100 * 2**20, np.uint8)
    before = resident_mb()
    del a
    kept = resident_mb()
print(round(before - kept), round(before - resident_mb()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_pages_kept_holds_freed_memory_for_the_block_only() -> None:
    """segment's setting: a freed 100 MB array stays in the heap during the slide (less than the
    128 MB that may lie free at its top; by default glibc unmaps it at once) and goes back after."""
    freed, released = _printed(BLOCK, {})
    assert int(freed) < 20 and int(released) > 90


GROWN = RESIDENT + """
from wsi_mtl import malloc

unset = malloc.release_if_grown(50 << 20)  # pages not kept in this process: nothing to give back
malloc.keep_freed_pages()
first = malloc.release_if_grown(50 << 20)  # after the first tile: the working set
small = np.ones(20 * 2**20, np.uint8)
del small
under = malloc.release_if_grown(50 << 20)  # grown 20 MB: kept for the next tile
big = np.ones(100 * 2**20, np.uint8)
del big
before = resident_mb()
over = malloc.release_if_grown(50 << 20)  # grown past 50 MB: given back
after = resident_mb()
again = malloc.release_if_grown(50 << 20)  # the next tile sets the working set anew
print(unset, first, under, over, again, round(before - after))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_the_network_process_gives_kept_pages_back_only_past_a_growth() -> None:
    """A process keeping freed pages gives them back after a tile only once it has grown more than
    the limit past its working set; then the next tile's size is the working set."""
    *flags, released = _printed(GROWN, {})
    assert flags == ["False", "False", "False", "True", "False"]
    assert int(released) > 90


SMALL = """
from wsi_mtl.malloc import small_numpy_pages
print(small_numpy_pages(), small_numpy_pages())
"""


def test_small_numpy_pages_turns_numpys_2mb_pages_off_unless_the_user_chose() -> None:
    """The first call turns numpy's huge-page advice off (it was on), the second finds it off; the
    user's $NUMPY_MADVISE_HUGEPAGE wins."""
    assert _printed(SMALL, {}) == ["True", "False"]
    assert _printed(SMALL, {"NUMPY_MADVISE_HUGEPAGE": "1"}) == ["False", "False"]


def _huge_pages_asked() -> bool:
    """Whether numpy asks for 2 MB pages in this process (left as it was)."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    was = multiarray._set_madvise_hugepage(False)
    multiarray._set_madvise_hugepage(was)
    return bool(was)


def _worker_memory() -> tuple[bool, bool]:
    """In a pool process: whether numpy asks for 2 MB pages there, and whether its arenas were limited."""
    from wsi_mtl import malloc

    return _huge_pages_asked(), bool(malloc._done)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_chunk_overlap_and_background_workers_take_small_pages() -> None:
    """The pools that post-process chunks start their processes with numpy's huge pages off and one
    malloc arena; the background process (label image) with the huge pages off."""
    import os

    from wsi_mtl.postprocess._overlap import _executor
    from wsi_mtl.postprocess._pool import chunk_executor, single_executor

    if {"NUMPY_MADVISE_HUGEPAGE", "MALLOC_ARENA_MAX"} & set(os.environ):
        pytest.skip("$NUMPY_MADVISE_HUGEPAGE or $MALLOC_ARENA_MAX is set: the user's choice is kept")
    pool, kind = chunk_executor(1)
    with pool:
        assert kind == "processes"
        assert pool.submit(_worker_memory).result() == (False, True)
    with _executor(1, 0) as pool:
        assert pool.submit(_worker_memory).result() == (False, True)
    with single_executor("labels") as pool:
        assert pool.submit(_huge_pages_asked).result() is False


LARGER = RESIDENT + """
from wsi_mtl import malloc

unset = malloc.release_if_larger(0)  # pages not kept in this process: nothing to give back
malloc.keep_freed_pages()
a = np.ones(100 * 2**20, np.uint8)
del a
before = resident_mb()
under = malloc.release_if_larger(int(before + 50) << 20)  # resident below the bound: kept
kept = resident_mb()
over = malloc.release_if_larger(int(before - 50) << 20)  # above it: given back
print(unset, under, over, round(before - kept), round(before - resident_mb()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_a_chunk_worker_keeps_freed_pages_only_up_to_a_resident_size() -> None:
    """After a chunk, a worker resident below the bound keeps the 100 MB a chunk freed for the next
    chunk; above it, gives it back."""
    unset, under, over, kept, released = _printed(LARGER, {})
    assert (unset, under, over) == ("False", "False", "True")
    assert int(kept) < 10 and int(released) > 90

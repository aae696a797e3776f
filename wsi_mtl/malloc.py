"""Fewer glibc malloc arenas for a process that runs the network beside other threads.

glibc gives each thread that allocates concurrently an arena of its own (up to 8 per core), and
memory freed into an arena stays with it. In ``segment`` the network's threads (more of them while
post-processing has no work yet, see :mod:`wsi_mtl.pipeline`), the slide readers and the store
writer each fill arenas, and the process keeps the sum: on a 16,384^2 px mosaic the inference
plateau was 1.75-1.94 GB with the default arenas and 1.6-1.7 GB with two, at the same speed
(``benchmarks/bench_end_to_end.py``). Large arrays are unaffected (they are mapped on their own).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["limit_arenas", "ARENAS"]

#: arenas allowed (``mallopt(M_ARENA_MAX)``) unless ``$MALLOC_ARENA_MAX`` says otherwise
ARENAS = 2
_M_ARENA_MAX = -8  # glibc's mallopt parameter number
_done: list[bool] = []


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Allow at most ``arenas`` malloc arenas in this process (arenas made before stay).

    Once per process; nothing where ``$MALLOC_ARENA_MAX`` is set (the user's choice) or where the C
    library is not glibc. Returns whether the limit was set by this call.
    """
    if _done or "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return False
    _done.append(True)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_ARENA_MAX, int(arenas)))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False

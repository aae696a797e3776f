"""Whether wsimtl's compiled (numba) kernels may be used: the one rule every kernel module follows."""

from __future__ import annotations

import importlib.util
import os

__all__ = ["numba_allowed"]


def numba_allowed() -> bool:
    """numba is installed and not switched off by the environment variable ``WSIMTL_NO_NUMBA=1``
    (numba itself is imported only when a kernel is first used)."""
    try:
        return importlib.util.find_spec("numba") is not None and os.environ.get("WSIMTL_NO_NUMBA", "") in ("", "0")
    except (ImportError, ValueError):
        return False

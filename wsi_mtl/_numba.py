"""Whether wsimtl's compiled (numba) kernels may be used: the one rule every kernel module follows."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

__all__ = ["numba_allowed", "jit_kernel", "LazyKernel"]


def numba_allowed() -> bool:
    """numba is installed and not switched off by the environment variable ``WSIMTL_NO_NUMBA=1``
    (numba itself is imported only when a kernel is first used)."""
    try:
        return importlib.util.find_spec("numba") is not None and os.environ.get("WSIMTL_NO_NUMBA", "") in ("", "0")
    except (ImportError, ValueError):
        return False


def jit_kernel(namespace: dict[str, Any], name: str, *helpers: str) -> Any:
    """``numba.njit(cache=True, nogil=True)`` of ``namespace[name]`` (a module's globals), the
    ``helpers`` it calls compiled first (where no other kernel of the module did) and put in their
    place; False where numba is not allowed or cannot be imported (so a caller keeps the answer
    and asks once)."""
    if not numba_allowed():
        return False
    try:
        import numba
    except ImportError:  # found but broken
        return False
    jit = numba.njit(cache=True, nogil=True)
    for helper in helpers:
        if not hasattr(namespace[helper], "py_func"):  # not compiled yet by another kernel of the module
            namespace[helper] = jit(namespace[helper])
    return jit(namespace[name])


class LazyKernel:
    """A module's plain-Python kernel compiled by :func:`jit_kernel` on the first :meth:`get` and
    kept: ``compiled`` is None until then, False where numba is not to be had."""

    def __init__(self, namespace: dict[str, Any], name: str, *helpers: str) -> None:
        self._args = (namespace, name, helpers)
        self.compiled: Any = None

    def get(self) -> Any:
        """The compiled kernel (compiled, or loaded from numba's cache, now if not yet); None without numba."""
        if self.compiled is None:
            namespace, name, helpers = self._args
            self.compiled = jit_kernel(namespace, name, *helpers)
        return self.compiled or None

"""Atomic outputs: write under a temporary name in the same folder, then rename into place.

An interrupted run never leaves a file that looks finished: a final name appears only once its
content is complete. Disk-full and permission errors become :class:`~wsi_mtl.errors.OutputError`
with a one-line message naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import OutputError

__all__ = ["atomic_path", "write_json_atomic", "output_error"]

log = logging.getLogger(__name__)

_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DENIED = {errno.EACCES, errno.EPERM}


def output_error(exc: OSError, path: str | os.PathLike[str]) -> OutputError | None:
    """Translate an ``OSError`` met while writing ``path`` into an :class:`OutputError`.

    Parameters
    ----------
    exc : OSError
        The error raised by the operating system.
    path : path-like
        The output the user asked for (not the temporary name).

    Returns
    -------
    OutputError or None
        A one-line error for a full disk, a denied permission or a read-only file system;
        ``None`` for any other error (the caller re-raises it unchanged).
    """
    if exc.errno in _DISK_FULL:
        return OutputError(f"disk full while writing {path}; free space and run the same command again")
    if exc.errno in _DENIED:
        return OutputError(f"cannot write {path}: permission denied")
    if exc.errno == errno.EROFS:
        return OutputError(f"cannot write {path}: read-only file system")
    return None


def _remove(path: Path) -> None:
    """Remove a temporary file or folder, ignoring one that was never created."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:  # pragma: no cover - cleanup must never mask the original error
        log.warning("could not remove temporary output %s: %s", path, exc)


def _fsync_file(path: Path) -> None:
    """Flush a finished regular file to disk before it is renamed."""
    if not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str], *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``final`` that is renamed to ``final`` on success.

    The temporary name is ``.<name>.partial-<pid>`` in the same folder, so the rename is atomic
    on one file system. On any exception the temporary file (or folder) is removed and no final
    file appears; an existing ``final`` is left untouched.

    Parameters
    ----------
    final : path-like
        Where the finished output must appear. Its folder must exist.
    fsync : bool, default True
        Flush a regular file to disk before the rename, so that a crash never leaves an empty
        file under the final name.

    Yields
    ------
    tmp : Path
        Where to write.

    Raises
    ------
    OutputError
        The disk is full, or the folder is not writable (permission denied, read-only).

    Examples
    --------
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> with atomic_path(folder / "a.txt") as tmp:
    ...     _ = tmp.write_text("done")
    >>> (folder / "a.txt").read_text()
    'done'
    """
    final = Path(final)
    tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
    _remove(tmp)  # a leftover of this pid from an earlier, killed run
    try:
        yield tmp
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, final)
    except OSError as exc:
        _remove(tmp)
        mapped = output_error(exc, final)
        if mapped is None:
            raise
        raise mapped from exc
    except BaseException:
        _remove(tmp)
        raise


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (temporary file, fsync, rename).

    Parameters
    ----------
    path : path-like
        The final JSON file.
    obj : object
        Anything :func:`json.dumps` accepts; NaN and infinities are written as ``null``.
    indent : int, default 2
        Indentation of the written document.

    Raises
    ------
    OutputError
        The disk is full or the folder is not writable.
    """
    text = json.dumps(_finite(obj), indent=indent, allow_nan=False) + "\n"
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)


def _finite(obj: Any) -> Any:
    """Replace non-finite floats (anywhere in nested dicts and lists) with ``None``."""
    if hasattr(obj, "item") and hasattr(obj, "dtype") and getattr(obj, "ndim", None) == 0:
        obj = obj.item()  # numpy scalar
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj

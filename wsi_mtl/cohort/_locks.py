"""Lock files that several processes, jobs or hosts can share on one (network) file system.

A lock is a file created with ``os.open(O_CREAT | O_EXCL)``: exactly one creator wins. Its content
names the owner (host, pid, SLURM job id, a random token); its modification time is the heartbeat,
refreshed by a background thread. A lock whose heartbeat is older than ``stale_after_s`` belongs to
a process that died. Reclaimers take turns through a guard file (itself an exclusive create),
re-check under it that the lock is still stale, delete it and then create their own with an
exclusive create, so a fresh lock is never removed and exactly one process wins.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from ..errors import InputError, OutputError

__all__ = ["LockFile", "read_owner", "lock_owner"]

log = logging.getLogger(__name__)


def lock_owner() -> dict[str, Any]:
    """Describe this process as a lock owner.

    Returns
    -------
    dict
        ``host``, ``pid`` and ``job`` (the SLURM job id, array job and task where present, else None).
    """
    job = os.environ.get("SLURM_JOB_ID")
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        job = f"{array}_{task}"
    return {"host": socket.gethostname(), "pid": os.getpid(), "job": job}


def read_owner(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Read the owner record of a lock file.

    Parameters
    ----------
    path : path-like
        The lock file.

    Returns
    -------
    dict or None
        The owner (``host``, ``pid``, ``job``, ``token``, ``created``); None when the file is gone or
        not yet (or no longer) readable as an owner record.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _validate_times(stale_after_s: float, heartbeat_s: float | None) -> None:
    """Check that a heartbeat refreshes a lock well before it could be judged stale."""
    if not stale_after_s > 0:
        raise InputError(f"lock timeout must be positive, got {stale_after_s} s")
    if heartbeat_s is not None and not 0 < heartbeat_s <= stale_after_s / 2:
        raise InputError(
            f"lock heartbeat {heartbeat_s} s must be positive and at most half the lock timeout "
            f"({stale_after_s} s), or a live lock could be judged stale"
        )


#: a takeover guard older than this was left by a reclaimer that died
_GUARD_STALE_S = 60.0


class LockFile:
    """An exclusive lock held by creating a file, kept alive by a heartbeat.

    Parameters
    ----------
    path : path-like
        The lock file; its folder is created when missing.
    stale_after_s : float
        A lock whose modification time is older than this many seconds is stale and may be taken over.
    heartbeat_s : float or None
        While held, a background thread refreshes the modification time this often. None: no
        heartbeat (for locks held a short moment only). Must be at most half of ``stale_after_s``.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "a.lock"
    >>> first, second = LockFile(path), LockFile(path)
    >>> first.acquire(), second.acquire()
    (True, False)
    >>> first.release()
    >>> second.acquire()
    True
    >>> second.release()
    """

    def __init__(self, path: str | os.PathLike[str], *, stale_after_s: float = 600.0, heartbeat_s: float | None = 60.0) -> None:
        _validate_times(stale_after_s, heartbeat_s)
        self.path = Path(path)
        self.stale_after_s = float(stale_after_s)
        self.heartbeat_s = heartbeat_s
        self.token: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- state -------------------------------------------------------------------------------
    @property
    def held(self) -> bool:
        """Whether this object holds the lock (acquired, not released, not lost)."""
        return self.token is not None and not self.lost

    def is_stale(self) -> bool:
        """Whether the lock file exists and its heartbeat is older than ``stale_after_s``."""
        try:
            return time.time() - self.path.stat().st_mtime > self.stale_after_s
        except FileNotFoundError:
            return False

    # -- acquire / release -------------------------------------------------------------------
    def acquire(self) -> bool:
        """Try once to take the lock, taking over a stale one; never waits.

        Returns
        -------
        bool
            True when this object now holds the lock; False when a live owner holds it.
        """
        if self.token is not None:
            raise RuntimeError(f"lock {self.path} is already held by this object")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create the lock folder {self.path.parent}: {exc.strerror}") from exc
        if self._create():
            return True
        if self._take_over_stale():
            return self._create()
        return False

    def acquire_wait(self, *, poll_s: float = 0.05) -> None:
        """Take the lock, waiting for the current owner to release it (or for it to become stale).

        Parameters
        ----------
        poll_s : float
            Seconds between attempts.
        """
        while not self.acquire():
            time.sleep(poll_s)

    def release(self) -> None:
        """Stop the heartbeat and delete the lock file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.token is not None and not self.lost and self._still_ours():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self.token = None
        self.lost = False

    def __enter__(self) -> LockFile:
        self.acquire_wait()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    # -- internals ---------------------------------------------------------------------------
    def _create(self) -> bool:
        """Create the lock file exclusively and write the owner record; False if it exists."""
        token = uuid.uuid4().hex
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise OutputError(f"cannot create the lock file {self.path}: {exc.strerror}") from exc
        record = {**lock_owner(), "token": token, "created": time.time()}
        try:
            os.write(fd, json.dumps(record).encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        self.token = token
        self.lost = False
        log.debug("acquired %s", self.path)
        if self.heartbeat_s is not None:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._beat, name=f"heartbeat {self.path.name}", daemon=True)
            self._thread.start()
        return True

    def reclaim_from_dead_owner(self) -> bool:
        """Remove the lock if its owner is a process of this host that no longer exists (a pool
        worker killed by the system), under the same guard as a stale one; True when removed.

        Only for a caller that has seen its own worker die: a process of another PID namespace on
        a host of the same name would look dead too."""
        return self._take_over_stale(dead_owner=True)

    def _take_over_stale(self, *, dead_owner: bool = False) -> bool:
        """Remove the lock file if it is stale; True when the caller should try to create it.

        Reclaimers serialise on a guard file (``<lock>.takeover``, exclusive create) and re-check
        staleness while holding it, so a lock that another process has just created or renewed is
        never removed; creating the new lock afterwards is an exclusive create, so of all the
        processes that try, exactly one wins. A guard left by a reclaimer that died is removed
        once it is older than a minute.
        """
        if not self._is_stale_now(dead_owner):
            return not self.path.exists()
        guard = self.path.with_name(self.path.name + ".takeover")
        try:
            os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - guard.stat().st_mtime > _GUARD_STALE_S:
                    guard.unlink()
            return False
        try:
            if not self._is_stale_now(dead_owner):
                return not self.path.exists()
            judged = read_owner(self.path)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            log.warning("took over the stale lock %s (owner %s)", self.path, judged)
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                guard.unlink()

    def _is_stale_now(self, dead_owner: bool = False) -> bool:
        """Whether the lock file exists and its heartbeat is older than ``stale_after_s`` (with
        ``dead_owner``: or its owner is a process of this host that no longer exists)."""
        try:
            if time.time() - self.path.stat().st_mtime > self.stale_after_s:
                return True
        except FileNotFoundError:
            return False
        return dead_owner and _owner_died_here(read_owner(self.path))

    def _still_ours(self) -> bool:
        """Whether the lock file exists and carries this object's token."""
        owner = read_owner(self.path)
        return owner is not None and owner.get("token") == self.token

    def _beat(self) -> None:
        """Refresh the heartbeat until released; notice (and log) a lock taken away from us."""
        assert self.heartbeat_s is not None
        while not self._stop.wait(self.heartbeat_s):
            if not self._still_ours():
                self.lost = True
                log.error("lock %s was taken over by another process; its heartbeat stopped for too long", self.path)
                return
            try:
                os.utime(self.path)
            except FileNotFoundError:
                self.lost = True
                log.error("lock %s disappeared while held", self.path)
                return
            except OSError as exc:  # a transient network file system error: try again next beat
                if exc.errno not in (errno.ESTALE, errno.EIO, errno.EAGAIN):
                    log.warning("cannot refresh lock %s: %s", self.path, exc)


def _owner_died_here(owner: dict[str, Any] | None) -> bool:
    """Whether ``owner`` (see :func:`read_owner`) is a process of this host that no longer exists."""
    if not owner or owner.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except (KeyError, TypeError, ValueError, OSError):  # no pid, or one we may not signal: alive
        return False
    return False

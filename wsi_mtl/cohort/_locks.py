"""Lock files that several processes, jobs or hosts can share on one (network) file system.

A lock is a file created with ``os.open(O_CREAT | O_EXCL)``: exactly one creator wins. Its content
names the owner (host, pid, SLURM job id, a random token); its modification time is the heartbeat,
refreshed by a background thread. A lock whose heartbeat is older than ``stale_after_s`` belongs to
a process that died; another process takes it over by renaming it to a unique name (only one
rename of a given file can succeed), checking that what it renamed is the stale lock it judged,
deleting it and creating its own.
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

    def _take_over_stale(self) -> bool:
        """Remove the lock file if it is stale; True when this process removed it.

        The file is renamed to a name unique to this attempt: of several processes that judged it
        stale, one rename succeeds. The winner checks that the renamed file is the one it judged
        (same inode, same owner token, still old); if another process replaced the lock in the
        meantime, the fresh lock is linked back (a link never overwrites) and the takeover fails.
        """
        try:
            before = self.path.stat()
        except FileNotFoundError:
            return True  # released meanwhile: try to create it
        if time.time() - before.st_mtime <= self.stale_after_s:
            return False
        judged = read_owner(self.path)
        aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False  # another process took it over first
        try:
            after = aside.stat()
            same = (after.st_ino, after.st_dev) == (before.st_ino, before.st_dev) and read_owner(aside) == judged
            if same and time.time() - after.st_mtime > self.stale_after_s:
                log.warning("took over the stale lock %s (owner %s)", self.path, judged)
                return True
            log.debug("%s was replaced while judged stale; putting it back", self.path)
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                aside.unlink()

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

"""Lock files: exclusive creation, heartbeat, stale takeover, racing takeovers."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
from pathlib import Path

import pytest

from wsi_mtl.cohort import LockFile, lock_owner, read_owner
from wsi_mtl.errors import InputError, OutputError


def _age(path: Path, seconds: float) -> None:
    """Set a file's modification time ``seconds`` into the past."""
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_exclusive_create_and_owner_record(tmp_path: Path) -> None:
    path = tmp_path / "locks" / "a.lock"
    first, second = LockFile(path, heartbeat_s=None), LockFile(path, heartbeat_s=None)
    assert first.acquire()
    assert first.held
    assert not second.acquire()
    owner = read_owner(path)
    assert owner is not None
    assert owner["pid"] == os.getpid() and owner["host"] == lock_owner()["host"]
    assert owner["token"] == first.token
    first.release()
    assert not path.exists()
    assert second.acquire()
    second.release()


def test_acquire_twice_by_one_object_is_a_bug(tmp_path: Path) -> None:
    lock = LockFile(tmp_path / "a.lock", heartbeat_s=None)
    assert lock.acquire()
    with pytest.raises(RuntimeError, match="already held"):
        lock.acquire()
    lock.release()


def test_owner_names_the_slurm_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    assert lock_owner()["job"] == "77"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "70")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert lock_owner()["job"] == "70_3"


def test_read_owner_of_missing_or_garbage_file(tmp_path: Path) -> None:
    assert read_owner(tmp_path / "none.lock") is None
    (tmp_path / "bad.lock").write_text("not json")
    assert read_owner(tmp_path / "bad.lock") is None
    (tmp_path / "list.lock").write_text("[1]")
    assert read_owner(tmp_path / "list.lock") is None


def test_heartbeat_refreshes_mtime_so_the_lock_never_goes_stale(tmp_path: Path) -> None:
    path = tmp_path / "a.lock"
    lock = LockFile(path, stale_after_s=1.0, heartbeat_s=0.05)
    assert lock.acquire()
    _age(path, 100)
    for _ in range(400):  # wait for a beat
        if time.time() - path.stat().st_mtime < 50:
            break
        time.sleep(0.02)
    assert time.time() - path.stat().st_mtime < 50
    assert not LockFile(path, stale_after_s=1.0, heartbeat_s=None).acquire()
    lock.release()
    assert not path.exists()


def test_heartbeat_notices_a_lock_taken_away(tmp_path: Path) -> None:
    path = tmp_path / "a.lock"
    lock = LockFile(path, stale_after_s=1.0, heartbeat_s=0.05)
    assert lock.acquire()
    path.write_text(json.dumps({"token": "someone else"}))
    for _ in range(400):
        if lock.lost:
            break
        time.sleep(0.02)
    assert lock.lost and not lock.held
    lock.release()
    assert read_owner(path) == {"token": "someone else"}  # not ours: left alone


def test_stale_lock_is_taken_over_and_a_live_one_is_not(tmp_path: Path) -> None:
    path = tmp_path / "a.lock"
    dead = LockFile(path, stale_after_s=60, heartbeat_s=None)
    assert dead.acquire()
    dead_token = dead.token
    _age(path, 30)
    assert not LockFile(path, stale_after_s=60, heartbeat_s=None).acquire()  # 30 s old: alive
    _age(path, 120)
    taker = LockFile(path, stale_after_s=60, heartbeat_s=None)
    assert taker.is_stale()
    assert taker.acquire()
    assert read_owner(path)["token"] == taker.token != dead_token
    assert [p.name for p in tmp_path.iterdir()] == ["a.lock"]  # the renamed stale lock is gone
    dead.release()  # the dead owner coming back must not delete the new owner's lock
    assert read_owner(path)["token"] == taker.token
    taker.release()


def test_lock_replaced_after_being_judged_stale_is_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lock replaced between the staleness check and the takeover is not removed."""
    path = tmp_path / "a.lock"
    path.write_text(json.dumps({"token": "dead"}))
    _age(path, 120)
    fresh = LockFile(path, stale_after_s=60, heartbeat_s=None)
    real_open = os.open
    replaced = []

    def open_after_replacement(file, flags, *args):
        if str(file).endswith(".takeover") and not replaced:
            # another process takes the stale lock over and creates its own before our guard
            replaced.append(True)
            Path(path).unlink()
            assert fresh.acquire()
        return real_open(file, flags, *args)

    monkeypatch.setattr(os, "open", open_after_replacement)
    late = LockFile(path, stale_after_s=60, heartbeat_s=None)
    assert not late.acquire()
    monkeypatch.setattr(os, "open", real_open)
    assert replaced and read_owner(path)["token"] == fresh.token
    assert [p.name for p in tmp_path.iterdir()] == ["a.lock"]
    fresh.release()


def test_guard_left_by_a_dead_reclaimer_is_cleared(tmp_path: Path) -> None:
    path = tmp_path / "a.lock"
    path.write_text(json.dumps({"token": "dead"}))
    _age(path, 120)
    guard = tmp_path / "a.lock.takeover"
    guard.write_text("")
    lock = LockFile(path, stale_after_s=60, heartbeat_s=None)
    assert not lock.acquire()  # a live-looking guard: someone else is taking over
    _age(guard, 120)
    assert not lock.acquire()  # the old guard is cleared ...
    assert lock.acquire()  # ... and the next attempt takes the stale lock over
    lock.release()


def _race(path: Path, barrier: threading.Barrier, wins: list[str]) -> None:
    lock = LockFile(path, stale_after_s=60, heartbeat_s=None)
    barrier.wait()
    if lock.acquire():
        wins.append(lock.token or "")


def test_racing_reclaimers_threads_exactly_one_wins(tmp_path: Path) -> None:
    for attempt in range(20):
        path = tmp_path / f"a{attempt}.lock"
        path.write_text(json.dumps({"token": "dead"}))
        _age(path, 120)
        barrier, wins = threading.Barrier(6), []
        threads = [threading.Thread(target=_race, args=(path, barrier, wins)) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1
        assert read_owner(path)["token"] == wins[0]


def _race_process(path: str, barrier: multiprocessing.synchronize.Barrier, wins: multiprocessing.queues.Queue) -> None:
    lock = LockFile(path, stale_after_s=60, heartbeat_s=None)
    barrier.wait()
    wins.put(lock.token if lock.acquire() else None)


def test_racing_reclaimers_processes_exactly_one_wins(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    for attempt in range(5):
        path = tmp_path / f"a{attempt}.lock"
        path.write_text(json.dumps({"token": "dead"}))
        _age(path, 120)
        barrier, wins = context.Barrier(4), context.Queue()
        procs = [context.Process(target=_race_process, args=(str(path), barrier, wins)) for _ in range(4)]
        for p in procs:
            p.start()
        results = [wins.get() for _ in procs]
        for p in procs:
            p.join()
        winners = [r for r in results if r is not None]
        assert len(winners) == 1
        assert read_owner(path)["token"] == winners[0]


def test_context_manager_waits_for_release(tmp_path: Path) -> None:
    path = tmp_path / "a.lock"
    holder = LockFile(path, heartbeat_s=None)
    assert holder.acquire()
    order: list[str] = []

    def waiter() -> None:
        with LockFile(path, heartbeat_s=None):
            order.append("waiter")

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.1)
    order.append("holder")
    holder.release()
    thread.join()
    assert order == ["holder", "waiter"]
    assert not path.exists()


@pytest.mark.parametrize(("stale", "beat"), [(0, None), (-1, 1), (10, 6), (10, 0)])
def test_bad_timeouts_are_refused(tmp_path: Path, stale: float, beat: float | None) -> None:
    with pytest.raises(InputError, match="lock"):
        LockFile(tmp_path / "a.lock", stale_after_s=stale, heartbeat_s=beat)


def test_unwritable_lock_folder_is_an_output_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutputError, match="lock folder"):
        LockFile(blocker / "locks" / "a.lock").acquire()


def test_unwritable_lock_file_is_an_output_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "a.lock"
    real_open = os.open

    def denied(path: os.PathLike[str], flags: int, *args: int) -> int:
        if Path(path) == target:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(OutputError, match="cannot create the lock file .*Permission denied"):
        LockFile(target).acquire()

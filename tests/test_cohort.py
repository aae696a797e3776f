"""Cohort logic with a small fake per-slide function: inputs, summary, failures, resume, concurrency.

The fakes live here (and are imported by the other cohort test modules) so that the cohort logic is
tested in milliseconds; tests/test_cohort_e2e.py runs the real pipeline.
"""

from __future__ import annotations

import csv
import errno
import json
import multiprocessing
import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from wsi_mtl.cohort import (
    BatchJob,
    CohortFailedError,
    LockFile,
    SegmentOptions,
    SlideTask,
    SlurmOptions,
    collect_slides,
    parse_shard,
    process_slide,
    raise_for_failures,
    read_manifest,
    read_summary,
    run_batch,
    shard_from_env,
    take_shard,
    update_summary,
)
from wsi_mtl.cohort._batch import describe
from wsi_mtl.cohort._locks import read_owner
from wsi_mtl.errors import InputError, OutputError, SlideError

LOG_ENV = "WSIMTL_TEST_COHORT_LOG"


# -- fakes -----------------------------------------------------------------------------------
def _log(line: str) -> None:
    path = os.environ.get(LOG_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as fh:  # one short O_APPEND write per line
            fh.write(line + "\n")


def fake_load_model(name: str | None, *, device: str) -> dict[str, Any]:
    """Stands in for wsi_mtl.network.load_model; logs each load."""
    _log(f"load {name} {device} {os.getpid()} {threading.get_ident()}")
    return {"name": name, "device": device}


def fake_segment(slide_path: Path, out_dir: Path, *, model: dict[str, Any], mpp: float | None, device: str, progress: bool, **options: Any) -> SimpleNamespace:
    """Stands in for segment_slide: BAD files raise SlideError, BOOM a ZeroDivisionError, SLOW ones
    take 0.3 s, ASSERT an AssertionError without message, WAIT ones wait for a ``<slide>.go`` file."""
    data = Path(slide_path).read_bytes()
    _log(f"segment {Path(slide_path).name} {os.getpid()}")
    if data.startswith(b"BAD"):
        raise SlideError(f"{Path(slide_path).name} is not a slide\n(truncated)")
    if data.startswith(b"BOOM"):
        raise ZeroDivisionError("boom\nsecond line")
    if data.startswith(b"ASSERT"):
        raise AssertionError
    if data.startswith(b"SLOW"):
        time.sleep(0.3)
    if data.startswith(b"HOLD"):  # in flight (its lock held) while a KILL slide's worker dies
        time.sleep(1.5)
    if data.startswith(b"KILL"):  # the system's out-of-memory killer, every time
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGKILL)
    if data.startswith(b"WAIT"):  # until the test creates <slide>.go
        go = Path(f"{slide_path}.go")
        for _ in range(6000):
            if go.exists():
                break
            time.sleep(0.05)
    result = Path(out_dir) / Path(slide_path).stem
    result.mkdir(parents=True, exist_ok=True)
    (result / "maps.bin").write_bytes(b"x")
    run = {
        "status": "complete",
        "files": [{"path": "maps.bin"}],
        "objects": {"nuclei": {"tumour": 2, "other": 1}, "gland": {"gland": 1}},
        "mpp": mpp,
        "model": model["name"],
        "device": device,
        "options": {k: options[k] for k in sorted(options)},
    }
    tmp = result / "run.json.tmp"
    tmp.write_text(json.dumps(run))
    os.replace(tmp, result / "run.json")
    return SimpleNamespace(result_dir=result, run=run)


def fake_segment_named(slide_path: Path, out_dir: Path, *, name: str | None = None, **kwargs: Any) -> SimpleNamespace:
    """A per-slide function that accepts ``name=`` (the result folder's name)."""
    result = fake_segment(slide_path, Path(out_dir) / ".tmp-named", **kwargs)
    target = Path(out_dir) / (name or Path(slide_path).stem)
    os.replace(result.result_dir, target)
    return SimpleNamespace(result_dir=target, run=result.run)


FAKES = {"segment_fn": fake_segment, "load_model_fn": fake_load_model}


def log_lines(path: Path, kind: str) -> list[list[str]]:
    if not path.exists():
        return []
    return [line.split()[1:] for line in path.read_text().splitlines() if line.startswith(kind + " ")]


@pytest.fixture(autouse=True)
def fresh_models() -> Iterator[None]:
    """Each test starts with an empty per-process model cache (a real process keeps it for good)."""
    from wsi_mtl.cohort._slide import PROCESS_MODELS

    PROCESS_MODELS.clear()
    yield
    PROCESS_MODELS.clear()


@pytest.fixture()
def call_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "calls.log"
    monkeypatch.setenv(LOG_ENV, str(path))
    return path


@pytest.fixture()
def cohort(tmp_path: Path) -> Path:
    """Three good fake slides and a corrupt one."""
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("a", "b", "c"):
        (folder / f"{name}.svs").write_bytes(b"OK")
    (folder / "bad.svs").write_bytes(b"BAD")
    (folder / "notes.txt").write_text("not a slide")
    return folder


# -- inputs ----------------------------------------------------------------------------------
def test_folder_glob_and_file_inputs(cohort: Path) -> None:
    tasks = collect_slides([cohort])
    assert [t.id for t in tasks] == ["a", "b", "bad", "c"]
    assert all(t.slide.is_absolute() and t.mpp is None for t in tasks)
    assert [t.id for t in collect_slides([str(cohort / "[ab].svs"), cohort / "a.svs"])] == ["a", "b"]
    assert [t.id for t in collect_slides([str(cohort / "**" / "*.svs")])] == ["a", "b", "bad", "c"]
    (cohort / "x.ome.tif").write_bytes(b"OK")
    assert [t.id for t in collect_slides([cohort / "x.ome.tif"])] == ["x"]


def test_manifest_columns_relative_paths_and_overrides(cohort: Path) -> None:
    manifest = cohort / "cohort.csv"
    manifest.write_text("Path,id,mpp\na.svs,case-1,0.5\n" + f"{cohort / 'b.svs'},,\n")
    tasks = read_manifest(manifest)
    assert tasks == [SlideTask(cohort / "a.svs", "case-1", 0.5), SlideTask(cohort / "b.svs", "b", None)]
    assert collect_slides([manifest]) == tasks
    (cohort / "slide.csv").write_text("slide\nc.svs\n")
    assert [t.id for t in collect_slides([cohort / "slide.csv"])] == ["c"]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("file,id\na.svs,x\n", "needs a 'slide' or 'path' column"),
        ("slide,mpp\na.svs,fast\n", "line 2: mpp 'fast' is not a positive"),
        ("slide,mpp\na.svs,-1\n", "mpp '-1'"),
        ("slide\n\n,\n", "empty 'slide' cell"),
        ("slide,id\na.svs,../up\n", "cannot name a result folder"),
        ("slide,id\na.svs,.hidden\n", "cannot name a result folder"),
        ("slide,id\na.svs,same\nb.svs,same\n", "share the result folder 'same'"),
    ],
)
def test_bad_manifests(cohort: Path, text: str, match: str) -> None:
    manifest = cohort / "m.csv"
    manifest.write_text(text)
    with pytest.raises(InputError, match=match):
        collect_slides([manifest])


def test_unreadable_manifest(cohort: Path) -> None:
    manifest = cohort / "m.csv"
    manifest.write_bytes(b"slide\n\xff\xfe\x00bad")
    with pytest.raises(InputError, match="not a readable CSV"):
        read_manifest(manifest)
    with pytest.raises(InputError, match="cannot read the manifest"):
        read_manifest(cohort / "missing.csv")


def test_bad_inputs(cohort: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        collect_slides([cohort / "nope.svs"])
    with pytest.raises(InputError, match="no file matches"):
        collect_slides([str(cohort / "*.ndpi")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no slide files"):
        collect_slides([empty])
    with pytest.raises(InputError, match="no slides given"):
        collect_slides([])
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.svs").write_bytes(b"OK")
    with pytest.raises(InputError, match="share the result folder 'a'"):
        collect_slides([cohort, other])


def test_shards() -> None:
    assert parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(InputError, match="shard"):
            parse_shard(bad)
    tasks = [SlideTask(Path(f"/s/{i:02d}.svs"), f"{i:02d}") for i in range(7)]
    shards = [take_shard(tasks[::-1], i, 3) for i in range(3)]
    assert [t.id for t in shards[0]] == ["00", "03", "06"]
    assert sorted(t.id for s in shards for t in s) == [t.id for t in tasks]
    assert shard_from_env({}) is None
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}) == (2, 4)
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"}) == (3, 4)
    with pytest.raises(InputError, match="does not fit"):
        shard_from_env({"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "4"})
    with pytest.raises(InputError, match="not integers"):
        shard_from_env({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "4"})


# -- one batch -------------------------------------------------------------------------------
def _summary_rows(out: Path) -> dict[str, dict[str, str]]:
    with (out / "batch_summary.csv").open(newline="") as fh:
        return {row["id"]: row for row in csv.DictReader(fh)}


def test_local_batch_failure_summary_and_rerun(cohort: Path, tmp_path: Path, call_log: Path) -> None:
    out = tmp_path / "out"
    result = run_batch([cohort], out, options=SegmentOptions(device="cpu"), progress=False, **FAKES)
    assert [o.status for o in result.outcomes] == ["done", "done", "failed", "done"]
    assert result.exit_code == 3
    assert result.failed[0].error == "bad.svs is not a slide (truncated)"
    rows = _summary_rows(out)
    assert {k: r["status"] for k, r in rows.items()} == {"a": "done", "b": "done", "bad": "failed", "c": "done"}
    assert rows["bad"]["error"] == "bad.svs is not a slide (truncated)"
    assert rows["a"]["objects_nuclei"] == "3" and rows["a"]["objects_gland"] == "1" and rows["bad"]["objects_nuclei"] == ""
    assert list(rows["a"])[:5] == ["slide", "id", "status", "error", "seconds"]
    assert rows["a"]["slide"] == str(cohort / "a.svs")
    assert len(log_lines(call_log, "load")) == 1  # once per worker, not per slide
    assert Counter(s[0] for s in log_lines(call_log, "segment")) == {"a.svs": 1, "b.svs": 1, "c.svs": 1, "bad.svs": 1}
    assert not list((out / ".locks").glob("*.lock"))
    with pytest.raises(CohortFailedError, match="1 of 4 slides failed") as info:
        raise_for_failures(result)
    assert info.value.exit_code == 3
    assert describe(result).startswith("3 done, 0 skipped, 1 failed")

    again = run_batch([cohort], out, options=SegmentOptions(device="cpu"), progress=False, **FAKES)
    assert [o.status for o in again.outcomes] == ["skipped", "skipped", "failed", "skipped"]
    assert again.outcomes[0].objects == {"nuclei": 3, "gland": 1}
    assert Counter(s[0] for s in log_lines(call_log, "segment")) == {"a.svs": 1, "b.svs": 1, "c.svs": 1, "bad.svs": 2}
    assert {k: r["status"] for k, r in _summary_rows(out).items()} == {"a": "skipped", "b": "skipped", "bad": "failed", "c": "skipped"}

    (cohort / "bad.svs").write_bytes(b"OK")  # fixed: the rerun finishes it
    fixed = run_batch([cohort], out, options=SegmentOptions(device="cpu"), progress=False, **FAKES)
    assert fixed.exit_code == 0 and fixed.counts() == {"done": 1, "skipped": 3, "failed": 0}
    raise_for_failures(fixed)


def test_unexpected_exception_is_a_sentence_with_type_place_and_message(cohort: Path, tmp_path: Path, call_log: Path) -> None:
    (cohort / "b.svs").write_bytes(b"BOOM")
    (cohort / "a.svs").write_bytes(b"ASSERT")
    out = tmp_path / "out"
    result = run_batch([cohort / "a.svs", cohort / "b.svs", cohort / "c.svs"], out, options=SegmentOptions(device="cpu"), progress=False, **FAKES)
    assert [(o.id, o.status) for o in result.outcomes] == [("a", "failed"), ("b", "failed"), ("c", "done")]
    rows = _summary_rows(out)
    unexpected = "unexpected error \\(a bug, please report it\\): "
    where = r"raised at tests/test_cohort\.py:\d+ \(fake_segment\) from wsi_mtl/cohort/_slide\.py:\d+ \(_segment\)"
    assert re.fullmatch(f"{unexpected}ZeroDivisionError {where}: boom second line", rows["b"]["error"])
    assert re.fullmatch(f"{unexpected}AssertionError {where} with no message", rows["a"]["error"])
    assert [o.error for o in result.outcomes[:2]] == [rows["a"]["error"], rows["b"]["error"]]


def test_options_mpp_and_ids_reach_the_slide_function(cohort: Path, tmp_path: Path, call_log: Path) -> None:
    manifest = cohort / "m.csv"
    manifest.write_text("slide,id,mpp\na.svs,case-1,0.5\nb.svs,,\n")
    out = tmp_path / "out"
    options = SegmentOptions(model="tiny", device="cpu", batch_size=3, tile_size=64, objects=False, tissue_mask=False,
                             postprocess=(("nuclei_split_h", "0"), ("gland_downsample", "2")))
    result = run_batch([manifest], out, options=options, progress=False, **FAKES)
    assert result.exit_code == 0
    run_a = json.loads((out / "case-1" / "a" / "run.json").read_text())  # no name= support: OUT/<id>/<stem>
    assert run_a["mpp"] == 0.5 and run_a["model"] == "tiny" and run_a["device"] == "cpu"
    assert run_a["options"] == {"batch_size": 3, "objects": False, "precision": "auto", "tile_size": 64, "tissue_mask": False, "tta": 1, "workers": None,
                                "postprocess": {"nuclei_split_h": 0.0, "gland_downsample": 2}}  # checked and typed once, before any slide
    with pytest.raises(InputError, match="unknown post-processing setting 'nuclei_split'"):
        run_batch([manifest], tmp_path / "bad", options=SegmentOptions(postprocess=(("nuclei_split", 1),)), progress=False, **FAKES)
    assert not (tmp_path / "bad").exists()
    assert json.loads((out / "b" / "run.json").read_text())["mpp"] is None
    assert result.outcomes[0].result_dir == str(out / "case-1" / "a")
    assert log_lines(call_log, "load") == [["tiny", "cpu", str(os.getpid()), str(threading.get_ident())]]

    named = run_batch([manifest], tmp_path / "named", segment_fn=fake_segment_named, load_model_fn=fake_load_model, options=SegmentOptions(device="cpu"), progress=False)
    assert named.exit_code == 0
    assert json.loads((tmp_path / "named" / "case-1" / "run.json").read_text())["mpp"] == 0.5
    assert run_batch([manifest], tmp_path / "named", segment_fn=fake_segment_named, load_model_fn=fake_load_model, progress=False, options=SegmentOptions(device="cpu")).counts()["skipped"] == 2


def test_shard_takes_every_nth_slide(cohort: Path, tmp_path: Path, call_log: Path) -> None:
    result = run_batch([cohort], tmp_path / "out", shard=(1, 2), options=SegmentOptions(device="cpu"), progress=False, **FAKES)
    assert [o.id for o in result.outcomes] == ["b", "c"]


def test_batch_argument_errors(cohort: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no slides given"):
        run_batch([], tmp_path / "out", **FAKES)
    with pytest.raises(InputError, match="unknown executor 'cloud'"):
        run_batch([cohort], tmp_path / "out", executor="cloud", progress=False, **FAKES)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="lock heartbeat"):
        run_batch([cohort], tmp_path / "out", lock_timeout_s=10, heartbeat_s=20, **FAKES)
    with pytest.raises(InputError, match="unknown device"):
        run_batch([cohort], tmp_path / "out", options=SegmentOptions(device="tpu"), progress=False, **FAKES)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutputError, match="cannot create the output folder"):
        run_batch([cohort], blocker / "out", progress=False, **FAKES)


def test_model_error_fails_each_slide_with_its_message(cohort: Path, tmp_path: Path) -> None:
    from wsi_mtl.errors import ModelError

    def missing_model(name: str | None, *, device: str) -> None:
        raise ModelError(f"no model named {name!r}")

    result = run_batch([cohort / "a.svs"], tmp_path / "out", options=SegmentOptions(model="nope", device="cpu"), segment_fn=fake_segment, load_model_fn=missing_model, progress=False)
    assert [(o.status, o.error) for o in result.outcomes] == [("failed", "no model named 'nope'")]


# -- other workers ---------------------------------------------------------------------------
def _job(out: Path, **kwargs: Any) -> BatchJob:
    return BatchJob(out_dir=out, options=SegmentOptions(device="cpu"), **FAKES, **kwargs)


def test_a_slide_held_elsewhere_is_busy_then_waited_for(cohort: Path, tmp_path: Path, call_log: Path) -> None:
    out = tmp_path / "out"
    task = collect_slides([cohort / "a.svs"])[0]
    holder = LockFile(out / ".locks" / "a.lock", heartbeat_s=None)
    assert holder.acquire()
    assert process_slide(task, _job(out)).status == "busy"
    assert not (out / "a").exists()

    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(r=run_batch([cohort / "a.svs", cohort / "b.svs"], out, poll_s=0.02, options=SegmentOptions(device="cpu"), progress=False, **FAKES)))
    thread.start()
    for _ in range(500):  # the other worker finishes "a" while the batch waits
        if (out / "b" / "run.json").exists():
            break
        time.sleep(0.01)
    fake_segment(cohort / "a.svs", out, model={"name": None}, mpp=None, device="cpu", progress=False)
    update_summary(out, [{"id": "a", "slide": str(cohort / "a.svs"), "status": "done", "finished_at": "2999-01-01T00:00:00+00:00"}])
    holder.release()
    thread.join()
    assert [(o.id, o.status) for o in result["r"].outcomes] == [("a", "skipped"), ("b", "done")]
    assert Counter(s[0] for s in log_lines(call_log, "segment")) == {"a.svs": 1, "b.svs": 1}  # ours: b; "theirs": a
    assert _summary_rows(out)["a"]["status"] == "done"  # the other worker's row is kept


def test_a_slide_failed_elsewhere_in_this_batch_is_not_retried(cohort: Path, tmp_path: Path, call_log: Path) -> None:
    out = tmp_path / "out"
    holder = LockFile(out / ".locks" / "a.lock", heartbeat_s=None)
    assert holder.acquire()
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(r=run_batch([cohort / "a.svs"], out, poll_s=0.02, options=SegmentOptions(device="cpu"), progress=False, **FAKES)))
    thread.start()
    time.sleep(0.1)
    update_summary(out, [{"id": "a", "slide": str(cohort / "a.svs"), "status": "failed", "error": "broken elsewhere", "seconds": "1.5", "finished_at": "2999-01-01T00:00:00+00:00"}])
    holder.release()
    thread.join()
    assert [(o.status, o.error, o.seconds) for o in result["r"].outcomes] == [("failed", "broken elsewhere", 1.5)]
    assert log_lines(call_log, "segment") == []


def test_a_slide_released_unfinished_is_retried_and_a_stale_lock_taken_over(cohort: Path, tmp_path: Path, call_log: Path) -> None:
    out = tmp_path / "out"
    holder = LockFile(out / ".locks" / "a.lock", heartbeat_s=None)
    assert holder.acquire()
    dead = out / ".locks" / "b.lock"
    dead.write_text(json.dumps({"host": "gone", "pid": 1, "token": "dead"}))
    os.utime(dead, (time.time() - 3600, time.time() - 3600))
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(r=run_batch([cohort / "a.svs", cohort / "b.svs"], out, poll_s=0.02, options=SegmentOptions(device="cpu"), progress=False, **FAKES)))
    thread.start()
    time.sleep(0.1)
    holder.release()  # interrupted elsewhere: nothing finished, nothing recorded
    thread.join()
    assert [(o.id, o.status) for o in result["r"].outcomes] == [("a", "done"), ("b", "done")]
    assert not list((out / ".locks").glob("*.lock"))


def _batch_process(slides: str, out: str, log: str) -> None:
    os.environ[LOG_ENV] = log
    run_batch([slides], out, options=SegmentOptions(device="cpu"), poll_s=0.05, progress=False, **FAKES)


@pytest.mark.slow
def test_two_batches_at_once_process_every_slide_exactly_once(tmp_path: Path) -> None:
    folder = tmp_path / "slides"
    folder.mkdir()
    for i in range(8):
        (folder / f"s{i}.svs").write_bytes(b"SLOW")
    (folder / "zbad.svs").write_bytes(b"BAD")
    out, log = tmp_path / "out", tmp_path / "calls.log"
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_batch_process, args=(str(folder), str(out), str(log))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0, 0]
    calls = Counter(s[0] for s in log_lines(log, "segment"))
    assert {k: v for k, v in calls.items() if k != "zbad.svs"} == {f"s{i}.svs": 1 for i in range(8)}
    assert len({pid for _, pid in log_lines(log, "segment")}) == 2  # both took part
    rows = _summary_rows(out)
    assert {k: r["status"] for k, r in rows.items()} == {**{f"s{i}": "done" for i in range(8)}, "zbad": "failed"}
    assert not list((out / ".locks").glob("*.lock"))


@pytest.mark.slow
def test_one_process_per_device(cohort: Path, tmp_path: Path, call_log: Path) -> None:
    for i in range(4):
        (cohort / f"slow{i}.svs").write_bytes(b"SLOW")
    result = run_batch([cohort], tmp_path / "out", devices=["cpu", "cpu"], progress=False, **FAKES)
    assert result.counts() == {"done": 7, "skipped": 0, "failed": 1}
    loads = log_lines(call_log, "load")
    pids = {pid for _, _, pid, _ in loads}
    assert len(loads) == len(pids) <= 2 and str(os.getpid()) not in pids  # once per worker process
    assert {pid for _, pid in log_lines(call_log, "segment")} <= pids


# -- summary ---------------------------------------------------------------------------------
def test_summary_updates_from_many_threads_are_all_kept(tmp_path: Path) -> None:
    def add(i: int) -> None:
        update_summary(tmp_path, [{"id": f"s{i:02d}", "slide": f"/s/{i:02d}.svs", "status": "done", f"objects_task{i % 3}": i}])

    threads = [threading.Thread(target=add, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = read_summary(tmp_path)
    assert sorted(rows) == [f"s{i:02d}" for i in range(16)]
    assert rows["s05"]["objects_task2"] == "5" and rows["s05"]["objects_task0"] == ""
    assert [p.name for p in tmp_path.iterdir() if p.name != ".locks"] == ["batch_summary.csv"]


def test_a_skipped_row_never_hides_a_row_written_in_this_batch(tmp_path: Path) -> None:
    """Two batches at once: one finishes a slide, the other finds it complete before the first has
    written its row. Whichever row lands second, the summary ends with ``done``."""
    now = time.time()
    done = {"id": "a", "slide": "/s/a.svs", "status": "done", "finished_at": "2999-01-01T00:00:00+00:00"}
    skipped = {"id": "a", "slide": "/s/a.svs", "status": "skipped", "finished_at": "2999-01-01T00:00:01+00:00"}
    update_summary(tmp_path, [done])
    update_summary(tmp_path, [skipped], keep_recorded_since=now)
    assert read_summary(tmp_path)["a"]["status"] == "done"
    # a row from an earlier batch is replaced; so is any row when no time is given
    old = {**done, "id": "b", "finished_at": "2000-01-01T00:00:00+00:00"}
    update_summary(tmp_path, [old])
    update_summary(tmp_path, [{**skipped, "id": "b"}, {**skipped, "id": "c"}], keep_recorded_since=now)
    rows = read_summary(tmp_path)
    assert (rows["b"]["status"], rows["c"]["status"]) == ("skipped", "skipped")
    update_summary(tmp_path, [skipped])
    assert read_summary(tmp_path)["a"]["status"] == "skipped"


def test_summary_disk_full_is_an_output_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OutputError, match="disk full"):
        update_summary(tmp_path, [{"id": "a"}])
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_summary_other_os_errors_propagate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="I/O error"):
        update_summary(tmp_path, [{"id": "a"}])


def test_slurm_options_are_checked() -> None:
    assert SlurmOptions(walltime="1-02:00:00").validated().walltime == "1-02:00:00"
    with pytest.raises(InputError, match="walltime"):
        SlurmOptions(walltime="2 hours").validated()
    with pytest.raises(InputError, match="cores >= 1"):
        SlurmOptions(cores=0).validated()


def test_local_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from wsi_mtl.cohort._batch import local_devices

    assert local_devices("cpu", None) is None
    assert local_devices("auto", ["cpu", "cpu"]) == ["cpu", "cpu"]
    with pytest.raises(InputError, match="unknown device 'gpu0'"):
        local_devices("cpu", ["cpu", "gpu0"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert local_devices("auto", None) == ["cuda:0", "cuda:1", "cuda:2"]
    assert local_devices("cpu", None) is None


def test_model_cache_loads_once_per_loader_name_and_device() -> None:
    from wsi_mtl.cohort import ModelCache

    calls: list[tuple[str | None, str]] = []

    def loader(name: str | None, *, device: str) -> tuple[str | None, str]:
        calls.append((name, device))
        return (name, device)

    def other_loader(name: str | None, *, device: str) -> str:
        return "other"

    cache = ModelCache()
    assert cache.get("m", "cpu", loader) is cache.get("m", "cpu", loader)
    cache.get("m", "cuda:1", loader)
    cache.get(None, "cpu", loader)
    assert cache.get("m", "cpu", other_loader) == "other"
    assert calls == [("m", "cpu"), ("m", "cuda:1"), (None, "cpu")]
    assert len(cache) == 4


def test_device_pool_needs_devices() -> None:
    from wsi_mtl.cohort import DevicePoolExecutor

    with pytest.raises(InputError, match="at least one device"):
        DevicePoolExecutor([])


def test_a_worker_that_fails_outside_the_slide_is_a_sentence() -> None:
    from concurrent.futures import Future

    from wsi_mtl.cohort._executors import _outcome_of

    future: Future = Future()
    try:
        raise MemoryError()
    except MemoryError as exc:
        future.set_exception(exc)
    outcome = _outcome_of(future, SlideTask(Path("a.svs"), "a"))
    assert outcome.status == "failed"
    assert re.fullmatch(r"the worker processing it failed: MemoryError raised at tests/test_cohort\.py:\d+ \(test_\w+\)( from [^ ]+ \(\w+\))? with no message", outcome.error)


def test_a_device_worker_killed_fails_only_its_own_slide(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """One process per device; a slide kills its worker (out of memory) every time: the slide in
    flight beside it runs again (its lock, held by a dead process, taken back at once), the slide
    that killed its lone worker fails with that reason and a summary row, the rest are done."""
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    for name, data in [("held", b"HOLD"), ("kill", b"KILL"), ("a", b"ok"), ("b", b"ok")]:
        (cohort / f"{name}.svs").write_bytes(data)
    slides = [cohort / f"{n}.svs" for n in ("held", "kill", "a", "b")]
    with caplog.at_level("WARNING"):
        result = run_batch(slides, tmp_path / "out", devices=["cpu", "cpu"], options=SegmentOptions(device="cpu"), progress=False, **FAKES)
    status = {o.id: o.status for o in result.outcomes}
    assert status == {"held": "done", "kill": "failed", "a": "done", "b": "done"}
    failed = next(o for o in result.outcomes if o.id == "kill")
    assert "died" in failed.error and "alone" in failed.error
    assert read_summary(tmp_path / "out")["kill"]["status"] == "failed"  # the parent wrote the row the dead worker could not
    assert "took over the stale lock" in caplog.text and "held.lock" in caplog.text  # not left to go stale


def _hold_lock_and_die(path: str) -> None:
    LockFile(path, heartbeat_s=None).acquire()
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_lock_is_taken_back_only_from_a_dead_process_of_this_host(tmp_path: Path) -> None:
    dead = tmp_path / "dead.lock"
    child = multiprocessing.get_context("spawn").Process(target=_hold_lock_and_die, args=(str(dead),))
    child.start()
    child.join()
    assert dead.exists() and read_owner(dead)["pid"] == child.pid
    assert not LockFile(dead).acquire()  # its heartbeat is fresh: not stale
    assert LockFile(dead).reclaim_from_dead_owner() and not dead.exists()
    live = tmp_path / "live.lock"
    holder = LockFile(live, heartbeat_s=None)
    assert holder.acquire()
    assert not LockFile(live).reclaim_from_dead_owner() and live.exists()  # this process is alive
    owner = json.loads(live.read_text())
    live.write_text(json.dumps({**owner, "host": owner["host"] + "-elsewhere", "pid": child.pid}))
    assert not LockFile(live).reclaim_from_dead_owner() and live.exists()  # another host's pid says nothing here

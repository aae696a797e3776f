"""``wsimtl batch`` end to end with the real pipeline and default model on tiny generated slides.

Three 256 x 256 px slides and one corrupt file go through the local and Dask executors:
the good slides finish with their objects (post-processing runs in a process pool, inside Dask
workers too), the corrupt one is reported, the exit code is 3, and a rerun skips every finished
slide (SLURM: tests/test_cohort_slurm.py). No tissue mask (the slides are too small for one), so a
slide takes a few seconds on a CPU. The default options on the real sample slide: the last test.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from test_cohort import fresh_models  # noqa: F401 - autouse fixture
from wsi_mtl import synthetic
from wsi_mtl.cli import main
from wsi_mtl.objects import TASKS
from wsi_mtl.pipeline import is_complete

pytestmark = pytest.mark.slow

FAST = ["--device", "cpu", "--tile-size", "256", "--batch-size", "1", "--no-tissue-mask"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cohort")
    for i in range(3):
        synthetic.write_svs(folder / f"slide{i}.svs", synthetic.make_he_texture(256, 256, seed=i), mpp=0.5, levels=(1,))
    (folder / "corrupt.svs").write_bytes(b"II*\x00" + b"\x00garbage" * 64)
    return folder


def _summary(out: Path) -> dict[str, dict[str, str]]:
    with (out / "batch_summary.csv").open(newline="") as fh:
        return {row["id"]: row for row in csv.DictReader(fh)}


def _batch(args: list[str]) -> int:
    try:
        main(["batch", *args])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def _check_first_run(out: Path, code: int, capsys: pytest.CaptureFixture[str], pool: str = "processes") -> None:
    """Slides done with their objects (post-processed by a ``pool``), the corrupt one reported."""
    rows = _summary(out)
    assert code == 3, rows
    assert {k: r["status"] for k, r in rows.items()} == {"slide0": "done", "slide1": "done", "slide2": "done", "corrupt": "failed"}, rows
    assert "corrupt.svs" in rows["corrupt"]["error"] and "\n" not in rows["corrupt"]["error"]
    err = capsys.readouterr().err
    assert f"failed: corrupt: {rows['corrupt']['error']}" in err, err[-3000:]
    for i in range(3):
        result_dir = out / f"slide{i}"
        assert is_complete(result_dir)
        run = json.loads((result_dir / "run.json").read_text())
        assert run["status"] == "complete" and (result_dir / "predictions.zarr").is_dir()
        assert run["parameters"]["postprocess_pool"] == pool
        table = pq.read_table(result_dir / "objects.parquet", columns=["task"])
        assert table.num_rows == sum(int(rows[f"slide{i}"].get(f"objects_{task}") or 0) for task in TASKS)
        assert {p["path"] for p in run["files"]} >= {"objects.parquet", "preview.png"}
    assert not list((out / ".locks").glob("*.lock"))


def _check_rerun(out: Path, code: int) -> None:
    assert code == 3  # the corrupt slide is tried again and fails again
    assert {k: r["status"] for k, r in _summary(out).items()} == {"slide0": "skipped", "slide1": "skipped", "slide2": "skipped", "corrupt": "failed"}


def test_local_executor(cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    _check_first_run(out, _batch([str(cohort), "-o", str(out), *FAST]), capsys)
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("slide*/run.json")}
    _check_rerun(out, _batch([str(cohort), "-o", str(out), *FAST, "-q"]))
    assert {p: p.stat().st_mtime_ns for p in out.glob("slide*/run.json")} == mtimes


def test_dask_executor_local_cluster(cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    # one worker holds every core, so its slides are post-processed by a process pool started inside
    # the Dask worker (what failed as "daemonic processes are not allowed to have children"); two
    # workers on a 2-core machine get one core each (WSIMTL_CPUS) and post-process in-process
    _check_first_run(out, _batch([str(cohort), "-o", str(out), *FAST, "--executor", "dask", "--dask-workers", "1"]), capsys,
                     pool="processes" if (os.cpu_count() or 1) > 1 else "in-process")
    _check_rerun(out, _batch([str(cohort), "-o", str(out), *FAST, "--executor", "dask", "--dask-workers", "2", "-q"]))


@pytest.mark.shared_data
def test_default_options_on_the_real_sample_slide(cmu_small: Path, tmp_path: Path) -> None:
    """``wsimtl batch DIR -o OUT`` with nothing else, as a user runs it: the sample slide is done, its
    objects are in objects.parquet and the summary, run.json is complete and lists every file."""
    folder, out = tmp_path / "slides", tmp_path / "out"
    folder.mkdir()
    (folder / cmu_small.name).symlink_to(cmu_small)
    assert _batch([str(folder), "-o", str(out), "-q"]) == 0
    row = _summary(out)[cmu_small.stem]
    assert row["status"] == "done" and row["error"] == ""
    result_dir = out / cmu_small.stem
    run = json.loads((result_dir / "run.json").read_text())
    assert run["status"] == "complete" and is_complete(result_dir)
    assert run["parameters"]["postprocess_pool"] == "processes"
    rows = pq.read_table(result_dir / "objects.parquet", columns=["task"])
    assert rows.num_rows > 0
    per_task = {task: int(row[f"objects_{task}"]) for task in run["objects"]}
    assert per_task == {task: sum(counts.values()) for task, counts in run["objects"].items()}
    assert sum(per_task.values()) == rows.num_rows and per_task.get("nuclei", 0) > 0
    for entry in run["files"]:
        assert (result_dir / entry["path"]).exists(), entry
    assert {e["path"] for e in run["files"]} >= {"predictions.zarr", "objects.parquet", "objects.geojson", "preview.png"}

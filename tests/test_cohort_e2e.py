"""``wsimtl batch`` end to end with the real pipeline and default model on tiny generated slides.

Three 256 x 256 px slides and one corrupt file go through the local and Dask executors:
the good slides finish, the corrupt one is reported, the exit code is 3, and a rerun skips every
finished slide (SLURM: tests/test_cohort_slurm.py). Maps only (``--no-objects``) and no tissue mask (the slides are too small for one),
so a slide takes a few seconds on a CPU.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from test_cohort import fresh_models  # noqa: F401 - autouse fixture
from wsi_mtl import synthetic
from wsi_mtl.cli import main
from wsi_mtl.pipeline import is_complete

pytestmark = pytest.mark.slow

FAST = ["--device", "cpu", "--tile-size", "256", "--batch-size", "1", "--no-objects", "--no-tissue-mask"]


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


def _check_first_run(out: Path, code: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert code == 3
    rows = _summary(out)
    assert {k: r["status"] for k, r in rows.items()} == {"slide0": "done", "slide1": "done", "slide2": "done", "corrupt": "failed"}
    assert "corrupt.svs" in rows["corrupt"]["error"] and "\n" not in rows["corrupt"]["error"]
    assert f"failed: corrupt: {rows['corrupt']['error']}" in capsys.readouterr().err
    for i in range(3):
        result_dir = out / f"slide{i}"
        assert is_complete(result_dir)
        run = json.loads((result_dir / "run.json").read_text())
        assert run["status"] == "complete" and (result_dir / "predictions.zarr").is_dir()
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
    _check_first_run(out, _batch([str(cohort), "-o", str(out), *FAST, "--executor", "dask", "--workers", "1"]), capsys)
    _check_rerun(out, _batch([str(cohort), "-o", str(out), *FAST, "--executor", "dask", "--workers", "1", "-q"]))

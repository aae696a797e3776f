"""The SLURM executor against a real SLURM cluster (CI: started by .ci/slurm-start.sh).

Runs when ``sinfo`` answers. Where SLURM is not running the tests skip, except in CI (``CI=true``)
where they fail: the CI script must start SLURM, so a silent skip would hide a broken setup.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from test_cohort import FAKES, LOG_ENV, log_lines
from test_cohort_e2e import FAST, _batch, _check_first_run, _check_rerun, cohort  # noqa: F401 - cohort is a fixture
from wsi_mtl.cohort import DaskExecutor, SegmentOptions, SlurmOptions, run_batch
from wsi_mtl.errors import InputError

pytestmark = pytest.mark.slurm

NOT_RUNNING = "SLURM is not running: .ci/slurm-start.sh should have started it"


def _slurm_running() -> bool:
    if shutil.which("sinfo") is None:
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True, check=False).returncode == 0


@pytest.fixture(scope="module")
def slurm() -> Iterator[None]:
    if not _slurm_running():
        if os.environ.get("CI", "").lower() in {"true", "1"}:
            pytest.fail(NOT_RUNNING)
        pytest.skip(NOT_RUNNING)
    yield


@pytest.mark.slow
def test_slurm_executor(slurm: None, cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    jobs = ["--executor", "slurm", "--partition", _partition(), "--cores", "1", "--memory", "3GB", "--walltime", "00:15:00", "--interface", "lo"]
    _check_first_run(out, _batch([str(cohort), "-o", str(out), *FAST, *jobs, "--jobs", "2"]), capsys)
    logs = list((out / ".slurm-logs").glob("*.err")) + list((out / ".slurm-logs").glob("*.out"))
    assert logs, "the workers ran as SLURM jobs and wrote their logs"
    _check_rerun(out, _batch([str(cohort), "-o", str(out), *FAST, *jobs, "--jobs", "1", "-q"]))
    for _ in range(300):  # the batch cancelled its worker jobs; they leave the queue
        remaining = subprocess.run(["squeue", "-h", "-n", "wsimtl", "-o", "%i %T"], capture_output=True, text=True, check=True).stdout
        if not remaining.strip():
            break
        time.sleep(0.2)
    assert remaining.strip() == ""


def _partition() -> str:
    return subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, check=True).stdout.split()[0]


def test_a_job_slurm_rejects_is_an_input_error(slurm: None, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="SLURM rejects the worker job: .*invalid partition"):
        DaskExecutor(slurm=SlurmOptions(partition="no-such-partition", cores=1, memory="1GB", interface="lo"), out_dir=tmp_path)
    with pytest.raises(InputError, match="SLURM rejects the worker job: .*processors"):
        DaskExecutor(slurm=SlurmOptions(partition=_partition(), cores=4096, memory="1GB", interface="lo"), out_dir=tmp_path)
    assert not list(tmp_path.rglob(".wsimtl-job-*.sh"))



def _squeue(name: str) -> list[tuple[str, str]]:
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i %T"], capture_output=True, text=True, check=True).stdout
    return [tuple(line.split()) for line in out.splitlines() if line.strip()]  # type: ignore[misc]


@pytest.mark.slow
def test_an_ended_worker_job_is_replaced_and_its_slide_taken_over(slurm: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, out, log = tmp_path / "slides", tmp_path / "out", tmp_path / "calls.log"
    folder.mkdir()
    (folder / "a.svs").write_bytes(b"OK")
    (folder / "w.svs").write_bytes(b"WAIT")
    monkeypatch.setenv(LOG_ENV, str(log))  # sbatch passes the environment on to the worker jobs
    tests_dir = Path(__file__).resolve().parent
    slurm_options = SlurmOptions(partition=_partition(), cores=1, memory="2GB", walltime="00:10:00", interface="lo", jobs=1,
                                 prologue=(f"export PYTHONPATH={tests_dir}",))  # the fakes live in tests/
    result: dict[str, object] = {}
    batch = threading.Thread(target=lambda: result.update(r=run_batch(
        [folder], out, executor="slurm", slurm=slurm_options, options=SegmentOptions(device="cpu"),
        lock_timeout_s=3, heartbeat_s=0.5, poll_s=0.5, progress=False, **FAKES)))
    batch.start()
    for _ in range(3000):  # the worker job starts on "w" (slides run in path order: a, then w)
        if any(name == "w.svs" for name, _ in log_lines(log, "segment")):
            break
        time.sleep(0.1)
    first = _squeue("wsimtl")
    assert len(first) == 1
    subprocess.run(["scancel", first[0][0]], check=True)  # the job ends (walltime, pre-emption...)
    for _ in range(3000):  # a replacement job is submitted and runs
        if any(job != first[0][0] and state == "RUNNING" for job, state in _squeue("wsimtl")):
            break
        time.sleep(0.1)
    (folder / "w.svs.go").touch()
    batch.join()
    outcomes = {o.id: o.status for o in result["r"].outcomes}  # type: ignore[attr-defined]
    assert outcomes == {"a": "done", "w": "done"}
    segments = [name for name, _ in log_lines(log, "segment")]
    assert segments.count("a.svs") == 1 and segments.count("w.svs") == 2  # w: killed once, then taken over
    assert len({pid for _, pid in log_lines(log, "segment")}) == 2

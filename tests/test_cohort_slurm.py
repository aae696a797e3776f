"""The SLURM executor against a real SLURM cluster (CI: started by .ci/slurm-start.sh).

Runs when ``sinfo`` answers. Where SLURM is not running the tests skip, except in CI (``CI=true``)
where they fail: the CI script must start SLURM, so a silent skip would hide a broken setup.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from test_cohort_e2e import FAST, _batch, _check_first_run, _check_rerun, cohort  # noqa: F401 - cohort is a fixture
from wsi_mtl.cohort import DaskExecutor, SlurmOptions
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


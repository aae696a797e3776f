"""The Dask executor with the fake per-slide function: outcomes, worker-local model cache, resume."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("distributed")
from distributed import Client, LocalCluster

from test_cohort import FAKES, LOG_ENV, log_lines
from wsi_mtl.cohort import DaskExecutor, SegmentOptions, run_batch
from wsi_mtl.cohort._dask import PLUGIN_NAME, device_from_worker_name
from wsi_mtl.errors import InputError


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, Client(cluster) as c:
        yield c


@pytest.fixture()
def cohort(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "slides"
    folder.mkdir()
    for i in range(5):
        (folder / f"s{i}.svs").write_bytes(b"SLOW" if i < 2 else b"OK")
    (folder / "bad.svs").write_bytes(b"BAD")
    monkeypatch.setenv(LOG_ENV, str(tmp_path / "calls.log"))
    return folder


def test_dask_batch_with_worker_local_models(client: Client, cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_batch([cohort], out, executor="dask", client=client, options=SegmentOptions(model="m", device="cpu"), progress=False, **FAKES)
    assert {o.id: o.status for o in result.outcomes} == {"bad": "failed", **{f"s{i}": "done" for i in range(5)}}
    assert result.exit_code == 3 and result.failed[0].error == "bad.svs is not a slide (truncated)"
    log = tmp_path / "calls.log"
    loads = log_lines(log, "load")
    assert 1 <= len(loads) <= 2  # at most once per worker, whatever the number of slides
    assert len({thread for *_, thread in loads}) == len(loads)
    cached = client.run(lambda dask_worker: len(dask_worker.plugins[PLUGIN_NAME].models))
    assert sum(cached.values()) == len(loads)

    again = run_batch([cohort], out, executor="dask", client=client, options=SegmentOptions(model="m", device="cpu"), progress=False, **FAKES)
    assert Counter(o.status for o in again.outcomes) == {"skipped": 5, "failed": 1}
    assert Counter(s[0] for s in log_lines(log, "segment"))["s0.svs"] == 1
    assert client.status == "running"  # a client we passed in stays open


def test_worker_names_pick_gpus() -> None:
    assert device_from_worker_name("SLURMCluster-0-3", 4) == "cuda:3"
    assert device_from_worker_name("SLURMCluster-0-3", 1) is None
    assert device_from_worker_name("tcp://x", 2) is None


def test_unreachable_scheduler_is_an_input_error() -> None:
    with pytest.raises(InputError, match="cannot connect to the Dask scheduler tcp://127.0.0.1:9"):
        DaskExecutor(scheduler="tcp://127.0.0.1:9", connect_timeout_s=1)


def test_local_cluster_needs_a_worker() -> None:
    with pytest.raises(InputError, match="--dask-workers must be at least 1"):
        DaskExecutor(workers=0)


def test_without_sbatch_the_slurm_executor_is_an_input_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wsi_mtl.cohort import _executors

    monkeypatch.setattr(_executors.shutil, "which", lambda name: None)
    with pytest.raises(InputError, match="needs SLURM's sbatch on PATH"):
        _executors._check_job_script("#!/bin/bash\n", tmp_path)


def test_slurm_executor_without_dask_jobqueue_is_an_input_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from wsi_mtl.cohort import _executors

    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)  # as if not installed
    with pytest.raises(InputError, match="needs dask-jobqueue"):
        _executors._import_slurm_cluster()


def test_importing_dask_jobqueue_keeps_ctrl_c_and_works_in_threads() -> None:
    import subprocess
    import sys

    code = (
        "import signal, threading\n"
        "before = signal.getsignal(signal.SIGINT)\n"  # SIG_IGN when started from a background job
        "from wsi_mtl.cohort._executors import _import_slurm_cluster\n"
        "found = []\n"
        "t = threading.Thread(target=lambda: found.append(_import_slurm_cluster().__name__))\n"
        "t.start(); t.join()\n"
        "print(found, signal.getsignal(signal.SIGINT) is before)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[0] == "['SLURMCluster'] True"


@pytest.mark.slow
def test_daemonic_process_workers_post_process_on_threads(tmp_path: Path) -> None:
    """A cluster the batch did not start (worker processes daemonic, as dask makes them by default):
    the real pipeline with objects on post-processes on threads, and run.json says so."""
    import json

    import pyarrow.parquet as pq

    from wsi_mtl import synthetic

    folder = tmp_path / "slides"
    folder.mkdir()
    for i in range(2):
        synthetic.write_svs(folder / f"slide{i}.svs", synthetic.make_he_texture(256, 256, seed=i), mpp=0.5, levels=(1,))
    out = tmp_path / "out"
    options = SegmentOptions(device="cpu", tile_size=256, batch_size=1, tissue_mask=False)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, Client(cluster) as c:
        assert all(c.run(lambda: __import__("multiprocessing").current_process().daemon).values())
        result = run_batch([folder], out, executor="dask", client=c, options=options, progress=False)
    assert {o.id: o.status for o in result.outcomes} == {"slide0": "done", "slide1": "done"}, [o.error for o in result.outcomes]
    for outcome in result.outcomes:
        run = json.loads((out / outcome.id / "run.json").read_text())
        assert run["status"] == "complete" and run["parameters"]["postprocess_pool"] == "threads"
        assert pq.read_metadata(out / outcome.id / "objects.parquet").num_rows == sum(outcome.objects.values())

"""Where slides run: this process, one process per device, a Dask cluster, SLURM jobs (dask-jobqueue)."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from ._locks import LockFile
from ._manifest import SlideTask
from ._slide import PROCESS_MODELS, BatchJob, SlideOutcome, failure_sentence, one_line, process_slide

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["SlurmOptions", "Executor", "LocalExecutor", "DevicePoolExecutor", "DaskExecutor"]

log = logging.getLogger(__name__)

#: ``distributed.worker.daemon`` of the workers a batch starts (local cluster, SLURM jobs): not
#: daemonic, so that a slide's post-processing can use a process pool as it does outside Dask (a
#: daemonic worker, e.g. one of a scheduler given with --scheduler, runs it on threads instead).
WORKER_DAEMON = False


@dataclass(frozen=True)
class SlurmOptions:
    """SLURM jobs that run Dask workers (``dask_jobqueue.SLURMCluster``).

    Attributes
    ----------
    partition, account : str or None
        ``--partition`` and ``--account`` of each job (None: the cluster's default).
    walltime : str
        ``--time`` of each job, ``HH:MM:SS``.
    memory : str
        Memory of each job, e.g. ``"16GB"``.
    cores : int
        CPUs of each job (the slide's reader threads and post-processing use them).
    gpus_per_job : int
        GPUs of each job (``--gres=gpu:N``); one worker per GPU.
    jobs : int
        How many jobs (each one or ``gpus_per_job`` workers).
    interface : str or None
        Network interface the scheduler and workers listen on (e.g. ``"ib0"``, ``"lo"`` on one node).
    python : str or None
        Python of the workers (default: this one, so a virtual environment carries over).
    log_dir : Path or None
        Where job logs go (default ``OUT_DIR/.slurm-logs``).
    prologue : tuple of str
        Shell lines run before each worker starts (``module load ...``, ``export ...``).
    """

    partition: str | None = None
    account: str | None = None
    walltime: str = "04:00:00"
    memory: str = "16GB"
    cores: int = 4
    gpus_per_job: int = 0
    jobs: int = 1
    interface: str | None = None
    python: str | None = None
    log_dir: Path | None = None
    prologue: tuple[str, ...] = field(default_factory=tuple)

    def validated(self) -> SlurmOptions:
        """Return self after checking the numbers and the walltime; raise InputError otherwise."""
        if self.cores < 1 or self.jobs < 1 or self.gpus_per_job < 0:
            raise InputError(f"SLURM jobs need cores >= 1, jobs >= 1, gpus >= 0; got {self.cores}, {self.jobs}, {self.gpus_per_job}")
        if not re.fullmatch(r"(\d+-)?\d{1,3}(:\d\d){0,2}", self.walltime):
            raise InputError(f"walltime {self.walltime!r} is not a SLURM time such as 04:00:00 or 1-00:00:00")
        return self


class Executor:
    """Runs :func:`process_slide` over tasks; ``run`` yields outcomes in the order they finish."""

    def run(self, tasks: Sequence[SlideTask], job: BatchJob) -> Iterator[SlideOutcome]:
        """Process ``tasks``, yielding each outcome as it finishes."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the executor started (processes, clusters)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class LocalExecutor(Executor):
    """One slide after another in this process, with this process's model cache."""

    def __init__(self, *, device: str | None = None) -> None:
        self.device = device

    def run(self, tasks: Sequence[SlideTask], job: BatchJob) -> Iterator[SlideOutcome]:
        for task in tasks:
            yield process_slide(task, job, models=PROCESS_MODELS, device=self.device)


# -- one process per device ------------------------------------------------------------------
_POOL_DEVICE: str | None = None


def _init_pool_worker(devices: Any) -> None:
    """Pool initializer: take one device from the shared queue for the life of this process."""
    global _POOL_DEVICE
    _POOL_DEVICE = devices.get()
    if _POOL_DEVICE.startswith("cuda"):
        import torch

        index = int(_POOL_DEVICE.partition(":")[2] or 0)
        torch.cuda.set_device(index)
    log.info("worker %d uses %s", os.getpid(), _POOL_DEVICE)


def _pool_process(task: SlideTask, job: BatchJob) -> SlideOutcome:
    """Process a slide in a pool worker, on that worker's device."""
    return process_slide(task, job, models=PROCESS_MODELS, device=_POOL_DEVICE)


class DevicePoolExecutor(Executor):
    """One process per device (e.g. ``cuda:0``, ``cuda:1``); each takes the next slide when free.

    Processes are spawned (never forked: CUDA does not survive a fork) and each loads the model
    once, on its device. A worker process that dies (killed by the system, most often for lack of
    memory) takes only its own slide down: the pool starts again, the slides that were in flight
    run again one at a time (their locks, held by the dead processes, are taken back), and a slide
    whose lone worker dies is failed with that reason. ``target`` runs one slide in a worker.
    """

    def __init__(self, devices: Sequence[str], *, target: Callable[[SlideTask, BatchJob], SlideOutcome] = _pool_process) -> None:
        if not devices:
            raise InputError("give at least one device")
        self._devices, self._target = list(devices), target
        self._pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        for device in self._devices:
            queue.put(device)
        return ProcessPoolExecutor(max_workers=len(self._devices), mp_context=context, initializer=_init_pool_worker, initargs=(queue,))

    def run(self, tasks: Sequence[SlideTask], job: BatchJob) -> Iterator[SlideOutcome]:
        todo: deque[SlideTask] = deque(tasks)
        again: deque[SlideTask] = deque()  # in flight when a worker died: one at a time
        alone: set[str] = set()  # ids of slides run one at a time
        running: dict[Future, SlideTask] = {}
        while todo or again or running:
            solo = any(t.id in alone for t in running.values())
            while (again or todo) and len(running) < (1 if again or solo else len(self._devices)):
                task = (again or todo).popleft()
                running[self._pool.submit(self._target, task, job)] = task
                solo = solo or task.id in alone
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            died = any(isinstance(f.exception(), BrokenProcessPool) for f in done)
            for future in done:
                if not isinstance(future.exception(), BrokenProcessPool):
                    yield _outcome_of(future, running.pop(future))
            if died:
                lost = list(running.values())
                running.clear()
                self._restart(lost, job)
                for task in lost:
                    if task.id in alone:
                        reason = "the worker process running it alone died (killed by the system, out of memory?)"
                        log.error("%s: %s", task.id, reason)
                        yield SlideOutcome(str(task.slide), task.id, "failed", reason)
                    else:
                        alone.add(task.id)
                        again.append(task)

    def _restart(self, lost: Sequence[SlideTask], job: BatchJob) -> None:
        """A new pool after a worker died; the locks the dead processes held are taken back."""
        log.warning("a worker process died (killed by the system, out of memory?): %s run again, one at a time",
                    ", ".join(t.id for t in lost) or "no slide")
        self._pool.shutdown(wait=True, cancel_futures=True)  # reaps the dead processes
        for task in lost:
            LockFile(job.lock_path(task), stale_after_s=job.stale_after_s, heartbeat_s=None).reclaim_from_dead_owner()
        self._pool = self._start()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _outcome_of(future: Any, task: SlideTask) -> SlideOutcome:
    """A future's outcome; a worker that crashed (or any error outside the slide) makes a failed one."""
    try:
        return future.result()
    except Exception as exc:
        reason = failure_sentence(exc, lead="the worker processing it failed")
        log.error("%s: %s", task.id, reason)
        return SlideOutcome(str(task.slide), task.id, "failed", reason)


# -- Dask ---------------------------------------------------------------------------------------
class DaskExecutor(Executor):
    """Slides as tasks on a Dask cluster: an existing client, a scheduler address, or a new cluster.

    Parameters
    ----------
    client : distributed.Client, optional
        Use this client (not closed by :meth:`close`).
    scheduler : str, optional
        Address of a running scheduler (``tcp://host:8786``) or a scheduler file (``.json``).
    workers : int, optional
        Workers of a new ``LocalCluster`` (one thread each) when neither ``client`` nor
        ``scheduler`` is given.
    slurm : SlurmOptions, optional
        Start SLURM jobs as workers (``dask_jobqueue.SLURMCluster``) instead.
    out_dir : Path, optional
        The batch output folder (SLURM job logs go under it).
    connect_timeout_s : float
        How long to try to reach ``scheduler``.
    """

    def __init__(
        self,
        *,
        client: Client | None = None,
        scheduler: str | None = None,
        workers: int | None = None,
        slurm: SlurmOptions | None = None,
        out_dir: Path | None = None,
        connect_timeout_s: float = 60.0,
    ) -> None:
        try:
            from distributed import Client, LocalCluster
        except ImportError as exc:
            raise InputError("the dask and slurm executors need dask[distributed] (pip install 'wsimtl[cohort]')") from exc
        self._own: list[Any] = []
        self._cluster: Any = None  # a SLURMCluster whose ended jobs are replaced
        self._jobs = 0
        self.watch_s = 5.0
        gpus = 0
        if client is not None:
            self.client = client
        elif scheduler is not None:
            target = {"scheduler_file": scheduler} if scheduler.endswith(".json") else {"address": scheduler}
            try:
                self.client = Client(**target, timeout=f"{connect_timeout_s}s")
            except (OSError, TimeoutError) as exc:
                raise InputError(f"cannot connect to the Dask scheduler {scheduler}: {one_line(exc)}") from exc
            self._own.append(self.client)
        elif slurm is not None:
            cluster = _slurm_cluster(slurm.validated(), out_dir)
            self._cluster, self._jobs = cluster, slurm.jobs
            self._own.append(cluster)
            self.client = Client(cluster)
            self._own.insert(0, self.client)
            gpus = slurm.gpus_per_job
        else:
            if workers is not None and workers < 1:
                raise InputError(f"--dask-workers must be at least 1, got {workers}")
            import dask

            with dask.config.set({"distributed.worker.daemon": WORKER_DAEMON}):
                # each worker's share of the cores (wsi_mtl.devices.CPUS_ENV): torch threads and post-processing
                from ..devices import CPUS_ENV, cpu_count

                share = {CPUS_ENV: str(max(1, cpu_count() // (workers or 1)))}
                cluster = LocalCluster(n_workers=workers or 1, threads_per_worker=1, dashboard_address=None, env=share)
            self._own.append(cluster)
            self.client = Client(cluster)
            self._own.insert(0, self.client)
        from ._dask import PLUGIN_NAME, ModelCachePlugin

        self.client.register_plugin(ModelCachePlugin(gpus), name=PLUGIN_NAME)

    def run(self, tasks: Sequence[SlideTask], job: BatchJob) -> Iterator[SlideOutcome]:
        from distributed import wait

        from ._dask import dask_process

        if not tasks:
            return
        keys = [f"wsimtl-slide-{task.id}-{uuid.uuid4().hex[:8]}" for task in tasks]
        futures = self.client.map(dask_process, list(tasks), job=job, key=keys, pure=False)
        by_key = {future.key: task for future, task in zip(futures, tasks, strict=True)}
        pending = set(futures)
        try:
            while pending:
                try:
                    done = wait(list(pending), timeout=self.watch_s, return_when="FIRST_COMPLETED").done
                except TimeoutError:
                    done = set()
                for future in done:
                    pending.discard(future)
                    yield _outcome_of(future, by_key[future.key])
                    future.release()
                self._replace_ended_jobs()
        finally:  # interrupted: withdraw what has not run
            for future in futures:
                if not future.done():
                    future.cancel()

    def _replace_ended_jobs(self) -> None:
        """Submit new SLURM jobs for those that ended (walltime, pre-emption, node failure).

        ``SLURMCluster`` keeps the specification of a job whose worker is gone; scaling to the same
        number of jobs again starts a job for every such specification.
        """
        if self._cluster is not None and len(self._cluster.workers) < self._jobs:
            log.info("%d of %d SLURM worker jobs are running or queued; submitting replacements", len(self._cluster.workers), self._jobs)
            self._cluster.scale(jobs=self._jobs)

    def close(self) -> None:
        for item in self._own:
            with contextlib.suppress(Exception):
                item.close()
        self._own.clear()


def _import_slurm_cluster() -> Any:
    """Import ``dask_jobqueue.SLURMCluster`` without letting it take over Ctrl-C.

    dask-jobqueue sets a SIGINT handler (``sys.exit``) when imported, which fails outside the main
    thread and would turn Ctrl-C into a silent exit; the handler in place before is kept.
    """
    if sys.modules.get("dask_jobqueue") is None:
        real_signal = signal.signal
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.getsignal(signal.SIGINT) if in_main else None
        if not in_main:
            signal.signal = lambda *args, **kwargs: None  # type: ignore[assignment]
        try:
            import dask_jobqueue  # noqa: F401
        except ImportError as exc:
            raise InputError("the slurm executor needs dask-jobqueue (pip install 'wsimtl[cohort]')") from exc
        finally:
            signal.signal = real_signal
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
    from dask_jobqueue import SLURMCluster

    return SLURMCluster


def _slurm_cluster(options: SlurmOptions, out_dir: Path | None) -> Any:
    """Start a ``SLURMCluster`` with ``options.jobs`` jobs; each job runs one worker per GPU (or one)."""
    SLURMCluster = _import_slurm_cluster()
    log_dir = options.log_dir or ((out_dir or Path.cwd()) / ".slurm-logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    processes = max(1, options.gpus_per_job)
    directives = [f"--gres=gpu:{options.gpus_per_job}"] if options.gpus_per_job else []
    cluster = SLURMCluster(
        queue=options.partition,
        account=options.account,
        cores=processes,  # one thread per worker: one slide at a time per worker
        processes=processes,
        job_cpu=max(options.cores, processes),
        memory=options.memory,
        walltime=options.walltime,
        interface=options.interface,
        python=options.python or sys.executable,
        job_extra_directives=directives,
        job_script_prologue=[f"export DASK_DISTRIBUTED__WORKER__DAEMON={WORKER_DAEMON}", *options.prologue],
        log_directory=str(log_dir),
        job_name="wsimtl",
    )
    script = cluster.job_script()
    log.info("SLURM job script:\n%s", script)
    try:
        _check_job_script(script, log_dir)
    except BaseException:
        cluster.close()
        raise
    cluster.scale(jobs=options.jobs)
    return cluster


def _check_job_script(script: str, folder: Path) -> None:
    """Ask SLURM whether it would accept the worker job (``sbatch --test-only``); InputError if not.

    Without this, a job SLURM rejects (unknown partition or account, too many CPUs) leaves the
    batch waiting for workers that never come.
    """
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise InputError("the slurm executor needs SLURM's sbatch on PATH (run it on a cluster login node)")
    path = folder / f".wsimtl-job-{uuid.uuid4().hex}.sh"
    path.write_text(script, encoding="utf-8")
    try:
        check = subprocess.run([sbatch, "--test-only", str(path)], capture_output=True, text=True, check=False)
    finally:
        path.unlink(missing_ok=True)
    if check.returncode != 0:
        reason = " ".join((check.stderr or check.stdout).split()) or f"sbatch exit code {check.returncode}"
        raise InputError(f"SLURM rejects the worker job: {reason}")

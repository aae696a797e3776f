"""``run_batch``: a cohort of slides through one executor, resumable and safe to run twice at once."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ..errors import InputError, OutputError, WsimtlError
from ..postprocess import check_overrides
from ._executors import DaskExecutor, DevicePoolExecutor, Executor, LocalExecutor, SlurmOptions
from ._locks import LockFile, _validate_times
from ._manifest import SlideTask, collect_slides, take_shard
from ._slide import BatchJob, IsCompleteFn, LoadModelFn, SegmentFn, SegmentOptions, SlideOutcome, recorded_since, skipped_outcome
from ._summary import SUMMARY_NAME, update_summary

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["BatchResult", "CohortFailedError", "run_batch", "describe", "raise_for_failures", "local_devices"]

log = logging.getLogger(__name__)

ExecutorName = Literal["local", "dask", "slurm"]


class CohortFailedError(WsimtlError):
    """Some slides of a batch failed (the others finished); the summary names each failure."""

    exit_code = 3


@dataclass(frozen=True)
class BatchResult:
    """The outcome of a batch.

    Attributes
    ----------
    outcomes : tuple of SlideOutcome
        One per slide, in slide order.
    summary_path : Path
        ``OUT_DIR/batch_summary.csv``.
    """

    outcomes: tuple[SlideOutcome, ...]
    summary_path: Path

    def with_status(self, status: str) -> list[SlideOutcome]:
        """The outcomes with one status (``done``, ``skipped``, ``failed``)."""
        return [o for o in self.outcomes if o.status == status]

    @property
    def failed(self) -> list[SlideOutcome]:
        """The slides that failed."""
        return self.with_status("failed")

    @property
    def exit_code(self) -> int:
        """0 when every slide is done or skipped, 3 when some failed."""
        return CohortFailedError.exit_code if self.failed else 0

    def counts(self) -> dict[str, int]:
        """Slides per status."""
        return {status: len(self.with_status(status)) for status in ("done", "skipped", "failed")}


def _progress_bar(total: int, enabled: bool):  # noqa: ANN202 - tqdm or a stand-in
    """A tqdm bar over slides on stderr (disabled when ``enabled`` is False)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="slide", desc="slides", disable=not enabled, dynamic_ncols=True)


def _make_executor(
    executor: ExecutorName,
    *,
    devices: Sequence[str] | None,
    client: Client | None,
    scheduler: str | None,
    workers: int | None,
    slurm: SlurmOptions | None,
    out_dir: Path,
) -> Executor:
    """Build the executor named on the command line."""
    if executor == "local":
        if devices and len(devices) > 1:
            return DevicePoolExecutor(devices)
        return LocalExecutor(device=devices[0] if devices else None)
    if executor == "dask":
        return DaskExecutor(client=client, scheduler=scheduler, workers=workers, out_dir=out_dir)
    if executor == "slurm":
        return DaskExecutor(client=client, slurm=slurm or SlurmOptions(), out_dir=out_dir)
    raise InputError(f"unknown executor {executor!r}; use local, dask or slurm")


def local_devices(device: str, devices: Sequence[str] | None) -> list[str] | None:
    """The devices of the local executor, checked: ``devices`` if given, else every GPU for ``auto``.

    Parameters
    ----------
    device : str
        The ``--device`` option (``auto`` picks all CUDA GPUs when there are several).
    devices : sequence of str or None
        The ``--devices`` option.

    Returns
    -------
    list of str or None
        One entry per worker process; None for one in-process worker on ``device``.
    """
    import torch

    from ..engine import resolve_device

    if devices:
        for name in devices:
            resolve_device(name)  # a device this machine lacks fails now, not once per slide
        return list(devices)
    resolve_device(device)
    if device == "auto" and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        found = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        log.info("one worker process per GPU: %s", ", ".join(found))
        return found
    return None


def run_batch(
    slides: Iterable[str | os.PathLike[str] | SlideTask],
    out_dir: str | os.PathLike[str],
    *,
    options: SegmentOptions | None = None,
    executor: ExecutorName = "local",
    devices: Sequence[str] | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    slurm: SlurmOptions | None = None,
    client: Client | None = None,
    shard: tuple[int, int] | None = None,
    lock_timeout_s: float = 600.0,
    heartbeat_s: float | None = None,
    poll_s: float | None = None,
    progress: bool = True,
    segment_fn: SegmentFn | None = None,
    is_complete_fn: IsCompleteFn | None = None,
    load_model_fn: LoadModelFn | None = None,
) -> BatchResult:
    """Segment a cohort of slides into ``OUT_DIR/<id>/``, one failure never stopping the rest.

    Finished slides are skipped, half-done ones resume. Each slide is locked while it runs
    (``OUT_DIR/.locks/<id>.lock``), so any number of batches, processes or SLURM jobs can share
    one output folder: a slide another live worker holds is waited for, not redone. Each outcome
    is written to ``OUT_DIR/batch_summary.csv`` as it happens.

    Parameters
    ----------
    slides : iterable of path-like or SlideTask
        Slide files, folders, glob patterns or CSV manifests (see :func:`collect_slides`), or tasks.
    out_dir : path-like
        The output folder (created when missing).
    options : SegmentOptions, optional
        Per-slide options (model, device, batch size, tile size, objects).
    executor : {"local", "dask", "slurm"}
        Where slides run: this process (one process per device with several ``devices``), a Dask
        cluster (``client``, ``scheduler`` address, or a new ``LocalCluster`` of ``workers``), or
        SLURM jobs running Dask workers (``slurm``).
    devices : sequence of str, optional
        Devices for the local executor, one worker process each, e.g. ``["cuda:0", "cuda:1"]``
        (default: every GPU when ``options.device`` is ``auto`` and there are several).
    scheduler : str, optional
        Dask scheduler address or scheduler file.
    workers : int, optional
        Workers of a new Dask ``LocalCluster``.
    slurm : SlurmOptions, optional
        SLURM job settings for ``executor="slurm"``.
    client : distributed.Client, optional
        An existing Dask client (left open).
    shard : (int, int), optional
        ``(i, n)``: only every n-th slide of the path-sorted list, starting at the i-th.
    lock_timeout_s : float
        A slide lock whose heartbeat is older than this is stale (its owner died) and taken over.
    heartbeat_s : float, optional
        How often a held lock is refreshed (default: a tenth of ``lock_timeout_s``).
    poll_s : float, optional
        How often to look again at slides that other workers hold (default: ``heartbeat_s``, at most 10 s).
    progress : bool
        Show a progress bar over slides.
    segment_fn, is_complete_fn, load_model_fn : callable, optional
        Replacements for ``wsi_mtl.pipeline.segment_slide``, ``wsi_mtl.pipeline.is_complete`` and
        ``wsi_mtl.network.load_model`` (same signatures).

    Returns
    -------
    BatchResult
        Outcomes (``done``, ``skipped`` or ``failed`` with a one-line reason) and the summary path.
    """
    heartbeat_s = lock_timeout_s / 10 if heartbeat_s is None else heartbeat_s
    _validate_times(lock_timeout_s, heartbeat_s)
    poll_s = min(heartbeat_s, 10.0) if poll_s is None else poll_s
    items = list(slides)
    tasks = [t for t in items if isinstance(t, SlideTask)]
    paths = [t for t in items if not isinstance(t, SlideTask)]
    if paths:
        tasks.extend(collect_slides(paths))
    elif not tasks:
        raise InputError("no slides given")
    if shard is not None:
        tasks = take_shard(tasks, *shard)
        log.info("shard %d/%d: %d slides", shard[0], shard[1], len(tasks))
    options = options or SegmentOptions()
    options = replace(options, postprocess=tuple(check_overrides(dict(options.postprocess)).items()))  # bad names fail here, not per slide
    out = Path(out_dir).absolute()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder {out}: {exc.strerror}") from exc
    job = BatchJob(
        out_dir=out,
        options=options,
        stale_after_s=lock_timeout_s,
        heartbeat_s=heartbeat_s,
        started_at=time.time(),
        segment_fn=segment_fn,
        is_complete_fn=is_complete_fn,
        load_model_fn=load_model_fn,
    )
    if executor == "local":
        devices = local_devices(job.options.device, devices)
    outcomes: dict[str, SlideOutcome] = {}
    with (
        _make_executor(executor, devices=devices, client=client, scheduler=scheduler, workers=workers, slurm=slurm, out_dir=out) as runner,
        _progress_bar(len(tasks), progress) as bar,
    ):
        pending = list(tasks)
        while pending:
            busy: list[SlideTask] = []
            by_id = {task.id: task for task in pending}
            for outcome in runner.run(pending, job):
                if outcome.status == "busy":
                    busy.append(by_id[outcome.id])
                    continue
                if outcome.status == "failed":  # a worker that died (or failed outside the slide) wrote no row
                    update_summary(out, [outcome.row()], keep_recorded_since=job.started_at)
                outcomes[outcome.id] = outcome
                bar.update(1)
                bar.set_postfix_str(f"{outcome.id}: {outcome.status}", refresh=False)
            pending = _wait_for_others(busy, job, outcomes, bar, poll_s)
    ordered = tuple(outcomes[task.id] for task in tasks)
    return BatchResult(ordered, out / SUMMARY_NAME)


def _wait_for_others(busy: list[SlideTask], job: BatchJob, outcomes: dict[str, SlideOutcome], bar, poll_s: float) -> list[SlideTask]:  # noqa: ANN001
    """Wait until some slides held by other workers are released; return those to try again.

    A released slide that is complete counts as skipped; one that another worker failed during
    this batch takes that failure (it is not tried twice); any other (its worker died, or was
    interrupted) is tried again. A lock that went stale is tried again too (and taken over).
    """
    waiting = list(busy)
    while waiting:
        time.sleep(poll_s)
        retry, still = [], []
        for task in waiting:
            _, _, result_dir = job.placement(task)
            lock = LockFile(job.lock_path(task), stale_after_s=job.stale_after_s, heartbeat_s=None)
            if lock.path.exists() and not lock.is_stale():
                still.append(task)
                continue
            outcome: SlideOutcome | None = None
            if job.is_complete(result_dir):
                outcome = skipped_outcome(task, result_dir)
            else:
                row = recorded_since(job, task.id)
                if row is not None and row.get("status") == "failed":
                    outcome = SlideOutcome(str(task.slide), task.id, "failed", row.get("error", ""), float(row.get("seconds") or 0))
            if outcome is None:
                retry.append(task)
            else:
                outcomes[task.id] = outcome
                bar.update(1)
        if retry:
            return retry + still  # the executor tries them; those still held come back busy
        waiting = still
    return []


def describe(result: BatchResult) -> str:
    """One line: slides per status and where the summary is."""
    counts = result.counts()
    return f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed; summary: {result.summary_path}"


def raise_for_failures(result: BatchResult) -> None:
    """Raise :class:`CohortFailedError` (exit code 3) when some slides failed."""
    failed = result.failed
    if failed:
        raise CohortFailedError(f"{len(failed)} of {len(result.outcomes)} slides failed; see {result.summary_path}")


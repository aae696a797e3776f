"""``wsimtl batch``: a cohort of slides, resumable, on one machine, a Dask cluster or SLURM."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import InputError
from ._options import (
    allow_untrained_option,
    batch_size_option,
    check_model,
    deprecated_option,
    device_option,
    model_option,
    out_option,
    parse_settings,
    postprocess_option,
    precision_option,
    quiet_option,
    tile_size_option,
    tta_option,
)


def _devices(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    """Split ``cuda:0,cuda:1``."""
    if value is None:
        return None
    devices = [d.strip() for d in value.split(",") if d.strip()]
    if not devices:
        raise click.BadParameter("give devices such as cuda:0,cuda:1")
    return devices


def _shard(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    """Parse ``i/n``."""
    if value is None:
        return None
    from ..cohort import parse_shard

    try:
        return parse_shard(value)
    except InputError as exc:
        raise click.BadParameter(str(exc)) from exc


@click.command("batch")
@click.argument("inputs", nargs=-1, required=True)
@out_option
@model_option
@allow_untrained_option
@device_option
@precision_option
@batch_size_option
@tta_option
@tile_size_option
@click.option("--no-tissue-mask", is_flag=True, help="Process whole slides, background included.")
@click.option("--no-objects", is_flag=True, help="Stop at the maps (no polygons, tables or GeoJSON).")
@click.option("--executor", type=click.Choice(["local", "dask", "slurm"]), default="local", show_default=True, help="Where slides run: this machine, a Dask cluster, or SLURM jobs running Dask workers.")
@click.option("--devices", callback=_devices, default=None, help="local: one process per device, e.g. cuda:0,cuda:1 (default with --device auto: every GPU).")
@click.option("--scheduler", default=None, help="dask: address (tcp://host:8786) or scheduler file (.json) of a running scheduler.")
@click.option("--dask-workers", type=click.IntRange(min=1), default=None, help="dask: workers of a new local cluster (no --scheduler).")
@deprecated_option("--workers", "old_workers", use="--dask-workers", type=click.IntRange(min=1), default=None)
@click.option("--partition", default=None, help="slurm: partition of the worker jobs.")
@click.option("--account", default=None, help="slurm: account of the worker jobs.")
@click.option("--walltime", default="04:00:00", show_default=True, help="slurm: time limit of each worker job.")
@click.option("--memory", default="16GB", show_default=True, help="slurm: memory of each worker job.")
@click.option("--cores", type=click.IntRange(min=1), default=4, show_default=True, help="slurm: CPUs of each worker job.")
@click.option("--gpus-per-job", type=click.IntRange(min=0), default=0, show_default=True, help="slurm: GPUs of each worker job (one worker per GPU).")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True, help="slurm: number of worker jobs.")
@click.option("--interface", default=None, help="slurm: network interface of scheduler and workers (e.g. ib0; lo on a single node).")
@click.option("--job-prologue", multiple=True, help="slurm: shell line run before each worker starts (repeatable), e.g. 'module load cuda'.")
@click.option("--shard", callback=_shard, default=None, help="i/n: only every n-th slide of the sorted list, from the i-th (default: from SLURM_ARRAY_TASK_ID/COUNT).")
@click.option("--lock-timeout", type=click.FloatRange(min=1.0), default=600.0, show_default=True, help="Seconds without a heartbeat after which a slide lock is stale (its worker died) and is taken over.")
@click.option("--command", "command", type=click.Choice(["segment", "embed"]), default="segment", show_default=True,
              help="What runs on each slide: segment, or embed (patch features, `wsimtl embed`'s defaults; finished = embeddings listed in run.json).")
@postprocess_option
@quiet_option
def batch(inputs: tuple[str, ...], out_dir: Path, model: str | None, allow_untrained: bool, device: str, precision: str, batch_size: int | None,
          tta: str, tile_size: int | None, no_tissue_mask: bool, no_objects: bool, executor: str, devices: list[str] | None,
          scheduler: str | None, dask_workers: int | None, old_workers: int | None,
          partition: str | None, account: str | None, walltime: str, memory: str, cores: int, gpus_per_job: int, jobs: int,
          interface: str | None, job_prologue: tuple[str, ...], shard: tuple[int, int] | None, lock_timeout: float, postprocess: tuple[str, ...], quiet: bool, command: str = "segment") -> None:
    """Segment every slide of INPUTS into OUT/<id>/, skipping finished ones; exit 3 if some failed.

    INPUTS are slide files, folders, glob patterns ('tcga/**/*.svs') or CSV manifests (a 'slide' or
    'path' column; optional 'id' and 'mpp'). Several batches may share one OUT (locks keep each
    slide to one worker); rerun the same command to continue after an interruption.
    """
    from ..cohort import SegmentOptions, SlurmOptions, collect_slides, describe, raise_for_failures, run_batch, shard_from_env

    if devices and executor != "local":
        raise InputError("--devices is for the local executor; Dask and SLURM workers use --device")
    if scheduler and executor != "dask":
        raise InputError("--scheduler needs --executor dask")
    settings = tuple(parse_settings(postprocess).items())
    tasks = collect_slides(inputs)  # missing inputs are reported before torch loads
    check_model(model, allow_untrained=allow_untrained)
    options = SegmentOptions(model=model, device=device, precision=precision, batch_size=batch_size, tile_size=tile_size,
                             tissue_mask=not no_tissue_mask, objects=not no_objects, tta=int(tta),
                             postprocess=settings)
    slurm = SlurmOptions(partition=partition, account=account, walltime=walltime, memory=memory, cores=cores,
                         gpus_per_job=gpus_per_job, jobs=jobs, interface=interface, prologue=tuple(job_prologue))
    result = run_batch(tasks, out_dir, options=options, executor=executor, devices=devices, scheduler=scheduler,  # type: ignore[arg-type]
                       workers=dask_workers or old_workers, slurm=slurm if executor == "slurm" else None, shard=shard or shard_from_env(),
                       lock_timeout_s=lock_timeout, progress=not quiet, **_command_fns(command))
    if not quiet:
        click.echo(describe(result))
    for outcome in result.failed:
        click.echo(f"failed: {outcome.id}: {outcome.error}", err=True)
    raise_for_failures(result)


def _command_fns(command: str) -> dict:
    """The per-slide functions of ``--command`` for run_batch (segment: its defaults)."""
    if command != "embed":
        return {}
    from ..embed._batch import embed_for_batch, embedded, load_for_batch

    return {"segment_fn": embed_for_batch, "is_complete_fn": embedded, "load_model_fn": load_for_batch}

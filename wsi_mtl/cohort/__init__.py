"""Many slides: manifests, shards, lock files, a summary table, and local / Dask / SLURM executors.

The entry point is :func:`run_batch`; ``wsimtl batch`` is a thin layer over it. Dask and
dask-jobqueue are imported only by the ``dask`` and ``slurm`` executors.
"""

from __future__ import annotations

from ._batch import BatchResult, CohortFailedError, describe, raise_for_failures, run_batch
from ._executors import DaskExecutor, DevicePoolExecutor, Executor, LocalExecutor, SlurmOptions
from ._locks import LockFile, lock_owner, read_owner
from ._manifest import SLIDE_SUFFIXES, SlideTask, collect_slides, parse_shard, read_manifest, shard_from_env, take_shard
from ._slide import BatchJob, ModelCache, SegmentOptions, SlideOutcome, process_slide, resolve_device
from ._summary import SUMMARY_NAME, read_summary, update_summary

__all__ = [
    "BatchJob",
    "BatchResult",
    "CohortFailedError",
    "DaskExecutor",
    "DevicePoolExecutor",
    "Executor",
    "LocalExecutor",
    "LockFile",
    "ModelCache",
    "SLIDE_SUFFIXES",
    "SUMMARY_NAME",
    "SegmentOptions",
    "SlideOutcome",
    "SlideTask",
    "SlurmOptions",
    "collect_slides",
    "describe",
    "lock_owner",
    "parse_shard",
    "process_slide",
    "raise_for_failures",
    "read_manifest",
    "read_owner",
    "read_summary",
    "resolve_device",
    "run_batch",
    "shard_from_env",
    "take_shard",
    "update_summary",
]

"""Dask worker side of a batch: a worker-local model cache and the task that processes a slide."""

from __future__ import annotations

import re
from typing import Any

from distributed import WorkerPlugin, get_worker

from ._manifest import SlideTask
from ._slide import PROCESS_MODELS, BatchJob, ModelCache, SlideOutcome, process_slide

__all__ = ["PLUGIN_NAME", "ModelCachePlugin", "dask_process", "device_from_worker_name"]

PLUGIN_NAME = "wsimtl-model-cache"


def device_from_worker_name(name: str, gpus: int) -> str | None:
    """``cuda:k`` for the k-th worker of a job with ``gpus`` > 1 GPUs (dask names them ``<name>-<k>``).

    Examples
    --------
    >>> device_from_worker_name("SLURMCluster-3-1", 2), device_from_worker_name("SLURMCluster-3", 1)
    ('cuda:1', None)
    """
    match = re.search(r"-(\d+)$", name)
    if gpus > 1 and match:
        return f"cuda:{int(match.group(1)) % gpus}"
    return None


class ModelCachePlugin(WorkerPlugin):
    """Holds one worker's own :class:`ModelCache` (and, in a multi-GPU job, its GPU).

    Registered by the batch's client; tasks find it as ``get_worker().plugins[PLUGIN_NAME]``, so a
    worker loads the model for its first slide and reuses it for every later one.

    Parameters
    ----------
    gpus_per_job : int
        GPUs of each worker's job; with more than one, the job's k-th worker uses ``cuda:k``.
    """

    name = PLUGIN_NAME

    def __init__(self, gpus_per_job: int = 0) -> None:
        self.gpus = gpus_per_job
        self.models: ModelCache | None = None
        self.device: str | None = None

    def setup(self, worker: Any) -> None:
        """Create the worker's empty cache and pick its device."""
        self.models = ModelCache()
        self.device = device_from_worker_name(str(worker.name), self.gpus)

    def teardown(self, worker: Any) -> None:
        """Drop the worker's models."""
        self.models = None

    def __getstate__(self) -> dict[str, Any]:
        return {"gpus": self.gpus, "models": None, "device": None}


def dask_process(task: SlideTask, job: BatchJob) -> SlideOutcome:
    """Process a slide on a Dask worker with that worker's model cache (the process's elsewhere)."""
    try:
        plugin = get_worker().plugins.get(PLUGIN_NAME)
    except ValueError:  # not running on a worker
        plugin = None
    if not isinstance(plugin, ModelCachePlugin) or plugin.models is None:
        return process_slide(task, job, models=PROCESS_MODELS)
    return process_slide(task, job, models=plugin.models, device=plugin.device)

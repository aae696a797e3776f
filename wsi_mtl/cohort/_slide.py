"""One slide of a batch: skip it when finished, lock it, segment it, record the outcome."""

from __future__ import annotations

import inspect
import logging
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from ..errors import WsimtlError
from ._locks import LockFile, lock_owner
from ._manifest import SlideTask, _default_id
from ._summary import finished_at, read_summary, update_summary
from ..results import read_run

__all__ = ["SegmentOptions", "BatchJob", "SlideOutcome", "ModelCache", "process_slide", "recorded_since", "resolve_device", "one_line", "failure_sentence", "skipped_outcome"]

log = logging.getLogger(__name__)

Status = Literal["done", "skipped", "failed", "busy"]


@dataclass(frozen=True)
class SegmentOptions:
    """The per-slide options every slide of a batch shares (see ``wsi_mtl.pipeline.segment_slide``).

    ``model`` is a model name or path (loaded once per worker), ``device`` ``"auto"``, ``"cpu"``,
    ``"cuda"``, ``"cuda:1"`` or ``"mps"``, ``precision`` ``"auto"``, ``"fp32"``, ``"bf16"`` or
    ``"fp16"``, ``tta`` the test-time augmentation views (1 = off), ``postprocess`` (name, value)
    pairs that replace the model's post-processing settings (``segment_slide(postprocess=...)``);
    None keeps the pipeline's default.
    """

    model: str | None = None
    device: str = "auto"
    precision: str = "auto"
    batch_size: int | None = None
    tile_size: int | None = None
    workers: int | None = None
    tissue_mask: bool = True
    objects: bool = True
    tta: int = 1
    postprocess: tuple[tuple[str, float | int], ...] = ()


SegmentFn = Callable[..., Any]
IsCompleteFn = Callable[[Path], bool]
LoadModelFn = Callable[..., Any]


@dataclass(frozen=True)
class BatchJob:
    """Everything a worker needs to process any slide of one batch (picklable).

    Attributes
    ----------
    out_dir : Path
        The batch output folder.
    options : SegmentOptions
        Per-slide options.
    stale_after_s, heartbeat_s : float
        Slide lock timeout and heartbeat period.
    started_at : float
        ``time.time()`` when the batch started (failures recorded after it are this batch's).
    segment_fn, is_complete_fn, load_model_fn : callable or None
        Replacements for ``wsi_mtl.pipeline.segment_slide``, ``wsi_mtl.pipeline.is_complete`` and
        ``wsi_mtl.network.load_model`` (None: those).
    """

    out_dir: Path
    options: SegmentOptions = field(default_factory=SegmentOptions)
    stale_after_s: float = 600.0
    heartbeat_s: float = 60.0
    started_at: float = field(default_factory=time.time)
    segment_fn: SegmentFn | None = None
    is_complete_fn: IsCompleteFn | None = None
    load_model_fn: LoadModelFn | None = None

    def segment(self) -> SegmentFn:
        """The per-slide function."""
        if self.segment_fn is not None:
            return self.segment_fn
        from ..pipeline import segment_slide

        return segment_slide

    def is_complete(self, result_dir: Path) -> bool:
        """Whether ``result_dir`` holds a finished result."""
        if self.is_complete_fn is not None:
            return bool(self.is_complete_fn(result_dir))
        from ..results import is_complete

        return bool(is_complete(result_dir))

    def loader(self) -> LoadModelFn:
        """The model loader."""
        if self.load_model_fn is not None:
            return self.load_model_fn
        from ..network import load_model

        return load_model

    def names_results(self) -> bool:
        """Whether the per-slide function accepts ``name=`` (the result folder's name)."""
        try:
            return "name" in inspect.signature(self.segment()).parameters
        except (TypeError, ValueError):
            return False

    def placement(self, task: SlideTask) -> tuple[Path, dict[str, Any], Path]:
        """Where a slide's result goes: ``(out_dir argument, extra kwargs, result folder)``.

        The result folder is ``OUT_DIR/<id>``. A per-slide function without ``name=`` writes
        ``<out_dir>/<slide stem>``: for an id other than the stem it gets ``OUT_DIR/<id>`` as its
        output folder, so the result lands in ``OUT_DIR/<id>/<stem>``.
        """
        if self.names_results():
            return self.out_dir, {"name": task.id}, self.out_dir / task.id
        stem = _default_id(task.slide)
        if task.id == stem:
            return self.out_dir, {}, self.out_dir / stem
        return self.out_dir / task.id, {}, self.out_dir / task.id / stem

    def lock_path(self, task: SlideTask) -> Path:
        """The slide's lock file."""
        return self.out_dir / ".locks" / f"{task.id}.lock"


@dataclass(frozen=True)
class SlideOutcome:
    """What happened to one slide.

    ``status`` is ``done`` (segmented now), ``skipped`` (already finished), ``failed`` (``error``
    says why, in one line) or ``busy`` (another live worker holds its lock).
    """

    slide: str
    id: str
    status: Status
    error: str = ""
    seconds: float = 0.0
    objects: Mapping[str, int] = field(default_factory=dict)
    result_dir: str = ""
    summary: Mapping[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """The slide's ``batch_summary.csv`` row."""
        owner = lock_owner()
        row: dict[str, Any] = {
            "slide": self.slide,
            "id": self.id,
            "status": self.status,
            "error": self.error,
            "seconds": f"{self.seconds:.1f}",
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "host": owner["host"],
            "job": owner["job"] or "",
        }
        row.update({f"objects_{task}": n for task, n in self.objects.items()})
        row.update({f"summary_{name}": v for name, v in self.summary.items()})  # wsi_mtl.summary
        return row


class ModelCache:
    """Loaded models keyed by (loader, name, device): each worker loads a model once, not once per slide."""

    def __init__(self) -> None:
        self._models: dict[tuple[LoadModelFn, str | None, str], Any] = {}
        self._lock = threading.Lock()

    def get(self, name: str | None, device: str, loader: LoadModelFn) -> Any:
        """Return the cached model, loading it with ``loader(name, device=device)`` the first time."""
        key = (loader, name, device)
        with self._lock:
            if key not in self._models:
                log.info("loading model %s on %s", name or "(default)", device)
                self._models[key] = loader(name, device=device)
            return self._models[key]

    def clear(self) -> None:
        """Drop every model (they are freed once no caller holds them)."""
        with self._lock:
            self._models.clear()

    def __len__(self) -> int:
        return len(self._models)


#: The cache of this process (used outside Dask workers).
PROCESS_MODELS = ModelCache()


def resolve_device(device: str) -> str:
    """Turn ``"auto"`` into ``cuda``, ``mps`` or ``cpu`` (whatever is present); keep anything else."""
    if device != "auto":
        return device
    from ..devices import resolve_device as _resolve

    return str(_resolve("auto"))


def one_line(exc: BaseException) -> str:
    """A one-line reason: a WsimtlError's message; ``Type: message`` for anything else."""
    text = " ".join(str(exc).split())
    if isinstance(exc, WsimtlError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _frame_text(frame: traceback.FrameSummary) -> str:
    """``package/module.py:line (function)`` with the path cut after its last site-packages or wsi_mtl."""
    parts = Path(frame.filename).parts
    cut = max((i for i, part in enumerate(parts) if part in ("site-packages", "lib") or part.startswith("python3")), default=-1)
    if "wsi_mtl" in parts:
        cut = len(parts) - 1 - parts[::-1].index("wsi_mtl") - 1
    kept = parts[cut + 1:] if cut >= 0 else parts[-2:]
    return f"{'/'.join(kept)}:{frame.lineno} ({frame.name})"


def failure_sentence(exc: BaseException, lead: str = "unexpected error (a bug, please report it)") -> str:
    """Why a slide failed, in one line: a WsimtlError's message; for any other exception a sentence
    after ``lead`` naming it, where it was raised (and the last wsimtl line on the way) and its message.

    Examples
    --------
    >>> failure_sentence(ValueError(""))  # doctest: +ELLIPSIS
    'unexpected error (a bug, please report it): ValueError with no message'
    """
    if isinstance(exc, WsimtlError):
        return one_line(exc)
    text = " ".join(str(exc).split())
    frames = traceback.extract_tb(exc.__traceback__)
    sentence = f"{lead}: {type(exc).__name__}"
    if frames:
        sentence += f" raised at {_frame_text(frames[-1])}"
        ours = [f for f in frames if "wsi_mtl" in Path(f.filename).parts]
        if ours and ours[-1] is not frames[-1]:
            sentence += f" from {_frame_text(ours[-1])}"
    return f"{sentence}: {text}" if text else f"{sentence} with no message"


def _object_counts(run: Mapping[str, Any] | None) -> dict[str, int]:
    """Objects per task from a run.json dict (``objects: {task: {class: n}}``)."""
    counts: dict[str, int] = {}
    objects = (run or {}).get("objects") or {}
    if isinstance(objects, Mapping):
        for task, per_class in objects.items():
            if isinstance(per_class, Mapping):
                counts[str(task)] = int(sum(int(n) for n in per_class.values()))
            elif isinstance(per_class, int | float):
                counts[str(task)] = int(per_class)
    return counts


def skipped_outcome(task: SlideTask, result_dir: Path) -> SlideOutcome:
    """The outcome of a slide found finished."""
    run = read_run(result_dir)
    return SlideOutcome(str(task.slide), task.id, "skipped", objects=_object_counts(run), result_dir=str(result_dir),
                        summary=(run or {}).get("summary") or {})


def recorded_since(job: BatchJob, slide_id: str) -> dict[str, str] | None:
    """The slide's summary row if it was written (done, failed, skipped) since this batch started."""
    row = read_summary(job.out_dir).get(slide_id)
    if row is None:
        return None
    when = finished_at(row)
    return row if when is not None and when >= job.started_at else None


def process_slide(task: SlideTask, job: BatchJob, *, models: ModelCache | None = None, device: str | None = None) -> SlideOutcome:
    """Process one slide of a batch unless it is finished or another worker holds it.

    A finished slide is skipped. Otherwise the slide's lock is taken (or the slide reported
    ``busy``), the model is fetched from ``models`` (loaded on first use), the slide is segmented,
    and its row is written to ``batch_summary.csv`` before the lock is released. An exception
    raised by the per-slide function becomes a ``failed`` outcome; it never propagates.

    Parameters
    ----------
    task : SlideTask
        The slide.
    job : BatchJob
        The batch.
    models : ModelCache, optional
        This worker's models (default: the process cache).
    device : str, optional
        The device of this worker, overriding ``job.options.device``.

    Returns
    -------
    SlideOutcome
    """
    models = PROCESS_MODELS if models is None else models
    out_arg, extra, result_dir = job.placement(task)
    if job.is_complete(result_dir):
        outcome = skipped_outcome(task, result_dir)
        # keep the row of a worker that finished it in this batch (even one written a moment ago)
        update_summary(job.out_dir, [outcome.row()], keep_recorded_since=job.started_at)
        return outcome
    lock = LockFile(job.lock_path(task), stale_after_s=job.stale_after_s, heartbeat_s=job.heartbeat_s)
    if not lock.acquire():
        log.info("%s is being processed by another worker; later", task.id)
        return SlideOutcome(str(task.slide), task.id, "busy", result_dir=str(result_dir))
    try:
        if job.is_complete(result_dir):  # finished between the check and the lock
            outcome = skipped_outcome(task, result_dir)
            update_summary(job.out_dir, [outcome.row()], keep_recorded_since=job.started_at)
            return outcome
        outcome = _segment(task, job, models, device, out_arg, extra, result_dir)
        if lock.lost:
            log.error("%s: the lock was taken over while segmenting; another worker may have redone it", task.id)
        update_summary(job.out_dir, [outcome.row()])  # before the lock goes, so waiters see the outcome
        return outcome
    finally:
        lock.release()


def _segment(
    task: SlideTask, job: BatchJob, models: ModelCache, device: str | None, out_arg: Path, extra: dict[str, Any], result_dir: Path
) -> SlideOutcome:
    """Run the per-slide function; any exception becomes a failed outcome."""
    options = job.options
    start = time.perf_counter()
    try:
        device = resolve_device(device or options.device)
        model = models.get(options.model, device, job.loader())
        result = job.segment()(
            task.slide,
            out_arg,
            model=model,
            mpp=task.mpp,
            device=device,
            precision=options.precision,
            batch_size=options.batch_size,
            tile_size=options.tile_size,
            workers=options.workers,
            tissue_mask=options.tissue_mask,
            objects=options.objects,
            tta=options.tta,
            postprocess=dict(options.postprocess),
            progress=False,
            **extra,
        )
    except Exception as exc:  # one slide failing never stops the batch
        reason = failure_sentence(exc)
        if isinstance(exc, WsimtlError):
            log.warning("%s failed: %s", task.id, reason)
        else:
            log.error("%s failed unexpectedly: %s", task.id, reason, exc_info=True)
        return SlideOutcome(str(task.slide), task.id, "failed", reason, time.perf_counter() - start, result_dir=str(result_dir))
    run = getattr(result, "run", None)
    where = getattr(result, "result_dir", result_dir)
    return SlideOutcome(str(task.slide), task.id, "done", "", time.perf_counter() - start, _object_counts(run), str(where),
                        summary=(run or {}).get("summary") or {} if isinstance(run, Mapping) else {})

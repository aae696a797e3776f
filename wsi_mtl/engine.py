"""Streaming tiled inference: reader threads -> batches on the device -> a writer thread -> zarr.

Nothing here holds more than a few batches of tiles in memory: tiles are read by a bounded pool of
threads in the order they are needed, the network runs on the calling thread, and a single writer
thread turns each batch's cores into zarr chunks and records them in the resume log.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from .devices import resolve_device
from .errors import DamagedRegionError, InputError
from .network.tta import predict_tta
from .store import PredictionStore
from .tiling import Tile, TileGrid

__all__ = ["resolve_device", "resolve_precision", "run_inference", "EngineStats", "cpu_count"]

log = logging.getLogger(__name__)


class _Readable(Protocol):
    mpp: float

    def read(self, x: int, y: int, width: int, height: int, *, mpp: float) -> np.ndarray: ...


def cpu_count() -> int:
    """CPU cores this process may use (respects affinity masks and cgroup-limited schedulers)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return max(1, os.cpu_count() or 1)


def _cpu_has_bf16() -> bool:
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None) or getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe and probe())
    except Exception:  # pragma: no cover - defensive: probing must never fail a run
        return False


def resolve_precision(device: torch.device, requested: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``device``: None means full fp32.

    ``auto`` picks bf16 on CPUs with native bf16 (it doubles throughput here and agrees with fp32
    within the tolerance tested in ``tests/test_network.py``), fp16 on CUDA, fp32 elsewhere.
    """
    requested = (requested or "auto").lower()
    if requested not in {"auto", "fp32", "bf16", "fp16"}:
        raise InputError(f"unknown precision {requested!r}; use auto, fp32, bf16 or fp16")
    if requested == "fp32":
        return None
    if requested == "bf16":
        return torch.bfloat16
    if requested == "fp16":
        if device.type == "cpu":
            raise InputError("fp16 is not supported on the CPU; use bf16 or fp32")
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and _cpu_has_bf16():
        return torch.bfloat16
    return None


@dataclass
class EngineStats:
    """What one inference pass did and where its time went (seconds)."""

    tiles_total: int = 0
    tiles_resumed: int = 0
    tiles_computed: int = 0
    damaged: list[dict[str, Any]] = field(default_factory=list)
    network_s: float = 0.0
    wait_read_s: float = 0.0
    wait_write_s: float = 0.0
    wall_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "tiles_total": self.tiles_total,
            "tiles_resumed": self.tiles_resumed,
            "tiles_computed": self.tiles_computed,
            "damaged_regions": self.damaged,
            "network_s": round(self.network_s, 3),
            "wait_read_s": round(self.wait_read_s, 3),
            "wait_write_s": round(self.wait_write_s, 3),
            "wall_s": round(self.wall_s, 3),
        }


def _read_tile(slide: _Readable, grid: TileGrid, tile: Tile, mpp: float) -> tuple[np.ndarray | None, dict[str, Any] | None]:
    m = grid.margin_px
    try:
        image = slide.read(tile.x0 - m, tile.y0 - m, grid.input_px, grid.input_px, mpp=mpp)
    except DamagedRegionError as exc:
        ds = mpp / slide.mpp
        region = {
            "x": round((tile.x0 - m) * ds), "y": round((tile.y0 - m) * ds),
            "width": round(grid.input_px * ds), "height": round(grid.input_px * ds),
            "error": str(exc),
        }
        log.warning("damaged region skipped: %s", exc)
        return None, region
    return image, None


class _Writer(threading.Thread):
    """Writes finished batches to the store in order; errors surface on the calling thread."""

    def __init__(self, store: PredictionStore, depth: int = 2) -> None:
        super().__init__(name="wsimtl-writer", daemon=True)
        self.store = store
        self.jobs: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.bar: Any = None

    def run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if self.error is not None:
                continue
            try:
                for tile, outputs, damaged in job:
                    if outputs is not None:
                        self.store.write_tile(tile, outputs)
                    self.store.mark_done(tile, damaged=damaged)
                    if self.bar is not None:
                        self.bar.update(1)
            except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread
                self.error = exc

    def put(self, job: Any) -> float:
        """Queue a job; returns the seconds spent waiting for room."""
        if self.error is not None:
            raise self.error
        t0 = time.perf_counter()
        self.jobs.put(job)
        return time.perf_counter() - t0

    def finish(self) -> None:
        self.jobs.put(None)
        self.join()
        if self.error is not None:
            raise self.error


def _cores_to_uint8(probs: dict[str, torch.Tensor], grid: TileGrid, tiles: list[Tile], cell_px: dict[str, int]) -> list[dict[str, np.ndarray]]:
    """Crop each tile's core out of the batch outputs and quantise it to uint8 (round(255 * p)).

    Cropping first means the margin, ~40% of a tile, is never converted or copied.
    """
    per_tile: list[dict[str, np.ndarray]] = [{} for _ in tiles]
    for name, p in probs.items():
        cell = cell_px[name]
        m = grid.margin_px // cell
        for i, tile in enumerate(tiles):
            h, w = -(-tile.height // cell), -(-tile.width // cell)
            core = p[i, :, m : m + h, m : m + w]
            # probabilities lie in [0, 1], so 255 p + 0.5 lies in [0.5, 255.5): truncation rounds
            q = core.mul(255.0).add_(0.5).clamp_(max=255.0).to(torch.uint8)
            per_tile[i][name] = (q.cpu() if q.device.type != "cpu" else q).numpy()
    return per_tile


def run_inference(
    slide: _Readable,
    model: Any,
    grid: TileGrid,
    tiles: list[Tile],
    store: PredictionStore,
    *,
    mpp: float,
    device: torch.device,
    batch_size: int = 4,
    precision: torch.dtype | None = None,
    workers: int = 2,
    progress: bool = True,
    tta: int = 1,
) -> EngineStats:
    """Run ``model`` over ``tiles`` of ``slide`` at ``mpp`` and write every core into ``store``.

    ``tta`` > 1 averages the maps over that many dihedral views of each batch
    (:func:`wsi_mtl.network.tta.predict_tta`), at one network pass per view.

    Tiles already in ``store.done`` are skipped (resume). A tile whose region fails to decode is
    recorded as damaged (its outputs stay zero) and the run goes on.
    """
    stats = EngineStats(tiles_total=len(tiles))
    todo = [t for t in tiles if t.key not in store.done]
    stats.tiles_resumed = len(tiles) - len(todo)
    cell_px = {h.name: h.cell_px for h in store.heads}
    t_start = time.perf_counter()
    writer = _Writer(store)
    writer.bar = tqdm(total=len(tiles), initial=stats.tiles_resumed, unit="tile", desc="tiles", disable=not progress, dynamic_ncols=True, smoothing=0.1)
    writer.start()
    autocast = torch.autocast(device.type, dtype=precision) if precision is not None else nullcontext()
    pin = device.type == "cuda"
    prefetch = max(2 * batch_size, workers * 2)
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="wsimtl-reader") as pool:
            pending: deque[tuple[Tile, Future]] = deque()
            it = iter(todo)

            def fill() -> None:
                while len(pending) < prefetch:
                    tile = next(it, None)
                    if tile is None:
                        return
                    pending.append((tile, pool.submit(_read_tile, slide, grid, tile, mpp)))

            fill()
            while pending:
                batch: list[tuple[Tile, np.ndarray]] = []
                job: list[tuple[Tile, dict[str, np.ndarray] | None, dict[str, Any] | None]] = []
                t0 = time.perf_counter()
                while pending and len(batch) < batch_size:
                    tile, fut = pending.popleft()
                    image, damaged = fut.result()
                    fill()
                    if image is None:
                        job.append((tile, None, damaged))
                        stats.damaged.append(damaged)
                    else:
                        batch.append((tile, image))
                stats.wait_read_s += time.perf_counter() - t0
                if batch:
                    x = torch.from_numpy(np.stack([im for _, im in batch]))
                    if pin:
                        x = x.pin_memory()
                    # NHWC uint8 -> NCHW float that is channels_last in memory: no copy of layout
                    x = x.to(device, non_blocking=pin).permute(0, 3, 1, 2).float()
                    t0 = time.perf_counter()
                    with torch.inference_mode(), autocast:
                        probs = predict_tta(model, x, views=tta)
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        stats.network_s += time.perf_counter() - t0
                        # cropped and quantised here: in the writer thread, torch's ops would fight the
                        # network's own threads for the cores (measured 1.44x network time vs 1.17x)
                        cores = _cores_to_uint8(probs, grid, [t for t, _ in batch], cell_px)
                    job.extend((tile, out, None) for (tile, _), out in zip(batch, cores))
                stats.wait_write_s += writer.put(job)
                stats.tiles_computed += len(job)
    finally:
        try:
            writer.finish()
        finally:
            writer.bar.close()
            stats.wall_s = time.perf_counter() - t_start
    stats.damaged = list(store.damaged)
    return stats

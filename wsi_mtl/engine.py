"""Streaming tiled inference: reader threads -> batches on the device -> a writer thread -> zarr.

Nothing here holds more than a few batches of tiles in memory: tiles are read by a bounded pool of
threads in the order they are needed, the network runs on the calling thread, and a single writer
thread turns each batch's cores into zarr chunks and records them in the resume log.
"""

from __future__ import annotations

import inspect
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from .devices import cpu_count, resolve_device, resolve_precision  # re-exported: engine's public names
from .errors import DamagedRegionError
from .malloc import release_if_grown
from .network.model import quantize_probabilities
from .network.tta import predict_tta
from .store import PredictionStore
from .tiling import Tile, TileGrid

__all__ = ["resolve_device", "resolve_precision", "run_inference", "EngineStats", "cpu_count", "damaged_regions"]

log = logging.getLogger(__name__)


class _Readable(Protocol):
    mpp: float

    def read(self, x: int, y: int, width: int, height: int, *, mpp: float) -> np.ndarray: ...


@dataclass
class EngineStats:
    """What one inference pass did and where its time went (seconds)."""

    tiles_total: int = 0
    tiles_resumed: int = 0
    tiles_computed: int = 0
    damaged: list[dict[str, Any]] = field(default_factory=list)
    damaged_fraction: float = 0.0
    network_s: float = 0.0
    wait_read_s: float = 0.0
    wait_write_s: float = 0.0
    wall_s: float = 0.0
    runtime: str = "torch"  # what ran the network (wsi_mtl.network.runtime)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tiles_total": self.tiles_total,
            "tiles_resumed": self.tiles_resumed,
            "tiles_computed": self.tiles_computed,
            "damaged_regions": self.damaged,
            "damaged_fraction": round(self.damaged_fraction, 4),
            "network_s": round(self.network_s, 3),
            "wait_read_s": round(self.wait_read_s, 3),
            "wait_write_s": round(self.wait_write_s, 3),
            "wall_s": round(self.wall_s, 3),
        }


def _read_tile(slide: _Readable, grid: TileGrid, tile: Tile, mpp: float) -> tuple[np.ndarray | None, dict[str, Any] | None]:
    """The tile's input image and its damage record (None when it read cleanly).

    A read that is damaged in parts returns the image (damaged parts white) and a record
    ``{"regions": [...]}`` of those parts; a read that failed as a whole returns no image and
    one region covering the tile's input.
    """
    m = grid.margin_px
    try:
        image = slide.read(tile.x0 - m, tile.y0 - m, grid.input_px, grid.input_px, mpp=mpp)
    except DamagedRegionError as exc:
        log.debug("damaged region: %s", exc)
        if exc.image is not None:
            regions = [{"x": bx, "y": by, "width": bw, "height": bh, "error": reason}
                       for (bx, by, bw, bh), reason in zip(exc.boxes, exc.reasons)]
            return exc.image, {"regions": regions}
        ds = mpp / slide.mpp
        region = {
            "x": round((tile.x0 - m) * ds), "y": round((tile.y0 - m) * ds),
            "width": round(grid.input_px * ds), "height": round(grid.input_px * ds),
            "error": str(exc),
        }
        return None, region
    return image, None


def damaged_regions(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The store's per-tile damage records as one list of regions, each box once."""
    seen: set[tuple[int, int, int, int]] = set()
    out = []
    for record in records:
        for region in record.get("regions", [record]):
            key = (region["x"], region["y"], region["width"], region["height"])
            if key not in seen:
                seen.add(key)
                out.append(region)
    return out


def _blank_damaged(cores: dict[str, np.ndarray], tile: Tile, regions: list[dict[str, Any]], ds: float,
                   cell_px: dict[str, int]) -> None:
    """Set every head's core to 0 ("no data") where a damaged region (level-0 px, ``ds`` per model px) lies."""
    for region in regions:
        mx0 = math.floor(region["x"] / ds) - tile.x0
        my0 = math.floor(region["y"] / ds) - tile.y0
        mx1 = math.ceil((region["x"] + region["width"]) / ds) - tile.x0
        my1 = math.ceil((region["y"] + region["height"]) / ds) - tile.y0
        for name, core in cores.items():
            cell = cell_px[name]
            y0, x0 = max(0, my0 // cell), max(0, mx0 // cell)
            y1, x1 = max(0, -(-my1 // cell)), max(0, -(-mx1 // cell))
            core[:, y0:y1, x0:x1] = 0


class _Writer(threading.Thread):
    """Writes finished batches to the store in order; errors surface on the calling thread."""

    def __init__(self, store: PredictionStore, depth: int = 2, on_tile: Callable[[tuple[int, int]], None] | None = None) -> None:
        super().__init__(name="wsimtl-writer", daemon=True)
        self.store = store
        self.on_tile = on_tile
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
                    if self.on_tile is not None:
                        self.on_tile(tile.key)
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


def _takes_margin(model: Any) -> bool:
    """Whether ``model.predict`` computes the maps of a tile's core itself (a ``margin`` parameter:
    torch's :class:`~wsi_mtl.network.MultiTaskNet`; an exported graph computes whole tiles)."""
    return _takes(model, "margin")


def _takes(model: Any, parameter: str) -> bool:
    """Whether ``model.predict`` has ``parameter``."""
    try:
        return parameter in inspect.signature(model.predict).parameters
    except (AttributeError, TypeError, ValueError):
        return False


def _cores_to_uint8(probs: dict[str, torch.Tensor], grid: TileGrid, tiles: list[Tile], cell_px: dict[str, int]) -> list[dict[str, np.ndarray]]:
    """Crop each tile's core out of the batch outputs and quantise it to uint8 (round(255 * p);
    maps the model made uint8 itself are only cropped).

    Cropping first means the margin, ~40% of a tile, is never converted or copied. A map that
    covers the input less its margin (``predict(x, margin=...)``) is the core region already.
    """
    per_tile: list[dict[str, np.ndarray]] = [{} for _ in tiles]
    for name, p in probs.items():
        cell = cell_px[name]
        m = grid.margin_px // cell if p.shape[-2] * cell >= grid.input_px else 0
        for i, tile in enumerate(tiles):
            h, w = -(-tile.height // cell), -(-tile.width // cell)
            core = p[i, :, m : m + h, m : m + w]
            q = quantize_probabilities(core) if core.is_floating_point() else core  # uint8: the model's own
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
    runtime: str = "torch",
    on_tile: Callable[[tuple[int, int]], None] | None = None,
    threads: Callable[[Tile], int] | None = None,
    branches: bool = False,
) -> EngineStats:
    """Run ``model`` over ``tiles`` of ``slide`` at ``mpp`` and write every core into ``store``.

    ``tta`` > 1 averages the maps over that many dihedral views of each batch
    (:func:`wsi_mtl.network.tta.predict_tta`), at one network pass per view.
    ``runtime`` (``auto | torch | openvino | onnx``, :mod:`wsi_mtl.network.runtime`) runs the model
    through an exported graph where asked and possible (else torch); ``stats.runtime`` says which ran.

    ``on_tile`` is called with each tile's key (row, col) once the tile is written and recorded
    (on the writer thread), e.g. to post-process the map regions that are complete
    (:class:`wsi_mtl.postprocess._overlap.OverlapExtractor`). ``threads`` gives the torch CPU
    threads that run each tile (a batch never mixes two counts), e.g. every core until that
    post-processing has work; it must depend on the tile only, so that a resumed run computes each
    tile as an uninterrupted one does. ``branches`` (torch on the CPU): a tile run on one torch thread
    computes its decoders and full-resolution strips on two threads (``model.predict``'s helper:
    the same maps), so the network also takes a core that the post-processing leaves idle.

    Tiles already in ``store.done`` are skipped (resume). A tile whose region fails to decode is
    recorded as damaged (its outputs stay zero, "no data") and the run goes on; where only some of
    the slide's tiles under it are damaged (corrupt JPEG data included), the network sees them white
    and the maps store 0 over exactly those tiles. ``stats.damaged`` lists each damaged region once.
    """
    stats = EngineStats(tiles_total=len(tiles))
    todo = [t for t in tiles if t.key not in store.done]
    stats.tiles_resumed = len(tiles) - len(todo)
    if runtime != "torch" and todo:
        from .network.runtime import make_runner, resolve_runtime

        model, stats.runtime = make_runner(model, resolve_runtime(runtime, device, model), precision=precision)
    cell_px = {h.name: h.cell_px for h in store.heads}
    margin = grid.margin_px if _takes_margin(model) and grid.margin_px % 2 == 0 else 0  # odd: whole tiles, cropped here
    helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wsimtl-branch") if (
        branches and device.type == "cpu" and _takes(model, "helper")) else None
    t_start = time.perf_counter()
    writer = _Writer(store, on_tile=on_tile)
    writer.bar = tqdm(total=len(tiles), initial=stats.tiles_resumed, unit="tile", desc="tiles", disable=not progress, dynamic_ncols=True, smoothing=0.1)
    writer.start()
    autocast = torch.autocast(device.type, dtype=precision) if precision is not None else nullcontext()
    pin = device.type == "cuda"
    prefetch = max(2 * batch_size, workers * 2)
    quantized = _takes(model, "quantized")  # uint8 maps strip by strip: a quarter of the float32 maps' memory
    plan = getattr(slide, "plan_reads", None)
    if plan is not None:  # the tile cache keeps what neighbouring tiles share, and only that
        m = grid.margin_px
        plan([(t.x0 - m, t.y0 - m, grid.input_px, grid.input_px) for t in todo], mpp=mpp)
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
                batch: list[tuple[Tile, np.ndarray, dict[str, Any] | None]] = []
                job: list[tuple[Tile, dict[str, np.ndarray] | None, dict[str, Any] | None]] = []
                t0 = time.perf_counter()
                want = threads(pending[0][0]) if threads is not None else None
                while pending and len(batch) < batch_size and (want is None or threads(pending[0][0]) == want):
                    tile, fut = pending.popleft()
                    image, damaged = fut.result()
                    fill()
                    if image is None:
                        job.append((tile, None, damaged))
                    else:
                        batch.append((tile, image, damaged))
                stats.wait_read_s += time.perf_counter() - t0
                if batch:
                    if want is not None and want != torch.get_num_threads():
                        torch.set_num_threads(want)
                    x = torch.from_numpy(np.stack([im for _, im, _ in batch]))
                    if pin:
                        x = x.pin_memory()
                    # NHWC uint8 -> NCHW uint8 that is channels_last in memory (no copy of layout); the
                    # model scales it to float in one copy, where a float input would be a second
                    x = x.to(device, non_blocking=pin).permute(0, 3, 1, 2)
                    t0 = time.perf_counter()
                    with torch.inference_mode(), autocast:
                        beside = helper if helper is not None and torch.get_num_threads() == 1 else None
                        probs = predict_tta(model, x, views=tta, margin=margin, helper=beside, quantized=quantized)
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        stats.network_s += time.perf_counter() - t0
                        # cropped and quantised here: in the writer thread, torch's ops would fight the
                        # network's own threads for the cores (measured 1.44x network time vs 1.17x)
                        cores = _cores_to_uint8(probs, grid, [t for t, _, _ in batch], cell_px)
                    for (tile, _, damaged), out in zip(batch, cores):
                        if damaged is not None:
                            _blank_damaged(out, tile, damaged["regions"], mpp / slide.mpp, cell_px)
                        job.append((tile, out, damaged))
                stats.wait_write_s += writer.put(job)
                stats.tiles_computed += len(job)
                release_if_grown()  # the heap's unreused pieces (wsi_mtl.malloc)
    finally:
        if helper is not None:
            helper.shutdown()
        try:
            writer.finish()
        finally:
            writer.bar.close()
            stats.wall_s = time.perf_counter() - t_start
    stats.damaged = damaged_regions(store.damaged)
    return stats

"""Per-object embeddings: encoder features averaged over each object's pixels.

The slide of a finished ``segment`` result is read in tiles (``core_px`` cores on a grid at the
encoder's resolution, plus a ``margin_px`` context margin each side). For every object whose
bounding box meets a tile's core, the object's polygon (clipped to the core) is rasterised at the
encoder's resolution and each encoder level's map is averaged over it, weighting every map cell by
the number of the object's pixels it covers. Sums and pixel counts add up over tiles, so objects of
any size (nuclei, glands, tissue regions) get the mean over all their pixels. An object too thin to
cover a pixel centre takes the pixel at its centroid.

Output ``object_embeddings.parquet``: ``id`` (as ``objects.parquet``), ``task``, ``pixels`` (at the
encoder's mpp) and ``f0 .. f{D-1}`` (float32): ``objects.merge(emb, on="id")`` joins them.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..atomic import atomic_path
from ..devices import cpu_count, resolve_device, resolve_precision
from ..errors import DamagedRegionError, InputError
from ..results import TABLE, read_run
from ._encoders import LEVELS, PatchEncoder, load_encoder

__all__ = ["embed_objects", "OBJECT_EMBEDDINGS", "rasterize", "pool_levels"]

log = logging.getLogger(__name__)

OBJECT_EMBEDDINGS = "object_embeddings.parquet"
_CORE_PX = 512
_MARGIN_PX = 64


def rasterize(geom: Any, x0: float, y0: float, height: int, width: int, scale: float) -> np.ndarray:
    """Boolean mask of the pixels whose centres lie in ``geom`` (level-0 px) on a ``height`` x ``width``
    window of the grid of ``scale`` level-0 px per pixel, the window's top-left pixel being (``x0``, ``y0``)."""
    from shapely import get_parts
    from skimage.draw import polygon as fill

    mask = np.zeros((height, width), bool)
    for part in get_parts(geom):
        if part.geom_type != "Polygon" or part.is_empty:
            continue
        ext = np.asarray(part.exterior.coords) / scale
        rr, cc = fill(ext[:, 1] - y0 - 0.5, ext[:, 0] - x0 - 0.5, (height, width))
        mask[rr, cc] = True
        for ring in part.interiors:
            hole = np.asarray(ring.coords) / scale
            rr, cc = fill(hole[:, 1] - y0 - 0.5, hole[:, 0] - x0 - 0.5, (height, width))
            mask[rr, cc] = False
    return mask


def pool_levels(maps: Sequence[np.ndarray], mask: np.ndarray, top: int, left: int, strides: Sequence[int]) -> np.ndarray:
    """Sum over ``mask``'s pixels of each level's cell features (concatenated), ``mask`` placed at model px
    (``top``, ``left``) of the maps' input; every level's cells weighted by the pixels they hold."""
    out = []
    ys, xs = np.nonzero(mask)
    ys, xs = ys + top, xs + left
    for fmap, s in zip(maps, strides):
        cells = (ys // s) * fmap.shape[2] + xs // s
        idx, counts = np.unique(cells, return_counts=True)
        flat = fmap.reshape(fmap.shape[0], -1)
        out.append(flat[:, idx] @ counts.astype(np.float32))
    return np.concatenate(out)


def _objects(result_dir: Path, tasks: Sequence[str] | None) -> pd.DataFrame:
    import geopandas as gpd

    path = result_dir / TABLE
    if not path.is_file():
        raise InputError(f"{result_dir} has no {TABLE}: run `wsimtl segment` (without --no-objects) first")
    table = gpd.read_parquet(path, columns=["id", "task", "centroid_x_px", "centroid_y_px", "geometry"])
    if tasks:
        unknown = sorted(set(tasks) - set(table["task"]))
        if unknown:
            raise InputError(f"no objects of task(s) {', '.join(unknown)} in {path} (tasks: {', '.join(sorted(set(table['task'])))})")
        table = table[table["task"].isin(list(tasks))].reset_index(drop=True)
    return table


def _buckets(bounds: np.ndarray, core: int, rows: int, cols: int) -> dict[tuple[int, int], list[int]]:
    """Tile (row, col) -> indices of objects whose box (model px: x0, y0, x1, y1) meets that core."""
    out: dict[tuple[int, int], list[int]] = defaultdict(list)
    c0 = np.clip(np.floor(bounds[:, 0] / core), 0, cols - 1).astype(int)
    r0 = np.clip(np.floor(bounds[:, 1] / core), 0, rows - 1).astype(int)
    c1 = np.clip(np.floor(bounds[:, 2] / core), 0, cols - 1).astype(int)
    r1 = np.clip(np.floor(bounds[:, 3] / core), 0, rows - 1).astype(int)
    for i in range(len(bounds)):
        for r in range(r0[i], r1[i] + 1):
            for c in range(c0[i], c1[i] + 1):
                out[(r, c)].append(i)
    return out


class _Pooler:
    """Adds each tile's contribution to every object's feature sum and pixel count."""

    def __init__(self, table: pd.DataFrame, dim: int, ds: float) -> None:
        self.geoms = table.geometry.to_numpy()
        self.cx = table["centroid_x_px"].to_numpy() / ds
        self.cy = table["centroid_y_px"].to_numpy() / ds
        self.sums = np.zeros((len(table), dim), np.float64)
        self.pixels = np.zeros(len(table), np.int64)
        self.ds = ds

    def add(self, maps: list[np.ndarray], strides: list[int], idx: list[int], bounds: np.ndarray, tx: int, ty: int,
            core: int, margin: int) -> None:
        for i in idx:
            bx0, by0, bx1, by1 = bounds[i]
            x0, y0 = max(tx, int(np.floor(bx0))), max(ty, int(np.floor(by0)))
            x1, y1 = min(tx + core, int(np.ceil(bx1)) + 1), min(ty + core, int(np.ceil(by1)) + 1)
            if x1 <= x0 or y1 <= y0:
                continue
            mask = rasterize(self.geoms[i], x0, y0, y1 - y0, x1 - x0, self.ds)
            if not mask.any():
                cx, cy = int(np.floor(self.cx[i])), int(np.floor(self.cy[i]))
                if not (x0 <= cx < x1 and y0 <= cy < y1) or self.pixels[i] > 0:
                    continue
                mask[cy - y0, cx - x0] = True
            self.sums[i] += pool_levels(maps, mask, y0 - ty + margin, x0 - tx + margin, strides)
            self.pixels[i] += int(mask.sum())


def embed_objects(
    result_dir: str | Path,
    *,
    model: Any = None,
    arch: str | None = None,
    levels: str = "deepest",
    tasks: Sequence[str] | None = None,
    device: str = "auto",
    precision: str = "auto",
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    core_px: int = _CORE_PX,
    margin_px: int = _MARGIN_PX,
) -> Any:
    """Encoder features pooled over each object of a ``segment`` result into ``object_embeddings.parquet``
    (see module doc); recorded in run.json under ``embed_objects``. Returns an :class:`EmbedResult`."""
    from ..slide import open_slide
    from ._slide import EmbedResult, update_run_json

    result_dir = Path(result_dir)
    if levels not in LEVELS:
        raise InputError(f"levels must be one of {', '.join(LEVELS)}, not {levels!r}")
    run = read_run(result_dir)
    if not run or not (run.get("slide") or {}).get("path"):
        raise InputError(f"{result_dir} is not a segment result folder (no run.json naming its slide)")
    out = result_dir / OBJECT_EMBEDDINGS
    if out.is_file() and not overwrite:
        log.info("%s exists (overwrite recomputes)", out)
        return EmbedResult(result_dir, run.get("embed_objects") or {})
    t_start = time.perf_counter()
    table = _objects(result_dir, tasks)
    dev = resolve_device(device)
    amp = resolve_precision(dev, precision)
    encoder = load_encoder(model, device=dev, arch=arch)
    stride = encoder.multiple
    core = max(stride, core_px // stride * stride)
    margin = -(-margin_px // stride) * stride
    slide_info = run["slide"]
    override = slide_info.get("mpp") if slide_info.get("mpp_source") == "override" else None
    with open_slide(slide_info["path"], mpp=override) as slide:
        ds = encoder.mpp / slide.mpp
        h, w = slide.size_at(encoder.mpp)
        rows, cols = -(-h // core), -(-w // core)
        bounds = np.asarray(table.geometry.bounds, np.float64).reshape(-1, 4) / ds
        buckets = _buckets(bounds, core, rows, cols)
        pooler = _Pooler(table, encoder.dim(levels), ds)
        damaged = _run_tiles(slide, encoder, pooler, buckets, bounds, core=core, margin=margin, levels=levels, dev=dev, amp=amp,
                             workers=workers or min(4, max(2, cpu_count())), progress=progress)
    with np.errstate(invalid="ignore", divide="ignore"):
        feats = (pooler.sums / pooler.pixels[:, None]).astype(np.float32)
    frame = pd.DataFrame({"id": table["id"].to_numpy(), "task": table["task"].to_numpy(), "pixels": pooler.pixels})
    frame = pd.concat([frame, pd.DataFrame(feats, columns=[f"f{j}" for j in range(feats.shape[1])])], axis=1)
    with atomic_path(out) as tmp:
        frame.to_parquet(tmp, index=False)
    info = {"encoder": encoder.describe(), "levels": levels, "dim": int(feats.shape[1]), "objects": int(len(frame)),
            "tasks": sorted(set(frame["task"])), "mpp": encoder.mpp, "tile_core_px": core, "tile_margin_px": margin,
            "without_pixels": int((pooler.pixels == 0).sum()), "damaged_regions": damaged,
            "timings_s": {"total": round(time.perf_counter() - t_start, 3)}}
    update_run_json(result_dir, "embed_objects", info, [out])
    return EmbedResult(result_dir, info)


def _read(slide: Any, x: int, y: int, size: int, mpp: float) -> tuple[np.ndarray | None, str | None]:
    try:
        return slide.read(x, y, size, size, mpp=mpp), None
    except DamagedRegionError as exc:
        log.warning("damaged region skipped: %s", exc)
        return None, str(exc)


def _run_tiles(slide: Any, encoder: PatchEncoder, pooler: _Pooler, buckets: dict[tuple[int, int], list[int]], bounds: np.ndarray, *,
               core: int, margin: int, levels: str, dev: torch.device, amp: torch.dtype | None, workers: int,
               progress: bool) -> list[dict[str, Any]]:
    size = core + 2 * margin
    keys = sorted(buckets)
    damaged: list[dict[str, Any]] = []
    autocast = torch.autocast(dev.type, dtype=amp) if amp is not None else nullcontext()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wsimtl-embed-reader") as pool, \
            tqdm(total=len(keys), unit="tile", desc="objects", disable=not progress, dynamic_ncols=True) as bar:
        futures = [pool.submit(_read, slide, c * core - margin, r * core - margin, size, encoder.mpp) for r, c in keys[: 2 * workers]]
        for k, (r, c) in enumerate(keys):
            image, error = futures[k].result()
            futures[k] = None  # type: ignore[call-overload]
            if k + 2 * workers < len(keys):
                rr, cc = keys[k + 2 * workers]
                futures.append(pool.submit(_read, slide, cc * core - margin, rr * core - margin, size, encoder.mpp))
            bar.update(1)
            if image is None:
                damaged.append({"tile": [r, c], "error": error})
                continue
            x = torch.from_numpy(image).permute(2, 0, 1)[None].float().to(dev)
            with torch.inference_mode(), autocast:
                maps = encoder._levels(x)
            if levels == "deepest":
                maps = maps[-1:]
            arrays = [m[0].float().cpu().numpy() for m in maps]
            strides = [size // a.shape[-1] for a in arrays]
            pooler.add(arrays, strides, buckets[(r, c)], bounds, c * core, r * core, core, margin)
    return damaged

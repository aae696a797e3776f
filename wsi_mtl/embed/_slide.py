"""``embed`` over one slide: tissue patches -> reader threads -> encoder batches -> embeddings.zarr.

Every patch is read and encoded on its own (no feature sharing between overlapping patches), so a
patch's vector is the one the encoder gives for that patch alone, whatever the stride. Reads run
ahead of the encoder in a bounded thread pool (as ``segment``'s engine); results are written one
row chunk at a time and a rerun resumes from the finished chunks.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..atomic import atomic_path, output_error, write_json_atomic
from ..devices import cpu_count, resolve_device, resolve_precision
from ..results import RUN_JSON, file_entry, read_run, result_dir_for
from ..errors import DamagedRegionError, InputError, NoTissueError, OutputError
from ._encoders import LEVELS, PatchEncoder, load_encoder
from ._grid import PatchGrid, patch_table, tissue_fractions
from ._store import EmbeddingStore, open_embeddings

__all__ = ["embed_slide", "EmbedResult", "PATCHES", "head_columns", "update_run_json"]

log = logging.getLogger(__name__)

PATCHES = "patches.parquet"
_CHUNK_ROWS = 1024
#: neighbouring patches of a patch row read in one region (when that gives the same pixels)
_BLOCK_PATCHES = 8
#: decoded-tile cache of the slide during embed (vertical neighbours of a patch row reuse its tiles)
_TILE_CACHE_BYTES = 32 * 2**20
_MASK_MPP = 8.0
_DEFAULT_BATCH = {"cpu": 16, "cuda": 128, "mps": 32}


@dataclass(frozen=True)
class EmbedResult:
    """Where the embeddings went and the ``embed`` section written into run.json."""

    result_dir: Path
    info: dict[str, Any]


def head_columns(head: str, classes: Sequence[str]) -> list[str]:
    """Parquet column names of a head's probabilities: ``p_<head>_<class>`` (lower case, ``-`` as ``_``)."""
    h = head.lower().replace("-", "_").replace("#", "_")
    return [f"p_{h}_{str(c).lower().replace('-', '_').replace(' ', '_')}" for c in classes]


def update_run_json(result_dir: Path, section: str, info: dict[str, Any], files: Sequence[Path]) -> dict[str, Any]:
    """Add ``section`` and ``files`` (replacing entries of the same path) to run.json (created if absent)."""
    run = read_run(result_dir) or {"wsimtl_version": __version__, "status": section,
                                   "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "files": []}
    run[section] = info
    new = [file_entry(result_dir, f) for f in files]
    paths = {e["path"] for e in new}
    run["files"] = [e for e in run.get("files", []) if e.get("path") not in paths] + new
    write_json_atomic(result_dir / RUN_JSON, run)
    return run


def _read_patch(slide: Any, gx: int, gy: int, size: int, mpp: float) -> tuple[np.ndarray | None, str | None]:
    try:
        return slide.read(int(gx), int(gy), size, size, mpp=mpp), None
    except DamagedRegionError as exc:
        log.warning("damaged patch skipped: %s", exc)
        return None, str(exc)


def _read_block(slide: Any, gxs: Sequence[int], gy: int, size: int, mpp: float) -> list[tuple[np.ndarray | None, str | None]]:
    """Patches of one patch row (top-lefts ``gxs``, ascending) cut from one region read; a damaged
    region is read again patch by patch so that only its damaged patches are lost."""
    if len(gxs) == 1:
        return [_read_patch(slide, gxs[0], gy, size, mpp)]
    x0 = int(gxs[0])
    try:
        region = slide.read(x0, int(gy), int(gxs[-1]) - x0 + size, size, mpp=mpp)
    except DamagedRegionError:
        return [_read_patch(slide, gx, gy, size, mpp) for gx in gxs]
    return [(region[:, int(gx) - x0: int(gx) - x0 + size], None) for gx in gxs]


def _exact_blocks(slide: Any, mpp: float) -> bool:
    """True when a region read at ``mpp`` gives, cut into patches, the very pixels of each patch read
    alone: the slide's level is read unscaled or reduced by a whole factor, on a grid aligned with the
    level's pixels (otherwise the resampling kernel depends on the region, and patches are read alone)."""
    ds = mpp / slide.mpp
    lds = slide.levels[slide.best_level(ds)][2]
    ratio = ds / lds
    k = round(ratio)
    if k < 1 or abs(ratio - k) > 1e-9:
        return False
    return all(abs(o / lds - round(o / lds)) < 1e-9 for o in slide.offset)


def _blocks(gx: np.ndarray, gy: np.ndarray, rows: Iterator[int], stride: int, most: int) -> Iterator[list[int]]:
    """``rows`` (in order) grouped into runs of neighbouring patches of one patch row, ``most`` at most."""
    block: list[int] = []
    for row in rows:
        if block and (len(block) >= most or row != block[-1] + 1 or gy[row] != gy[block[-1]] or gx[row] - gx[block[-1]] != stride):
            yield block
            block = []
        block.append(row)
    if block:
        yield block


def _prefetched(pool: ThreadPoolExecutor, slide: Any, table: pd.DataFrame, rows: Iterator[int], size: int, mpp: float,
                depth: int, *, stride: int = 0, block: int = 1) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
    """(row, image or None, error) in order, with at most ``depth`` patches in flight; neighbouring
    patches of a patch row are read ``block`` at a time (see :func:`_read_block`)."""
    pending: deque[tuple[list[int], Future]] = deque()
    gx, gy = table["gx"].to_numpy(), table["gy"].to_numpy()
    in_flight = 0
    for rs in _blocks(gx, gy, rows, stride, max(1, block)):
        pending.append((rs, pool.submit(_read_block, slide, [int(gx[r]) for r in rs], int(gy[rs[0]]), size, mpp)))
        in_flight += len(rs)
        while in_flight >= depth:
            done, fut = pending.popleft()
            in_flight -= len(done)
            for r, result in zip(done, fut.result()):
                yield (r, *result)
    while pending:
        done, fut = pending.popleft()
        for r, result in zip(done, fut.result()):
            yield (r, *result)


def _bound_tile_cache(slide: Any) -> None:
    """Cap the slide's decoded-tile cache at :data:`_TILE_CACHE_BYTES`: patches are read row by row
    and neighbours of a patch row in one region, so little is reused, and a cache that fills up to its
    default size (256 MB) makes memory grow with the slide's area."""
    slide.limit_tile_cache(_TILE_CACHE_BYTES)


@dataclass
class _Run:
    encoder: PatchEncoder
    device: torch.device
    amp: torch.dtype | None
    batch_size: int
    levels: str
    network_s: float = 0.0
    read_wait_s: float = 0.0

    def encode(self, images: list[np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        x = torch.from_numpy(np.stack(images)).to(self.device).permute(0, 3, 1, 2).float()
        t0 = time.perf_counter()
        autocast = torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None else nullcontext()
        with torch.inference_mode(), autocast:
            feats, probs = self.encoder.encode(x, self.levels)
        out = feats.float().cpu().numpy(), {k: v.float().cpu().numpy() for k, v in probs.items()}
        self.network_s += time.perf_counter() - t0
        return out


def _embed_chunks(run: _Run, slide: Any, table: pd.DataFrame, store: EmbeddingStore, *, size: int, mpp: float,
                  workers: int, progress: bool, stride: int = 0, block: int = 1) -> list[dict[str, Any]]:
    """Encode every patch of the chunks not yet done, writing each chunk once its rows are all seen
    (rows arrive in order); returns the damaged patches."""
    todo = [c for c in range(store.chunks) if c not in store.done]
    remaining = sum(store.rows(c)[1] - store.rows(c)[0] for c in todo)
    rows = (r for c in todo for r in range(*store.rows(c)))
    damaged: list[dict[str, Any]] = []
    bar = tqdm(total=len(table), initial=len(table) - remaining, unit="patch", desc="patches", disable=not progress,
               dynamic_ncols=True, smoothing=0.1)
    current: dict[str, Any] | None = None
    batch: list[tuple[int, np.ndarray]] = []
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wsimtl-embed-reader") as pool:
            t0 = time.perf_counter()
            for row, image, error in _prefetched(pool, slide, table, rows, size, mpp, depth=max(2 * run.batch_size, 4 * workers),
                                                   stride=stride, block=block):
                run.read_wait_s += time.perf_counter() - t0
                c = row // store.chunk_rows
                if current is None or current["chunk"] != c:
                    _finish_chunk(run, store, current, batch)
                    current, batch = _new_chunk(store, c), []
                if image is None:
                    damaged.append({k: int(table[k].iat[row]) for k in ("id", "x", "y", "width", "height")} | {"error": error})
                else:
                    batch.append((row, image))
                if len(batch) >= run.batch_size:
                    _encode_into(run, current, batch, store.chunk_rows)
                    batch = []
                bar.update(1)
                t0 = time.perf_counter()
            _finish_chunk(run, store, current, batch)
    finally:
        bar.close()
    return damaged


def _new_chunk(store: EmbeddingStore, c: int) -> dict[str, Any]:
    r0, r1 = store.rows(c)
    return {"chunk": c, "features": np.full((r1 - r0, store.dim), np.nan, np.float32),
            "probs": {h: np.full((r1 - r0, n), np.nan, np.float32) for h, n in store.heads.items()}}


def _encode_into(run: _Run, current: dict[str, Any], batch: list[tuple[int, np.ndarray]], chunk_rows: int) -> None:
    feats, probs = run.encode([im for _, im in batch])
    local = np.array([r % chunk_rows for r, _ in batch])
    current["features"][local] = feats
    probs.update(run.encoder.probe_probabilities(feats, run.levels))
    for name, p in probs.items():
        current["probs"][name][local] = p


def _finish_chunk(run: _Run, store: EmbeddingStore, current: dict[str, Any] | None, batch: list[tuple[int, np.ndarray]]) -> None:
    """Encode what is left of the chunk's batch and write the chunk (damaged rows stay NaN)."""
    if current is None:
        return
    if batch:
        _encode_into(run, current, batch, store.chunk_rows)
    store.write_chunk(current["chunk"], current["features"], current["probs"])


def _write_patches(result_dir: Path, table: pd.DataFrame, store: EmbeddingStore, encoder: PatchEncoder,
                   damaged: list[dict[str, Any]]) -> Path:
    """patches.parquet: the patch table plus every head's probabilities (read back from the store)."""
    out = table.drop(columns=["gx", "gy"]).copy()
    out["damaged"] = out["id"].isin([d["id"] for d in damaged])
    for head, classes in encoder.head_classes.items():
        probs = np.asarray(store.root[f"probs/{head}"][:], np.float32)
        for j, col in enumerate(head_columns(head, classes)):
            out[col] = probs[:, j]
    path = result_dir / PATCHES
    with atomic_path(path) as tmp:
        out.to_parquet(tmp, index=False)
    return path


def _prepare(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(exc, path) or OutputError(f"cannot create output folder {path}: {exc.strerror or exc}") from exc


def _finished(result_dir: Path, fingerprint: dict[str, Any]) -> bool:
    """True when embeddings.zarr and patches.parquet exist and were made with ``fingerprint``."""
    if not (result_dir / PATCHES).is_file():
        return False
    try:
        made = open_embeddings(result_dir).attrs.get("fingerprint")
    except Exception:  # noqa: BLE001 - unreadable or absent store: not finished
        return False
    return made == json.loads(json.dumps(fingerprint))


def _geometry(slide: Any, mpp: float | None, encoder: PatchEncoder, patch_px: int, stride_px: int | None) -> tuple[float, PatchGrid, float]:
    mpp = float(mpp or encoder.mpp)
    encoder.check_patch(patch_px)
    stride = int(stride_px or patch_px)
    if stride < 1:
        raise InputError(f"stride must be at least 1 px, got {stride}")
    h, w = slide.size_at(mpp)
    return mpp, PatchGrid(h, w, patch_px, stride), mpp / slide.mpp


def embed_slide(
    slide_path: str | Path,
    out_dir: str | Path,
    *,
    model: Any = None,
    arch: str | None = None,
    mpp: float | None = None,
    slide_mpp: float | None = None,
    patch_size: int = 224,
    stride: int | None = None,
    levels: str = "deepest",
    min_tissue: float = 0.0,
    tissue_mask: bool = True,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    float16: bool = False,
    probes: Sequence[str | Path] = (),
    overwrite: bool = False,
    progress: bool = True,
    name: str | None = None,
) -> EmbedResult:
    """One feature vector per tissue patch of a slide, into ``out_dir/<slide name>/``.

    Parameters
    ----------
    model : name, folder, checkpoint file or loaded encoder, optional
        Our model (default: the shipped one) or a ResNet-50 / DenseNet-121 checkpoint in
        torchvision's layout (``arch`` names which when the keys do not tell).
    mpp, patch_size, stride : embedding resolution (default: the encoder's; 0.5 for external
        ones), patch side and lattice step in px at that resolution (stride default: patch size).
    slide_mpp : overrides the slide's own microns per pixel.
    levels : ``deepest`` (pooled deepest map) or ``all`` (pooled maps of every level, concatenated).
    min_tissue : a patch is kept when more than this fraction of it is tissue.
    float16 : store the features as float16 (half the size) instead of float32.
    probes : saved ``wsimtl probe`` classifiers applied as extra heads.

    Writes ``embeddings.zarr`` and ``patches.parquet`` and an ``embed`` section (with the slide-level
    mean and max vectors) in run.json. A finished result with the same settings is left alone
    unless ``overwrite``; an interrupted one resumes from its finished chunks.
    """
    from ..slide import open_slide
    from ..tissue import compute_tissue_mask

    if levels not in LEVELS:
        raise InputError(f"levels must be one of {', '.join(LEVELS)}, not {levels!r}")
    if not 0.0 <= min_tissue < 1.0:
        raise InputError(f"min tissue fraction must be in [0, 1), got {min_tissue}")
    t_start = time.perf_counter()
    slide_path = Path(slide_path)
    result_dir = result_dir_for(slide_path, out_dir, name=name)
    dev = resolve_device(device)
    amp = resolve_precision(dev, precision)
    encoder = load_encoder(model, device=dev, mpp=mpp, arch=arch, probes=probes)
    slide = open_slide(slide_path, mpp=slide_mpp)
    try:
        emb_mpp, grid, ds = _geometry(slide, mpp, encoder, patch_size, stride)
        fingerprint = {"wsimtl": __version__, "encoder": encoder.name, "weights_sha256": encoder.weights_sha256, "mpp": emb_mpp,
                       "patch_px": grid.patch_px, "stride_px": grid.stride_px, "levels": levels, "min_tissue": min_tissue,
                       "tissue_mask": tissue_mask, "slide_size": [slide.width, slide.height], "slide_mpp": slide.mpp,
                       "precision": str(amp), "float16": float16, "heads": encoder.head_classes}
        if not overwrite and _finished(result_dir, fingerprint):
            log.info("%s already has embeddings with these settings (overwrite recomputes)", result_dir)
            return EmbedResult(result_dir, (read_run(result_dir) or {}).get("embed") or {"fingerprint": fingerprint})
        _prepare(result_dir)
        t0 = time.perf_counter()
        tissue = compute_tissue_mask(slide, mask_mpp=max(_MASK_MPP, emb_mpp))
        if tissue_mask and tissue.empty:
            raise NoTissueError(f"no tissue found in {slide_path.name}; use --no-tissue-mask to embed it anyway")
        table = patch_table(grid, downsample=ds, tissue=tissue if tissue_mask else None, mpp=emb_mpp, min_tissue=min_tissue)
        if not tissue_mask:
            table["tissue_fraction"] = tissue_fractions(tissue, table[["gx", "gy"]].to_numpy(), grid.patch_px, mpp=emb_mpp)
        if table.empty:
            raise NoTissueError(f"no patch of {slide_path.name} has more than {min_tissue:.0%} tissue")
        mask_s = time.perf_counter() - t0
        if dev.type == "cpu":
            torch.set_num_threads(cpu_count())
        run = _Run(encoder, dev, amp, batch_size or _DEFAULT_BATCH.get(dev.type, 16), levels)
        attrs = {"encoder": encoder.describe(), "mpp": emb_mpp, "patch_size_px": grid.patch_px, "stride_px": grid.stride_px,
                 "patch_size_level0_px": int(round(grid.patch_px * ds)), "levels": levels, "slide": str(slide_path.resolve()),
                 "rows": "one per row of patches.parquet (same order, column id)", "wsimtl_version": __version__}
        store = EmbeddingStore(result_dir, n=len(table), dim=encoder.dim(levels), heads={k: len(v) for k, v in encoder.head_classes.items()},
                               chunk_rows=_CHUNK_ROWS, dtype="float16" if float16 else "float32", fingerprint=fingerprint, attrs=attrs)
        resumed = len(store.done)
        t0 = time.perf_counter()
        _bound_tile_cache(slide)
        damaged = _embed_chunks(run, slide, table, store, size=grid.patch_px, mpp=emb_mpp,
                                workers=workers or min(4, max(2, cpu_count())), progress=progress,
                                stride=grid.stride_px, block=_BLOCK_PATCHES if _exact_blocks(slide, emb_mpp) else 1)
        embed_s = time.perf_counter() - t0
        patches = _write_patches(result_dir, table, store, encoder, damaged)
        mean, peak = store.slide_vectors()
        final = store.finalize(damaged_patches=len(damaged), fingerprint=fingerprint)
    finally:
        slide.close()
    info = {
        "fingerprint": fingerprint, "encoder": encoder.describe(), "mpp": emb_mpp, "patch_size_px": grid.patch_px,
        "stride_px": grid.stride_px, "levels": levels, "dim": encoder.dim(levels), "patches": len(table),
        "chunks_resumed": resumed, "damaged_patches": damaged, "device": str(dev), "batch_size": run.batch_size,
        "precision": str(amp).replace("torch.", "") if amp is not None else "fp32",
        "timings_s": {"tissue_mask": round(mask_s, 3), "embed": round(embed_s, 3), "network": round(run.network_s, 3),
                      "read_wait": round(run.read_wait_s, 3),
                      "total": round(time.perf_counter() - t_start, 3)},
        "slide_vector": {"mean": [float(f"{v:.6g}") for v in mean], "max": [float(f"{v:.6g}") for v in peak]},
    }
    update_run_json(result_dir, "embed", info, [final, patches])
    if not encoder.trained:
        log.warning("encoder %s is UNTRAINED (random weights): its features are meaningless", encoder.name)
    return EmbedResult(result_dir, info)


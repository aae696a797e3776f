"""One slide end to end: slide -> tissue mask -> tiles -> network -> predictions.zarr -> objects -> run.json."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .atomic import output_error, write_json_atomic
from .engine import cpu_count, resolve_device, resolve_precision, run_inference
from .network.tta import TTA_VIEWS
from .errors import InputError, NoTissueError, OutputError
from .store import PREDICTIONS, HeadLayout, PredictionStore
from .tiling import Tile, kept_fraction, plan_tiles

__all__ = ["SlideResult", "segment_slide", "is_complete", "result_dir_for", "read_run", "RUN_JSON"]

log = logging.getLogger(__name__)

RUN_JSON = "run.json"
# Larger cores waste less on context (the margin is paid per tile): with the default model's 192 px
# margin, a 1536 px core keeps 64% of the computed pixels (1024 px: 53%) at ~1.8 GB peak on CPU.
_DEFAULT_CORE_PX = {"cpu": 1536, "cuda": 2048, "mps": 1024}
_DEFAULT_BATCH = {"cpu": 1, "cuda": 4, "mps": 2}
_MASK_MPP = 8.0


@dataclass(frozen=True)
class SlideResult:
    """Where a slide's results are and what its run.json says."""

    result_dir: Path
    run: dict[str, Any]


def result_dir_for(slide_path: str | Path, out_dir: str | Path, *, name: str | None = None) -> Path:
    """``out_dir/<name or slide stem>``; ``.ome.tif(f)`` counts as one suffix."""
    if name:
        return Path(out_dir) / name
    name = Path(slide_path).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return Path(out_dir) / name[: -len(suffix)]
    return Path(out_dir) / Path(name).stem


def read_run(result_dir: str | Path) -> dict[str, Any] | None:
    """The run.json of a result folder, or None when absent or unreadable."""
    try:
        return json.loads((Path(result_dir) / RUN_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_complete(result_dir: str | Path) -> bool:
    """True when run.json says the run completed and every file it lists exists."""
    run = read_run(result_dir)
    if not run or run.get("status") != "complete":
        return False
    return all((Path(result_dir) / f["path"]).exists() for f in run.get("files", []))


def _write_run(result_dir: Path, run: dict[str, Any]) -> None:
    write_json_atomic(result_dir / RUN_JSON, run)


def _prepare_result_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".wsimtl-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise output_error(exc, path) or OutputError(f"cannot write to output folder {path}: {exc.strerror or exc}") from exc


def _weights_sha256(model: Any) -> str:
    """The weights file's sha256 from the config, else a sha256 over the state dict's tensors."""
    known = getattr(model.config, "weights_sha256", None)
    if known:
        return str(known)
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _files_entry(result_dir: Path, path: Path) -> dict[str, Any]:
    if path.is_dir():
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    else:
        size = path.stat().st_size
    return {"path": path.relative_to(result_dir).as_posix(), "bytes": size}


def _tissue_keep(mask: np.ndarray, mask_ds: float) -> Any:
    """A predicate: does a tile's core (model px) touch tissue (mask px, ``mask_ds`` model px each)?"""

    def keep(tile: Tile) -> bool:
        y0 = int(math.floor(tile.y0 / mask_ds))
        x0 = int(math.floor(tile.x0 / mask_ds))
        y1 = int(math.ceil((tile.y0 + tile.height) / mask_ds))
        x1 = int(math.ceil((tile.x0 + tile.width) / mask_ds))
        return bool(mask[y0:y1, x0:x1].any())

    return keep


def segment_slide(
    slide_path: str | Path,
    out_dir: str | Path,
    *,
    model: Any = None,
    mpp: float | None = None,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int | None = None,
    tile_size: int | None = None,
    margin: int | None = None,
    workers: int | None = None,
    tissue_mask: bool = True,
    objects: bool = True,
    geojson_gz: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    name: str | None = None,
    tta: int = 1,
    postprocess: Mapping[str, Any] | None = None,
) -> SlideResult:
    """Run the multi-task network over one slide and write its results to ``out_dir/<stem>/``.

    Parameters
    ----------
    slide_path : path
        Any slide :func:`wsi_mtl.slide.open_slide` reads.
    out_dir : path
        Parent folder of the slide's result folder.
    model : str, path or loaded model, optional
        A model name or folder for :func:`wsi_mtl.load_model`, or an already loaded model (cohort
        workers load it once); default: the shipped default model.
    mpp : float, optional
        Override the slide's microns per pixel.
    device, precision : str
        ``auto | cpu | cuda[:i] | mps`` and ``auto | fp32 | bf16 | fp16``.
    batch_size, tile_size, margin, workers : int, optional
        Tiles per batch, output core side (model px), context margin (model px; default the
        model's ``context_px``) and reader threads; ``None`` picks per-device defaults.
    tissue_mask : bool
        Send only tiles touching tissue to the network (the mask is saved either way).
    objects : bool
        Post-process the maps into objects and export them.
    overwrite : bool
        Recompute even when a complete result exists.
    name : str, optional
        Name of the result folder (default: the slide's file name without its suffix).
    tta : int
        Test-time augmentation: average the maps over 1 (off), 2, 4 or 8 dihedral views of every
        tile, at one network pass per view.
    postprocess : mapping, optional
        Post-processing settings that replace the model's tuned ones
        (:class:`~wsi_mtl.postprocess.PostprocessParams` field -> number, e.g.
        ``{"nuclei_split_h": 0}``), checked before anything runs. A complete result whose objects
        were made with other overrides gets its objects re-derived from the stored maps.

    Returns
    -------
    SlideResult
        The result folder and the contents of its run.json.
    """
    from .network import load_model
    from .postprocess import check_overrides
    from .slide import open_slide

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    overrides = check_overrides(postprocess)
    slide_path = Path(slide_path)
    result_dir = result_dir_for(slide_path, out_dir, name=name)
    if not overwrite and is_complete(result_dir):
        done = read_run(result_dir) or {}
        if not objects or dict((done.get("postprocess") or {}).get("overrides") or {}) == overrides:
            log.info("%s is already complete; nothing to do (use overwrite to recompute)", result_dir)
            return SlideResult(result_dir, done)
        log.info("%s is complete; re-deriving its objects with post-processing overrides %s", result_dir, overrides)
        return _derive_and_finish(result_dir, done, objects=True, overrides=overrides, progress=progress, geojson_gz=geojson_gz, t_start=t_start)

    t0 = time.perf_counter()
    slide = open_slide(slide_path, mpp=mpp)
    timings["open_slide"] = time.perf_counter() - t0
    try:
        dev = resolve_device(device)
        if model is None or isinstance(model, (str, Path)):
            t0 = time.perf_counter()
            model = load_model(model, device=str(dev))
            timings["load_model"] = time.perf_counter() - t0
        cfg = model.config
        weights_sha = _weights_sha256(model)
        if not cfg.trained:
            log.warning("model %s is UNTRAINED (random weights): outputs are meaningless", cfg.name)
        amp = resolve_precision(dev, precision)
        if dev.type == "cpu":
            torch.set_num_threads(cpu_count())
        batch_size = batch_size or _DEFAULT_BATCH.get(dev.type, 2)
        stride = int(cfg.stride)
        core = tile_size or _DEFAULT_CORE_PX.get(dev.type, 1024)
        core = max(stride, int(round(core / stride)) * stride)
        margin_px = int(cfg.context_px if margin is None else margin)
        margin_px = int(math.ceil(margin_px / stride)) * stride
        if batch_size < 1 or (workers is not None and workers < 1):
            raise InputError("batch size and workers must be at least 1")
        if tta not in TTA_VIEWS:
            raise InputError(f"tta must be one of {', '.join(map(str, TTA_VIEWS))} views, not {tta}")
        workers = workers or min(4, max(2, cpu_count()))

        model_mpp = float(cfg.mpp)
        ds = model_mpp / slide.mpp
        out_h = max(1, int(math.ceil(slide.height / ds)))
        out_w = max(1, int(math.ceil(slide.width / ds)))
        grid = plan_tiles(out_h, out_w, core_px=core, margin_px=margin_px, stride=stride)

        _prepare_result_dir(result_dir)
        t0 = time.perf_counter()
        from .tissue import compute_tissue_mask

        tissue = compute_tissue_mask(slide, mask_mpp=max(_MASK_MPP, model_mpp))
        timings["tissue_mask"] = time.perf_counter() - t0
        if tissue_mask:
            if not tissue.mask.any():
                raise NoTissueError(f"no tissue found in {slide_path.name}; use --no-tissue-mask to process it anyway")
            tiles = list(grid.tiles(keep=_tissue_keep(tissue.mask, tissue.mpp / model_mpp)))
        else:
            tiles = list(grid.tiles())

        heads = []
        ps = int(getattr(cfg, "patch_stride_px", stride))
        for name, head in cfg.heads.items():
            cell = ps if head.kind == "patch" else 1
            if core % cell or margin_px % cell:
                raise InputError(f"tile size {core} and margin {margin_px} must be multiples of {cell} for head {name}")
            heads.append(HeadLayout(name, len(head.class_names), cell))
        heads_attrs = {
            name: {"kind": h.kind, "classes": list(h.class_names), "colors": [list(c) for c in h.colors], "cell_px": (ps if h.kind == "patch" else 1)}
            for name, h in cfg.heads.items()
        }
        fingerprint = {
            "wsimtl": __version__,
            "model": cfg.name,
            "weights_sha256": weights_sha,
            "slide_size": [slide.width, slide.height],
            "slide_mpp": slide.mpp,
            "core_px": core,
            "margin_px": margin_px,
            "precision": str(amp),
            "tissue_mask": tissue_mask,
            "tiles": len(tiles),
            "tta": int(tta),
        }
        attrs = {
            "version": __version__,
            "model": {"name": cfg.name, "trained": bool(cfg.trained), "weights_sha256": weights_sha},
            "heads": heads_attrs,
            "slide": {"path": str(slide_path.resolve()), "width": slide.width, "height": slide.height, "mpp": slide.mpp, "mpp_source": slide.mpp_source, "offset": list(slide.offset)},
            "model_mpp": model_mpp,
            "downsample": ds,
            "tile": {"core_px": core, "margin_px": margin_px},
            "tissue_mask_mpp": tissue.mpp,
            "postprocess": dict(cfg.extra.get("postprocess") or {}),
        }
        previous = read_run(result_dir)
        maps_done = (
            not overwrite
            and previous is not None
            and previous.get("status") == "maps"
            and previous.get("fingerprint") == fingerprint
            and (result_dir / PREDICTIONS).is_dir()
        )
    except BaseException:
        slide.close()
        raise
    if maps_done:
        slide.close()
        log.info("maps of %s are complete; deriving objects only", result_dir)
        run = previous
    else:
        run = _infer_maps(slide, slide_path, result_dir, model, grid, tiles, tissue, heads, fingerprint, attrs,
                          dev=dev, amp=amp, batch_size=batch_size, workers=workers, progress=progress, tta=tta,
                          tissue_mask=tissue_mask, objects=objects, mpp=mpp, timings=timings)

    return _derive_and_finish(result_dir, run, objects=objects, overrides=overrides, progress=progress, geojson_gz=geojson_gz, t_start=t_start)


def _derive_and_finish(result_dir: Path, run: dict[str, Any], *, objects: bool, overrides: Mapping[str, Any], progress: bool,
                       geojson_gz: bool, t_start: float) -> SlideResult:
    """Objects and exports from the finished maps (``objects``), then run.json marked complete."""
    if objects:
        from .derive import derive_objects

        derive_objects(result_dir, workers=cpu_count(), progress=progress, geojson_gz=geojson_gz, postprocess=overrides)
        run = read_run(result_dir) or run
    run["status"] = "complete"
    run.setdefault("timings_s", {})["total"] = round(time.perf_counter() - t_start, 3)
    _write_run(result_dir, run)
    return SlideResult(result_dir, run)


def _infer_maps(slide: Any, slide_path: Path, result_dir: Path, model: Any, grid: Any, tiles: list[Tile], tissue: Any,
                heads: list[HeadLayout], fingerprint: dict[str, Any], attrs: dict[str, Any], *, dev: torch.device,
                amp: torch.dtype | None, batch_size: int, workers: int, progress: bool, tta: int, tissue_mask: bool,
                objects: bool, mpp: float | None, timings: dict[str, float]) -> dict[str, Any]:
    """Run the network over ``tiles`` into predictions.zarr and write run.json with status ``maps``."""
    cfg = model.config
    model_mpp = float(cfg.mpp)
    try:
        store = PredictionStore(result_dir, heads=heads, height=grid.height, width=grid.width, core_px=grid.core_px,
                                downsample=attrs["downsample"], fingerprint=fingerprint, attrs=attrs)
        try:
            store.write_mask("tissue_mask", tissue.mask, downsample=tissue.mpp / slide.mpp)
            stats = run_inference(
                slide, model, grid, tiles, store, mpp=model_mpp, device=dev, batch_size=batch_size,
                precision=amp, workers=workers, progress=progress, tta=tta,
            )
            store.update_attrs(damaged_regions=stats.damaged)
            store.finalize()
        finally:
            store.close()
        timings["inference"] = stats.wall_s

        run: dict[str, Any] = {
            "wsimtl_version": __version__,
            "status": "maps",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "slide": {
                "path": str(slide_path.resolve()),
                "name": slide_path.name,
                "backend": slide.backend,
                "vendor": slide.vendor,
                "width": slide.width,
                "height": slide.height,
                "offset": list(slide.offset),
                "mpp": slide.mpp,
                "mpp_source": slide.mpp_source,
                "objective_power": slide.objective_power,
            },
            "model": {
                "name": cfg.name,
                "trained": bool(cfg.trained),
                "weights_sha256": fingerprint["weights_sha256"],
                "mpp": model_mpp,
                "license": getattr(cfg, "license", None),
                "warning": None if cfg.trained else "UNTRAINED model with random weights: outputs are meaningless",
            },
            "parameters": {
                "device": str(dev),
                "precision": str(amp).replace("torch.", "") if amp is not None else "fp32",
                "batch_size": batch_size,
                "tile_core_px": grid.core_px,
                "tile_margin_px": grid.margin_px,
                "tile_input_px": grid.input_px,
                "workers": workers,
                "tta_views": tta,
                "torch_threads": torch.get_num_threads(),
                "tissue_mask": tissue_mask,
                "objects": objects,
                "mpp_override": mpp,
            },
            "environment": {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()},
            "tiles": {
                "grid": [grid.rows, grid.cols],
                "total": grid.rows * grid.cols,
                "with_tissue": len(tiles),
                "computed": stats.tiles_computed,
                "resumed": stats.tiles_resumed,
                "kept_fraction": round(kept_fraction(grid, tiles), 4),
                "tissue_fraction": round(float(tissue.mask.mean()), 4),
            },
            "damaged_regions": stats.damaged,
            "inference": stats.as_dict(),
            "objects": {},
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
            "files": [_files_entry(result_dir, result_dir / PREDICTIONS)],
            "fingerprint": fingerprint,
        }
        _write_run(result_dir, run)
    finally:
        slide.close()
    return run

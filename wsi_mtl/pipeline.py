"""One slide end to end: slide -> tissue mask -> tiles -> network -> predictions.zarr -> objects -> run.json.

:func:`segment_slide` runs named steps: check the options, decide from the result folder what this
run must do (:func:`wsi_mtl.results.plan_rerun`), load the model, open the slide, plan the tiles,
run the network into the maps (resuming finished tiles), derive the objects, and write run.json.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .atomic import output_error
from .devices import cpu_count, resolve_device, resolve_precision
from .engine import run_inference
from .errors import InputError, NoTissueError, OutputError
from .malloc import NETWORK_TOP_KEEP, limit_arenas, pages_kept, release_freed_pages, small_numpy_pages
from .network.tta import TTA_VIEWS
from .results import PREDICTIONS, RUN_JSON, file_entry, is_complete, maps_reusable, plan_rerun, read_run, result_dir_for, write_run
from .store import HeadLayout, PredictionStore
from .tiling import Tile, TileGrid, kept_fraction, plan_tiles

__all__ = ["SlideResult", "segment_slide", "is_complete", "result_dir_for", "read_run", "RUN_JSON"]

log = logging.getLogger(__name__)

# Larger cores waste less on context (the margin is paid per tile): with the default model's 192 px
# margin, a 1536 px core keeps 64% of the computed pixels (1024 px: 53%) at ~1.8 GB peak on CPU.
_DEFAULT_CORE_PX = {"cpu": 1536, "cuda": 2048, "mps": 1024}
_DEFAULT_BATCH = {"cpu": 1, "cuda": 4, "mps": 2}
_MASK_MPP = 8.0


@dataclass(frozen=True)
class SlideResult:
    """Where a slide's results are, what its run.json says, and what this call did.

    ``action`` is ``computed`` (the network ran; tiles of an interrupted run resumed),
    ``derived`` (the stored maps were complete: objects only) or ``reused`` (nothing to do);
    ``summary`` says it in one line; ``seconds`` is this call's time.
    """

    result_dir: Path
    run: dict[str, Any]
    action: str = "computed"
    summary: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class _Options:
    """The run's options, checked before the slide is opened or the model loaded."""

    device: torch.device
    amp: torch.dtype | None
    batch_size: int
    workers: int
    tta: int
    tile_size: int | None
    margin: int | None
    overrides: dict[str, Any]
    runtime: str = "torch"  # resolved --runtime (wsi_mtl.network.runtime)


@dataclass
class _Layout:
    """What the network will compute: the tile grid, the tiles with tissue, the store's layout."""

    grid: TileGrid
    tiles: list[Tile]
    tissue: Any
    heads: list[HeadLayout]
    fingerprint: dict[str, Any]
    attrs: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


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


def _tissue_keep(mask: np.ndarray, mask_ds: float) -> Any:
    """A predicate: does a tile's core (model px) touch tissue (mask px, ``mask_ds`` model px each)?"""

    def keep(tile: Tile) -> bool:
        y0 = int(math.floor(tile.y0 / mask_ds))
        x0 = int(math.floor(tile.x0 / mask_ds))
        y1 = int(math.ceil((tile.y0 + tile.height) / mask_ds))
        x1 = int(math.ceil((tile.x0 + tile.width) / mask_ds))
        return bool(mask[y0:y1, x0:x1].any())

    return keep


@pages_kept(NETWORK_TOP_KEEP)  # a tile's activations reuse the last tile's pages; given back after the slide (wsi_mtl.malloc)
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
    runtime: str = "auto",
    overlap: bool = True,
    postprocess_workers: int | None = None,
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
        Post-process the maps into objects and export them. A complete result made without
        objects gets them from its stored maps (the network does not run again).
    geojson_gz : bool
        Also write gzipped copies of the GeoJSON files.
    overwrite : bool
        Recompute even when a complete result exists. Without it a rerun reuses what is done:
        finished tiles of an interrupted run, finished maps, a complete result.
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
    runtime : str
        ``auto | torch | openvino | onnx``: what runs the network on the CPU
        (:mod:`wsi_mtl.network.runtime`); ``auto`` takes an adopted runtime when installed, else torch.
    overlap : bool
        With ``objects``, post-process the map chunks whose tiles are written while the network
        works on later tiles (about a third of the cores, the network keeps the rest); the objects
        are the same as without it. Recorded in run.json (``parameters.overlap``).
    postprocess_workers : int, optional
        Processes for post-processing (default: this process's CPU cores); a cohort with several
        workers on one machine passes each worker's share.

    Returns
    -------
    SlideResult
        The result folder, the contents of its run.json, and what this call did and reused
        (``action``, ``summary``, ``seconds``).
    """
    t_start = time.perf_counter()
    limit_arenas()  # the network's, readers' and writer's threads would each keep freed memory (wsi_mtl.malloc)
    small_numpy_pages()  # and numpy's large arrays would take 2 MB pages (wsi_mtl.malloc)
    opts = _check_options(device=device, precision=precision, batch_size=batch_size, tile_size=tile_size, margin=margin,
                          workers=workers, tta=tta, postprocess=postprocess)
    opts = _with_runtime(opts, runtime, precision)  # checked here, ``auto`` resolved once the model is loaded
    pp_workers = _check_pp_workers(postprocess_workers)
    cores = _overlap_cores() if objects and overlap else "split"
    slide_path = Path(slide_path)
    result_dir = result_dir_for(slide_path, out_dir, name=name)
    rerun = plan_rerun(result_dir, objects=objects, overrides=opts.overrides, geojson_gz=geojson_gz, overwrite=overwrite,
                       made_with=_made_with(model, opts, tissue_mask=tissue_mask))
    if rerun.action == "compute" and rerun.run is not None:
        log.info("%s: %s", result_dir, rerun.reason)
    if rerun.action == "nothing":
        return _reused(result_dir, rerun.run or {}, t_start)
    if rerun.action == "derive":
        log.info("%s is complete; deriving its objects from the stored maps: %s", result_dir, rerun.reason)
        run = rerun.run or {}
        done = [f"maps complete: {(run.get('tiles') or {}).get('with_tissue', 0)} tiles reused"]
        return _finish(result_dir, run, opts, objects=True, geojson_gz=geojson_gz, progress=progress, slide=None,
                       t_start=t_start, done=done, action="derived", why=rerun.reason, pp_workers=pp_workers)

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with _open_slide(slide_path, mpp) as slide:
        timings["open_slide"] = time.perf_counter() - t0
        model = _load_model(model, opts.device, timings)
        opts = _with_runtime(opts, opts.runtime, precision, model)
        _prepare_result_dir(result_dir)
        layout = _plan(slide, slide_path, model, opts, tissue_mask=tissue_mask)
        layout.timings.update(timings)
        previous = None if overwrite else read_run(result_dir)
        if previous is not None and maps_reusable(result_dir, previous, layout.fingerprint):
            log.info("maps of %s are complete; deriving objects only", result_dir)
            run, action = previous, "derived"
            done = [f"maps complete: {len(layout.tiles)} tiles reused"]
            return _finish(result_dir, run, opts, objects=objects, geojson_gz=geojson_gz, progress=progress, slide=slide,
                           t_start=t_start, done=done, action=action, pp_workers=pp_workers)
        ov = _Overlap(_overlap_workers(pp_workers), finish_workers=pp_workers, cores=cores) if objects and overlap else None
        try:
            run = _infer_maps(slide, slide_path, result_dir, model, layout, opts, progress=progress, tissue_mask=tissue_mask,
                              objects=objects, mpp=mpp, overlap=ov)
            return _finish(result_dir, run, opts, objects=objects, geojson_gz=geojson_gz, progress=progress, slide=slide,
                           t_start=t_start, done=[*_why_recomputed(rerun), _tiles_done(run)], action="computed",
                           pp_workers=pp_workers, overlap=ov)
        finally:
            if ov is not None:
                ov.close()


def _check_options(*, device: str, precision: str, batch_size: int | None, tile_size: int | None, margin: int | None,
                   workers: int | None, tta: int, postprocess: Mapping[str, Any] | None) -> _Options:
    """Every option checked (InputError naming it) before anything is opened, loaded or written."""
    from .postprocess import check_overrides

    overrides = check_overrides(postprocess)
    if tta not in TTA_VIEWS:
        raise InputError(f"tta must be one of {', '.join(map(str, TTA_VIEWS))} views, not {tta}")
    for label, value, least in (("batch size", batch_size, 1), ("workers", workers, 1), ("tile size", tile_size, 1), ("margin", margin, 0)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise InputError(f"{label} must be a whole number of at least {least}, not {value!r}")
    dev = resolve_device(device)
    amp = resolve_precision(dev, precision)
    return _Options(
        device=dev, amp=amp, batch_size=batch_size or _DEFAULT_BATCH.get(dev.type, 2),
        workers=workers or min(4, max(2, cpu_count())), tta=int(tta), tile_size=tile_size, margin=margin, overrides=overrides,
    )


def _made_with(model: Any, opts: _Options, *, tissue_mask: bool) -> dict[str, Any]:
    """What this run asks of the maps, as their fingerprint records them; the model by the name in
    its folder's config.json (read without loading the weights) where one is found."""
    wanted: dict[str, Any] = {"tta": opts.tta, "tissue_mask": tissue_mask}
    if model is not None and not isinstance(model, (str, Path)):
        wanted["model"] = model.config.name
        return wanted
    import json

    from .network.io import CONFIG_FILE, DEFAULT_MODEL, find_model_folder

    text = str(model or DEFAULT_MODEL)
    folder = Path(text).expanduser() if Path(text).expanduser().is_dir() else find_model_folder(text)
    try:
        wanted["model"] = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))["name"] if folder else None
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not a wsimtl folder (a Cerberus checkpoint): its name is known once loaded
    if wanted.get("model") is None:
        wanted.pop("model", None)
    return wanted


def _why_recomputed(rerun: Any) -> list[str]:
    """The reason a complete result was recomputed (another --tta or model), for the run's summary."""
    return [rerun.reason] if rerun.run is not None and rerun.run.get("status") == "complete" else []


def _check_pp_workers(value: int | None) -> int:
    """Post-processing processes: ``value`` checked (InputError), else this process's cores."""
    if value is None:
        return cpu_count()
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"postprocess workers must be a whole number of at least 1, not {value!r}")
    return value


def _overlap_workers(pp_workers: int) -> int:
    """Post-processing processes beside the network: about a third of the cores (at least 1)."""
    return max(1, min(pp_workers, round(cpu_count() / 3)))


#: How the network and the overlapped post-processing share the CPU (``$WSIMTL_OVERLAP_CORES``):
#: ``split`` gives the post-processing processes their own cores (the network runs on the rest);
#: ``share`` leaves the network every core and runs the post-processing at the lowest priority,
#: on the cycles the network leaves idle.
OVERLAP_CORES = ("split", "share")


def _overlap_cores() -> str:
    value = os.environ.get("WSIMTL_OVERLAP_CORES", "split").strip().lower()
    if value not in OVERLAP_CORES:
        raise InputError(f"WSIMTL_OVERLAP_CORES must be one of {', '.join(OVERLAP_CORES)}, not {value!r}")
    return value


@dataclass
class _Overlap:
    """Post-processing overlapped with inference: its process count and, once the store exists, its extractor."""

    workers: int
    finish_workers: int = 1  # processes once the network is done
    extractor: Any = None
    torch_threads: int = 0
    tiles_on_every_core: int = 0  # tiles run on every core before post-processing had work (split)
    cores: str = "split"
    branches: bool = False  # the network left one thread computes its branches on two (split)

    def start(self, store: PredictionStore, layout: _Layout, opts: _Options, *, tissue_mask: bool) -> Any:
        """Plan the chunks on the store being written; returns the engine's per-tile callback."""
        from .postprocess import params_of
        from .postprocess._overlap import SPOOL_DIR, OverlapExtractor

        # the settings the store records, as the exports read them: a resumed store keeps those it was begun with
        params = params_of((store.root.attrs.get("wsimtl") or {}).get("postprocess"), opts.overrides)
        try:
            self.extractor = OverlapExtractor(
                store.path, store.result_dir / SPOOL_DIR, grid_shape=(layout.grid.rows, layout.grid.cols), core_px=layout.grid.core_px,
                pending=[t.key for t in layout.tiles if t.key not in store.done], workers=self.workers, params=params,
                tissue_mask=tissue_mask, niceness=19 if self.cores == "share" else 5, max_workers=self.finish_workers,
            )
        except Exception as exc:  # noqa: BLE001 - the objects are then derived after inference, as without overlap
            log.warning("objects cannot be extracted during inference (%s): they are derived afterwards", exc)
            return None
        return self.extractor.tile_done

    def thread_policy(self, layout: _Layout, threads: int) -> Callable[[Tile], int]:
        """Torch threads per tile: all ``threads`` for the tiles written before the first chunk can
        run (counted as in a run from scratch, so a resumed run uses the same count per tile), then
        the cores the post-processing processes leave. Where that is one thread, the network
        computes its branches on two (``branches``): its second runs on the post-processing's core
        whenever that has no chunk to do, at no cost to the maps (each op runs on one thread)."""
        first = self.extractor.tiles_before_work(t.key for t in layout.tiles)
        position = {t.key: i for i, t in enumerate(layout.tiles)}
        rest = max(1, threads - self.workers)
        self.torch_threads, self.tiles_on_every_core = rest, first
        self.branches = rest == 1 and threads > 1
        return lambda tile: threads if position[tile.key] < first else rest

    def record(self) -> dict[str, Any]:
        ex = self.extractor
        done = ex.chunks_overlapped if ex is not None else 0
        return {"workers": self.workers, "cores": self.cores, "torch_threads": self.torch_threads,
                "network_branches": self.branches,
                "tiles_on_every_core": self.tiles_on_every_core, "chunks_during_inference": done,
                "chunks": len(ex.jobs) if ex is not None else 0}

    def close(self) -> None:
        if self.extractor is not None:
            self.extractor.close()


def _with_runtime(opts: _Options, runtime: str, precision: str, model: Any = None) -> _Options:
    """``opts`` with ``runtime`` checked (InputError for an unknown or absent one) and, given the
    model, ``auto`` resolved (:func:`wsi_mtl.network.runtime.resolve_runtime`).

    A runtime that ``auto`` chose runs at fp32 unless a precision was asked for: the configuration
    whose maps match torch fp32 (the adoption rule of benchmarks/bench_runtime.py).
    """
    from dataclasses import replace

    from .network.runtime import check_runtime, resolve_runtime

    if model is None:
        return replace(opts, runtime=check_runtime(runtime, opts.device))
    chosen = resolve_runtime(runtime, opts.device, model)
    if runtime == "auto" and chosen != "torch" and (precision or "auto").lower() == "auto":
        return replace(opts, runtime=chosen, amp=None)
    return replace(opts, runtime=chosen)


def _open_slide(slide_path: Path, mpp: float | None) -> Any:
    from .slide import open_slide

    return open_slide(slide_path, mpp=mpp)


def _load_model(model: Any, dev: torch.device, timings: dict[str, float]) -> Any:
    """``model`` itself when already loaded, else the named (or default) model loaded onto ``dev``."""
    if model is None or isinstance(model, (str, Path)):
        from .network import load_model

        t0 = time.perf_counter()
        model = load_model(model, device=str(dev))
        timings["load_model"] = time.perf_counter() - t0
    if not model.config.trained:
        log.warning("model %s is UNTRAINED (random weights): outputs are meaningless", model.config.name)
    if dev.type == "cpu":
        torch.set_num_threads(cpu_count())
    return model


def _plan(slide: Any, slide_path: Path, model: Any, opts: _Options, *, tissue_mask: bool) -> _Layout:
    """Tile grid at the model's mpp, tissue mask, the tiles to compute, and the store's layout and fingerprint."""
    cfg = model.config
    stride = int(cfg.stride)
    core = opts.tile_size or _DEFAULT_CORE_PX.get(opts.device.type, 1024)
    core = max(stride, int(round(core / stride)) * stride)
    margin_px = int(cfg.context_px if opts.margin is None else opts.margin)
    margin_px = int(math.ceil(margin_px / stride)) * stride
    heads = _head_layouts(cfg, core, margin_px)

    model_mpp = float(cfg.mpp)
    ds = model_mpp / slide.mpp
    out_h = max(1, int(math.ceil(slide.height / ds)))
    out_w = max(1, int(math.ceil(slide.width / ds)))
    grid = plan_tiles(out_h, out_w, core_px=core, margin_px=margin_px, stride=stride)

    from .tissue import compute_tissue_mask

    t0 = time.perf_counter()
    tissue = compute_tissue_mask(slide, mask_mpp=max(_MASK_MPP, model_mpp))
    timings = {"tissue_mask": time.perf_counter() - t0}
    if tissue_mask:
        if not tissue.mask.any():
            raise NoTissueError(f"no tissue found in {slide_path.name}; use --no-tissue-mask to process it anyway")
        tiles = list(grid.tiles(keep=_tissue_keep(tissue.mask, tissue.mpp / model_mpp)))
    else:
        tiles = list(grid.tiles())

    weights_sha = _weights_sha256(model)
    fingerprint = {
        "wsimtl": __version__,
        "model": cfg.name,
        "weights_sha256": weights_sha,
        "slide_size": [slide.width, slide.height],
        "slide_mpp": slide.mpp,
        "core_px": core,
        "margin_px": margin_px,
        "precision": str(opts.amp),
        "tissue_mask": tissue_mask,
        "tiles": len(tiles),
        "tta": opts.tta,
    }
    attrs = {
        "version": __version__,
        "model": {"name": cfg.name, "trained": bool(cfg.trained), "weights_sha256": weights_sha},
        "heads": _heads_attrs(cfg),
        "slide": {"path": str(slide_path.resolve()), "width": slide.width, "height": slide.height, "mpp": slide.mpp,
                  "mpp_source": slide.mpp_source, "offset": list(slide.offset)},
        "model_mpp": model_mpp,
        "downsample": ds,
        "tile": {"core_px": core, "margin_px": margin_px},
        "tissue_mask_mpp": tissue.mpp,
        "postprocess": cfg.postprocess_settings,
    }
    return _Layout(grid, tiles, tissue, heads, fingerprint, attrs, timings)


def _patch_cell(cfg: Any) -> int:
    return int(getattr(cfg, "patch_stride_px", cfg.stride))


def _head_layouts(cfg: Any, core: int, margin_px: int) -> list[HeadLayout]:
    """One store layout per head; the tile core and margin must be whole patch cells."""
    heads = []
    for name, head in cfg.heads.items():
        cell = _patch_cell(cfg) if head.kind == "patch" else 1
        if core % cell or margin_px % cell:
            raise InputError(f"tile size {core} and margin {margin_px} must be multiples of {cell} for head {name}")
        heads.append(HeadLayout(name, len(head.class_names), cell))
    return heads


def _heads_attrs(cfg: Any) -> dict[str, Any]:
    return {
        name: {"kind": h.kind, "classes": list(h.class_names), "colors": [list(c) for c in h.colors],
               "cell_px": (_patch_cell(cfg) if h.kind == "patch" else 1)}
        for name, h in cfg.heads.items()
    }


def _tiles_done(run: Mapping[str, Any]) -> str:
    """What the network did: tiles computed, and those reused from an interrupted run."""
    tiles = run.get("tiles") or {}
    computed, resumed = tiles.get("computed", 0), tiles.get("resumed", 0)
    if resumed:
        return f"resumed an interrupted run: {resumed} tiles reused, {computed} computed"
    return f"maps: {computed} tiles computed"


def _reused(result_dir: Path, run: dict[str, Any], t_start: float) -> SlideResult:
    """A complete result that this run's options ask nothing more of."""
    log.info("%s is already complete; nothing to do (use overwrite to recompute)", result_dir)
    made = run.get("created", "earlier")
    summary = f"already complete (made {made}): nothing to do; --overwrite recomputes"
    return SlideResult(result_dir, run, "reused", summary, time.perf_counter() - t_start)


def _finish(result_dir: Path, run: dict[str, Any], opts: _Options, *, objects: bool, geojson_gz: bool, progress: bool, slide: Any,
            t_start: float, done: list[str], action: str, why: str = "", pp_workers: int = 1,
            overlap: _Overlap | None = None) -> SlideResult:
    """Objects and exports from the finished maps (``objects``), then run.json, marked complete, written once."""
    old_files: list[str] = []
    if objects:
        from .derive import derive_into, remove_stale

        t0 = time.perf_counter()
        extracted = None
        if overlap is not None and overlap.extractor is not None:
            extracted = overlap.extractor.objects(result_dir / PREDICTIONS, workers=pp_workers)
        summary = derive_into(result_dir, run, workers=pp_workers, progress=progress, geojson_gz=geojson_gz, slide=slide,
                              postprocess=opts.overrides, extracted=extracted)
        run, old_files = summary["run"], summary["old_files"]
        run.setdefault("parameters", {})["objects"] = True
        run["parameters"]["overlap"] = overlap.record() if overlap is not None and overlap.extractor is not None else False
        done.append(f"objects derived in {time.perf_counter() - t0:.0f} s" + (f" ({why})" if why else ""))
    else:
        done.append("no objects (--no-objects)")
    seconds = time.perf_counter() - t_start
    run["status"] = "complete"
    run.setdefault("timings_s", {})["total"] = round(seconds, 3)
    text = "; ".join(done)
    run.setdefault("history", []).append({"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "did": text})
    write_run(result_dir, run)
    if objects:
        remove_stale(result_dir, old_files, {f["path"] for f in run["files"]})
    return SlideResult(result_dir, run, action, text, seconds)


def _infer_maps(slide: Any, slide_path: Path, result_dir: Path, model: Any, layout: _Layout, opts: _Options, *,
                progress: bool, tissue_mask: bool, objects: bool, mpp: float | None, overlap: _Overlap | None = None) -> dict[str, Any]:
    """Run the network over the layout's tiles into predictions.zarr and write run.json with status ``maps``.

    That run.json is the checkpoint of the maps: a rerun that finds it (with the same fingerprint)
    derives the objects only.
    """
    grid = layout.grid
    store = PredictionStore(result_dir, heads=layout.heads, height=grid.height, width=grid.width, core_px=grid.core_px,
                            downsample=layout.attrs["downsample"], fingerprint=layout.fingerprint, attrs=layout.attrs)
    try:
        store.write_mask("tissue_mask", layout.tissue.mask, downsample=layout.tissue.mpp / slide.mpp)
        on_tile = overlap.start(store, layout, opts, tissue_mask=tissue_mask) if overlap is not None else None
        threads = torch.get_num_threads()
        per_tile = None
        if on_tile is not None:
            overlap.torch_threads = threads
            if opts.device.type == "cpu" and overlap.cores == "split":  # the network leaves the overlap its cores ...
                if opts.runtime == "torch":
                    per_tile = overlap.thread_policy(layout, threads)  # ... once it has work
                else:
                    overlap.torch_threads = max(1, threads - overlap.workers)
                    torch.set_num_threads(overlap.torch_threads)
        try:
            stats = run_inference(
                slide, model, grid, layout.tiles, store, mpp=float(model.config.mpp), device=opts.device, batch_size=opts.batch_size,
                precision=opts.amp, workers=opts.workers, progress=progress, tta=opts.tta, runtime=opts.runtime, on_tile=on_tile,
                threads=per_tile, branches=overlap is not None and overlap.branches,
            )
        finally:
            torch.set_num_threads(threads)
            release_freed_pages()  # the network is done with this slide: the pages its heap kept go back before the finalize
        from .damage import check_damage  # warns once, or fails a mostly unreadable slide (the store stays resumable)

        stats.damaged_fraction = check_damage(stats.damaged, layout.tissue, slide_mpp=slide.mpp, name=slide_path.name)
        store.update_attrs(damaged_regions=stats.damaged)
        t0 = time.perf_counter()
        if on_tile is not None:
            overlap.extractor.finish()  # the chunks left run on every post-processing worker while the pyramids are written
        # the chunks read the store as written: they are done before it is renamed
        store.finalize(before_rename=overlap.extractor.drain if on_tile is not None else None)
        layout.timings["finalize"] = time.perf_counter() - t0
    finally:
        store.close()
    layout.timings["inference"] = stats.wall_s
    run = _run_record(slide, slide_path, result_dir, model, layout, opts, stats, tissue_mask=tissue_mask, objects=objects, mpp=mpp)
    write_run(result_dir, run)
    return run


def _run_record(slide: Any, slide_path: Path, result_dir: Path, model: Any, layout: _Layout, opts: _Options, stats: Any, *,
                tissue_mask: bool, objects: bool, mpp: float | None) -> dict[str, Any]:
    """run.json of finished maps (status ``maps``)."""
    cfg, grid, amp = model.config, layout.grid, opts.amp
    return {
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
            "weights_sha256": layout.fingerprint["weights_sha256"],
            "mpp": float(cfg.mpp),
            "license": getattr(cfg, "license", None),
            "warning": None if cfg.trained else "UNTRAINED model with random weights: outputs are meaningless",
        },
        "parameters": {
            "device": str(opts.device),
            "precision": str(amp).replace("torch.", "") if amp is not None else "fp32",
            "batch_size": opts.batch_size,
            "tile_core_px": grid.core_px,
            "tile_margin_px": grid.margin_px,
            "tile_input_px": grid.input_px,
            "workers": opts.workers,
            "tta_views": opts.tta,
            "runtime": getattr(stats, "runtime", "torch"),
            "torch_threads": torch.get_num_threads(),
            "tissue_mask": tissue_mask,
            "objects": objects,
            "mpp_override": mpp,
        },
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()},
        "tiles": {
            "grid": [grid.rows, grid.cols],
            "total": grid.rows * grid.cols,
            "with_tissue": len(layout.tiles),
            "computed": stats.tiles_computed,
            "resumed": stats.tiles_resumed,
            "kept_fraction": round(kept_fraction(grid, layout.tiles), 4),
            "tissue_fraction": round(float(layout.tissue.mask.mean()), 4),
        },
        "damaged_regions": stats.damaged,
        "inference": stats.as_dict(),
        "objects": {},
        "timings_s": {k: round(v, 3) for k, v in layout.timings.items()},
        "files": [file_entry(result_dir, result_dir / PREDICTIONS)],
        "fingerprint": layout.fingerprint,
    }

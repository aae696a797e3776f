"""``wsimtl segment``: one slide through the network, into maps, objects and exports."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..errors import InputError
from ._report import echo_objects
from ._options import (
    allow_untrained_option,
    batch_size_option,
    check_model,
    device_option,
    geojson_gz_option,
    model_option,
    out_option,
    parse_settings,
    postprocess_option,
    precision_option,
    quiet_option,
    runtime_option,
    tile_size_option,
    tta_option,
    workers_option,
)


def check_slide(path: Path, mpp: float | None) -> None:
    """Open and close ``path`` (no torch): missing, unreadable, unsupported or mpp-less slides fail here.

    Its warnings (e.g. mpp from objective power) are left to the run, which opens the slide again.
    """
    from ..slide import open_slide

    log = logging.getLogger("wsi_mtl.slide")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with open_slide(path, mpp=mpp):
            pass
    finally:
        log.setLevel(level)


def _sample_path() -> Path:
    from ..sample import sample_slide_path

    return sample_slide_path()


def _check_settings(settings: dict[str, str]) -> None:
    """``--postprocess`` names and values checked (no torch)."""
    from ..postprocess import check_overrides

    check_overrides(settings)


def start_chunk_server(*, objects: bool) -> None:
    """Where objects are extracted, start the chunk workers' server now: its imports and warm-up
    run on the core this process leaves idle while it imports post-processing and torch."""
    if objects:
        from ..postprocess._pool import start_forkserver

        start_forkserver()


def load_pipeline(*, objects: bool) -> Callable[..., Any]:
    """``segment_slide``, imported as `segment` runs it: the chunk workers' server started first
    (:func:`start_chunk_server`, nothing if it runs already); then the imports' objects (torch's
    are most) are frozen out of the garbage collector's passes."""
    start_chunk_server(objects=objects)
    from ..pipeline import segment_slide

    gc.freeze()
    return segment_slide


@click.command("segment")
@click.argument("slide", required=False, type=click.Path(path_type=Path, dir_okay=True))
@out_option
@click.option("--sample", is_flag=True, help="Run on the CMU-1-Small-Region.svs sample slide (found locally or downloaded).")
@model_option
@allow_untrained_option
@click.option("--mpp", type=click.FloatRange(min=0.01, max=100.0), default=None, help="Override the slide's microns per pixel.")
@device_option
@precision_option
@batch_size_option
@tta_option
@tile_size_option
@click.option("--margin", type=click.IntRange(min=0), default=None, help="Context margin in model pixels (default: the model's).")
@workers_option
@click.option("--no-tissue-mask", is_flag=True, help="Process the whole slide, background included.")
@click.option("--no-objects", is_flag=True, help="Stop at the maps (no polygons, tables or GeoJSON).")
@geojson_gz_option
@click.option("--overwrite", is_flag=True, help="Recompute even if a complete result exists.")
@postprocess_option
@quiet_option
@runtime_option
def segment(slide: Path | None, out_dir: Path, sample: bool, model: str | None, allow_untrained: bool, mpp: float | None, device: str,
            precision: str, batch_size: int | None, tta: str, tile_size: int | None, margin: int | None, workers: int | None,
            no_tissue_mask: bool, no_objects: bool, geojson_gz: bool, overwrite: bool, postprocess: tuple[str, ...], quiet: bool,
            runtime: str = "auto") -> None:
    """Segment nuclei, glands and lumen and map tissue types in SLIDE; results go to OUT/<slide name>/."""
    if sample == (slide is not None):
        raise InputError("give either a SLIDE or --sample")
    settings = parse_settings(postprocess)
    path = _sample_path() if slide is None else slide
    check_slide(path, mpp)  # before torch loads: a bad slide is reported at once
    start_chunk_server(objects=not no_objects)  # before the checks below import post-processing and torch
    _check_settings(settings)
    check_model(model, allow_untrained=allow_untrained)
    segment_slide = load_pipeline(objects=not no_objects)
    result = segment_slide(
        path, out_dir, model=model, mpp=mpp, device=device, precision=precision, batch_size=batch_size,
        tile_size=tile_size, margin=margin, workers=workers, tissue_mask=not no_tissue_mask, objects=not no_objects,
        geojson_gz=geojson_gz, overwrite=overwrite, progress=not quiet, tta=int(tta), postprocess=settings,
        runtime=runtime,
    )
    if quiet:
        return
    run = result.run
    tiles = run.get("tiles", {})
    click.echo(f"results: {result.result_dir}")
    if not run.get("model", {}).get("trained", True):
        click.secho("WARNING: the model is UNTRAINED (random weights): its outputs are meaningless", fg="red", err=True)
    if result.summary:  # what this run did and what it reused
        click.echo(result.summary)
    if tiles:
        click.echo(f"tiles: {tiles.get('with_tissue', 0)} with tissue of {tiles.get('total', 0)}")
    if run.get("parameters", {}).get("objects", True) and run.get("status") == "complete":
        echo_objects(run.get("objects") or {})
    if run.get("damaged_regions"):
        click.secho(f"{len(run['damaged_regions'])} damaged region(s) skipped: see run.json", fg="yellow", err=True)
    click.echo(f"time: {result.seconds:.1f} s")

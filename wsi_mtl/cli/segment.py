"""``wsimtl segment``: one slide through the network, into maps, objects and exports."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import InputError
from ._options import parse_settings, postprocess_option


@click.command("segment")
@click.argument("slide", required=False, type=click.Path(path_type=Path, dir_okay=True))
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path, file_okay=False), default=Path("wsimtl-results"), show_default=True, help="Parent folder of the slide's result folder.")
@click.option("--sample", is_flag=True, help="Run on the CMU-1-Small-Region.svs sample slide (found locally or downloaded).")
@click.option("--model", "model", default=None, help="Model name or folder (default: the shipped default model; see `wsimtl models`).")
@click.option("--mpp", type=click.FloatRange(min=0.01, max=100.0), default=None, help="Override the slide's microns per pixel.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True, help="Mixed precision: auto = bf16 on capable CPUs and CUDA, fp32 elsewhere.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Tiles per batch (default: 1 on CPU, 4 on CUDA).")
@click.option("--tta", type=click.Choice(["1", "2", "4", "8"]), default="1", show_default=True, help="Test-time augmentation: average the maps over this many flipped/rotated views of each tile (one network pass per view).")
@click.option("--tile-size", type=click.IntRange(min=32), default=None, help="Output core side in model pixels; also the zarr chunk (default: 1536 on CPU, 2048 on CUDA).")
@click.option("--margin", type=click.IntRange(min=0), default=None, help="Context margin in model pixels (default: the model's).")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Reader threads.")
@click.option("--no-tissue-mask", is_flag=True, help="Process the whole slide, background included.")
@click.option("--no-objects", is_flag=True, help="Stop at the maps (no polygons, tables or GeoJSON).")
@click.option("--geojson-gz", is_flag=True, help="Also write gzipped GeoJSON.")
@click.option("--overwrite", is_flag=True, help="Recompute even if a complete result exists.")
@postprocess_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
def segment(slide: Path | None, out_dir: Path, sample: bool, model: str | None, mpp: float | None, device: str, precision: str,
            batch_size: int | None, tta: str, tile_size: int | None, margin: int | None, workers: int | None, no_tissue_mask: bool,
            no_objects: bool, geojson_gz: bool, overwrite: bool, postprocess: tuple[str, ...], quiet: bool) -> None:
    """Segment nuclei, glands and lumen and map tissue types in SLIDE; results go to OUT/<slide name>/."""
    from ..pipeline import segment_slide

    if sample == (slide is not None):
        raise InputError("give either a SLIDE or --sample")
    if sample:
        from ..sample import sample_slide_path

        slide = sample_slide_path()
    result = segment_slide(
        slide, out_dir, model=model, mpp=mpp, device=device, precision=precision, batch_size=batch_size,
        tile_size=tile_size, margin=margin, workers=workers, tissue_mask=not no_tissue_mask, objects=not no_objects,
        geojson_gz=geojson_gz, overwrite=overwrite, progress=not quiet, tta=int(tta), postprocess=parse_settings(postprocess),
    )
    if quiet:
        return
    run = result.run
    tiles = run.get("tiles", {})
    click.echo(f"results: {result.result_dir}")
    if not run.get("model", {}).get("trained", True):
        click.secho("WARNING: the model is UNTRAINED (random weights): its outputs are meaningless", fg="red", err=True)
    if tiles:
        click.echo(f"tiles: {tiles.get('computed', 0)} computed, {tiles.get('resumed', 0)} resumed, {tiles.get('with_tissue', 0)} with tissue of {tiles.get('total', 0)}")
    for task, classes in (run.get("objects") or {}).items():
        if isinstance(classes, dict):
            click.echo(f"{task}: {sum(classes.values())} (" + ", ".join(f"{k} {v}" for k, v in classes.items()) + ")")
    if run.get("damaged_regions"):
        click.secho(f"{len(run['damaged_regions'])} damaged region(s) skipped: see run.json", fg="yellow", err=True)
    total = run.get("timings_s", {}).get("total")
    if total is not None:
        click.echo(f"time: {total:.1f} s")

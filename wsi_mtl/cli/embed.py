"""``wsimtl embed``: encoder features per tissue patch of a slide, or per object of a segment result."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import InputError
from ._options import check_model, device_option, out_option, precision_option, quiet_option, workers_option


@click.command("embed")
@click.argument("target", type=click.Path(path_type=Path, exists=True))
@out_option
@click.option("--model", "model", default=None, metavar="NAME|DIR|FILE",
              help="Our model (name or folder; default wsimtl-small) or a ResNet-50 / DenseNet-121 checkpoint in "
                   "torchvision's layout (.pth/.pt/.tar via torch.load(weights_only=True), or .safetensors).")
@click.option("--arch", type=click.Choice(["resnet50", "densenet121"]), default=None,
              help="Architecture of an external checkpoint (default: told by its keys).")
@click.option("--mpp", type=click.FloatRange(min=0.01, max=100.0), default=None,
              help="Resolution of the patches in um/px (default: the model's; 0.5 for external checkpoints).")
@click.option("--slide-mpp", type=click.FloatRange(min=0.01, max=100.0), default=None, help="Override the slide's own microns per pixel.")
@click.option("--patch-size", type=click.IntRange(min=1), default=224, show_default=True, help="Patch side in px at --mpp.")
@click.option("--stride", type=click.IntRange(min=1), default=None, help="Step between patches in px at --mpp (default: the patch size).")
@click.option("--levels", type=click.Choice(["deepest", "all"]), default="deepest", show_default=True,
              help="deepest: the pooled deepest encoder map; all: pooled maps of every encoder level, concatenated.")
@click.option("--min-tissue", type=click.FloatRange(min=0.0, max=1.0, max_open=True), default=0.0, show_default=True,
              help="Keep patches with more than this fraction of tissue.")
@click.option("--no-tissue-mask", is_flag=True, help="Embed every patch of the slide, background included.")
@click.option("--float16", is_flag=True, help="Store features as float16 (half the size).")
@click.option("--probe", "probes", multiple=True, type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="A classifier saved by `wsimtl probe`, applied as one more head (repeatable).")
@click.option("--objects", is_flag=True, help="TARGET is a segment result folder: pool features over each object into object_embeddings.parquet.")
@click.option("--tasks", default=None, help="With --objects: comma-separated tasks to embed (default: all in objects.parquet).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Patches per network batch (default: 16 on CPU, 128 on CUDA).")
@device_option
@precision_option
@workers_option
@click.option("--overwrite", is_flag=True, help="Recompute even if finished embeddings with the same settings exist.")
@click.option("--json", "as_json", is_flag=True, help="Print the run.json section as JSON on stdout instead of text.")
@quiet_option
def embed(target: Path, out_dir: Path, model: str | None, arch: str | None, mpp: float | None, slide_mpp: float | None,
          patch_size: int, stride: int | None, levels: str, min_tissue: float, no_tissue_mask: bool, float16: bool,
          probes: tuple[Path, ...], objects: bool, tasks: str | None, batch_size: int | None, device: str, precision: str,
          workers: int | None, overwrite: bool, as_json: bool, quiet: bool) -> None:
    """Feature vectors of every tissue patch of TARGET (a slide) into OUT/<slide name>/, or with --objects
    of every object of TARGET (a `wsimtl segment` result folder)."""
    from ..network.external import is_external_checkpoint

    if model is None or not is_external_checkpoint(model):
        check_model(model, allow_untrained=False)
    if objects:
        from ..embed import embed_objects

        if not target.is_dir():
            raise InputError(f"--objects takes a segment result folder, not {target}")
        result = embed_objects(target, model=model, arch=arch, levels=levels, tasks=tasks.split(",") if tasks else None,
                               device=device, precision=precision, workers=workers, overwrite=overwrite, progress=not quiet)
    else:
        from ..embed import embed_slide

        if target.is_dir():
            raise InputError(f"{target} is a folder: give a slide file, or a segment result folder with --objects")
        result = embed_slide(target, out_dir, model=model, arch=arch, mpp=mpp, slide_mpp=slide_mpp, patch_size=patch_size,
                             stride=stride, levels=levels, min_tissue=min_tissue, tissue_mask=not no_tissue_mask, device=device,
                             precision=precision, batch_size=batch_size, workers=workers, float16=float16, probes=probes,
                             overwrite=overwrite, progress=not quiet)
    if as_json:
        click.echo(json.dumps({k: v for k, v in result.info.items() if k != "slide_vector"}, indent=2))
    elif not quiet:
        info = result.info
        click.echo(f"results: {result.result_dir}")
        if "patches" in info:
            click.echo(f"patches: {info['patches']} x {info.get('dim')} features ({info.get('levels')}), "
                       f"{len(info.get('damaged_patches') or [])} damaged")
        if "objects" in info:
            click.echo(f"objects: {info['objects']} x {info.get('dim')} features")

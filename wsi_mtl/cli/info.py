"""``wsimtl info SLIDE``: what a slide is, how big, at which mpp and where that mpp came from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ._options import json_option

__all__ = ["info", "format_info", "slide_info"]

_PLACEHOLDER_MPP = 1.0


def format_info(data: dict[str, Any]) -> str:
    """Human-readable text of :meth:`wsi_mtl.slide.Slide.info`."""
    power = data["objective_power"]
    size = f"{data['width']} x {data['height']} px"
    if data["size_um"] is not None:
        width_um, height_um = data["size_um"]
        size += f" ({width_um:,.1f} x {height_um:,.1f} um)"
    mpp = f"{data['mpp']:.4f} um/px (source: {data['mpp_source']})" if data["mpp"] is not None else "unknown (pass --mpp)"
    lines = [
        Path(data["path"]).name,
        f"  path           {data['path']}",
        f"  format         {data['format']} (backend {data['backend']}, decoder {data['decoder']})",
        f"  size           {size}",
        f"  bounds offset  x={data['offset'][0]}, y={data['offset'][1]}",
        f"  mpp            {mpp}",
        f"  objective      {f'{power:g}x' if power else 'unknown'}",
        f"  levels         {len(data['levels'])}",
    ]
    for i, level in enumerate(data["levels"]):
        lines.append(f"    {i}: {level['width']} x {level['height']} px, downsample {level['downsample']:.4g}")
    lines.append(f"  associated     {', '.join(data['associated_images']) or 'none'}")
    return "\n".join(lines)


@click.command("info")
@click.argument("slide", type=click.Path(path_type=Path, dir_okay=True))
@click.option("--mpp", type=float, default=None, metavar="UM",
              help="Microns per pixel at level 0, overriding the slide's metadata.")
@json_option
def info(slide: Path, mpp: float | None, as_json: bool) -> None:
    """Show a slide's format, size, microns per pixel (and its source), levels and associated images.

    A slide without microns per pixel is shown too, with mpp unknown (null in JSON): pass --mpp to
    the commands that need it.
    """
    data = slide_info(slide, mpp)
    click.echo(json.dumps(data, indent=2) if as_json else format_info(data))


def slide_info(path: Path, mpp: float | None) -> dict[str, Any]:
    """:meth:`Slide.info` of ``path``; where the slide has no mpp, the same with ``mpp``, its source and size in um None."""
    from ..errors import MissingMppError
    from ..slide import open_slide

    try:
        with open_slide(path, mpp=mpp) as opened:
            return opened.info()
    except MissingMppError:
        pass
    with open_slide(path, mpp=_PLACEHOLDER_MPP) as opened:  # only to read the rest of the metadata
        data = opened.info()
    return {**data, "mpp": None, "mpp_source": None, "size_um": None}

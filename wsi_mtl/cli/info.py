"""``wsimtl info SLIDE``: what a slide is, how big, at which mpp and where that mpp came from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

__all__ = ["info", "format_info"]


def format_info(data: dict[str, Any]) -> str:
    """Human-readable text of :meth:`wsi_mtl.slide.Slide.info`."""
    width_um, height_um = data["size_um"]
    power = data["objective_power"]
    lines = [
        Path(data["path"]).name,
        f"  path           {data['path']}",
        f"  format         {data['format']} (backend {data['backend']}, decoder {data['decoder']})",
        f"  size           {data['width']} x {data['height']} px ({width_um:,.1f} x {height_um:,.1f} um)",
        f"  bounds offset  x={data['offset'][0]}, y={data['offset'][1]}",
        f"  mpp            {data['mpp']:.4f} um/px (source: {data['mpp_source']})",
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
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def info(slide: Path, mpp: float | None, as_json: bool) -> None:
    """Show a slide's format, size, microns per pixel (and its source), levels and associated images."""
    from ..slide import open_slide

    with open_slide(slide, mpp=mpp) as opened:
        data = opened.info()
    click.echo(json.dumps(data, indent=2) if as_json else format_info(data))

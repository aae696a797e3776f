"""``wsimtl export``: objects and exports again from an existing predictions.zarr (no network)."""

from __future__ import annotations

from pathlib import Path

import click

from ._report import echo_objects
from ._options import geojson_gz_option, parse_settings, postprocess_option, quiet_option, workers_option


@click.command("export")
@click.argument("result_dir", type=click.Path(path_type=Path, file_okay=False))
@workers_option
@geojson_gz_option
@postprocess_option
@quiet_option
def export(result_dir: Path, workers: int | None, geojson_gz: bool, postprocess: tuple[str, ...], quiet: bool) -> None:
    """Re-derive objects from RESULT_DIR/predictions.zarr and rewrite the table, GeoJSON and preview."""
    from ..derive import derive_objects

    summary = derive_objects(result_dir, workers=workers or 1, geojson_gz=geojson_gz, progress=not quiet,
                             postprocess=parse_settings(postprocess))
    if quiet:
        return
    click.echo(f"results: {result_dir}")
    echo_objects(summary["objects"])
    for entry in summary["files"]:
        click.echo(f"  {entry['path']}  ({entry['bytes'] / 1e6:.1f} MB)")
    for path in summary.get("removed", []):
        click.echo(f"  removed {path} (left by an earlier export)")
    t = summary["timings_s"]
    click.echo(f"time: objects {t['objects']:.1f} s, export {t['export']:.1f} s")

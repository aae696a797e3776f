"""``wsimtl models``: list the registered models and whether trained weights are present."""

from __future__ import annotations

import json

import click

__all__ = ["models"]


@click.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per model instead of a table.")
def models(as_json: bool) -> None:
    """List registered models, where their weights are and whether they are trained."""
    from ..network import describe_models, models_dirs

    rows = describe_models()
    if as_json:
        for row in rows:
            click.echo(json.dumps({**row, "folder": str(row["folder"]) if row["folder"] else None}))
        return
    click.echo(f"{'arch':<16} {'name':<16} {'weights':<10} {'mpp':>4}  outputs")
    for row in rows:
        weights = ("trained" if row["trained"] else "untrained") if row["folder"] else "none"
        click.echo(f"{row['arch']:<16} {row['name']:<16} {weights:<10} {row['mpp']:>4}  {', '.join(row['heads'])}")
    dirs = models_dirs()
    click.echo("model folders searched: " + (", ".join(str(d) for d in dirs) if dirs else "none (set WSIMTL_MODELS_DIR)"))
    if any(row["folder"] is None for row in rows):
        click.echo("models without weights run with RANDOM weights (outputs meaningless); pass a model folder instead.")

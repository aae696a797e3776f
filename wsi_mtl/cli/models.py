"""``wsimtl models``: list the registered models and whether trained weights are present."""

from __future__ import annotations

import json

import click

from ._options import json_option

__all__ = ["models"]


@click.command("models")
@json_option
def models(as_json: bool) -> None:
    """List registered models, where their weights are and whether they are trained.

    Names are shown with dashes (wsimtl-small); the underscore spelling (wsimtl_small) is accepted too.
    """
    from ..network import describe_models, models_dirs

    rows = describe_models()
    if as_json:
        for row in rows:
            click.echo(json.dumps({"name": row["name"], "folder": str(row["folder"]) if row["folder"] else None,
                                   "trained": row["trained"], "heads": row["heads"], "mpp": row["mpp"]}))
        return
    click.echo(f"{'name':<16} {'weights':<10} {'mpp':>4}  outputs")
    for row in rows:
        weights = ("trained" if row["trained"] else "untrained") if row["folder"] else "none"
        click.echo(f"{row['name']:<16} {weights:<10} {row['mpp']:>4}  {', '.join(row['heads'])}")
    dirs = models_dirs()
    click.echo("model folders searched: " + (", ".join(str(d) for d in dirs) if dirs else "none (set WSIMTL_MODELS_DIR)"))
    if any(row["folder"] is None for row in rows):
        click.echo("models without weights are refused (put their weights in a model folder), or run with RANDOM weights "
                   "under --allow-untrained (outputs meaningless).")

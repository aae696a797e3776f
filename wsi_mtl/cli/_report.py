"""Lines the commands print about a result: object counts per task and warnings."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import click

from ..objects import TASKS


def object_lines(counts: Mapping[str, Any], tasks: Iterable[str] = TASKS) -> list[str]:
    """One line per task, ``task: total (class n, ...)``; tasks without objects say ``0``.

    >>> object_lines({"nuclei": {"epithelial": 2, "other": 1}}, tasks=("nuclei", "lumen"))
    ['nuclei: 3 (epithelial 2, other 1)', 'lumen: 0']
    """
    lines = []
    for task in tasks:
        classes = counts.get(task) or {}
        if not isinstance(classes, Mapping) or not sum(classes.values()):
            lines.append(f"{task}: 0")
            continue
        detail = ", ".join(f"{name} {n}" for name, n in classes.items() if n)
        lines.append(f"{task}: {sum(classes.values())} ({detail})")
    return lines


def echo_objects(counts: Mapping[str, Any]) -> None:
    """Print :func:`object_lines` for ``counts`` (``run.json`` ``objects``)."""
    for line in object_lines(counts):
        click.echo(line)


def echo_warnings(warnings: Iterable[str]) -> None:
    """Each run.json warning as one yellow line on stderr."""
    for warning in warnings:
        click.secho(f"warning: {warning}", fg="yellow", err=True)

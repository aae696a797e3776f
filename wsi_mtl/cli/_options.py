"""Options shared by several subcommands."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from ..errors import InputError

F = TypeVar("F", bound=Callable[..., Any])

#: ``--postprocess KEY=VALUE`` (repeatable): replace one of the model's tuned post-processing settings.
postprocess_option: Callable[[F], F] = click.option(
    "--postprocess", "postprocess", multiple=True, metavar="KEY=VALUE",
    help="Replace one of the model's post-processing settings (repeatable), e.g. nuclei_split_h=0 "
         "(no neck cutting: faster nuclei) or nuclei_min_area_px=40; names as PostprocessParams.",
)


def parse_settings(pairs: Sequence[str]) -> dict[str, str]:
    """``["a=1", "b=2"]`` -> ``{"a": "1", "b": "2"}``; values are checked by the library."""
    settings: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise InputError(f"--postprocess takes KEY=VALUE, got {pair!r}")
        settings[key.strip()] = value.strip()
    return settings

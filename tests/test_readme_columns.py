"""The README's table of ``objects.parquet`` columns matches the table's schema."""

from __future__ import annotations

import re
from pathlib import Path

from wsi_mtl.export import TABLE_SCHEMA

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_columns() -> list[str]:
    """Column names listed in the README table after the 'Columns of `objects.parquet`' line."""
    text = README.read_text(encoding="utf-8")
    start = text.index("Columns of `objects.parquet`")
    names: list[str] = []
    in_table = False
    for line in text[start:].splitlines()[1:]:
        if line.startswith("|"):
            in_table = True
            first_cell = line.split("|")[1]
            names += re.findall(r"`([a-z_0-9]+)`", first_cell)
        elif in_table:
            break
    return names


def test_readme_lists_every_table_column_once_in_order():
    names = _readme_columns()
    assert len(names) == len(set(names)), "a column listed twice"
    assert names == TABLE_SCHEMA.names

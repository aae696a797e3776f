"""What segment and export print about objects: every task, zero included."""

from __future__ import annotations

from wsi_mtl.cli._report import object_lines
from wsi_mtl.objects import TASKS


def test_every_task_is_listed_with_zero_where_none_found() -> None:
    lines = object_lines({"nuclei": {"epithelial": 5, "other": 0}, "tissue": {"stroma": 2}})
    assert [line.split(":")[0] for line in lines] == list(TASKS)
    assert lines[0] == "nuclei: 5 (epithelial 5)"
    assert "lumen: 0" in lines and "gland: 0" in lines


def test_empty_class_counts_read_as_zero() -> None:
    assert object_lines({"lumen": {"lumen": 0}}, tasks=("lumen",)) == ["lumen: 0"]

"""``batch_summary.csv``: one row per slide, rewritten atomically under a lock as slides finish."""

from __future__ import annotations

import csv
import io
import os
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from ..atomic import output_error
from ._locks import LockFile

__all__ = ["SUMMARY_NAME", "BASE_COLUMNS", "finished_at", "read_summary", "update_summary"]

SUMMARY_NAME = "batch_summary.csv"
#: Columns always present, in order; ``objects_<task>`` columns (object counts) follow, then TAIL_COLUMNS.
BASE_COLUMNS: tuple[str, ...] = ("slide", "id", "status", "error", "seconds")
TAIL_COLUMNS: tuple[str, ...] = ("finished_at", "host", "job")


def read_summary(out_dir: str | os.PathLike[str]) -> dict[str, dict[str, str]]:
    """Read ``OUT_DIR/batch_summary.csv``.

    Parameters
    ----------
    out_dir : path-like
        The batch output folder.

    Returns
    -------
    dict
        Row (column -> text) by slide id; empty when there is no summary yet.
    """
    path = Path(out_dir) / SUMMARY_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    return {row["id"]: row for row in csv.DictReader(io.StringIO(text)) if row.get("id")}


def _columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Base columns, then the sorted object-count and slide-summary columns, then the tail columns."""
    counts = sorted({key for row in rows for key in row if key.startswith(("objects_", "summary_"))})
    return [*BASE_COLUMNS, *counts, *TAIL_COLUMNS]


def finished_at(row: Mapping[str, Any]) -> float | None:
    """The POSIX time of a row's ``finished_at`` (None when absent or unreadable)."""
    try:
        return datetime.fromisoformat(str(row.get("finished_at", ""))).timestamp()
    except ValueError:
        return None


def update_summary(out_dir: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]], *, stale_after_s: float = 120.0,
                   keep_recorded_since: float | None = None) -> Path:
    """Replace (by id) or add rows of the summary, atomically and under a lock.

    Several processes may call this at once on one folder: each holds
    ``OUT_DIR/.locks/batch_summary.lock`` while it reads, merges and renames a temporary file into
    place, so no update is lost and no reader sees a half-written file.

    Parameters
    ----------
    out_dir : path-like
        The batch output folder.
    rows : iterable of mapping
        Rows with at least ``id``; missing columns are left empty.
    stale_after_s : float
        Seconds after which a summary lock left by a dead process is taken over.
    keep_recorded_since : float, optional
        A POSIX time: existing rows finished at or after it are kept, not replaced (a worker that
        finds a slide complete adds its ``skipped`` row this way, so that it never hides the
        ``done`` row of the worker that finished the slide a moment before; the check is made
        under the lock).

    Returns
    -------
    Path
        The summary file.
    """
    out_dir = Path(out_dir)
    path = out_dir / SUMMARY_NAME
    new = {str(row["id"]): dict(row) for row in rows}
    with LockFile(out_dir / ".locks" / "batch_summary.lock", stale_after_s=stale_after_s, heartbeat_s=stale_after_s / 4):
        old = read_summary(out_dir)
        if keep_recorded_since is not None:
            new = {k: v for k, v in new.items() if k not in old or (finished_at(old[k]) or float("-inf")) < keep_recorded_since}
            if not new:
                return path  # every row is kept as it is: nothing to rewrite
        merged: dict[str, dict[str, Any]] = {**old, **new}
        ordered = sorted(merged.values(), key=lambda r: (str(r.get("slide", "")), str(r["id"])))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=_columns(ordered), restval="", extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(ordered)
        tmp = path.with_name(f".{SUMMARY_NAME}.{uuid.uuid4().hex}.tmp")
        try:
            with tmp.open("w", encoding="utf-8", newline="") as fh:
                fh.write(buffer.getvalue())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            error = output_error(exc, path)
            if error is not None:
                raise error from exc
            raise
    return path

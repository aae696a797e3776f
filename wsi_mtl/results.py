"""The result folder of one slide: its layout, its run.json, and what a rerun must do.

One folder per slide (``OUT/<slide name>/``) holds ``predictions.zarr`` (the maps), the objects
(``objects.parquet``, GeoJSON), ``preview.png`` and ``run.json``. run.json records how the result
was made and every file it consists of; a result is *complete* when run.json says so and every
listed file exists. An unreadable run.json makes a result incomplete, never silently finished.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .atomic import write_json_atomic

__all__ = [
    "PREDICTIONS", "RUN_JSON", "TABLE", "PREVIEW", "GEOJSON_SUFFIXES", "KEPT_SECTIONS",
    "result_dir_for", "read_run", "write_run", "is_complete", "listed_files", "file_entry",
    "Rerun", "plan_rerun", "maps_reusable",
]

log = logging.getLogger(__name__)

#: the maps (OME-Zarr)
PREDICTIONS = "predictions.zarr"
#: how the result was made and what it consists of
RUN_JSON = "run.json"
#: the object table (GeoParquet)
TABLE = "objects.parquet"
#: the slide thumbnail with the objects drawn on it
PREVIEW = "preview.png"
#: QuPath exports: plain, and gzipped copies with ``--geojson-gz``
GEOJSON_SUFFIXES = (".geojson", ".geojson.gz")

#: status values of run.json: ``maps`` (network done, objects not yet), ``complete``, and
#: ``incomplete`` (run.json was rebuilt without the record of how the maps were made)
Status = Literal["maps", "complete", "incomplete"]


def result_dir_for(slide_path: str | Path, out_dir: str | Path, *, name: str | None = None) -> Path:
    """``out_dir/<name or slide stem>``; ``.ome.tif(f)`` counts as one suffix."""
    if name:
        return Path(out_dir) / name
    name = Path(slide_path).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return Path(out_dir) / name[: -len(suffix)]
    return Path(out_dir) / Path(name).stem


def read_run(result_dir: str | Path) -> dict[str, Any] | None:
    """The run.json of a result folder; None when absent, unreadable or not a JSON object."""
    path = Path(result_dir) / RUN_JSON
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("unreadable %s (%s): the result counts as incomplete", path, exc)
        return None
    if not isinstance(data, dict):
        log.warning("%s is not a JSON object: the result counts as incomplete", path)
        return None
    return data


#: run.json sections another command owns, with the files it writes into the folder: a segment
#: or export run keeps them (``wsimtl embed`` into a result folder, or segment into an embed folder)
KEPT_SECTIONS: dict[str, tuple[str, ...]] = {"embed": ("embeddings.zarr", "patches.parquet", "object_embeddings.parquet")}


def write_run(result_dir: str | Path, run: Mapping[str, Any]) -> None:
    """Write run.json atomically (a reader sees the old one or the new one, never half).

    Sections of :data:`KEPT_SECTIONS` that the folder's run.json has and ``run`` lacks are kept,
    with their listed files that still exist.
    """
    run = dict(run)
    old = read_run(result_dir)
    if old:
        listed = set(listed_files(run))
        for section, names in KEPT_SECTIONS.items():
            if section in old and section not in run:
                run[section] = old[section]
                kept = [f for f in old.get("files") or [] if isinstance(f, Mapping) and f.get("path") in names
                        and f["path"] not in listed and (Path(result_dir) / f["path"]).exists()]
                run["files"] = [*(run.get("files") or []), *kept]
    write_json_atomic(Path(result_dir) / RUN_JSON, run)


def listed_files(run: Mapping[str, Any] | None) -> list[str]:
    """The relative paths run.json lists under ``files``."""
    files = (run or {}).get("files") or []
    return [str(f["path"]) for f in files if isinstance(f, Mapping) and f.get("path")]


def file_entry(result_dir: Path, path: Path) -> dict[str, Any]:
    """A ``files`` entry of run.json: the path relative to ``result_dir`` and its bytes (a folder: all its files)."""
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    return {"path": path.relative_to(result_dir).as_posix(), "bytes": size}


def _complete(result_dir: Path, run: Mapping[str, Any] | None) -> bool:
    if not run or run.get("status") != "complete":
        return False
    return all((result_dir / p).exists() for p in listed_files(run))


def is_complete(result_dir: str | Path) -> bool:
    """True when run.json says the run completed and every file it lists exists."""
    return _complete(Path(result_dir), read_run(result_dir))


@dataclass(frozen=True)
class Rerun:
    """What a run must do with an existing result folder.

    ``action``: ``compute`` (run or resume the network, then everything after it), ``derive``
    (the maps are complete: only objects and exports from them) or ``nothing``.
    """

    action: Literal["compute", "derive", "nothing"]
    reason: str
    run: dict[str, Any] | None = None


def _has_gz_copies(run: Mapping[str, Any]) -> bool:
    return any(p.endswith(".geojson.gz") for p in listed_files(run))


def _norm(value: Any) -> Any:
    """Model names compare without case and with ``_`` as ``-`` (``wsimtl_small`` is ``wsimtl-small``)."""
    return value.lower().replace("_", "-") if isinstance(value, str) else value


def _differs(run: Mapping[str, Any], made_with: Mapping[str, Any] | None) -> str:
    """The first setting of ``made_with`` that the result's fingerprint records otherwise ('' when none)."""
    recorded = run.get("fingerprint") or {}
    for key, value in (made_with or {}).items():
        if key in recorded and _norm(recorded[key]) != _norm(value):
            return f"{key} {value!r} asked, the maps were made with {recorded[key]!r}: recomputing them"
    return ""


def plan_rerun(result_dir: str | Path, *, objects: bool, overrides: Mapping[str, Any], geojson_gz: bool = False,
               overwrite: bool = False, made_with: Mapping[str, Any] | None = None) -> Rerun:
    """Decide, from run.json alone, what a run with these options must do in ``result_dir``.

    ``made_with``: settings of the maps this run asks for, as the fingerprint records them
    (e.g. ``{"tta": 4, "model": "wsimtl-small", "tissue_mask": True}``); a complete result made
    otherwise is recomputed (its maps and objects are replaced), never reported as done.

    A complete result is reused; its objects are derived from the stored maps when the run asks
    for objects and the result has none, was made with other post-processing overrides, or lacks
    the gzipped copies ``geojson_gz`` asks for. Anything else (no result, a partial one, an
    unreadable run.json, ``overwrite``) computes, resuming from finished tiles where it can
    (see :func:`maps_reusable`).
    """
    result_dir = Path(result_dir)
    if overwrite:
        return Rerun("compute", "overwrite")
    run = read_run(result_dir)
    if not _complete(result_dir, run):
        return Rerun("compute", "no complete result", run)
    assert run is not None
    why = _differs(run, made_with)
    if why:
        return Rerun("compute", why, run)
    if not objects:
        return Rerun("nothing", "complete", run)
    if TABLE not in listed_files(run):
        return Rerun("derive", "the result had no objects", run)
    made_with = dict((run.get("postprocess") or {}).get("overrides") or {})
    if made_with != dict(overrides):
        return Rerun("derive", f"post-processing overrides {dict(overrides) or 'none'} (objects made with {made_with or 'none'})", run)
    if geojson_gz and not _has_gz_copies(run):
        return Rerun("derive", "gzipped GeoJSON copies missing", run)
    return Rerun("nothing", "complete", run)


def maps_reusable(result_dir: str | Path, run: Mapping[str, Any] | None, fingerprint: Mapping[str, Any]) -> bool:
    """True when run.json records finished maps made exactly as ``fingerprint`` says.

    Status ``maps`` (the objects were not finished) or ``complete`` (a file it lists has gone):
    either way only the objects and exports need making again.
    """
    return (
        run is not None
        and run.get("status") in ("maps", "complete")
        and run.get("fingerprint") == dict(fingerprint)
        and (Path(result_dir) / PREDICTIONS).is_dir()
    )

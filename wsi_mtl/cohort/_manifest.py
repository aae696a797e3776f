"""Which slides a batch processes: paths, folders, globs and CSV manifests; shards of the list."""

from __future__ import annotations

import csv
import glob
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

__all__ = ["SlideTask", "SLIDE_SUFFIXES", "collect_slides", "read_manifest", "parse_shard", "shard_from_env", "take_shard"]

#: File name endings that a folder scan picks up (case-insensitive).
SLIDE_SUFFIXES: tuple[str, ...] = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm", ".qptiff",
)  # fmt: skip

_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class SlideTask:
    """One slide of a cohort.

    Attributes
    ----------
    slide : Path
        The slide file (absolute).
    id : str
        The name of its result folder under the output folder (default: the file's stem).
    mpp : float or None
        Microns per pixel overriding the slide's metadata (from a manifest), else None.
    """

    slide: Path
    id: str
    mpp: float | None = None


def _validate_id(slide_id: str, where: str) -> str:
    """Return ``slide_id`` stripped; raise when it cannot name a folder."""
    slide_id = slide_id.strip()
    if not slide_id or slide_id.startswith(".") or "/" in slide_id or "\\" in slide_id:
        raise InputError(f"{where}: slide id {slide_id!r} cannot name a result folder (empty, hidden or with a slash)")
    return slide_id


def _default_id(path: Path) -> str:
    """The result folder name of a slide without an explicit id: its stem (``.ome.tif(f)`` is one suffix)."""
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def read_manifest(path: str | os.PathLike[str]) -> list[SlideTask]:
    """Read a CSV manifest: a ``slide`` or ``path`` column, optional ``id`` and ``mpp`` columns.

    Relative slide paths are relative to the manifest's folder. An empty ``id`` or ``mpp`` cell
    means the default (the file's stem; the slide's own metadata).

    Parameters
    ----------
    path : path-like
        The CSV file.

    Returns
    -------
    list of SlideTask
        In file order.
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip().lower() for c in reader.fieldnames or []]
            rows = [{(k or "").strip().lower(): (v or "") for k, v in row.items()} for row in reader]
    except OSError as exc:
        raise InputError(f"cannot read the manifest {path}: {exc.strerror}") from exc
    except (csv.Error, UnicodeDecodeError) as exc:
        raise InputError(f"manifest {path} is not a readable CSV file: {exc}") from exc
    column = "slide" if "slide" in columns else "path" if "path" in columns else None
    if column is None:
        raise InputError(f"manifest {path} needs a 'slide' or 'path' column; it has {columns}")
    tasks = []
    for line, row in enumerate(rows, start=2):
        where = f"{path}, line {line}"
        cell = row.get(column, "").strip()
        if not cell:
            raise InputError(f"{where}: empty {column!r} cell")
        slide = Path(cell).expanduser()
        slide = (slide if slide.is_absolute() else path.parent / slide).absolute()
        slide_id = _validate_id(row["id"], where) if row.get("id", "").strip() else _default_id(slide)
        mpp: float | None = None
        if row.get("mpp", "").strip():
            try:
                mpp = float(row["mpp"])
            except ValueError:
                mpp = math.nan
            if not (math.isfinite(mpp) and mpp > 0):
                raise InputError(f"{where}: mpp {row['mpp']!r} is not a positive number of microns per pixel")
        tasks.append(SlideTask(slide=slide, id=slide_id, mpp=mpp))
    return tasks


def _scan_folder(folder: Path) -> list[Path]:
    """Slide files directly inside ``folder`` (by suffix), sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)


def collect_slides(inputs: Iterable[str | os.PathLike[str]]) -> list[SlideTask]:
    """Turn command-line inputs into the cohort's slide list, sorted by slide path.

    Parameters
    ----------
    inputs : iterable of path-like
        Each one a slide file, a folder (its slide files, not recursive), a glob pattern
        (``**`` recurses) or a ``.csv`` manifest (see :func:`read_manifest`).

    Returns
    -------
    list of SlideTask
        Without duplicate slides, sorted by path; ids are unique.
    """
    tasks: list[SlideTask] = []
    for item in inputs:
        text = os.fspath(item)
        path = Path(text).expanduser()
        if path.is_file() and path.suffix.lower() == ".csv":
            tasks.extend(read_manifest(path))
        elif path.is_dir():
            found = _scan_folder(path)
            if not found:
                raise InputError(f"no slide files ({', '.join(SLIDE_SUFFIXES)}) in the folder {path}")
            tasks.extend(SlideTask(p.absolute(), _default_id(p)) for p in found)
        elif path.exists():
            tasks.append(SlideTask(path.absolute(), _default_id(path)))
        elif _GLOB_CHARS & set(text):
            found = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True) if Path(p).is_file())
            if not found:
                raise InputError(f"no file matches {text!r}")
            tasks.extend(SlideTask(p.absolute(), _default_id(p)) for p in found)
        else:
            raise InputError(f"slide, folder or manifest not found: {text}")
    return _deduplicate(tasks)


def _deduplicate(tasks: Sequence[SlideTask]) -> list[SlideTask]:
    """Drop repeated slides (first wins), sort by path, and refuse two slides with one id."""
    by_slide: dict[Path, SlideTask] = {}
    for task in tasks:
        by_slide.setdefault(task.slide, task)
    if not by_slide:
        raise InputError("no slides given")
    owners: dict[str, Path] = {}
    for task in by_slide.values():
        other = owners.setdefault(task.id, task.slide)
        if other != task.slide:
            raise InputError(
                f"two slides would share the result folder {task.id!r}: {other} and {task.slide}; "
                "give them distinct ids in a CSV manifest (columns slide,id)"
            )
    return sorted(by_slide.values(), key=lambda t: str(t.slide))


def parse_shard(text: str) -> tuple[int, int]:
    """Parse ``"i/n"`` (0-based shard ``i`` of ``n``).

    Examples
    --------
    >>> parse_shard("2/8")
    (2, 8)
    """
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise InputError(f"shard {text!r} is not of the form i/n, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise InputError(f"shard {text!r} needs 0 <= i < n")
    return index, count


def shard_from_env(environ: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """The shard of a SLURM job array task, or None outside a job array.

    ``SLURM_ARRAY_TASK_ID`` minus ``SLURM_ARRAY_TASK_MIN`` (so ``--array=1-8`` works too) of
    ``SLURM_ARRAY_TASK_COUNT``.
    """
    env = os.environ if environ is None else environ
    if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
        return None
    try:
        index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        count = int(env["SLURM_ARRAY_TASK_COUNT"])
    except ValueError:
        raise InputError("SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT are not integers") from None
    if count < 1 or not 0 <= index < count:
        raise InputError(
            f"job array task {env['SLURM_ARRAY_TASK_ID']} does not fit {count} tasks starting at "
            f"{env.get('SLURM_ARRAY_TASK_MIN', '0')}; give --shard i/n explicitly (array steps are not supported)"
        )
    return index, count


def take_shard(tasks: Sequence[SlideTask], index: int, count: int) -> list[SlideTask]:
    """Every ``count``-th slide of the path-sorted list, starting at ``index``."""
    return sorted(tasks, key=lambda t: str(t.slide))[index::count]

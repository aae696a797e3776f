"""Slide summaries for cohort statistics: how much tissue, of which kind, how many nuclei, how glandular.

From a finished result folder (the tissue mask in ``predictions.zarr``, ``objects.parquet``, the
slide's mpp in run.json), one flat mapping of numbers:

- ``tissue_area_mm2``: area of the tissue mask;
- ``tissue_fraction_<class>``: each tissue class's share of the area of the tissue regions;
- ``nuclei_per_mm2`` and ``nuclei_per_mm2_<type>``: nuclei per mm² of tissue, all and by type;
- ``gland_count``, ``gland_area_fraction`` and ``lumen_area_fraction`` (of the tissue area), and
  ``lumen_to_gland_area`` (lumen area / gland area).

Counts and areas come from ``objects.parquet`` (columns ``task``, ``class_name``, ``area_um2``),
read column-wise: memory stays small for millions of nuclei. A missing input leaves its entries out.

>>> flat = summary_columns({"tissue_area_mm2": 1.5, "nuclei_per_mm2_epithelial": 200.0})
>>> flat["summary_tissue_area_mm2"]
1.5
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["slide_summary", "summary_columns", "summary_or_warning", "tissue_area_mm2"]

log = logging.getLogger(__name__)

_COLUMN_PREFIX = "summary_"


def _slug(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", str(name).lower()).strip("_") or "unknown"


def tissue_area_mm2(result_dir: Path, slide_mpp: float) -> float | None:
    """Area of the tissue mask stored in ``predictions.zarr`` (None without one)."""
    from .results import PREDICTIONS
    from .store import read_mask

    path = Path(result_dir) / PREDICTIONS
    if not path.is_dir():
        return None
    try:
        found = read_mask(path)
    except Exception as exc:  # noqa: BLE001 - a summary never fails a run
        log.warning("tissue mask of %s unreadable for the summary: %s", result_dir, exc)
        return None
    if found is None:
        return None
    mask, downsample = found
    um_per_px = float(downsample) * float(slide_mpp)
    return float(np.count_nonzero(mask)) * um_per_px**2 / 1e6


def _areas_and_counts(table: Path) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], int]]:
    import pyarrow.parquet as pq

    from .export._arrow import numpy_of, one_array
    from .export._table import class_groups

    # summed here, not by pyarrow's group_by or pq.read_table: their modules import pandas where installed
    with pq.ParquetFile(table) as parquet:
        t = parquet.read(columns=["task", "class_name", "area_um2"])
    keys, first, group = class_groups(t)
    column = one_array(t.column("area_um2"))
    valid = numpy_of(column.is_valid())  # sums and counts skip missing areas, as group_by's did
    area = np.where(valid, np.nan_to_num(numpy_of(column).astype(np.float64)), 0.0)
    sums = np.bincount(group, weights=area, minlength=len(keys))
    counts_of = np.bincount(group, weights=valid, minlength=len(keys)).astype(np.int64)
    areas, counts = {}, {}
    for k in np.argsort(first, kind="stable").tolist():  # in the order the classes first appear
        areas[keys[k]], counts[keys[k]] = float(sums[k]), int(counts_of[k])
    return areas, counts


def slide_summary(result_dir: str | Path, run: Mapping[str, Any] | None = None) -> dict[str, float | int]:
    """The summary of one result folder (see module doc); ``run`` defaults to its run.json."""
    from .results import TABLE, read_run

    result_dir = Path(result_dir)
    run = run if run is not None else (read_run(result_dir) or {})
    mpp = (run.get("slide") or {}).get("mpp")
    out: dict[str, float | int] = {}
    area = tissue_area_mm2(result_dir, float(mpp)) if mpp else None
    if area is not None:
        out["tissue_area_mm2"] = round(area, 4)
    table = result_dir / TABLE
    if not table.is_file():
        return out
    areas, counts = _areas_and_counts(table)
    tissue = {c: a for (t, c), a in areas.items() if t == "tissue"}
    total = sum(tissue.values())
    for cls, a in sorted(tissue.items()):
        out[f"tissue_fraction_{_slug(cls)}"] = round(a / total, 4) if total > 0 else 0.0
    nuclei = {c: n for (t, c), n in counts.items() if t == "nuclei"}
    gland_area = sum(a for (t, _), a in areas.items() if t == "gland")
    lumen_area = sum(a for (t, _), a in areas.items() if t == "lumen")
    out["gland_count"] = int(sum(n for (t, _), n in counts.items() if t == "gland"))
    if area:
        out["nuclei_per_mm2"] = round(sum(nuclei.values()) / area, 2)
        for cls, n in sorted(nuclei.items()):
            out[f"nuclei_per_mm2_{_slug(cls)}"] = round(n / area, 2)
        out["gland_area_fraction"] = round(gland_area / 1e6 / area, 4)
        out["lumen_area_fraction"] = round(lumen_area / 1e6 / area, 4)
    if gland_area > 0:
        out["lumen_to_gland_area"] = round(lumen_area / gland_area, 4)
    return out


def summary_columns(summary: Mapping[str, Any] | None) -> dict[str, Any]:
    """The summary as ``batch_summary.csv`` columns (``summary_<name>``)."""
    return {f"{_COLUMN_PREFIX}{k}": v for k, v in (summary or {}).items()}


def summary_or_warning(result_dir: str | Path, run: Mapping[str, Any] | None = None) -> dict[str, float | int]:
    """:func:`slide_summary`, or an empty one with a logged warning: a summary never fails a run."""
    try:
        return slide_summary(result_dir, run)
    except Exception as exc:  # noqa: BLE001 - statistics are a by-product of a finished result
        log.warning("slide summary of %s not computed: %s", result_dir, exc)
        return {}

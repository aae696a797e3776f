"""How much of a slide's tissue was unreadable, and whether the slide still counts as processed.

Damaged regions (tiles that fail to decode or that libjpeg reports as corrupt) are stored as "no
data" in the maps. A slide finishes with one warning while the damaged part of its tissue stays at
or below :data:`MAX_DAMAGED_FRACTION`; above it the slide fails with
:class:`~wsi_mtl.errors.DamagedSlideError` (exit code 15), so that a slide that is mostly unreadable
is never reported as done with no objects.

Examples
--------
>>> import numpy as np
>>> from wsi_mtl.tissue import TissueMask
>>> tissue = TissueMask(mask=np.ones((4, 4), bool), mpp=8.0)  # 64 x 64 level-0 px at 0.5 um/px
>>> damaged_fraction([{"x": 0, "y": 0, "width": 32, "height": 64}], tissue, slide_mpp=0.5)
0.5
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import DamagedSlideError
from .tissue import TissueMask, boxes_on_grid

__all__ = ["MAX_DAMAGED_FRACTION", "damaged_fraction", "check_damage"]

log = logging.getLogger(__name__)

#: the largest fraction of the tissue (the whole slide where the mask is empty) that may be damaged
#: for the slide to finish with a warning; override with $WSIMTL_MAX_DAMAGED_FRACTION
MAX_DAMAGED_FRACTION = 0.5


def _limit() -> float:
    value = os.environ.get("WSIMTL_MAX_DAMAGED_FRACTION")
    try:
        return float(value) if value else MAX_DAMAGED_FRACTION
    except ValueError:
        log.warning("ignoring WSIMTL_MAX_DAMAGED_FRACTION=%r (not a number)", value)
        return MAX_DAMAGED_FRACTION


def damaged_fraction(regions: Sequence[dict[str, Any]], tissue: TissueMask, *, slide_mpp: float) -> float:
    """Fraction of the tissue mask's tissue pixels whose centre lies in a damaged region.

    ``regions`` hold ``x, y, width, height`` in level-0 px at ``slide_mpp``. Where the mask is
    empty, the fraction is of the whole mask extent.
    """
    mask = tissue.mask if tissue.mask.any() else np.ones_like(tissue.mask)
    hit = boxes_on_grid(((r["x"], r["y"], r["width"], r["height"]) for r in regions), mask.shape, tissue.mpp / slide_mpp)
    total = int(mask.sum())
    return float((hit & mask).sum() / total) if total else 0.0


def check_damage(regions: Sequence[dict[str, Any]], tissue: TissueMask, *, slide_mpp: float, name: str,
                 limit: float | None = None) -> float:
    """Warn once about damaged regions, or raise :class:`DamagedSlideError` above ``limit``.

    Returns the damaged fraction of the tissue (0 when nothing is damaged).
    """
    if not regions:
        return 0.0
    limit = _limit() if limit is None else limit
    fraction = damaged_fraction(regions, tissue, slide_mpp=slide_mpp)
    if fraction > limit:
        raise DamagedSlideError(
            f"{name}: {100 * fraction:.0f}% of the tissue is unreadable ({len(regions)} damaged regions), "
            f"more than the {100 * limit:.0f}% allowed ($WSIMTL_MAX_DAMAGED_FRACTION)")
    log.warning("%s: %d damaged regions (%.1f%% of the tissue) stored as no data; see damaged_regions in run.json",
                name, len(regions), 100 * fraction)
    return fraction

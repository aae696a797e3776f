"""The object record shared by post-processing and the exporters.

One row per instance (a nucleus, a gland, a lumen or a tissue region). Geometry is a shapely
polygon in level-0 pixels of the slide as QuPath shows it (bounds offset already subtracted).
Post-processing produces batches as :class:`ObjectBatch`; exporters consume them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

__all__ = ["TASKS", "COLUMNS", "ObjectBatch", "uuid4_text", "new_ids"]

#: the values of the ``task`` column, in export order
TASKS: tuple[str, ...] = ("nuclei", "gland", "lumen", "tissue")

#: column name -> numpy dtype kind (``U`` str, ``i`` int32, ``f`` float64, ``b`` bool), in table
#: order (``geometry`` is handled separately)
COLUMNS: dict[str, str] = {
    "id": "U",  # UUID4 string
    "task": "U",
    "class_name": "U",
    "class_id": "i",
    "probability": "f",  # mean probability of the assigned class among the task's object classes
    "nucleus_probability": "f",  # nuclei: mean foreground probability of the instance map; NaN otherwise
    "centroid_x_px": "f",  # level-0 px
    "centroid_y_px": "f",
    "centroid_x_um": "f",
    "centroid_y_um": "f",
    "area_um2": "f",
    "perimeter_um": "f",
    "solidity": "f",  # NaN for tissue regions
    "eccentricity": "f",  # NaN for tissue regions
    "truncated": "b",  # wider than the largest halo: written cut at the halo edge
}


#: where the 32 hex digits of a UUID go in its 36-character text (the rest are dashes)
_UUID_DIGITS = np.array([i for i in range(36) if i not in (8, 13, 18, 23)])


def uuid4_text(raw: np.ndarray) -> np.ndarray:
    """The ``id`` column's text of (n, 16) random bytes: version-4 UUIDs, as ``str(uuid.UUID(bytes=b,
    version=4))`` gives them, made at once."""
    raw = np.array(raw, np.uint8).reshape(-1, 16)
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40  # version 4
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    text = np.full((len(raw), 36), ord("-"), np.uint8)
    text[:, _UUID_DIGITS] = np.frombuffer(raw.tobytes().hex().encode("ascii"), np.uint8).reshape(-1, 32)
    return text.view("S36").ravel().astype("U36")


def new_ids(n: int) -> np.ndarray:
    """``n`` new random object ids (:func:`uuid4_text` of the system's random bytes, as ``uuid.uuid4``)."""
    return uuid4_text(np.frombuffer(os.urandom(16 * n), np.uint8))


@dataclass
class ObjectBatch:
    """A column-oriented batch of objects; every array has one entry per object.

    ``columns`` holds one numpy array per name in :data:`COLUMNS`; ``geometry`` is a numpy
    object array of shapely Polygons (or MultiPolygons for tissue regions) in level-0 px.
    ``wkb``, optional: the same geometry as WKB (an object array of bytes), from a producer that
    made every polygon valid (post-processing's chunk processes). The table stores these bytes
    as they are and does not test the geometry's validity again.
    """

    columns: dict[str, np.ndarray]
    geometry: np.ndarray
    colors: dict[tuple[str, str], tuple[int, int, int]] = field(default_factory=dict)
    wkb: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.geometry)

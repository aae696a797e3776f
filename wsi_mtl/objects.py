"""The object record shared by post-processing and the exporters.

One row per instance (a nucleus, a gland, a lumen or a tissue region). Geometry is a shapely
polygon in level-0 pixels of the slide as QuPath shows it (bounds offset already subtracted).
Post-processing produces batches as :class:`ObjectBatch`; exporters consume them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["TASKS", "COLUMNS", "ObjectBatch"]

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


@dataclass
class ObjectBatch:
    """A column-oriented batch of objects; every array has one entry per object.

    ``columns`` holds one numpy array per name in :data:`COLUMNS`; ``geometry`` is a numpy
    object array of shapely Polygons (or MultiPolygons for tissue regions) in level-0 px.
    """

    columns: dict[str, np.ndarray]
    geometry: np.ndarray
    colors: dict[tuple[str, str], tuple[int, int, int]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.geometry)

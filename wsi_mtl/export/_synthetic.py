"""Synthetic object batches (ellipses) for tests, examples and benchmarks.

Batches are generated lazily, one at a time, so a generator of a million objects uses no more
memory than one batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import shapely

from ..objects import COLUMNS, ObjectBatch, uuid4_text

__all__ = ["synthetic_batches", "SYNTHETIC_CLASSES"]

#: (task, class_name) -> (class_id, colour, (semi-axis range in px))
SYNTHETIC_CLASSES: dict[tuple[str, str], tuple[int, tuple[int, int, int], tuple[float, float]]] = {
    ("nuclei", "epithelial"): (1, (255, 0, 0), (4.0, 9.0)),
    ("nuclei", "inflammatory"): (2, (0, 200, 0), (3.0, 5.0)),
    ("nuclei", "connective"): (3, (0, 0, 255), (3.0, 8.0)),
    ("gland", "gland"): (1, (255, 200, 0), (60.0, 200.0)),
    ("lumen", "lumen"): (1, (0, 200, 255), (15.0, 50.0)),
    ("tissue", "tumour"): (1, (200, 0, 200), (400.0, 900.0)),
}


def _uuids(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` random (version 4) UUID strings drawn from ``rng`` (reproducible for a seed)."""
    return uuid4_text(rng.integers(0, 256, size=(n, 16), dtype=np.uint8))


def _ellipses(cx: np.ndarray, cy: np.ndarray, a: np.ndarray, b: np.ndarray, theta: np.ndarray, vertices: int) -> np.ndarray:
    """Polygons of rotated ellipses with ``vertices`` corners (closed rings)."""
    t = np.linspace(0.0, 2.0 * np.pi, vertices, endpoint=False)
    ex = a[:, None] * np.cos(t)
    ey = b[:, None] * np.sin(t)
    c, s = np.cos(theta)[:, None], np.sin(theta)[:, None]
    x = cx[:, None] + c * ex - s * ey
    y = cy[:, None] + s * ex + c * ey
    ring = np.stack([x, y], axis=-1)
    ring = np.concatenate([ring, ring[:, :1]], axis=1)
    return shapely.polygons(ring)


def synthetic_batches(
    n_objects: int,
    *,
    batch_size: int = 10_000,
    tasks: tuple[str, ...] = ("nuclei",),
    vertices: int = 12,
    extent_px: float = 100_000.0,
    mpp: float = 0.25,
    seed: int = 0,
) -> Iterator[ObjectBatch]:
    """Yield batches of random ellipse objects following the object record.

    Parameters
    ----------
    n_objects : int
        Total number of objects.
    batch_size : int, default 10000
        Objects per batch.
    tasks : tuple of str, default ("nuclei",)
        Tasks drawn from (uniformly per object, then a class of that task uniformly).
    vertices : int, default 12
        Corners per ellipse.
    extent_px : float, default 100000
        Objects lie in the square [0, extent_px) level-0 px.
    mpp : float, default 0.25
        Micrometres per pixel used for the um measurements.
    seed : int, default 0
        Random seed; the same arguments give the same objects.

    Yields
    ------
    ObjectBatch
    """
    rng = np.random.default_rng(seed)
    keys = [k for k in SYNTHETIC_CLASSES if k[0] in tasks]
    if not keys:
        raise ValueError(f"no synthetic classes for tasks {tasks}")
    colors = {k: SYNTHETIC_CLASSES[k][1] for k in keys}
    task_names = sorted({k[0] for k in keys})
    done = 0
    while done < n_objects:
        n = min(batch_size, n_objects - done)
        task_pick = rng.integers(0, len(task_names), n)
        key_idx = np.empty(n, dtype=int)
        for ti, task in enumerate(task_names):
            choices = [i for i, k in enumerate(keys) if k[0] == task]
            sel = task_pick == ti
            key_idx[sel] = rng.choice(choices, size=int(sel.sum()))
        lo = np.array([SYNTHETIC_CLASSES[keys[i]][2][0] for i in key_idx])
        hi = np.array([SYNTHETIC_CLASSES[keys[i]][2][1] for i in key_idx])
        a = rng.uniform(lo, hi)
        b = a * rng.uniform(0.5, 1.0, n)
        margin = hi + 1.0
        cx = rng.uniform(margin, extent_px - margin)
        cy = rng.uniform(margin, extent_px - margin)
        theta = rng.uniform(0.0, np.pi, n)
        geometry = _ellipses(cx, cy, a, b, theta, vertices)
        area_px = shapely.area(geometry)
        hull = shapely.area(shapely.convex_hull(geometry))
        is_nucleus = np.array([keys[i][0] == "nuclei" for i in key_idx])
        columns: dict[str, np.ndarray] = {
            "id": _uuids(rng, n),
            "task": np.array([keys[i][0] for i in key_idx]),
            "class_name": np.array([keys[i][1] for i in key_idx]),
            "class_id": np.array([SYNTHETIC_CLASSES[keys[i]][0] for i in key_idx], dtype=np.int32),
            "probability": (probability := rng.uniform(0.5, 1.0, n)),
            "nucleus_probability": np.where(is_nucleus, probability, np.nan),
            "centroid_x_px": cx,
            "centroid_y_px": cy,
            "centroid_x_um": cx * mpp,
            "centroid_y_um": cy * mpp,
            "area_um2": area_px * mpp * mpp,
            "perimeter_um": shapely.length(geometry) * mpp,
            "solidity": np.where(is_nucleus, area_px / hull, np.nan),
            "eccentricity": np.where(is_nucleus, np.sqrt(1.0 - (b / a) ** 2), np.nan),
            "truncated": np.zeros(n, dtype=bool),
        }
        assert set(columns) == set(COLUMNS)
        yield ObjectBatch(columns=columns, geometry=geometry, colors=colors)
        done += n

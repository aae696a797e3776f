"""Post-processing made ready once, in the process that starts the chunk workers.

A chunk worker's first chunks pay for imports (~0.8 CPU s) and for loading every compiled kernel
from numba's cache (~1.2 CPU s before its first nuclei chunk, ~1.5 more before its first gland
chunk, on the 2-core benchmark machine). Worker pools start their processes from a
``forkserver`` that imports this module first (:func:`wsi_mtl.postprocess._pool`): importing it
runs :func:`warm`, which puts small synthetic maps through every task (and fills one label-image
triangle, and formats a few GeoJSON features), so the kernels are loaded once in the server and
each forked worker (and the label images' and GeoJSON processes) starts with them; on a first run
after install, their compiling happens there too, beside the network, and fills numba's cache.
Nothing here changes a result; a failure only leaves the workers to load what they need themselves.
"""

from __future__ import annotations

import logging

import numpy as np

__all__ = ["warm", "warm_maps"]

log = logging.getLogger(__name__)


def _disks(shape: tuple[int, int], centres: list[tuple[int, int, int]]) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.int32)
    for k, (cy, cx, r) in enumerate(centres, start=1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k
    return labels


def _three_class(labels: np.ndarray, interior: int = 230, boundary: int = 200) -> np.ndarray:
    """(3, H, W) uint8 background / interior / boundary probabilities of ``labels``."""
    from scipy import ndimage as ndi

    inner = np.zeros(labels.shape, bool)
    for k in range(1, int(labels.max()) + 1):  # each object's own interior: touching ones keep two
        inner |= ndi.binary_erosion(labels == k, iterations=2)
    ring = (labels > 0) & ~inner
    out = np.zeros((3, *labels.shape), np.uint8)
    out[1][inner], out[2][ring] = interior, boundary
    out[0] = 255 - out[1] - out[2]
    return out


def warm_maps(side: int = 160) -> dict[str, np.ndarray]:
    """Small maps with every kind of object the steps treat apart: touching nuclei with a neck,
    single nuclei, one at the edge, a gland with a lumen and a hole, tissue classes."""
    shape = (side, side)
    nuclei = _disks(shape, [(20, 20, 6), (20, 30, 6), (45, 20, 6), (45, 29, 6), (52, 25, 5), (60, 60, 5), (100, 30, 7), (3, 90, 5), (130, 130, 4)])
    gland = _disks(shape, [(90, 100, 40)])
    lumen = _disks(shape, [(90, 100, 12)])
    gland[lumen > 0] = 0  # a lumen inside the gland's ring
    types = np.zeros((5, *shape), np.uint8)
    types[0] = 255
    types[1][nuclei % 2 == 1], types[2][(nuclei > 0) & (nuclei % 2 == 0)] = 200, 200
    types[0][nuclei > 0] = 55
    patch = np.zeros((3, side // 16, side // 16), np.uint8)
    patch[0], patch[1, :, : side // 32] = 180, 220
    return {"Nuclei-INST": _three_class(nuclei), "Nuclei-TYPE": types, "Gland-INST": _three_class(gland),
            "Lumen-INST": _three_class(lumen), "Patch-Class": patch}


def warm() -> None:
    """Run every task on :func:`warm_maps` with every step of the shipped model's settings on
    (neck cutting, core opening, growth, the non-glandular test); errors are logged, never raised."""
    try:
        from wsi_mtl.postprocess._extract import PostprocessParams, objects_from_maps
        from wsi_mtl.postprocess import _compiled

        if not _compiled.available():
            return
        maps = warm_maps()
        params = PostprocessParams(nuclei_split_h=0.75, nuclei_min_interior=0.8, gland_erosion_px=8, gland_open_px=8,
                                   gland_min_area_px=400, gland_max_nonglandular=0.5, gland_min_probability=0.5)
        classes = {"Patch-Class": (("tumor", "stroma", "empty"), ((1, 1, 1),) * 3)}
        objects_from_maps(maps, slide_mpp=0.25, downsample=2.0, classes=classes, params=params,
                          tissue_mask=np.ones((20, 20), bool), mask_downsample=16.0, slide_size=(320, 320))
        from wsi_mtl.export._scanline import fill_rings  # the label images' fill (their process is forked here too)

        fill_rings(np.zeros((4, 4), np.int32), np.array([0.0, 3.0, 3.0, 0.0]), np.array([0.0, 0.0, 3.0, 0.0]),
                   np.zeros(4, np.int64), np.zeros(4, np.int64), np.ones(1, bool), np.ones(1, np.int64))
        from wsi_mtl.export._geojson import warm_kernels  # the GeoJSON processes' writer (forked here too)

        warm_kernels()
    except Exception as exc:  # a warm-up must never stop the process that forks the workers
        log.debug("post-processing warm-up failed: %s", exc)


warm()

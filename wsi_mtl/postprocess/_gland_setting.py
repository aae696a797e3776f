"""Where a gland lies: the tissue head's view of the tissue under each gland object.

Glands lie in epithelium. A gland object that the tissue head places mostly in tissue where glands
do not lie (stroma, lymphocytes, fat, glass: :data:`NON_GLANDULAR_CLASSES`) is a false gland, e.g.
a dermal papilla cut across, which the gland head can take for a gland. Each gland's share of such
tissue is the mean, over its pixels, of the summed probabilities of those classes in the tissue
cell under the pixel. Values are the stored uint8 ``round(255 p)`` per class (float maps are
rounded the same way first), summed as integers, so a whole image and a chunk of it give the same
share to the same object.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from wsi_mtl.postprocess._instances import _keep_large, find_objects

__all__ = ["NON_GLANDULAR_CLASSES", "non_glandular_channels", "non_glandular_cells", "cell_index", "non_glandular_share", "drop_non_glandular"]

#: Tissue-head class names (Kather 2016 and Cerberus tissue classes) of tissue in which glands do
#: not lie. Not in it: epithelium, debris (the shipped head calls many GlaS glands debris) and
#: mixed classes ("complex").
NON_GLANDULAR_CLASSES = frozenset({"stroma", "lympho", "inflammatory", "muscle", "adipose", "empty", "background", "glass"})


def non_glandular_channels(class_names: Sequence[str]) -> list[int]:
    """Channels of a tissue head that are :data:`NON_GLANDULAR_CLASSES`."""
    return [i for i, n in enumerate(class_names) if str(n).lower() in NON_GLANDULAR_CLASSES]


def non_glandular_cells(prob: np.ndarray, class_names: Sequence[str]) -> np.ndarray | None:
    """(h, w) uint16 sum of ``round(255 p)`` over the non-glandular channels of a (C, h, w) tissue
    map (uint8 as stored, or float probabilities); None where the head has no such class."""
    channels = non_glandular_channels(class_names)
    if not channels:
        return None
    sel = prob[channels]
    if sel.dtype != np.uint8:
        sel = np.rint(np.clip(sel, 0.0, 1.0) * 255.0)
    return sel.astype(np.uint16).sum(axis=0, dtype=np.uint16)


def cell_index(start: int, stop: int, grid_per_cell: float) -> np.ndarray:
    """Tissue cell of each grid pixel ``start..stop-1``: ``floor(px / grid_per_cell)``."""
    return np.floor(np.arange(start, stop) / grid_per_cell).astype(np.int64)


def non_glandular_share(labels: np.ndarray, ids: np.ndarray, slices: list, cells: np.ndarray, grid_per_cell: float, *,
                        origin_yx: tuple[int, int] = (0, 0), cells_origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Share (0..1) of non-glandular tissue under each label of ``ids``.

    ``labels`` is a grid region whose pixel (0, 0) is grid pixel ``origin_yx``; ``slices`` are its
    ``find_objects`` boxes; ``cells`` are :func:`non_glandular_cells` from cell ``cells_origin`` on
    (cell (0, 0) starts at grid pixel (0, 0)); pixels beyond the last cell read the last one.
    """
    out = np.zeros(len(ids), np.float64)
    (y0, x0), (cy, cx) = origin_yx, cells_origin
    for k, i in enumerate(np.asarray(ids, np.int64)):
        sl = slices[i - 1]
        rows = np.clip(cell_index(y0 + sl[0].start, y0 + sl[0].stop, grid_per_cell) - cy, 0, cells.shape[0] - 1)
        cols = np.clip(cell_index(x0 + sl[1].start, x0 + sl[1].stop, grid_per_cell) - cx, 0, cells.shape[1] - 1)
        mine = labels[sl] == i
        total = int(cells[np.ix_(rows, cols)][mine].sum(dtype=np.int64))
        out[k] = total / (255.0 * max(int(mine.sum()), 1))
    return out


def drop_non_glandular(labels: np.ndarray, cells: np.ndarray | None, grid_per_cell: float, max_share: float) -> np.ndarray:
    """Whole-image gland labels without those whose :func:`non_glandular_share` is above
    ``max_share``, renumbered 1..n in order (unchanged where ``cells`` is None or ``max_share >= 1``)."""
    n = int(labels.max(initial=0))
    if cells is None or max_share >= 1 or n == 0:
        return labels
    ids = np.arange(1, n + 1)
    share = non_glandular_share(labels, ids, find_objects(labels), cells, grid_per_cell)
    keep = np.zeros(n + 1, bool)
    keep[1:] = share <= max_share
    return _keep_large(labels, 0, also=keep)

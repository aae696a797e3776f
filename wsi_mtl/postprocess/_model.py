"""Post-processing with a model's settings: its tuned :class:`PostprocessParams` (plus a user's
overrides), and whole-image nuclei and gland instances made with them, as ``wsimtl segment`` makes
them chunk by chunk. Evaluation, tuning and the CLI use these; nothing else decides the settings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._extract import PostprocessParams
from ._gland_setting import drop_non_glandular, non_glandular_cells
from ._instances import downsample_prob, drop_unconfident_glands, gland_instances, lumen_instances, nuclei_instances

__all__ = ["nuclei_labels", "gland_labels", "gland_lumen_labels", "params_of"]


def params_of(source: Any, overrides: Mapping[str, Any] | None = None) -> PostprocessParams:
    """The post-processing settings of a model, or of a store's recorded settings (a mapping), with
    a user's ``overrides`` (checked; see :func:`~wsi_mtl.postprocess.check_overrides`).

    A model's are its ``config.postprocess_settings`` (its tuned ``extra["postprocess"]`` and its
    tissue head's window); unknown or absent fields take the defaults.
    """
    if isinstance(source, Mapping) or source is None:
        settings = source
    else:
        settings = getattr(getattr(source, "config", None), "postprocess_settings", None)
    return PostprocessParams.from_mapping(settings).with_overrides(overrides)


def nuclei_labels(prob: np.ndarray, params: PostprocessParams | None = None) -> np.ndarray:
    """(H, W) int32 nuclei instances from a (3, H, W) Nuclei-INST map (float or uint8 255 p)."""
    p = params or PostprocessParams()
    return np.asarray(
        nuclei_instances(prob, min_area_px=p.nuclei_min_area_px, marker_threshold=p.nuclei_marker_threshold, mask_threshold=p.nuclei_mask_threshold,
                         split_h=p.nuclei_split_h, min_interior=p.nuclei_min_interior)
    ).astype(np.int32)


def gland_labels(prob: np.ndarray, params: PostprocessParams | None = None, *, tissue: np.ndarray | None = None,
                 tissue_classes: Sequence[str] = (), cell_px: float = 32) -> np.ndarray:
    """(H, W) int32 gland instances from a (3, H, W) Gland-INST map at 0.5 um/px.

    With ``tissue`` (the (C, h, w) Patch-Class map of the same image, cells of ``cell_px`` map
    pixels from pixel (0, 0), classes ``tissue_classes``), glands in tissue where glands do not lie
    are dropped as ``gland_max_nonglandular`` says (:mod:`._gland_setting`), as `wsimtl segment` drops them;
    glands below ``gland_min_probability`` are dropped too.
    With ``gland_downsample`` f > 1 the instances are made on the f-times coarser grid, with the
    distances and areas scaled as `wsimtl segment` scales them, and each coarse pixel covers its
    f x f block of the returned labels.
    """
    p = params or PostprocessParams()
    g = p.gland_grid()
    coarse = downsample_prob(prob, g.factor)
    labels = np.asarray(gland_instances(coarse, threshold=p.gland_threshold, erosion_px=g.gland_erosion_px,
                                        min_area_px=g.gland_min_area_px, open_px=g.gland_open_px)).astype(np.int32)
    labels = drop_unconfident_glands(labels, coarse, p.gland_min_probability)
    if tissue is not None and p.gland_max_nonglandular < 1:
        labels = drop_non_glandular(labels, non_glandular_cells(tissue, tissue_classes), float(cell_px) / g.factor, p.gland_max_nonglandular)
    return _to_model_grid(labels, g.factor, prob.shape[1:])


def gland_lumen_labels(prob: np.ndarray, glands: np.ndarray, params: PostprocessParams | None = None) -> np.ndarray:
    """(H, W) int32 lumen instances from a (3, H, W) Lumen-INST map, kept inside ``glands`` (the
    :func:`gland_labels` of the same map grid and settings), as ``wsimtl segment`` keeps them (on
    the ``gland_downsample`` grid, as :func:`gland_labels`)."""
    p = params or PostprocessParams()
    g = p.gland_grid()
    f = g.factor
    labels = np.asarray(lumen_instances(downsample_prob(prob, f), gland_labels=glands[::f, ::f], threshold=p.lumen_threshold,
                                        erosion_px=g.lumen_erosion_px, min_area_px=g.lumen_min_area_px,
                                        min_inside=p.lumen_min_inside)).astype(np.int32)
    return _to_model_grid(labels, f, prob.shape[1:])


def _to_model_grid(labels: np.ndarray, f: int, shape: tuple[int, ...]) -> np.ndarray:
    """Labels of the ``f``-times coarser grid, each pixel repeated over its block, cut to ``shape``."""
    if f == 1:
        return labels
    return np.repeat(np.repeat(labels, f, axis=0), f, axis=1)[: shape[0], : shape[1]]

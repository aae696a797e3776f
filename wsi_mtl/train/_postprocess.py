"""Instance extraction for evaluation: the same post-processing (and settings) `wsimtl segment` uses."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..postprocess import PostprocessParams, gland_instances, nuclei_instances

__all__ = ["nuclei_labels", "gland_labels", "params_of"]


def params_of(model: Any) -> PostprocessParams:
    """The post-processing settings of a model: its tuned ``extra.postprocess``, else the defaults."""
    config = getattr(model, "config", None)
    extra = getattr(config, "extra", None) or {}
    return PostprocessParams.from_mapping(extra.get("postprocess"))


def nuclei_labels(prob: np.ndarray, params: PostprocessParams | None = None) -> np.ndarray:
    """(H, W) int32 nuclei instances from a (3, H, W) Nuclei-INST map (float or uint8 255 p)."""
    p = params or PostprocessParams()
    return np.asarray(
        nuclei_instances(prob, min_area_px=p.nuclei_min_area_px, marker_threshold=p.nuclei_marker_threshold, mask_threshold=p.nuclei_mask_threshold,
                         split_h=p.nuclei_split_h, min_interior=p.nuclei_min_interior)
    ).astype(np.int32)


def gland_labels(prob: np.ndarray, params: PostprocessParams | None = None) -> np.ndarray:
    """(H, W) int32 gland instances from a (3, H, W) Gland-INST map at 0.5 um/px."""
    p = params or PostprocessParams()
    return np.asarray(gland_instances(prob, threshold=p.gland_threshold, erosion_px=p.gland_erosion_px, min_area_px=p.gland_min_area_px,
                                      open_px=p.gland_open_px)).astype(np.int32)

"""Instance extraction for evaluation: the same post-processing `wsimtl segment` uses."""

from __future__ import annotations

import numpy as np

from ..postprocess import gland_instances, nuclei_instances

__all__ = ["nuclei_labels", "gland_labels"]


def nuclei_labels(prob: np.ndarray) -> np.ndarray:
    """(H, W) int32 nuclei instances from a (3, H, W) Nuclei-INST map (float or uint8 255 p)."""
    return np.asarray(nuclei_instances(prob)).astype(np.int32)


def gland_labels(prob: np.ndarray) -> np.ndarray:
    """(H, W) int32 gland instances from a (3, H, W) Gland-INST map at 0.5 um/px."""
    return np.asarray(gland_instances(prob)).astype(np.int32)

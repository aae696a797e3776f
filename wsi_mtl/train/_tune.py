"""Tune a model's post-processing thresholds on training images (never on the validation split).

The network is run once per image; every candidate setting is then applied to the stored maps.
The chosen values go into the model's ``config.json`` (``extra.postprocess``), where
`wsimtl segment`, `wsimtl export` and `wsimtl evaluate` read them.
"""

from __future__ import annotations

import itertools
from functools import partial
import logging
from dataclasses import replace
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .. import metrics
from ..postprocess import PostprocessParams, drop_unconfident_glands, remove_small_instances, remove_unconfident_instances
from ._data import SegItem
from ._evaluate import gland_setting, lumen_overlap, predict_image, tissue_heads
from ..postprocess import gland_labels, nuclei_labels

__all__ = ["NUCLEI_GRID", "GLAND_GRID", "SETTING_GRID", "LUMEN_GRID", "choose_params", "tune_postprocess"]

logger = logging.getLogger(__name__)

#: Candidate nuclei settings (PostprocessParams field -> values), scored by mean (AJI + PQ) / 2.
#: ``nuclei_min_interior`` and ``nuclei_min_area_px`` come last so that they vary fastest: the
#: instances of one (marker, mask, split) setting are computed once and only filtered for them.
NUCLEI_GRID: dict[str, tuple[float, ...]] = {
    "nuclei_marker_threshold": (0.5, 0.6, 0.7, 0.8, 0.9),
    "nuclei_mask_threshold": (0.3, 0.4, 0.5, 0.6),
    "nuclei_split_h": (0.0, 0.5, 0.75, 1.0, 1.5),
    "nuclei_min_interior": (0.0, 0.8, 0.9),
    "nuclei_min_area_px": (16.0, 24.0, 32.0, 48.0),
}
#: Candidate gland settings, scored by pooled object F1 + mean object Dice. ``gland_min_area_px``
#: comes last so that it varies fastest: the grown instances of one (threshold, erosion, opening)
#: are computed once and only filtered by size for each of its values.
GLAND_GRID: dict[str, tuple[float, ...]] = {
    "gland_threshold": (0.02, 0.05, 0.1, 0.2, 0.35, 0.5),
    "gland_erosion_px": (3.0, 5.0, 8.0, 11.0, 14.0),
    "gland_open_px": (0.0, 4.0, 8.0),
    "gland_min_area_px": (800.0, 2000.0, 4000.0, 6000.0, 9000.0),
}

#: Candidate ``gland_min_probability``, tuned after :data:`GLAND_GRID` with its choice, on the same
#: images and by the same score; off first, so that a tie keeps every gland.
CONFIDENCE_GRID: dict[str, tuple[float, ...]] = {"gland_min_probability": (0.0, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)}

#: Candidate lumen settings, scored by the Dice (pooled over the images) of the lumen objects
#: `wsimtl segment` makes (kept inside the glands of the model's gland settings) against the lumen
#: pseudo-labels of GlaS training images. The pseudo-labels were eroded by 3 px for training, so
#: growing cores back by up to 4 px is on the grid.
LUMEN_GRID: dict[str, tuple[float, ...]] = {
    "lumen_threshold": (0.3, 0.4, 0.5, 0.6, 0.7),
    "lumen_erosion_px": (1.0, 2.0, 3.0, 4.0),
    "lumen_min_area_px": (10.0, 20.0, 40.0, 80.0),
    "lumen_min_inside": (0.3, 0.5, 0.8),
}


#: Candidate ``gland_max_nonglandular`` (:mod:`wsi_mtl.postprocess._gland_setting`), scored as the
#: gland grid on GlaS training images with their tissue maps, after the other gland settings;
#: strictest first, so that a tie keeps the strictest (GlaS crops hold little tissue where glands do
#: not lie: the setting is for the rest of a slide).
SETTING_GRID: dict[str, tuple[float, ...]] = {"gland_max_nonglandular": (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)}


def _combos(grid: Mapping[str, Sequence[float]]) -> list[dict[str, float]]:
    keys = list(grid)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]


class _Grown:
    """Instances before the last filters of a task's post-processing, kept for the last setting of
    ``KEY`` fields asked: a sweep over the filter fields (the grid's last ones, which vary fastest)
    reuses them, the same labels in a fraction of the time."""

    KEY: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.key: tuple[float, ...] | None = None
        self.labels: list[np.ndarray] = []

    def _grow(self, prob: np.ndarray, params: PostprocessParams) -> np.ndarray:
        raise NotImplementedError

    def _filter(self, labels: np.ndarray, prob: np.ndarray, params: PostprocessParams) -> np.ndarray:
        raise NotImplementedError

    def get(self, maps: Sequence[np.ndarray], params: PostprocessParams) -> list[np.ndarray]:
        key = tuple(getattr(params, f) for f in self.KEY)
        if key != self.key:
            self.key, self.labels = key, [self._grow(prob, params) for prob in maps]
        return [self._filter(lab, prob, params) for lab, prob in zip(self.labels, maps)]


class _GrownNuclei(_Grown):
    """Nuclei before the confidence and size filters (``nuclei_labels`` = those filters applied to these)."""

    KEY = ("nuclei_marker_threshold", "nuclei_mask_threshold", "nuclei_split_h")

    def _grow(self, prob: np.ndarray, params: PostprocessParams) -> np.ndarray:
        return nuclei_labels(prob, replace(params, nuclei_min_interior=0.0, nuclei_min_area_px=0.0))

    def _filter(self, labels: np.ndarray, prob: np.ndarray, params: PostprocessParams) -> np.ndarray:
        return remove_small_instances(remove_unconfident_instances(labels, prob, params.nuclei_min_interior), params.nuclei_min_area_px)


def _nuclei_score(items: Sequence[SegItem], maps: Sequence[np.ndarray], params: PostprocessParams, grown: _GrownNuclei | None = None) -> float:
    vals = []
    for item, pred in zip(items, (grown or _GrownNuclei()).get(maps, params)):
        vals.append(0.5 * (metrics.aji(item.labels, pred) + metrics.panoptic_quality(item.labels, pred).pq))
    return float(np.mean(vals)) if vals else float("nan")


class _GrownGlands(_Grown):
    """Glands before the size filter (``gland_labels`` = that filter, then renumbering in order)."""

    KEY = ("gland_threshold", "gland_erosion_px", "gland_open_px")

    def _grow(self, prob: np.ndarray, params: PostprocessParams) -> np.ndarray:
        return gland_labels(prob, replace(params, gland_min_area_px=0.0, gland_min_probability=0.0))

    def _filter(self, labels: np.ndarray, prob: np.ndarray, params: PostprocessParams) -> np.ndarray:
        return drop_unconfident_glands(remove_small_instances(labels, params.gland_min_area_px), prob, params.gland_min_probability)


def _gland_score(items: Sequence[SegItem], maps: Sequence[np.ndarray], params: PostprocessParams, grown: _GrownGlands | None = None) -> float:
    return _glands_f1_dice(items, (grown or _GrownGlands()).get(maps, params))


def _glands_f1_dice(items: Sequence[SegItem], preds: Iterable[np.ndarray]) -> float:
    """Pooled object F1 + mean object Dice of gland predictions."""
    tp = fp = fn = 0
    dices = []
    for item, pred in zip(items, preds):
        _, t, p, n = metrics.object_f1(item.labels, pred)
        tp, fp, fn = tp + t, fp + p, fn + n
        dices.append(metrics.object_dice(item.labels, pred))
    f1 = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0
    return float(f1 + np.mean(dices)) if dices else float("nan")


def _lumen_score(items: Sequence[SegItem], maps: Sequence[tuple[np.ndarray, np.ndarray]], params: PostprocessParams) -> float:
    """Pooled Dice of the lumen objects (inside the glands of ``params``) against the pseudo-labels;
    ``maps``: (Lumen-INST, gland labels) per item."""
    inter = total = 0
    for item, (lumen, glands) in zip(items, maps):
        both, each = lumen_overlap(lumen, glands, item.lumen, params)
        inter, total = inter + both, total + each
    return 2 * inter / total if total else float("nan")


def _best(grid: Mapping[str, Sequence[float]], score: Any, base: PostprocessParams) -> tuple[dict[str, float], float]:
    """The ``grid`` setting (over ``base``) with the highest ``score(params)``; ties keep the earlier."""
    best: dict[str, float] = {}
    best_score = -np.inf
    for combo in _combos(grid):
        s = score(replace(base, **combo))
        if s > best_score:
            best, best_score = combo, s
    return best, float(best_score)


def choose_lumen_params(items: Sequence[SegItem], maps: Sequence[tuple[np.ndarray, np.ndarray]], base: PostprocessParams,
                        grid: Mapping[str, Sequence[float]] | None = None) -> tuple[dict[str, float], float, float]:
    """The lumen setting of ``grid`` (default :data:`LUMEN_GRID`) with the best pooled Dice against
    the items' lumen pseudo-labels; its score and that of ``base``'s lumen settings."""
    score = partial(_lumen_score, items, maps)
    return (*_best(grid or LUMEN_GRID, score, base), score(base))


def choose_setting_params(items: Sequence[SegItem], glands: Sequence[np.ndarray], tissue: Sequence[tuple[np.ndarray | None, float]],
                          grid: Mapping[str, Sequence[float]] | None = None) -> tuple[dict[str, float], float, float]:
    """The ``gland_max_nonglandular`` of ``grid`` (default :data:`SETTING_GRID`) whose glands score best
    on ``items``: ``glands`` are their gland labels before that filter, ``tissue`` their
    (:func:`~wsi_mtl.postprocess._gland_setting.non_glandular_cells`, cell px). Returns the choice,
    its score and the score without the filter."""
    from ..postprocess._gland_setting import drop_non_glandular

    def score(params: PostprocessParams) -> float:
        t = params.gland_max_nonglandular
        return _glands_f1_dice(items, (drop_non_glandular(g, cells, px, t) for g, (cells, px) in zip(glands, tissue)))

    base = PostprocessParams()
    return (*_best(grid or SETTING_GRID, score, base), score(base))


def choose_params(task: str, items: Sequence[SegItem], maps: Sequence[np.ndarray], grid: Mapping[str, Sequence[float]]) -> tuple[dict[str, float], float, float]:
    """The ``grid`` setting that scores best for ``task`` (``"nuclei"`` or ``"glands"``) on stored maps.

    ``maps`` are the (3, H, W) INST probabilities of ``items``. Returns the chosen fields, their
    score and the score of the defaults; ties keep the earlier candidate.
    """
    score_fn = {"nuclei": partial(_nuclei_score, grown=_GrownNuclei()), "glands": partial(_gland_score, grown=_GrownGlands())}[task]
    default = PostprocessParams()
    return (*_best(grid, partial(score_fn, items, maps), default), score_fn(items, maps, default))


def tune_postprocess(
    model: torch.nn.Module,
    nuclei: Sequence[SegItem] = (),
    glands: Sequence[SegItem] = (),
    *,
    nuclei_grid: Mapping[str, Sequence[float]] | None = None,
    gland_grid: Mapping[str, Sequence[float]] | None = None,
    bf16: bool | None = None,
    lumen: Sequence[SegItem] = (),
    lumen_grid: Mapping[str, Sequence[float]] | None = None,
    setting: Sequence[SegItem] = (),
) -> dict[str, Any]:
    """Pick the post-processing settings that score best on ``nuclei`` and ``glands`` items.

    Parameters
    ----------
    model
        A :class:`~wsi_mtl.network.MultiTaskNet` (eval mode is set here).
    nuclei, glands
        Labelled items at the model's mpp (instance labels); pass training images, never the
        validation split.
    nuclei_grid, gland_grid, lumen_grid
        Candidate values per :class:`~wsi_mtl.postprocess.PostprocessParams` field
        (default :data:`NUCLEI_GRID`, :data:`GLAND_GRID`, :data:`LUMEN_GRID`).
    lumen
        GlaS training items with lumen pseudo-labels (``SegItem.lumen``); tuned after the glands,
        inside the glands of the model's (or the just chosen) gland settings.
    setting
        GlaS training items for ``gland_max_nonglandular`` (:data:`SETTING_GRID`), tuned after the
        other gland settings and before lumen.

    Returns
    -------
    dict
        ``postprocess`` (the chosen fields), ``scores`` (best and default score per task) and
        ``n_images`` per task.
    """
    model.eval()
    chosen: dict[str, float] = {}
    scores: dict[str, dict[str, float]] = {}
    for task, items, head, grid in (
        ("nuclei", nuclei, "Nuclei-INST", nuclei_grid or NUCLEI_GRID),
        ("glands", glands, "Gland-INST", gland_grid or GLAND_GRID),
    ):
        if not items or head not in model.config.heads:
            continue
        maps = [predict_image(model, it.image, heads=[head], bf16=bf16)[head] for it in items]
        best, best_score, base = choose_params(task, items, maps, grid)
        if task == "glands" and "gland_min_probability" not in grid:  # then the confidence filter, over that choice
            more, best_score = _best(CONFIDENCE_GRID, partial(_gland_score, items, maps, grown=_GrownGlands()), replace(PostprocessParams(), **best))
            best = {**best, **more}
        logger.info("tuned %s post-processing on %d images: %s (score %.4f; defaults %.4f)", task, len(items), best, best_score, base)
        chosen.update(best)
        scores[task] = {"best": float(best_score), "default": float(base)}
    from ..postprocess import params_of

    if setting and "Gland-INST" in model.config.heads and "Patch-Class" in model.config.heads:
        chosen.update(_tune_setting(model, setting, replace(params_of(model), **chosen), bf16, scores))
    lumen = [it for it in lumen if it.lumen is not None]
    if lumen and "Lumen-INST" in model.config.heads and "Gland-INST" in model.config.heads:
        base_params = replace(params_of(model), **{k: v for k, v in chosen.items() if k.startswith("gland_")})
        maps = []
        for it in lumen:
            probs = predict_image(model, it.image, heads=["Gland-INST", "Lumen-INST", *tissue_heads(model, base_params)], bf16=bf16)
            maps.append((probs["Lumen-INST"], gland_labels(probs["Gland-INST"], base_params, **gland_setting(model, probs))))
        best, best_score, base = choose_lumen_params(lumen, maps, base_params, lumen_grid)
        logger.info("tuned lumen post-processing on %d images: %s (Dice %.4f; before %.4f)", len(lumen), best, best_score, base)
        chosen.update(best)
        scores["lumen"] = {"best": float(best_score), "default": float(base)}
    return {"postprocess": chosen, "scores": scores, "n_images": {"nuclei": len(nuclei), "glands": len(glands), "gland_setting": len(setting), "lumen": len(lumen)}}


def setting_inputs(model: torch.nn.Module, items: Sequence[SegItem], base: PostprocessParams, *, bf16: bool | None = None,
                   ) -> tuple[list[np.ndarray], list[tuple[np.ndarray | None, float]]]:
    """What :func:`choose_setting_params` scores ``items`` on: their gland labels by ``base`` without
    ``gland_max_nonglandular``, and their (non-glandular tissue cells, cell px) by the model's tissue head."""
    from ..postprocess._gland_setting import non_glandular_cells

    glands, tissue = [], []
    for it in items:
        probs = predict_image(model, it.image, heads=["Gland-INST", "Patch-Class"], bf16=bf16)
        glands.append(gland_labels(probs["Gland-INST"], replace(base, gland_max_nonglandular=1.0)))
        kw = gland_setting(model, probs)
        tissue.append((non_glandular_cells(kw["tissue"], kw["tissue_classes"]), float(kw["cell_px"])))
    return glands, tissue


def _tune_setting(model: torch.nn.Module, items: Sequence[SegItem], base: PostprocessParams, bf16: bool | None, scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """``gland_max_nonglandular`` chosen on ``items`` over the gland settings ``base`` (scores noted in ``scores``)."""
    best, best_score, off = choose_setting_params(items, *setting_inputs(model, items, base, bf16=bf16))
    logger.info("tuned the gland setting on %d images: %s (score %.4f; off %.4f)", len(items), best, best_score, off)
    scores["gland_setting"] = {"best": float(best_score), "default": float(off)}
    return best

"""Refit the patch-classification heads on frozen encoder features (at export).

During training each classification step updates the encoder and the heads together on one
160 px crop per sample, with BatchNorm in training mode. At inference a head classifies the
window means of the encoder's deepest features, with the encoder's exported (eval-mode)
statistics, and a tile's class is the mean of its dense map. Here those exact inference features
are computed once per training tile (four dihedral views) and each head (a tiny pointwise MLP) is
trained further on them, the encoder untouched. Part of the training tiles is held out first:
the refit is kept only where it classifies the held-out tiles better than the head it replaces.

The tissue head (``Patch-Class``) can also learn from the GlaS training images
(``gland_cells``): their cells that lie mostly inside an annotated gland are samples of glandular
epithelium, "mucosa" in benign and "tumor" in malignant images (:data:`GLAND_CELL_CLASSES`), so
that the head places glands where post-processing looks for them
(:mod:`wsi_mtl.postprocess._gland_setting`).

Each head may also change what it pools (``HeadConfig.pool``): besides a refit on the window means
it keeps, a fresh head is fitted on the window means and standard deviations, and the candidate
that classifies the held-out tiles best is the one compared with the current head.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..network.config import PATCH_POOLS
from ..network.model import build_patch_head
from ._data import Sources
from ._evaluate import _pad_to, patch_feature_map

__all__ = ["GLAND_CELL_CLASSES", "HeadRefit", "gland_cells", "refit_patch_heads"]

#: Tissue-head class taught by the gland cells of a GlaS image of each grade (Patch-GlaS class name).
GLAND_CELL_CLASSES = {"benign": "mucosa", "malignant": "tumor"}
#: The head that learns from gland cells.
TISSUE_HEAD = "Patch-Class"
#: Reflected margin around a GlaS image when its patch maps are predicted (as evaluation does).
_GLAS_MARGIN_PX = 32

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadRefit:
    """What refitting one head did: held-out tile accuracy and mean NLL before and after, whether kept."""

    head: str
    n_tiles: int
    n_holdout: int
    accuracy_before: float
    accuracy_after: float
    nll_before: float
    nll_after: float
    kept: bool
    pool_before: str = "mean"
    #: pool of the best candidate (the head's pool now where ``kept``)
    pool_after: str = "mean"
    #: held-out accuracy of every candidate pool
    candidates: Mapping[str, float] | None = None
    #: of ``n_tiles``, GlaS images that taught their gland cells (``gland_share``)
    n_gland_images: int = 0

    def to_dict(self) -> dict[str, Any]:
        def r(v: Any) -> Any:
            return round(v, 4) if isinstance(v, float) else ({k: r(x) for k, x in v.items()} if isinstance(v, Mapping) else v)

        return {k: r(v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class _Sample:
    """One training image of a head: its class, the image, the margin it is predicted with and,
    for gland cells, the (h, w) cells of each view that carry the class (None: every cell)."""

    label: int
    image: np.ndarray
    margin: int
    cells: list[np.ndarray] | None = None


def _views(image: np.ndarray) -> list[np.ndarray]:
    return [image, np.rot90(image).copy(), image[::-1].copy(), image[:, ::-1].copy()]


def gland_cells(glands: np.ndarray, cell_px: int, min_share: float) -> np.ndarray:
    """(h, w) bool: the ``cell_px`` cells of an image (cell (0, 0) at its corner, partial cells at
    the far edges) of which at least ``min_share`` of the pixels are gland (``glands`` > 0)."""
    h, w = glands.shape
    hc, wc = -(-h // cell_px), -(-w // cell_px)
    inside = np.zeros((hc * cell_px, wc * cell_px), np.int32)
    inside[:h, :w] = 1 + (glands > 0)  # 0 beyond the image, 1 outside glands, 2 in one
    blocks = inside.reshape(hc, cell_px, wc, cell_px)
    area = (blocks > 0).sum(axis=(1, 3))
    return (blocks == 2).sum(axis=(1, 3)) >= min_share * area


def _gland_cell_samples(model: torch.nn.Module, data: Sources, min_share: float) -> list[_Sample]:
    """The tissue head's samples from GlaS training images: their gland cells, classed by grade."""
    heads = model.config.heads
    if TISSUE_HEAD not in heads or "Patch-GlaS" not in heads:
        return []
    tissue, grades = list(heads[TISSUE_HEAD].class_names), list(heads["Patch-GlaS"].class_names)
    ps = int(model.config.patch_stride_px)
    out = []
    for it in data.seg.get("gland", []):
        grade = it.patch.get("Patch-GlaS", -1)
        name = GLAND_CELL_CLASSES.get(grades[grade]) if 0 <= grade < len(grades) else None
        if name not in tissue or not np.any(it.labels):
            continue
        cells = [gland_cells(v, ps, min_share) for v in _views(it.labels)]
        if cells[0].any():
            out.append(_Sample(tissue.index(name), it.image, _GLAS_MARGIN_PX, cells))
    return out


def _samples(model: torch.nn.Module, data: Sources, gland_share: float = 0.0) -> dict[str, list[_Sample]]:
    """Head -> every labelled training tile (patch labels of gland images too) and, with
    ``gland_share`` > 0, the tissue head's gland cells (:func:`gland_cells`)."""
    stride = int(model.config.stride)
    out: dict[str, list[_Sample]] = {}
    for items in data.cls.values():
        for it in items:
            out.setdefault(it.head, []).append(_Sample(int(it.label), _pad_to(it, stride), 0))
    for it in data.seg.get("gland", []):
        for head, label in it.patch.items():
            if label >= 0:
                out.setdefault(head, []).append(_Sample(int(label), it.image, _GLAS_MARGIN_PX))
    if gland_share > 0:
        extra = _gland_cell_samples(model, data, gland_share)
        if extra:
            out.setdefault(TISSUE_HEAD, []).extend(extra)
    return {h: v for h, v in out.items() if h in model.config.heads}


def _cell_mean(p: torch.Tensor, cells: np.ndarray | None) -> torch.Tensor:
    """(C,) mean of a (1, C, h, w) map over ``cells`` (every cell where None)."""
    if cells is None:
        return p.mean(dim=(0, 2, 3))
    assert tuple(cells.shape) == tuple(p.shape[2:]), (cells.shape, p.shape)
    return p[0][:, torch.from_numpy(cells)].mean(dim=1)


def _tile_scores(head: torch.nn.Module, feats: Sequence[Sequence[torch.Tensor]], samples: Sequence[_Sample]) -> tuple[float, float]:
    """Accuracy and mean NLL of tiles classified as in evaluation (mean softmax of the first view's
    dense map; of a gland-cell sample, over its gland cells)."""
    head.eval()
    correct, nll = 0, 0.0
    with torch.no_grad():
        for f, s in zip(feats, samples):
            p = _cell_mean(torch.softmax(head(f[0]), dim=1), None if s.cells is None else s.cells[0])
            correct += int(int(torch.argmax(p)) == s.label)
            nll += -float(torch.log(p[s.label].clamp_min(1e-8)))
    n = max(1, len(feats))
    return correct / n, nll / n


def _vectors(feats: Sequence[Sequence[torch.Tensor]], samples: Sequence[_Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for views, s in zip(feats, samples):
        for k, f in enumerate(views):
            v = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])  # every cell of every view
            if s.cells is not None:
                v = v[torch.from_numpy(s.cells[k].reshape(-1))]
            xs.append(v)
            ys.append(torch.full((v.shape[0],), s.label, dtype=torch.long))
    return torch.cat(xs), torch.cat(ys)


def _fit(head: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, num_classes: int, epochs: int, lr: float, batch: int, seed: int) -> None:
    """Train ``head`` on cell vectors, class-balanced; then BatchNorm statistics as the plain mean over them (no dropout)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout draws from the global generator
    counts = torch.bincount(y, minlength=num_classes).float().clamp_min(1)
    weight = (counts.sum() / (counts.numel() * counts))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * max(1, -(-x.shape[0] // batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    head.train()
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], batch):
            idx = order[i : i + batch]
            if idx.numel() < 2:
                continue
            logits = head(x[idx, :, None, None]).flatten(1)
            loss = F.cross_entropy(logits, y[idx], weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    bns = [m for m in head.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    head.train()
    for m in head.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    with torch.no_grad():
        for i in range(0, x.shape[0], 4096):
            head(x[i : i + 4096, :, None, None])
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    head.eval()


def refit_patch_heads(
    model: torch.nn.Module,
    data: Sources,
    *,
    epochs: int = 20,
    lr: float = 2e-3,
    batch: int = 512,
    holdout: float = 0.2,
    seed: int = 0,
    bf16: bool | None = None,
    heads: Sequence[str] | None = None,
    pools: Sequence[str] = PATCH_POOLS,
    gland_share: float = 0.0,
) -> dict[str, HeadRefit]:
    """Refit each patch head of ``model`` on its training tiles' frozen inference features.

    Parameters
    ----------
    model
        A :class:`~wsi_mtl.network.MultiTaskNet` with its final encoder statistics (eval mode is set).
    data
        Training sources (never the validation split): ``cls`` tiles and the patch labels of ``seg["gland"]``.
    epochs, lr, batch
        Head training on the cell vectors of four dihedral views of each tile (AdamW, one-cycle).
    holdout
        Fraction of each head's tiles (stratified by class, drawn with ``seed``) held out to decide
        whether the refit replaces the head; the kept refit is then trained again on all tiles.
    heads
        Patch heads to refit (default: every patch head with labelled tiles).
    pools
        Window statistics to try (:data:`~wsi_mtl.network.config.PATCH_POOLS`). The head's own
        pool is refit from its weights, another pool from a fresh head; the best on the held-out
        tiles competes with the current head, and a kept head changes ``model.config`` to its pool.

    Returns
    -------
    dict
        Head name -> :class:`HeadRefit`. The model is changed in place only where ``kept``.
    """
    model.eval()
    rng = np.random.default_rng(seed)
    report: dict[str, HeadRefit] = {}
    width = int(model.config.arch_params.encoder_widths[4])
    for name, samples in _samples(model, data, gland_share).items():
        if heads is not None and name not in heads:
            continue
        spec = model.config.heads[name]
        # per tile, one (1, 2C, h, w) map of window means and standard deviations per view (views
        # of a non-square image differ in shape); the means are its first C channels
        stats = [[torch.from_numpy(patch_feature_map(model, v, margin_px=s.margin, bf16=bf16, pool="mean_std"))[None] for v in _views(s.image)] for s in samples]

        def feats(pool: str) -> list[list[torch.Tensor]]:
            return stats if pool == "mean_std" else [[f[:, :width] for f in views] for views in stats]

        hold = np.zeros(len(samples), bool)
        strata = np.array([s.label + (0 if s.cells is None else 10_000) for s in samples])  # gland-cell images apart from tiles
        for c in np.unique(strata):
            idx = np.flatnonzero(strata == c)
            k = int(round(holdout * idx.size))
            if idx.size > 1 and k:
                hold[rng.choice(idx, size=min(k, idx.size - 1), replace=False)] = True
        module = model.decoder_head[spec.decoder]
        fit = {"num_classes": int(spec.num_classes), "epochs": epochs, "lr": lr, "batch": batch, "seed": seed}

        def start(pool: str) -> torch.nn.Module:
            if pool == spec.pool:
                return copy.deepcopy(module)
            torch.manual_seed(seed)
            return build_patch_head(model.config.arch_params, replace(spec, pool=pool))

        def split(fs: list, held: bool) -> list:
            return [f for f, h in zip(fs, hold) if h == held]

        before = _tile_scores(module, split(feats(spec.pool), True), split(samples, True))
        tried: dict[str, tuple[float, float]] = {}
        for pool in dict.fromkeys([spec.pool, *pools]):
            trial = start(pool)
            _fit(trial, *_vectors(split(feats(pool), False), split(samples, False)), **fit)
            tried[pool] = _tile_scores(trial, split(feats(pool), True), split(samples, True))
        best = max(tried, key=lambda k: (tried[k][0], -tried[k][1]))  # accuracy, then lower NLL; ties keep the earlier (own pool first)
        after = tried[best]
        kept = bool(hold.any()) and (after[0] > before[0] or (after[0] == before[0] and after[1] < before[1]))
        if kept:
            final = start(best)
            _fit(final, *_vectors(feats(best), samples), **fit)
            final.eval()
            if best == spec.pool:
                module.load_state_dict(final.state_dict())
            else:
                model.decoder_head[spec.decoder] = final
                model.config = model.config.replace(heads={**model.config.heads, name: replace(spec, pool=best)})
        model.decoder_head[spec.decoder].eval()
        report[name] = HeadRefit(name, len(samples), int(hold.sum()), before[0], after[0], before[1], after[1], kept,
                                 pool_before=spec.pool, pool_after=best, candidates={k: v[0] for k, v in tried.items()},
                                 n_gland_images=sum(s.cells is not None for s in samples))
        logger.info("patch head %s: held-out accuracy %.3f -> %.3f (nll %.3f -> %.3f; pool %s -> %s; candidates %s) on %d of %d tiles; %s",
                    name, before[0], after[0], before[1], after[1], spec.pool, best,
                    {k: round(v[0], 3) for k, v in tried.items()}, int(hold.sum()), len(samples), "kept" if kept else "not kept")
    return report


def refit_summary(report: Mapping[str, HeadRefit]) -> dict[str, dict[str, Any]]:
    """JSON-ready form of :func:`refit_patch_heads`' report (for ``config.json``)."""
    return {k: v.to_dict() for k, v in report.items()}

"""Masked losses: cross-entropy and soft Dice that skip unlabelled pixels and samples."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._targets import FOREGROUND, IGNORE

__all__ = ["masked_cross_entropy", "masked_dice_loss", "seg_loss", "patch_loss"]


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, foreground_classes: tuple[int, ...] = (1, 2)) -> torch.Tensor:
    """Mean cross-entropy over labelled pixels; 0 (with a gradient path) when none is labelled.

    Parameters
    ----------
    logits : (N, C, H, W) float tensor
    target : (N, H, W) uint8/int tensor
        Class index, :data:`IGNORE` (skipped) or :data:`FOREGROUND` (any of ``foreground_classes``:
        the loss is ``-log sum_{c in fg} p_c``).
    """
    logits = logits.float()
    target = target.long()
    lse = torch.logsumexp(logits, dim=1)
    exact = target < logits.shape[1]
    fg = target == FOREGROUND
    picked = torch.gather(logits, 1, torch.where(exact, target, 0).unsqueeze(1)).squeeze(1)
    loss = torch.zeros_like(lse)
    loss = torch.where(exact, lse - picked, loss)
    if fg.any():
        fg_lse = torch.logsumexp(logits[:, list(foreground_classes)], dim=1)
        loss = torch.where(fg, lse - fg_lse, loss)
    valid = exact | fg
    n = valid.sum()
    if n == 0:
        return logits.sum() * 0.0
    return (loss * valid).sum() / n


def masked_dice_loss(logits: torch.Tensor, target: torch.Tensor, *, foreground_classes: tuple[int, ...] = (1, 2), eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss, 1 - mean Dice over classes, on labelled pixels only.

    Exactly labelled pixels contribute to a per-class Dice; :data:`FOREGROUND` pixels join exactly
    labelled ones in a foreground-vs-background Dice on ``sum_{c in fg} p_c``, added as one more term
    when any are present. Classes absent from both target and prediction score 1 via ``eps``.
    Returns 0 when no pixel is labelled.
    """
    logits = logits.float()
    target = target.long()
    c = logits.shape[1]
    prob = torch.softmax(logits, dim=1)
    exact = target < c
    terms = []
    if exact.any():
        onehot = F.one_hot(torch.where(exact, target, 0), c).permute(0, 3, 1, 2).float()
        m = exact.unsqueeze(1).float()
        inter = (prob * onehot * m).sum(dim=(0, 2, 3))
        denom = ((prob + onehot) * m).sum(dim=(0, 2, 3))
        terms.append((2 * inter + eps) / (denom + eps))
    fg = target == FOREGROUND
    if fg.any():
        valid = (exact | fg).float()
        p_fg = prob[:, list(foreground_classes)].sum(dim=1)
        t_fg = (fg | (exact & (target > 0))).float()
        inter = (p_fg * t_fg * valid).sum()
        denom = ((p_fg + t_fg) * valid).sum()
        terms.append(((2 * inter + eps) / (denom + eps)).reshape(1))
    if not terms:
        return logits.sum() * 0.0
    return 1.0 - torch.cat(terms).mean()


def seg_loss(logits: torch.Tensor, target: torch.Tensor, *, dice_weight: float = 1.0) -> torch.Tensor:
    """Cross-entropy + ``dice_weight`` x Dice over the samples whose target has any labelled pixel."""
    has = (target != IGNORE).flatten(1).any(dim=1)
    if not bool(has.any()):
        return logits.float().sum() * 0.0
    logits, target = logits[has], target[has]
    return masked_cross_entropy(logits, target) + dice_weight * masked_dice_loss(logits, target)


def patch_loss(logits: torch.Tensor, labels: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of N x C x 1 x 1 patch logits against labels (-1 = no label, skipped)."""
    logits = logits.float().flatten(1)
    labels = labels.long()
    has = labels >= 0
    if not bool(has.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[has], labels[has], label_smoothing=label_smoothing)

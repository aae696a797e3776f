"""Test-time augmentation: average a model's softmax maps over dihedral views of its input.

A view is a horizontal flip and/or a rotation by a multiple of 90 degrees. Every map the model
returns (full-resolution segmentation maps and the coarser dense patch maps alike) is mapped back
by the inverse transform and the probabilities are averaged, so the result has exactly the
layout of ``model.predict(x)``. The views are taken in the order below: 2 = identity and the
left-right mirror, 4 adds the up-down mirror and the half turn (none of which swap height and
width), 8 is the whole dihedral group.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Any

import torch

__all__ = ["TTA_VIEWS", "dihedral_views", "apply_view", "undo_view", "predict_tta"]

#: The numbers of views ``predict_tta`` accepts.
TTA_VIEWS = (1, 2, 4, 8)

# (quarter turns, mirror first): identity, mirror, up-down mirror, half turn, then the four that
# swap height and width.
_VIEWS: tuple[tuple[int, bool], ...] = ((0, False), (0, True), (2, True), (2, False), (1, False), (3, False), (1, True), (3, True))


def dihedral_views(views: int) -> tuple[tuple[int, bool], ...]:
    """The first ``views`` (quarter turns, mirror) pairs; ``views`` must be one of ``TTA_VIEWS``."""
    if views not in TTA_VIEWS:
        raise ValueError(f"test-time augmentation takes {', '.join(map(str, TTA_VIEWS))} views, not {views}")
    return _VIEWS[:views]


def apply_view(x: torch.Tensor, view: tuple[int, bool]) -> torch.Tensor:
    """Mirror the last axis (if asked), then rotate the last two axes by ``view[0]`` quarter turns."""
    turns, mirror = view
    if mirror:
        x = x.flip(-1)
    return torch.rot90(x, turns, dims=(-2, -1)) if turns % 4 else x


def undo_view(x: torch.Tensor, view: tuple[int, bool]) -> torch.Tensor:
    """The inverse of :func:`apply_view`."""
    turns, mirror = view
    if turns % 4:
        x = torch.rot90(x, -turns, dims=(-2, -1))
    return x.flip(-1) if mirror else x


def predict_tta(model: Any, x: torch.Tensor, *, views: int = 1, heads: Sequence[str] | None = None,
                margin: int = 0, helper: Executor | None = None, quantized: bool = False) -> dict[str, torch.Tensor]:
    """``model.predict(x)`` averaged over ``views`` dihedral views of ``x`` (N x 3 x H x W); with
    ``margin``, ``model.predict(x, margin=margin)`` (segmentation maps without that border: a
    border of the same width on every side, so each view's crop is the crop of the view).

    ``views=1`` is exactly ``model.predict``. The other views cost one forward pass each.
    ``helper`` is passed on to ``model.predict`` (its second thread, the same maps), and so is
    ``quantized`` (uint8 segmentation maps) with one view; more views are averaged as float32.
    The mirrored and rotated maps are averaged in float32. A dense patch map is mapped back on
    its own grid, which works when H and W are whole multiples of the patch stride (the engine's
    tiles and the padded evaluation images are).
    """
    chosen = dihedral_views(views)
    kw: dict[str, Any] = {} if heads is None else {"heads": heads}
    if margin:
        kw["margin"] = margin
    if helper is not None:
        kw["helper"] = helper
    if views == 1 and quantized:
        kw["quantized"] = True
    if views == 1:
        return model.predict(x, **kw)
    total: dict[str, torch.Tensor] = {}
    for view in chosen:
        xv = apply_view(x, view)
        if view[0] % 2 or view[1]:
            xv = xv.contiguous(memory_format=torch.channels_last)
        for name, p in model.predict(xv, **kw).items():
            back = undo_view(p, view)
            if name in total:
                total[name].add_(back)
            else:
                total[name] = back.float().contiguous()
    for p in total.values():
        p.div_(len(chosen))
    return total

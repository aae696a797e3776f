"""Tile geometry for streaming inference: pure functions, no I/O.

The output arrays live at the model's resolution. They are cut into square *cores* of ``core_px``
(which are also the zarr chunks, so every tile writes whole chunks and nothing is ever read back);
each core is computed from an input tile that adds ``margin_px`` of context on every side. Cores
never overlap, so nothing is computed twice and no blending is needed: the margin alone makes a
tiled result equal to one pass over the whole region (see ``tests/test_engine.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

__all__ = ["Tile", "TileGrid", "plan_tiles", "kept_fraction"]


@dataclass(frozen=True, slots=True)
class Tile:
    """One output core and the input region that computes it, in model-resolution pixels.

    ``y0, x0`` is the top-left of the core; ``height, width`` its size (smaller than the grid's
    ``core_px`` only on the last row or column). The input region starts ``margin_px`` before the
    core and always has the full input size ``core_px + 2 * margin_px``.
    """

    row: int
    col: int
    y0: int
    x0: int
    height: int
    width: int

    @property
    def key(self) -> tuple[int, int]:
        """(row, col): the tile's identity in the resume log."""
        return (self.row, self.col)


@dataclass(frozen=True, slots=True)
class TileGrid:
    """A grid of non-overlapping cores covering a ``height x width`` array at model resolution."""

    height: int
    width: int
    core_px: int
    margin_px: int

    @property
    def rows(self) -> int:
        return math.ceil(self.height / self.core_px)

    @property
    def cols(self) -> int:
        return math.ceil(self.width / self.core_px)

    @property
    def input_px(self) -> int:
        """Side of every input tile sent to the network."""
        return self.core_px + 2 * self.margin_px

    def tile(self, row: int, col: int) -> Tile:
        """The tile at grid position (row, col)."""
        if not (0 <= row < self.rows and 0 <= col < self.cols):
            raise IndexError(f"tile ({row}, {col}) outside a {self.rows} x {self.cols} grid")
        y0, x0 = row * self.core_px, col * self.core_px
        return Tile(row, col, y0, x0, min(self.core_px, self.height - y0), min(self.core_px, self.width - x0))

    def tiles(self, *, keep: Callable[[Tile], bool] | None = None) -> Iterator[Tile]:
        """All tiles in row-major order, optionally only those for which ``keep(tile)`` is true."""
        for row in range(self.rows):
            for col in range(self.cols):
                tile = self.tile(row, col)
                if keep is None or keep(tile):
                    yield tile


def plan_tiles(height: int, width: int, *, core_px: int, margin_px: int, stride: int = 1) -> TileGrid:
    """Plan the tile grid for an output array of ``height x width`` model pixels.

    Parameters
    ----------
    height, width : int
        Size of the output arrays at the model's resolution.
    core_px : int
        Side of each output core (and zarr chunk); a multiple of ``stride``.
    margin_px : int
        Context added on every side of a core; a multiple of ``stride``.
    stride : int
        The network's input multiple (its total downsampling), so tiles align with its grid.

    Examples
    --------
    >>> grid = plan_tiles(1000, 2100, core_px=1024, margin_px=128, stride=32)
    >>> grid.rows, grid.cols, grid.input_px
    (1, 3, 1280)
    >>> grid.tile(0, 2)
    Tile(row=0, col=2, y0=0, x0=2048, height=1000, width=52)
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"cannot tile an empty array of {height} x {width} px")
    if core_px <= 0 or core_px % stride:
        raise ValueError(f"core_px={core_px} must be a positive multiple of the network stride {stride}")
    if margin_px < 0 or margin_px % stride:
        raise ValueError(f"margin_px={margin_px} must be a non-negative multiple of the network stride {stride}")
    return TileGrid(height, width, core_px, margin_px)


def kept_fraction(grid: TileGrid, tiles: list[Tile] | None = None) -> float:
    """Output pixels kept per input pixel computed, over ``tiles`` (default: the whole grid).

    The Cerberus reference scheme (448 px in, 144 px kept) scores (144 / 448)^2 = 0.103.
    """
    tiles = list(grid.tiles()) if tiles is None else tiles
    if not tiles:
        return 0.0
    kept = sum(t.height * t.width for t in tiles)
    return kept / (len(tiles) * grid.input_px**2)

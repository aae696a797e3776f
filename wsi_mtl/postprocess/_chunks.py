"""Chunk geometry for post-processing: pure functions, no I/O.

A chunk *owns* a half-open region ``[y0, y1) x [x0, x1)`` of the map and *reads* that region
grown by a halo on each side (clipped to the map). An object belongs to the one chunk whose own
region contains its bounding-box start (top-left corner, a point that does not depend on which
chunk traced the object), so no object is lost or duplicated at a border.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Chunk", "plan_chunks", "owns"]


@dataclass(frozen=True)
class Chunk:
    """One post-processing chunk, in pixels of the map it was planned on.

    Attributes
    ----------
    row, col : int
        Position in the chunk grid.
    own : (y0, y1, x0, x1)
        Owned region (half-open).
    read : (y0, y1, x0, x1)
        Region read: ``own`` grown by ``halos`` and clipped to ``shape``.
    shape : (H, W)
        Size of the whole map.
    halos : (top, bottom, left, right)
        Halo on each side used to derive ``read``.
    """

    row: int
    col: int
    own: tuple[int, int, int, int]
    read: tuple[int, int, int, int]
    shape: tuple[int, int]
    halos: tuple[int, int, int, int]

    @property
    def halo_px(self) -> int:
        """The largest of the four sides' halos."""
        return max(self.halos)

    def with_halo(self, halo_px: int) -> Chunk:
        """The same owned region read with ``halo_px`` on every side."""
        return _make(self.row, self.col, self.own, self.shape, (int(halo_px),) * 4)

    def grown(self, edges: tuple[bool, bool, bool, bool], most: int) -> Chunk:
        """The same owned region read with twice the halo (at most ``most``) on the sides ``edges``
        names (top, bottom, left, right), the others as they are.

        Examples
        --------
        >>> plan_chunks((64, 64), chunk_px=16, halo_px=4)[5].grown((False, True, False, False), 6).read
        (12, 38, 12, 36)
        """
        halos = tuple(min(2 * h, int(most)) if e else h for h, e in zip(self.halos, edges))
        return _make(self.row, self.col, self.own, self.shape, halos)  # type: ignore[arg-type]

    def growable(self, most: int) -> tuple[bool, bool, bool, bool]:
        """Which sides (top, bottom, left, right) lie inside the map with a halo below ``most``."""
        return tuple(o and h < most for o, h in zip(self.open_edges, self.halos))  # type: ignore[return-value]

    @property
    def open_edges(self) -> tuple[bool, bool, bool, bool]:
        """Whether the read region's top, bottom, left, right edges lie inside the map.

        An object touching such an edge may continue outside what was read.
        """
        ry0, ry1, rx0, rx1 = self.read
        h, w = self.shape
        return (ry0 > 0, ry1 < h, rx0 > 0, rx1 < w)


def _make(row: int, col: int, own: tuple[int, int, int, int], shape: tuple[int, int],
          halos: tuple[int, int, int, int]) -> Chunk:
    y0, y1, x0, x1 = own
    h, w = shape
    top, bottom, left, right = halos
    read = (max(0, y0 - top), min(h, y1 + bottom), max(0, x0 - left), min(w, x1 + right))
    return Chunk(row, col, own, read, (h, w), halos)


def plan_chunks(shape: tuple[int, int], *, chunk_px: int, halo_px: int, align_px: int = 1) -> list[Chunk]:
    """Tile a map into owned chunks with read halos.

    Parameters
    ----------
    shape : (int, int)
        Map size (H, W) in pixels.
    chunk_px : int
        Side of an owned region (the last row/column of chunks is cut by the map edge).
    halo_px : int
        Extra pixels read on each side; must be >= 1.
    align_px : int
        ``chunk_px`` must be a multiple of this (e.g. the zarr chunk or a downsampling factor).

    Returns
    -------
    list of Chunk
        Row-major; the owned regions partition the map exactly.

    Examples
    --------
    >>> [c.own for c in plan_chunks((5, 7), chunk_px=4, halo_px=1)]
    [(0, 4, 0, 4), (0, 4, 4, 7), (4, 5, 0, 4), (4, 5, 4, 7)]
    >>> plan_chunks((5, 7), chunk_px=4, halo_px=1)[1].read
    (0, 5, 3, 7)
    """
    h, w = (int(v) for v in shape)
    if h < 0 or w < 0:
        raise ValueError(f"shape must be non-negative; got {tuple(shape)}")
    if chunk_px < 1:
        raise ValueError(f"chunk_px must be >= 1; got {chunk_px}")
    if halo_px < 1:
        raise ValueError(f"halo_px must be >= 1; got {halo_px}")
    if align_px < 1 or chunk_px % align_px:
        raise ValueError(f"chunk_px ({chunk_px}) must be a positive multiple of {align_px}")
    chunks = []
    for r, y0 in enumerate(range(0, h, chunk_px)):
        for c, x0 in enumerate(range(0, w, chunk_px)):
            own = (y0, min(h, y0 + chunk_px), x0, min(w, x0 + chunk_px))
            chunks.append(_make(r, c, own, (h, w), (int(halo_px),) * 4))
    return chunks


def owns(chunk: Chunk, y: int, x: int) -> bool:
    """Whether ``chunk`` owns the map pixel ``(y, x)`` (half-open intervals).

    Examples
    --------
    >>> c = plan_chunks((8, 8), chunk_px=4, halo_px=2)[0]
    >>> owns(c, 3, 3), owns(c, 4, 0)
    (True, False)
    """
    y0, y1, x0, x1 = chunk.own
    return y0 <= y < y1 and x0 <= x < x1

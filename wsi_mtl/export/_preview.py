"""A preview picture: side-by-side panels of the slide and its objects, legible at a glance.

Four panels of the same size: the slide; the tissue map (class fills on a pale grey copy of the
slide); glands and lumen (fills and outlines on the grey copy); nuclei density by type (each cell
of a grid coloured by its most frequent nuclear type, more opaque where nuclei are denser). Each
panel has a title; a legend lists each (task, class) with its colour and count, and a scale bar on
the slide panel gives the size. The objects are streamed from the table: only their task, class
and geometry are read.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from PIL import Image, ImageDraw, ImageFont

from ..atomic import atomic_path
from ..objects import TASKS
from ._arrow import numpy_of, taken
from ._table import iter_table, read_table_info

__all__ = ["write_preview"]

log = logging.getLogger(__name__)

_TASK_TITLES = {"nuclei": "Nuclei", "gland": "Glands", "lumen": "Lumen", "tissue": "Tissue"}
_TISSUE_ALPHA = 170
_GLAND_ALPHA = 110
_LUMEN_ALPHA = 200
#: the grey copy of the slide keeps this fraction of its contrast
_GREY_CONTRAST = 0.45
#: about this many nuclei density cells across the shorter side of a panel
_DENSITY_CELLS = 60
_FALLBACK = (128, 128, 128)


def _validate_thumbnail(thumbnail_rgb: np.ndarray) -> np.ndarray:
    """Return the thumbnail as a (H, W, 3) uint8 array, or raise ValueError."""
    image = np.asarray(thumbnail_rgb)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"thumbnail_rgb must be an (H, W, 3) RGB array, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"thumbnail_rgb must be uint8, got {image.dtype}")
    return np.ascontiguousarray(image[..., :3])


def _rings(geoms: np.ndarray, downsample: float) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray], list[int]]:
    """Exterior and interior rings in thumbnail pixel coordinates, each with its owner.

    Returns ``(exteriors, exterior_owner, holes, hole_owner)``; an owner is the index in
    ``geoms`` of the object a ring belongs to.
    """
    parts, owner = shapely.get_parts(geoms, return_index=True)
    exteriors = shapely.get_exterior_ring(parts)
    coords, index = shapely.get_coordinates(exteriors, return_index=True)
    # level-0 continuous (x, y) -> thumbnail continuous; PIL puts integer coordinates at pixel centres
    coords = coords / downsample - 0.5
    splits = np.flatnonzero(np.diff(index)) + 1
    ext = np.split(coords, splits) if len(coords) else []
    holes: list[np.ndarray] = []
    hole_owner: list[int] = []
    n_holes = shapely.get_num_interior_rings(parts)
    for k in np.flatnonzero(n_holes > 0).tolist():
        for ring in parts[k].interiors:
            holes.append(np.asarray(ring.coords) / downsample - 0.5)
            hole_owner.append(int(owner[k]))
    return ext, owner, holes, hole_owner


def _flat(ring: np.ndarray) -> list[float]:
    """A ring as the flat [x0, y0, x1, y1, ...] list ImageDraw wants."""
    return ring.ravel().tolist()


def _nice_length_um(target_um: float) -> float:
    """The largest 1, 2 or 5 x 10^k micrometres not above ``target_um``."""
    exponent = math.floor(math.log10(target_um))
    for mantissa in (5, 2, 1):
        value = mantissa * 10.0**exponent
        if value <= target_um:
            return value
    return 10.0**exponent  # pragma: no cover


def write_preview(
    thumbnail_rgb: np.ndarray,
    table_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    downsample: float,
    colors: dict[tuple[str, str], tuple[int, int, int]] | None = None,
    legend: bool = True,
    batch_rows: int = 65_536,
    scale: float = 0.5,
    tissue_mask: tuple[np.ndarray, float] | None = None,
) -> dict[str, dict[str, int]]:
    """Draw the objects of a table as panels beside a slide thumbnail and save a PNG, atomically.

    Parameters
    ----------
    thumbnail_rgb : (H, W, 3) uint8 ndarray
        The slide at ``downsample`` level-0 px per thumbnail px; array (0, 0) is level-0 (0, 0).
    table_path : path-like
        ``objects.parquet`` written by :func:`~wsi_mtl.export.write_table`.
    out_path : path-like
        The ``.png`` to write.
    downsample : float
        Level-0 px per thumbnail px.
    colors : dict, optional
        ``{(task, class_name): (r, g, b)}`` overriding the colours recorded in the table.
    legend : bool, default True
        Add a legend panel (class colours and counts) to the right of the panels.
    batch_rows : int, default 65536
        Rows read from the table at a time.
    scale : float, default 0.5
        Size of each panel relative to the thumbnail (four panels in a grid).
    tissue_mask : (mask, downsample), optional
        The slide's tissue mask (boolean (y, x), level-0 px per mask px): tissue classes are
        drawn only inside it, so glass is never tinted by a class.

    Returns
    -------
    dict
        ``{task: {class_name: count}}`` of the objects drawn.

    Raises
    ------
    ValueError
        A thumbnail that is not (H, W, 3) uint8, or ``downsample`` or ``scale`` out of range.
    InputError
        The table does not exist or cannot be read.
    OutputError
        The disk is full or the folder is not writable.
    """
    image = _validate_thumbnail(thumbnail_rgb)
    if not (np.isfinite(downsample) and downsample > 0):
        raise ValueError(f"downsample must be a positive number of level-0 px per thumbnail px, got {downsample!r}")
    if not (np.isfinite(scale) and 0 < scale <= 1):
        raise ValueError(f"scale must be in (0, 1], got {scale!r}")
    info = read_table_info(table_path)
    palette: dict[tuple[str, str], tuple[int, int, int]] = dict(info["colors"])
    palette.update(colors or {})
    slide = _resize(image, scale)
    panel_ds = downsample * image.shape[1] / slide.shape[1]
    layers = _Layers(slide.shape[:2], panel_ds, _nuclear_types(info["counts"], palette))
    counts: Counter[tuple[str, str]] = Counter()
    for record in iter_table(table_path, columns=["task", "class_name", "centroid_x_px", "centroid_y_px", "geometry"],
                             batch_rows=batch_rows):
        tasks = record.column("task").to_pylist()
        classes = record.column("class_name").to_pylist()
        counts.update(zip(tasks, classes))
        layers.add(np.asarray(tasks, dtype=object), classes, record, palette)

    grey = Image.fromarray(_pale_grey(slide), "RGB")
    panels = [
        ("Slide", Image.fromarray(slide, "RGB")),
        ("Tissue map", layers.tissue_panel(grey, palette, _panel_mask(tissue_mask, slide.shape[:2], panel_ds))),
        ("Glands and lumen", layers.structure_panel(grey)),
        ("Nuclei density by type", layers.nuclei_panel(grey, palette)),
    ]
    mpp = info.get("mpp")
    if mpp:
        _draw_scale_bar(panels[0][1], um_per_px=float(mpp) * panel_ds)
    picture = _grid(panels)
    counts_out = _ordered(counts, palette, info["counts"])
    if legend:
        picture = _add_legend(picture, counts_out, palette)
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        picture.save(tmp, format="PNG", compress_level=1)  # level 6 is ~5x slower for ~15% smaller
    log.info("wrote preview %s (%dx%d)", out_path, picture.width, picture.height)
    return counts_out


def _resize(image: np.ndarray, scale: float) -> np.ndarray:
    """``image`` scaled by ``scale`` (box filter), at least 1 px each way."""
    if scale == 1:
        return image
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image, "RGB").resize(size, Image.BOX))


def _pale_grey(image: np.ndarray) -> np.ndarray:
    """The slide as pale grey: structure stays visible, colours on top stay unambiguous."""
    lum = image[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    pale = 255.0 - (255.0 - lum) * _GREY_CONTRAST
    return np.repeat(pale.round().astype(np.uint8)[..., None], 3, axis=2)


def _nuclear_types(table_counts: dict[str, dict[str, int]], palette: dict[tuple[str, str], tuple[int, int, int]]) -> list[str]:
    """Nuclear classes in legend order (table order, then classes known only by colour)."""
    names = list(table_counts.get("nuclei", {}))
    return names + [c for (t, c) in palette if t == "nuclei" and c not in names]


class _Layers:
    """What the panels draw, accumulated over the table's batches."""

    def __init__(self, shape: tuple[int, int], downsample: float, nuclear_types: list[str]) -> None:
        self.size = (shape[1], shape[0])
        self.downsample = downsample
        self.line = max(1, round(max(shape) / 900))
        self.tissue_masks: dict[tuple[str, str], Image.Image] = {}
        self.gland = Image.new("RGBA", self.size, (0, 0, 0, 0))
        self.lumen = Image.new("RGBA", self.size, (0, 0, 0, 0))
        self.outlines = Image.new("RGBA", self.size, (0, 0, 0, 0))
        self.types = list(nuclear_types)
        self.cell = max(4, round(min(shape) / _DENSITY_CELLS))
        self.grid = (-(-shape[0] // self.cell), -(-shape[1] // self.cell))
        self.density = np.zeros((len(self.types), *self.grid), dtype=np.int64)

    def add(self, tasks: np.ndarray, classes: list[str], record: Any, palette: dict[tuple[str, str], tuple[int, int, int]]) -> None:
        """Draw (or count) one batch of objects (``record``: their table rows; nuclei are counted
        at their centroid columns, the other tasks' outlines decoded and drawn)."""
        for task in TASKS:
            sel = np.flatnonzero(tasks == task)
            if len(sel) == 0:
                continue
            names = [classes[i] for i in sel]
            if task == "nuclei":
                xy = np.stack([numpy_of(record.column(f"centroid_{a}_px"))[sel] for a in "xy"], axis=1)
                self._count_nuclei(xy, names)
            else:
                wkb = numpy_of(taken(record.column("geometry"), sel))
                self._draw_regions(task, shapely.from_wkb(wkb), names, palette)

    def _count_nuclei(self, centroids: np.ndarray, names: list[str]) -> None:
        """Count nuclei per density cell by type (``centroids``: level-0 px, x then y)."""
        for name in dict.fromkeys(names):
            if name not in self.types:
                self.types.append(name)
                self.density = np.concatenate([self.density, np.zeros((1, *self.grid), dtype=np.int64)])
        xy = np.asarray(centroids, dtype=np.float64) / (self.downsample * self.cell)
        gy = np.clip(xy[:, 1].astype(np.int64), 0, self.grid[0] - 1)
        gx = np.clip(xy[:, 0].astype(np.int64), 0, self.grid[1] - 1)
        k = np.array([self.types.index(n) for n in names], dtype=np.int64)
        np.add.at(self.density, (k, gy, gx), 1)

    def _draw_regions(self, task: str, geoms: np.ndarray, names: list[str], palette: dict[tuple[str, str], tuple[int, int, int]]) -> None:
        ext, owner, holes, hole_owner = _rings(geoms, self.downsample)
        for ring, k in zip(ext, owner.tolist()):
            if len(ring) >= 2:
                self._ring(task, names[k], ring, palette, hole=False)
        for ring, k in zip(holes, hole_owner):
            if len(ring) >= 2:
                self._ring(task, names[k], ring, palette, hole=True)

    def _ring(self, task: str, name: str, ring: np.ndarray, palette: dict[tuple[str, str], tuple[int, int, int]], *, hole: bool) -> None:
        rgb = palette.get((task, name), _FALLBACK)
        flat = _flat(ring)
        if task == "tissue":
            mask = self.tissue_masks.get((task, name))
            if mask is None:
                mask = self.tissue_masks[(task, name)] = Image.new("L", self.size, 0)
            ImageDraw.Draw(mask).polygon(flat, fill=0 if hole else 255)
            return
        layer = self.gland if task == "gland" else self.lumen
        fill = (0, 0, 0, 0) if hole else (*rgb, _GLAND_ALPHA if task == "gland" else _LUMEN_ALPHA)
        ImageDraw.Draw(layer).polygon(flat, fill=fill)
        width = 2 * self.line if task == "gland" else self.line
        ImageDraw.Draw(self.outlines).line(flat, fill=(*_darker(rgb), 255), width=width, joint="curve")

    def tissue_panel(
        self, grey: Image.Image, palette: dict[tuple[str, str], tuple[int, int, int]], on_tissue: np.ndarray | None
    ) -> Image.Image:
        """Tissue class fills over the grey slide (only ``on_tissue``), a darker line along each border."""
        picture = grey.convert("RGBA")
        for key, mask in self.tissue_masks.items():
            rgb = palette.get(key, _FALLBACK)
            inside = np.asarray(mask) > 0
            if on_tissue is not None:
                inside &= on_tissue
            layer = np.zeros((*inside.shape, 4), dtype=np.uint8)
            layer[inside] = (*rgb, _TISSUE_ALPHA)
            layer[inside & ~_eroded(inside)] = (*_darker(rgb), 255)
            picture = Image.alpha_composite(picture, Image.fromarray(layer, "RGBA"))
        return picture.convert("RGB")

    def structure_panel(self, grey: Image.Image) -> Image.Image:
        """Glands and lumen filled and outlined over the grey slide."""
        picture = grey.convert("RGBA")
        for layer in (self.gland, self.lumen, self.outlines):
            picture = Image.alpha_composite(picture, layer)
        return picture.convert("RGB")

    def nuclei_panel(self, grey: Image.Image, palette: dict[tuple[str, str], tuple[int, int, int]]) -> Image.Image:
        """Each grid cell in the colour of its most frequent nuclear type, more opaque where denser."""
        total = self.density.sum(axis=0)
        cells = np.zeros((*self.grid, 4), dtype=np.uint8)
        if total.any():
            colours = np.array([palette.get(("nuclei", t), _FALLBACK) for t in self.types], dtype=np.uint8)
            reference = max(1.0, float(np.percentile(total[total > 0], 90)))
            alpha = np.clip(0.3 + 0.7 * total / reference, 0.0, 1.0) * 255
            cells[..., :3] = colours[self.density.argmax(axis=0)]
            cells[..., 3] = np.where(total > 0, alpha, 0).astype(np.uint8)
        layer = Image.fromarray(cells, "RGBA").resize((self.grid[1] * self.cell, self.grid[0] * self.cell), Image.NEAREST)
        return Image.alpha_composite(grey.convert("RGBA"), layer.crop((0, 0, *self.size))).convert("RGB")


def _panel_mask(tissue_mask: tuple[np.ndarray, float] | None, shape: tuple[int, int], downsample: float) -> np.ndarray | None:
    """The tissue mask sampled at the centres of a panel's pixels (``downsample`` level-0 px each)."""
    if tissue_mask is None:
        return None
    mask, mask_ds = np.asarray(tissue_mask[0], dtype=bool), float(tissue_mask[1])
    if mask.ndim != 2 or not mask.size or not mask_ds > 0:
        raise ValueError(f"tissue_mask must be a 2-D boolean array and a positive downsample, got {mask.shape}, {mask_ds!r}")
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * downsample / mask_ds).astype(np.int64), mask.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * downsample / mask_ds).astype(np.int64), mask.shape[1] - 1)
    return mask[np.ix_(rows, cols)]


def _eroded(mask: np.ndarray) -> np.ndarray:
    """``mask`` without its 4-connected border pixels."""
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    return out


def _darker(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return (int(rgb[0] * 0.6), int(rgb[1] * 0.6), int(rgb[2] * 0.6))


def _panel_layout(w: int, h: int, n: int) -> tuple[list[tuple[int, int]], tuple[int, int], int]:
    """Where ``n`` panels of w x h go under their titles, in 1, 2 or 4 columns (closest to 4:3).

    Returns the top-left corner of each panel's picture, the canvas size and the title font size.
    """
    size = max(12, min(24, max(w, h) // 30))
    title_h, gap = round(size * 1.8), max(4, size // 2)

    def aspect_error(cols: int) -> float:
        return abs(math.log(cols * w / (-(-n // cols) * (h + title_h)) / (4 / 3)))

    cols = min((c for c in (1, 2, 4) if c <= n), key=aspect_error)
    rows = -(-n // cols)
    origins = [((i % cols) * (w + gap), (i // cols) * (h + title_h + gap) + title_h) for i in range(n)]
    return origins, (cols * w + (cols - 1) * gap, rows * (h + title_h) + (rows - 1) * gap), size


def _grid(panels: list[tuple[str, Image.Image]]) -> Image.Image:
    """The panels, each under its title, on one white canvas."""
    origins, canvas_size, size = _panel_layout(*panels[0][1].size, len(panels))
    canvas = Image.new("RGB", canvas_size, (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font(size)
    for (x, y), (title, panel) in zip(origins, panels):
        draw.text((x + size // 2, y - round(size * 0.9)), title, fill=(0, 0, 0), font=font, anchor="lm")
        canvas.paste(panel, (x, y))
    return canvas


def _ordered(
    counts: Counter[tuple[str, str]],
    palette: dict[tuple[str, str], tuple[int, int, int]],
    table_counts: dict[str, dict[str, int]],
) -> dict[str, dict[str, int]]:
    """Counts per task and class, classes in table order, then classes known only by colour (0)."""
    out: dict[str, dict[str, int]] = {}
    for task in TASKS:
        names = list(table_counts.get(task, {}))
        names += [c for (t, c) in palette if t == task and c not in names]
        names += sorted(c for (t, c) in counts if t == task and c not in names)
        if names:
            out[task] = {c: counts.get((task, c), 0) for c in names}
    return out


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font at ``size`` px (a bitmap font where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # pragma: no cover - old Pillow or no FreeType
        return ImageFont.load_default()


def _draw_scale_bar(picture: Image.Image, *, um_per_px: float) -> None:
    """A scale bar in the lower-left corner on a white box."""
    length_um = _nice_length_um(max(picture.width * 0.15 * um_per_px, 1e-6))
    length_px = max(1, round(length_um / um_per_px))
    size = max(11, min(22, picture.height // 45))
    font = _font(size)
    label = f"{length_um / 1000:g} mm" if length_um >= 1000 else f"{length_um:g} um"  # the bundled font has no micro sign
    pad = size // 2
    x0, y1 = pad * 2, picture.height - pad * 2
    text_w = ImageDraw.Draw(picture).textlength(label, font=font)
    box = (x0 - pad, y1 - size - 2 * pad - 4, x0 + max(length_px, text_w) + pad, y1 + pad)
    overlay = Image.new("RGBA", picture.size, (0, 0, 0, 0))
    ImageDraw.Draw(overlay).rectangle(box, fill=(255, 255, 255, 200))
    picture.paste(Image.alpha_composite(picture.convert("RGBA"), overlay).convert("RGB"))
    draw = ImageDraw.Draw(picture)
    draw.rectangle((x0, y1 - max(3, size // 4), x0 + length_px, y1), fill=(0, 0, 0))
    draw.text((x0, y1 - max(3, size // 4) - 3), label, fill=(0, 0, 0), font=font, anchor="ls")


def _add_legend(
    picture: Image.Image,
    counts: dict[str, dict[str, int]],
    palette: dict[tuple[str, str], tuple[int, int, int]],
) -> Image.Image:
    """Return ``picture`` with a legend panel on its right: task headings, swatches, counts."""
    size = max(13, min(22, picture.height // 40))
    font = _font(size)
    bold = _font(round(size * 1.15))
    row = round(size * 1.6)
    pad = size
    lines: list[tuple[str, str, str | None]] = []  # (kind, text, class) kind: title/task/class
    for task, classes in counts.items():
        total = sum(classes.values())
        lines.append(("task", f"{_TASK_TITLES.get(task, task)}  ({total:,})", task))
        for name, n in classes.items():
            lines.append(("class", f"{name}  {n:,}", name))
    if not lines:
        lines.append(("task", "no objects", None))
    measure = ImageDraw.Draw(picture)
    text_w = max(measure.textlength(text, font=bold if kind == "task" else font) for kind, text, _ in lines)
    panel_w = int(pad * 3 + size * 1.4 + text_w)
    panel_h = int(pad * 2 + row * (len(lines) + 1))
    canvas = Image.new("RGB", (picture.width + panel_w, max(picture.height, panel_h)), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    x = picture.width + pad
    y = pad
    draw.line((picture.width, 0, picture.width, canvas.height), fill=(200, 200, 200), width=1)
    current_task: str | None = None
    for kind, text, name in lines:
        if kind == "task":
            current_task = name
            y += row // 3
            draw.text((x, y), text, fill=(0, 0, 0), font=bold)
            y += row
            continue
        rgb = palette.get((current_task or "", name or ""), _FALLBACK)
        sw = (x + pad // 2, y + 2, x + pad // 2 + size, y + 2 + size)
        if current_task == "nuclei":
            draw.rectangle(sw, fill=rgb)
        else:  # a fill as drawn over the pale grey slide, with its darker outline
            alpha = {"tissue": _TISSUE_ALPHA, "gland": _GLAND_ALPHA}.get(current_task or "", _LUMEN_ALPHA) / 255
            fill = tuple(round(v * alpha + 235 * (1 - alpha)) for v in rgb)
            draw.rectangle(sw, fill=fill, outline=_darker(rgb), width=max(2, size // 8))
        draw.text((sw[2] + pad // 2, y), text, fill=(30, 30, 30), font=font)
        y += row
    return canvas

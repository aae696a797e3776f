"""Objects on glass: how much of a slide's gland, lumen and nucleus area `wsimtl segment` draws
outside the tissue mask (0 is right: there is nothing to find on empty glass), and each task's
area as a share of the tissue area (on the sample slide, skin without glands in view, the gland
share should be near 0).

The slide is segmented as a user would (:func:`~wsi_mtl.pipeline.segment_slide`, default options,
the model's own post-processing) into a temporary folder; each task's objects from
``objects.parquet`` are painted onto a grid of about 1 um per pixel and compared with the stored
tissue mask (nearest-neighbour upsampled to that grid).
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

__all__ = ["objects_on_glass", "area_outside"]

#: Tasks whose objects are measured.
GLASS_TASKS: tuple[str, ...] = ("gland", "lumen", "nuclei")


def area_outside(geoms: Any, tissue: np.ndarray, mask_downsample: float, *, subdivide: int) -> tuple[int, int]:
    """(object pixels, object pixels outside the tissue) of ``geoms`` (level-0 px) on the mask grid
    refined ``subdivide`` times (pixel-centre containment; overlapping objects counted once)."""
    from ..postprocess._polygons import rasterize_polygons

    fine = np.repeat(np.repeat(np.asarray(tissue, bool), subdivide, axis=0), subdivide, axis=1)
    polys = np.asarray([g for g in geoms if g is not None and not g.is_empty], dtype=object)
    if polys.size == 0:
        return 0, 0
    painted = rasterize_polygons(polys, fine.shape, downsample=float(mask_downsample) / subdivide) > 0
    return int(painted.sum()), int((painted & ~fine).sum())


def objects_on_glass(model: Any, slide_path: str | Path, *, precision: str = "auto", postprocess: Any = None, grid_um: float = 1.0,
                     out_dir: str | Path | None = None) -> dict[str, Any]:
    """Area of each task's objects outside the tissue mask of ``slide_path`` (um^2 and share of the task's area).

    ``postprocess``: :class:`~wsi_mtl.postprocess.PostprocessParams` to use (default: the model's own).
    ``out_dir``: keep the segmentation there (its preview, objects) instead of a temporary folder.
    """
    import geopandas as gpd

    from ..pipeline import segment_slide
    from ..results import TABLE
    from ..store import read_mask

    slide_path = Path(slide_path)
    if not slide_path.is_file():
        raise InputError(f"slide for the objects-on-glass check not found: {slide_path}")
    overrides = dataclasses.asdict(postprocess) if postprocess is not None else None
    with tempfile.TemporaryDirectory(prefix="wsimtl-glass-") as tmp:
        res = segment_slide(slide_path, out_dir if out_dir is not None else tmp, model=model, precision=precision, progress=False, postprocess=overrides,
                            overwrite=out_dir is not None)
        found = read_mask(res.result_dir / "predictions.zarr")
        if found is None:
            raise InputError(f"no tissue mask stored for {slide_path.name}: cannot tell tissue from glass")
        tissue, ds = found
        table = gpd.read_parquet(res.result_dir / TABLE, columns=["task", "geometry"])
        slide_mpp = float(res.run.get("slide", {}).get("mpp") or res.run.get("mpp") or 0) or float(model.config.mpp)
    subdivide = max(1, int(round(float(ds) * slide_mpp / grid_um)))
    px_um2 = (float(ds) * slide_mpp / subdivide) ** 2
    out: dict[str, Any] = {"slide": slide_path.name, "grid_um": round(float(ds) * slide_mpp / subdivide, 3),
                           "tissue_area_mm2": float(tissue.sum()) * (float(ds) * slide_mpp) ** 2 / 1e6}
    for task in GLASS_TASKS:
        geoms = table.geometry[table["task"] == task].tolist()
        total, outside = area_outside(geoms, tissue, ds, subdivide=subdivide)
        tissue_um2 = out["tissue_area_mm2"] * 1e6
        out[task] = {"n_objects": len(geoms), "area_um2": total * px_um2, "outside_tissue_um2": outside * px_um2,
                     "outside_fraction": outside / total if total else 0.0, "tissue_fraction": total * px_um2 / tissue_um2 if tissue_um2 else float("nan")}
    return out

"""Maps -> objects: nuclei, gland and lumen instances, tissue regions, polygons and measurements.

Array-level functions work on in-memory probability maps (``(C, H, W)``, uint8 ``255 * p`` or
float); :func:`extract_objects` runs them chunk by chunk over a whole ``predictions.zarr``.
"""

from __future__ import annotations

from wsi_mtl.postprocess._chunks import Chunk, owns, plan_chunks
from wsi_mtl.postprocess._extract import (
    HaloTooSmallError,
    HeadMeta,
    MapsMeta,
    ObjectStream,
    PostprocessParams,
    check_overrides,
    concat_batches,
    extract_objects,
    objects_from_maps,
    read_meta,
)
from wsi_mtl.postprocess._instances import (
    downsample_prob,
    drop_unconfident_glands,
    gland_instances,
    instance_type,
    label_to_3class,
    lumen_instances,
    nuclei_instances,
    remove_small_instances,
    remove_unconfident_instances,
    split_at_necks,
)
from wsi_mtl.postprocess._model import gland_labels, gland_lumen_labels, nuclei_labels, params_of
from wsi_mtl.postprocess._polygons import labels_to_polygons, polygon_measurements, rasterize_polygons
from wsi_mtl.postprocess._tissue import tissue_class_map, tissue_polygons

__all__ = [
    "extract_objects",
    "objects_from_maps",
    "concat_batches",
    "read_meta",
    "MapsMeta",
    "ObjectStream",
    "HeadMeta",
    "PostprocessParams",
    "params_of",
    "nuclei_labels",
    "gland_labels",
    "gland_lumen_labels",
    "check_overrides",
    "HaloTooSmallError",
    "Chunk",
    "plan_chunks",
    "owns",
    "nuclei_instances",
    "split_at_necks",
    "remove_unconfident_instances",
    "drop_unconfident_glands",
    "gland_instances",
    "lumen_instances",
    "instance_type",
    "label_to_3class",
    "downsample_prob",
    "remove_small_instances",
    "labels_to_polygons",
    "polygon_measurements",
    "rasterize_polygons",
    "tissue_class_map",
    "tissue_polygons",
]

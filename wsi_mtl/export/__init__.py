"""Exporters: object batches -> GeoParquet table, QuPath GeoJSON and a preview picture.

``write_table`` streams :class:`~wsi_mtl.objects.ObjectBatch` es into ``objects.parquet``;
``write_geojson`` / ``write_geojson_files`` and ``write_preview`` stream from that table, so no
exporter ever holds all objects in memory; ``write_label_images`` rasterises it into NGFF label
images of predictions.zarr chunk by chunk.
"""

from __future__ import annotations

from ._geojson import GEOJSON_FILES, MEASUREMENTS, object_type, write_geojson, write_geojson_files
from ._labels import LABEL_IMAGES, write_label_images
from ._preview import write_preview
from ._synthetic import synthetic_batches
from ._table import TABLE_SCHEMA, TableSummary, read_table_info, write_table

__all__ = [
    "write_table",
    "read_table_info",
    "TableSummary",
    "TABLE_SCHEMA",
    "write_geojson",
    "write_geojson_files",
    "object_type",
    "MEASUREMENTS",
    "GEOJSON_FILES",
    "write_preview",
    "write_label_images",
    "LABEL_IMAGES",
    "synthetic_batches",
]

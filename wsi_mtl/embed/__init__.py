"""Patch and object embeddings from the shared encoder (or an external ResNet-50 / DenseNet-121).

``embed_slide`` writes one feature vector per tissue patch of a slide (``embeddings.zarr``,
``patches.parquet``, a slide-level mean / max vector in run.json); ``embed_objects`` pools encoder
features over each object of a finished ``segment`` result (``object_embeddings.parquet``).
"""

from __future__ import annotations

from ._encoders import LEVELS, LinearHead, PatchEncoder, load_encoder, read_probe
from ._grid import PatchGrid, patch_table
from ._objects import OBJECT_EMBEDDINGS, embed_objects
from ._slide import PATCHES, EmbedResult, embed_slide, head_columns
from ._store import EMBEDDINGS, EmbeddingStore, open_embeddings

__all__ = ["LEVELS", "LinearHead", "PatchEncoder", "load_encoder", "read_probe", "PatchGrid", "patch_table", "PATCHES",
           "EmbedResult", "embed_slide", "head_columns", "EMBEDDINGS", "EmbeddingStore", "open_embeddings",
           "OBJECT_EMBEDDINGS", "embed_objects"]

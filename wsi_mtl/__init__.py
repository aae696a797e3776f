"""wsimtl: one multi-task network over whole-slide H&E images, turned into objects people use."""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "open_slide",
    "load_model",
    "segment_slide",
    "compute_tissue_mask",
]

_LAZY = {
    "open_slide": "wsi_mtl.slide",
    "load_model": "wsi_mtl.network",
    "segment_slide": "wsi_mtl.pipeline",
    "compute_tissue_mask": "wsi_mtl.tissue",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'wsi_mtl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)

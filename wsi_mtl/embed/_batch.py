"""``wsimtl batch --command embed``: the per-slide functions the cohort runner takes for ``embed``.

The cohort runner (:func:`wsi_mtl.cohort.run_batch`) skips finished slides, locks each slide and
writes ``batch_summary.csv``; these functions make it run :func:`embed_slide` instead of ``segment``:
a slide counts as finished when its run.json has an ``embed`` section and the files it lists exist,
and the encoder is loaded once per worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..results import listed_files, read_run
from ._encoders import load_encoder
from ._slide import PATCHES, embed_slide
from ._store import EMBEDDINGS

__all__ = ["embed_for_batch", "embedded", "load_for_batch", "BatchEmbedResult"]


@dataclass(frozen=True)
class BatchEmbedResult:
    """What the cohort runner reads of a finished slide: its folder and run.json."""

    result_dir: Path
    run: dict[str, Any]


def embed_for_batch(slide: str | Path, out_dir: str | Path, *, model: Any = None, mpp: float | None = None, device: str = "auto",
                    precision: str = "auto", batch_size: int | None = None, workers: int | None = None, tissue_mask: bool = True,
                    progress: bool = False, name: str | None = None, **_segment_only: Any) -> BatchEmbedResult:
    """:func:`embed_slide` with the keyword arguments the cohort runner passes (``mpp`` is the slide's
    override from the manifest; segment-only options such as tiles, TTA and objects are ignored)."""
    res = embed_slide(slide, out_dir, model=model, slide_mpp=mpp, device=device, precision=precision, batch_size=batch_size,
                      workers=workers, tissue_mask=tissue_mask, progress=progress, name=name)
    return BatchEmbedResult(res.result_dir, read_run(res.result_dir) or {})


def embedded(result_dir: Path) -> bool:
    """True when run.json records embeddings and lists both their files, and both exist."""
    run = read_run(result_dir)
    if not run or not run.get("embed"):
        return False
    files = set(listed_files(run))
    return {EMBEDDINGS, PATCHES} <= files and all((Path(result_dir) / f).exists() for f in (EMBEDDINGS, PATCHES))


def load_for_batch(name: str | None, *, device: str = "cpu") -> Any:
    """The encoder, loaded once per worker by the cohort's model cache."""
    return load_encoder(name, device=device)

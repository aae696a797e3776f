"""``embeddings.zarr``: patch features and head probabilities in row chunks, with a resume log.

While a run is in progress the store is ``embeddings.zarr.partial/`` with ``chunks_done.log`` (one
finished row-chunk index a line) and ``fingerprint.json``; a rerun with the same fingerprint
continues from the finished chunks. :meth:`EmbeddingStore.finalize` adds the slide-level vectors
(``slide_mean``, ``slide_max`` over the patches that are not damaged) and renames the folder to
``embeddings.zarr``, so a folder of that name is always complete.

Layout (zarr v3): ``features`` (N x D, float32 or float16), ``probs/<head>`` (N x classes, float32),
``slide_mean`` and ``slide_max`` (D, float32); group attributes name the encoder, its weights'
sha256, mpp, patch size, stride, levels and the heads' classes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ..atomic import output_error
from ..errors import OutputError

__all__ = ["EmbeddingStore", "EMBEDDINGS", "open_embeddings"]

log = logging.getLogger(__name__)

EMBEDDINGS = "embeddings.zarr"
_PARTIAL = ".partial"
_DONE_LOG = "chunks_done.log"
_FINGERPRINT = "fingerprint.json"


def _oserror(exc: OSError, path: Path) -> OutputError:
    return output_error(exc, path) or OutputError(f"cannot write {path}: {exc.strerror or exc}")


class EmbeddingStore:
    """Row-chunked feature and probability arrays for ``n`` patches (see module doc)."""

    def __init__(self, result_dir: Path, *, n: int, dim: int, heads: dict[str, int], chunk_rows: int, dtype: str,
                 fingerprint: dict[str, Any], attrs: dict[str, Any]) -> None:
        self.final = Path(result_dir) / EMBEDDINGS
        self.path = self.final.with_name(EMBEDDINGS + _PARTIAL)
        self.n, self.dim, self.chunk_rows = n, dim, chunk_rows
        self.heads = dict(heads)
        self.done: set[int] = set()
        try:
            self._open(fingerprint, attrs, dtype)
        except OSError as exc:
            raise _oserror(exc, self.path) from exc

    @property
    def chunks(self) -> int:
        return max(1, -(-self.n // self.chunk_rows))

    def _open(self, fingerprint: dict[str, Any], attrs: dict[str, Any], dtype: str) -> None:
        fp_file = self.path / _FINGERPRINT
        if self.path.is_dir():
            try:
                same = json.loads(fp_file.read_text(encoding="utf-8")) == json.loads(json.dumps(fingerprint))
            except (OSError, ValueError):
                same = False
            if same:
                self.root = zarr.open_group(str(self.path), mode="r+")
                self._read_log()
                log.info("resuming %s: %d of %d chunks done", self.path, len(self.done), self.chunks)
                return
            shutil.rmtree(self.path)
        if self.final.exists():
            shutil.rmtree(self.final)
        self.root = zarr.open_group(str(self.path), mode="w")
        self.root.attrs.update(attrs)
        rows = max(1, min(self.chunk_rows, self.n))
        self.root.create_array("features", shape=(self.n, self.dim), chunks=(rows, self.dim), dtype=dtype, fill_value=np.nan)
        probs = self.root.create_group("probs")
        for name, classes in self.heads.items():
            probs.create_array(name, shape=(self.n, classes), chunks=(rows, classes), dtype="float32", fill_value=np.nan)
        fp_file.write_text(json.dumps(fingerprint), encoding="utf-8")
        (self.path / _DONE_LOG).write_text("", encoding="utf-8")

    def _read_log(self) -> None:
        for line in (self.path / _DONE_LOG).read_text(encoding="utf-8").splitlines():
            if line.strip().isdigit():
                self.done.add(int(line))

    def rows(self, chunk: int) -> tuple[int, int]:
        return chunk * self.chunk_rows, min(self.n, (chunk + 1) * self.chunk_rows)

    def write_chunk(self, chunk: int, features: np.ndarray, probs: dict[str, np.ndarray]) -> None:
        """Write one row chunk and record it as done (after its arrays are on disk)."""
        r0, r1 = self.rows(chunk)
        try:
            self.root["features"][r0:r1] = features
            for name, p in probs.items():
                self.root[f"probs/{name}"][r0:r1] = p
            with open(self.path / _DONE_LOG, "a", encoding="utf-8") as fh:
                fh.write(f"{chunk}\n")
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise _oserror(exc, self.path) from exc
        self.done.add(chunk)

    def slide_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and max of the features over patches, streamed chunk by chunk (NaN rows skipped)."""
        total = np.zeros(self.dim, np.float64)
        peak = np.full(self.dim, -np.inf, np.float64)
        count = 0
        arr = self.root["features"]
        for c in range(self.chunks):
            r0, r1 = self.rows(c)
            if r1 <= r0:
                continue
            block = np.asarray(arr[r0:r1], np.float64)
            block = block[np.isfinite(block).all(axis=1)]
            count += len(block)
            if len(block):
                total += block.sum(axis=0)
                peak = np.maximum(peak, block.max(axis=0))
        if count == 0:
            return np.full(self.dim, np.nan, np.float32), np.full(self.dim, np.nan, np.float32)
        return (total / count).astype(np.float32), peak.astype(np.float32)

    def finalize(self, **attrs: Any) -> Path:
        """Slide vectors and attributes written, then ``.partial`` renamed to ``embeddings.zarr``."""
        try:
            mean, peak = self.slide_vectors()
            for name, v in (("slide_mean", mean), ("slide_max", peak)):
                self.root.create_array(name, shape=v.shape, dtype="float32", overwrite=True)[:] = v
            self.root.attrs.update(attrs)
            for name in (_DONE_LOG, _FINGERPRINT):
                (self.path / name).unlink(missing_ok=True)
            if self.final.exists():
                shutil.rmtree(self.final)
            os.replace(self.path, self.final)
        except OSError as exc:
            raise _oserror(exc, self.final) from exc
        return self.final


def open_embeddings(result_dir: str | Path) -> zarr.Group:
    """The finished ``embeddings.zarr`` of a result folder (read-only)."""
    path = Path(result_dir) / EMBEDDINGS
    if not path.is_dir():
        from ..errors import InputError

        raise InputError(f"{path} does not exist: run `wsimtl embed SLIDE` first")
    return zarr.open_group(str(path), mode="r")

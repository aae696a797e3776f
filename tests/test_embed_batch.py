"""``wsimtl batch --command embed``: cohort runs of embed with segment's skip, lock and summary behaviour."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from wsi_mtl.embed._batch import embedded


def _summary(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "batch_summary.csv", newline="") as fh:
        return {r["id"]: r for r in csv.DictReader(fh)}


@pytest.mark.slow
def test_batch_embed_skips_finished_and_records_failures(tmp_path: Path, svs_jpeg: Path, truncate_slide) -> None:
    from wsi_mtl.cli import main

    a = shutil.copy(svs_jpeg, tmp_path / "a.svs")
    bad = truncate_slide(svs_jpeg, tmp_path / "bad.svs", fraction=0.3)
    out = tmp_path / "out"
    args = ["batch", str(a), str(bad), "--command", "embed", "-o", str(out), "--device", "cpu", "--precision", "fp32", "-q"]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 3
    rows = _summary(out)
    assert rows["a"]["status"] == "done" and rows["bad"]["status"] == "failed" and rows["bad"]["error"]
    assert embedded(out / "a") and (out / "a" / "embeddings.zarr").is_dir() and not (out / "a" / "predictions.zarr").exists()
    mtime = (out / "a" / "patches.parquet").stat().st_mtime_ns
    with pytest.raises(SystemExit):
        main(args)
    assert _summary(out)["a"]["status"] == "skipped"
    assert (out / "a" / "patches.parquet").stat().st_mtime_ns == mtime


def test_embedded_needs_the_listed_files(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text('{"embed": {"patches": 1}, "files": [{"path": "embeddings.zarr"}, {"path": "patches.parquet"}]}')
    assert not embedded(tmp_path)
    (tmp_path / "embeddings.zarr").mkdir()
    (tmp_path / "patches.parquet").write_bytes(b"")
    assert embedded(tmp_path)
    (tmp_path / "run.json").write_text('{"files": []}')
    assert not embedded(tmp_path)

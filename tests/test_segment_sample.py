"""Each command with its default options on the real sample slide (CMU-1-Small-Region.svs), checked
as a user would check it: `segment`, a rerun, a rerun after `--no-objects`, a resume whose maps are
done, `export`, and the preview at its real size. Slow: one network pass, then post-processing only.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from wsi_mtl.derive import PREVIEW_MAX_PX
from wsi_mtl.results import PREDICTIONS, RUN_JSON, TABLE, is_complete, read_run

pytestmark = pytest.mark.slow

_OBJECT_FILES = (TABLE, "objects.geojson", "nuclei.geojson", "glands.geojson", "tissue.geojson", "preview.png")


def wsimtl(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "wsi_mtl", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture()
def segmented(sample_segmented: tuple[Path, str]) -> tuple[Path, str]:
    """``wsimtl segment SLIDE -o OUT`` with every option at its default: (result folder, stdout)."""
    return sample_segmented


def _copy(result_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / result_dir.name
    shutil.copytree(result_dir, copy)
    return copy


def _counts(run: dict[str, Any]) -> dict[str, int]:
    return {task: sum(per_class.values()) for task, per_class in run["objects"].items()}


def _assert_lists_exactly_what_is_there(result_dir: Path) -> dict[str, Any]:
    """run.json is complete and lists every file of the folder, and only those."""
    run = read_run(result_dir)
    assert run is not None and run["status"] == "complete" and is_complete(result_dir)
    listed = {f["path"].split("/")[0] for f in run["files"]}
    assert listed == {p.name for p in result_dir.iterdir()} - {RUN_JSON}
    return run


def _drop_objects(result_dir: Path, **changes: Any) -> dict[str, Any]:
    """Remove the objects and exports (disk and run.json) as a run that never made them leaves the folder."""
    run = read_run(result_dir)
    assert run is not None
    for name in _OBJECT_FILES:
        (result_dir / name).unlink(missing_ok=True)  # glands.geojson only where there are glands
    run["files"] = [f for f in run["files"] if f["path"] == PREDICTIONS]
    run["objects"] = {}
    run.update(changes)
    (result_dir / RUN_JSON).write_text(json.dumps(run))
    return run


def test_segment_with_defaults(segmented: tuple[Path, str]) -> None:
    result_dir, stdout = segmented
    run = _assert_lists_exactly_what_is_there(result_dir)
    assert "tiles computed" in stdout and "objects derived in" in stdout
    counts = _counts(run)
    assert counts["nuclei"] > 500 and counts["tissue"] > 0  # a colon biopsy: thousands of nuclei, several tissue types
    assert f"nuclei: {counts['nuclei']} (" in stdout
    table = pq.read_table(result_dir / TABLE, columns=["task"]).column("task").to_pylist()
    assert len(table) == sum(counts.values())
    doc = json.loads((result_dir / "nuclei.geojson").read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == counts["nuclei"]
    assert {f["properties"]["objectType"] for f in doc["features"]} == {"detection"}
    xy = np.concatenate([np.asarray(f["geometry"]["coordinates"][0], dtype=float) for f in doc["features"]])
    width, height = run["slide"]["width"], run["slide"]["height"]
    assert xy[:, 0].min() >= 0 and xy[:, 1].min() >= 0 and xy[:, 0].max() <= width and xy[:, 1].max() <= height


def test_preview_at_its_real_size(segmented: tuple[Path, str]) -> None:
    result_dir, _ = segmented
    run = read_run(result_dir)
    assert run is not None
    picture = np.asarray(Image.open(result_dir / "preview.png").convert("RGB"))
    scale = PREVIEW_MAX_PX / max(run["slide"]["width"], run["slide"]["height"])
    # the slide's picture is PREVIEW_MAX_PX along its longest side (the slide is larger), plus a legend
    assert picture.shape[0] >= round(run["slide"]["height"] * scale) - 1
    assert picture.shape[1] >= round(run["slide"]["width"] * scale)
    assert picture.std() > 20  # the H&E thumbnail with objects drawn, not a flat picture


def test_rerun_reuses_a_complete_result(segmented: tuple[Path, str]) -> None:
    result_dir, _ = segmented
    before = {p.name: p.stat().st_mtime_ns for p in result_dir.iterdir()}
    proc = wsimtl("segment", str(read_run(result_dir)["slide"]["path"]), "-o", str(result_dir.parent))  # type: ignore[index]
    assert "already complete" in proc.stdout and "nothing to do" in proc.stdout
    assert {p.name: p.stat().st_mtime_ns for p in result_dir.iterdir()} == before


def test_rerun_without_no_objects_derives_the_objects(segmented: tuple[Path, str], tmp_path: Path) -> None:
    """A result made with --no-objects, run again without it, gets its objects from the stored maps."""
    result_dir, _ = segmented
    expected = _counts(read_run(result_dir))  # type: ignore[arg-type]
    copy = _copy(result_dir, tmp_path)
    run = _drop_objects(copy, parameters={**read_run(copy)["parameters"], "objects": False})  # type: ignore[index]
    assert is_complete(copy)  # as --no-objects leaves it
    proc = wsimtl("segment", run["slide"]["path"], "-o", str(tmp_path))
    assert "maps complete: " in proc.stdout and "tiles reused; objects derived in" in proc.stdout
    assert "tiles computed" not in proc.stdout
    rerun = _assert_lists_exactly_what_is_there(copy)
    assert _counts(rerun) == expected and rerun["parameters"]["objects"] is True


def test_resume_with_finished_maps_derives_objects_only(segmented: tuple[Path, str], tmp_path: Path) -> None:
    """A run stopped after its maps (run.json status 'maps') resumes with the objects only."""
    result_dir, _ = segmented
    expected = _counts(read_run(result_dir))  # type: ignore[arg-type]
    copy = _copy(result_dir, tmp_path)
    run = _drop_objects(copy, status="maps")
    zarr_before = (copy / PREDICTIONS / "zarr.json").stat().st_mtime_ns
    proc = wsimtl("segment", run["slide"]["path"], "-o", str(tmp_path))
    assert "maps complete: " in proc.stdout and "tiles computed" not in proc.stdout
    assert (copy / PREDICTIONS / "zarr.json").stat().st_mtime_ns == zarr_before  # the maps were not recomputed
    assert _counts(_assert_lists_exactly_what_is_there(copy)) == expected


def test_export_with_defaults(segmented: tuple[Path, str], tmp_path: Path) -> None:
    """`wsimtl export` remakes the same objects and leaves exactly the files run.json lists."""
    result_dir, _ = segmented
    expected = _counts(read_run(result_dir))  # type: ignore[arg-type]
    copy = _copy(result_dir, tmp_path)
    run = read_run(copy)
    assert run is not None
    (copy / "objects.geojson.gz").write_bytes(b"stale")  # as an earlier export with --geojson-gz left it
    run["files"].append({"path": "objects.geojson.gz", "bytes": 5})
    (copy / RUN_JSON).write_text(json.dumps(run))
    proc = wsimtl("export", str(copy))
    assert f"nuclei: {expected['nuclei']} (" in proc.stdout
    after = _assert_lists_exactly_what_is_there(copy)
    assert _counts(after) == expected and not (copy / "objects.geojson.gz").exists()

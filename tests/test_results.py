"""wsi_mtl.results: the result folder's layout, run.json, and what a rerun must do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wsi_mtl.results import PREDICTIONS, TABLE, is_complete, maps_reusable, plan_rerun, read_run, result_dir_for, write_run


def _result(tmp_path: Path, **run: object) -> Path:
    """A result folder with predictions.zarr and the files ``run['files']`` lists."""
    folder = tmp_path / "slide"
    (folder / PREDICTIONS).mkdir(parents=True)
    for entry in run.get("files", []):  # type: ignore[union-attr]
        path = folder / entry["path"]  # type: ignore[index]
        if not path.exists():
            path.write_text("x")
    write_run(folder, run)
    return folder


def _files(*names: str) -> list[dict[str, object]]:
    return [{"path": n, "bytes": 1} for n in (PREDICTIONS, *names)]


WITH_OBJECTS = _files(TABLE, "objects.geojson", "preview.png")


def test_result_dir_names() -> None:
    assert result_dir_for("/a/b/slide.svs", "out") == Path("out/slide")
    assert result_dir_for("/a/b/scan.ome.tiff", "out") == Path("out/scan")
    assert result_dir_for("/a/b/scan.ome.tiff", "out", name="id7") == Path("out/id7")


@pytest.mark.parametrize("text", ['{"status": "complete", "files": [', "[1, 2]", ""])
def test_unreadable_run_json_is_incomplete(tmp_path: Path, text: str) -> None:
    folder = _result(tmp_path, status="complete", files=_files())
    assert is_complete(folder)
    (folder / "run.json").write_text(text)
    assert read_run(folder) is None and not is_complete(folder)
    assert plan_rerun(folder, objects=True, overrides={}).action == "compute"


def test_complete_needs_every_listed_file(tmp_path: Path) -> None:
    folder = _result(tmp_path, status="complete", files=WITH_OBJECTS)
    assert is_complete(folder)
    (folder / "objects.geojson").unlink()
    assert not is_complete(folder)
    assert not is_complete(_result(tmp_path / "m", status="maps", files=_files()))


def test_rerun_without_objects_derives_them(tmp_path: Path) -> None:
    """The bug of issue 16 item 8: a result made with --no-objects, run again without it, must get objects."""
    folder = _result(tmp_path, status="complete", files=_files(), parameters={"objects": False})
    rerun = plan_rerun(folder, objects=True, overrides={})
    assert rerun.action == "derive" and "no objects" in rerun.reason
    assert plan_rerun(folder, objects=False, overrides={}).action == "nothing"


def test_rerun_of_a_complete_result(tmp_path: Path) -> None:
    folder = _result(tmp_path, status="complete", files=WITH_OBJECTS, postprocess={"overrides": {"nuclei_split_h": 0.0}})
    assert plan_rerun(folder, objects=True, overrides={"nuclei_split_h": 0.0}).action == "nothing"
    assert plan_rerun(folder, objects=False, overrides={}).action == "nothing"  # objects are kept
    assert plan_rerun(folder, objects=True, overrides={}).action == "derive"  # other post-processing
    assert plan_rerun(folder, objects=True, overrides={"nuclei_split_h": 0.0}, geojson_gz=True).action == "derive"
    assert plan_rerun(folder, objects=True, overrides={"nuclei_split_h": 0.0}, overwrite=True).action == "compute"


def test_rerun_asking_for_other_maps_recomputes_them(tmp_path: Path) -> None:
    """A complete result made with another --tta or model is recomputed, never reported as done."""
    fingerprint = {"model": "wsimtl-small", "tta": 1, "tissue_mask": True}
    folder = _result(tmp_path, status="complete", files=WITH_OBJECTS, fingerprint=fingerprint, postprocess={"overrides": {}})
    same = {"model": "wsimtl_small", "tta": 1, "tissue_mask": True}  # dash and underscore forms are one model
    assert plan_rerun(folder, objects=True, overrides={}, made_with=same).action == "nothing"
    for key, value in (("tta", 4), ("model", "cerberus-r34"), ("tissue_mask", False)):
        rerun = plan_rerun(folder, objects=False, overrides={}, made_with={**same, key: value})
        assert rerun.action == "compute" and key in rerun.reason and "recomputing" in rerun.reason
    # a setting the fingerprint does not record (an older result) is no reason to recompute
    assert plan_rerun(folder, objects=True, overrides={}, made_with={"precision_of_the_future": 1}).action == "nothing"


def test_partial_result_computes(tmp_path: Path) -> None:
    assert plan_rerun(tmp_path / "none", objects=True, overrides={}).action == "compute"
    folder = _result(tmp_path, status="maps", files=_files(), fingerprint={"tiles": 4})
    rerun = plan_rerun(folder, objects=True, overrides={})
    assert rerun.action == "compute" and rerun.run is not None
    assert maps_reusable(folder, rerun.run, {"tiles": 4})
    assert not maps_reusable(folder, rerun.run, {"tiles": 5})
    (folder / "run.json").write_text(json.dumps({**rerun.run, "status": "incomplete"}))
    assert not maps_reusable(folder, read_run(folder), {"tiles": 4})  # how the maps were made is unknown


def test_write_run_is_atomic_json(tmp_path: Path) -> None:
    write_run(tmp_path, {"status": "maps", "x": float("nan")})
    assert json.loads((tmp_path / "run.json").read_text()) == {"status": "maps", "x": None}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_write_run_keeps_what_embed_wrote_into_the_folder(tmp_path: Path) -> None:
    """A segment run into a folder `wsimtl embed` wrote keeps run.json's embed section and its
    files (those still there); a section the new run has replaces the old one."""
    from wsi_mtl.embed import EMBEDDINGS, OBJECT_EMBEDDINGS, PATCHES
    from wsi_mtl.results import KEPT_SECTIONS

    assert set(KEPT_SECTIONS["embed"]) == {EMBEDDINGS, PATCHES, OBJECT_EMBEDDINGS}
    (tmp_path / EMBEDDINGS).mkdir()
    (tmp_path / PATCHES).write_text("x")
    write_run(tmp_path, {"status": "embed", "embed": {"patches": 3},
                         "files": [{"path": EMBEDDINGS, "bytes": 1}, {"path": PATCHES, "bytes": 1}, {"path": OBJECT_EMBEDDINGS, "bytes": 1}]})
    write_run(tmp_path, {"status": "complete", "files": _files(TABLE)})
    run = read_run(tmp_path)
    assert run["status"] == "complete" and run["embed"] == {"patches": 3}
    assert [f["path"] for f in run["files"]] == [PREDICTIONS, TABLE, EMBEDDINGS, PATCHES]  # the missing one is not listed
    write_run(tmp_path, {"status": "complete", "embed": {"patches": 5}, "files": _files(TABLE)})
    assert read_run(tmp_path)["embed"] == {"patches": 5} and len(read_run(tmp_path)["files"]) == 2

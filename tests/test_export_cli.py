"""``wsimtl export RESULT_DIR``: re-derive objects and exports from an existing predictions.zarr."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import wsi_mtl.postprocess as postprocess
from wsi_mtl import derive
from wsi_mtl.cli import cli, main

try:
    from test_derive import fake_extract, make_result_dir
except ImportError:  # tests collected as a package
    from .test_derive import fake_extract, make_result_dir  # type: ignore[no-redef]


@pytest.fixture(autouse=True)
def small_preview(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(derive, "PREVIEW_MAX_PX", 256)


def test_export_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result_dir = make_result_dir(tmp_path)
    calls: list[dict] = []
    monkeypatch.setattr(postprocess, "extract_objects", fake_extract(300, calls=calls), raising=False)
    res = CliRunner().invoke(cli, ["export", str(result_dir), "--workers", "2", "--geojson-gz"])
    assert res.exit_code == 0, res.output
    assert calls[0]["workers"] == 2
    assert "nuclei:" in res.output and "objects.geojson.gz" in res.output and "time: objects" in res.output
    run = json.loads((result_dir / "run.json").read_text())
    assert sum(sum(c.values()) for c in run["objects"].values()) == 300
    assert (result_dir / "objects.geojson.gz").is_file() and (result_dir / "objects.geojson").is_file()  # gz: also, not instead
    listed = {f["path"] for f in run["files"]}
    on_disk = {str(p.relative_to(result_dir)) for p in result_dir.rglob("*.geojson*")}
    assert "objects.geojson.gz" in listed and on_disk == {p for p in listed if ".geojson" in p}  # nothing stale, nothing unlisted


def test_export_quiet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result_dir = make_result_dir(tmp_path)
    monkeypatch.setattr(postprocess, "extract_objects", fake_extract(10), raising=False)
    res = CliRunner().invoke(cli, ["export", str(result_dir), "-q"])
    assert res.exit_code == 0 and res.output == ""
    assert (result_dir / "objects.parquet").is_file()


def test_export_missing_predictions_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["export", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("wsimtl: error: no predictions.zarr in")


def test_export_incomplete_predictions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "predictions.zarr.partial").mkdir()
    with pytest.raises(SystemExit) as info:
        main(["export", str(tmp_path)])
    assert info.value.code == 2
    assert "incomplete" in capsys.readouterr().err


def test_export_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["export", str(tmp_path / "nope")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "result folder not found" in err


def test_export_bad_workers(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["export", str(tmp_path), "--workers", "0"])
    assert res.exit_code == 2 and "--workers" in res.output

"""``wsimtl info``: text and JSON output on every synthetic format, one-line errors with exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from wsi_mtl.cli import cli, main


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(("fixture", "fmt", "backend", "source", "n_levels"), [
    ("svs_jpeg", "aperio", "openslide", "openslide", 3),
    ("svs_j2k", "aperio", "openslide", "openslide", 3),
    ("ome_tiff", "ome-tiff", "tifffile", "ome", 3),
    ("png_image", "png", "pillow", "image-resolution", 1),
])
def test_info_json(request: pytest.FixtureRequest, fixture: str, fmt: str, backend: str, source: str, n_levels: int) -> None:
    path: Path = request.getfixturevalue(fixture)
    result = CliRunner().invoke(cli, ["info", str(path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert (data["format"], data["backend"], data["mpp_source"]) == (fmt, backend, source)
    assert data["mpp"] == pytest.approx(0.25, rel=1e-3)
    assert (data["width"], data["height"], data["offset"]) == (1536, 1024, [0, 0])
    assert len(data["levels"]) == n_levels


def test_info_text(svs_jpeg: Path) -> None:
    result = CliRunner().invoke(cli, ["info", str(svs_jpeg)])
    assert result.exit_code == 0, result.output
    assert "aperio (backend openslide" in result.output
    assert "1536 x 1024 px" in result.output
    assert "0.2500 um/px (source: openslide)" in result.output
    assert "objective      40x" in result.output
    assert "2: 96 x 64 px, downsample 16" in result.output
    assert "label, macro, thumbnail" in result.output


def test_info_mpp_override(png_image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["info", str(png_image), "--mpp", "0.5", "--json"], capsys)
    assert code == 0
    assert json.loads(out)["mpp_source"] == "override"


@pytest.mark.shared_data
def test_info_cmu_sample(cmu_small: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["info", str(cmu_small)], capsys)
    assert code == 0
    assert "2220 x 2967 px" in out and "0.4990 um/px (source: openslide)" in out and "20x" in out


def test_info_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    from PIL import Image

    bare = tmp_path / "bare.png"
    Image.new("RGB", (8, 8), "white").save(bare)
    cases = [
        ([str(tmp_path / "missing.svs")], 10, "slide not found"),
        ([str(tmp_path)], 10, "is a directory"),
        ([str(empty)], 10, "is empty"),
        ([str(text)], 11, "is not a slide format wsimtl reads"),
        ([str(bare), "--mpp", "-1"], 2, "mpp must be between"),
    ]
    for args, expected_code, message in cases:
        code, out, err = run_main(["info", *args], capsys)
        assert code == expected_code, (args, err)
        assert out == ""
        assert err.startswith("wsimtl: error: ") and message in err
        assert err.count("\n") == 1, err  # one line, no traceback


def test_info_without_mpp_shows_the_rest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    bare = tmp_path / "bare.png"
    Image.new("RGB", (24, 16), "white").save(bare)
    code, out, err = run_main(["info", str(bare)], capsys)
    assert code == 0, err
    assert "mpp            unknown (pass --mpp)" in out
    assert "24 x 16 px" in out and "um)" not in out and "png (backend pillow" in out
    code, out, _ = run_main(["info", str(bare), "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["mpp"] is None and data["mpp_source"] is None and data["size_um"] is None
    assert (data["width"], data["height"]) == (24, 16)
    code, out, _ = run_main(["info", str(bare), "--mpp", "0.5", "--json"], capsys)
    assert code == 0 and json.loads(out)["size_um"] == [12.0, 8.0]


def test_info_truncated(svs_jpeg: Path, tmp_path: Path, truncate_slide, capsys: pytest.CaptureFixture[str]) -> None:
    cut = truncate_slide(svs_jpeg, tmp_path / "cut.svs", fraction=0.5)
    code, _, err = run_main(["info", str(cut)], capsys)
    assert code == 10 and "truncated" in err and err.count("\n") == 1

"""`wsimtl segment` end to end on generated slides: outputs, run.json, bad inputs, damaged tiles, kill + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from wsi_mtl import synthetic
from wsi_mtl.store import PREDICTIONS

FAST = ["--tile-size", "256", "--batch-size", "2", "--quiet"]


def wsimtl(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wsi_mtl", *args], capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING")]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("wsimtl: error: "), lines[0]
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), lines[0]


def assert_nothing_finished(result_dir: Path) -> None:
    assert not (result_dir / PREDICTIONS).exists()
    run = result_dir / "run.json"
    assert not run.exists() or json.loads(run.read_text()).get("status") != "complete"


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["svs_jpeg", "svs_j2k"])
def test_segment_writes_maps_and_run_json(fixture, request, tmp_path):
    slide = request.getfixturevalue(fixture)
    proc = wsimtl("segment", str(slide), "-o", str(tmp_path), "--no-objects", *FAST)
    assert proc.returncode == 0, proc.stderr
    result = tmp_path / slide.stem
    run = json.loads((result / "run.json").read_text())
    assert run["status"] == "complete"
    assert run["slide"]["mpp"] == pytest.approx(0.25) and run["slide"]["mpp_source"] == "openslide"
    assert run["model"]["weights_sha256"] and "trained" in run["model"]
    for f in run["files"]:
        assert (result / f["path"]).exists()
    root = zarr.open_group(result / PREDICTIONS, mode="r")
    attrs = root.attrs["wsimtl"]
    assert attrs["downsample"] == pytest.approx(2.0)
    nuclei = root["Nuclei-INST"]["0"]
    assert nuclei.shape == (3, 512, 768) and nuclei.dtype == np.uint8
    assert nuclei.chunks == (3, 256, 256)
    computed = nuclei[:].sum(axis=0)
    assert computed.max() > 0
    # each computed pixel holds probabilities that sum to ~1 (255 +- rounding)
    assert np.abs(computed[computed > 0].astype(int) - 255).max() <= 3
    mask = root["tissue_mask"]["0"][:]
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255} and mask.any()


@pytest.mark.slow
def test_segment_with_objects_lists_every_file(svs_jpeg, tmp_path):
    proc = wsimtl("segment", str(svs_jpeg), "-o", str(tmp_path), *FAST)
    assert proc.returncode == 0, proc.stderr
    result = tmp_path / svs_jpeg.stem
    run = json.loads((result / "run.json").read_text())
    assert run["status"] == "complete"
    listed = {f["path"] for f in run["files"]}
    assert {PREDICTIONS, "objects.parquet", "objects.geojson", "preview.png"} <= listed
    assert all((result / p).exists() for p in listed)
    assert set(run["objects"]) >= {"nuclei", "tissue"}
    # a second run finds it complete and does nothing
    again = wsimtl("segment", str(svs_jpeg), "-o", str(tmp_path), "--quiet")
    assert again.returncode == 0
    assert json.loads((result / "run.json").read_text())["created"] == run["created"]
    assert run["postprocess"]["overrides"] == {} and run["postprocess"]["settings"]["nuclei_split_h"] > 0  # the model's tuned settings
    # post-processing overrides on a complete result re-derive the objects from the stored maps
    nuclei = sum(run["objects"]["nuclei"].values())
    assert nuclei > 0
    big = wsimtl("segment", str(svs_jpeg), "-o", str(tmp_path), "--quiet", "--postprocess", "nuclei_min_area_px=100000", "--postprocess", "nuclei_split_h=0")
    assert big.returncode == 0, big.stderr
    bigger = json.loads((result / "run.json").read_text())
    assert bigger["created"] == run["created"] and bigger["status"] == "complete"  # no network pass
    assert sum(bigger["objects"].get("nuclei", {}).values()) == 0
    assert bigger["postprocess"]["overrides"] == {"nuclei_min_area_px": 100000.0, "nuclei_split_h": 0.0}
    assert bigger["postprocess"]["settings"]["nuclei_min_area_px"] == 100000.0
    # `export` takes them too; without any, the model's own settings come back
    cut = wsimtl("export", str(result), "--quiet", "--postprocess", "nuclei_split_h=0")
    assert cut.returncode == 0, cut.stderr
    assert json.loads((result / "run.json").read_text())["postprocess"]["overrides"] == {"nuclei_split_h": 0.0}
    back = wsimtl("segment", str(svs_jpeg), "-o", str(tmp_path), "--quiet")
    assert back.returncode == 0, back.stderr
    restored = json.loads((result / "run.json").read_text())
    assert restored["objects"] == run["objects"] and restored["postprocess"] == run["postprocess"]


@pytest.mark.slow
def test_background_tiles_are_not_computed(he_image, tmp_path):
    image = np.concatenate([he_image[256:768, 512:1024], np.full((512, 1024, 3), 248, np.uint8)], axis=1)
    slide = synthetic.write_svs(tmp_path / "half.svs", image, mpp=0.25, compression="jpeg", tile=256, levels=(1, 4))
    proc = wsimtl("segment", str(slide), "-o", str(tmp_path / "out"), "--no-objects", *FAST)
    assert proc.returncode == 0, proc.stderr
    run = json.loads((tmp_path / "out" / "half" / "run.json").read_text())
    assert run["tiles"]["total"] == 3 and run["tiles"]["with_tissue"] == 1
    nuclei = zarr.open_group(tmp_path / "out" / "half" / PREDICTIONS, mode="r")["Nuclei-INST"]["0"][:]
    assert nuclei[:, :, :256].sum(axis=0).min() > 0 and nuclei[:, :, 256:].max() == 0


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _blank_slide(path: Path) -> Path:
    return synthetic.write_svs(path, np.full((512, 512, 3), 250, np.uint8), mpp=0.25, compression="jpeg", tile=256, levels=(1, 4))


@pytest.mark.parametrize(
    "make,fragments",
    [
        (lambda d: d / "missing.svs", ("missing.svs",)),
        (lambda d: d, ("directory",)),
        (lambda d: _write(d / "empty.svs", b""), ("empty.svs",)),
        (lambda d: _write(d / "notes.svs", b"not a slide\n" * 100), ("notes.svs",)),
        (lambda d: _write(d / "data.xyz", os.urandom(4096)), ("data.xyz",)),
    ],
    ids=["missing", "directory", "empty", "text", "unsupported"],
)
def test_bad_slide_gives_one_line_error(make, fragments, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    target = make(src)
    out = tmp_path / "out"
    proc = wsimtl("segment", str(target), "-o", str(out), *FAST)
    assert_one_line_error(proc, *fragments)
    assert not any(out.rglob(PREDICTIONS)) if out.exists() else True


def test_truncated_slide(svs_jpeg, truncate_slide, tmp_path):
    bad = truncate_slide(svs_jpeg, tmp_path / "cut.svs", fraction=0.5)
    proc = wsimtl("segment", str(bad), "-o", str(tmp_path / "out"), *FAST)
    assert_one_line_error(proc, "cut.svs")
    assert_nothing_finished(tmp_path / "out" / "cut")


def test_missing_mpp(tmp_path, he_image):
    from PIL import Image

    png = tmp_path / "tile.png"
    Image.fromarray(he_image[:256, :256]).save(png)
    proc = wsimtl("segment", str(png), "-o", str(tmp_path / "out"), *FAST)
    assert_one_line_error(proc, "--mpp")


def test_no_tissue(tmp_path):
    blank = _blank_slide(tmp_path / "blank.svs")
    proc = wsimtl("segment", str(blank), "-o", str(tmp_path / "out"), *FAST)
    assert_one_line_error(proc, "no tissue", "--no-tissue-mask")
    assert_nothing_finished(tmp_path / "out" / "blank")


def test_unwritable_output(svs_jpeg, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = wsimtl("segment", str(svs_jpeg), "-o", str(blocker / "sub"), *FAST)
    assert_one_line_error(proc, "file")


def test_wrong_model_path(svs_jpeg, tmp_path):
    proc = wsimtl("segment", str(svs_jpeg), "-o", str(tmp_path), "--model", str(tmp_path / "nope"), *FAST)
    assert_one_line_error(proc, "nope")


def test_mismatching_weights(svs_jpeg, tmp_path):
    from safetensors.torch import load_file, save_file

    from wsi_mtl.network import create_model, save_model

    folder = tmp_path / "model"
    save_model(create_model("wsimtl_small", seed=1), folder, trained=False)
    weights = load_file(folder / "weights.safetensors")
    key = sorted(weights)[3]
    weights[key] = weights[key][..., :1].contiguous() if weights[key].ndim else weights[key]
    save_file(weights, folder / "weights.safetensors")
    proc = wsimtl("segment", str(svs_jpeg), "-o", str(tmp_path / "out"), "--model", str(folder), *FAST)
    assert_one_line_error(proc, key)


@pytest.mark.parametrize(("setting", "fragment"), [("nuclei_split=1", "unknown post-processing setting 'nuclei_split'"),
                                                    ("nuclei_split_h", "KEY=VALUE"),
                                                    ("nuclei_split_h=-1", "finite number >= 0"),
                                                    ("gland_halo_px=1.5", "whole number")])
def test_bad_postprocess_setting_fails_before_the_network_runs(svs_jpeg, tmp_path, setting, fragment):
    proc = wsimtl("segment", str(svs_jpeg), "-o", str(tmp_path), "--quiet", "--postprocess", setting)
    assert_one_line_error(proc, fragment)
    assert not (tmp_path / svs_jpeg.stem).exists()


def test_neither_slide_nor_sample(tmp_path):
    proc = wsimtl("segment", "-o", str(tmp_path))
    assert_one_line_error(proc, "--sample")


@pytest.mark.slow
def test_damaged_tile_is_listed_in_run_json(svs_jpeg, damage_slide, tmp_path):
    bad = tmp_path / "damaged.svs"
    box = damage_slide(svs_jpeg, bad, level=0, tile_index=5)
    proc = wsimtl("segment", str(bad), "-o", str(tmp_path / "out"), "--no-objects", "--no-tissue-mask", *FAST)
    assert proc.returncode == 0, proc.stderr
    run = json.loads((tmp_path / "out" / "damaged" / "run.json").read_text())
    assert run["status"] == "complete"
    assert run["damaged_regions"], "the damaged tile must be reported"
    x, y, w, h = box
    region = run["damaged_regions"][0]
    # the reported region (a network input tile) overlaps the damaged slide tile
    assert region["x"] < x + w and x < region["x"] + region["width"]
    assert region["y"] < y + h and y < region["y"] + region["height"]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_outputs(he_image, tmp_path):
    svs_jpeg = synthetic.write_svs(tmp_path / "small.svs", he_image[256:768, 512:1024], mpp=0.25, compression="jpeg", tile=256, levels=(1, 4))
    args = ["--no-objects", "--tile-size", "64", "--margin", "32", "--batch-size", "1", "--quiet"]
    straight = wsimtl("segment", str(svs_jpeg), "-o", str(tmp_path / "a"), *args)
    assert straight.returncode == 0, straight.stderr

    out = tmp_path / "b"
    log = out / svs_jpeg.stem / (PREDICTIONS + ".partial") / "tiles_done.log"
    proc = subprocess.Popen([sys.executable, "-m", "wsi_mtl", "segment", str(svs_jpeg), "-o", str(out), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= 5:
            break
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be killed")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert_nothing_finished(out / svs_jpeg.stem)
    done_before = len(log.read_text().splitlines())

    resumed = wsimtl("segment", str(svs_jpeg), "-o", str(out), *args)
    assert resumed.returncode == 0, resumed.stderr
    run = json.loads((out / svs_jpeg.stem / "run.json").read_text())
    assert run["tiles"]["resumed"] >= done_before - 1 >= 4
    a = zarr.open_group(tmp_path / "a" / svs_jpeg.stem / PREDICTIONS, mode="r")
    b = zarr.open_group(out / svs_jpeg.stem / PREDICTIONS, mode="r")
    maps = [name for name in a.group_keys() if "0" in a[name]]  # the image groups (not OME metadata groups)
    assert "Nuclei-INST" in maps and "tissue_mask" in maps
    for name in maps:
        np.testing.assert_array_equal(a[name]["0"][:], b[name]["0"][:], err_msg=name)

"""`wsimtl evaluate --tiles`: a user's own labelled tiles."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from wsi_mtl.cli import cli, main

REPO = Path(__file__).resolve().parents[1]


def _tile_dir(root: Path, n: int = 2, size: int = 96, mismatch: bool = False, noise: float = 0.0) -> Path:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        lab = np.zeros((size, size), np.uint16)
        for k in range(1, 8):
            cy, cx = rng.uniform(8, size - 8, 2)
            lab[((yy - cy) ** 2 + (xx - cx) ** 2 <= 25) & (lab == 0)] = k
        img = np.full((size, size, 3), (235, 180, 210), np.uint8)
        img[lab > 0] = (70, 40, 120)
        if noise:  # a harder image, on which the views of test-time augmentation disagree
            img = np.clip(img + rng.normal(0, noise, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"t{i}.png")
        Image.fromarray(lab[: size - 1] if mismatch and i == 0 else lab).save(root / "labels" / f"t{i}.png")
    return root


def test_nuclei_tiles_are_scored(tmp_path):
    tiles = _tile_dir(tmp_path / "tiles")
    out = tmp_path / "m.json"
    res = CliRunner().invoke(cli, ["evaluate", "--tiles", str(tiles), "--task", "nuclei", "--mpp", "0.5", "--metrics", str(out), "-q", "--per-image"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["nuclei"]["n_images"] == 2 and set(data["images"]) == {"nuclei/t0", "nuclei/t1"}
    # seven well separated dark discs per tile: the shipped model finds them (measured: dice 1.0, AJI 0.91, one merge)
    assert data["nuclei"]["errors"]["n_true"] == 14 and [v["errors"]["n_true"] for v in data["images"].values()] == [7, 7]
    assert data["nuclei"]["dice"] > 0.95 and data["nuclei"]["aji"] > 0.8 and data["nuclei"]["pq"] > 0.8
    assert "glands" not in data and data["mpp"] == 0.5


def test_tta_is_applied_and_recorded(tmp_path, monkeypatch):
    import wsi_mtl.train._evaluate as evaluate_module

    real = evaluate_module.predict_tta
    calls: list[int] = []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("views", 1))
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "predict_tta", spy)
    tiles = _tile_dir(tmp_path / "tiles", noise=60.0)
    scores = {}
    for views in ("1", "8"):
        calls.clear()
        out = tmp_path / f"m{views}.json"
        res = CliRunner().invoke(cli, ["evaluate", "--tiles", str(tiles), "--task", "nuclei", "--mpp", "0.5", "--metrics", str(out), "-q", "--tta", views],
                                 catch_exceptions=False)
        assert res.exit_code == 0, res.output
        data = json.loads(out.read_text())
        assert data["tta"] == int(views)
        assert len(calls) == 2 and set(calls) == {int(views)}  # one prediction per tile, with that many views
        scores[views] = data["nuclei"]
    # the averaged maps give other objects (measured on these noisy tiles: AJI 0.80 with one view, 0.74 with eight)
    assert abs(scores["1"]["aji"] - scores["8"]["aji"]) > 0.01
    res = CliRunner().invoke(cli, ["evaluate", "--tiles", str(tiles), "--task", "nuclei", "--mpp", "0.5", "--tta", "3"])
    assert res.exit_code == 2 and "--tta" in res.output


def test_postprocess_overrides_are_applied_and_recorded(tmp_path, capsys):
    tiles = _tile_dir(tmp_path / "tiles")
    got = {}
    for name, extra in (("own", []), ("huge", ["--postprocess", "nuclei_min_area_px=100000"])):
        out = tmp_path / f"{name}.json"
        res = CliRunner().invoke(cli, ["evaluate", "--tiles", str(tiles), "--task", "nuclei", "--mpp", "0.5", "--metrics", str(out), "-q", *extra],
                                 catch_exceptions=False)
        assert res.exit_code == 0, res.output
        got[name] = json.loads(out.read_text())
    assert "postprocess_overrides" not in got["own"] and got["huge"]["postprocess_overrides"] == {"nuclei_min_area_px": 100000.0}
    assert got["own"]["nuclei"]["errors"]["n_pred"] > 0 and got["huge"]["nuclei"]["errors"]["n_pred"] == 0  # every object is now too small
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--tiles", str(tiles), "--task", "nuclei", "--mpp", "0.5", "--postprocess", "nuclei_min_areas=3"])
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown post-processing setting 'nuclei_min_areas'" in err[0]


def test_tissue_tiles_need_known_labels(tmp_path):
    root = tmp_path / "tissue"
    root.mkdir()
    for i, label in enumerate(["lung_aca", "lung_n", "lung_scc"]):
        Image.fromarray(np.full((64, 64, 3), 60 * i + 40, np.uint8)).save(root / f"{i}.png")
    with open(root / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "label"])
        w.writerows([["0.png", "lung_aca"], ["1.png", "lung_n"], ["2.png", "lung_scc"]])
    out = tmp_path / "m.json"
    res = CliRunner().invoke(cli, ["evaluate", "--tiles", str(root), "--task", "tissue", "--head", "Patch-LC25000", "--mpp", "1.0", "--metrics", str(out), "-q"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    t = json.loads(out.read_text())["tissue"]["tiles"]
    assert t["n_images"] == 3 and np.array(t["confusion"]).sum() == 3
    with open(root / "labels.csv", "a", newline="") as fh:
        fh.write("0.png,lung_xyz\n")
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--tiles", str(root), "--task", "tissue", "--head", "Patch-LC25000", "--mpp", "1.0", "-q"])
    assert exc.value.code == 2


@pytest.mark.parametrize("args", [
    ["--task", "nuclei"],  # no --mpp
    ["--mpp", "0.5"],  # no --task
    ["--task", "tissue", "--mpp", "0.5"],  # no --head
])
def test_missing_options_are_one_line_errors(tmp_path, capsys, args):
    tiles = _tile_dir(tmp_path / "tiles", n=1)
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--tiles", str(tiles), "-q", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("wsimtl: error:")


def test_label_map_of_another_size_is_refused(tmp_path, capsys):
    tiles = _tile_dir(tmp_path / "tiles", mismatch=True)
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--tiles", str(tiles), "--task", "glands", "--mpp", "0.62", "-q"])
    assert exc.value.code == 2
    assert "label map of t0" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.shared_data
def test_tiles_give_the_same_scores_as_the_split(shared_data, tmp_path):
    """A validation image copied into the tiles layout scores exactly as through the split."""
    from wsi_mtl.network import load_model
    from wsi_mtl.train import evaluate_split, load_split

    name = "TCGA-A7-A13E-01Z-00-DX1"
    base = shared_data / "nuclei" / "monuseg"
    row = next(r for r in csv.DictReader(open(base / "manifest.csv")) if r["name"] == name)
    tiles = tmp_path / "tiles"
    (tiles / "images").mkdir(parents=True)
    (tiles / "labels").mkdir()
    shutil.copy(base / row["image"], tiles / "images" / (name + Path(row["image"]).suffix))
    shutil.copy(base / row["instance_mask"], tiles / "labels" / (name + ".png"))
    out = tmp_path / "m.json"
    res = CliRunner().invoke(cli, ["evaluate", "--tiles", str(tiles), "--task", "nuclei", "--mpp", "0.25", "--metrics", str(out), "-q"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    got = json.loads(out.read_text())["nuclei"]
    ref = evaluate_split(load_model("wsimtl-small"), data_root=shared_data, split=load_split(REPO / "configs" / "splits" / "validation.yaml"),
                         tasks=["nuclei"], only={"monuseg": [name]})["nuclei"]
    for k in ("dice", "aji", "pq"):
        assert got[k] == pytest.approx(ref[k], abs=1e-9), k

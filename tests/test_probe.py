"""Linear probes: fitting, folds, cross-validation, labels files, the CLI, and the saved head in ``embed``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from wsi_mtl.embed import read_probe
from wsi_mtl.errors import InputError
from wsi_mtl.probe import cross_validate, fit_linear, load_labels, stratified_folds


def _blobs(n: int = 40, d: int = 6, shift: float = 3.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), n)
    X = rng.normal(0, 1, (3 * n, d)) + shift * np.eye(3, d)[y] + 50.0  # offset: standardisation matters
    return X, y


@pytest.mark.parametrize("kind", ["logreg", "svm"])
def test_fit_separates_blobs_and_regularisation_shrinks(kind: str) -> None:
    X, y = _blobs()
    head = fit_linear(X, y, ["a", "b", "c"], kind=kind)
    assert (head.probabilities(X).argmax(1) == y).mean() >= 0.95
    assert np.allclose(head.probabilities(X).sum(1), 1.0)
    weak = fit_linear(X, y, ["a", "b", "c"], kind=kind, C=1e-3)
    assert np.abs(weak.weight).sum() < 0.5 * np.abs(head.weight).sum()


def test_folds_are_a_stratified_partition() -> None:
    y = np.array([0] * 10 + [1] * 7 + [2] * 5)
    folds = stratified_folds(y, 5, seed=1)
    together = np.concatenate(folds)
    assert sorted(together.tolist()) == list(range(len(y)))
    for f in folds:
        assert set(y[f]) == {0, 1, 2}
        assert len(f) in (4, 5)


def test_cross_validation_tells_signal_from_noise() -> None:
    X, y = _blobs(n=30)
    good = cross_validate(X, y, ["a", "b", "c"], folds=5)
    assert good["accuracy"] >= 0.9 and good["macro_f1"] >= 0.9 and len(good["per_fold"]) == 5
    noise = cross_validate(np.random.default_rng(5).normal(size=X.shape), y, ["a", "b", "c"], folds=5)
    assert noise["accuracy"] < 0.6
    with pytest.raises(InputError, match="at least 5 examples"):
        cross_validate(X[:8], np.array([0] * 4 + [1] * 4), ["a", "b"], folds=5)


def test_labels_columns_found_or_named(tmp_path: Path) -> None:
    k = tmp_path / "kather.csv"
    k.write_text("file,label_index,label_name_assumed_tfds_order\na.png,0,tumor\nb.png,6,adipose\n")
    assert load_labels(k) == {"a.png": "tumor", "b.png": "adipose"}
    assert load_labels(k, label_column="label_index") == {"a.png": "0", "b.png": "6"}
    g = tmp_path / "glas.csv"
    g.write_text("name,split,image,grade_glas\nt1,train,images/t1.png,benign\nt2,train,images/t2.png,malignant\n")
    assert load_labels(g, key_column="image") == {"images/t1.png": "benign", "images/t2.png": "malignant"}
    with pytest.raises(InputError, match="no column 'nope'"):
        load_labels(g, label_column="nope")
    one = tmp_path / "one.csv"
    one.write_text("file,label\na,x\nb,x\n")
    with pytest.raises(InputError, match="two classes"):
        load_labels(one)


def _image_set(folder: Path, n: int = 10) -> Path:
    """Two classes told apart by colour: pink H&E-like texture vs mostly white background."""
    from PIL import Image

    from wsi_mtl.synthetic import make_he_texture

    folder.mkdir()
    rows = ["file,label"]
    for i in range(n):
        tex = make_he_texture(96, 96, seed=i, tissue_fraction=0.95)
        white = np.full((96, 96, 3), 240, np.uint8)
        white[40:56, 40:56] = tex[40:56, 40:56]
        for label, img in (("tissue", tex), ("glass", white)):
            Image.fromarray(img).save(folder / f"{label}_{i}.png")
            rows.append(f"{label}_{i}.png,{label}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.mark.slow
def test_cli_probe_then_embed_applies_it(tmp_path: Path, svs_jpeg: Path, capsys) -> None:
    from wsi_mtl.cli import main
    from wsi_mtl.embed import embed_slide, load_encoder

    images = _image_set(tmp_path / "imgs")
    out = tmp_path / "glass.probe.json"
    main(["probe", str(images), "--labels", str(images / "labels.csv"), "-o", str(out), "--precision", "fp32", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 20 and report["classes"] == ["glass", "tissue"] and report["accuracy"] >= 0.9
    head = read_probe(out)
    assert head.name == "glass" and head.weight.shape == (2, 192)
    res = embed_slide(svs_jpeg, tmp_path / "o", probes=[out], device="cpu", precision="fp32", progress=False)
    table = pd.read_parquet(res.result_dir / "patches.parquet")
    feats = zarr.open_group(str(res.result_dir / "embeddings.zarr"), mode="r")["features"][:]
    assert np.allclose(table[["p_glass_glass", "p_glass_tissue"]].to_numpy(), head.probabilities(feats), atol=1e-6)
    assert "glass" in load_encoder(None, probes=[out]).head_classes

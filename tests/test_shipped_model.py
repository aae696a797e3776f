"""The shipped wsimtl-small weights: they load, are marked trained, and reproduce their stored scores."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from wsi_mtl.network import load_model

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "models" / "wsimtl-small"
DATA = Path(os.environ.get("WSIMTL_DATA", REPO.parent / "shared" / "data"))

pytestmark = pytest.mark.skipif(not (MODEL_DIR / "weights.safetensors").exists(), reason="no shipped weights in models/wsimtl-small")


def test_shipped_weights_load_and_are_trained():
    model = load_model("wsimtl-small")
    assert model.config.name == "wsimtl-small"
    assert model.config.trained is True
    assert model.config.weights_sha256
    assert (MODEL_DIR / "weights.safetensors").stat().st_size <= 30 * 1024 * 1024
    assert (MODEL_DIR / "MODEL_CARD.md").exists()
    assert {"Nuclei-INST", "Gland-INST", "Lumen-INST", "Nuclei-TYPE", "Patch-Class", "Patch-LC25000", "Patch-GlaS"} <= set(model.config.heads)


@pytest.mark.slow
@pytest.mark.shared_data
@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is absent (set WSIMTL_DATA)")
def test_shipped_weights_reproduce_stored_scores():
    from wsi_mtl.train import load_split, reference_metrics

    expected = json.loads((MODEL_DIR / "expected_metrics.json").read_text())
    model = load_model("wsimtl-small")
    got = reference_metrics(model, data_root=DATA, split=load_split(REPO / "configs" / "splits" / "validation.yaml"), images=expected["images"])
    assert set(got["per_image"]) == set(expected["per_image"])
    for key, scores in expected["per_image"].items():
        for name, value in scores.items():
            if isinstance(value, dict):  # error counts: a pixel flipped by another CPU's rounding may move one
                assert got["per_image"][key][name] == pytest.approx(value, abs=3), (key, name)
            elif isinstance(value, bool) or value is None:
                assert got["per_image"][key][name] == value, (key, name)
            elif name == "object_hausdorff":
                assert got["per_image"][key][name] == pytest.approx(value, rel=0.05, abs=1.0), (key, name)
            else:
                assert got["per_image"][key][name] == pytest.approx(value, abs=0.01), (key, name)

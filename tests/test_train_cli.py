"""``wsimtl train`` and ``wsimtl evaluate`` end to end on a tiny fake copy of the data layout."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from test_train_loop import _fake_data, _write_config

from wsi_mtl.cli import cli
from wsi_mtl.network import load_model
from wsi_mtl.train import evaluate_split, load_config, load_split


@pytest.mark.slow
def test_train_then_evaluate_cli(tmp_path):
    _fake_data(tmp_path / "data")
    config = _write_config(tmp_path, "run", steps=2)
    runner = CliRunner()
    res = runner.invoke(cli, ["train", str(config), "-q"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "trained to step 2" in res.output
    model_dir = tmp_path / "run" / "model"
    assert (model_dir / "weights.safetensors").exists()
    assert json.loads((model_dir / "config.json").read_text())["trained"] is True

    out = tmp_path / "metrics.json"
    res = runner.invoke(cli, ["evaluate", "--model", str(model_dir), "--config", str(config), "--metrics", str(out), "-q", "--precision", "fp32",
                              "--task", "nuclei,glands,tissue"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "aji" in res.output and "lc25000" in res.output
    data = json.loads(out.read_text())
    assert data["trained"] is True and data["nuclei"]["n_images"] == 1 and data["glands"]["n_images"] == 1
    assert data["tissue"]["lc25000"]["n_images"] == 3 and "nuclei_type" not in data
    # the command scores what the library scores for the same model, split and settings
    cfg = load_config(config)
    direct = evaluate_split(load_model(model_dir), data_root=cfg.data_root, split=load_split(cfg.splits), source_mpp=cfg.source_mpp,
                            tasks=["nuclei", "glands", "tissue"], bf16=False, progress=False)
    for task in ("nuclei", "glands"):
        for key, value in direct[task].items():
            if isinstance(value, float):
                assert data[task][key] == pytest.approx(value, abs=1e-12, nan_ok=True), (task, key)
    assert data["tissue"]["lc25000"]["accuracy"] == pytest.approx(direct["tissue"]["lc25000"]["accuracy"])
    # --json prints the same metrics on stdout instead of the table
    res = runner.invoke(cli, ["evaluate", "--model", str(model_dir), "--config", str(config), "--json", "-q", "--precision", "fp32",
                              "--task", "nuclei"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["nuclei"]["aji"] == pytest.approx(data["nuclei"]["aji"], abs=1e-12)


def test_cli_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("bogus: 1\n")
    runner = CliRunner()
    res = runner.invoke(cli, ["train", str(bad)])
    assert res.exit_code != 0
    from wsi_mtl.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", str(bad)])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--config", str(bad)])
    assert exc.value.code == 2

"""``wsimtl train`` and ``wsimtl evaluate`` end to end on a tiny fake copy of the data layout."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from test_train_loop import _fake_data, _write_config

from wsi_mtl.cli import cli


@pytest.mark.slow
def test_train_then_evaluate_cli(tmp_path):
    _fake_data(tmp_path / "data")
    config = _write_config(tmp_path, "run", steps=2)
    runner = CliRunner()
    res = runner.invoke(cli, ["train", str(config), "--no-progress"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "trained to step 2" in res.output
    model_dir = tmp_path / "run" / "model"
    assert (model_dir / "weights.safetensors").exists()
    assert json.loads((model_dir / "config.json").read_text())["trained"] is True

    out = tmp_path / "metrics.json"
    res = runner.invoke(cli, ["evaluate", "--model", str(model_dir), "--config", str(config), "--json", str(out), "--no-progress", "--no-bf16",
                              "--tasks", "nuclei,glands,tissue"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "aji" in res.output and "lc25000" in res.output
    data = json.loads(out.read_text())
    assert data["trained"] is True and data["nuclei"]["n_images"] == 1 and data["glands"]["n_images"] == 1
    assert data["tissue"]["lc25000"]["n_images"] == 3 and "nuclei_type" not in data
    assert 0.0 <= data["nuclei"]["aji"] <= 1.0


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

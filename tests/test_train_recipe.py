"""Training recipes (``wsimtl train RECIPE``): stages in order, state records, skipping, resuming,
``--stage``, one-line errors; and the shipped recipe's stages chain into the shipped network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from test_train_loop import _fake_data, _write_config

from wsi_mtl.cli import cli, main
from wsi_mtl.errors import InputError
from wsi_mtl.network.io import file_sha256
from wsi_mtl.train import load_config
from wsi_mtl.train._recipe import RECIPE_STATE, load_recipe, run_recipe

REPO = Path(__file__).resolve().parents[1]


def _write_recipe(tmp: Path, stages: list[dict] | None = None, **shared) -> Path:
    """A tiny three-stage recipe over the fake data: whole network, nuclei decoder, re-tune only."""
    base = json.loads(_write_config(tmp, "r", steps=2).read_text())
    base.update({"run_dir": "runs/r", "output_model": "shipped"}, **shared)
    base["stages"] = stages if stages is not None else [
        {"name": "s1", "tune_postprocess": True, "tune_images": {"nuclei": 2, "gland": 0}},
        {"name": "s2", "seed": 6, "trainable": ["decoder_head.Nuclei", "output_head.Nuclei"], "schedule": ["nuclei"]},
        {"name": "tune", "tune_only": True, "tune_images": {"nuclei": 2, "gland": 0}, "tune_sources": {"nuclei": ["monuseg"]}},
    ]
    path = tmp / "configs" / "recipe.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def _state(tmp: Path) -> dict:
    return json.loads((tmp / "runs" / "r" / RECIPE_STATE).read_text())


@pytest.mark.slow
def test_recipe_runs_every_stage_records_them_and_skips_them_on_rerun(tmp_path):
    _fake_data(tmp_path / "data")
    path = _write_recipe(tmp_path)
    (tmp_path / "shipped").mkdir()
    (tmp_path / "shipped" / "MODEL_CARD.md").write_text("card")  # the shipped folder's other files stay
    runner = CliRunner()
    res = runner.invoke(cli, ["train", str(path), "-q"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "3 of 3 stages done" in res.output
    assert (tmp_path / "shipped" / "MODEL_CARD.md").read_text() == "card"
    runs = tmp_path / "runs" / "r"
    state = _state(tmp_path)
    assert state["order"] == ["s1", "s2", "tune"]
    for name in ("s1", "s2"):
        rec = state["stages"][name]
        assert rec["status"] == "done" and rec["steps"] == 2 and rec["minutes"] >= 0 and rec["attempts"] == 1  # minutes to 0.01: a tiny stage may round to 0
        assert rec["validation"]["step"] == 2 and "score" in rec["validation"] and "aji" in rec["validation"]["nuclei"]
        assert rec["started"] <= rec["ended"]
    assert state["stages"]["s2"]["init_from"] == str(runs / "s1" / "model")
    assert json.loads((runs / "s2" / "checkpoint.pt").with_name("config.json").read_text())["init_from"] == str(runs / "s1" / "model")
    tune = state["stages"]["tune"]
    assert tune["status"] == "done" and tune["init_from"] == str(runs / "s2" / "model") and "tuning_scores" in tune
    # the last stage wrote the shipped folder: stage 2's weights, re-tuned on monuseg only
    shipped = tmp_path / "shipped"
    assert file_sha256(shipped / "weights.safetensors") == file_sha256(runs / "s2" / "model" / "weights.safetensors")
    training = json.loads((shipped / "config.json").read_text())["extra"]["training"]
    assert training["postprocess_tuning"]["sources"] == {"nuclei": ["monuseg"]}
    assert "nuclei_split_h" in json.loads((shipped / "config.json").read_text())["extra"]["postprocess"]
    assert "tuning_scores" in state["stages"]["s1"] and "tuning_scores" not in state["stages"]["s2"]  # s2 does not tune
    assert training["config"] == "wsimtl-small:s2" and training["earlier"][-1]["config"] == "wsimtl-small:s1"
    assert state["total_minutes"] == pytest.approx(sum(r["minutes"] for r in state["stages"].values()), abs=0.02)

    # a rerun trains nothing
    mtime = (runs / "s1" / "checkpoint.pt").stat().st_mtime_ns
    res = runner.invoke(cli, ["train", str(path), "-q"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert res.output.count("skipped") == 3
    assert (runs / "s1" / "checkpoint.pt").stat().st_mtime_ns == mtime
    assert all(r["attempts"] == 1 for r in _state(tmp_path)["stages"].values())

    # a finished stage whose starting weights changed since is an error, not a silent skip
    (runs / "s1" / "model" / "weights.safetensors").write_bytes(b"other weights")
    with pytest.raises(SystemExit) as exc:
        main(["train", str(path), "-q"])
    assert exc.value.code == 2


@pytest.mark.slow
def test_an_interrupted_stage_resumes_from_its_checkpoint(tmp_path):
    _fake_data(tmp_path / "data")
    path = _write_recipe(tmp_path)
    straight = load_recipe(path, run_dir=str(tmp_path / "runs" / "straight"))
    run_recipe(straight, stage="s1", progress=False)
    assert json.loads((tmp_path / "runs" / "straight" / RECIPE_STATE).read_text())["stages"].keys() == {"s1"}  # --stage: that stage only

    recipe = load_recipe(path)
    state = run_recipe(recipe, max_minutes=1e-6, progress=False)  # stops after the first step of s1
    assert state["stages"]["s1"]["status"] == "interrupted" and "s2" not in state["stages"]
    assert torch.load(tmp_path / "runs" / "r" / "s1" / "checkpoint.pt", weights_only=True)["step"] == 1
    assert not (tmp_path / "runs" / "r" / "s1" / "model").exists()
    state = run_recipe(recipe, stage="s1", progress=False)
    rec = state["stages"]["s1"]
    assert rec["status"] == "done" and rec["attempts"] == 2 and rec["steps"] == 2
    a = torch.load(tmp_path / "runs" / "straight" / "s1" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "runs" / "r" / "s1" / "checkpoint.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize(
    ("stages", "match"),
    [
        ([{"name": "a", "bogus": 1}], "stage 'a' has unknown keys \\['bogus'\\]"),
        ([{"name": "a", "run_dir": "x"}], "unknown keys \\['run_dir'\\]"),
        ([{"name": "a"}, {"name": "a"}], "two stages are called 'a'"),
        ([{"steps": 3}], "needs a name"),
        ([{"name": "a", "schedule": ["dance"]}], "stage 'a': training config: schedule"),
        ([{"name": "a", "tune_only": True}], "tune_only stage needs a model"),
        ([], "non-empty list"),
    ],
)
def test_bad_recipes_are_rejected_before_anything_runs(tmp_path, stages, match):
    with pytest.raises(InputError, match=match):
        load_recipe(_write_recipe(tmp_path, stages))
    assert not (tmp_path / "runs").exists()


def test_cli_errors_are_one_line(tmp_path, capsys):
    path = _write_recipe(tmp_path)
    for args, text in (
        (["--stage", "s2"], "run stage 's1' first"),  # the previous stage's output does not exist yet
        (["--stage", "nope"], "no stage 'nope'"),
        (["--export-only"], "for a single run, not a recipe"),  # a usage error: click adds the usage lines
    ):
        with pytest.raises(SystemExit) as exc:
            main(["train", str(path), "-q", *args])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith(("Usage:", "Try "))]
        assert exc.value.code == 2 and len(err) == 1 and text in err[0], err
    assert not (tmp_path / "runs" / "r" / "s2").exists()
    bad = _write_recipe(tmp_path, [{"name": "a", "bogus": 1}])
    with pytest.raises(SystemExit) as exc:
        main(["train", str(bad)])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "unknown keys ['bogus']" in err and len(err.splitlines()) == 1
    plain = _write_config(tmp_path, "plain", steps=1)
    res = CliRunner().invoke(cli, ["train", str(plain), "--stage", "s1"])
    assert res.exit_code == 2 and "--stage is for recipes" in res.output
    # load_config reads a recipe's shared settings (what `wsimtl evaluate --config` needs)
    assert load_config(path).run_dir == tmp_path / "runs" / "r"


def test_shipped_recipe_chains_its_stages_into_the_shipped_network():
    """configs/wsimtl-small.yaml: the shipped model's stages in order, each from the one before,
    the last writing models/wsimtl-small; the networks they build, in turn, have the shipped
    model's tensors (the patch-head pools, chosen by data at export, aside)."""
    from wsi_mtl.network import create_model
    from wsi_mtl.train._loop import _initial_config, _read_initial, load_initial_weights

    recipe = load_recipe(REPO / "configs" / "wsimtl-small.yaml")
    names = [s.name for s in recipe.stages]
    assert names == ["stage1", "stage2", "stage4", "stage5", "stage6", "stage7", "stage8", "stage9", "stage11", "retune12",
                     "stage14", "stage14b", "stage15", "stage15b", "stage15e", "stage16b", "stage16c", "stage18", "stage19"]
    assert recipe.output_model == REPO / "models" / "wsimtl-small" and recipe.stages[-1].config.output_model == recipe.output_model
    assert recipe.stage("retune12").tune_only and recipe.stages[0].config.init_from is None
    for prev, s in zip(recipe.stages[:-1], recipe.stages[1:]):
        if s.name not in ("stage15e", "stage19"):
            assert s.config.init_from == prev.config.output_model == recipe.run_dir / prev.name / "model"
    averaged = recipe.stage("stage15e")  # stage 14b's network averaged with stage 15b's
    assert averaged.tune_only and averaged.config.init_from == recipe.run_dir / "stage14b" / "model"
    assert averaged.config.average_with == {"model": recipe.run_dir / "stage15b" / "model", "weight": 0.5}
    refit = recipe.stage("stage16b")  # stage 15e's tissue head refit with GlaS gland cells; glands placed in its map
    assert refit.tune_only and refit.config.refit_patch_heads and refit.config.refit_heads == ("Patch-Class",)
    assert refit.config.refit_gland_cells == 0.75 and refit.config.postprocess == {"gland_max_nonglandular": 0.8}
    assert not any(int(n) for n in refit.config.tune_images.values())
    setting = recipe.stage("stage16c")  # the cross-fitted setting over stage 16b's weights
    assert setting.tune_only and not setting.config.refit_patch_heads
    assert setting.config.postprocess == {"gland_max_nonglandular": 0.5} and not any(int(n) for n in setting.config.tune_images.values())
    last = recipe.stages[-1]  # stage 19: stage 16c's network averaged with stage 18's (its gland decoders trained on)
    assert last.name == "stage19" and last.tune_only and last.config.init_from == recipe.run_dir / "stage16c" / "model"
    assert last.config.average_with == {"model": recipe.run_dir / "stage18" / "model", "weight": 0.5}
    assert last.config.tune_images["gland"] == 24 and not int(last.config.tune_images["nuclei"])
    assert sum(s.config.time_budget_minutes or 0 for s in recipe.stages) == 455 + 45 + 18 + 55 + 25 + 45
    state = None
    for s in recipe.stages:
        if s.tune_only:
            continue
        model = create_model(_initial_config(s.config, state), seed=0)
        if state is not None:
            load_initial_weights(model, s.config.init_from, initial=(state, 0))
        for name in s.config.trainable:
            model.get_submodule(name)
        state = model.state_dict()
    shipped = REPO / "models" / "wsimtl-small"
    if not (shipped / "weights.safetensors").is_file():
        pytest.skip("no shipped weights in this checkout")
    ref, _ = _read_initial(shipped)
    ours = {k: tuple(v.shape) for k, v in state.items() if "Patch" not in k}
    theirs = {k: tuple(v.shape) for k, v in ref.items() if "Patch" not in k}
    assert ours == theirs

"""The training config and validation-split loaders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wsi_mtl.errors import InputError
from wsi_mtl.train import SOURCES, TrainConfig, load_config, load_split

REPO = Path(__file__).resolve().parents[1]


def test_shipped_config_and_split_load():
    cfg = load_config(REPO / "configs" / "wsimtl-small.yaml")
    assert isinstance(cfg, TrainConfig)
    from wsi_mtl.devices import cpu_has_bf16

    assert cfg.arch == "wsimtl_small" and cfg.channels_last
    assert cfg.bf16 is cpu_has_bf16()  # bf16: auto
    assert cfg.splits == REPO / "configs" / "splits" / "validation.yaml"
    split = load_split(cfg.splits)
    assert set(split) == set(SOURCES)
    assert len(split["monuseg"]) == 3 and len(split["glas"]) == 15
    assert len(split["lc25000"]) == 225 and len(split["kather2016"]) == 20
    assert len(split["crchistophenotypes"]) == 10


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("wsimtl-small*.yaml")), ids=lambda p: p.stem)
def test_every_stage_config_builds_its_network(path):
    """The configs the model card names parse, and the network each would build (from the shipped
    folder where it fine-tunes one) accepts the weights it starts from. A stage that starts from an
    earlier stage's run folder (``runs/...``, absent from a fresh checkout) is built from the shipped
    folder, whose network is the same."""
    import dataclasses

    from wsi_mtl.network import create_model
    from wsi_mtl.train import load_initial_weights
    from wsi_mtl.train._loop import _initial_config

    cfg = load_config(path)
    if cfg.init_from is not None and "runs" in cfg.init_from.parts and not cfg.init_from.is_dir():
        cfg = dataclasses.replace(cfg, init_from=REPO / "models" / "wsimtl-small")
    model = create_model(_initial_config(cfg), seed=0)
    if cfg.init_from is not None and cfg.init_from.is_dir():
        load_initial_weights(model, cfg.init_from)
    for name in cfg.trainable:
        model.get_submodule(name)  # every trainable module exists
    for field in ("fine_decoders", "private_decoders"):
        assert set(cfg.arch_params.get(field, ())) <= set(getattr(model.config.arch_params, field))


def test_relative_paths_overrides_and_env(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    path = tmp_path / "configs" / "c.json"
    path.write_text(json.dumps({"run_dir": "runs/x", "steps": 7, "schedule": ["nuclei", "cls"]}))
    monkeypatch.delenv("WSIMTL_DATA", raising=False)
    cfg = load_config(path, steps=9, lr=None)
    assert cfg.run_dir == tmp_path / "runs" / "x"
    assert cfg.data_root == tmp_path / "../shared/data"
    assert cfg.steps == 9 and cfg.schedule == ("nuclei", "cls")
    monkeypatch.setenv("WSIMTL_DATA", str(tmp_path))
    assert load_config(path).data_root == tmp_path


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("bogus_key: 1\n", "unknown keys"),
        ("schedule: [seg, dance]\n", "schedule"),
        ("seg_mixture: {cats: 1.0}\n", "unknown tasks"),
        ("cls_mixture: {lc25000: 0}\n", "positive sum"),
        ("seg_crop_px: 100\n", "multiples of 32"),
        ("steps: 0\n", ">= 1"),
        ("scale_range: [1.2, 1.0]\n", "scale_range"),
        ("- a list\n", "mapping"),
        ("steps: [\n", "not valid"),
        ("refit_gland_cells: 1.5\n", "refit_gland_cells"),
        ("postprocess: {gland_wobble: 1}\n", "postprocess: unknown post-processing setting"),
        ("postprocess: [gland_max_nonglandular]\n", "postprocess maps"),
    ],
)
def test_bad_configs_raise_input_error(tmp_path, content, match):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(InputError, match=match):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_split_errors(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("monuseg: [a, a]\n")
    with pytest.raises(InputError, match="duplicate"):
        load_split(p)
    p.write_text("mystery: [a]\n")
    with pytest.raises(InputError, match="unknown sources"):
        load_split(p)
    p.write_text("[1, 2]\n")
    with pytest.raises(InputError, match="mapping"):
        load_split(p)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_auto_follows_the_cpu(tmp_path, monkeypatch, native):
    """``bf16: auto`` turns autocast on only where the CPU has native bf16 (emulated bf16 is slower than fp32)."""
    import wsi_mtl.devices

    monkeypatch.setattr(wsi_mtl.devices, "cpu_has_bf16", lambda: native)
    path = tmp_path / "c.yaml"
    path.write_text("bf16: auto\n")
    assert load_config(path).bf16 is native
    path.write_text("bf16: false\n")
    assert load_config(path).bf16 is False


def test_bf16_rejects_other_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("bf16: fast\n")
    with pytest.raises(InputError, match="bf16 must be true, false or auto, got 'fast'"):
        load_config(path)


@pytest.mark.parametrize("native", [True, False])
def test_evaluation_precision_follows_the_cpu_unless_asked(monkeypatch, native):
    """Evaluation's default (``bf16=None``) autocasts to bf16 only where the CPU computes it natively, as
    ``--precision auto`` does for the CLI, so library and CLI scores agree; an explicit choice is kept."""
    import torch

    import wsi_mtl.train._evaluate as ev

    monkeypatch.setattr(ev, "cpu_has_bf16", lambda: native)
    for asked, on in ((None, native), (True, True), (False, False)):
        with ev._autocast(asked):
            assert torch.is_autocast_enabled("cpu") is on, asked

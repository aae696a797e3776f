"""Tests of wsi_mtl.network: Cerberus compatibility, loading/saving, config, predict contract."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from wsi_mtl.errors import InputError, ModelError
from wsi_mtl.network import (
    ArchParams,
    HeadConfig,
    ModelConfig,
    MultiTaskNet,
    check_state_dict,
    create_model,
    get_model_config,
    list_models,
    load_model,
    read_torch_checkpoint,
    save_model,
)
from wsi_mtl.network import io as net_io
from wsi_mtl.network.model import window_stats
from wsi_mtl.network.registry import cerberus_heads

try:
    from conftest import shared_path
except ImportError:  # tests collected as a package
    from .conftest import shared_path  # type: ignore[no-redef]

REF = shared_path("reference", "cerberus")
TSV = REF / "cerberus_state_dict.tsv"
NPZ = REF / "cerberus_reference_outputs.npz"
needs_ref = pytest.mark.skipif(not (TSV.is_file() and NPZ.is_file()), reason=f"Cerberus reference fixture absent from {REF}")


# ---- helpers ---------------------------------------------------------------------------------
def recipe_state_dict() -> dict[str, torch.Tensor]:
    """Deterministic weights for every key of the Cerberus tsv, by the README recipe."""
    out = {}
    for line in TSV.read_text().splitlines()[1:]:
        key, shape_s, dtype = line.split("\t")
        shape = () if shape_s == "scalar" else tuple(int(v) for v in shape_s.split("x"))
        rng = np.random.default_rng(zlib.crc32(key.encode()))
        if key.endswith("num_batches_tracked"):
            arr = np.zeros(shape)
        elif key.endswith("running_mean"):
            arr = 0.1 * rng.standard_normal(shape)
        elif key.endswith("running_var"):
            arr = 1.0 + 0.5 * rng.random(shape)
        elif len(shape) >= 2:
            arr = rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[1:]))
        elif key.endswith("weight"):
            arr = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            arr = 0.05 * rng.standard_normal(shape)
        out[key] = torch.from_numpy(np.asarray(arr).astype(np.int64 if dtype == "int64" else np.float32))
    return out


@pytest.fixture(scope="module")
def cerberus_sd() -> dict[str, torch.Tensor]:
    if not TSV.is_file():
        pytest.skip(f"{TSV} absent")
    return recipe_state_dict()


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    if not NPZ.is_file():
        pytest.skip(f"{NPZ} absent")
    with np.load(NPZ) as z:
        return {k: z[k] for k in z.files}


def write_cerberus_folder(folder: Path, state_dict: dict[str, torch.Tensor], *, settings: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"desc": {"module." + k: v for k, v in state_dict.items()}, "epoch": 50}, folder / "weights.tar")
    if settings:
        shutil.copy(REF / "settings.example.yml", folder / "settings.yml")
    return folder


def assert_matches_reference(out: dict[str, torch.Tensor], reference: dict[str, np.ndarray]) -> None:
    for name in ("Nuclei-INST", "Gland-INST", "Lumen-INST", "Nuclei-TYPE", "Gland-TYPE", "Patch-Class"):
        got, want = out[name][0].float().numpy(), reference[name]
        assert got.shape == want.shape, name
        err = np.abs(got - want).max()
        assert err <= 1e-4 * np.abs(want).max(), f"{name}: max abs err {err}"


def reference_input(reference: dict[str, np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(reference["input_rgb_uint8"].copy()).permute(2, 0, 1)[None].float()


def with_pool(arch: str, pool: str) -> ModelConfig:
    """The arch's config with every patch head pooling ``pool``."""
    config = get_model_config(arch)
    return config.replace(heads={n: dataclasses.replace(h, pool=pool) if h.kind == "patch" else h for n, h in config.heads.items()})


def calibrated(arch: str, *, seed: int = 0, pool: str = "mean") -> MultiTaskNet:
    """A random model whose BN statistics come from data, so activations have a realistic range."""
    model = create_model(with_pool(arch, pool), seed=seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    gen = torch.Generator().manual_seed(seed)
    size = 4 * model.config.stride
    smooth = torch.nn.functional.interpolate(torch.rand(2, 3, size // 8, size // 8, generator=gen), size=(size, size), mode="bilinear")
    model.train()
    with torch.no_grad():
        seg = [n for n in model.output_heads if n not in model.config.patch_heads]
        x4, _ = model._features(smooth * 255, seg)
        dense = window_stats(x4, model.config.arch_params.patch_cells, [pool])[pool]
        for name in model.config.patch_heads:
            model.decoder_head[model.config.heads[name].decoder](dense)
    return model.eval()


@pytest.fixture
def no_models_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Model lookup sees only an empty folder (no real weights leak into tests)."""
    empty = tmp_path / "models"
    empty.mkdir()
    monkeypatch.setattr(net_io, "models_dirs", lambda: [empty])
    return empty


# ---- Cerberus compatibility --------------------------------------------------------------------
@needs_ref
def test_cerberus_layout_keys_and_shapes(cerberus_sd: dict[str, torch.Tensor]) -> None:
    model = create_model("cerberus_r34")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert expected == {k: tuple(v.shape) for k, v in cerberus_sd.items()}
    assert "backbone.fc.weight" in expected and "decoder_head.Patch-Class.bn1.weight" in expected


@needs_ref
@pytest.mark.slow
def test_cerberus_reference_outputs(cerberus_sd: dict[str, torch.Tensor], reference: dict[str, np.ndarray]) -> None:
    model = create_model("cerberus_r34")
    model.load_state_dict(cerberus_sd, strict=True)
    model.eval()
    with torch.no_grad():
        out = model(reference_input(reference))
    assert list(out) == list(cerberus_heads())
    assert_matches_reference(out, reference)


@needs_ref
@pytest.mark.slow
@pytest.mark.parametrize("settings", [True, False], ids=["settings", "keys-only"])
def test_load_cerberus_folder(tmp_path: Path, settings: bool, cerberus_sd: dict[str, torch.Tensor],
                              reference: dict[str, np.ndarray]) -> None:
    folder = write_cerberus_folder(tmp_path / "cerberus", cerberus_sd, settings=settings)
    model = load_model(folder)
    assert not model.training
    assert model.output_heads == list(cerberus_heads())
    assert model.config.heads["Nuclei-TYPE"].class_names[2] == "epithelial"
    assert model.config.trained and model.config.context_px == 160
    assert model.config.weights_sha256 == net_io.file_sha256(folder / "weights.tar")
    with torch.no_grad():
        out = model(reference_input(reference))  # BN folded, channels_last: still the same function
    assert_matches_reference(out, reference)


@needs_ref
@pytest.mark.slow
@pytest.mark.parametrize("change", ["rename", "shape"])
def test_cerberus_mismatch_names_key(tmp_path: Path, cerberus_sd: dict[str, torch.Tensor], change: str) -> None:
    sd = dict(cerberus_sd)
    key = "decoder_head.Lumen.2.block.1.conv.weight"
    if change == "rename":
        sd["decoder_head.Lumen.2.block.1.convx.weight"] = sd.pop(key)
    else:
        sd[key] = torch.zeros(64, 64, 1, 1)
    folder = write_cerberus_folder(tmp_path / "bad", sd)
    with pytest.raises(ModelError, match=key.replace(".", r"\.")) as info:
        load_model(folder)
    assert "\n" not in str(info.value)


def test_check_state_dict_reports_first_problem() -> None:
    model = create_model("wsimtl_small")
    sd = model.state_dict()
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ModelError, match=r"unexpected key 'extra\.weight'"):
        check_state_dict(model, sd)
    sd.pop("extra.weight")
    sd["conv_map.weight"] = sd["conv_map.weight"][:1]
    with pytest.raises(ModelError, match=r"shape mismatch at 'conv_map\.weight'"):
        check_state_dict(model, sd)
    sd["conv_map.weight"] = "not a tensor"  # type: ignore[assignment]
    with pytest.raises(ModelError, match=r"'conv_map\.weight' is not a tensor"):
        check_state_dict(model, sd)


class _Payload:
    """A pickle that would run code (touch a file) when unpickled unsafely."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.target,))


def test_refuses_pickle_that_is_not_weights_only(tmp_path: Path) -> None:
    folder = tmp_path / "evil"
    folder.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"desc": {"module.x": torch.zeros(1)}, "payload": _Payload(marker)}, folder / "weights.tar")
    with pytest.raises(ModelError, match="refused to load.*weights-only"):
        load_model(folder)
    assert not marker.exists()


def test_read_checkpoint_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ModelError, match="cannot read checkpoint"):
        read_torch_checkpoint(garbage)
    empty = tmp_path / "empty.pth"
    torch.save({"desc": {}}, empty)
    with pytest.raises(ModelError, match="no state dict of tensors"):
        read_torch_checkpoint(empty)
    nested = tmp_path / "nested.pth"
    torch.save({"state_dict": {"module._orig_mod.a": torch.ones(2)}}, nested)
    assert list(read_torch_checkpoint(nested)) == ["a"]


def test_cerberus_settings_errors(tmp_path: Path) -> None:
    sd = {"output_head.Nuclei.INST.x.1.conv.weight": torch.zeros(3, 96, 1, 1)}
    folder = tmp_path / "c"
    folder.mkdir()
    torch.save({"desc": sd}, folder / "weights.tar")
    settings = folder / "settings.yml"
    cases = {
        "model_kwargs: {encoder_backbone_name: resnet50, considered_tasks: [Nuclei], decoder_kwargs: {Nuclei: {INST: 3}}}": "unsupported Cerberus backbone 'resnet50'",
        "model_kwargs: {considered_tasks: [Nuclei], decoder_kwargs: {Nuclei: {HV: 2}}}": "unsupported output 'HV'",
        "model_kwargs: {considered_tasks: [Nuclei], decoder_kwargs: {}}": "no outputs for task 'Nuclei'",
        "model_kwargs: {considered_tasks: Nuclei}": "needs 'considered_tasks'",
        "dataset_kwargs: {}": "no 'model_kwargs'",
        "model_kwargs: [unclosed": "cannot parse",
    }
    for text, message in cases.items():
        settings.write_text(text)
        with pytest.raises(ModelError, match=message):
            load_model(folder)
    settings.unlink()
    torch.save({"desc": {"backbone.conv1.weight": torch.zeros(64, 3, 7, 7)}}, folder / "weights.tar")
    with pytest.raises(ModelError, match="no Cerberus output heads"):
        load_model(folder)
    torch.save({"desc": {"output_head.Nuclei.HV.x.1.conv.weight": torch.zeros(2, 96, 1, 1)}}, folder / "weights.tar")
    with pytest.raises(ModelError, match="unsupported output head Nuclei.HV"):
        load_model(folder)


def test_cerberus_subset_from_keys_loads(tmp_path: Path) -> None:
    """A checkpoint with fewer tasks (no settings.yml) gets exactly the heads its keys hold."""
    config = get_model_config("cerberus_r34")
    config = config.replace(heads={k: v for k, v in config.heads.items() if k in ("Nuclei-INST", "Patch-Class")})
    model = create_model(config)
    folder = write_cerberus_folder(tmp_path / "sub", model.state_dict(), settings=False)
    loaded = load_model(folder)
    assert loaded.output_heads == ["Nuclei-INST", "Patch-Class"]
    x = torch.rand(1, 3, 32, 32) * 255
    with torch.no_grad():
        assert torch.allclose(loaded(x)["Nuclei-INST"], model.eval()(x)["Nuclei-INST"], atol=1e-4)


# ---- our format --------------------------------------------------------------------------------
def test_safetensors_round_trip_is_exact(tmp_path: Path) -> None:
    model = calibrated("wsimtl_small")
    folder = save_model(model, tmp_path / "m", trained=False)
    assert (folder / "weights.safetensors").is_file() and (folder / "config.json").is_file()
    umask = os.umask(0)
    os.umask(umask)
    for name in ("weights.safetensors", "config.json"):  # readable by whoever may read the folder
        assert (folder / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    loaded = load_model(folder)
    assert loaded.config.weights_sha256 == net_io.file_sha256(folder / "weights.safetensors")
    assert loaded.config.replace(weights_sha256=None) == model.config.replace(weights_sha256=None)
    assert not loaded.config.trained
    model.fold_bn(True).set_channels_last(True)  # the same inference path load_model uses
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(1)) * 255
    with torch.no_grad():
        a, b = model(x), loaded(x)
    for name in model.output_heads:
        assert torch.equal(a[name], b[name]), name
    # loading through the file path works too
    assert load_model(folder / "weights.safetensors").output_heads == model.output_heads


def test_our_folder_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = create_model("wsimtl_small")
    folder = save_model(model, tmp_path / "m")
    (folder / "weights.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ModelError, match="cannot read .*weights.safetensors"):
        load_model(folder)
    save_model(model, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["arch"] = "resnet9000"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="unknown arch 'resnet9000'"):
        load_model(folder)
    cfg["arch"] = "wsimtl_small"
    cfg["arch_params"]["decoder_out"] = 12
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="shape mismatch at"):
        load_model(folder)
    cfg["arch_params"]["decoder_out"] = 16
    cfg["context_px"] = 64
    (folder / "config.json").write_text(json.dumps(cfg))
    with caplog.at_level(logging.WARNING, logger="wsi_mtl.network"):
        assert load_model(folder).config.context_px == 64
    assert "context_px 64 is below the 192" in caplog.text
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_model(folder)
    other = tmp_path / "renamed.safetensors"
    shutil.copy(folder / "weights.safetensors", other)
    with pytest.raises(ModelError, match="must be weights.safetensors beside a config.json"):
        load_model(other)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="is not a model folder"):
        load_model(empty)


def test_save_model_unwritable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ModelError, match="cannot write model"):
        save_model(create_model("wsimtl_small"), blocker / "sub")


def test_unknown_name_lists_known_models(no_models_dir: Path) -> None:
    with pytest.raises(ModelError, match="cerberus-r34, wsimtl-small"):
        load_model("resnet9000")
    with pytest.raises(ModelError, match="known models"):
        load_model("/no/such/folder")
    with pytest.raises(InputError, match="unknown device"):
        load_model(device="warp-drive")
    assert net_io.resolve_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            load_model(device="cuda")
    if not torch.backends.mps.is_available():
        with pytest.raises(InputError, match="MPS is not available"):
            load_model(device="mps")


def test_default_model_untrained_then_from_models_dir(no_models_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="wsi_mtl.network"):
        model = load_model()
    assert model.config.name == "wsimtl-small" and not model.config.trained
    assert model.config.weights_sha256 is None
    assert "RANDOMLY INITIALISED" in caplog.text
    assert not model.training
    save_model(calibrated("wsimtl_small"), no_models_dir / "wsimtl-small", trained=True)
    for name in (None, "wsimtl-small", "wsimtl_small"):
        found = load_model(name)
        assert found.config.trained and found.config.weights_sha256


def test_models_dirs_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WSIMTL_MODELS_DIR", str(tmp_path))
    assert net_io.models_dirs()[0] == tmp_path
    save_model(create_model("wsimtl_small"), tmp_path / "wsimtl-small")
    assert net_io.find_model_folder("wsimtl_small") == tmp_path / "wsimtl-small"


def test_models_cli(no_models_dir: Path) -> None:
    from wsi_mtl.cli.models import models

    result = CliRunner().invoke(models, [])
    assert result.exit_code == 0, result.output
    assert "wsimtl-small" in result.output and "cerberus-r34" in result.output and "--allow-untrained" in result.output
    assert "wsimtl_small" not in result.output  # one spelling printed
    save_model(create_model("wsimtl_small"), no_models_dir / "wsimtl-small", trained=True)
    result = CliRunner().invoke(models, ["--json"])
    rows = [json.loads(line) for line in result.output.splitlines()]
    small = next(r for r in rows if r["name"] == "wsimtl-small")
    assert small["trained"] and small["folder"].endswith("wsimtl-small")


# ---- config -------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", list_models())
def test_config_json_round_trip(arch: str) -> None:
    config = get_model_config(arch)
    again = ModelConfig.from_json(config.to_json())
    assert again == config
    assert list(again.heads) == list(config.heads)
    assert config.context_px % config.stride == 0 and config.patch_stride_px == config.arch_params.output_stride


def test_cerberus_config_facts() -> None:
    c = get_model_config("cerberus_r34")
    assert c.context_px == 160 and c.stride == 16 and c.mpp == 0.5
    assert c.heads["Patch-Class"].class_names[1] == "abnormal epithelium"
    assert c.heads["Nuclei-TYPE"].num_classes == 7 and c.heads["Gland-TYPE"].num_classes == 3
    small = get_model_config("wsimtl-small")
    assert small.output_heads == ["Nuclei-INST", "Gland-INST", "Lumen-INST", "Nuclei-TYPE", "Patch-Class",
                                  "Patch-LC25000", "Patch-GlaS"]
    assert small.heads["Patch-Class"].class_names == ("tumor", "stroma", "complex", "lympho", "debris", "mucosa",
                                                      "adipose", "empty")
    for head in list(c.heads.values()) + list(small.heads.values()):
        assert len(set(head.colors)) == head.num_classes  # distinct colours within a head


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"arch_params": {"encoder_layers": [1, 2, 3]}}, "encoder_layers"),
        ({"arch_params": {"encoder_widths": [1, 2]}}, "encoder_widths"),
        ({"arch_params": {"stem_stride": 4}}, "stem_stride"),
        ({"arch_params": {"decoder_mid": [1]}}, "decoder_mid"),
        ({"arch_params": {"patch_cells": 4}}, "patch_cells"),
        ({"arch_params": {"full_res": "magic"}}, "full_res"),
        ({"arch_params": {"full_res_channels": 0}}, "full_res_convs and full_res_channels"),
        ({"arch_params": {"bogus": 1}}, "unknown arch_params"),
        ({"heads": {"A": {"kind": "blob", "decoder": "A", "class_names": ["a", "b"], "colors": [[0, 0, 0]] * 2}}}, "head kind"),
        ({"heads": {"A": {"kind": "inst", "decoder": "A.b", "class_names": ["a", "b"], "colors": [[0, 0, 0]] * 2}}}, "no '.'"),
        ({"heads": {"A": {"kind": "inst", "decoder": "A", "class_names": ["a"], "colors": [[0, 0, 0]]}}}, "at least 2 classes"),
        ({"heads": {"A": {"kind": "inst", "decoder": "A", "class_names": ["a", "b"], "colors": [[0, 0, 0]]}}}, "2 classes but 1 colours"),
        ({"heads": {"A": {"kind": "inst", "decoder": "A", "class_names": ["a", "b"], "colors": [[0, 0, 300]] * 2}}}, "not an RGB triple"),
        ({"heads": {"A": {"kind": "inst", "decoder": "A", "class_names": ["a", "b"]}}}, "malformed"),
        ({"heads": {}}, "has no heads"),
        ({"heads": {"A": {"kind": "inst", "decoder": "D", "class_names": ["a", "b"], "colors": [[0, 0, 0]] * 2},
                    "B": {"kind": "inst", "decoder": "D", "class_names": ["a", "b"], "colors": [[0, 0, 0]] * 2}}}, "share module"),
        ({"heads": {"A": {"kind": "inst", "decoder": "D", "class_names": ["a", "b"], "colors": [[0, 0, 0]] * 2},
                    "B": {"kind": "patch", "decoder": "D", "class_names": ["a", "b"], "colors": [[0, 0, 0]] * 2}}}, "both as decoder and patch"),
        ({"mpp": 0}, "mpp must be positive"),
        ({"stride": 24}, "not a multiple of"),
        ({"patch_stride_px": 16}, "must equal the encoder"),
        ({"context_px": 40}, "non-negative multiple"),
        ({"heads": {"P": {"kind": "patch", "decoder": "P", "class_names": ["a", "b"], "colors": [[0, 0, 0]] * 2, "pool": "max"}}}, "pool must be one of"),
        ({"heads": {"A": {"kind": "inst", "decoder": "D", "class_names": ["a", "b"], "colors": [[0, 0, 0]] * 2, "pool": "mean_std"}}}, "patch heads only"),
    ],
)
def test_config_validation(change: dict, message: str) -> None:
    data = get_model_config("wsimtl_small").to_dict()
    for key, value in change.items():
        if key == "arch_params":
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    with pytest.raises(ModelError, match=message):
        ModelConfig.from_dict(data)


def test_config_from_dict_errors(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ModelError, match="must be a JSON object"):
        ModelConfig.from_dict([1, 2])  # type: ignore[arg-type]
    data = get_model_config("wsimtl_small").to_dict()
    del data["heads"]
    with pytest.raises(ModelError, match="lacks the required key 'heads'"):
        ModelConfig.from_dict(data)
    data = get_model_config("wsimtl_small").to_dict()
    data["future_field"] = 1
    with caplog.at_level(logging.WARNING):
        assert ModelConfig.from_dict(data) == get_model_config("wsimtl_small")
    assert "future_field" in caplog.text
    with pytest.raises(ModelError, match="unknown model 'nope'"):
        get_model_config("nope")
    with pytest.raises(ModelError, match="is not a HeadConfig"):
        get_model_config("wsimtl_small").replace(heads={"A": "B"})


# ---- forward / predict contract ------------------------------------------------------------------
@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a == "cerberus_r34" else a for a in list_models()])
def test_predict_shapes(arch: str) -> None:
    model = create_model(arch).eval()
    s = model.config.stride
    x = torch.rand(2, 3, 2 * s, 3 * s) * 255
    logits = model(x)
    probs = model.predict(x)
    assert list(logits) == list(probs) == model.output_heads
    ps = model.config.patch_stride_px
    for name, head in model.config.heads.items():
        if head.kind == "patch":
            assert logits[name].shape == (2, head.num_classes, 1, 1)
            assert probs[name].shape == (2, head.num_classes, 2 * s // ps, 3 * s // ps)
        else:
            assert logits[name].shape == probs[name].shape == (2, head.num_classes, 2 * s, 3 * s)
        assert probs[name].dtype == torch.float32
        assert torch.allclose(probs[name].sum(1), torch.ones(()), atol=1e-5)


def test_input_checks() -> None:
    model = create_model("wsimtl_small").eval()
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.zeros(1, 3, 48, 64))
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        model.predict(torch.zeros(1, 1, 64, 64))


@pytest.mark.parametrize(
    ("arch", "cells_in", "pool"),
    [("wsimtl_small", 5, "mean"), ("wsimtl_small", 7, "mean"), ("wsimtl_small", 5, "mean_std"), ("wsimtl_small", 7, "mean_std"),
     pytest.param("cerberus_r34", 9, "mean", marks=pytest.mark.slow)],
)
def test_dense_patch_centre_equals_cerberus_crop(arch: str, cells_in: int, pool: str) -> None:
    """The dense patch map's centre cell is the crop's own classification. The patch heads' last
    layer is scaled so that their logits are at most 2 in size: a random head gives near one-hot
    probabilities, on which the neighbouring cell (a wrong window) differs by < 1e-20 and float32
    noise alone came near the old 1e-5 tolerance. Scaled (15 models measured), the centre cell
    differs by <= 3.6e-7 and the neighbouring one by >= 1.1e-4."""
    model = calibrated(arch, pool=pool)
    size = cells_in * model.config.patch_stride_px
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(3)) * 255
    with torch.no_grad():
        logits = model(x)
        for name in model.config.patch_heads:  # logits scaled to at most 2 in size
            head = model.decoder_head[model.config.heads[name].decoder]
            last = [m for m in head.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))][-1]
            scale = 2.0 / float(logits[name].abs().max())
            last.weight.mul_(scale)
            if last.bias is not None:
                last.bias.mul_(scale)
        logits = model(x)
    probs = model.predict(x)
    c = cells_in // 2
    for name in model.config.patch_heads:
        want = torch.softmax(logits[name][0, :, 0, 0], 0)
        assert float(want.max()) < 0.99, name  # not saturated
        assert torch.allclose(probs[name][0, :, c, c], want, rtol=0, atol=3e-6), name
        assert not torch.allclose(probs[name][0, :, c, c - 1], want, rtol=0, atol=3e-6), name


def test_fold_bn_same_function_and_train_drops_it() -> None:
    model = calibrated("wsimtl_small")
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 255
    ref = model.predict(x)
    model.fold_bn(True).set_channels_last(True)
    folded = model.predict(x)
    for name in ref:
        assert torch.allclose(ref[name], folded[name], atol=1e-5), name
    assert model.backbone.fold0_w is not None and "backbone.fold0_w" not in model.state_dict()
    model.train()
    assert model.backbone.fold0_w is None


def test_bf16_predict_close_to_fp32() -> None:
    """bf16 autocast vs fp32 on a calibrated random small model: max / mean abs probability
    difference <= 0.05 / 0.01 for segmentation heads (measured 0.037 / 0.003) and <= 0.1 / 0.04 for
    the 4 x 4 patch maps (measured 0.052 / 0.017; the error comes from x4, the heads run in fp32).

    Random weights amplify rounding; a trained model is expected to be at least as tight.
    """
    model = calibrated("wsimtl_small").fold_bn(True).set_channels_last(True)
    gen = torch.Generator().manual_seed(7)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, 16, 16, generator=gen), size=(128, 128), mode="bilinear") * 255
    fp32 = model.predict(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model.predict(x)
    for name in fp32:
        assert bf16[name].dtype == torch.float32
        diff = (bf16[name] - fp32[name]).abs()
        limit, mean_limit = (0.1, 0.04) if model.config.heads[name].kind == "patch" else (0.05, 0.01)
        assert diff.max() <= limit and diff.mean() <= mean_limit, name


def test_load_model_public_reexport(no_models_dir: Path) -> None:
    import wsi_mtl

    assert wsi_mtl.load_model is load_model
    assert isinstance(wsi_mtl.load_model("cerberus_r34"), MultiTaskNet)


def test_head_config_properties() -> None:
    head = HeadConfig("type", "Nuclei#TYPE", ("a", "b"), ((1, 2, 3), (4, 5, 6)))
    assert head.out_key == "TYPE" and head.num_classes == 2
    assert ArchParams(stem_stride=2).output_stride == 32


def test_heads_subset_skips_decoders() -> None:
    model = calibrated("wsimtl_small")
    x = torch.rand(1, 3, 160, 160, generator=torch.Generator().manual_seed(9)) * 255
    with torch.no_grad():
        full = model(x)
        only = model(x, heads=["Patch-GlaS", "Nuclei-TYPE"])
    assert list(only) == ["Nuclei-TYPE", "Patch-GlaS"]  # model order
    for name in only:
        assert torch.equal(only[name], full[name])
    calls = []
    hook = model.decoder_head["Gland"].register_forward_hook(lambda *a: calls.append(1))
    probs = model.predict(x, heads=["Patch-Class"])
    hook.remove()
    assert list(probs) == ["Patch-Class"] and not calls
    with pytest.raises(ValueError, match=r"unknown heads \['Gland-TYPE'\]"):
        model(x, heads=["Gland-TYPE"])


def test_batched_refine_equals_per_head_output_heads() -> None:
    """The one-upsample/one-conv refine step equals each OutputHead applied with the full skip."""
    model = calibrated("wsimtl_small")
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(11)) * 255
    with torch.no_grad():
        out = model(x)
        xin = x / 255
        feats = model.backbone(xin)
        full = model.full_skip(xin)
        start = model.conv_map(feats[4])
        skips = [feats[3], feats[2], feats[1], feats[0]]
        for name, head in model.config.heads.items():
            if head.kind == "patch":
                continue
            decoded = model.decoder_head[head.decoder](start, skips)
            ref = model.output_head[head.decoder][head.out_key](decoded, full)
            assert ref.shape == out[name].shape
            assert torch.allclose(out[name], ref, atol=1e-5), name


def _fused_vs_apart(model: Any, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch, **autocast: Any) -> tuple[dict, dict]:
    import wsi_mtl.network.model as net_model

    with torch.inference_mode(), torch.autocast("cpu", **autocast):
        fused = model.predict(x)
        monkeypatch.setattr(net_model, "FUSE_CONV_RELU", False)
        apart = model.predict(x)
        monkeypatch.setattr(net_model, "FUSE_CONV_RELU", True)
    return fused, apart


def test_fused_conv_relu_gives_the_values_of_conv_then_relu(monkeypatch: pytest.MonkeyPatch) -> None:
    import wsi_mtl.network.model as net_model

    if net_model._CONV_POINTWISE is None:
        pytest.skip("this torch build has no oneDNN fused convolution (the unfused path is all it runs)")
    model = create_model("wsimtl_small", seed=0).eval().fold_bn().set_channels_last()
    x = (torch.rand(1, 3, 320, 288, generator=torch.Generator().manual_seed(1)) * 255).contiguous(memory_format=torch.channels_last)
    calls = []
    real = net_model._CONV_POINTWISE
    monkeypatch.setattr(net_model, "_CONV_POINTWISE", lambda *a: calls.append(1) or real(*a))
    fused, apart = _fused_vs_apart(model, x, monkeypatch, dtype=torch.bfloat16)
    if net_model._FUSE_BF16:
        assert len(calls) > 10  # the stem, every BasicBlock's first conv, every decoder block
    else:  # this CPU's oneDNN has no bfloat16: the fused op would refuse it, so the steps run apart
        assert calls == []
    for name in apart:
        assert torch.equal(fused[name], apart[name]), name
    calls.clear()
    fused, apart = _fused_vs_apart(model, x, monkeypatch, enabled=False)  # float32
    assert len(calls) > 10
    for name in apart:
        assert torch.allclose(fused[name], apart[name], rtol=0, atol=1e-5), name


def test_point_conv_runs_through_onednn_in_inference_and_is_a_plain_conv_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    """:class:`PointConv` keeps ``nn.Conv2d``'s state dict and values; on channels_last float32 input
    in inference it calls oneDNN with no element-wise step (at one thread too, where torch's conv
    would take its own GEMM), and in training, with autograd or on NCHW input it is torch's conv."""
    import wsi_mtl.network.model as net_model

    if net_model._CONV_POINTWISE is None:
        pytest.skip("this torch build has no oneDNN fused convolution (the plain conv is all it runs)")
    torch.manual_seed(3)
    conv = net_model.PointConv(32, 5).eval()
    plain = torch.nn.Conv2d(32, 5, 1)
    assert conv.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(1, 32, 40, 56).contiguous(memory_format=torch.channels_last)
    steps: list[str] = []
    real = net_model._CONV_POINTWISE
    monkeypatch.setattr(net_model, "_CONV_POINTWISE", lambda *a: steps.append(a[7]) or real(*a))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            got, want = conv(x), plain(x)
    finally:
        torch.set_num_threads(before)
    assert steps == ["none"]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert got.shape == (1, 5, 40, 56) and got.abs().sum() > 0
    conv.train()(x).sum().backward()  # training, autograd: torch's conv
    with torch.inference_mode():
        conv.eval()(x.contiguous())  # NCHW
    assert steps == ["none"] and conv.weight.grad is not None


def test_fused_conv_relu_stays_out_of_fp16_training_nchw_input_and_traces(monkeypatch: pytest.MonkeyPatch) -> None:
    import wsi_mtl.network.model as net_model

    calls = []
    real = net_model._CONV_POINTWISE
    monkeypatch.setattr(net_model, "_CONV_POINTWISE", lambda *a: calls.append(1) or real(*a))
    model = create_model("wsimtl_small", seed=0).eval().fold_bn().requires_grad_(False)
    x = torch.rand(1, 3, 64, 64) * 255
    cl = x.contiguous(memory_format=torch.channels_last)
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    with torch.no_grad(), bf16:
        model.predict(x)  # NCHW (the exporters' layout)
    model.set_channels_last()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        model.predict(cl)  # float16 autocast: not fused
    with torch.no_grad():
        with bf16:
            torch.jit.trace(lambda t: model.predict(t)["Nuclei-INST"], (cl,), check_trace=False)
    with bf16:
        model.requires_grad_(True)(cl)["Nuclei-INST"].float().sum().backward()  # autograd
    assert calls == []
    with torch.no_grad(), bf16:
        model.predict(cl)
    # the same model and input in bfloat16 without a tracer or autograd: fused where oneDNN has bfloat16
    assert bool(calls) is net_model._FUSE_BF16


def test_bfloat16_without_onednn_bfloat16_runs_conv_and_relu_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU whose oneDNN has no bfloat16 (no AVX512-BW/VL/DQ, AVX-NE-CONVERT or AMX) never reaches the
    fused op under bfloat16 autocast, which would raise there; float32 is still fused."""
    import wsi_mtl.network.model as net_model

    calls: list[torch.dtype] = []
    monkeypatch.setattr(net_model, "_FUSE_BF16", False)
    monkeypatch.setattr(net_model, "_CONV_POINTWISE", lambda x, *a: calls.append(x.dtype) or torch.relu(
        torch.nn.functional.conv2d(x, a[0], a[1], stride=a[3], padding=a[2], dilation=a[4], groups=a[5])))
    model = create_model("wsimtl_small", seed=0).eval().fold_bn().set_channels_last().requires_grad_(False)
    x = (torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 255).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.predict(x)
    assert calls == [] and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in out.values())
    with torch.no_grad():
        model.predict(x)
    assert calls and set(calls) == {torch.float32}


def test_window_stats_are_the_mean_and_std_of_each_clipped_window() -> None:
    x = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(0)) * 3 + 1
    got = window_stats(x, 3, ["mean", "mean_std"])
    a = x.numpy()
    for i in range(6):
        for j in range(5):
            win = a[:, :, max(0, i - 1) : i + 2, max(0, j - 1) : j + 2].reshape(2, 4, -1)  # clipped at the border
            np.testing.assert_allclose(got["mean"][:, :, i, j].numpy(), win.mean(-1), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(got["mean_std"][:, 4:, i, j].numpy(), win.std(-1), rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(got["mean_std"][:, :4], got["mean"])
    whole = window_stats(x, None, ["mean_std"])["mean_std"]
    assert whole.shape == (2, 8, 1, 1)
    np.testing.assert_allclose(whole[:, 4:, 0, 0].numpy(), a.reshape(2, 4, -1).std(-1), rtol=1e-3, atol=2e-3)
    with pytest.raises(ValueError, match="unknown patch pool"):
        window_stats(x, 3, ["max"])


def test_mean_std_patch_heads_round_trip_through_a_model_folder(tmp_path: Path) -> None:
    model = calibrated("wsimtl_small", pool="mean_std")
    head = model.decoder_head[model.config.heads["Patch-LC25000"].decoder]
    assert head.bn1.num_features == 2 * model.config.arch_params.encoder_widths[4]
    save_model(model, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())["heads"]
    assert saved["Patch-LC25000"]["pool"] == "mean_std" and "pool" not in saved["Nuclei-INST"]
    loaded = load_model(tmp_path / "m")
    assert loaded.config.heads["Patch-LC25000"].pool == "mean_std"
    x = torch.rand(1, 3, 160, 192, generator=torch.Generator().manual_seed(1)) * 255
    want, got = model.predict(x), loaded.predict(x)
    for name in model.config.patch_heads:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-4)  # load_model folds BN and goes channels_last: float rounding only


def with_fine(config: ModelConfig, decoders: tuple[str, ...] = ("Nuclei",), channels: int = 16) -> ModelConfig:
    return config.replace(arch_params=dataclasses.replace(config.arch_params, fine_decoders=decoders, fine_channels=channels))


def test_fine_branch_config_is_validated() -> None:
    base = get_model_config("wsimtl_small")
    with pytest.raises(ModelError, match="fine_channels must be >= 1"):
        with_fine(base, channels=0)
    with pytest.raises(ModelError, match="need stem_stride 2"):
        with_fine(get_model_config("cerberus_r34"))
    with pytest.raises(ModelError, match="need stem_stride 2"):
        dataclasses.replace(base.arch_params, full_res="block", fine_decoders=("Nuclei",))


def only_nuclei_moves(plain: MultiTaskNet, grown: MultiTaskNet, perturb: Any, min_change: float) -> dict[str, torch.Tensor]:
    """``grown`` (eval) predicts what ``plain`` does; after ``perturb()`` only ``Nuclei-INST`` changes."""
    x = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(4)) * 255
    with torch.no_grad():
        want, got = plain.predict(x), grown.predict(x)
        for name in plain.output_heads:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)
        perturb()
        moved = grown.predict(x)
    assert (moved["Nuclei-INST"] - want["Nuclei-INST"]).abs().max() > min_change
    for name in plain.output_heads:
        if name != "Nuclei-INST":  # the type map has its own decoder
            torch.testing.assert_close(moved[name], want[name], rtol=0, atol=1e-6)
    return moved


def test_a_new_fine_branch_starts_as_the_model_without_it_and_then_sharpens_only_its_heads() -> None:
    plain = calibrated("wsimtl_small", seed=3)
    fine = create_model(with_fine(plain.config), seed=5)
    missing, unexpected = fine.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and missing and all(".fine." in k for k in missing)
    assert all(k.startswith("output_head.Nuclei.INST.fine.") for k in missing)
    branch = fine.eval().output_head["Nuclei"]["INST"].fine
    moved = only_nuclei_moves(plain, fine, lambda: torch.nn.init.normal_(branch.out.weight, std=0.5), 1e-2)
    assert moved["Nuclei-INST"].shape == (2, 3, 96, 128)


def test_fine_branches_round_trip_through_a_model_folder(tmp_path: Path) -> None:
    model = create_model(with_fine(get_model_config("wsimtl_small"), ("Nuclei", "Gland"), 8), seed=1)
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] == 1 and not m.weight.any():
            torch.nn.init.normal_(m.weight, std=0.3)  # give the zero-started branches something to carry
    model.eval()
    save_model(model, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())["arch_params"]
    assert saved["fine_decoders"] == ["Nuclei", "Gland"] and saved["fine_channels"] == 8
    loaded = load_model(tmp_path / "m")  # folds BN, channels_last
    assert loaded.config.arch_params.fine_decoders == ("Nuclei", "Gland")
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(2)) * 255
    with torch.no_grad():
        want, got = model.predict(x), loaded.predict(x)
    for name in model.output_heads:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-4)


def test_private_shallow_encoders_copy_the_shared_one_and_then_move_only_their_decoder() -> None:
    plain = calibrated("wsimtl_small", seed=3)
    for stages in (1, 2, 3, 4):
        config = plain.config.replace(arch_params=dataclasses.replace(plain.config.arch_params, private_decoders=("Nuclei",), private_stages=stages))
        own = create_model(config, seed=5)
        private = own.private_encoder["Nuclei"]
        assert [n for n, _ in private.named_children() if n.startswith("layer")] == [f"layer{i}" for i in range(1, stages)]
        state = plain.state_dict()
        state |= {f"private_encoder.Nuclei.{k}": state[f"backbone.{k}"] for k in private.state_dict()}
        own.load_state_dict(state)
        only_nuclei_moves(plain, own.eval(), lambda: torch.nn.init.normal_(private.conv1.weight, std=0.1), 1e-3)
    with pytest.raises(ModelError, match="private_stages must be 1, 2, 3 or 4"):
        dataclasses.replace(plain.config.arch_params, private_stages=5)


@pytest.mark.parametrize("bf16", [False, True])
def test_full_resolution_strips_give_the_whole_tiles_values(monkeypatch: pytest.MonkeyPatch, bf16: bool) -> None:
    """Inference computes the full-resolution tail in row strips with context: bit for bit the
    tail of the whole tile (shipped model: refine, fine branch, private encoder), also under
    bf16 autocast; logits and probabilities alike; a training forward is unchanged."""
    import wsi_mtl.network.model as net_model

    model = load_model(Path(__file__).resolve().parents[1] / "models" / "wsimtl-small")
    torch.manual_seed(0)
    x = torch.rand(1, 3, 352, 224) * 255  # 352 rows: 3 strips of 128 with their halo
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        monkeypatch.setattr(net_model, "FULL_RES_STRIP_ROWS", 10**6)
        whole, whole_logits = model.predict(x), model(x)
        monkeypatch.setattr(net_model, "FULL_RES_STRIP_ROWS", 128)
        strips, strip_logits = model.predict(x), model(x)
    for k in whole:
        assert torch.equal(whole[k], strips[k]), k
        assert torch.equal(whole_logits[k], strip_logits[k]), k
        if not k.startswith("Patch-"):
            assert torch.allclose(torch.softmax(whole_logits[k].float(), 1), whole[k], atol=1e-6)


@pytest.mark.parametrize("bf16", [False, True])
def test_decoder_strips_give_the_whole_windows_values(monkeypatch: pytest.MonkeyPatch, bf16: bool) -> None:
    """The engine's call decodes each decoder's last block and its heads' layers in row strips with
    context: every map bit for bit as the window decoded at once (fp32 and bf16, with and without
    the helper thread, strips that do not divide the window); the first and last strips sit on the
    window's zero-padded edges as the whole window does."""
    from concurrent.futures import ThreadPoolExecutor

    import wsi_mtl.network.model as net_model

    model = load_model(Path(__file__).resolve().parents[1] / "models" / "wsimtl-small")
    torch.manual_seed(4)
    x = (torch.rand(1, 3, 352, 288) * 255).contiguous(memory_format=torch.channels_last)
    maps = {}
    with ThreadPoolExecutor(max_workers=1) as pool, torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for rows in (10**6, 24, 7):
            monkeypatch.setattr(net_model, "DECODER_STRIP_ROWS", rows)
            maps[rows] = model.predict(x, margin=32)
            maps[rows, "helper"] = model.predict(x, margin=32, helper=pool)
    whole = maps[10**6]
    for key, got in maps.items():
        for name in whole:
            assert torch.equal(whole[name], got[name]), (key, name)


def test_an_exported_graph_computes_the_tail_whole_and_fits_other_sizes() -> None:
    """The exporters (ONNX's dynamo exporter, OpenVINO) trace ``predict`` on one example size
    (``runtime._EXPORT_SIZE``) with dynamic height and width: traced, the tail must not be cut into
    strips fixed to the example's rows (a 256 px example is taller than one 128-row strip). The
    exported program keeps its sizes dynamic and gives eager's maps on a taller input."""
    import warnings

    import wsi_mtl.network.model as model_mod
    from wsi_mtl.network.runtime import _AllHeads, _example

    module = _AllHeads(load_model(Path(__file__).resolve().parents[1] / "models" / "wsimtl-small"))
    example = _example(module.model)
    assert example.shape[-2] > model_mod.FULL_RES_STRIP_ROWS + 2 * model_mod._STRIP_HALO
    side = {2: 32 * torch.export.Dim("h", min=2, max=128), 3: 32 * torch.export.Dim("w", min=2, max=128)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes
        program = torch.export.export(module, (example,), dynamic_shapes={"x": side})
    torch.manual_seed(5)
    x = torch.rand(1, 3, 352, 288) * 255
    with torch.no_grad():
        exported, eager = program.module()(x), module(x)
    for name, a, b in zip(module.names, exported, eager):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("bf16", [True, False])
def test_maps_do_not_depend_on_the_thread_count(bf16: bool) -> None:
    """In float32 and under bf16 autocast every map of ``predict`` is bit for bit the same on 1 and
    2 torch threads (the 1x1 convs of the decoders and heads go through oneDNN at any count,
    :class:`PointConv`; the patch heads' float32 1x1 convs run on one thread), so the engine may
    change the count per tile; the caller's count is restored."""
    model = load_model(Path(__file__).resolve().parents[1] / "models" / "wsimtl-small")
    torch.manual_seed(2)
    x = (torch.rand(1, 3, 352, 288) * 255).contiguous(memory_format=torch.channels_last)
    before = torch.get_num_threads()
    maps = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                maps[threads] = model.predict(x, margin=32)
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    for name in maps[1]:
        assert torch.equal(maps[1][name], maps[2][name]), name


@pytest.mark.parametrize("bf16", [False, True])
def test_predict_with_a_helper_thread_gives_the_same_maps(monkeypatch: pytest.MonkeyPatch, bf16: bool) -> None:
    """``predict(..., helper=pool)``: the private encoder (beside the shared one), every other
    decoder and every other full-resolution strip run on the pool's thread (under the caller's
    autocast, inference mode and thread count, which a thread does not inherit), giving every map
    bit for bit as without it."""
    from concurrent.futures import ThreadPoolExecutor

    import wsi_mtl.network.model as net_model

    model = load_model(Path(__file__).resolve().parents[1] / "models" / "wsimtl-small")
    torch.manual_seed(1)
    x = (torch.rand(1, 3, 352, 288) * 255).contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(net_model, "FULL_RES_STRIP_ROWS", 96)  # 288 core rows: 3 strips

    class Counting(ThreadPoolExecutor):
        jobs = 0

        def submit(self, *args, **kwargs):
            Counting.jobs += 1
            return super().submit(*args, **kwargs)

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with Counting(max_workers=1) as pool, torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            alone, beside = model.predict(x, margin=32), model.predict(x, margin=32, helper=pool)
    finally:
        torch.set_num_threads(before)
    assert Counting.jobs == 3  # the private encoder, the other decoders, the strips
    assert alone.keys() == beside.keys()
    for name in alone:
        assert torch.equal(alone[name], beside[name]), name


@pytest.mark.parametrize(("bf16", "strip_rows"), [(False, 96), (False, 10**6), (True, 96)])
def test_predict_on_uint8_input_gives_the_maps_of_its_float_copy(monkeypatch: pytest.MonkeyPatch, bf16: bool, strip_rows: int) -> None:
    """The engine hands ``predict`` its tiles as uint8 (channels_last NCHW views of the NHWC read):
    every map bit for bit that of the same pixels as float32, with and without the helper thread
    (with it, the tail scales its strips of the uint8 input itself), and the caller's tensor left
    as it was."""
    from concurrent.futures import ThreadPoolExecutor

    import wsi_mtl.network.model as net_model

    monkeypatch.setattr(net_model, "FULL_RES_STRIP_ROWS", strip_rows)
    model = load_model(Path(__file__).resolve().parents[1] / "models" / "wsimtl-small")
    rng = np.random.default_rng(4)
    nhwc = torch.from_numpy(rng.integers(0, 256, (1, 352, 288, 3), dtype=np.uint8))
    x8 = nhwc.permute(0, 3, 1, 2)
    assert x8.is_contiguous(memory_format=torch.channels_last)
    kept = x8.clone()
    with ThreadPoolExecutor(max_workers=1) as pool, torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for helper in (None, pool):
            want = model.predict(x8.float(), margin=32, helper=helper, quantized=True)
            got = model.predict(x8, margin=32, helper=helper, quantized=True)
            assert want.keys() == got.keys()
            for name in want:
                assert torch.equal(want[name], got[name]), name
    assert torch.equal(x8, kept)


@pytest.mark.parametrize("strip_rows", [96, 10**6])
def test_quantized_predict_gives_the_engines_uint8_maps(monkeypatch: pytest.MonkeyPatch, strip_rows: int) -> None:
    """``predict(..., quantized=True)`` (the engine's call): every segmentation map is uint8 and
    bit for bit ``quantize_probabilities`` of the float32 map, whether the tail ran in strips (each
    quantised as it comes, with the helper thread) or whole; patch maps stay float32."""
    from concurrent.futures import ThreadPoolExecutor

    import wsi_mtl.network.model as net_model

    model = load_model(Path(__file__).resolve().parents[1] / "models" / "wsimtl-small")
    torch.manual_seed(3)
    x = (torch.rand(1, 3, 352, 288) * 255).contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(net_model, "FULL_RES_STRIP_ROWS", strip_rows)
    with ThreadPoolExecutor(max_workers=1) as pool, torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        floats = model.predict(x, margin=32)
        quantized = model.predict(x, margin=32, helper=pool, quantized=True)
    assert floats.keys() == quantized.keys()
    for name, p in floats.items():
        if name in model.config.patch_heads:
            assert quantized[name].dtype == torch.float32 and torch.equal(quantized[name], p), name
        else:
            assert quantized[name].dtype == torch.uint8, name
            assert torch.equal(quantized[name], net_model.quantize_probabilities(p)), name
            assert int(quantized[name].max()) == 255 and int(quantized[name].min()) == 0, name


@pytest.mark.parametrize("bf16", [False, True])
def test_predict_with_a_margin_gives_the_cropped_maps_of_the_whole_input(monkeypatch: pytest.MonkeyPatch, bf16: bool) -> None:
    """The engine's call: the segmentation maps of the input less ``margin`` on every side, the
    tail computed in strips over the core only: under bf16 autocast bit for bit the crop of the
    whole maps, in float32 up to float rounding; patch maps untouched."""
    import wsi_mtl.network.model as net_model

    model = load_model(Path(__file__).resolve().parents[1] / "models" / "wsimtl-small")
    torch.manual_seed(0)
    x = (torch.rand(1, 3, 352, 288) * 255).contiguous(memory_format=torch.channels_last)
    m = 32
    monkeypatch.setattr(net_model, "FULL_RES_STRIP_ROWS", 128)  # 288 core rows: strips of 128, 128, 32
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        whole, core = model.predict(x), model.predict(x, margin=m)
    for name, p in whole.items():
        if name in model.config.patch_heads:
            assert torch.equal(core[name], p), name
            continue
        crop = p[..., m:-m, m:-m]
        assert core[name].shape == crop.shape, name
        if bf16:
            assert torch.equal(core[name], crop), name
        else:
            torch.testing.assert_close(core[name], crop, atol=1e-5, rtol=0)
    for bad in (-2, 3, 144):
        with pytest.raises(ValueError, match="margin"):
            model.predict(x, margin=bad)


def test_a_strip_of_a_channels_last_input_is_channels_last_contiguous() -> None:
    """The tail's strips of a channels_last float input are copied channels_last-contiguous, so their
    first convs run fused with their ReLU (a strided view would not be); the same values, and a
    uint8 input's scaled strips and an NCHW input's views are left as they come."""
    from wsi_mtl.network.model import _Scaled, _strip_input

    x = torch.rand(1, 3, 40, 30).contiguous(memory_format=torch.channels_last)
    part = _strip_input(x, 4, 20, 2, 28)
    assert x[..., 4:20, 2:28].is_contiguous(memory_format=torch.channels_last) is False
    assert part.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(part, x[..., 4:20, 2:28])
    plain = torch.rand(1, 3, 40, 30)
    assert _strip_input(plain, 4, 20, 2, 28).data_ptr() == plain[..., 4:20, 2:28].data_ptr()
    raw = (x * 255).to(torch.uint8)
    assert torch.equal(_strip_input(_Scaled(raw), 4, 20, 2, 28), raw[..., 4:20, 2:28] / 255.0)

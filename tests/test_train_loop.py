"""Training on tiny synthetic data: loss goes down, unsupervised heads stay untouched, runs resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsi_mtl.network import create_model, get_model_config
from wsi_mtl.train import (
    ClsItem,
    SegItem,
    Sources,
    TrainConfig,
    export_model,
    load_config,
    make_cls_batch,
    make_seg_batch,
    train,
    train_step,
)


def _blobs(rng: np.random.Generator, size: int, n: int, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image with n dark disks on a pink background, and their instance labels."""
    yy, xx = np.mgrid[:size, :size]
    labels = np.zeros((size, size), np.int32)
    for k in range(1, n + 1):
        cy, cx = rng.uniform(radius, size - radius, 2)
        labels[((yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2) & (labels == 0)] = k
    image = np.empty((size, size, 3), np.uint8)
    image[:] = (235, 180, 210)
    image[labels > 0] = (70, 40, 120)
    noise = rng.integers(-10, 10, image.shape)
    return np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8), labels


def _synthetic_sources(seed: int = 0) -> Sources:
    rng = np.random.default_rng(seed)
    nuclei = [SegItem(f"n{i}", "syn", "nuclei", *_blobs(rng, 96, 12, 5)) for i in range(2)]
    glands = []
    for i in range(2):
        img, lab = _blobs(rng, 96, 2, 20)
        glands.append(SegItem(f"g{i}", "syn", "gland", img, lab, patch={"Patch-GlaS": i % 2}))
    cls = [ClsItem(f"c{i}", "syn", "Patch-LC25000", i % 3, _blobs(rng, 64, 3 * (i % 3) + 1, 6)[0]) for i in range(6)]
    return Sources({"nuclei": nuclei, "gland": glands}, {"lc25000": cls})


def _cfg(**kw) -> TrainConfig:
    base = dict(seg_batch=2, seg_crop_px=64, cls_batch=4, cls_crop_px=64, scale_range=(1.0, 1.0), hed_sigma=0.0, hed_bias=0.0, blur_p=0.0, bf16=False, lr=3e-3)
    return TrainConfig(**(base | kw))


def test_batches_carry_partial_labels():
    data = _synthetic_sources()
    cfg = _cfg()
    model_cfg = get_model_config("wsimtl_small")
    rng = np.random.default_rng(0)
    b = make_seg_batch(rng, data, cfg, model_cfg.patch_heads, task="gland")
    assert b.images.shape == (2, 3, 64, 64) and b.images.dtype == torch.float32
    assert (b.seg["Nuclei-INST"] == 255).all() and (b.seg["Lumen-INST"] == 255).all()
    assert set(torch.unique(b.seg["Gland-INST"]).tolist()) <= {0, 1, 2, 255}
    assert (b.patch["Patch-GlaS"] >= 0).all() and (b.patch["Patch-Class"] == -1).all()
    c = make_cls_batch(rng, data, cfg, model_cfg.patch_heads)
    assert c.images.shape == (4, 3, 64, 64) and (c.patch["Patch-LC25000"] >= 0).all() and not c.seg


@pytest.mark.slow
def test_training_steps_lower_the_loss_and_leave_lumen_untouched():
    torch.manual_seed(0)
    model = create_model("wsimtl_small", seed=0)
    lumen_before = {k: v.clone() for k, v in model.state_dict().items() if "Lumen" in k}
    assert lumen_before
    params = [p for n, p in model.named_parameters() if "Lumen" not in n]
    opt = torch.optim.AdamW(params, lr=3e-3)
    data = _synthetic_sources()
    cfg = _cfg()
    batch = make_seg_batch(np.random.default_rng(1), data, cfg, model.config.patch_heads, task="nuclei")
    losses = [train_step(model, opt, batch, cfg=cfg)["Nuclei-INST"] for _ in range(12)]
    assert losses[-1] < 0.7 * losses[0], losses
    for k, v in model.state_dict().items():
        if "Lumen" in k:
            assert torch.equal(v, lumen_before[k]), k
    assert set(model.config.heads) >= {"Lumen-INST", "Nuclei-INST"}  # heads restored after the step


# ---- end to end on a tiny fake copy of ../shared/data ------------------------------------------
def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _fake_data(root: Path) -> None:
    rng = np.random.default_rng(3)
    mon = root / "nuclei" / "monuseg"
    rows = []
    for i in range(3):
        img, lab = _blobs(rng, 128, 15, 8)
        _write_png(mon / "images" / f"m{i}.png", img)
        _write_png(mon / "instance_masks_from_xml" / f"m{i}.png", lab.astype(np.uint16))
        _write_png(mon / "binary_masks" / f"m{i}.png", (lab > 0).astype(np.uint8))
        rows.append([f"m{i}", "train", f"images/m{i}.png", "", f"binary_masks/m{i}.png", f"instance_masks_from_xml/m{i}.png", 15])
    img, lab = _blobs(rng, 128, 15, 8)  # one image with a binary mask only
    _write_png(mon / "images" / "m3.png", img)
    _write_png(mon / "binary_masks" / "m3.png", (lab > 0).astype(np.uint8))
    rows.append(["m3", "train", "images/m3.png", "", "binary_masks/m3.png", "", ""])
    _write_csv(mon / "manifest.csv", ["name", "split", "image", "xml", "binary_mask", "instance_mask", "n_nuclei_xml"], rows)
    _write_csv(root / "nuclei" / "cpm15" / "manifest.csv", ["name", "width", "height"], [])
    crc = root / "nuclei" / "crchistophenotypes"
    pts = []
    for i in range(2):
        img, lab = _blobs(rng, 64, 6, 4)
        _write_png(crc / "images" / f"img{i}.png", img)
        for k in range(1, 7):
            yy, xx = np.nonzero(lab == k)
            if yy.size:
                pts.append([f"img{i}", xx.mean() + 1, yy.mean() + 1, ["epithelial", "fibroblast", "inflammatory", "others", "detection"][k % 5]])
    _write_csv(crc / "manifest.csv", ["image", "sfcn_opi_split"], [["img0", "train"], ["img1", "validation"]])
    _write_csv(crc / "points.csv", ["image", "x", "y", "label_file"], pts)
    glas = root / "glands" / "glas"
    rows = []
    for i in range(3):
        img, lab = _blobs(rng, 100, 2, 22)
        _write_png(glas / "images" / f"train_{i}.png", img)
        _write_png(glas / "annotations" / f"train_{i}_anno.png", lab.astype(np.uint8))
        rows.append([f"train_{i}", "train", f"images/train_{i}.png", f"annotations/train_{i}_anno.png", ["benign", "malignant"][i % 2]])
    _write_csv(glas / "manifest.csv", ["name", "split", "image", "annotation", "grade_glas"], rows)
    lc = root / "tissue" / "lc25000_lung_224"
    rows = []
    for c, name in enumerate(["lung_aca", "lung_n", "lung_scc"]):
        for j in range(2):
            _write_png(lc / name / f"{name}{j}.png", _blobs(rng, 32, 2 * c + 1, 3)[0])
            rows.append([f"{name}/{name}{j}.png", name])
    _write_csv(lc / "labels.csv", ["file", "label"], rows)
    ka = root / "tissue" / "kather2016_like_100"
    rows = []
    for j in range(4):
        _write_png(ka / "images" / f"k{j}.png", _blobs(rng, 48, j + 1, 4)[0])
        rows.append([f"images/k{j}.png", j % 8, "x"])
    _write_csv(ka / "labels.csv", ["file", "label_index", "label_name_assumed_tfds_order"], rows)


def _write_config(tmp: Path, run: str, steps: int) -> Path:
    (tmp / "configs").mkdir(exist_ok=True)
    split = tmp / "configs" / "split.yaml"
    split.write_text(
        "monuseg: [m2]\nglas: [train_2]\ncrchistophenotypes: [img1]\n"
        "lc25000: [lung_aca/lung_aca1.png, lung_n/lung_n1.png, lung_scc/lung_scc1.png]\nkather2016: [images/k3.png]\n"
    )
    cfg = {
        "data_root": "data", "splits": "configs/split.yaml", "run_dir": run, "output_model": f"{run}/model",
        "seed": 5, "threads": 1, "steps": steps, "steps_per_epoch": 2, "checkpoint_every": 1,
        "seg_batch": 2, "seg_crop_px": 64, "cls_batch": 2, "cls_crop_px": 32,
        "schedule": ["nuclei", "cls", "gland", "nuclei_type", "nuclei_binary"], "bf16": False,
        "source_mpp": {"monuseg": 0.5, "glas": 0.5, "crchistophenotypes": 0.5, "lc25000": 0.5, "kather2016": 0.5},
    }
    path = tmp / "configs" / f"{run}.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.slow
def test_train_end_to_end_resumes_exactly(tmp_path):
    _fake_data(tmp_path / "data")
    straight = load_config(_write_config(tmp_path, "a", steps=4))
    result = train(straight, progress=False)
    assert result.step == 4 and result.model_dir is not None
    assert (result.model_dir / "config.json").exists() and (result.model_dir / "weights.safetensors").exists()
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4]
    assert {"nuclei", "glands", "nuclei_type", "tissue"} <= set(lines[-1])

    # Same recipe, stopped after 2 steps and resumed: identical weights at step 4.
    half = load_config(_write_config(tmp_path, "b", steps=2))
    train(half, progress=False, export=False)
    resumed = load_config(_write_config(tmp_path, "b", steps=4))
    assert train(resumed, progress=False, export=False).step == 4
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.slow
def test_time_budget_ends_the_schedule_early(tmp_path):
    _fake_data(tmp_path / "data")
    path = _write_config(tmp_path, "t", steps=40)
    cfg = load_config(path, time_budget_minutes=1e-6, steps_per_epoch=100)
    result = train(cfg, progress=False)
    # The pace is checked every 10 steps; the budget is long spent by then, so the schedule ends at 10
    # with a final validation and the exported model.
    assert result.step == 10 and result.model_dir is not None
    lines = [json.loads(x) for x in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [10] and lines[0]["horizon"] == 10
    ck = torch.load(tmp_path / "t" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 10 and ck["horizon"] == 10 and ck["train_seconds"] > 0


@pytest.mark.slow
def test_fine_tuning_starts_from_init_weights_and_records_them(tmp_path):
    _fake_data(tmp_path / "data")
    first = train(load_config(_write_config(tmp_path, "s1", steps=2)), progress=False)
    assert first.model_dir is not None
    stage1 = torch.load(tmp_path / "s1" / "checkpoint.pt", weights_only=True)["model"]

    # Zero steps after the init: the weights must be exactly the stage-1 model's (not a seeded init).
    from wsi_mtl.network import load_model
    from wsi_mtl.train import load_initial_weights

    fresh = create_model("wsimtl_small", seed=123)
    assert load_initial_weights(fresh, first.model_dir) == 2
    for k, v in load_model(first.model_dir).state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v, rtol=0, atol=0, msg=k)
    fresh2 = create_model("wsimtl_small", seed=123)
    assert load_initial_weights(fresh2, tmp_path / "s1" / "checkpoint.pt") == 2
    enc = "backbone.conv1.weight"
    torch.testing.assert_close(fresh2.state_dict()[enc], stage1[enc], rtol=0, atol=0)

    # A stage-2 run from the stage-1 checkpoint records where it started, in its checkpoint and config.json.
    path = _write_config(tmp_path, "s2", steps=2)
    cfg = load_config(path, init_from=str(tmp_path / "s1" / "checkpoint.pt"), refit_patch_heads=True)
    result = train(cfg, progress=False)
    ck = torch.load(tmp_path / "s2" / "checkpoint.pt", weights_only=True)
    assert ck["init"] == {"from": str(tmp_path / "s1" / "checkpoint.pt"), "steps": 2}
    meta = json.loads((result.model_dir / "config.json").read_text())["extra"]["training"]
    assert meta["init_from"]["steps"] == 2 and meta["steps"] == 2 and meta["train_seconds"] > 0
    refit = meta["patch_head_refit"]  # the fake data labels every patch head
    assert set(refit) == {"Patch-LC25000", "Patch-Class", "Patch-GlaS"}
    assert all(isinstance(r["kept"], bool) and r["n_tiles"] >= 1 for r in refit.values())


def test_init_from_rejects_missing_and_mismatching_sources(tmp_path):
    from wsi_mtl.errors import InputError
    from wsi_mtl.train import load_initial_weights

    model = create_model("wsimtl_small", seed=0)
    with pytest.raises(InputError, match="no such model folder or checkpoint"):
        load_initial_weights(model, tmp_path / "nothing")
    bad = tmp_path / "bad.pt"
    state = model.state_dict()
    key = next(iter(state))
    torch.save({"model": {**state, key: torch.zeros(1)}, "step": 5}, bad)
    with pytest.raises(InputError, match="do not fit"):
        load_initial_weights(model, bad)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a readable checkpoint"):
        load_initial_weights(model, tmp_path / "junk.pt")


def test_trainable_limits_training_to_named_modules():
    """Only the named modules change; every other parameter and BatchNorm statistic stays bit-identical
    (the frozen BatchNorm layers run in eval mode, so their running averages are not fed)."""
    torch.manual_seed(0)
    model = create_model("wsimtl_small", seed=0)
    only = ("decoder_head.Nuclei", "output_head.Nuclei")
    cfg = _cfg(trainable=only)
    from wsi_mtl.train._loop import _trainable, _within

    params = _trainable(model, cfg.trainable)
    assert params and all(p.requires_grad for p in params)
    opt = torch.optim.AdamW(params, lr=3e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = make_seg_batch(np.random.default_rng(1), _synthetic_sources(), cfg, model.config.patch_heads, task="nuclei")
    losses = [train_step(model, opt, batch, cfg=cfg)["Nuclei-INST"] for _ in range(6)]
    assert losses[-1] < losses[0], losses
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(_within(k, only) for k in changed), sorted(changed - {k for k in changed if _within(k, only)})[:3]
    assert any(k.endswith("running_mean") for k in changed)  # the trained decoder's BatchNorm still learns its statistics
    assert not _within("decoder_head.Nuclei#TYPE.0.weight", only)  # a module path, not a string prefix


def test_trainable_rejects_unknown_modules():
    from wsi_mtl.errors import InputError
    from wsi_mtl.train._loop import _trainable

    with pytest.raises(InputError, match="trainable"):
        _trainable(create_model("wsimtl_small", seed=0), ["decoder_head.Nucleus"])


@pytest.mark.slow
def test_fine_tuning_keeps_the_init_models_untuned_settings(tmp_path):
    """A stage that tunes only nuclei (or nothing) keeps the gland settings its init_from model had."""
    from wsi_mtl.network import load_model, save_model

    _fake_data(tmp_path / "data")
    first = train(load_config(_write_config(tmp_path, "p1", steps=2)), progress=False)
    m = load_model(first.model_dir)
    settings = {"gland_threshold": 0.07, "gland_erosion_px": 9.0, "nuclei_min_area_px": 12.0}
    m.config = m.config.replace(extra=dict(m.config.extra) | {"postprocess": settings})
    save_model(m, tmp_path / "tuned", trained=True)
    path = _write_config(tmp_path, "p2", steps=2)
    cfg = load_config(path, init_from=str(tmp_path / "tuned"), trainable=["decoder_head.Nuclei", "output_head.Nuclei"])
    result = train(cfg, progress=False)
    assert json.loads((result.model_dir / "config.json").read_text())["extra"]["postprocess"] == settings
    # tuning nuclei alone replaces the nuclei fields and keeps the rest
    cfg = load_config(path, init_from=str(tmp_path / "tuned"), tune_postprocess=True, tune_images={"nuclei": 1, "gland": 0})
    export_model(cfg, which="last")
    pp = json.loads((result.model_dir / "config.json").read_text())["extra"]["postprocess"]
    assert pp["gland_threshold"] == 0.07 and pp["gland_erosion_px"] == 9.0 and "nuclei_marker_threshold" in pp
    # and the frozen modules are those of the init model
    a, b = load_model(tmp_path / "tuned").state_dict(), load_model(result.model_dir).state_dict()
    assert torch.equal(a["backbone.conv1.weight"], b["backbone.conv1.weight"])
    assert not torch.equal(a["output_head.Nuclei.INST.x.1.conv.weight"], b["output_head.Nuclei.INST.x.1.conv.weight"])


def test_a_run_starts_from_the_patch_pools_of_its_init_weights(tmp_path):
    """A model whose LC25000 head pools mean_std (see wsi_mtl.train._heads) can be fine-tuned,
    resumed and exported: the network is built with the pools its weights were fitted on."""
    import dataclasses

    from wsi_mtl.network import save_model
    from wsi_mtl.train import load_initial_weights
    from wsi_mtl.train._loop import _initial_config

    base = get_model_config("wsimtl_small")
    heads = {**base.heads, "Patch-LC25000": dataclasses.replace(base.heads["Patch-LC25000"], pool="mean_std")}
    src = create_model(base.replace(heads=heads), seed=2)
    save_model(src, tmp_path / "init")
    torch.save({"model": src.state_dict(), "step": 7}, tmp_path / "init.pt")
    path = _write_config(tmp_path, "r", steps=1)
    assert _initial_config(load_config(path)).heads["Patch-LC25000"].pool == "mean"  # no init: the arch as registered
    for init in (tmp_path / "init", tmp_path / "init.pt"):
        config = _initial_config(load_config(path, init_from=str(init)))
        assert config.heads["Patch-LC25000"].pool == "mean_std" and config.heads["Patch-Class"].pool == "mean"
        model = create_model(config, seed=0)
        load_initial_weights(model, init)
        for k, v in src.state_dict().items():
            torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0, msg=k)
    # a run resuming its own checkpoint takes that checkpoint's pools, whatever init_from says
    plain = create_model(base, seed=0)
    torch.save({"model": plain.state_dict(), "step": 1}, tmp_path / "plain.pt")
    assert _initial_config(load_config(path, init_from=str(tmp_path / "plain.pt")), src.state_dict()).heads["Patch-LC25000"].pool == "mean_std"
    assert _initial_config(load_config(path, init_from=str(tmp_path / "init")), plain.state_dict()).heads["Patch-LC25000"].pool == "mean"


def test_a_run_can_add_a_fine_branch_and_keeps_the_fine_branches_of_its_weights(tmp_path):
    """``arch_params`` in a training config adds a fine branch to a trained model (it starts at
    zero, the rest loads as it was); a run resuming or starting from weights with a fine branch
    builds it, whatever its own config says; a branch missing from the weights is only allowed
    where it is a fine branch."""
    import dataclasses

    from wsi_mtl.errors import InputError
    from wsi_mtl.network import save_model
    from wsi_mtl.train import load_initial_weights
    from wsi_mtl.train._loop import _initial_config

    base = get_model_config("wsimtl_small")
    plain = create_model(base, seed=2)
    save_model(plain, tmp_path / "plain")
    path = _write_config(tmp_path, "f", steps=1)
    adding = load_config(path, init_from=str(tmp_path / "plain"), arch_params={"fine_decoders": ["Nuclei"], "fine_channels": 8})
    config = _initial_config(adding)
    assert config.arch_params.fine_decoders == ("Nuclei",) and config.arch_params.fine_channels == 8
    model = create_model(config, seed=0)
    load_initial_weights(model, tmp_path / "plain")
    state = model.state_dict()
    assert not state["output_head.Nuclei.INST.fine.out.weight"].any()
    torch.testing.assert_close(state["output_head.Nuclei.INST.x.1.conv.weight"], plain.state_dict()["output_head.Nuclei.INST.x.1.conv.weight"], rtol=0, atol=0)
    # weights with a fine branch: a folder, a .pt, or the run's own checkpoint
    save_model(model, tmp_path / "fine")
    torch.save({"model": model.state_dict(), "step": 3}, tmp_path / "fine.pt")
    for init in (tmp_path / "fine", tmp_path / "fine.pt"):
        got = _initial_config(load_config(path, init_from=str(init))).arch_params
        assert (got.fine_decoders, got.fine_channels) == (("Nuclei",), 8)
    got = _initial_config(load_config(path, init_from=str(tmp_path / "plain")), model.state_dict()).arch_params
    assert (got.fine_decoders, got.fine_channels) == (("Nuclei",), 8)
    assert _initial_config(load_config(path, init_from=str(tmp_path / "fine")), plain.state_dict()).arch_params.fine_decoders == ()
    # only fine-branch tensors may be absent from the source
    lacking = {k: v for k, v in plain.state_dict().items() if not k.startswith("output_head.Gland.INST.x.1")}
    torch.save({"model": lacking}, tmp_path / "lacking.pt")
    with pytest.raises(InputError, match="do not fit.*output_head.Gland.INST.x.1"):
        load_initial_weights(create_model(config, seed=0), tmp_path / "lacking.pt")
    for wrong in ("Patch-GlaS", "Nucleus"):
        with pytest.raises(InputError, match="fine_decoders .* do not fit.*its decoders are"):
            _initial_config(load_config(path, arch_params={"fine_decoders": [wrong]}))
    with pytest.raises(InputError, match="arch_params .* do not fit"):
        _initial_config(load_config(path, arch_params={"fine_width": 3}))
    assert dataclasses.asdict(_initial_config(load_config(path)).arch_params) == dataclasses.asdict(base.arch_params)
    # a private shallow encoder added to trained weights starts as a copy of their shared one
    private = load_config(path, init_from=str(tmp_path / "fine"), arch_params={"private_decoders": ["Nuclei"], "private_stages": 3})
    config = _initial_config(private)
    assert config.arch_params.private_decoders == ("Nuclei",) and config.arch_params.fine_decoders == ("Nuclei",)
    grown = create_model(config, seed=0)
    load_initial_weights(grown, tmp_path / "fine")
    got = grown.state_dict()
    for key in ("conv1.weight", "bn1.running_var", "layer2.1.conv2.weight"):
        torch.testing.assert_close(got[f"private_encoder.Nuclei.{key}"], got[f"backbone.{key}"], rtol=0, atol=0)
    resumed = _initial_config(load_config(path), grown.state_dict()).arch_params
    assert (resumed.private_decoders, resumed.private_stages, resumed.fine_channels) == (("Nuclei",), 3, 8)
    # a private encoder grown by one stage keeps its trained stages and copies the new one (layer3)
    # from the shared encoder
    for k, v in grown.private_encoder["Nuclei"].state_dict().items():
        if v.is_floating_point():
            v.add_(0.25)  # as if trained: no longer equal to the shared copy
    save_model(grown, tmp_path / "private3")
    deeper = _initial_config(load_config(path, init_from=str(tmp_path / "private3"), arch_params={"private_stages": 4}))
    assert deeper.arch_params.private_stages == 4
    grown4 = create_model(deeper, seed=0)
    load_initial_weights(grown4, tmp_path / "private3")
    got4, src = grown4.state_dict(), grown.state_dict()
    for key in ("layer3.0.conv1.weight", "layer3.1.bn2.running_mean"):
        torch.testing.assert_close(got4[f"private_encoder.Nuclei.{key}"], got4[f"backbone.{key}"], rtol=0, atol=0)
    for key in ("layer2.0.conv1.weight", "layer1.1.bn2.running_var"):
        torch.testing.assert_close(got4[f"private_encoder.Nuclei.{key}"], src[f"private_encoder.Nuclei.{key}"])
        assert not torch.equal(got4[f"private_encoder.Nuclei.{key}"], got4[f"backbone.{key}"])
    assert _initial_config(load_config(path), got4).arch_params.private_stages == 4
    with pytest.raises(InputError, match="private_decoders .* do not fit"):
        _initial_config(load_config(path, arch_params={"private_decoders": ["Glands"]}))


def test_training_a_new_fine_branch_exports_it(tmp_path):
    _fake_data(tmp_path / "data")
    from wsi_mtl.network import load_model, save_model

    save_model(create_model("wsimtl_small", seed=2), tmp_path / "plain")
    path = _write_config(tmp_path, "g", steps=3)
    cfg = load_config(path, init_from=str(tmp_path / "plain"), trainable=["decoder_head.Nuclei", "output_head.Nuclei"],
                      arch_params={"fine_decoders": ["Nuclei"]}, schedule=["nuclei"])
    result = train(cfg, progress=False)
    saved = json.loads((result.model_dir / "config.json").read_text())["arch_params"]
    assert saved["fine_decoders"] == ["Nuclei"]
    state = load_model(result.model_dir).state_dict()
    assert state["output_head.Nuclei.INST.fine.out.weight"].abs().sum() > 0  # trained away from its zero start
    torch.testing.assert_close(state["backbone.conv1.weight"], load_model(tmp_path / "plain").state_dict()["backbone.conv1.weight"], rtol=0, atol=0)


def test_stages_keep_the_records_of_the_stages_before(tmp_path):
    """A model fine-tuned from a folder keeps that folder's training record, and the records it
    carried, oldest first; exporting the same run again does not repeat its own record."""
    _fake_data(tmp_path / "data")
    from wsi_mtl.network import load_model, save_model
    from wsi_mtl.train import export_model

    start = create_model("wsimtl_small", seed=2)
    start.config = start.config.replace(extra={"training": {"steps": 7, "config": "stage-b", "earlier": [{"steps": 4, "config": "stage-a"}]}})
    save_model(start, tmp_path / "start", trained=True)
    cfg = load_config(_write_config(tmp_path, "h", steps=2), init_from=str(tmp_path / "start"), schedule=["nuclei"])
    result = train(cfg, progress=False)
    record = load_model(result.model_dir).config.extra["training"]
    assert record["steps"] == 2 and record["init_from"]["steps"] == 7
    assert [e["config"] for e in record["earlier"]] == ["stage-a", "stage-b"]
    assert "earlier" not in record["earlier"][1]
    # the output folder now holds this run's export; exporting again from it as init_from keeps the list
    again = export_model(load_config(_write_config(tmp_path, "h", steps=2), init_from=str(result.model_dir), schedule=["nuclei"]), which="last")
    assert [e["config"] for e in load_model(again).config.extra["training"]["earlier"]] == ["stage-a", "stage-b"]


def test_tune_only_rewrites_the_settings_and_keeps_the_weights(tmp_path):
    """`wsimtl train --tune-only`: the model folder's post-processing is re-tuned on the named
    sources' training images, the weights (and their sha256) stay, the replaced tuning is kept."""
    from click.testing import CliRunner

    from wsi_mtl.cli import cli
    from wsi_mtl.errors import InputError
    from wsi_mtl.network.io import file_sha256
    from wsi_mtl.train import retune_model

    _fake_data(tmp_path / "data")
    path = _write_config(tmp_path, "t", steps=2)
    first = train(load_config(path, tune_postprocess=True, tune_images={"nuclei": 2, "gland": 0}), progress=False)
    weights = first.model_dir / "weights.safetensors"
    sha = file_sha256(weights)
    before = json.loads((first.model_dir / "config.json").read_text())["extra"]
    res = CliRunner().invoke(cli, ["train", str(path), "--tune-only"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert file_sha256(weights) == sha
    # default tune_sources: every nuclei source; now only monuseg, through the function
    cfg = load_config(path, tune_postprocess=True, tune_images={"nuclei": 25, "gland": 0}, tune_sources={"nuclei": ["monuseg"]})
    retune_model(cfg)
    after = json.loads((first.model_dir / "config.json").read_text())["extra"]
    assert file_sha256(weights) == sha and after["training"]["steps"] == before["training"]["steps"]
    tuning = after["training"]["postprocess_tuning"]
    assert tuning["sources"] == {"nuclei": ["monuseg"]} and tuning["n_images"]["nuclei"] == 2  # m2 is held out
    assert "previous" in tuning and "nuclei_split_h" in after["postprocess"]
    assert "sources" not in before["training"]["postprocess_tuning"]  # every source
    # a training run that tunes on named sources records them the same way
    named = train(load_config(path, tune_postprocess=True, tune_images={"nuclei": 25, "gland": 0}, tune_sources={"nuclei": ["monuseg"]},
                              output_model=str(tmp_path / "named"), run_dir=str(tmp_path / "named-run")), progress=False)
    assert json.loads((named.model_dir / "config.json").read_text())["extra"]["training"]["postprocess_tuning"]["sources"] == {"nuclei": ["monuseg"]}
    with pytest.raises(InputError, match="no nuclei training images from"):
        retune_model(load_config(path, tune_sources={"nuclei": ["cpm15"]}))
    with pytest.raises(InputError, match="tune_sources"):
        load_config(path, tune_sources={"lumen": ["x"]})
    with pytest.raises(InputError, match="no model folder"):
        retune_model(load_config(path, output_model=str(tmp_path / "nowhere")))


def test_average_with_re_tunes_the_weighted_mean_of_two_models(tmp_path):
    """`average_with`: the model re-tuned is init_from's weights averaged with another model's
    (floating tensors mixed, batch counters kept), recorded in its config; bad settings are refused."""
    from safetensors.torch import load_file

    from wsi_mtl.errors import InputError
    from wsi_mtl.network import create_model, save_model
    from wsi_mtl.train import retune_model
    from wsi_mtl.train._average import average_models

    a, b = tmp_path / "a", tmp_path / "b"
    save_model(create_model("wsimtl_small", seed=1), a)
    save_model(create_model("wsimtl_small", seed=2), b)
    wa, wb = load_file(a / "weights.safetensors"), load_file(b / "weights.safetensors")
    mixed = load_file(average_models(a, b, 0.25, tmp_path / "m") / "weights.safetensors")
    for k, v in wa.items():
        want = 0.75 * v.double() + 0.25 * wb[k].double() if v.is_floating_point() else v
        assert torch.allclose(mixed[k].double(), want.to(v.dtype).double()), k
    assert any(not torch.equal(wa[k], mixed[k]) for k in wa)
    _fake_data(tmp_path / "data")
    path = _write_config(tmp_path, "avg", steps=2)
    out = tmp_path / "avg-model"
    cfg = load_config(path, init_from=str(a), average_with={"model": str(b), "weight": 0.5}, output_model=str(out),
                      tune_postprocess=True, tune_images={"nuclei": 2, "gland": 0})
    retune_model(cfg)
    extra = json.loads((out / "config.json").read_text())["extra"]
    assert extra["training"]["averaged_with"]["weight"] == 0.5 and "postprocess_tuning" in extra["training"]
    half = load_file(out / "weights.safetensors")
    k = next(k for k, v in wa.items() if v.is_floating_point() and not torch.equal(v, wb[k]))
    assert torch.allclose(half[k].double(), (wa[k].double() + wb[k].double()) / 2, atol=1e-6)
    for bad in ({"model": str(b)}, {"model": str(b), "weight": 1.0}, {"model": str(b), "weight": "half"}):
        with pytest.raises(InputError, match="average_with"):
            load_config(path, average_with=bad)
    with pytest.raises(InputError, match="average_with is for re-tuning"):
        train(load_config(path, init_from=str(a), average_with={"model": str(b), "weight": 0.5}), progress=False)
    other_arch = tmp_path / "c"
    save_model(create_model("cerberus_r34", seed=0), other_arch)
    with pytest.raises(InputError, match="tensors differ"):
        average_models(a, other_arch, 0.5, tmp_path / "x")


@pytest.mark.slow
def test_tune_only_refits_the_tissue_head_and_writes_given_settings(tmp_path):
    """A no-training stage that refits Patch-Class with GlaS gland cells and writes a setting chosen
    earlier: only that head's weights may change, nothing is tuned, and both are recorded."""
    from safetensors.torch import load_file

    from wsi_mtl.train import retune_model

    _fake_data(tmp_path / "data")
    path = _write_config(tmp_path, "t", steps=2)
    first = train(load_config(path), progress=False)
    before = load_file(first.model_dir / "weights.safetensors")
    old = json.loads((first.model_dir / "config.json").read_text())["extra"]
    cfg = load_config(path, refit_patch_heads=True, refit_heads=["Patch-Class"], refit_gland_cells=0.5,
                      tune_images={"nuclei": 0, "gland": 0}, postprocess={"gland_max_nonglandular": 0.8})
    retune_model(cfg)
    after = load_file(first.model_dir / "weights.safetensors")
    extra = json.loads((first.model_dir / "config.json").read_text())["extra"]
    refit = extra["training"]["patch_head_refit"]
    assert set(refit) == {"Patch-Class"} and refit["Patch-Class"]["n_gland_images"] == 2  # train_0, train_1 (train_2 is validation)
    assert refit["Patch-Class"]["n_tiles"] == 3 + 2  # Kather k0..k2 and the two GlaS images
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert all(k.startswith("decoder_head.Patch-Class.") for k in changed)
    assert bool(changed) == refit["Patch-Class"]["kept"]
    assert extra["postprocess"] == {**old.get("postprocess", {}), "gland_max_nonglandular": 0.8}
    assert extra["training"]["postprocess_given"] == {"gland_max_nonglandular": 0.8}
    assert extra["training"].get("postprocess_tuning") == old["training"].get("postprocess_tuning")  # nothing tuned

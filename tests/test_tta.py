"""Test-time augmentation: the views invert exactly, averaging over the whole dihedral group makes a
network's maps equivariant, and segment / evaluate take the option and record it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsi_mtl import synthetic
from wsi_mtl.errors import InputError
from wsi_mtl.network import create_model
from wsi_mtl.network.tta import TTA_VIEWS, apply_view, dihedral_views, predict_tta, undo_view
from wsi_mtl.pipeline import segment_slide
from wsi_mtl.train import predict_image


def test_views_invert_and_are_distinct():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)  # non-square, no symmetry
    seen = []
    for view in dihedral_views(8):
        y = apply_view(x, view)
        assert torch.equal(undo_view(y, view), x), view
        assert y.shape[-2:] == ((6, 4) if view[0] % 2 else (4, 6))
        assert not any(y.shape == s.shape and torch.equal(y, s) for s in seen), view
        seen.append(y)
    # the first four never swap height and width (usable on any tile shape without a transpose)
    assert all(v[0] % 2 == 0 for v in dihedral_views(4))


@pytest.mark.parametrize("bad", [0, 3, 5, 16])
def test_unknown_view_counts_are_refused(bad):
    with pytest.raises(ValueError, match="views"):
        dihedral_views(bad)


class _Equivariant(torch.nn.Module):
    """A per-pixel softmax and a 4x4-pooled 'patch' map: equivariant under every view, so TTA must
    return exactly the plain prediction if (and only if) each view is mapped back correctly."""

    def predict(self, x: torch.Tensor, heads=None) -> dict[str, torch.Tensor]:
        logits = torch.stack([x[:, 0] - x[:, 1], x[:, 2] * 0.5, x[:, 1] * x[:, 0] / 255.0], dim=1) / 40.0
        return {"seg": torch.softmax(logits, 1), "patch": torch.softmax(F.avg_pool2d(logits, 4), 1)}


@pytest.mark.parametrize("views", TTA_VIEWS)
def test_equivariant_model_is_unchanged_by_tta(views):
    x = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(1)) * 255
    model = _Equivariant()
    plain = model.predict(x)
    tta = predict_tta(model, x, views=views)
    for name in plain:
        assert tta[name].shape == plain[name].shape and tta[name].dtype == torch.float32
        torch.testing.assert_close(tta[name], plain[name], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    m = create_model("wsimtl_small", seed=3).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that the maps depend on the input
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
    return m


def test_one_view_is_plain_predict(net):
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(2)) * 255
    with torch.inference_mode():
        a, b = net.predict(x), predict_tta(net, x, views=1)
    for name in a:
        assert torch.equal(a[name], b[name])


def test_full_group_average_is_equivariant(net):
    """mean_g g^-1 f(g x) commutes with every view h, whatever f is: a check that could only pass
    if all eight views and their inverses are right, for the segmentation and the patch maps."""
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(4)) * 255
    with torch.inference_mode():
        ref = predict_tta(net, x, views=8)
        plain = net.predict(x)
        for h in dihedral_views(8)[1:]:
            moved = predict_tta(net, apply_view(x, h).contiguous(), views=8)
            for name, p in ref.items():
                torch.testing.assert_close(undo_view(moved[name], h), p, rtol=0, atol=2e-5)
    # and the average differs from one pass: the untrained network is not equivariant by itself
    assert max(float((ref[n] - plain[n]).abs().max()) for n in ref) > 1e-3
    for p in ref.values():
        torch.testing.assert_close(p.sum(1), torch.ones_like(p.sum(1)), rtol=0, atol=1e-5)


def test_predict_image_takes_tta(net):
    image = np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    one = predict_image(net, image, heads=["Nuclei-INST", "Patch-Class"], bf16=False)
    four = predict_image(net, image, heads=["Nuclei-INST", "Patch-Class"], bf16=False, tta=4)
    for name in one:
        assert four[name].shape == one[name].shape
        assert not np.allclose(four[name], one[name])


@pytest.mark.slow
def test_segment_applies_and_records_tta_and_refuses_bad_values(he_image, tmp_path, monkeypatch):
    import zarr

    import wsi_mtl.engine as engine
    from wsi_mtl.store import PREDICTIONS

    real = engine.predict_tta
    views_seen: list[int] = []

    def spy(*args, **kwargs):
        views_seen.append(kwargs.get("views", 1))
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "predict_tta", spy)
    slide = synthetic.write_svs(tmp_path / "s.svs", he_image[256:768, 512:1024], mpp=0.25, compression="jpeg", tile=256, levels=(1, 4))
    maps = {}
    for views in (1, 2):
        views_seen.clear()
        res = segment_slide(slide, tmp_path / f"out{views}", tile_size=256, batch_size=1, objects=False, progress=False, tta=views,
                            precision="fp32")
        run = json.loads((res.result_dir / "run.json").read_text())
        assert run["parameters"]["tta_views"] == views and run["fingerprint"]["tta"] == views
        assert views_seen and set(views_seen) == {views}  # every batch went through that many views
        maps[views] = zarr.open_group(res.result_dir / PREDICTIONS, mode="r")["Nuclei-INST"]["0"][:].astype(int)
    assert maps[1].shape == maps[2].shape
    assert np.abs(maps[1] - maps[2]).max() > 2  # the flipped view changed the stored probabilities (beyond uint8 rounding)
    with pytest.raises(InputError, match="tta"):
        segment_slide(slide, tmp_path / "bad", tile_size=256, objects=False, progress=False, tta=3)


def test_views_with_a_margin_average_the_cropped_maps() -> None:
    """The engine's call with --tta: each view computes its cores only; under bf16 autocast the
    average is bit for bit the crop of the whole maps' average (the crop is the same on every side,
    so it commutes with every view)."""
    from pathlib import Path

    from wsi_mtl.network import load_model

    model = load_model(Path(__file__).resolve().parents[1] / "models" / "wsimtl-small")
    x = (torch.rand(1, 3, 320, 320, generator=torch.Generator().manual_seed(2)) * 255).contiguous(memory_format=torch.channels_last)
    m = 64
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        whole, core = predict_tta(model, x, views=8), predict_tta(model, x, views=8, margin=m)
    for name, p in whole.items():
        want = p if name in model.config.patch_heads else p[..., m:-m, m:-m]
        assert torch.equal(core[name], want), name

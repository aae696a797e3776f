"""External encoders in torchvision's layout (ResNet-50, DenseNet-121): keys, shapes, what they compute, loading."""

from __future__ import annotations

import functools
import math
import re
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsi_mtl.errors import ModelError
from wsi_mtl.network.external import build_encoder, detect_arch, load_external


def seeded_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The Cerberus fixture's rule (../shared/reference/cerberus/README.md): weights from crc32 of each key."""
    out = {}
    for key, ref in module.state_dict().items():
        s = tuple(ref.shape)
        rng = np.random.default_rng(zlib.crc32(key.encode()))
        if key.endswith("num_batches_tracked"):
            out[key] = torch.zeros((), dtype=torch.long)
            continue
        if key.endswith("running_mean"):
            v = 0.1 * rng.standard_normal(s)
        elif key.endswith("running_var"):
            v = 1.0 + 0.5 * rng.random(s)
        elif len(s) >= 2:
            v = rng.standard_normal(s) * math.sqrt(2 / np.prod(s[1:]))
        elif key.endswith("weight"):
            v = 1.0 + 0.1 * rng.standard_normal(s)
        else:
            v = 0.05 * rng.standard_normal(s)
        out[key] = torch.from_numpy(np.asarray(v, np.float32))
    return out


# ---- what torchvision's layout implies, written independently of the modules ------------------------
def _bn(sd: dict, p: str, x: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"], False, 0.0, 1e-5)


def reference_resnet50(sd: dict, x: torch.Tensor) -> list[torch.Tensor]:
    """ResNet-50 straight from the state dict: every conv's stride and padding read off its kernel and
    place (the stride on the 3x3 conv of each stage's first block, and on its downsample)."""
    x = F.max_pool2d(F.relu(_bn(sd, "bn1", F.conv2d(x, sd["conv1.weight"], stride=2, padding=3))), 3, 2, 1)
    outs = []
    for layer in range(1, 5):
        b = 0
        while f"layer{layer}.{b}.conv1.weight" in sd:
            p = f"layer{layer}.{b}"
            stride = 2 if (layer > 1 and b == 0) else 1
            y = F.relu(_bn(sd, p + ".bn1", F.conv2d(x, sd[p + ".conv1.weight"])))
            y = F.relu(_bn(sd, p + ".bn2", F.conv2d(y, sd[p + ".conv2.weight"], stride=stride, padding=1)))
            y = _bn(sd, p + ".bn3", F.conv2d(y, sd[p + ".conv3.weight"]))
            idn = x
            if p + ".downsample.0.weight" in sd:
                idn = _bn(sd, p + ".downsample.1", F.conv2d(x, sd[p + ".downsample.0.weight"], stride=stride))
            x = F.relu(y + idn)
            b += 1
        outs.append(x)
    return outs


def reference_densenet121(sd: dict, x: torch.Tensor) -> list[torch.Tensor]:
    """DenseNet-121 straight from the state dict (dense layers found by their key names)."""
    f = "features."
    x = F.max_pool2d(F.relu(_bn(sd, f + "norm0", F.conv2d(x, sd[f + "conv0.weight"], stride=2, padding=3))), 3, 2, 1)
    outs = []
    for block in range(1, 5):
        feats = [x]
        i = 1
        while f"{f}denseblock{block}.denselayer{i}.conv1.weight" in sd:
            p = f"{f}denseblock{block}.denselayer{i}"
            y = torch.cat(feats, 1)
            y = F.conv2d(F.relu(_bn(sd, p + ".norm1", y)), sd[p + ".conv1.weight"])
            y = F.conv2d(F.relu(_bn(sd, p + ".norm2", y)), sd[p + ".conv2.weight"], padding=1)
            feats.append(y)
            i += 1
        x = torch.cat(feats, 1)
        if block < 4:
            outs.append(x)
            t = f"{f}transition{block}"
            x = F.avg_pool2d(F.conv2d(F.relu(_bn(sd, t + ".norm", x)), sd[t + ".conv.weight"]), 2, 2)
    outs.append(F.relu(_bn(sd, f + "norm5", x)))
    return outs


# ---- layout ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, n_keys, n_params", [("resnet50", 320, 25_557_032), ("densenet121", 727, 7_978_856)])
def test_layout_matches_torchvision_counts(arch: str, n_keys: int, n_params: int) -> None:
    """torchvision's state dicts (classifier included) have these key and parameter counts."""
    enc = build_encoder(arch)
    dim = enc.out_channels[-1]
    assert len(enc.backbone.state_dict()) + 2 == n_keys
    assert sum(p.numel() for p in enc.backbone.parameters()) + dim * 1000 + 1000 == n_params


def test_resnet50_key_shapes() -> None:
    sd = build_encoder("resnet50").backbone.state_dict()
    assert sd["conv1.weight"].shape == (64, 3, 7, 7)
    for layer, (n, w, cin) in enumerate([(3, 64, 64), (4, 128, 256), (6, 256, 512), (3, 512, 1024)], start=1):
        assert f"layer{layer}.{n - 1}.conv3.weight" in sd and f"layer{layer}.{n}.conv1.weight" not in sd
        assert sd[f"layer{layer}.0.conv1.weight"].shape == (w, cin, 1, 1)
        assert sd[f"layer{layer}.0.conv2.weight"].shape == (w, w, 3, 3)
        assert sd[f"layer{layer}.0.conv3.weight"].shape == (4 * w, w, 1, 1)
        assert sd[f"layer{layer}.0.downsample.0.weight"].shape == (4 * w, cin, 1, 1)
        assert f"layer{layer}.1.downsample.0.weight" not in sd


def test_densenet121_key_shapes() -> None:
    sd = build_encoder("densenet121").backbone.state_dict()
    c = 64
    for block, n in enumerate((6, 12, 24, 16), start=1):
        for i in range(1, n + 1):
            p = f"features.denseblock{block}.denselayer{i}"
            assert sd[p + ".norm1.weight"].shape == (c + 32 * (i - 1),)
            assert sd[p + ".conv1.weight"].shape == (128, c + 32 * (i - 1), 1, 1)
            assert sd[p + ".conv2.weight"].shape == (32, 128, 3, 3)
        c += 32 * n
        if block < 4:
            assert sd[f"features.transition{block}.conv.weight"].shape == (c // 2, c, 1, 1)
            c //= 2
    assert sd["features.norm5.weight"].shape == (1024,)


@pytest.mark.slow
@pytest.mark.parametrize("arch, reference", [("resnet50", reference_resnet50), ("densenet121", reference_densenet121)])
def test_computes_what_the_layout_implies(arch: str, reference) -> None:
    enc = build_encoder(arch).eval()
    sd = dict(_seeded_backbone(arch))
    enc.backbone.load_state_dict(sd)
    rgb = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (2, 3, 64, 64)).astype(np.float32))
    with torch.no_grad():
        ours = enc.levels(rgb)
        normed = (rgb / 255.0 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        ref = reference(sd, normed)
    assert len(ours) == len(ref) == 4
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()


# ---- loading -----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _seeded_backbone(arch: str) -> dict[str, torch.Tensor]:
    return seeded_state(build_encoder(arch).backbone)


def _checkpoint(arch: str, heads: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    sd = dict(_seeded_backbone(arch))
    dim = {"resnet50": 2048, "densenet121": 1024}[arch]
    for name, n in (heads or {}).items():
        rng = np.random.default_rng(len(name))
        sd[f"heads.{name}.weight"] = torch.from_numpy(rng.standard_normal((n, dim)).astype(np.float32) * 0.05)
        sd[f"heads.{name}.bias"] = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
    return sd


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet50", "densenet121"])
def test_load_pth_and_safetensors_with_heads(tmp_path, arch: str) -> None:
    from safetensors.torch import save_file

    sd = _checkpoint(arch, {"tissue": 4})
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "enc.pth")
    save_file({k: v.contiguous() for k, v in sd.items() if not k.endswith("num_batches_tracked")}, str(tmp_path / "enc.safetensors"))
    x = torch.rand(1, 3, 64, 64) * 255
    outs = []
    for name in ("enc.pth", "enc.safetensors"):
        enc = load_external(tmp_path / name)
        assert enc.arch == arch and list(enc.heads) == ["tissue"] and len(enc.weights_sha256) == 64
        with torch.no_grad():
            out = enc(x)
        pooled = out["features"]
        expected = pooled @ sd["heads.tissue.weight"].T + sd["heads.tissue.bias"]
        assert torch.allclose(out["tissue"], expected, atol=1e-5)
        outs.append(pooled)
    assert torch.allclose(outs[0], outs[1])


def test_imagenet_classifier_is_not_a_head(tmp_path) -> None:
    sd = _checkpoint("resnet50")
    sd["fc.weight"] = torch.zeros(1000, 2048)
    sd["fc.bias"] = torch.zeros(1000)
    torch.save(sd, tmp_path / "tv.pth")
    assert list(load_external(tmp_path / "tv.pth").heads) == []


def test_old_densenet_key_names_load(tmp_path) -> None:
    sd = _checkpoint("densenet121")
    old = {re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k): v for k, v in sd.items()}
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    torch.save(old, tmp_path / "old.pth")
    enc = load_external(tmp_path / "old.pth")
    assert torch.equal(enc.backbone.state_dict()["features.denseblock1.denselayer1.norm1.weight"],
                       sd["features.denseblock1.denselayer1.norm1.weight"])


def test_partial_or_wrong_checkpoint_names_the_key(tmp_path) -> None:
    sd = _checkpoint("resnet50")
    partial = {k: v for k, v in sd.items() if not k.startswith("layer4.2.")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ModelError, match=r"missing key 'layer4\.2\.conv1\.weight'"):
        load_external(tmp_path / "partial.pth")
    wrong = dict(sd)
    wrong["layer2.0.conv2.weight"] = torch.zeros(128, 128, 1, 1)
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(ModelError, match=r"layer2\.0\.conv2\.weight' has shape \(128, 128, 1, 1\), expected \(128, 128, 3, 3\)"):
        load_external(tmp_path / "wrong.pth")
    with pytest.raises(ModelError, match="ResNet-50"):
        load_external(tmp_path / "wrong.pth", arch="resnet50")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError):
        load_external(tmp_path / "junk.pth")


def test_detect_arch() -> None:
    assert detect_arch(_checkpoint("densenet121")) == "densenet121"
    assert detect_arch(_checkpoint("resnet50")) == "resnet50"

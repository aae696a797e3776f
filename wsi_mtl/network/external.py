"""External patch encoders in torchvision's state-dict layout: ResNet-50 and DenseNet-121.

Written in plain torch (torchvision is not a dependency), with module names that make a
torchvision state dict (or the multitask-dipath release of Mormont et al. 2020, which uses the same
layout, DenseNet keys under ``features.``) load unchanged. Inputs are RGB 0-255; the encoder
scales them to 0-1 and normalises with the ImageNet mean and standard deviation.

Linear layers in the checkpoint beyond the architecture (``fc``/``classifier`` or
``heads.<name>``, ``<name>.weight`` of shape classes x features) become classification heads over
the globally pooled deepest features; a 1000-class ``fc``/``classifier`` is the ImageNet classifier
and is ignored.

>>> enc = build_encoder("resnet50")
>>> sum(p.numel() for p in enc.backbone.parameters()) + 2048 * 1000 + 1000  # torchvision's count, fc included
25557032
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from .io import clean_state_dict, file_sha256, read_torch_checkpoint

__all__ = ["ResNet50", "DenseNet121", "ExternalEncoder", "ARCHS", "build_encoder", "load_external", "detect_arch",
           "is_external_checkpoint", "IMAGENET_MEAN", "IMAGENET_STD"]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_SUFFIXES = (".pth", ".pt", ".tar", ".bin", ".ckpt", ".safetensors")
_IMAGENET_CLASSES = 1000


# ---- ResNet-50 ----------------------------------------------------------------------------------
class Bottleneck(nn.Module):
    """torchvision's Bottleneck (v1.5: the stride sits on the 3x3 conv), expansion 4."""

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + identity)


class ResNet50(nn.Module):
    """ResNet-50 without its classifier; :meth:`forward` returns the outputs of layer1..layer4
    (256, 512, 1024, 2048 channels at 1/4 .. 1/32 of the input)."""

    blocks = (3, 4, 6, 3)
    widths = (64, 128, 256, 512)

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (n, width) in enumerate(zip(self.blocks, self.widths), start=1):
            stride = 1 if i == 1 else 2
            layers = [Bottleneck(cin, width, stride)] + [Bottleneck(width * 4, width, 1) for _ in range(n - 1)]
            self.add_module(f"layer{i}", nn.Sequential(*layers))
            cin = width * 4
        self.out_channels = [w * 4 for w in self.widths]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)
        feats = []
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            feats.append(x)
        return feats


# ---- DenseNet-121 -------------------------------------------------------------------------------
class DenseLayer(nn.Module):
    """norm1-relu-conv1 (1x1, 4 x growth) -> norm2-relu-conv2 (3x3, growth): the new channels."""

    def __init__(self, cin: int, growth: int = 32, bn_size: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(out)))


class DenseBlock(nn.ModuleDict):
    """``denselayer1..n``; each layer sees the concatenation of the input and all earlier outputs."""

    def __init__(self, layers: int, cin: int, growth: int = 32) -> None:
        super().__init__({f"denselayer{i + 1}": DenseLayer(cin + i * growth, growth) for i in range(layers)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        feats = [x]
        for layer in self.values():
            feats.append(layer(torch.cat(feats, 1)))
        return torch.cat(feats, 1)


class Transition(nn.Sequential):
    """norm-relu-conv (1x1, halves the channels)-avgpool 2x2."""

    def __init__(self, cin: int) -> None:
        super().__init__(OrderedDict(
            norm=nn.BatchNorm2d(cin), relu=nn.ReLU(), conv=nn.Conv2d(cin, cin // 2, 1, bias=False), pool=nn.AvgPool2d(2, 2),
        ))


class DenseNet121(nn.Module):
    """DenseNet-121 (growth 32, blocks 6-12-24-16) without its classifier, keys under ``features.``.

    :meth:`forward` returns the outputs of denseblock1..3 (256, 512, 1024 channels) and the final
    ReLU(norm5) (1024 channels, 1/32 of the input), the map torchvision pools for its classifier.
    """

    blocks = (6, 12, 24, 16)

    def __init__(self) -> None:
        super().__init__()
        modules: OrderedDict[str, nn.Module] = OrderedDict(
            conv0=nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), norm0=nn.BatchNorm2d(64), relu0=nn.ReLU(),
            pool0=nn.MaxPool2d(3, stride=2, padding=1),
        )
        c = 64
        for i, n in enumerate(self.blocks, start=1):
            modules[f"denseblock{i}"] = DenseBlock(n, c)
            c += n * 32
            if i < len(self.blocks):
                modules[f"transition{i}"] = Transition(c)
                c //= 2
        modules["norm5"] = nn.BatchNorm2d(c)
        self.features = nn.Sequential(modules)
        self.out_channels = [256, 512, 1024, c]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for name, module in self.features.named_children():
            x = module(x)
            if name.startswith("denseblock") and name != "denseblock4":
                feats.append(x)
        feats.append(F.relu(x))
        return feats


ARCHS: dict[str, type[nn.Module]] = {"resnet50": ResNet50, "densenet121": DenseNet121}
_ARCH_NAMES = {"resnet50": "ResNet-50", "densenet121": "DenseNet-121"}
_CLASSIFIER = {"resnet50": "fc", "densenet121": "classifier"}


class ExternalEncoder(nn.Module):
    """A torchvision-layout backbone with ImageNet normalisation and optional linear heads.

    ``levels(x)`` takes N x 3 x H x W float RGB 0-255 and returns the backbone's feature maps,
    shallow to deep; ``heads`` maps a head name to its ``nn.Linear`` over the pooled deepest map.
    """

    def __init__(self, arch: str, heads: Mapping[str, nn.Linear] | None = None, *, name: str | None = None,
                 weights_sha256: str | None = None) -> None:
        super().__init__()
        self.arch = arch
        self.name = name or arch
        self.weights_sha256 = weights_sha256
        self.backbone = ARCHS[arch]()
        self.heads = nn.ModuleDict(dict(heads or {}))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def out_channels(self) -> list[int]:
        return list(self.backbone.out_channels)

    def levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone((x / 255.0 - self.mean) / self.std)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Head logits (N x classes) from the pooled deepest features; ``"features"`` holds those."""
        pooled = self.levels(x)[-1].float().mean(dim=(-2, -1))
        out = {name: head(pooled) for name, head in self.heads.items()}
        out["features"] = pooled
        return out


def build_encoder(arch: str, heads: Mapping[str, int] | None = None) -> ExternalEncoder:
    """A randomly initialised encoder of ``arch`` with ``heads`` (name -> classes) as linear heads."""
    if arch not in ARCHS:
        raise ModelError(f"unknown external architecture {arch!r}; use one of {', '.join(ARCHS)}")
    dim = ARCHS[arch]().out_channels[-1]
    return ExternalEncoder(arch, {k: nn.Linear(dim, n) for k, n in (heads or {}).items()})


# ---- loading ------------------------------------------------------------------------------------
def is_external_checkpoint(path: str | Path) -> bool:
    """True for a single weights file (``.pth``, ``.pt``, ``.safetensors``, ...), not a model folder."""
    p = Path(path)
    return p.is_file() and p.name.lower().endswith(_SUFFIXES) and p.name != "weights.tar"


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.name.lower().endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return clean_state_dict(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelError(f"cannot read safetensors file {path}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    return read_torch_checkpoint(path)


_OLD_DENSENET = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def _normalise_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old torchvision DenseNet names (``norm.1``) -> current (``norm1``); a leading ``backbone.``,
    ``encoder.`` or ``model.`` dropped when every key has it."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _OLD_DENSENET.match(key)
        out[m.group(1) + m.group(2) if m else key] = value
    for prefix in ("backbone.", "encoder.", "model."):
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    return out


def detect_arch(state: Mapping[str, torch.Tensor]) -> str:
    """``resnet50`` or ``densenet121`` from the keys; the closer one when neither fits fully."""
    scores = {}
    for arch, cls in ARCHS.items():
        expected = cls().state_dict()
        scores[arch] = sum(k in state for k in expected) / len(expected)
    return max(scores, key=lambda a: scores[a])


def _check_backbone(arch: str, backbone: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    what = f"{path.name} is not a {_ARCH_NAMES[arch]} in torchvision's layout"
    for key, ref in backbone.state_dict().items():
        if key not in state:
            if key.endswith("num_batches_tracked"):
                continue
            raise ModelError(f"{what}: missing key '{key}'")
        if tuple(state[key].shape) != tuple(ref.shape):
            raise ModelError(f"{what}: key '{key}' has shape {tuple(state[key].shape)}, expected {tuple(ref.shape)}")


def _linear_heads(arch: str, state: Mapping[str, torch.Tensor], known: set[str], dim: int, path: Path) -> dict[str, nn.Linear]:
    """Linear heads among the keys the backbone does not use (``<name>.weight`` C x dim + bias)."""
    heads: dict[str, nn.Linear] = {}
    for key in sorted(state):
        if key in known or not key.endswith(".weight"):
            continue
        prefix = key[: -len(".weight")]
        weight, bias = state[key], state.get(prefix + ".bias")
        if weight.ndim != 2 or weight.shape[1] != dim:
            raise ModelError(f"{path.name}: key '{key}' of shape {tuple(weight.shape)} is not a linear head over {dim} features")
        if prefix == _CLASSIFIER[arch] and weight.shape[0] == _IMAGENET_CLASSES:
            log.info("%s: ignoring the 1000-class ImageNet classifier '%s'", path.name, prefix)
            continue
        name = prefix.split(".", 1)[1] if prefix.startswith(("heads.", "head.")) else prefix
        head = nn.Linear(dim, weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            head.weight.copy_(weight.float())
            if bias is not None:
                if tuple(bias.shape) != (weight.shape[0],):
                    raise ModelError(f"{path.name}: key '{prefix}.bias' has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
                head.bias.copy_(bias.float())
        heads[name] = head
    return heads


def load_external(path: str | Path, *, arch: str | None = None, device: str | torch.device = "cpu") -> ExternalEncoder:
    """Load a ResNet-50 / DenseNet-121 checkpoint in torchvision's layout (eval mode).

    ``torch.load(weights_only=True)`` for ``.pth``/``.pt``/``.tar``, safetensors for ``.safetensors``;
    ``arch`` is detected from the keys when not given. A missing or mis-shaped key raises
    :class:`ModelError` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    state = _normalise_keys(_read_weights(path))
    arch = arch or detect_arch(state)
    if arch not in ARCHS:
        raise ModelError(f"unknown external architecture {arch!r}; use one of {', '.join(ARCHS)}")
    encoder = ExternalEncoder(arch, name=path.stem, weights_sha256=file_sha256(path))
    own = encoder.backbone.state_dict()
    _check_backbone(arch, encoder.backbone, state, path)
    encoder.backbone.load_state_dict({k: state[k].float() if state[k].is_floating_point() else state[k] for k in own if k in state}, strict=False)
    encoder.heads = nn.ModuleDict(_linear_heads(arch, state, set(own), encoder.out_channels[-1], path))
    return encoder.eval().to(device)

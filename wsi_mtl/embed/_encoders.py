"""One interface over the encoders ``embed`` can use: our multi-task network or an external backbone.

:class:`PatchEncoder` turns a batch of RGB patches into one feature vector each (global average of
the deepest encoder map, optionally concatenated with the averages of the shallower maps) and the
class probabilities of every patch head, computed from the same forward pass.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError, ModelError

__all__ = ["PatchEncoder", "load_encoder", "LEVELS", "LinearHead"]

log = logging.getLogger(__name__)

#: ``deepest``: the pooled deepest map only; ``all``: pooled maps of every level, shallow to deep.
LEVELS: tuple[str, ...] = ("deepest", "all")
#: Suffix of a probe classifier file (:mod:`wsi_mtl.probe`) that ``embed`` applies as a head.
PROBE_SUFFIX = ".probe.json"


@dataclass
class LinearHead:
    """A linear classifier over embed features (``x`` standardised by ``mean``/``scale`` first)."""

    name: str
    classes: list[str]
    weight: np.ndarray  # classes x D
    bias: np.ndarray  # classes
    mean: np.ndarray  # D
    scale: np.ndarray  # D
    levels: str = "deepest"

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        z = ((features.astype(np.float64) - self.mean) / self.scale) @ self.weight.T + self.bias
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def _gap(t: torch.Tensor) -> torch.Tensor:
    return t.float().mean(dim=(-2, -1))


@dataclass
class PatchEncoder:
    """An encoder ready for ``embed``: features and head probabilities of N x 3 x H x W RGB 0-255.

    Attributes
    ----------
    name, weights_sha256 : str
        What ran, for the output's attributes.
    mpp : float
        The resolution the encoder was trained at (the default patch mpp).
    multiple : int
        Patch sides must be multiples of this (the encoder's output stride).
    level_dims : list of int
        Channels of each level's pooled vector, shallow to deep.
    head_classes : dict
        Patch head name -> class names.
    """

    module: Any
    kind: str  # "wsimtl" or "external"
    name: str
    weights_sha256: str
    mpp: float
    multiple: int
    level_dims: list[int]
    head_classes: dict[str, list[str]]
    trained: bool = True
    extra_heads: list[LinearHead] = field(default_factory=list)

    def dim(self, levels: str) -> int:
        return sum(self.level_dims) if levels == "all" else self.level_dims[-1]

    def check_patch(self, patch_px: int) -> None:
        if patch_px < self.multiple or patch_px % self.multiple:
            raise InputError(f"patch size {patch_px} px must be a positive multiple of {self.multiple} for encoder {self.name}")

    def add_probe(self, head: LinearHead) -> None:
        """Apply a saved linear probe as one more head (on the features of its ``levels``)."""
        if head.name in self.head_classes:
            raise InputError(f"probe head name {head.name!r} clashes with a head of {self.name}")
        self.extra_heads.append(head)
        self.head_classes[head.name] = list(head.classes)

    def _levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.kind == "external":
            return list(self.module.levels(x))
        net = self.module
        x = x / 255.0
        if getattr(net, "_channels_last", False):
            x = x.contiguous(memory_format=torch.channels_last)
        return list(net.backbone(x))

    def _wsimtl_heads(self, x4: torch.Tensor) -> dict[str, torch.Tensor]:
        """Patch heads as :meth:`MultiTaskNet.forward` computes them: the centre ``patch_cells``
        window of x4, pooled, through each head."""
        from ..network.model import window_stats

        cfg = self.module.config
        names = [n for n, h in cfg.heads.items() if h.kind == "patch"]
        if not names:
            return {}
        cells = cfg.arch_params.patch_cells
        h, w = x4.shape[-2:]
        top, left = max(0, (h - cells) // 2), max(0, (w - cells) // 2)
        x4 = x4[..., top: top + min(h, cells), left: left + min(w, cells)]
        pooled = window_stats(x4, None, [cfg.heads[n].pool for n in names])
        out = {}
        for n in names:
            head = cfg.heads[n]
            logits = self.module.decoder_head[head.decoder](pooled[head.pool])
            out[n] = torch.softmax(logits.float().flatten(1), dim=1)
        return out

    @torch.no_grad()
    def encode(self, x: torch.Tensor, levels: str = "deepest") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(N x D float32 features, head name -> N x C float32 probabilities)."""
        maps = self._levels(x)
        feats = torch.cat([_gap(m) for m in maps], 1) if levels == "all" else _gap(maps[-1])
        if self.kind == "external":
            deep = feats[:, -self.level_dims[-1]:]
            probs = {n: torch.softmax(head(deep), dim=1) for n, head in self.module.heads.items()}
        else:
            probs = self._wsimtl_heads(maps[-1])
        return feats, probs

    def probe_probabilities(self, features: np.ndarray, levels: str) -> dict[str, np.ndarray]:
        """Probabilities of the added probe heads for features computed with ``levels``."""
        out = {}
        for head in self.extra_heads:
            if head.levels == levels:
                x = features
            elif head.levels == "deepest":
                x = features[:, -self.level_dims[-1]:]
            else:
                raise InputError(f"probe {head.name!r} needs --levels all features")
            if x.shape[1] != head.weight.shape[1]:
                raise InputError(f"probe {head.name!r} expects {head.weight.shape[1]} features, this encoder gives {x.shape[1]}")
            out[head.name] = head.probabilities(x)
        return out

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "weights_sha256": self.weights_sha256, "trained": self.trained,
                "mpp": self.mpp, "level_dims": list(self.level_dims), "heads": {k: list(v) for k, v in self.head_classes.items()}}


def _state_sha256(net: Any) -> str:
    """The weights file's sha256 from the config, else a sha256 over the state dict's tensors."""
    known = getattr(net.config, "weights_sha256", None)
    if known:
        return str(known)
    h = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _from_wsimtl(net: Any) -> PatchEncoder:
    cfg = net.config
    heads = {n: list(h.class_names) for n, h in cfg.heads.items() if h.kind == "patch"}
    return PatchEncoder(net, "wsimtl", cfg.name, _state_sha256(net), float(cfg.mpp), int(cfg.arch_params.output_stride),
                        list(cfg.arch_params.encoder_widths), heads, trained=bool(cfg.trained))


def _from_external(enc: Any, mpp: float) -> PatchEncoder:
    heads = {n: [f"class_{i}" for i in range(h.out_features)] for n, h in enc.heads.items()}
    return PatchEncoder(enc, "external", enc.name, enc.weights_sha256 or "", mpp, 32, enc.out_channels, heads)


def load_encoder(model: Any = None, *, device: str | torch.device = "cpu", mpp: float | None = None,
                 arch: str | None = None, probes: Sequence[str | Path] = ()) -> PatchEncoder:
    """A :class:`PatchEncoder` from a model name/folder (ours), a ResNet-50/DenseNet-121 checkpoint file,
    an already loaded network, or a :class:`PatchEncoder` (returned as is); ``probes`` are saved
    linear probes applied as extra heads."""
    from ..network.external import ExternalEncoder, is_external_checkpoint, load_external

    if isinstance(model, PatchEncoder):
        enc = model
    elif isinstance(model, ExternalEncoder):
        enc = _from_external(model.eval().to(device), mpp or 0.5)
    elif model is not None and not isinstance(model, (str, Path)):
        enc = _from_wsimtl(model)
    elif model is not None and is_external_checkpoint(model):
        enc = _from_external(load_external(model, arch=arch, device=device), mpp or 0.5)
    else:
        from ..network import load_model

        enc = _from_wsimtl(load_model(model, device=device))
    for p in probes:
        enc.add_probe(read_probe(p))
    return enc


def read_probe(path: str | Path) -> LinearHead:
    """Read a classifier saved by ``wsimtl probe`` (JSON: classes, weight, bias, mean, scale)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        return LinearHead(str(d.get("name") or path.name.removesuffix(PROBE_SUFFIX)), [str(c) for c in d["classes"]],
                          np.asarray(d["weight"], np.float64), np.asarray(d["bias"], np.float64),
                          np.asarray(d["mean"], np.float64), np.asarray(d["scale"], np.float64), str(d.get("levels", "deepest")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"cannot read probe classifier {path}: {exc}") from None

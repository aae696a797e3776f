"""A small registry of architectures: each entry is a function returning a default ModelConfig.

``@register_model`` records a builder under its function name (the *arch*, e.g. ``wsimtl_small``);
model names with dashes (``wsimtl-small``) resolve to the same entry. Users see one spelling, the
model name with dashes (:func:`public_name`, :func:`model_names`); both are accepted everywhere. Builders only choose
parameters; :func:`create_model` is the one construction path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from ..errors import ModelError
from .config import INST_CLASSES, ArchParams, HeadConfig, ModelConfig
from .model import MultiTaskNet

__all__ = ["register_model", "list_models", "model_names", "public_name", "is_model", "get_model_config", "create_model",
           "canonical_arch"]

logger = logging.getLogger(__name__)

_BUILDERS: dict[str, Callable[..., ModelConfig]] = {}

Builder = Callable[..., ModelConfig]


def register_model(fn: Builder) -> Builder:
    """Register ``fn`` (returning a :class:`ModelConfig`) under its function name."""
    name = fn.__name__
    if name in _BUILDERS and _BUILDERS[name] is not fn:
        logger.warning("model %s registered twice; the later definition wins", name)
    _BUILDERS[name] = fn
    return fn


def canonical_arch(name: str) -> str | None:
    """Registry key for ``name`` (``-`` and ``_`` are interchangeable, case-insensitive) or None."""
    key = name.strip().lower().replace("-", "_")
    return key if key in _BUILDERS else None


def list_models() -> list[str]:
    """Registered architecture names, sorted."""
    return sorted(_BUILDERS)


def public_name(name: str) -> str:
    """The spelling shown to users: ``wsimtl_small`` and ``WSIMTL-small`` -> ``wsimtl-small``."""
    return name.strip().lower().replace("_", "-")


def model_names() -> list[str]:
    """Registered model names as users see them (dashes), sorted; underscores are accepted too."""
    return sorted(public_name(key) for key in _BUILDERS)


def is_model(name: str) -> bool:
    """Whether ``name`` is a registered architecture."""
    return canonical_arch(name) is not None


def get_model_config(name: str, **overrides: Any) -> ModelConfig:
    """Default config of a registered architecture, with ``overrides`` applied to its fields."""
    key = canonical_arch(name)
    if key is None:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(model_names())}")
    config = _BUILDERS[key]()
    return config.replace(**overrides) if overrides else config


def create_model(config: ModelConfig | str, *, seed: int | None = 0) -> MultiTaskNet:
    """Build a randomly initialised network (train mode) from a config or registered name.

    Parameters
    ----------
    config
        A :class:`ModelConfig` or a registered architecture name.
    seed
        Seed for the initial weights (None: use the global RNG).
    """
    if isinstance(config, str):
        config = get_model_config(config)
    if seed is None:
        return MultiTaskNet(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MultiTaskNet(config)


# ---- heads -----------------------------------------------------------------------------------
_INST_COLORS = {
    "Nuclei": ((0, 0, 0), (0, 120, 255), (255, 200, 0)),
    "Gland": ((0, 0, 0), (255, 102, 102), (255, 255, 0)),
    "Lumen": ((0, 0, 0), (80, 200, 255), (255, 140, 0)),
}


def _inst(decoder: str) -> HeadConfig:
    return HeadConfig("inst", decoder, INST_CLASSES, _INST_COLORS[decoder])


def _head(kind: str, decoder: str, classes: dict[str, tuple[int, int, int]]) -> HeadConfig:
    return HeadConfig(kind, decoder, tuple(classes), tuple(classes.values()))


CERBERUS_NUCLEI_TYPES = {
    "nolabel": (160, 160, 160),
    "neutrophil": (255, 165, 0),
    "epithelial": (200, 0, 0),
    "lymphocyte": (160, 90, 160),
    "plasma": (0, 200, 200),
    "eosinophil": (230, 80, 180),
    "connective": (150, 200, 150),
}
CERBERUS_GLAND_TYPES = {"nolabel": (160, 160, 160), "gland": (255, 102, 102), "surface epithelium": (102, 102, 255)}
CERBERUS_TISSUE = {
    "background": (230, 230, 230),
    "abnormal epithelium": (200, 0, 0),
    "normal epithelium": (255, 170, 60),
    "inflammatory": (160, 90, 160),
    "muscle": (205, 92, 92),
    "stroma": (150, 200, 150),
    "debris": (120, 80, 40),
    "mucin": (80, 160, 255),
    "adipose": (255, 230, 120),
}
CRCHP_NUCLEI_TYPES = {
    "background": (160, 160, 160),
    "epithelial": (200, 0, 0),
    "fibroblast": (150, 200, 150),
    "inflammatory": (160, 90, 160),
    "other": (255, 200, 0),
}
KATHER2016 = {
    "tumor": (200, 0, 0),
    "stroma": (150, 200, 150),
    "complex": (0, 150, 150),
    "lympho": (160, 90, 160),
    "debris": (120, 80, 40),
    "mucosa": (255, 170, 60),
    "adipose": (255, 230, 120),
    "empty": (230, 230, 230),
}
LC25000_LUNG = {"lung_aca": (200, 0, 0), "lung_n": (80, 200, 80), "lung_scc": (0, 90, 200)}
GLAS = {"benign": (80, 200, 80), "malignant": (200, 0, 0)}


def cerberus_heads() -> dict[str, HeadConfig]:
    """The six outputs of the published Cerberus model, in its order."""
    return {
        "Nuclei-INST": _inst("Nuclei"),
        "Gland-INST": _inst("Gland"),
        "Lumen-INST": _inst("Lumen"),
        "Nuclei-TYPE": _head("type", "Nuclei#TYPE", CERBERUS_NUCLEI_TYPES),
        "Gland-TYPE": _head("type", "Gland#TYPE", CERBERUS_GLAND_TYPES),
        "Patch-Class": _head("patch", "Patch-Class", CERBERUS_TISSUE),
    }


# ---- architectures ---------------------------------------------------------------------------
@register_model
def cerberus_r34() -> ModelConfig:
    """The published Cerberus layout (Graham et al. 2022): ResNet-34, stride-1 stem, 6 outputs."""
    return ModelConfig(
        name="cerberus-r34",
        arch="cerberus_r34",
        arch_params=ArchParams(),
        heads=cerberus_heads(),
        mpp=0.5,
        context_px=160,  # the authors keep 144 of 448 px: 152 px each side, rounded up to 16
        stride=16,
        patch_stride_px=16,
        license="CC BY-NC-SA 4.0 (published Cerberus weights)",
        source="Graham et al. 2022, One Model is All You Need (Cerberus), https://github.com/TissueImageAnalytics/cerberus",
        description="Cerberus multi-task network: nuclei, glands, lumen instances, nuclei and gland types, tissue class.",
    )


#: Context margin of ``wsimtl_small``, measured with ``benchmarks/bench_network.py --context``
#: (BN-calibrated random weights, 1024 px crop of CMU-1-Small-Region, 256 px cores): max abs
#: probability difference tiled vs whole, segmentation / patch heads, per margin:
#: 0: .73/.41, 32: .40/.42, 64: .19/.39, 96: .12/.27, 128: .048/.17, 160: .031/.080,
#: 192: .0098/.033, 224: .0025/.0072, 256: .0003/.0011. Smallest multiple of 32 with <= 0.02: 224.
#: With the trained weights (``--model wsimtl-small --context``): 0: .91/.98, 64: .53/.96,
#: 96: .31/.80, 128: .075/.19, 160: .052/.018, 192: .011/.001, 224: .0001/.0000 -> 192, which is
#: what the shipped model uses; the trained network looks less far than random weights do.
WSIMTL_SMALL_CONTEXT_PX = 192


@register_model
def wsimtl_small() -> ModelConfig:
    """Our CPU default: narrow ResNet-18-like encoder with a stride-2 stem, 4 decoders, 3 patch heads."""
    return ModelConfig(
        name="wsimtl-small",
        arch="wsimtl_small",
        arch_params=ArchParams(
            encoder_layers=(2, 2, 2, 2),
            encoder_widths=(16, 24, 48, 96, 192),
            stem_stride=2,
            encoder_fc_classes=0,
            decoder_mid=(96, 48, 24, 16),
            decoder_out=16,
            full_res="refine",
            full_res_channels=8,
            head_hidden=32,
            patch_hidden=128,
            patch_cells=5,
            patch_dropout=0.3,
        ),
        heads={
            "Nuclei-INST": _inst("Nuclei"),
            "Gland-INST": _inst("Gland"),
            "Lumen-INST": _inst("Lumen"),
            "Nuclei-TYPE": _head("type", "Nuclei#TYPE", CRCHP_NUCLEI_TYPES),
            "Patch-Class": _head("patch", "Patch-Class", KATHER2016),
            "Patch-LC25000": _head("patch", "Patch-LC25000", LC25000_LUNG),
            "Patch-GlaS": _head("patch", "Patch-GlaS", GLAS),
        },
        mpp=0.5,
        context_px=WSIMTL_SMALL_CONTEXT_PX,
        stride=32,
        patch_stride_px=32,
        license="BSD-3-Clause (code); weights: see models/wsimtl-small/MODEL_CARD.md",
        source="wsimtl",
        description="Small CPU-friendly Cerberus-style multi-task network (ResNet-18-like, stride-2 stem).",
    )

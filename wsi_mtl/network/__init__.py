"""The multi-task network: architecture, model config, registry and weight loading.

Inference::

    model = load_model()                      # default wsimtl-small (eval, BN folded, channels_last)
    probs = model.predict(x)                  # x: N x 3 x H x W RGB 0-255 (float or uint8), H, W % config.stride == 0

Training::

    model = create_model("wsimtl_small")      # random init (seed 0), train mode, full state dict
    logits = model(x, heads=["Nuclei-INST"])  # raw logits; only the decoders needed run
    save_model(model, "models/wsimtl-small")  # config.json + weights.safetensors (trained=True)
"""

from __future__ import annotations

from .config import ArchParams, HeadConfig, ModelConfig
from .io import (
    DEFAULT_MODEL,
    check_state_dict,
    clean_state_dict,
    describe_models,
    find_model_folder,
    load_model,
    models_dirs,
    read_torch_checkpoint,
    save_model,
)
from .model import MultiTaskNet
from .registry import create_model, get_model_config, is_model, list_models, model_names, public_name, register_model

__all__ = [
    "ArchParams",
    "HeadConfig",
    "ModelConfig",
    "MultiTaskNet",
    "DEFAULT_MODEL",
    "load_model",
    "save_model",
    "create_model",
    "get_model_config",
    "list_models",
    "model_names",
    "public_name",
    "is_model",
    "register_model",
    "describe_models",
    "find_model_folder",
    "models_dirs",
    "check_state_dict",
    "clean_state_dict",
    "read_torch_checkpoint",
]

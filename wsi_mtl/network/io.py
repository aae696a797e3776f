"""Finding, loading and saving models: our safetensors folders and Cerberus checkpoints.

Our models are folders holding ``config.json`` (a :class:`ModelConfig`) and
``weights.safetensors``. A Cerberus model folder holds ``weights.tar`` (a ``torch.save`` dict whose
``"desc"`` entry is the state dict, keys prefixed ``module.``) and optionally ``settings.yml``.
Third-party checkpoints are read only with ``torch.load(weights_only=True)``: loading never runs
code. Model folders are looked up in ``$WSIMTL_MODELS_DIR``, then in the ``models/`` folder of the
source checkout (``<repo>/models``), then in ``wsi_mtl/models`` (package data, if a wheel ships it).
In a non-editable install without packaged weights, set ``WSIMTL_MODELS_DIR`` or pass the folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..devices import resolve_device
from ..errors import ModelError
from .config import INST_CLASSES, ArchParams, HeadConfig, ModelConfig
from .model import MultiTaskNet
from .registry import canonical_arch, cerberus_heads, create_model, get_model_config, list_models, model_names

__all__ = [
    "DEFAULT_MODEL",
    "load_model",
    "save_model",
    "models_dirs",
    "find_model_folder",
    "clean_state_dict",
    "check_state_dict",
    "read_torch_checkpoint",
    "cerberus_config",
    "file_sha256",
    "resolve_device",
    "describe_models",
]

logger = logging.getLogger(__name__)

#: Name of the default model (folder ``models/wsimtl-small``).
DEFAULT_MODEL = "wsimtl-small"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
CERBERUS_WEIGHTS = "weights.tar"
CERBERUS_SETTINGS = "settings.yml"
_UNTRAINED_SEED = 0


# ---- locating --------------------------------------------------------------------------------
def models_dirs() -> list[Path]:
    """Folders searched for named models, in order (only those that exist)."""
    candidates = []
    env = os.environ.get("WSIMTL_MODELS_DIR")
    if env:
        candidates.append(Path(env).expanduser())
    here = Path(__file__).resolve()
    candidates += [here.parents[2] / "models", here.parents[1] / "models"]
    return [p for p in dict.fromkeys(candidates) if p.is_dir()]


def _is_ours(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def _is_cerberus(folder: Path) -> bool:
    return (folder / CERBERUS_WEIGHTS).is_file()


def find_model_folder(name: str) -> Path | None:
    """The first folder named after model ``name`` (dash or underscore form) that holds weights."""
    forms = list(dict.fromkeys([name, name.replace("_", "-"), name.replace("-", "_")]))
    for root in models_dirs():
        for form in forms:
            folder = root / form
            if folder.is_dir() and (_is_ours(folder) or _is_cerberus(folder)):
                return folder
    return None


def file_sha256(path: Path) -> str:
    """SHA-256 hex digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---- state dicts (pure functions) ------------------------------------------------------------
def clean_state_dict(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Strip ``module.`` (DataParallel) and ``_orig_mod.`` (torch.compile) prefixes."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def check_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, what: str = "weights") -> None:
    """Raise :class:`ModelError` naming the first key that is missing, unexpected or mis-shaped."""
    expected = model.state_dict()
    problems: list[str] = []
    for key, ref in expected.items():
        if key not in state_dict:
            problems.append(f"missing key '{key}'")
        else:
            got = state_dict[key]
            if not isinstance(got, torch.Tensor):
                problems.append(f"key '{key}' is not a tensor")
            elif tuple(got.shape) != tuple(ref.shape):
                problems.append(
                    f"shape mismatch at '{key}': checkpoint {tuple(got.shape)} vs model {tuple(ref.shape)}"
                )
    problems += [f"unexpected key '{key}'" for key in state_dict if key not in expected]
    if problems:
        more = f" ({len(problems)} mismatches in all)" if len(problems) > 1 else ""
        arch = getattr(getattr(model, "config", None), "arch", type(model).__name__)
        raise ModelError(f"{what} do not match architecture {arch}: {problems[0]}{more}")


def read_torch_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Read a third-party ``torch.save`` checkpoint safely and return its cleaned state dict.

    Uses ``torch.load(weights_only=True)``; a pickle that needs arbitrary code is refused. The state
    dict is taken from ``desc`` (Cerberus), ``state_dict``, ``model`` or the top level.
    """
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"refused to load {path}: not a weights-only checkpoint (loading it could run code): {first}"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a bad weights file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot read checkpoint {path}: {first}") from None
    if isinstance(obj, Mapping):
        for key in ("desc", "state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{path} holds no state dict of tensors (expected one under 'desc', 'state_dict' or 'model')")
    return clean_state_dict(obj)


# ---- Cerberus --------------------------------------------------------------------------------
_BACKBONE_LAYERS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]


def _generic_head(kind: str, decoder: str, n: int) -> HeadConfig:
    if kind == "inst" and n == 3:
        return HeadConfig(kind, decoder, INST_CLASSES, ((0, 0, 0), (0, 120, 255), (255, 200, 0)))
    names = tuple(f"class_{i}" for i in range(n))
    return HeadConfig(kind, decoder, names, tuple(_PALETTE[i % len(_PALETTE)] for i in range(n)))


def _cerberus_head(kind: str, decoder: str, n: int) -> tuple[str, HeadConfig]:
    public = decoder if kind == "patch" else f"{decoder.split('#')[0]}-{kind.upper()}"
    known = cerberus_heads().get(public)
    if known is not None and known.decoder == decoder and known.kind == kind and known.num_classes == n:
        return public, known
    logger.warning("Cerberus head %s has %d classes; class names unknown, using class_<i>", public, n)
    return public, _generic_head(kind, decoder, n)


def _heads_from_settings(settings: Mapping[str, Any], source: Path) -> tuple[dict[str, HeadConfig], str | None]:
    mk = settings.get("model_kwargs") if isinstance(settings, Mapping) else None
    if not isinstance(mk, Mapping):
        raise ModelError(f"{source}: no 'model_kwargs' mapping")
    tasks = mk.get("considered_tasks")
    dk = mk.get("decoder_kwargs")
    if not isinstance(tasks, list) or not isinstance(dk, Mapping):
        raise ModelError(f"{source}: model_kwargs needs 'considered_tasks' (list) and 'decoder_kwargs' (mapping)")
    heads: dict[str, HeadConfig] = {}
    for task in tasks:
        outs = dk.get(task)
        if not isinstance(outs, Mapping) or not outs:
            raise ModelError(f"{source}: decoder_kwargs has no outputs for task {task!r}")
        for out, n in outs.items():
            if str(task).startswith("Patch"):
                kind = "patch"
            elif out in ("INST", "TYPE"):
                kind = out.lower()
            else:
                raise ModelError(f"{source}: task {task!r} has unsupported output {out!r} (expected INST or TYPE)")
            public, head = _cerberus_head(kind, str(task), int(n))
            heads[public] = head
    backbone = mk.get("encoder_backbone_name")
    return heads, (str(backbone) if backbone is not None else None)


def _heads_from_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, HeadConfig]:
    heads: dict[str, HeadConfig] = {}
    out_re = re.compile(r"^output_head\.([^.]+)\.([^.]+)\.x\.1\.conv\.weight$")
    patch_re = re.compile(r"^decoder_head\.([^.]+)\.conv2\.weight$")
    for key, value in state_dict.items():
        if m := out_re.match(key):
            decoder, out = m.groups()
            if out not in ("INST", "TYPE"):
                raise ModelError(f"checkpoint has unsupported output head {decoder}.{out}")
            public, head = _cerberus_head(out.lower(), decoder, int(value.shape[0]))
            heads[public] = head
        elif m := patch_re.match(key):
            public, head = _cerberus_head("patch", m.group(1), int(value.shape[0]))
            heads[public] = head
    return heads


def cerberus_config(state_dict: Mapping[str, torch.Tensor], settings: Mapping[str, Any] | None = None, *,
                    source: Path | None = None) -> ModelConfig:
    """Config for a Cerberus checkpoint: heads from ``settings`` (settings.yml) or the keys."""
    base = get_model_config("cerberus_r34")
    where = source or Path("settings.yml")
    backbone = None
    if settings is not None:
        heads, backbone = _heads_from_settings(settings, where)
    else:
        heads = _heads_from_keys(state_dict)
        if not heads:
            raise ModelError(f"{where}: checkpoint has no Cerberus output heads (no 'output_head.*' or patch-head keys)")
    order = list(cerberus_heads())
    heads = dict(sorted(heads.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    params = base.arch_params
    if backbone is not None:
        if backbone not in _BACKBONE_LAYERS:
            raise ModelError(f"unsupported Cerberus backbone {backbone!r}; supported: {', '.join(_BACKBONE_LAYERS)}")
        params = ArchParams(**{**params.__dict__, "encoder_layers": _BACKBONE_LAYERS[backbone]})
    return base.replace(heads=heads, arch_params=params, trained=True,
                        source=f"{base.source}; loaded from {source}" if source else base.source)


def _load_cerberus(path: Path) -> MultiTaskNet:
    weights = path / CERBERUS_WEIGHTS if path.is_dir() else path
    folder = weights.parent
    settings = None
    settings_path = folder / CERBERUS_SETTINGS
    if settings_path.is_file():
        import yaml

        try:
            settings = yaml.safe_load(settings_path.read_text())
        except yaml.YAMLError as exc:
            raise ModelError(f"cannot parse {settings_path}: {str(exc).splitlines()[0]}") from None
    state_dict = read_torch_checkpoint(weights)
    config = cerberus_config(state_dict, settings, source=folder)
    model = MultiTaskNet(config)
    check_state_dict(model, state_dict, what=f"weights in {weights}")
    model.load_state_dict(state_dict, strict=True)
    model.config = config.replace(weights_sha256=file_sha256(weights))
    return model


# ---- our own format ---------------------------------------------------------------------------
def _load_ours(folder: Path) -> MultiTaskNet:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    try:
        config = ModelConfig.from_json(config_path.read_text())
    except OSError as exc:
        raise ModelError(f"cannot read {config_path}: {exc.strerror}") from None
    if canonical_arch(config.arch) is None:
        raise ModelError(f"{config_path}: unknown arch {config.arch!r}; known: {', '.join(model_names())}")
    try:
        state_dict = load_file(weights, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"cannot read {weights}: {exc}") from None
    model = MultiTaskNet(config)
    check_state_dict(model, state_dict, what=f"weights in {weights}")
    model.load_state_dict(state_dict, strict=True)
    default = get_model_config(config.arch)
    if default.arch_params == config.arch_params and config.context_px < default.context_px:
        logger.warning(
            "%s: context_px %d is below the %d measured for arch %s; tiles may show seams",
            config_path, config.context_px, default.context_px, config.arch,
        )
    sha = file_sha256(weights)
    if config.weights_sha256 and config.weights_sha256 != sha:
        logger.warning("%s: sha256 %s differs from the one recorded in %s", weights, sha[:12], config_path)
    model.config = config.replace(weights_sha256=sha)
    return model


def save_model(model: MultiTaskNet, folder: str | os.PathLike[str], *, trained: bool = True) -> Path:
    """Write ``config.json`` and ``weights.safetensors`` into ``folder`` (created; files atomic).

    Parameters
    ----------
    model
        The network to save.
    folder
        Destination folder.
    trained
        Recorded as ``config.trained`` (pass False for untrained weights).

    Returns
    -------
    Path
        The folder.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        tmp_w = folder / (WEIGHTS_FILE + ".tmp")
        save_file(state, str(tmp_w), metadata={"format": "pt", "arch": model.config.arch})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_w, 0o666 & ~umask)  # safetensors creates it owner-only; a model folder is for sharing
        sha = file_sha256(tmp_w)
        config = model.config.replace(trained=trained, weights_sha256=sha)
        tmp_c = folder / (CONFIG_FILE + ".tmp")
        tmp_c.write_text(config.to_json() + "\n")
        os.replace(tmp_w, folder / WEIGHTS_FILE)
        os.replace(tmp_c, folder / CONFIG_FILE)
    except OSError as exc:
        raise ModelError(f"cannot write model to {folder}: {exc.strerror or exc}") from None
    model.config = config
    logger.info("saved model %s to %s (sha256 %s)", config.name, folder, sha[:12])
    return folder


# ---- the one entry point ----------------------------------------------------------------------
def _load_path(path: Path) -> MultiTaskNet:
    if path.is_dir():
        if _is_ours(path):
            return _load_ours(path)
        if _is_cerberus(path):
            return _load_cerberus(path)
        raise ModelError(
            f"{path} is not a model folder: expected {CONFIG_FILE} + {WEIGHTS_FILE} (wsimtl) or "
            f"{CERBERUS_WEIGHTS} [+ {CERBERUS_SETTINGS}] (Cerberus)"
        )
    if path.suffix == ".safetensors":
        if path.name != WEIGHTS_FILE or not (path.parent / CONFIG_FILE).is_file():
            raise ModelError(f"{path}: a safetensors file must be {WEIGHTS_FILE} beside a {CONFIG_FILE}")
        return _load_ours(path.parent)
    return _load_cerberus(path)


def _untrained(name: str) -> MultiTaskNet:
    config = get_model_config(name)
    model = create_model(config, seed=_UNTRAINED_SEED)
    logger.warning(
        "!!! model %s has NO trained weights: using a RANDOMLY INITIALISED network (seed %d). "
        "Its outputs are meaningless. Put config.json + weights.safetensors in models/%s or set "
        "WSIMTL_MODELS_DIR. !!!",
        config.name, _UNTRAINED_SEED, config.name,
    )
    return model


def load_model(name_or_path: str | os.PathLike[str] | None = None, *, device: str | torch.device = "cpu") -> MultiTaskNet:
    """Load a model for inference (eval mode; channels_last on CPU).

    Parameters
    ----------
    name_or_path
        None or ``"wsimtl-small"`` (the default model), a registered architecture name
        (``cerberus_r34``, ``wsimtl_small``; loaded from a ``models/<name>`` folder when present,
        else randomly initialised with a loud warning), a folder with ``config.json`` +
        ``weights.safetensors``, or a Cerberus folder/file (``weights.tar`` [+ ``settings.yml``]).
    device
        ``"cpu"``, ``"cuda"``, ``"mps"``, ``"auto"`` or a ``torch.device``.

    Returns
    -------
    MultiTaskNet
        ``model.config.weights_sha256`` holds the sha256 of the weights file (None if untrained).

    Raises
    ------
    ModelError
        Unknown name or missing path (the message lists known names), unreadable or unsafe
        checkpoint, or weights that do not match the architecture (names the first bad key).
    """
    target = resolve_device(device)
    name = DEFAULT_MODEL if name_or_path is None else name_or_path
    text = os.fspath(name)
    path = Path(text).expanduser()
    if path.exists():
        model = _load_path(path)
    elif canonical_arch(text) is not None:
        folder = find_model_folder(text)
        if folder is None and canonical_arch(text) == canonical_arch(DEFAULT_MODEL):
            folder = find_model_folder(DEFAULT_MODEL)
        model = _load_path(folder) if folder is not None else _untrained(text)
    else:
        raise ModelError(
            f"no model folder or registered model named {text!r}; known models: {', '.join(model_names())} "
            f"(or pass a folder with {CONFIG_FILE} + {WEIGHTS_FILE}, or a Cerberus folder with {CERBERUS_WEIGHTS})"
        )
    model.eval().to(target)
    model.fold_bn(True)
    if target.type == "cpu":
        model.set_channels_last(True)
    logger.info("loaded model %s (arch %s, trained=%s) on %s", model.config.name, model.config.arch, model.config.trained, target)
    return model


def describe_models() -> list[dict[str, Any]]:
    """One row per registered architecture: name, folder with weights (or None), trained flag."""
    rows = []
    for arch in list_models():
        config = get_model_config(arch)
        folder = find_model_folder(config.name) or find_model_folder(arch)
        trained = False
        if folder is not None and _is_ours(folder):
            try:
                trained = bool(json.loads((folder / CONFIG_FILE).read_text()).get("trained", False))
            except (OSError, json.JSONDecodeError):
                trained = False
        elif folder is not None:
            trained = True
        rows.append({"arch": arch, "name": config.name, "folder": folder, "trained": trained,
                     "heads": config.output_heads, "mpp": config.mpp})
    return rows

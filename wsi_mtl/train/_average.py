"""Weight averaging of two fine-tuned models of one architecture (``average_with`` of a config).

Two models fine-tuned from one start often lie on a straight path of low loss between them, so a
weighted mean of their weights can keep much of what each learnt (Wortsman et al. 2022, "Robust
fine-tuning of zero-shot models", WiSE-FT). Every floating tensor, BatchNorm running statistics
included, becomes ``(1 - weight) * start + weight * other``; integer tensors (batch counters) are
the start's. The result is a model folder with the start's config and a record of the average.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError

__all__ = ["average_models", "check_average_with"]


def check_average_with(value: Mapping[str, Any], base: Path) -> dict[str, Any]:
    """``average_with`` of a config: ``{model: PATH, weight: W}`` with 0 < W < 1 (a relative PATH is
    taken from ``base``, the repository root, as the config's other paths)."""
    if not isinstance(value, Mapping) or set(value) != {"model", "weight"}:
        raise InputError(f"training config: average_with needs exactly the keys model and weight, got {value!r}")
    try:
        weight = float(value["weight"])
    except (TypeError, ValueError):
        raise InputError(f"training config: average_with weight must be a number, got {value['weight']!r}") from None
    if not 0 < weight < 1:
        raise InputError(f"training config: average_with weight must lie strictly between 0 and 1, got {weight}")
    path = Path(str(value["model"])).expanduser()
    return {"model": path if path.is_absolute() else base / path, "weight": weight}


def average_models(start: Path, other: Path, weight: float, out: Path, *, shown: Mapping[str, str] | None = None) -> Path:
    """Write to ``out`` the model folder ``start`` with its weights averaged with ``other``'s;
    its config records the average (``shown``: how to write the two paths, e.g. relative)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..network import ModelConfig, MultiTaskNet, save_model
    from ..network.io import CONFIG_FILE, WEIGHTS_FILE

    try:
        a, b = load_file(Path(start) / WEIGHTS_FILE), load_file(Path(other) / WEIGHTS_FILE)
        config = ModelConfig.from_json((Path(start) / CONFIG_FILE).read_text())
    except (OSError, SafetensorError, ValueError) as exc:
        raise InputError(f"cannot average {start} with {other}: {exc}") from None
    odd = sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or a[k].shape != b[k].shape)
    if odd:
        raise InputError(f"cannot average {start} with {other}: their tensors differ (first: {odd[0]})")
    mixed = {k: _mix(a[k], b[k], weight) for k in a}
    extra = dict(config.extra)
    training = dict(extra.get("training") or {})
    names = {"start": str(start), "model": str(other)} | dict(shown or {})
    training["averaged_with"] = {"model": names["model"], "weight": weight, "start": names["start"]}
    model = MultiTaskNet(config.replace(extra=extra | {"training": training}))
    model.load_state_dict(mixed, strict=True)
    return save_model(model, out, trained=config.trained)


def _mix(x: torch.Tensor, y: torch.Tensor, weight: float) -> torch.Tensor:
    if not x.is_floating_point():
        return x
    return ((1 - weight) * x.double() + weight * y.double()).to(x.dtype)

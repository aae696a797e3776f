"""Which torch device to run on: one place that turns ``auto | cpu | cuda[:i] | mps`` into a device."""

from __future__ import annotations

import torch

from .errors import InputError

__all__ = ["resolve_device"]


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> cuda, then mps, then cpu; anything else checked to exist on this machine.

    Raises
    ------
    InputError
        An unknown device name, or a cuda/mps device this machine does not have.
    """
    if isinstance(device, torch.device):
        dev = device
    else:
        name = (device or "auto").strip().lower()
        if name == "auto":
            if torch.cuda.is_available():
                return torch.device("cuda")
            return torch.device("mps") if _mps_available() else torch.device("cpu")
        try:
            dev = torch.device(name)
        except (RuntimeError, TypeError) as exc:
            raise InputError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {str(device)!r} requested but CUDA is not available; use --device cpu or auto")
    if dev.type == "mps" and not _mps_available():
        raise InputError(f"device {str(device)!r} requested but MPS is not available; use --device cpu or auto")
    if dev.type not in {"cpu", "cuda", "mps"}:
        raise InputError(f"unsupported device {str(device)!r}; use auto, cpu, cuda, cuda:N or mps")
    return dev

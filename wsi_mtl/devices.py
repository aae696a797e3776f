"""Device helpers in one place: which torch device (``auto | cpu | cuda[:i] | mps``), which mixed
precision on it, whether the CPU has native bf16, and how many CPU cores this process may use."""

from __future__ import annotations

import logging
import os

import torch

from .errors import InputError

__all__ = ["resolve_device", "resolve_precision", "cpu_has_bf16", "cpu_count", "CPUS_ENV"]

logger = logging.getLogger(__name__)


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


#: environment variable capping :func:`cpu_count` (set for each worker of a local Dask cluster to its share)
CPUS_ENV = "WSIMTL_CPUS"


def cpu_count() -> int:
    """CPU cores this process may use (respects affinity masks and cgroup-limited schedulers), at most
    ``$WSIMTL_CPUS`` where that is a whole number >= 1 (several workers sharing one machine)."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS / Windows
        cores = max(1, os.cpu_count() or 1)
    cap = os.environ.get(CPUS_ENV, "").strip()
    return min(cores, int(cap)) if cap.isdigit() and int(cap) >= 1 else cores


def cpu_has_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX); emulated bf16 is slower than fp32."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None) or getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe and probe())
    except Exception:  # pragma: no cover - defensive: probing must never fail a run
        return False


def resolve_precision(device: torch.device, requested: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``device``: None means full fp32.

    ``auto`` picks bf16 on CPUs with native bf16 (it doubles throughput here and agrees with fp32
    within the tolerance tested in ``tests/test_network.py``), bf16 (else fp16) on CUDA, fp32 elsewhere.
    ``bf16`` asked for on a CPU without it runs emulated, and says so (a warning): it gives bf16's
    maps at several times fp32's time.
    """
    requested = (requested or "auto").lower()
    if requested not in {"auto", "fp32", "bf16", "fp16"}:
        raise InputError(f"unknown precision {requested!r}; use auto, fp32, bf16 or fp16")
    if requested == "fp32":
        return None
    if requested == "bf16":
        if device.type == "cpu" and not cpu_has_bf16():
            logger.warning("bf16 asked for, but this CPU has no native bf16 (AVX512-BF16 or AMX): it is emulated, several "
                           "times slower than fp32 (--precision auto chooses fp32 on this CPU)")
        return torch.bfloat16
    if requested == "fp16":
        if device.type == "cpu":
            raise InputError("fp16 is not supported on the CPU; use bf16 or fp32")
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return None

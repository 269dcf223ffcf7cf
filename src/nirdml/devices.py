"""Devices and mixed precision: which device a name means, and the autocast policy."""

from __future__ import annotations

import torch

from nirdml.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"invalid value for train.device: {name!r} ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available; use train.device=cpu")
    return device


def autocast(device: torch.device, amp: str):
    """Autocast context for ``amp`` in {none, bf16, fp16}; parameters are never cast."""
    if amp == "none":
        return torch.autocast(device_type=device.type, enabled=False)
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    if device.type == "cpu" and amp == "fp16":
        raise ConfigError("train.amp=fp16 needs CUDA; use train.amp=bf16 or none on the CPU")
    return torch.autocast(device_type=device.type, dtype=dtype)

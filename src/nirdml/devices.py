"""Devices and mixed precision: which device a name means, and the autocast policy."""

from __future__ import annotations

import torch

from nirdml.errors import ConfigError

#: what a device name may say (the types nirdml can run on; ``mps`` where torch has it)
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def _named(option: str, name: object) -> str:
    """``train.device='x'`` for a config key, ``--device 'x'`` for a command-line option."""
    return f"{option} {name!r}" if option.startswith("-") else f"{option}={name!r}"


def resolve_device(name: str | torch.device | None, option: str = "train.device"
                   ) -> torch.device:
    """The device ``name`` means, checked on this machine: ``auto`` (or None) picks CUDA when
    available, else the CPU; ``cpu``, ``cuda``, ``cuda:N`` (N below the number of GPUs) and,
    where torch has it, ``mps``. Anything else -- not a device name, a GPU this machine lacks,
    a device type nirdml does not run on -- is a one-line ConfigError naming ``option``."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shown = _named(option, str(name))
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"{shown} is not a device; use {DEVICE_CHOICES}") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{shown}: no CUDA device is available on this machine; "
                              f"use {_named(option, 'cpu')}")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"{shown}: there is no GPU {device.index} (this machine has "
                              f"{count}: cuda:0 to cuda:{count - 1}); choose one of those")
        return device
    mps = getattr(torch.backends, "mps", None)
    if device.type == "mps" and mps is not None and mps.is_available():
        return device
    raise ConfigError(f"{shown}: nirdml does not run on {device.type!r} devices here; use "
                      f"{DEVICE_CHOICES}")


def autocast(device: torch.device, amp: str):
    """Autocast context for ``amp`` in {none, bf16, fp16}; parameters are never cast."""
    if amp == "none":
        return torch.autocast(device_type=device.type, enabled=False)
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    if device.type == "cpu" and amp == "fp16":
        raise ConfigError("train.amp=fp16 needs CUDA; use train.amp=bf16 or none on the CPU")
    return torch.autocast(device_type=device.type, dtype=dtype)

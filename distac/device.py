"""The one device choice: the accelerator when present unless told otherwise, and a clear error when a
requested one is absent."""

from __future__ import annotations

import torch

from distac.errors import ConfigError


def resolve_device(device: torch.device | str | None = None) -> torch.device:
    """``None`` or ``"auto"``: CUDA when available, else CPU; anything else as given, checked."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {device!r} ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} was requested but no CUDA device is available")
    return device

"""ghosted: remove decoder layers from a causal LM and recover quality with closed-form operators."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load", "GhostedError"]

from .errors import GhostedError


def load(path: str, dtype=None, device: str | None = None):
    """Load a ghosted checkpoint folder (ghosts included) without trust_remote_code."""
    import torch

    from .checkpoint import load as _load
    from .checks import check_device

    if device is not None:
        check_device(device)
    return _load(path, dtype=dtype or torch.float32, device=device)

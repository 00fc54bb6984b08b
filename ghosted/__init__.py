"""ghosted: remove decoder layers from a causal LM and recover quality with closed-form operators."""

from __future__ import annotations

from ghosted.version import __version__

__all__ = ["__version__", "load", "verify", "GhostedError"]

from ghosted.errors import GhostedError


def load(path: str, dtype=None, device: str | None = None):
    """Verify, then load a ghosted checkpoint folder (ghosts included) without running the folder's code."""
    import torch

    from ghosted.checkpoint.format import load as _load
    from ghosted.checks import check_device

    if device is not None:
        check_device(device)
    return _load(path, dtype=dtype or torch.float32, device=device)


def verify(path: str) -> dict:
    """Check a checkpoint folder (manifest hashes, code, layer count, ghost sites and shapes, finite values);
    GhostedError with the reason if it must not be loaded."""
    from ghosted.checkpoint.format import verify as _verify

    return _verify(path)

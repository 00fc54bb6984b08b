"""ghosted: remove decoder layers from a causal LM and recover quality with closed-form operators.

The public API: `load` and `verify` (a checkpoint folder), and, from ghosted.api, `load_params`, `prune`,
`search`, `heal`, `evaluate` and `compare` (what the commands do). They are imported on first use, so
`import ghosted` does not import torch.
"""

from __future__ import annotations

from typing import Any

from ghosted.errors import GhostedError
from ghosted.version import __version__

_API = ("HealResult", "PruneResult", "compare", "evaluate", "heal", "load_params", "prune", "search")

__all__ = ["__version__", "load", "verify", "GhostedError", *_API]


def load(path: str, dtype=None, device: str | None = None):
    """Verify, then load a ghosted checkpoint folder (ghosts included) without running the folder's code."""
    import torch

    from ghosted.checkpoint.load import load as _load
    from ghosted.checks import check_device

    if device is not None:
        check_device(device)
    return _load(path, dtype=dtype or torch.float32, device=device)


def verify(path: str) -> dict:
    """Check a checkpoint folder (manifest hashes, code, layer count, ghost sites and shapes, finite values);
    GhostedError with the reason if it must not be loaded."""
    from ghosted.checkpoint.verify import verify as _verify

    return _verify(path)


def __getattr__(name: str) -> Any:
    if name in _API:
        from ghosted import api

        return getattr(api, name)
    raise AttributeError(f"module 'ghosted' has no attribute {name!r}")

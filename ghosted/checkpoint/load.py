"""Load a ghosted checkpoint with this package's own ghost code, after verifying it."""

from __future__ import annotations

from pathlib import Path

import torch

from ghosted.checkpoint.format import _base_classes, ghost_classes
from ghosted.checkpoint.meta import read_meta
from ghosted.checkpoint.verify import verified


def load(path: str | Path, dtype: torch.dtype = torch.float32, device: str | None = None) -> torch.nn.Module:
    """Verify, then load a ghosted checkpoint with this package's own ghost code (the folder's code never runs)."""
    verified(path)  # the verdict of an unchanged folder verified before in this process is reused
    meta = read_meta(path)
    if meta.has_ghosts:
        cfg_cls, model_cls = ghost_classes(meta.base_architecture)
        model = model_cls.from_pretrained(str(path), config=cfg_cls.from_pretrained(str(path)), dtype=dtype)
    else:
        model_cls, _ = _base_classes(meta.base_architecture)
        model = model_cls.from_pretrained(str(path), dtype=dtype)
    if device:
        model.to(device)
    model.eval()
    return model

"""A checkpoint folder's content hash: the identity `ghosted eval` records for a checkpoint it evaluated and the
registry tags a version with (`checkpoint_sha256`). Pure hashlib: no torch, no MLflow."""

from __future__ import annotations

import hashlib
from pathlib import Path


def checkpoint_sha256(folder: str | Path) -> str:
    """One sha256 over every file of a checkpoint folder (relative path, size and content, in path order)."""
    folder = Path(folder)
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        h.update(f"{rel}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()

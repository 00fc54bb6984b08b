"""sha256 of files: the one hash of files (models, checkpoints, statistics), and its per-run cache for a file ghosted
hashes more than once (manifest, marker, the check before a replace)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks (the one hash of files: models, checkpoints, statistics)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_DIGESTS: dict[tuple[int, ...], str] = {}


def cached_sha256(path: Path) -> str:
    """file_sha256, remembered for the file as it is now (device, inode, size, mtime, ctime): a file ghosted
    hashes more than once in a run (manifest, marker, the check before a replace) is read once."""
    st = path.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    digest = _DIGESTS.get(key)
    if digest is None:
        digest = _DIGESTS[key] = file_sha256(path)
    return digest

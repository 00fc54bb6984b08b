"""Check a checkpoint folder before anything loads it: links, manifest hashes, the files a loader would read, code
files, safetensors headers, layer count, tensor names, shapes and dtypes, ghost sites, finite values.

`verified(path)` is the one entry point of every command that reads a checkpoint (export, register, eval, compare,
bench, the MLflow model, `ghosted.load`): it returns the folder's content hash (checkpoint.digest's
`checkpoint_sha256`, the identity `ghosted eval` records and the registry tags a version with), computed in the
same pass that checks the manifest, and remembers its verdict while no file of the folder changes (size, times and
inode of every file), so a command that reaches a folder twice reads it once. `checked_model(path)` is the same
for a model argument that may also be a dense Hugging Face folder, a shipped name or a hub id (not checkpoints).

The manifest only tells an intact folder from an accidentally changed one: anyone can rewrite it, so the structure
is checked on its own too (checkpoint.verify_files: links, manifest, code and the files a loader would read;
checkpoint.verify_tensors: safetensors headers, tensor names, shapes and dtype, ghosts, finite values).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ghosted.checkpoint.format import FORMAT, MANIFEST
from ghosted.checkpoint.meta import CheckpointMeta, read_config
from ghosted.checkpoint.verify_files import (
    MAX_CONFIG,
    _check_code,
    _check_files,
    _check_manifest,
    _hash_files,
    _scan,
    _signature,
    _upgrade_hint,
)
from ghosted.checkpoint.verify_tensors import _check_tensors
from ghosted.errors import GhostedError
from ghosted.json_io import parse_json

_CACHE_SIZE = 16


@dataclass(frozen=True)
class Verified:
    """A checkpoint folder that passed verify: its content hash (checkpoint.digest.checkpoint_sha256) and the
    summary `ghosted verify` prints."""

    path: Path
    sha256: str
    summary: dict = field(compare=False)


_CACHE: dict[str, tuple[tuple, Verified]] = {}


def _verify(folder: Path, files: dict[str, os.stat_result]) -> Verified:
    doc = read_config(folder)
    meta = CheckpointMeta.from_dict(doc["ghosted"])
    if meta.is_legacy:
        raise GhostedError(f"{folder} is in checkpoint format 1 of an older ghosted (no manifest; plain loaders read "
                           f"a ghost checkpoint of that format as its base model and drop the ghosts): "
                           f"{_upgrade_hint(folder)}")
    if meta.format != FORMAT:
        raise GhostedError(f"{folder}: checkpoint format {meta.format!r}; this ghosted reads format {FORMAT}")
    base = meta.base_architecture or None
    has_ghosts = meta.has_ghosts
    if not (folder / MANIFEST).is_file():
        _check_manifest(folder)  # the one-line refusal of a folder without its manifest, before anything is hashed
    hashes, sha = _hash_files(folder)
    unread = _check_manifest(folder, hashes)
    _check_code(folder, doc, base, has_ghosts)
    weights, index = _check_files(folder, set(files), has_ghosts)
    _check_tensors(folder, doc, meta, base, has_ghosts, weights, index)
    summary = {"path": str(folder), "ghosts": len(meta.ghost_list), "num_layers": meta.to_dict().get("num_layers"),
               "base_architecture": base, "kind": "ghost" if has_ghosts else "plain", "unchecked_files": unread,
               "checkpoint_sha256": sha}
    return Verified(folder, sha, summary)


def verified(path: str | Path) -> Verified:
    """Verify a checkpoint folder (or take the verdict of an unchanged folder verified before in this process);
    GhostedError with the reason if it must not be read."""
    folder = Path(path)
    if not folder.is_dir():
        raise GhostedError(f"{folder} is not a folder")
    files = _scan(folder)  # links and special files are refused before any file is read
    key, sig = str(folder.resolve()), _signature(files)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] == sig:
        return Verified(folder, hit[1].sha256, {**hit[1].summary, "path": str(folder)})
    result = _verify(folder, files)
    _CACHE.pop(key, None)
    _CACHE[key] = (sig, result)
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    return result


def _has_block(folder: Path) -> bool:
    """Whether a folder's config.json (a file of bounded size, possibly behind a link) has a `ghosted` block."""
    cfg = folder / "config.json"
    try:
        st = cfg.stat()
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_CONFIG:
        return False
    try:
        doc = parse_json(cfg.read_bytes(), str(cfg), "model config", max_bytes=MAX_CONFIG)
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(doc, dict) and "ghosted" in doc


def checked_model(model: str | Path) -> Verified | None:
    """verified(model) where `model` is a ghosted checkpoint (a folder whose config.json has a `ghosted` block);
    None for any other model argument (a dense Hugging Face folder, a shipped name, a hub id, a GGUF file), which is
    no checkpoint and which its own loader reads."""
    folder = Path(str(model)).expanduser()
    if not folder.is_dir() or not _has_block(folder):
        return None
    return verified(folder)


def verify(path: str | Path) -> dict:
    """Check a checkpoint folder before anything loads it: links, manifest hashes, the files a loader reads, code,
    safetensors headers, tensor names, shapes and dtypes, layer count, ghost sites, finite values. Returns a
    summary; raises GhostedError with the reason."""
    return verified(path).summary

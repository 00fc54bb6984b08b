"""Rewrite a checkpoint of an older format in the current one, with this package's code."""

from __future__ import annotations

from pathlib import Path

import torch

from ghosted._remote import modeling_ghosted
from ghosted.checkpoint.card import is_inert
from ghosted.checkpoint.format import (
    AUTO_MAP,
    CONFIG_FILE,
    FORMAT,
    MANIFEST,
    MODEL_CLASS,
    MODEL_TYPE,
    MODELING_FILE,
    VARIANT,
    _base_classes,
    ghost_classes,
    load_tokenizer,
    remote_sources,
    save,
)
from ghosted.checkpoint.meta import ABSENT, CheckpointMeta, read_config, read_meta
from ghosted.checkpoint.verify import verify
from ghosted.checkpoint.verify_files import _check_manifest, _code_files, _scan, _stale_code
from ghosted.errors import GhostedError
from ghosted.io_owned import list_entries, owned_files
from ghosted.io_temps import MARKER, read_marker
from ghosted.json_io import index_shards

# Files a loader reads as weights or runs as code: one of the user's would sit beside the rewritten checkpoint.
_LOADER_SUFFIXES = {".py", ".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".msgpack", ".h5"}


def _load_legacy(folder: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A format-1 checkpoint (base model type, weights in model.safetensors), with this package's ghost code."""
    meta = read_meta(folder)
    model_cls, config_cls = _base_classes(meta.base_architecture or None)
    config = config_cls.from_pretrained(str(folder))
    for attr in ("auto_map",):
        if hasattr(config, attr):
            delattr(config, attr)
    cls = type(MODEL_CLASS, (modeling_ghosted.GhostedMixin, model_cls), {"__module__": __name__})
    return cls.from_pretrained(str(folder), config=config, dtype=dtype, variant=None).eval()


def _older_code(folder: Path, doc: dict, meta: CheckpointMeta) -> bool:
    """A ghost checkpoint in the current format whose code files are this package's files in name but not in
    text: written by another ghosted version."""
    if meta.format != FORMAT or not meta.has_ghosts:
        return False
    if doc.get("model_type") != MODEL_TYPE or doc.get("auto_map") != AUTO_MAP:
        return False
    try:
        expected = remote_sources(meta.base_architecture or None)
    except GhostedError:
        return False
    return _code_files(folder) == sorted(expected) and bool(_stale_code(folder, expected))


def _weights(folder: Path, variant: str | None) -> set[str]:
    """The weight files (and index) the upgrade loads: their content is written anew, in the current format."""
    name = f"model.{variant}.safetensors" if variant else "model.safetensors"
    index = f"model.safetensors.index.{variant}.json" if variant else "model.safetensors.index.json"
    found = {n for n in (name, index) if (folder / n).is_file()}
    if index in found:
        try:
            found.update(index_shards(folder / index))  # plain shard names only (JSONFileError is a ValueError)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
    return found


def _user_entries(folder: Path, rewritten: set[str]) -> dict[str, Path]:
    """The entries of `folder` that are the user's: neither proven ghosted's (marker or manifest) nor read by the
    upgrade as the checkpoint (`rewritten`). They are carried into the rewritten folder unchanged; one a loader
    would read as weights or code is refused first (it cannot stay, and it is never deleted)."""
    owned = owned_files(folder) | rewritten
    user = {name: p for name, p in list_entries(folder).items() if name not in owned}
    for name, p in sorted(user.items()):
        if is_inert(name):
            continue
        if p.is_symlink():
            raise GhostedError(f"cannot upgrade {folder}: {name} is a link ghosted did not make, and a checkpoint "
                               "holds no links a loader would read; move it out of the folder (or put the file "
                               "itself there) and run again")
        if p.is_file() and Path(name).suffix in _LOADER_SUFFIXES:
            raise GhostedError(f"cannot upgrade {folder}: {name} is not a file ghosted wrote, and a loader would "
                               "read it beside the rewritten checkpoint; move it out of the folder and run again")
    parents = {"/".join(n.split("/")[:i]) for n in owned for i in range(1, n.count("/") + 1)}
    return {name: p for name, p in user.items() if name not in parents}


def upgrade(path: str | Path) -> dict:
    """Rewrite a checkpoint of an older format in the current format, in place.

    Only this package's code reads the old folder, so upgrading never runs the folder's code. A folder with a
    manifest is rewritten only when its files are exactly what its manifest lists and its code files are another
    ghosted version's (an intact checkpoint written before the ghost code changed); otherwise it is verified, and
    a failing one is refused, never rewritten. Files ghosted did not write are kept as they are (see
    _user_entries): the folder is rewritten only when none of them would be lost."""
    folder = Path(path)
    _scan(folder)  # a link out of the folder (or a FIFO) is refused before anything is read
    doc = read_config(folder)
    meta = CheckpointMeta.from_dict(doc["ghosted"])
    if not meta.is_legacy:
        # Never re-bless a folder whose own manifest disagrees with it (that is what tampering looks like), nor one
        # of the current format without its manifest: only an older format was written without one.
        _check_manifest(folder)
        if not _older_code(folder, doc, meta):
            return {**verify(folder), "upgraded": False}
    variant = VARIANT if meta.has_ghosts and not meta.is_legacy else None
    rewritten = _weights(folder, variant) | {"config.json", MANIFEST, MARKER}
    if meta.has_ghosts:
        rewritten |= {MODELING_FILE, CONFIG_FILE}
    keep = _user_entries(folder, rewritten)  # refused before any loading
    if meta.is_legacy:
        model = _load_legacy(folder)
    elif meta.has_ghosts:
        cfg_cls, model_cls = ghost_classes(meta.base_architecture)
        model = model_cls.from_pretrained(str(folder), config=cfg_cls.from_pretrained(str(folder))).eval()
    else:
        model = _base_classes(meta.base_architecture)[0].from_pretrained(str(folder)).eval()
    try:
        tokenizer = load_tokenizer(folder)
    except Exception:  # noqa: BLE001 - a checkpoint saved without a tokenizer stays without one
        tokenizer = None
    save(model, tokenizer, folder, meta.updated(format=ABSENT), keep=keep, rewrite=rewritten)
    kept = (read_marker(folder) or {}).get("kept") or []
    return {**verify(folder), "upgraded": True, "kept_files": sorted(k for k in kept if not (folder / k).is_dir())}

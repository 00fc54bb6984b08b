"""Rewrite a checkpoint of an older format in the current one, with this package's code."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ghosted._remote import modeling_ghosted
from ghosted.checkpoint.card import is_inert
from ghosted.checkpoint.format import (
    AUTO_MAP,
    FORMAT,
    MANIFEST,
    MODEL_CLASS,
    MODEL_TYPE,
    _base_classes,
    _listed_files,
    ghost_classes,
    load_tokenizer,
    remote_sources,
    save,
)
from ghosted.checkpoint.meta import ABSENT, CheckpointMeta, read_config, read_meta
from ghosted.checkpoint.verify import _check_manifest, _code_files, _scan, _stale_code, verify
from ghosted.errors import GhostedError
from ghosted.io import file_sha256


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


def _user_files(folder: Path) -> dict[str, Path]:
    """The files of `folder` no loader reads (README.md, .gitattributes, LICENSE, ...) that ghosted did not write
    as they are (not in its manifest, or changed since): upgrade keeps them. Any other file is rewritten or
    dropped (a loader would read it, and only what this ghosted writes is kept of those)."""
    try:
        listed = json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("files") or {}
    except (OSError, ValueError, AttributeError):
        listed = {}
    return {name: folder / name for name in _listed_files(folder)
            if is_inert(name) and listed.get(name) != file_sha256(folder / name)}


def upgrade(path: str | Path) -> dict:
    """Rewrite a checkpoint of an older format in the current format, in place.

    Only this package's code reads the old folder, so upgrading never runs the folder's code. A folder with a
    manifest is rewritten only when its files are exactly what its manifest lists and its code files are another
    ghosted version's (an intact checkpoint written before the ghost code changed); otherwise it is verified, and
    a failing one is refused, never rewritten."""
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
    kept = _user_files(folder)
    save(model, tokenizer, folder, meta.updated(format=ABSENT), force=True, keep=kept)
    return {**verify(folder), "upgraded": True, "kept_files": sorted(kept)}

"""Provenance of an evaluation (`ghosted eval --out`): what was evaluated and on which protocol. Pure (json,
hashlib); the model's identity is computed by `model_identity`, which imports the loaders only when called.

The `provenance` block of an evaluation JSON:
- `model`: a checkpoint folder (config.json with a `ghosted` block) by its content hash (`checkpoint_sha256`, the
  registry's version tag), any other model by its base fingerprint (ghosted.models.fingerprint: a shipped model's or
  a .gguf file's sha256, a folder's content hash, a hub model's commit) - what a checkpoint records as its
  `base_fingerprint`;
- `protocol`: what decides the numbers besides the model - per perplexity source the sha256 of the token windows
  scored, their count and length; per zero-shot task the sha256 of the items scored (after --limit), their count
  and lm-eval's task version (its prompt), and num_fewshot;
- `protocol_sha256`: sha256 of the protocol block as canonical JSON. Two evaluations with the same protocol_sha256
  scored the same tokens and items, so their numbers compare (the gate's ratios, the champion rule);
- `limit` and `versions` (ghosted, torch, transformers, lm-eval) are recorded but not hashed: the items' sha256 and
  count already say what the limit took (`--limit 5000` and no limit on a 3000-item task are one protocol), and a
  library upgrade that changes the prompt changes the task version or the items.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ghosted.json_io import read_json

PROVENANCE_KEY = "provenance"
PROTOCOL_KEY = "protocol_sha256"


def is_checkpoint(folder: str | Path) -> bool:
    """Whether a folder is a ghosted checkpoint (its config.json carries a `ghosted` block)."""
    try:
        cfg = read_json(Path(folder) / "config.json", "model config")
    except (OSError, ValueError):  # JSONFileError is a ValueError: not readable, so not a checkpoint
        return False
    return isinstance(cfg, dict) and isinstance(cfg.get("ghosted"), dict)


def model_identity(ref: Any) -> dict[str, str]:
    """The identity of a resolved model (ghosted.models.ModelRef): a checkpoint's content sha256, else its
    base fingerprint."""
    if ref.kind == "folder" and is_checkpoint(ref.path):
        from ghosted.checkpoint.verify import verified

        # verified first: a checkpoint `ghosted verify` refuses is never evaluated (its hash comes with the verdict)
        return {"name": ref.name, "kind": "checkpoint", "checkpoint_sha256": verified(ref.path).sha256}
    from ghosted.models import fingerprint

    return {"name": ref.name, "kind": "base", "fingerprint": fingerprint(ref)}


def protocol(ppl: Mapping[str, Any], zeroshot: Mapping[str, Any] | None) -> dict[str, Any]:
    """The protocol block of an evaluation from its `ppl` and `zeroshot` results."""
    out: dict[str, Any] = {"ppl": {src: {"sha256": r.get("sha256"), "windows": r.get("windows"),
                                         "seq_len": r.get("seq_len")} for src, r in ppl.items()},
                           "zeroshot": None}
    if zeroshot:
        out["zeroshot"] = {"num_fewshot": zeroshot.get("num_fewshot"),
                           "tasks": {t: {"sha256": r.get("sha256"), "n": r.get("n"), "version": r.get("version")}
                                     for t, r in zeroshot["tasks"].items()}}
    return out


def protocol_sha256(block: Mapping[str, Any]) -> str:
    """sha256 of a protocol block as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(block, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def provenance(identity: Mapping[str, str], ppl: Mapping[str, Any], zeroshot: Mapping[str, Any] | None,
               limit: int | None, versions: Mapping[str, str]) -> dict[str, Any]:
    """The provenance block of one evaluation."""
    block = protocol(ppl, zeroshot)
    return {"model": dict(identity), "protocol": block, PROTOCOL_KEY: protocol_sha256(block), "limit": limit,
            "versions": dict(versions)}


def _short(v: Any) -> str:
    return v[:12] if isinstance(v, str) and len(v) == 64 else repr(v)


def _entry_diff(a: Mapping[str, Any], b: Mapping[str, Any], labels: tuple[str, str]) -> str:
    keys = sorted(set(a) | set(b), key=lambda k: (k != "sha256", k))
    return ", ".join(f"{k} {_short(a.get(k))} ({labels[0]}) vs {_short(b.get(k))} ({labels[1]})"
                     for k in keys if a.get(k) != b.get(k))


def _named(kind: str, a: Mapping[str, Any], b: Mapping[str, Any], labels: tuple[str, str]) -> list[str]:
    parts = []
    for name in sorted(set(a) | set(b)):
        if name not in b:
            parts.append(f"{kind} {name!r} only in the {labels[0]} metrics")
        elif name not in a:
            parts.append(f"{kind} {name!r} only in the {labels[1]} metrics")
        elif a[name] != b[name]:
            parts.append(f"{kind} {name!r}: {_entry_diff(_mapping(a[name]), _mapping(b[name]), labels)}")
    return parts


def _mapping(x: Any) -> Mapping[str, Any]:
    return x if isinstance(x, Mapping) else {}


def differences(a: Mapping[str, Any], b: Mapping[str, Any], labels: tuple[str, str] = ("dense", "pruned")) -> list[str]:
    """The parts in which two protocol blocks differ, one phrase each (empty when they are the same)."""
    parts = _named("ppl", _mapping(a.get("ppl")), _mapping(b.get("ppl")), labels)
    za, zb = a.get("zeroshot"), b.get("zeroshot")
    if bool(za) != bool(zb):
        parts.append(f"zero-shot tasks only in the {labels[0] if za else labels[1]} metrics")
    elif za and zb:
        parts += _named("zero-shot task", _mapping(za.get("tasks")), _mapping(zb.get("tasks")), labels)
        if za.get("num_fewshot") != zb.get("num_fewshot"):
            parts.append(f"num_fewshot {za.get('num_fewshot')} ({labels[0]}) vs {zb.get('num_fewshot')} ({labels[1]})")
    if not parts and a != b:
        parts.append("the protocol blocks differ")
    return parts

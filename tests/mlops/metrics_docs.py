"""Hand-made `ghosted eval` results for the registry tests, with the provenance block `ghosted eval` writes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ghosted.checkpoint.digest import checkpoint_sha256
from ghosted.evaluation.provenance import provenance


def stamp(doc: dict, *, checkpoint: Path | None = None, base_of: Path | None = None, protocol: str = "p1") -> dict:
    """`doc` with a provenance block: the evaluation of `checkpoint` (its content sha256), or of the base model of
    the checkpoint `base_of` (its recorded base_fingerprint). Every perplexity source gets windows whose sha256
    depends on `protocol` (two docs of the same `protocol` have the same protocol_sha256)."""
    for src, r in doc.get("ppl", {}).items():
        r.update(sha256=hashlib.sha256(f"{protocol}:{src}".encode()).hexdigest(), windows=2, seq_len=16)
    if checkpoint is not None:
        identity = {"name": str(checkpoint), "kind": "checkpoint", "checkpoint_sha256": checkpoint_sha256(checkpoint)}
    else:
        meta = json.loads((Path(base_of) / "config.json").read_text())["ghosted"]
        identity = {"name": str(meta["base_model"]), "kind": "base", "fingerprint": meta["base_fingerprint"]}
    doc["provenance"] = provenance(identity, doc.get("ppl", {}), doc.get("zeroshot"), None, {"ghosted": "test"})
    return doc

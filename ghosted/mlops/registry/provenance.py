"""The register's provenance checks (ghosted/evaluation/provenance.py writes the blocks): the pruned metrics are the
evaluation of this very checkpoint (its content sha256), the dense metrics that of its base model (its fingerprint),
and both were measured on one protocol. Each refusal is one line naming the file and the command that fixes it.

Metrics files written before `ghosted eval` recorded provenance (neither file has a block) are accepted with a
warning: the version is tagged `provenance=missing` and carries no protocol, so the champion rule ranks it only
against versions that have none either. One file with a block and one without is refused.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ghosted.errors import GhostedError
from ghosted.evaluation.provenance import PROTOCOL_KEY, PROVENANCE_KEY, differences, protocol, protocol_sha256


@dataclass(frozen=True)
class Checked:
    """What the checks found: the common protocol's sha256 (None for metrics without provenance) and a warning."""

    protocol_sha256: str | None
    warning: str | None = None


def rerun(doc: Mapping[str, Any], model: str | Path, out: str | Path) -> str:
    """The `ghosted eval` command that writes `out` for `model` with the settings `doc` was evaluated with."""
    parts: list[str] = []
    if isinstance(doc.get("command"), str):
        try:
            parts = shlex.split(doc["command"])
        except ValueError:
            parts = []
    if len(parts) < 3 or parts[:2] != ["ghosted", "eval"]:
        parts = ["ghosted", "eval", "MODEL", "--config", "params.yaml"]
    parts[2] = str(model)
    if "--out" in parts[:-1]:
        parts[parts.index("--out") + 1] = str(out)
    else:
        parts += ["--out", str(out)]
    return shlex.join(parts)


def _fp(fingerprint: Any) -> str:
    """A fingerprint as shown in a message: `sha256:` or `hub:` and the first 12 hex digits."""
    kind, _, digest = str(fingerprint).partition(":")
    return f"{kind}:{digest[:12]}" if digest else str(fingerprint)


def _block(path: Path, doc: Mapping[str, Any], fix: str) -> Mapping[str, Any]:
    """The provenance block of an evaluation, checked against the results it sits beside."""
    block = doc.get(PROVENANCE_KEY)
    try:
        model, sha = block["model"], block[PROTOCOL_KEY]
        same = (isinstance(model, Mapping) and isinstance(sha, str)
                and protocol_sha256(protocol(doc.get("ppl") or {}, doc.get("zeroshot"))) == sha)
    except (TypeError, KeyError, AttributeError):
        same = False
    if not same:
        raise GhostedError(f"{path}: its provenance block does not match its results (edited or assembled by "
                           f"hand?): regenerate it with `{fix}`")
    return block


def _missing(pruned_path: Path, pruned: dict, dense_path: Path, dense: dict, checkpoint: Path,
             base: str) -> Checked | None:
    """Checked with a warning when neither file has a provenance block; a refusal when only one has."""
    fixes = {"pruned": rerun(pruned, checkpoint, pruned_path), "dense": rerun(pruned, base, dense_path)}
    has = {"pruned": PROVENANCE_KEY in pruned, "dense": PROVENANCE_KEY in dense}
    if all(has.values()):
        return None
    if not any(has.values()):
        return Checked(None, f"{pruned_path} and {dense_path} have no provenance block (written by an older "
                             f"`ghosted eval`): not checked against {checkpoint} or against each other, and ranked "
                             f"only against versions without one; regenerate them with `{fixes['pruned']}` and "
                             f"`{fixes['dense']}`")
    which = "pruned" if not has["pruned"] else "dense"
    path, other = (pruned_path, dense_path) if which == "pruned" else (dense_path, pruned_path)
    raise GhostedError(f"{path} has no provenance block (written by an older `ghosted eval`) while {other} has one: "
                       f"regenerate it with `{fixes[which]}`")


def check(checkpoint: Path, sha: str, meta: Mapping[str, Any], pruned_path: Path, pruned: dict, dense_path: Path,
          dense: dict) -> Checked:
    """Refuse metrics that are not this checkpoint's own, dense metrics of another base model and a dense/pruned
    pair measured on different protocols; accept (with a warning) a pair that predates provenance."""
    base = str(meta.get("base_model") or "BASE_MODEL")
    fix_pruned, fix_dense = rerun(pruned, checkpoint, pruned_path), rerun(pruned, base, dense_path)
    legacy = _missing(pruned_path, pruned, dense_path, dense, checkpoint, base)
    if legacy is not None:
        return legacy
    pb, db = _block(pruned_path, pruned, fix_pruned), _block(dense_path, dense, rerun(dense, base, dense_path))
    got = pb["model"].get("checkpoint_sha256")
    if got != sha:
        what = f"checkpoint sha256 {got[:12]}" if isinstance(got, str) else f"fingerprint {_fp(pb['model'].get('fingerprint'))}"
        raise GhostedError(f"{pruned_path} is not the evaluation of {checkpoint}: it evaluated "
                           f"{pb['model'].get('name')} ({what}), this checkpoint's content is sha256 {sha[:12]}; "
                           f"evaluate this checkpoint with `{fix_pruned}`")
    want, got = meta.get("base_fingerprint"), db["model"].get("fingerprint")
    if got != want:
        what = f"fingerprint {_fp(got)}" if got else f"checkpoint sha256 {str(db['model'].get('checkpoint_sha256'))[:12]}"
        raise GhostedError(f"{dense_path} is not the evaluation of {checkpoint}'s base model {base} (fingerprint "
                           f"{_fp(want)}): it evaluated {db['model'].get('name')} ({what}); evaluate the base model "
                           f"with `{fix_dense}`")
    if db[PROTOCOL_KEY] != pb[PROTOCOL_KEY]:
        parts = "; ".join(differences(db["protocol"], pb["protocol"]))
        raise GhostedError(f"{dense_path} and {pruned_path} were measured on different protocols ({parts}), so their "
                           f"ratios do not compare: evaluate the base model as the checkpoint was, with `{fix_dense}`")
    return Checked(pb[PROTOCOL_KEY])

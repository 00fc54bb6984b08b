"""What the registry calls things: the tag names, the registered model's name, a checkpoint's lineage tags, its
content hash (ghosted/checkpoint/digest.py, re-exported), and settings blocks flattened into MLflow params. Pure: no
MLflow here."""

from __future__ import annotations

import json
import math
import re
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ghosted.checkpoint.digest import checkpoint_sha256  # noqa: F401 - re-exported; `ghosted eval` hashes with it too
from ghosted.errors import GhostedError
from ghosted.evaluation.gate import FINGERPRINT_KEY, PROTOCOL_KEY

CHAMPION = "champion"
HISTORY_TAG = "champion_history"
FINGERPRINT_TAG = FINGERPRINT_KEY
SHA_TAG = "checkpoint_sha256"  # the checkpoint's content hash: `ghosted export models:/...` and the model check it
GGUF_TAG = "gguf"  # what `ghosted export --gguf` writes: the llama.cpp architecture, or "no" (then GGUF_REASON_TAG)
GGUF_REASON_TAG = "gguf_reason"
PROTOCOL_TAG = PROTOCOL_KEY  # the evaluations' protocol_sha256 (absent: metrics without a provenance block)
PROVENANCE_TAG = "provenance"  # "missing" on a version registered from metrics without a provenance block
DECISION_TAG = "champion_decision"
STATE_TAG = "registration"  # "pending" from version creation until the alias decision is applied, then "done"
OWNER_TAG = "ghosted_owner"  # host:pid:process-start of the `ghosted register` that owns a run
MODEL_ARTIFACT = "model"
GIT_COMMIT_TAG = "mlflow.source.git.commit"  # mlflow.utils.mlflow_tags.MLFLOW_GIT_COMMIT: the UI links the run to it

Log = Callable[[str], None]


def nolog(_msg: str) -> None:
    """The default Log: say nothing."""


def registered_name(base_model: str) -> str:
    """ghosted-<base>: shipped name as is, a folder's last component, a hub id with / -> --."""
    ref = str(base_model).rstrip("/")
    if Path(ref).expanduser().exists() or ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        ref = Path(ref).name
    ref = re.sub(r"[^A-Za-z0-9._-]+", "-", ref.replace("/", "--")).strip("-.") or "model"
    return f"ghosted-{ref}"


def check_name(name: str) -> str:
    """The name, if it is safe inside a registry filter string; else a one-line error."""
    # Names go into registry filter strings: quotes and backslashes would break (or inject into) them.
    if not name or re.search(r"['\"`\\]", name):
        raise GhostedError(f"registered model name {name!r} must be non-empty, without quotes or backslashes")
    return name


def git_info(cwd: Path | None = None) -> dict[str, str]:
    """Run tags: the repo's commit (MLflow's standard tag) and whether the tree is dirty, inside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {GIT_COMMIT_TAG: commit, "git_dirty": str(dirty).lower()}


def lineage(meta: Mapping[str, Any]) -> dict[str, str]:
    """Version tags that say where a checkpoint came from (from its config.json `ghosted` block)."""
    removed = meta.get("removed_layers") or []
    out = {"base_model": meta.get("base_model"), FINGERPRINT_TAG: meta.get("base_fingerprint"),
           "removed_layers": ",".join(str(i) for i in removed), "num_removed": len(removed),
           "num_layers": meta.get("num_layers"), "method": meta.get("recovery"),
           "calibration_sha256": meta.get("calibration_sha256"), "ridge": meta.get("ridge"),
           "token_policy": meta.get("token_policy"), "guard_fallback": (meta.get("guard") or {}).get("fallback"),
           "ghosted_version": meta.get("version"), "healed": str(meta.get("healed") is True).lower(),
           "heal_reason": str(_heal(meta).get("reason") or "")[:500] or None}
    return {k: str(v) for k, v in out.items() if v is not None}


def _heal(meta: Mapping[str, Any]) -> Mapping[str, Any]:
    rec = meta.get("heal")
    return rec if isinstance(rec, Mapping) else {}


def heal_params(meta: Mapping[str, Any]) -> dict[str, str]:
    """The heal recipe of the checkpoint's lineage (`ghosted heal`) as `heal.*` run params; none if it was not
    healed with one (a pass-through of the pipeline's heal stage records none)."""
    recipe = _heal(meta).get("recipe")
    return flatten_params(recipe, "heal.") if isinstance(recipe, Mapping) else {}


def heal_metrics(meta: Mapping[str, Any]) -> dict[str, float]:
    """What healing did, as run metrics: steps run and the held-out next-token loss before and after (after =
    before when the guard kept the checkpoint unhealed); none when no healing ran."""
    rec = _heal(meta)
    got = {"heal/steps": rec.get("steps_run"), "heal/heldout_nll_before": rec.get("heldout_nll_before"),
           "heal/heldout_nll_after": rec.get("heldout_nll_after")}
    if not isinstance(got["heal/heldout_nll_before"], (int, float)):
        return {}
    return {k: float(v) for k, v in got.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def param_key(part: Any) -> str:
    """One component of an MLflow param, metric or tag key: characters MLflow refuses become '_'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(part)).strip("_") or "_"


def flatten_params(doc: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Scalar and list leaves of a settings block as MLflow params ('a.b' -> str)."""
    out: dict[str, str] = {}
    for k, v in doc.items():
        key = f"{prefix}{param_key(k)}"
        if isinstance(v, Mapping):
            out.update(flatten_params(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v, default=str)[:500]
        elif v is not None:
            out[key] = str(v)[:500]
    return out

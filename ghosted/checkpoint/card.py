"""The model card (README.md) every checkpoint carries, and which extra files no loader reads.

A hub repository always holds a README.md and a `.gitattributes`; a user adds a LICENSE or an image. None of
them is read by a loader (transformers, ghosted.load, llama.cpp's converter), so verify accepts them beside the
manifest's files, while an extra file a loader WOULD read (weights, code, config, tokenizer, index) is refused.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from ghosted.checkpoint.meta import CheckpointMeta

CARD = "README.md"
# Files no loader reads: documentation, licences, images, VCS and hub-download bookkeeping.
_INERT_NAMES = {".gitattributes", ".gitignore", "license", "licence", "notice", "copying", "authors", "citation.cff"}
_INERT_SUFFIXES = {".md", ".markdown", ".rst", ".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp", ".pdf"}
_INERT_DIRS = {".git", ".cache"}  # a clone's history; huggingface_hub's download metadata (--local-dir)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_inert(name: str) -> bool:
    """True for a file (path relative to the checkpoint) that no loader reads."""
    p = PurePosixPath(name)
    if p.parts and p.parts[0] in _INERT_DIRS:
        return True
    stem = p.name.lower()
    return (stem in _INERT_NAMES or stem.split(".")[0] in ("license", "licence", "notice", "copying")
            or p.suffix.lower() in _INERT_SUFFIXES)


def _layers(removed: list[int]) -> str:
    runs: list[list[int]] = []
    for i in sorted(removed):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(f"{a}-{b}" if b > a else str(a) for a, b in runs) or "none"


def _front_matter(meta: CheckpointMeta, has_ghosts: bool) -> str:
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- ghosted",
             "- layer-pruning"]
    if has_ghosts:
        lines.append("- custom_code")
    if isinstance(meta.base_model, str) and _HUB_ID.match(meta.base_model):
        lines.append(f"base_model: {meta.base_model}")
    return "\n".join([*lines, "---", ""])


def _healing(meta: CheckpointMeta) -> str:
    """The card's line on `ghosted heal`: what it did, or why the checkpoint was kept unhealed."""
    rec = meta.heal
    data = rec.get("data") or {}
    tokens = (rec.get("tokens") or {}).get("train", "?")
    what = (f"distilled from the dense base on `{data.get('source', '?')}`: {rec.get('steps_run', '?')} steps, "
            f"{tokens:,} training tokens" if isinstance(tokens, int) else "distilled from the dense base")
    if not meta.healed:
        return f"tried and not kept ({rec.get('reason', 'no reason recorded')})"
    before, after = rec.get("heldout_nll_before"), rec.get("heldout_nll_after")
    if isinstance(before, float) and isinstance(after, float):
        what += f", held-out loss {before:.4f} -> {after:.4f}"
    return what


def model_card(meta: CheckpointMeta, folder_name: str, params: dict[str, int | None] | None = None) -> str:
    """README.md of a checkpoint: what it was made from, what was removed and recovered, how to load it.
    `params`: {"params", "params_dense"} (checkpoint.format.param_counts)."""
    d = meta.to_dict()
    has_ghosts = meta.has_ghosts
    removed = list(d.get("removed_layers") or [])
    dense, kept = d.get("num_layers_dense"), d.get("num_layers")
    guard = d.get("guard") or {}
    rows = [("base model", f"`{d.get('base_model', 'unknown')}` ({d.get('base_architecture', 'unknown')})"),
            ("layers removed", f"{_layers(removed)} ({len(removed)} of {dense if dense is not None else '?'}; "
                               f"{kept if kept is not None else '?'} left)"),
            ("recovery", f"`{d.get('recovery', 'unknown')}`"
                         + (f", {len(meta.ghost_list)} ghost operator(s)" if has_ghosts else "")),
            ("held-out guard", f"{guard.get('mode', 'off')}, chose `{guard.get('chosen', '-')}`"
                               + (f" ({guard['reason']})" if guard.get("reason") else "")),
            ("written by", f"ghosted {d.get('version', '?')}, checkpoint format {d.get('format', '?')}")]
    if params and params.get("params") and params.get("params_dense"):
        n, nd = params["params"], params["params_dense"]
        rows.append(("parameters", f"{n:,} (dense base {nd:,}, ratio {n / nd:.3f})"))
    for folded in d.get("folded") or []:
        rows.append(("folded", str(folded)))
    if meta.heal:
        rows.append(("healing", _healing(meta)))
    table = "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])
    if has_ghosts:
        load = ("A ghost checkpoint is its own model type (`ghosted`): a loader that does not run its code refuses it "
                "instead of silently dropping the ghosts.\n\n```python\nimport ghosted\n"
                f"model = ghosted.load(\"{folder_name}\")  # verifies the folder, runs the ghosts with ghosted's code\n"
                "# or plain transformers, which runs this folder's code: check it first with\n"
                f"#   ghosted verify {folder_name}\nfrom transformers import AutoModelForCausalLM\n"
                f"model = AutoModelForCausalLM.from_pretrained(\"{folder_name}\", trust_remote_code=True)\n```\n")
    else:
        load = ("A plain checkpoint of the base architecture with fewer layers: every loader reads it.\n\n"
                f"```python\nimport ghosted\nmodel = ghosted.load(\"{folder_name}\")  # verifies the folder first\n"
                f"# or\nfrom transformers import AutoModelForCausalLM\n"
                f"model = AutoModelForCausalLM.from_pretrained(\"{folder_name}\")\n```\n")
    how = ("recovered with closed-form operators fitted on calibration data, then healed by distillation from the "
           "dense base" if meta.healed else "recovered with closed-form operators fitted on calibration data "
           "(no training)")
    return (f"{_front_matter(meta, has_ghosts)}\n# {folder_name}\n\n"
            f"Layer-pruned with ghosted: whole decoder layers removed, the lost quality {how}.\n\n"
            f"{table}\n\n## Loading\n\n{load}\n"
            "`ghosted verify DIR` checks every file against `ghosted_manifest.json` (sha256), the code against the "
            "installed ghosted, and the tensors. Files no loader reads (this card, `.gitattributes`, a licence, "
            "images) may be edited or added; any other change is refused.\n")

"""The full evaluation of a search finalist: patched in memory (training-free or distilled ghosts), or, with
search.heal, built into a checkpoint, healed with the heal: recipe (ghosted.healing.run.heal_checkpoint) and loaded.

Healing works on a checkpoint folder and changes the kept layers' weights, so a healed finalist is a folder,
not operators: it is built from a copy of the model (the search's own stays dense for the next plans), healed
into the search's scratch folder and evaluated from there; the chosen one is copied to OUT/checkpoint.
"""

from __future__ import annotations

import copy
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ghosted.config import EvalSettings, GateConfig, HealConfig
from ghosted.method.surgery import temporarily_pruned
from ghosted.models import Loaded
from ghosted.solve.grid import average
from ghosted.solve.solution import Solution, build_checkpoint

Log = Callable[[str], None]


def judged(quality: dict, dense: dict, gate: GateConfig) -> dict[str, Any]:
    """A frontier row's quality columns: the evaluation (ghosted.evaluation.run.evaluate_quality) and the gate's
    verdict on it."""
    from ghosted.evaluation.gate import apply_gate

    verdict = apply_gate(dense, quality, gate)
    return {"ppl": {s: v["ppl"] for s, v in quality["ppl"].items()}, "average": average(quality["zeroshot"]),
            "zeroshot": quality["zeroshot"], "passed": verdict.passed, "ppl_ratio": verdict.ppl_ratio,
            "retained_acc": verdict.retained_acc, "rank_value": verdict.rank_value, "reasons": list(verdict.reasons),
            "eval_seconds": quality["seconds"]}


def evaluate_solution(loaded: Loaded, sol: Solution, evaluation: EvalSettings, dense: dict, gate: GateConfig,
                      progress: bool = False) -> dict[str, Any]:
    """The gate's verdict on a solution (patched in memory, restored afterwards), evaluated on `eval:` data."""
    from ghosted.evaluation.run import evaluate_quality

    with temporarily_pruned(loaded.model, sol.removed, sol.operators) as pruned:
        quality = evaluate_quality(pruned, loaded.tokenizer, evaluation, progress)
    return judged(quality, dense, gate)


def evaluate_checkpoint(loaded: Loaded, folder: Path, evaluation: EvalSettings, dense: dict, gate: GateConfig,
                        progress: bool = False) -> dict[str, Any]:
    """The gate's verdict on a checkpoint folder (a healed finalist), loaded in the search model's dtype and device."""
    from ghosted.checkpoint.load import load
    from ghosted.evaluation.run import evaluate_quality

    first = next(loaded.model.parameters())
    model = load(folder, dtype=first.dtype, device=str(first.device))
    try:
        quality = evaluate_quality(model, loaded.tokenizer, evaluation, progress)
    finally:
        del model
    return judged(quality, dense, gate)


def heal_finalist(loaded: Loaded, sol: Solution, calib_sha256: str, cfg: HealConfig, folder: Path,
                  progress: bool = False, log: Log = print) -> tuple[dict, float]:
    """Build `sol`'s checkpoint from a copy of the model and heal it into `folder`; returns (the heal record as
    ghosted.healing.run.heal_checkpoint returns it, seconds). Healing that does not lower its held-out loss
    writes the checkpoint unhealed (record["healed"] false, with the reason)."""
    from ghosted.healing.run import heal_checkpoint

    t0 = time.perf_counter()
    pruned = folder.with_name(folder.name + "-pruned")
    twin = Loaded(copy.deepcopy(loaded.model), loaded.tokenizer, loaded.ref)
    try:
        build_checkpoint(twin, sol, calib_sha256, pruned)  # patches the copy in place
    finally:
        del twin
    try:
        record = heal_checkpoint(pruned, cfg, folder, progress=progress, log=log)
    finally:
        shutil.rmtree(pruned, ignore_errors=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return record, time.perf_counter() - t0

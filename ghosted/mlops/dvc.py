"""Glue for the DVC pipeline (dvc.yaml): the base model's fingerprint file, the register switch and the compact
metrics file that `dvc metrics show` / `dvc exp show` display.

The big evaluation JSONs stay plain outputs; metrics.json holds only the numbers that decide: per perplexity
source pruned, dense and ratio; the pruned model's accuracy per task and the average's pruned, dense and
retained; whether the gate passed; parameters and generation speed-up when the evaluations measured efficiency.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ghosted.config import RegistryConfig

EXPERIMENT_ENV = "DVC_EXP_BASELINE_REV"  # set by `dvc exp run` in every stage's environment


def base_model_record(model: str) -> dict[str, str]:
    """{model, fingerprint} of the base model (ghosted.models.identity: a shipped model's GGUF sha256, a hub model's
    commit, a folder's content hash): deterministic, so an unchanged model rewrites identical bytes."""
    from ghosted.models import identity

    return {"model": str(model), "fingerprint": identity(model)}


def write_base_model(model: str, out: Path) -> dict[str, str]:
    """data/base_model.json: the versioned stand-in for the base model that every later stage depends on."""
    from ghosted.io import write_text_atomic

    record = base_model_record(model)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(out), json.dumps(record, indent=2) + "\n")
    return record


def in_experiment() -> bool:
    """True inside `dvc exp run` (DVC sets DVC_EXP_BASELINE_REV for the stages it runs)."""
    return bool(os.environ.get(EXPERIMENT_ENV))


def registration_skipped(reg: RegistryConfig, passed: bool, mode: str | None = None) -> str | None:
    """Why this run registers no version (None: register it): registry.register and registry.experiments."""
    mode = mode or str(reg.register)
    if in_experiment() and not reg.experiments:
        return "a `dvc exp run` experiment (registry.experiments: false)"
    if mode == "false":
        return "registry.register: false"
    if mode == "on_pass" and not passed:
        return "the gate failed (registry.register: on_pass)"
    return None


def _label(source: str) -> str:
    # A file source ("data/text.txt") would nest in `dvc metrics show` at every "/" and ".": its stem reads better.
    return Path(source).stem if ("/" in source or source.endswith((".txt", ".jsonl"))) else source


def _task_acc(entry: Mapping[str, Any], metric: str) -> float | None:
    v = entry.get(metric, entry.get("acc"))
    return float(v) if isinstance(v, (int, float)) else None


def compact_metrics(dense: Mapping[str, Any], pruned: Mapping[str, Any], verdict: Any,
                    acc_metric: str) -> dict[str, Any]:
    """The decisive numbers only, for reports/pipeline/metrics.json (`verdict`: ghosted.evaluation.gate.apply_gate's)."""
    from ghosted.evaluation.efficiency import efficiency_ratios
    from ghosted.evaluation.gate import perplexities, zeroshot_average

    def drop_none(d: dict) -> dict:
        return {k: v for k, v in d.items() if v is not None}

    dp, pp = perplexities(dense), perplexities(pruned)
    out: dict[str, Any] = {"gate_passed": bool(verdict.passed)}
    out["ppl"] = {_label(s): drop_none({"pruned": pp.get(s), "dense": dp.get(s), "ratio": verdict.ppl_ratio.get(s)})
                  for s in sorted(set(dp) | set(pp))}
    tasks = ((pruned.get("zeroshot") or {}).get("tasks")) or {}
    acc = {t: _task_acc(v, acc_metric) for t, v in sorted(tasks.items())}  # per task: the pruned model's
    acc = {t: v for t, v in acc.items() if v is not None}
    if acc:
        acc["average"] = drop_none({"pruned": zeroshot_average(pruned, acc_metric),
                                    "dense": zeroshot_average(dense, acc_metric), "retained": verdict.retained_acc})
        out[acc_metric] = acc
    de = (dense.get("efficiency") or {}).get("model") or {}  # `ghosted eval --efficiency`: {"model": stats, ...}
    pe = (pruned.get("efficiency") or {}).get("model") or {}
    if de.get("params") and pe.get("params"):  # only when both evaluations measured efficiency
        out["params"] = {"pruned": pe["params"], "dense": de["params"], "ratio": pe["params"] / de["params"]}
        ratios = efficiency_ratios(de, pe)["batches"]
        speed = {f"batch_{b}": r["generate_speedup"] for b, r in ratios.items() if r.get("generate_speedup")}
        if speed:
            out["generate_speedup"] = speed
    return out

"""Evaluate one model (`ghosted eval`) or a grid of pruned variants against the dense model (`ghosted compare`).

Quality is perplexity on text sources (protocol in evaluate/perplexity.py) plus zero-shot accuracy through
lm-eval (evaluate/zeroshot.py). A grid costs ONE calibration pass: a shared capture holds the sums of every
candidate block for every k, each (k, method) cell is solved from it, and the pruned model is evaluated in
memory (surgery.temporarily_pruned) without reloading or copying weights.

Efficiency of a model is measured in a fresh Python process (the CLI re-invoked with a hidden flag), one
per model, so that CPU peak RSS reflects that model alone and not what this process did before.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from . import __version__, arch
from .errors import GhostedError
from .evaluate.zeroshot import DEFAULT_TASKS, SUPPORTED_TASKS

Log = Callable[[str], None]

from .config import (PPL_SOURCES_HELP, EfficiencySettings, EvalSettings,  # noqa: F401  (re-exported)
                     parse_names)


def _nolog(_msg: str) -> None:
    pass


# --------------------------------------------------------------------------- one model


def evaluate_quality(model: Any, tokenizer: Any, settings: EvalSettings, progress: bool = True) -> dict:
    """Perplexity on each source and zero-shot accuracy of an in-memory model (dense, pruned or patched)."""
    from .evaluate.perplexity import perplexity
    from .evaluate.zeroshot import evaluate_zeroshot

    t0 = time.perf_counter()
    ppl = {src: perplexity(model, tokenizer, src, seq_len=settings.seq_len, windows=settings.ppl_windows,
                           batch_size=settings.batch_size, progress=progress)
           for src in settings.ppl}
    zeroshot = None
    if settings.tasks:
        zeroshot = evaluate_zeroshot(model, tokenizer, settings.tasks, settings.limit, batch_size=settings.batch_size,
                                     progress=progress)
    return {"ppl": ppl, "zeroshot": zeroshot, "seconds": time.perf_counter() - t0}


def checkpoint_folder(ref) -> Path | None:
    """The folder whose *.safetensors are the model's checkpoint (None for GGUF files and hub ids)."""
    if ref.kind in ("folder", "shipped") and any(Path(ref.path).glob("*.safetensors")):
        return Path(ref.path)
    return None


def measure_loaded(loaded, eff: EfficiencySettings) -> dict:
    """measure_efficiency of an already loaded model, in THIS process (the worker side)."""
    from .evaluate.efficiency import measure_efficiency

    stats = measure_efficiency(loaded.model, loaded.tokenizer, batch_sizes=eff.batch_sizes, prompt_len=eff.prompt_len,
                               new_tokens=eff.new_tokens, repeats=eff.repeats,
                               checkpoint_dir=checkpoint_folder(loaded.ref))
    stats["model"] = loaded.ref.name
    return stats


def measure_isolated(model: str, eff: EfficiencySettings, dtype: str = "float32", device: str = "cpu",
                     device_map: str | None = None) -> dict:
    """measure_efficiency of `model` in a fresh Python process: peak memory counts that model alone."""
    with tempfile.TemporaryDirectory(prefix="ghosted-eff-") as tmp:
        out = Path(tmp) / "efficiency.json"
        cmd = [sys.executable, "-m", "ghosted.cli", "eval", str(model), "--dtype", dtype, "--device", device,
               "--efficiency-worker", "--prompt-len", str(eff.prompt_len), "--new-tokens", str(eff.new_tokens),
               "--repeats", str(eff.repeats), "--efficiency-batch-sizes", ",".join(map(str, eff.batch_sizes)),
               "--out", str(out), "--quiet", *(["--device-map", device_map] if device_map else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if proc.returncode != 0 or not out.is_file():
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            errors = [ln.removeprefix("ghosted: error: ") for ln in lines if ln.startswith("ghosted: error:")]
            why = errors[-1] if errors else (lines[-1] if lines else f"exit status {proc.returncode}")
            raise GhostedError(f"efficiency measurement of {model} failed: {why}")
        return json.loads(out.read_text())


def evaluate_model(model: str, settings: EvalSettings, *, dtype: str = "float32", device: str = "cpu",
                   device_map: str | None = None, efficiency: EfficiencySettings | None = None,
                   baseline: str | None = None, progress: bool = True, log: Log = _nolog) -> dict:
    """Everything `ghosted eval` reports for one model: perplexity, zero-shot accuracy and, if asked, efficiency
    (with `baseline`: the dense model measured in the same run, and pruned/dense ratios)."""
    from .models import load_model, resolve

    t0 = time.perf_counter()
    ref = resolve(model)
    if baseline is not None:
        resolve(baseline)
        efficiency = efficiency or EfficiencySettings()
    if efficiency is None and not settings.tasks and not settings.ppl:
        raise GhostedError("nothing to evaluate: give --tasks, --ppl or --efficiency")
    result: dict[str, Any] = {"model": ref.name, "dtype": dtype, "device": device}
    if efficiency is not None:  # before this process loads anything: the machine is quiet while it times
        result["efficiency"] = efficiency_report(model, efficiency, dtype, device, baseline, log, device_map)
    result["ppl"] = {}
    result["zeroshot"] = None
    if settings.tasks or settings.ppl:
        loaded = load_model(model, dtype=dtype, device=device, device_map=device_map)
        log(f"loaded {model} ({type(loaded.model).__name__}, {arch.num_layers(loaded.model)} layers)")
        quality = evaluate_quality(loaded.model, loaded.tokenizer, settings, progress)
        result["ppl"], result["zeroshot"] = quality["ppl"], quality["zeroshot"]
    result["settings"] = settings.as_dict()
    result["versions"] = versions()
    result["seconds"] = time.perf_counter() - t0
    return result


def efficiency_report(model: str, eff: EfficiencySettings, dtype: str, device: str, baseline: str | None,
                      log: Log = _nolog, device_map: str | None = None) -> dict:
    """Efficiency of `model` (and of `baseline`, with pruned/dense ratios), each measured in its own process."""
    from .evaluate.efficiency import efficiency_ratios

    out: dict[str, Any] = {"isolation": "each model measured in a fresh process", "settings": asdict(eff)}
    log(f"measuring efficiency of {model} on {device} (own process)")
    out["model"] = measure_isolated(model, eff, dtype, device, device_map)
    if baseline is not None:
        log(f"measuring efficiency of the baseline {baseline} on {device} (own process)")
        out["baseline"] = measure_isolated(baseline, eff, dtype, device, device_map)
        out["ratios"] = efficiency_ratios(out["baseline"], out["model"])
    return out


def versions() -> dict[str, str]:
    import torch
    import transformers

    out = {"ghosted": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import lm_eval

        out["lm_eval"] = lm_eval.__version__
    except ImportError:
        pass
    return out


# --------------------------------------------------------------------------- a grid of pruned variants


@dataclass(frozen=True)
class CompareConfig:
    """A (layers removed) x (recovery method) grid; `prune` is the template every cell's PruneConfig copies."""

    ks: tuple[int, ...]
    methods: tuple[str, ...]
    prune: Any  # PruneConfig: selection, token policy, ridge, guard, ... (remove/recovery set per cell)
    evaluation: EvalSettings = field(default_factory=EvalSettings)

    def __post_init__(self) -> None:
        from .recovery import RECOVERY

        if not self.ks:
            raise GhostedError("--remove needs at least one layer count, e.g. --remove 6,9")
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.ks):
            raise GhostedError(f"--remove takes whole numbers >= 1, got {list(self.ks)}")
        if len(set(self.ks)) != len(self.ks):
            raise GhostedError(f"--remove {','.join(map(str, self.ks))} lists a count twice")
        if not self.methods:
            raise GhostedError("--recovery needs at least one method, e.g. none,ghost")
        for m in self.methods:
            RECOVERY.get(m)
        if len(set(self.methods)) != len(self.methods):
            raise GhostedError(f"--recovery {','.join(self.methods)} lists a method twice")
        if not self.evaluation.tasks and not self.evaluation.ppl:
            raise GhostedError("nothing to evaluate: give --tasks or --ppl (not both 'none')")
        for cell in self.cells():  # every cell's config is valid before anything runs
            self.cell_config(*cell)

    def cells(self) -> list[tuple[int, str]]:
        """Grid order: k ascending, methods in the order given."""
        return [(k, m) for k in sorted(self.ks) for m in self.methods]

    def cell_config(self, k: int, method: str):
        return replace(self.prune, remove=k, layers=None, recovery=method)


def parse_ks(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError as exc:
        raise GhostedError(f"--remove takes layer counts like 6,9, got '{text}'") from exc


def format_layers(removed: list[int]) -> str:
    from .surgery import runs

    return ",".join(f"{a}-{b - 1}" if b - a > 1 else str(a) for a, b in runs(removed))


def _resume_key(loaded, calib, cfg: CompareConfig) -> str:
    import hashlib
    import json

    from . import __version__

    doc = {"model": loaded.ref.name, "path": loaded.ref.path, "calibration": calib.sha256, "ghosted": __version__,
           "dtype": str(next(loaded.model.parameters()).dtype), "prune": _config_dict(cfg.prune),
           "eval": cfg.evaluation.as_dict()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _load_partial(path, key: str, log: Log) -> dict:
    import json

    if path is None or not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if doc.get("key") != key:
        log(f"{path} belongs to other settings: starting afresh")
        return {}
    return doc


def run_compare(loaded, calib, cfg: CompareConfig, progress: bool = True, log: Log = _nolog,
                partial_path=None) -> dict:
    """Dense model once, then every (k, method) cell solved from one shared capture and evaluated in memory.

    partial_path: after the dense model and after every cell the results so far are written there
    (atomically); a later run with the same model, calibration and settings skips what it holds, so an
    interrupted grid resumes where it stopped."""
    import torch

    from .prune import heldout_windows, shared_capture, solve
    from .selection import block_scores, check_k, layer_scores
    from .surgery import temporarily_pruned

    t0 = time.perf_counter()
    model, tok = loaded.model, loaded.tokenizer
    L = arch.num_layers(model)
    d = int(model.config.hidden_size)
    for k in cfg.ks:
        check_k(k, L)
    tmpl = cfg.prune
    res = shared_capture(loaded, calib, tmpl, list(cfg.ks), list(cfg.methods), progress, log)
    capture_seconds = time.perf_counter() - t0

    key = _resume_key(loaded, calib, cfg)
    done = _load_partial(partial_path, key, log)
    done_cells = {(c["k"], c["method"]): c for c in done.get("cells", []) if not c.get("error")}

    def save_partial() -> None:
        if partial_path is not None:
            from .io import write_json_atomic

            write_json_atomic(partial_path, {"key": key, "dense": dense, "cells": cells})

    if done.get("dense"):
        dense = done["dense"]
        log(f"resuming from {partial_path}: dense model and {len(done_cells)} cell(s) already evaluated")
    else:
        log("evaluating the dense model")
        dense = evaluate_quality(model, tok, cfg.evaluation, progress)
    log(f"dense: {_brief(dense)}")
    dense_avg = _average(dense)
    cells: list[dict] = []
    save_partial()

    for k, method in cfg.cells():
        if (k, method) in done_cells:
            cells.append(done_cells[(k, method)])
            continue
        t_cell = time.perf_counter()
        cell: dict[str, Any] = {"k": k, "method": method}
        try:
            sol = solve(loaded, calib, cfg.cell_config(k, method), progress=progress, log=log, shared=res)
        except GhostedError as exc:  # e.g. replaceme on a cut at layer 0: report it, run the other cells
            log(f"WARNING: k={k} {method} failed: {exc}")
            cell.update(error=str(exc), seconds=time.perf_counter() - t_cell)
            cells.append(cell)
            continue
        meta = dict(sol.meta)
        meta["selection"] = {k_: v for k_, v in meta.get("selection", {}).items() if k_ != "scores"}
        with temporarily_pruned(model, sol.removed, sol.operators) as pruned:
            quality = evaluate_quality(pruned, tok, cfg.evaluation, progress)
        avg = _average(quality)
        cell.update(
            removed=sol.removed, removed_text=format_layers(sol.removed), cuts=meta["cuts"], ridge=meta["ridge"],
            guard=meta["guard"], calibration_relative_residual=meta["calibration_relative_residual"],
            selection=meta["selection"], capture_passes=meta["capture_passes"], ppl=quality["ppl"],
            zeroshot=quality["zeroshot"],
            retained=(avg / dense_avg) if avg is not None and dense_avg else None,
            solve_seconds=meta["solve_seconds"], eval_seconds=quality["seconds"],
            seconds=time.perf_counter() - t_cell,
        )
        cells.append(cell)
        save_partial()
        log(f"k={k} {method} (layers {cell['removed_text']}): {_brief(quality)}")

    return {
        "model": loaded.ref.name,
        "num_layers": L,
        "hidden_size": d,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(next(model.parameters()).device),
        "torch_threads": torch.get_num_threads(),
        "calibration": {"source": calib.source, "n": calib.n, "seq_len": calib.seq_len, "seed": calib.seed,
                        "sha256": calib.sha256, "heldout_windows": len(heldout_windows(calib.n, tmpl.holdout))},
        "settings": {"remove": sorted(cfg.ks), "recovery": list(cfg.methods),
                     "prune": {k: v for k, v in _config_dict(tmpl).items()
                               if k not in ("remove", "layers", "recovery")},
                     "eval": cfg.evaluation.as_dict()},
        "scores": {"tokens": res.score_tokens, "layers": layer_scores(res),
                   "blocks": {str(k): block_scores(res, k) for k in sorted(cfg.ks)}},
        "capture": {"pairs": len(res.fit), "seconds": capture_seconds},
        "dense": {**dense, "average": dense_avg},
        "cells": cells,
        "versions": versions(),
        "seconds": time.perf_counter() - t0,
    }


def _config_dict(cfg) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}


def _average(quality: dict) -> float | None:
    """The zero-shot average: acc_norm, acc for tasks that have no acc_norm (as evaluate_zeroshot defines it)."""
    z = quality.get("zeroshot")
    return None if not z else float(z["average"]["acc_norm"])


def _brief(quality: dict) -> str:
    parts = [f"{src} PPL {v['ppl']:.2f}" for src, v in quality["ppl"].items()]
    avg = _average(quality)
    if avg is not None:
        parts.append(f"zero-shot average {avg:.3f}")
    parts.append(f"{quality['seconds']:.0f}s")
    return ", ".join(parts)


def task_score(task: dict) -> float | None:
    """acc_norm of one task result, or acc where the task has no acc_norm."""
    v = task.get("acc_norm")
    v = task.get("acc") if v is None else v
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

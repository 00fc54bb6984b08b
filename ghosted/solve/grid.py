"""One grid cell: solve a pruning configuration from shared statistics, patch the model in memory, evaluate it.

`ghosted compare` (compare.py), the sweep flow (flows/sweep.py) and the robust study (studies/robust_study)
all run their cells through run_cell / run_dense and keep CellResult.as_dict() rows of one schema; a grid
document (grid_header + "dense" + "cells") is rendered by report.write_report. The cell never copies or
reloads weights: surgery.temporarily_pruned patches the loaded model and restores it afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ghosted.errors import GhostedError

if TYPE_CHECKING:
    from ghosted.calibration.capture import CaptureResult
    from ghosted.config import EvalSettings
    from ghosted.corpora import Calibration
    from ghosted.models import Loaded
    from ghosted.solve.solver import PruneConfig

Log = Callable[[str], None]


def _nolog(_msg: str) -> None:
    pass


@dataclass
class CellResult:
    """One row of a grid: the dense model (k = 0, method "dense") or one pruned configuration.

    ppl maps each source to evaluate.perplexity's record ({ppl, nll, windows, seq_len, tokens_scored, sha256});
    zeroshot is evaluate_zeroshot's record (None without tasks). A cell whose solve failed (e.g. replaceme on
    a cut at layer 0) carries `error` and no quality: a result of the grid, not a crash."""

    k: int
    method: str
    removed: list[int] = field(default_factory=list)
    removed_text: str = "-"
    cuts: list[list[int]] = field(default_factory=list)
    ridge: float | None = None
    token_policy: str | None = None
    guard: dict = field(default_factory=dict)
    calibration_relative_residual: dict = field(default_factory=dict)
    selection: dict = field(default_factory=dict)
    capture_passes: int = 0
    ppl: dict[str, dict] = field(default_factory=dict)
    zeroshot: dict | None = None
    average: float | None = None  # zero-shot average (acc_norm, acc where a task has none)
    retained: float | None = None  # average / the dense model's average
    solve_seconds: float = 0.0
    eval_seconds: float = 0.0
    seconds: float = 0.0
    error: str | None = None
    worker: dict = field(default_factory=dict)  # where it ran (the sweep: worker pid, threads)

    def as_dict(self) -> dict[str, Any]:
        """The JSON row; a failed cell keeps only what identifies it, its error and its time."""
        d = asdict(self)
        if self.error is not None:
            keep = ("k", "method", "error", "seconds", "worker")
            d = {key: d[key] for key in keep}
        else:
            d.pop("error")
        if not d.get("worker"):
            d.pop("worker", None)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CellResult:
        return cls(**d)


def average(zeroshot: dict | None) -> float | None:
    """The zero-shot average: acc_norm, acc for tasks that have no acc_norm (as evaluate_zeroshot defines it)."""
    return None if not zeroshot else float(zeroshot["average"]["acc_norm"])


def format_layers(removed: list[int]) -> str:
    """[13, 14, 15, 20] -> '13-15,20'."""
    from ghosted.method.surgery import runs

    return ",".join(f"{a}-{b - 1}" if b - a > 1 else str(a) for a, b in runs(removed))


def brief(cell: CellResult) -> str:
    """A cell's quality in one line (callers log it once the cell is safely stored)."""
    parts = [f"{src} PPL {v['ppl']:.2f}" for src, v in cell.ppl.items()]
    if cell.average is not None:
        parts.append(f"zero-shot average {cell.average:.3f}")
    parts.append(f"{cell.eval_seconds:.0f}s")
    return ", ".join(parts)


def run_dense(model: Any, tokenizer: Any, evaluation: EvalSettings, progress: bool = False) -> CellResult:
    """The dense model's row (k = 0)."""
    from ghosted.evaluation.run import evaluate_quality

    t0 = time.perf_counter()
    quality = evaluate_quality(model, tokenizer, evaluation, progress)
    avg = average(quality["zeroshot"])
    return CellResult(k=0, method="dense", ppl=quality["ppl"], zeroshot=quality["zeroshot"], average=avg,
                      retained=1.0 if avg is not None else None, eval_seconds=quality["seconds"],
                      seconds=time.perf_counter() - t0)


def run_cell(loaded: Loaded, calib: Calibration, shared: CaptureResult | None, cfg: PruneConfig,
             evaluation: EvalSettings, *, dense_average: float | None = None,
             progress: bool = False, log: Log = _nolog) -> CellResult:
    """Solve `cfg` (from `shared` when it holds what the configuration needs), patch the loaded model in
    memory, evaluate it, restore it. A GhostedError of the solve becomes the cell's `error`."""
    from ghosted.evaluation.run import evaluate_quality
    from ghosted.method.surgery import temporarily_pruned
    from ghosted.solve.solver import solve

    t0 = time.perf_counter()
    k, method = int(cfg.remove) if cfg.remove is not None else 0, cfg.recovery
    try:
        sol = solve(loaded, calib, cfg, progress=progress, log=log, shared=shared)
    except GhostedError as exc:  # e.g. replaceme on a cut at layer 0: report it, run the other cells
        log(f"WARNING: k={k} {method} failed: {exc}")
        return CellResult(k=k, method=method, error=str(exc), seconds=time.perf_counter() - t0)
    meta = sol.meta
    with temporarily_pruned(loaded.model, sol.removed, sol.operators) as pruned:
        quality = evaluate_quality(pruned, loaded.tokenizer, evaluation, progress)
    avg = average(quality["zeroshot"])
    cell = CellResult(
        k=len(sol.removed), method=method, removed=sol.removed, removed_text=format_layers(sol.removed),
        cuts=meta.cuts, ridge=meta.ridge, token_policy=meta.token_policy, guard=meta.guard.to_dict(),
        calibration_relative_residual=meta.calibration_relative_residual,
        selection={key: v for key, v in (meta.selection or {}).items() if key != "scores"},
        capture_passes=meta.capture_passes, ppl=quality["ppl"], zeroshot=quality["zeroshot"], average=avg,
        retained=(avg / dense_average) if avg is not None and dense_average else None,
        solve_seconds=meta.solve_seconds, eval_seconds=quality["seconds"], seconds=time.perf_counter() - t0)
    return cell


def grid_header(loaded: Loaded, calib: Calibration, template: PruneConfig, ks: list[int], names: list[str],
                evaluation: EvalSettings, shared: CaptureResult, capture_seconds: float) -> dict[str, Any]:
    """Everything a grid document says besides its rows: model, calibration, settings, the shared capture's
    selection scores. `names`: the methods of the grid, in order."""
    import torch

    from ghosted.config import to_json
    from ghosted.method import arch
    from ghosted.method.selection import block_scores, layer_scores
    from ghosted.solve.fit import heldout_windows

    model = loaded.model
    param = next(model.parameters())
    return {
        "model": loaded.ref.name,
        "num_layers": arch.num_layers(model),
        "hidden_size": int(model.config.hidden_size),
        "dtype": str(param.dtype).removeprefix("torch."),
        "device": str(param.device),
        "torch_threads": torch.get_num_threads(),
        "calibration": {"source": calib.source, "n": calib.n, "seq_len": calib.seq_len, "seed": calib.seed,
                        "sha256": calib.sha256, "heldout_windows": len(heldout_windows(calib.n, template.holdout))},
        "settings": {"remove": sorted(ks), "recovery": list(names),
                     "prune": {key: v for key, v in to_json(template).items()
                               if key not in ("remove", "layers", "recovery")},
                     "eval": to_json(evaluation)},
        "scores": {"tokens": shared.score_tokens, "layers": layer_scores(shared),
                   "blocks": {str(k): block_scores(shared, k) for k in sorted(ks)}},
        "capture": {"pairs": len(shared.fit), "seconds": capture_seconds},
    }


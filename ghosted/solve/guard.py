"""The held-out guard: compare candidate recoveries with plain removal on windows the fit did not see.

One comparison serves every caller: the ghost's (token policy x ridge), the foldable recovery's (fold x token
policy) and a searched multi-cut plan's progressive ghosts. Each candidate's operators are fitted on the fit
windows only; plain removal is scored first, then the candidates in the order given, and the lowest score
wins, plain removal on a tie. What was compared and chosen is recorded as a GuardRecord.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import TypeVar

import torch

from ghosted.calibration.capture import CaptureResult
from ghosted.checkpoint.meta import ABSENT, GuardRecord
from ghosted.config import PruneConfig
from ghosted.corpora import Calibration
from ghosted.evaluation.perplexity import mean_nll
from ghosted.method import arch
from ghosted.method.fold import allowed_folds
from ghosted.method.linalg import fold_residual, relative_residual
from ghosted.method.operator import Operator
from ghosted.method.policies import get_policy
from ghosted.method.sums import PairSums
from ghosted.method.surgery import Pair, temporarily_pruned
from ghosted.models import Loaded
from ghosted.solve.fit import heldout_windows, solve_cut

C = TypeVar("C")
Log = Callable[[str], None]
LOSS = "held-out next-token loss"
BOUNDARY = "held-out relative boundary error"


def _nolog(_msg: str) -> None:
    pass


def compare(model: torch.nn.Module, ids: torch.Tensor, removed: list[int], candidates: dict[str, C],
            fit: Callable[[C], dict[Pair, Operator]], *, mode: str, batch_size: int, windows: int,
            res: CaptureResult | None = None, error: Callable[[PairSums, Operator], float] | None = None,
            progressive: bool = False, log: Log = _nolog) -> tuple[str, GuardRecord]:
    """Score plain removal ("none") and every candidate; (the winner's key, the record without a reason).

    mode "loss": next-token loss on `ids` with the candidate's ghosts patched in; "boundary": the mean over the
    cuts of error(held-out sums of the cut, its operator) (1.0 = plain removal), from the sums of `res`.
    Each fit and score can take minutes on a real model: `log` gets one line per candidate, with its score."""
    scores: dict[str, float] = {}
    total = len(candidates) + 1
    if mode == "loss":
        log(f"guard: scoring plain removal and {len(candidates)} candidate(s) on {windows} held-out window(s)")
        with temporarily_pruned(model, removed) as m:
            scores["none"] = mean_nll(m, ids, batch_size)
        log(f"guard [1/{total}] none: {LOSS} {scores['none']:.4f}")
        for i, (key, choice) in enumerate(candidates.items(), 2):
            t0 = time.perf_counter()
            with temporarily_pruned(model, removed, fit(choice)) as m:
                scores[key] = mean_nll(m, ids, batch_size)
            log(f"guard [{i}/{total}] {key}: {LOSS} {scores[key]:.4f} ({time.perf_counter() - t0:.1f}s)")
        unit = LOSS
    else:  # boundary: relative unexplained energy on held-out kept tokens (1.0 = plain removal)
        scores["none"] = 1.0
        for i, (key, choice) in enumerate(candidates.items(), 2):
            t0 = time.perf_counter()
            ops = fit(choice)
            scores[key] = sum(error(res.heldout[c], ops[c]) for c in ops) / len(ops)
            log(f"guard [{i}/{total}] {key}: {BOUNDARY} {scores[key]:.4f} ({time.perf_counter() - t0:.1f}s)")
        unit = BOUNDARY
    best = min(scores, key=scores.get)
    record = GuardRecord(mode=mode, criterion=unit, scores=scores, heldout_windows=windows,
                         progressive=True if progressive else ABSENT, chosen=best,
                         fallback=best == "none")
    return best, record


def explain(record: GuardRecord, subject: str, best_label: str, log: Log) -> GuardRecord:
    """Log the guard's outcome; on a fallback, record why."""
    scores = record.scores
    if record.fallback:
        best_other = min(v for k, v in scores.items() if k != "none")
        reason = (f"no {subject} beat plain removal on {record.criterion} (none {scores['none']:.4f}, "
                  f"{best_label} {best_other:.4f})")
        log(f"WARNING: guard fell back to no recovery: {reason}")
        return record.updated(reason=reason)
    log(f"guard: {record.chosen} chosen by {record.criterion} ({scores[record.chosen]:.4f} vs none "
        f"{scores['none']:.4f})")
    return record


def _heldout(calib: Calibration, cfg: PruneConfig) -> tuple[torch.Tensor, int]:
    """The held-out windows' token ids and their count."""
    held = sorted(heldout_windows(calib.n, cfg.holdout))
    return calib.input_ids[held], len(held)


def ghost_guard(loaded: Loaded, calib: Calibration, cfg: PruneConfig, res: CaptureResult, removed: list[int],
                cuts: list[Pair], log: Log, progress: bool = False) -> tuple[tuple[str, float] | None, GuardRecord]:
    """Choose token policy and ridge on held-out windows; None (no recovery) when nothing beats plain removal.
    `progress`: a line per candidate in `log`."""
    grid = [cfg.ridge] if cfg.ridge is not None else list(cfg.ridge_grid)
    policies = get_policy(cfg.token_policy).guard_choices  # auto: its candidates, in its order
    if cfg.exportable:  # one map for every token: a sink shift's policy stands in without its position-0 rule
        policies = tuple(dict.fromkeys(get_policy(p).one_map for p in policies))
    candidates = {f"{p}/ridge={r:g}": (p, r) for p in policies for r in grid}
    ids, n_held = _heldout(calib, cfg)

    def fit(choice: tuple[str, float]) -> dict[Pair, Operator]:
        return {c: solve_cut(res, c, "fit", choice[0], cfg, choice[1]) for c in cuts}

    best, record = compare(loaded.model, ids, removed, candidates, fit, mode=cfg.guard,
                           batch_size=cfg.batch_size, windows=n_held, res=res, error=relative_residual,
                           log=log if progress else _nolog)
    record = explain(record, "ghost", "best ghost", log)
    return (None if best == "none" else candidates[best]), record


def _fold_error(s: PairSums, op: Operator) -> float:
    return fold_residual(s, op) / max(float(s.sq_d), 1e-30)


def foldable_guard(loaded: Loaded, calib: Calibration, cfg: PruneConfig, res: CaptureResult, removed: list[int],
                   cuts: list[Pair], log: Log, progress: bool = False) -> tuple[tuple[str, float, str] | None,
                                                                                GuardRecord]:
    """Choose fold (cq, replaceme, cq+replaceme) and fit policy on held-out windows; None when plain removal wins.

    Every candidate folds into a plain checkpoint; its hooked form is measured (fold.py: the same logits).
    Without held-out windows (or --guard off): the widest fold the family allows, fitted on every token."""
    ridge = cfg.ridge if cfg.ridge is not None else 1e-6
    folds = allowed_folds(arch.get_arch(loaded.model), cuts, cfg.fold)
    requested = get_policy(cfg.token_policy)
    if cfg.guard == "off" or not any(res.heldout[c].n for c in cuts):
        policy = requested.without_guard
        return (policy, ridge, folds[-1]), GuardRecord(mode="off", chosen=f"{folds[-1]}/{policy}")
    policies = requested.guard_choices  # auto: its candidates, in its order
    candidates = {f"{f}/{p}": (p, ridge, f) for f in folds for p in policies}
    ids, n_held = _heldout(calib, cfg)

    def fit(choice: tuple[str, float, str]) -> dict[Pair, Operator]:
        p, _, f = choice
        return {c: solve_cut(res, c, "fit", p, replace(cfg, fold=f), ridge) for c in cuts}

    best, record = compare(loaded.model, ids, removed, candidates, fit, mode=cfg.guard,
                           batch_size=cfg.batch_size, windows=n_held, res=res, error=_fold_error,
                           log=log if progress else _nolog)
    record = explain(record, "foldable operator", "best", log)
    return (None if best == "none" else candidates[best]), record

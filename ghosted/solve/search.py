"""ghosted search: the largest removal whose pruned model passes the gate.

One shared calibration capture (prune.shared_capture) holds the sums of every contiguous block for every k in
the searched range. For a given k, candidate plans are screened cheaply by held-out next-token loss on the
held-out calibration windows (the ghost fitted on the fit windows): the single blocks with the lowest angular
distance, the one with the best held-out boundary error (from the sums, no forward pass), and two-cut plans (the best by summed
angular distance), each cut with its own operator fitted progressively. The finalists of a k (the `search.finalists` best
screened plans) are evaluated in full, best first, until one passes (the `eval:` section: test-set perplexity and
zero-shot tasks, never calibration windows), each judged by the gate (gate.apply_gate); k passes when one of them
does. A binary search over k needs about log2(range) visits: one full evaluation for a k that passes at its
best-screened plan, up to `finalists` for one that fails; the dense model is evaluated once. The search assumes
that passing is monotone in k (fewer layers removed never fails where more passed); the frontier in search.json
shows every evaluated point, so a violation is visible.

Progressive fit (multi-cut plans): the cuts are fitted upstream first; each downstream cut's X/Y sums are
captured on the model with the upstream cuts already removed and their ghosts installed
(surgery.temporarily_pruned), so its operator learns to correct the states it will actually see.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ghosted.calibration.capture import CapturePlan, CaptureResult, capture
from ghosted.checkpoint.meta import SolveMeta
from ghosted.config import EvalSettings, GateConfig, PruneConfig, SearchConfig, to_json
from ghosted.corpora import Calibration
from ghosted.errors import GhostedError
from ghosted.evaluation.perplexity import mean_nll
from ghosted.method import arch
from ghosted.method.operator import Operator
from ghosted.method.selection import block_scores, ghost_block_errors
from ghosted.method.surgery import Pair, runs, temporarily_pruned
from ghosted.models import Loaded
from ghosted.reporting.search_report import write_report_files
from ghosted.solve.fit import heldout_windows, selection_policy, solve_cut
from ghosted.solve.grid import average, format_layers
from ghosted.solve.guard import compare
from ghosted.solve.solution import Solution, build_checkpoint
from ghosted.solve.solver import _bos, _loss_fns, distill_operators, shared_capture, solve

Log = Callable[[str], None]
CHECKPOINT = "checkpoint"


def _nolog(_msg: str) -> None:
    pass


def k_range(num_layers: int, scfg: SearchConfig) -> list[int]:
    """The searched layer counts: search.min_remove .. search.max_remove (a fifth .. half of the layers)."""
    lo = scfg.min_remove if scfg.min_remove is not None else max(1, num_layers // 5)
    hi = scfg.max_remove if scfg.max_remove is not None else max(lo, num_layers // 2)
    if hi >= num_layers:
        raise GhostedError(f"search.max_remove must be below the model's {num_layers} layers, got {hi}")
    if lo > hi:
        raise GhostedError(f"search range is empty: min_remove {lo} > max_remove {hi}")
    return list(range(lo, hi + 1))


# --------------------------------------------------------------------------- progressive fit of multi-cut plans


def _pruned_cut(cut: Pair, upstream: list[int]) -> Pair:
    """A dense-index cut in the indices of the model with `upstream` layers removed (all of them before it)."""
    shift = sum(1 for r in upstream if r < cut[0])
    return cut[0] - shift, cut[1] - shift


def fit_progressive(loaded: Loaded, calib: Calibration, cfg: PruneConfig, removed: list[int], group: str,
                    policy: str, ridge: float, shared: CaptureResult | None = None,
                    progress: bool = False) -> tuple[dict[Pair, Operator], int]:
    """One operator per cut of `removed`, upstream first; each cut fitted on the states of the model with the
    cuts above it already removed and patched. Returns (operators keyed by dense cuts, capture passes run).

    The first cut sees the dense model, so its sums come from `shared` when it holds them."""
    ops: dict[Pair, Operator] = {}
    upstream: list[int] = []
    passes = 0
    heldout = heldout_windows(calib.n, cfg.holdout)
    for cut in runs(removed):
        if not upstream and shared is not None and cut in shared.fit:
            ops[cut] = solve_cut(shared, cut, group, policy, cfg, ridge)
        else:
            local = _pruned_cut(cut, upstream)
            plan = CapturePlan(pairs=[local], full=True, scores=False, heldout=heldout, norm=cfg.norm_features,
                               shift=cfg.token_shift)
            with temporarily_pruned(loaded.model, upstream, ops) as m:
                res = capture(m, calib.input_ids, plan, cfg.token_policy, batch_size=cfg.batch_size,
                              bos_id=_bos(loaded.tokenizer), progress=progress, desc=f"capture for cut {cut}",
                              layerwise=loaded.layerwise, device=loaded.capture_device)
            passes += 1
            ops[cut] = solve_cut(res, local, group, policy, cfg, ridge)
        upstream = upstream + list(range(*cut))
    return ops, passes


def _screen_choice(cfg: PruneConfig) -> tuple[str, float]:
    """The (token policy, ridge) candidates are screened with: ghost-aware selection's."""
    return selection_policy(cfg), cfg.ridge if cfg.ridge is not None else cfg.ridge_grid[0]


# --------------------------------------------------------------------------- screening


@dataclass
class Candidate:
    """A screened plan: removed layers (dense indices) and its held-out next-token loss with its ghosts."""

    removed: list[int]
    loss: float
    source: str  # "boundary error", "angular", "two cuts"

    def as_dict(self) -> dict[str, Any]:
        return {"removed": self.removed, "layers": format_layers(self.removed), "cuts": [list(c) for c in
                runs(self.removed)], "heldout_loss": self.loss, "source": self.source}


def split_plans(res: CaptureResult, k: int, n: int) -> list[list[int]]:
    """The n two-cut plans of k layers with the lowest summed angular distance of their cuts (a kept layer
    between the cuts, so they stay two runs)."""
    if n <= 0:
        return []
    L = res.num_layers
    ang = res.mean_angular()
    scored = []
    for k1 in range(1, k):
        k2 = k - k1
        for s1 in range(0, L - k1 + 1):
            b1 = s1 + k1
            for s2 in range(b1 + 1, L - k2 + 1):
                scored.append((float(ang[s1, b1]) + float(ang[s2, s2 + k2]), s1, b1, s2, s2 + k2))
    scored.sort()
    return [list(range(s1, b1)) + list(range(s2, b2)) for _, s1, b1, s2, b2 in scored[:n]]


def screen(loaded: Loaded, calib: Calibration, cfg: PruneConfig, scfg: SearchConfig, res: CaptureResult, k: int,
           progress: bool = False, log: Log = _nolog) -> list[Candidate]:
    """Every screened plan of k layers, best (lowest held-out loss) first."""
    policy, ridge = _screen_choice(cfg)
    _, ghost_loss = _loss_fns(loaded, calib, cfg, res)
    errs = ghost_block_errors(res, k, ridge)
    starts = sorted((s for s in range(len(errs)) if errs[s] is not None), key=lambda s: errs[s])
    if not starts:
        raise GhostedError("search needs held-out calibration windows: set prune.holdout > 0")
    ang = block_scores(res, k)["angular"]
    by_angle = sorted(range(len(ang)), key=lambda s: (ang[s], s))
    plans: dict[tuple[int, ...], str] = {}
    for s in by_angle[:scfg.shortlist]:
        plans[tuple(range(s, s + k))] = "angular"
    # one block by the other cheap score: its picks sit at the model's ends and lose on held-out loss (every k
    # of the SmolLM2 search), so one candidate keeps the diversity without spending the screen on them
    plans.setdefault(tuple(range(starts[0], starts[0] + k)), "boundary error")
    if scfg.max_cuts >= 2:
        for removed in split_plans(res, k, scfg.split_shortlist):
            plans.setdefault(tuple(removed), "two cuts")
    held = sorted(heldout_windows(calib.n, cfg.holdout))
    out = []
    for removed, source in plans.items():
        removed_l = list(removed)
        if len(runs(removed_l)) == 1:
            loss = ghost_loss(removed_l)
        else:
            ops, _ = fit_progressive(loaded, calib, cfg, removed_l, "fit", policy, ridge, res, progress)
            with temporarily_pruned(loaded.model, removed_l, ops) as m:
                loss = mean_nll(m, calib.input_ids[held], cfg.batch_size)
        out.append(Candidate(removed_l, loss, source))
        log(f"  screen k={k} layers {format_layers(removed_l)} ({source}): held-out loss {loss:.4f}")
    out.sort(key=lambda c: c.loss)
    return out


# --------------------------------------------------------------------------- the final operators of a plan


def solve_plan(loaded: Loaded, calib: Calibration, cfg: PruneConfig, res: CaptureResult, removed: list[int],
               progress: bool = False, log: Log = _nolog, keep_fit_operators: bool = False) -> Solution:
    """The training-free solution of a screened plan, fitted on every calibration window.

    One cut: prune.solve with the explicit layers (its guard picks token policy and ridge on held-out loss).
    Several cuts: fitted progressively with the screening policy and ridge; the guard compares the held-out
    loss of those ghosts (fit windows only) with plain removal and falls back to removal when they lose.
    keep_fit_operators: also keep the fit-windows-only operators (Solution.fit_operators), where distillation
    will start from them."""
    plain_cfg = replace(cfg, remove=None, layers=format_layers(removed), distill=0)
    if len(runs(removed)) == 1:
        return solve(loaded, calib, plain_cfg, progress=progress, log=log, shared=res,
                     keep_fit_operators=keep_fit_operators)
    t0 = time.perf_counter()
    policy, ridge = _screen_choice(cfg)
    held = sorted(heldout_windows(calib.n, cfg.holdout))
    fit_ops, passes = fit_progressive(loaded, calib, cfg, removed, "fit", policy, ridge, res, progress)
    key = f"{policy}/ridge={ridge:g}"
    best, guard = compare(loaded.model, calib.input_ids[held], removed, {key: fit_ops}, lambda ops: ops, mode="loss",
                          batch_size=cfg.batch_size, windows=len(held), progressive=True,
                          log=log if progress else _nolog)
    if best != "none":
        operators, more = fit_progressive(loaded, calib, cfg, removed, "total", policy, ridge, res, progress)
        passes += more
    else:
        operators = {c: Operator("identity") for c in runs(removed)}
        policy, ridge = "none", 0.0
        guard = guard.updated(reason="the progressive ghosts did not beat plain removal")
        log(f"WARNING: guard fell back to no recovery for layers {format_layers(removed)}")
    meta = SolveMeta(removed_layers=removed, cuts=[list(c) for c in runs(removed)],
                     num_layers_dense=arch.num_layers(loaded.model), recovery=cfg.recovery, ridge=ridge,
                     token_policy=policy, token_policy_requested=cfg.token_policy,
                     selection={"metric": "search", "progressive": True}, guard=guard,
                     calibration_relative_residual={}, capture_passes=passes,
                     config={k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(plain_cfg).items()},
                     solve_seconds=time.perf_counter() - t0)
    return Solution(removed, operators, meta, fit_ops if keep_fit_operators and not guard.fallback else None)


# --------------------------------------------------------------------------- full evaluation of a finalist


def evaluate_solution(loaded: Loaded, sol: Solution, evaluation: EvalSettings, dense: dict, gate: GateConfig,
                      progress: bool = False) -> dict[str, Any]:
    """The gate's verdict on a solution (patched in memory, restored afterwards), evaluated on `eval:` data."""
    from ghosted.evaluation.gate import apply_gate
    from ghosted.evaluation.run import evaluate_quality

    with temporarily_pruned(loaded.model, sol.removed, sol.operators) as pruned:
        quality = evaluate_quality(pruned, loaded.tokenizer, evaluation, progress)
    verdict = apply_gate(dense, quality, gate)
    return {"ppl": {s: v["ppl"] for s, v in quality["ppl"].items()}, "average": average(quality["zeroshot"]),
            "zeroshot": quality["zeroshot"], "passed": verdict.passed, "ppl_ratio": verdict.ppl_ratio,
            "retained_acc": verdict.retained_acc, "rank_value": verdict.rank_value, "reasons": list(verdict.reasons),
            "eval_seconds": quality["seconds"]}


@dataclass
class SearchOutcome:
    doc: dict[str, Any]  # search.json without the checkpoint path
    chosen: Solution | None


@dataclass
class _Search:
    """The state of one search: the shared capture, the dense model's evaluation, every screened and evaluated
    plan so far."""

    loaded: Loaded
    calib: Calibration
    cfg: PruneConfig
    scfg: SearchConfig
    evaluation: EvalSettings
    gate: GateConfig
    res: CaptureResult
    dense: dict
    progress: bool
    log: Log
    full_evals: int = 1  # the dense model
    screen_seconds: float = 0.0
    screening: dict[int, list[Candidate]] = field(default_factory=dict)
    frontier: list[dict[str, Any]] = field(default_factory=list)
    solutions: dict[tuple[int, str, int], Solution] = field(default_factory=dict)

    def visit(self, k: int) -> bool:
        """Screen k, then evaluate its finalists best first until one passes."""
        ts = time.perf_counter()
        self.screening[k] = screen(self.loaded, self.calib, self.cfg, self.scfg, self.res, k, progress=False,
                                   log=self.log)
        self.screen_seconds += time.perf_counter() - ts
        for rank, cand in enumerate(self.screening[k][:self.scfg.finalists], start=1):
            if self.evaluate_finalist(k, rank, cand):
                return True
        return False

    def _variants(self, sol: Solution) -> list[tuple[str, Solution, float, float | None]]:
        """The training-free solution and, with search.distill, its distilled form: (name, solution, solve s,
        distill s)."""
        variants = [("ghost", sol, sol.meta.solve_seconds, None)]
        if self.scfg.distill:
            td = time.perf_counter()
            ops, info = distill_operators(self.loaded, self.calib, replace(self.cfg, distill=self.scfg.distill),
                                          sol.removed, sol.operators, self.progress, self.log,
                                          fit_operators=sol.fit_operators)
            meta = sol.meta.updated(distill={x: v for x, v in info.items() if x != "curve"})
            variants.append(("ghost+distill", Solution(sol.removed, ops, meta),
                             sol.meta.solve_seconds, time.perf_counter() - td))
        return variants

    def evaluate_finalist(self, k: int, rank: int, best: Candidate) -> bool:
        sol = solve_plan(self.loaded, self.calib, self.cfg, self.res, best.removed, progress=False, log=self.log,
                         keep_fit_operators=bool(self.scfg.distill))
        passed = False
        for name, s, solve_s, distill_s in self._variants(sol):
            self.log(f"k={k} {name}: full evaluation of layers {format_layers(s.removed)} (finalist {rank} of "
                     f"{min(self.scfg.finalists, len(self.screening[k]))})")
            row = evaluate_solution(self.loaded, s, self.evaluation, self.dense, self.gate, self.progress)
            self.full_evals += 1
            row = {"k": k, "removed": s.removed, "layers": format_layers(s.removed),
                   "cuts": [list(c) for c in runs(s.removed)], "recovery": name, "finalist": rank,
                   "guard": s.meta.guard.to_dict().get("chosen"), "screen_heldout_loss": best.loss,
                   "solve_seconds": solve_s, "distill_seconds": distill_s, **row}
            if s.meta.has("distill"):
                row["distill"] = s.meta.distill
            self.frontier.append(row)
            self.solutions[(k, name, rank)] = s
            passed = passed or row["passed"]
            ratios = ", ".join(f"{src} x{r:.3f}" for src, r in row["ppl_ratio"].items())
            self.log(f"k={k} {name}: {'PASS' if row['passed'] else 'fail'} ({ratios}, retained "
                     f"{row['retained_acc'] if row['retained_acc'] is None else round(row['retained_acc'], 3)})")
        return passed


def run_search(loaded: Loaded, calib: Calibration, cfg: PruneConfig, scfg: SearchConfig, evaluation: EvalSettings,
               gate: GateConfig, progress: bool = True, log: Log = _nolog) -> SearchOutcome:
    """Screen, then binary-search k with full evaluations of the best plan per k; see the module docstring."""
    from ghosted.evaluation.run import evaluate_quality

    if cfg.recovery != "ghost":
        raise GhostedError(f"search fits ghosts: prune.recovery must be ghost, not {cfg.recovery}")
    if cfg.holdout <= 0:
        raise GhostedError("search screens on held-out calibration windows: set prune.holdout > 0")
    t0 = time.perf_counter()
    L = arch.num_layers(loaded.model)
    ks = k_range(L, scfg)
    log(f"searching k = {ks[0]}..{ks[-1]} of {L} layers")
    res = shared_capture(loaded, calib, cfg, ks, ["ghost"], progress, log)
    capture_seconds = time.perf_counter() - t0

    log("evaluating the dense model")
    dq = evaluate_quality(loaded.model, loaded.tokenizer, evaluation, progress)
    dense_row = {"ppl": {s: v["ppl"] for s, v in dq["ppl"].items()}, "average": average(dq["zeroshot"]),
                 "eval_seconds": dq["seconds"]}
    held = sorted(heldout_windows(calib.n, cfg.holdout))
    dense_loss = mean_nll(loaded.model, calib.input_ids[held], cfg.batch_size)
    state = _Search(loaded, calib, cfg, scfg, evaluation, gate, res, {"ppl": dq["ppl"], "zeroshot": dq["zeroshot"]},
                    progress, log)

    lo, hi = ks[0] - 1, ks[-1] + 1  # invariant: lo passes (or is below the range), hi fails (or is above)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if state.visit(mid):
            lo = mid
        else:
            hi = mid

    chosen_row, chosen_sol = None, None
    if lo >= ks[0]:
        rows = [r for r in state.frontier if r["k"] == lo and r["passed"]]
        chosen_row = min(rows, key=lambda r: (r["rank_value"] if r["rank_value"] is not None else math.inf))
        chosen_sol = state.solutions[(lo, chosen_row["recovery"], chosen_row["finalist"])]
    state.frontier.sort(key=lambda r: (r["k"], r["recovery"], r["finalist"]))
    doc = _document(state, ks, L, lo, chosen_row, dense_row, dense_loss, len(held))
    doc["seconds"] = {"capture": capture_seconds, "screening": state.screen_seconds,
                      "total": time.perf_counter() - t0}
    return SearchOutcome(doc, chosen_sol)


def _document(state: _Search, ks: list[int], L: int, lo: int, chosen_row: dict | None, dense_row: dict,
              dense_loss: float, heldout: int) -> dict[str, Any]:
    """search.json (but its `seconds`)."""
    gate, calib = state.gate, state.calib
    return {
        "kind": "search", "model": state.loaded.ref.name, "num_layers": L, "searched": ks,
        "chosen": None if chosen_row is None else {
            "removed": chosen_row["removed"], "k": chosen_row["k"], "recovery": chosen_row["recovery"],
            "checkpoint": None, "passed": True,
            "metrics": {"ppl": chosen_row["ppl"], "average": chosen_row["average"],
                        "ppl_ratio": chosen_row["ppl_ratio"], "retained_acc": chosen_row["retained_acc"]}},
        "message": (f"k={lo}: the most layers that pass the gate in {ks[0]}..{ks[-1]}" if chosen_row else
                    f"no plan of {ks[0]}..{ks[-1]} layers passes the gate"),
        "frontier": state.frontier,
        "dense": dense_row,
        "gate": {"max_ppl_ratio": gate.max_ppl_ratio, "min_retained_acc": gate.min_retained_acc,
                 "rank_by": gate.rank_by, "acc_metric": gate.acc_metric},
        "screening": {"dense_heldout_loss": dense_loss, "heldout_windows": heldout,
                      "by_k": {str(k): [c.as_dict() for c in cands] for k, cands in sorted(state.screening.items())}},
        "calibration": {"source": calib.source, "n": calib.n, "seq_len": calib.seq_len, "sha256": calib.sha256},
        "settings": {"eval": to_json(state.evaluation), "search": to_json(state.scfg),
                     "prune": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(state.cfg).items()}},
        "full_evaluations": state.full_evals,
    }


# --------------------------------------------------------------------------- outputs


def write_search(loaded: Loaded, calib: Calibration, outcome: SearchOutcome, out: Path, force: bool = False) -> None:
    """DIR/search.json, search.md, frontier.png and (when a plan passed) DIR/checkpoint, atomically."""
    from ghosted.io import atomic_dir

    doc = outcome.doc
    with atomic_dir(out, force=force, kind="search") as tmp:
        if outcome.chosen is not None:
            build_checkpoint(loaded, outcome.chosen, calib.sha256, tmp / CHECKPOINT)  # patches the model in place
            doc["chosen"]["checkpoint"] = str(Path(out) / CHECKPOINT)
        write_report_files(doc, tmp)

"""ghosted search: the largest removal whose pruned model passes the gate, or the best plan within a budget.

One shared calibration capture (prune.shared_capture) holds the sums of every contiguous block for every k in
the searched range. For a given k, candidate plans are screened cheaply by held-out next-token loss on the
held-out calibration windows (ghosted.solve.screen: the ghost fitted on the fit windows): the single blocks with
the lowest angular distance, the one with the best held-out boundary error (from the sums, no forward pass), and
two-cut plans (the best by summed angular distance), each cut with its own operator fitted progressively. The
finalists of a k (the `search.finalists` best screened plans) are evaluated in full, best first, until one passes
(the `eval:` section: test-set perplexity and zero-shot tasks, never calibration windows), each judged by the gate
(gate.apply_gate); k passes when one of them does. A binary search over k needs about log2(range) visits: one
full evaluation for a k that passes at its best-screened plan, up to `finalists` for one that fails; the dense
model is evaluated once. The search assumes that passing is monotone in k (fewer layers removed never fails where
more passed); the frontier in search.json shows every evaluated point, so a violation is visible.

search.target (params=N, speedup=X or memory=MB; ghosted.solve.budget): instead of the binary search, the
smallest k whose removal meets the budget (fewer layers removed is more accurate) is the only k visited; its
finalists are the best-screened plans that meet the budget (a two-cut plan carries two recoveries), evaluated as
above. The plan chosen is the best passing finalist, else the best evaluated one, marked as failing the gate.

search.distill / search.heal: each evaluated plan also gets a distilled row (its ghosts trained) and/or a healed
row (its checkpoint healed with the heal: recipe, ghosted.solve.finalist); the gate may choose either.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ghosted.calibration.capture import CaptureResult
from ghosted.checkpoint.meta import SolveMeta
from ghosted.config import EvalSettings, GateConfig, HealConfig, PruneConfig, SearchConfig, to_json
from ghosted.config.target import Target, parse_target
from ghosted.corpora import Calibration
from ghosted.errors import GhostedError
from ghosted.evaluation.perplexity import mean_nll
from ghosted.method import arch
from ghosted.method.operator import Operator
from ghosted.method.surgery import runs
from ghosted.models import Loaded
from ghosted.reporting.search_report import write_report_files
from ghosted.solve.budget import Costs, human, meets, model_costs, recovery_params, smallest_k
from ghosted.solve.finalist import evaluate_checkpoint, evaluate_solution, heal_finalist
from ghosted.solve.fit import heldout_windows
from ghosted.solve.grid import average, format_layers
from ghosted.solve.guard import compare
from ghosted.solve.screen import Candidate, fit_progressive, screen, screen_choice
from ghosted.solve.solution import Solution, build_checkpoint
from ghosted.solve.solver import distill_operators, shared_capture, solve

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
    policy, ridge = screen_choice(cfg)
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



# --------------------------------------------------------------------------- the search


@dataclass
class SearchOutcome:
    doc: dict[str, Any]  # search.json without the checkpoint path
    chosen: Solution | None
    folder: Path | None = None  # the chosen plan's healed checkpoint (search.heal), copied to OUT/checkpoint
    scratch: Path | None = None  # the healed finalists' folder, removed once the outputs are written


@dataclass
class Variant:
    """One row of an evaluated plan: training-free, distilled (search.distill) or healed (search.heal)."""

    name: str
    sol: Solution
    distill_seconds: float | None = None
    heal: dict | None = None  # the heal record's summary
    heal_seconds: float | None = None
    folder: Path | None = None  # the healed checkpoint


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
    costs: Costs
    target: Target | None = None
    heal: HealConfig | None = None
    scratch: Path | None = None
    full_evals: int = 1  # the dense model
    screen_seconds: float = 0.0
    screening: dict[int, list[Candidate]] = field(default_factory=dict)
    frontier: list[dict[str, Any]] = field(default_factory=list)
    solutions: dict[tuple[int, str, int], Solution] = field(default_factory=dict)
    folders: dict[tuple[int, str, int], Path] = field(default_factory=dict)

    def finalists(self, k: int) -> list[Candidate]:
        """The screened plans of k evaluated in full, best first: with a target, only those that meet it."""
        cands = self.screening[k]
        if self.target is not None:
            cands = [c for c in cands if meets(self.target, self.costs.bound(c.removed))]
            if not cands:
                raise GhostedError(f"no screened plan of {k} layers meets --target {self.target.text}: raise "
                                   "search.shortlist (more single blocks screened)")
        return cands[:self.scfg.finalists]

    def visit(self, k: int) -> bool:
        """Screen k, then evaluate its finalists best first until one passes."""
        ts = time.perf_counter()
        self.screening[k] = screen(self.loaded, self.calib, self.cfg, self.scfg, self.res, k, progress=False,
                                   log=self.log)
        self.screen_seconds += time.perf_counter() - ts
        finalists = self.finalists(k)
        return any(self.evaluate_finalist(k, rank, cand, len(finalists))
                   for rank, cand in enumerate(finalists, start=1))

    def _variants(self, sol: Solution, k: int, rank: int) -> list[Variant]:
        """The training-free solution, its distilled form (search.distill) and its healed checkpoint (search.heal)."""
        variants = [Variant("ghost", sol)]
        if self.scfg.distill:
            td = time.perf_counter()
            ops, info = distill_operators(self.loaded, self.calib, replace(self.cfg, distill=self.scfg.distill),
                                          sol.removed, sol.operators, self.progress, self.log,
                                          fit_operators=sol.fit_operators)
            meta = sol.meta.updated(distill={x: v for x, v in info.items() if x != "curve"})
            variants.append(Variant("ghost+distill", Solution(sol.removed, ops, meta),
                                    distill_seconds=time.perf_counter() - td))
        if self.heal is not None and self.scratch is not None:
            folder = self.scratch / f"k{k}-finalist{rank}-healed"
            self.log(f"k={k}: healing layers {format_layers(sol.removed)} ({self.heal.steps} steps at most)")
            rec, seconds = heal_finalist(self.loaded, sol, self.calib.sha256, self.heal, folder, self.progress,
                                         self.log)
            summary = {x: rec.get(x) for x in ("healed", "steps_run", "heldout_nll_before", "heldout_nll_after",
                                               "reason", "trained_params")}
            variants.append(Variant("ghost+heal", sol, heal=summary, heal_seconds=seconds, folder=folder))
        return variants

    def evaluate_finalist(self, k: int, rank: int, best: Candidate, of: int) -> bool:
        sol = solve_plan(self.loaded, self.calib, self.cfg, self.res, best.removed, progress=False, log=self.log,
                         keep_fit_operators=bool(self.scfg.distill))
        passed = False
        for v in self._variants(sol, k, rank):
            s = v.sol
            self.log(f"k={k} {v.name}: full evaluation of layers {format_layers(s.removed)} (finalist {rank} of {of})")
            row = (evaluate_checkpoint(self.loaded, v.folder, self.evaluation, self.dense, self.gate, self.progress)
                   if v.folder else
                   evaluate_solution(self.loaded, s, self.evaluation, self.dense, self.gate, self.progress))
            self.full_evals += 1
            budget = self.costs.figures(s.removed, recovery_params(self.loaded.model, s.removed, s.operators))
            row = {"k": k, "removed": s.removed, "layers": format_layers(s.removed),
                   "cuts": [list(c) for c in runs(s.removed)], "recovery": v.name, "finalist": rank,
                   "guard": s.meta.guard.to_dict().get("chosen"), "screen_heldout_loss": best.loss,
                   "solve_seconds": sol.meta.solve_seconds, "distill_seconds": v.distill_seconds,
                   "heal_seconds": v.heal_seconds, "budget": budget, **row}
            if s.meta.has("distill"):
                row["distill"] = s.meta.distill
            if v.heal is not None:
                row["heal"] = v.heal
            self.frontier.append(row)
            self.solutions[(k, v.name, rank)] = s
            if v.folder is not None:
                if row["passed"] or self.target is not None:
                    self.folders[(k, v.name, rank)] = v.folder
                else:  # a failing row is never chosen by the gate: free its disk now
                    shutil.rmtree(v.folder, ignore_errors=True)
            passed = passed or row["passed"]
            ratios = ", ".join(f"{src} x{r:.3f}" for src, r in row["ppl_ratio"].items())
            self.log(f"k={k} {v.name}: {'PASS' if row['passed'] else 'fail'} ({ratios}, retained "
                     f"{row['retained_acc'] if row['retained_acc'] is None else round(row['retained_acc'], 3)})")
        return passed

    def choose(self, k: int, failing: bool = False) -> tuple[dict | None, Solution | None, Path | None]:
        """The best row of k by the gate's rank_by (passing rows only, unless `failing`: then the best of all when
        none passes), its solution and its healed folder."""
        rows = [r for r in self.frontier if r["k"] == k]
        pool = [r for r in rows if r["passed"]] or (rows if failing else [])
        if not pool:
            return None, None, None
        row = min(pool, key=lambda r: (r["rank_value"] if r["rank_value"] is not None else math.inf))
        key = (k, row["recovery"], row["finalist"])
        return row, self.solutions[key], self.folders.get(key)


def run_search(loaded: Loaded, calib: Calibration, cfg: PruneConfig, scfg: SearchConfig, evaluation: EvalSettings,
               gate: GateConfig, progress: bool = True, log: Log = _nolog,
               heal: HealConfig | None = None) -> SearchOutcome:
    """Screen, then binary-search k (or visit the k a target asks for) with full evaluations of the best plans per
    k; see the module docstring. `heal`: the recipe of search.heal (required when it is on)."""
    from ghosted.evaluation.run import evaluate_quality

    if cfg.recovery != "ghost":
        raise GhostedError(f"search fits ghosts: prune.recovery must be ghost, not {cfg.recovery}")
    if cfg.holdout <= 0:
        raise GhostedError("search screens on held-out calibration windows: set prune.holdout > 0")
    if scfg.heal:
        from ghosted.checks import check_seq_len

        if heal is None:
            raise GhostedError("search.heal needs the heal: recipe (ghosted.search passes params.heal)")
        check_seq_len(loaded.model.config, heal.seq_len, "heal.seq_len")  # before the capture, not at the first heal
    t0 = time.perf_counter()
    L = arch.num_layers(loaded.model)
    costs = model_costs(loaded.model, cfg.rank, cfg.norm_features, cfg.token_shift)
    target = parse_target(scfg.target) if scfg.target is not None else None
    ks = [smallest_k(target, costs)] if target is not None else k_range(L, scfg)
    log(f"target {target.text}: the fewest layers that meet it, k = {ks[0]} of {L}" if target is not None else
        f"searching k = {ks[0]}..{ks[-1]} of {L} layers")
    res = shared_capture(loaded, calib, cfg, ks, ["ghost"], progress, log)
    capture_seconds = time.perf_counter() - t0

    log("evaluating the dense model")
    dq = evaluate_quality(loaded.model, loaded.tokenizer, evaluation, progress)
    dense_row = {"ppl": {s: v["ppl"] for s, v in dq["ppl"].items()}, "average": average(dq["zeroshot"]),
                 "eval_seconds": dq["seconds"], "budget": costs.figures([], 0)}
    held = sorted(heldout_windows(calib.n, cfg.holdout))
    dense_loss = mean_nll(loaded.model, calib.input_ids[held], cfg.batch_size)
    scratch = Path(tempfile.mkdtemp(prefix="ghosted-search-heal-")) if scfg.heal else None
    state = _Search(loaded, calib, cfg, scfg, evaluation, gate, res, {"ppl": dq["ppl"], "zeroshot": dq["zeroshot"]},
                    progress, log, costs, target, heal if scfg.heal else None, scratch)
    try:
        if target is not None:
            state.visit(ks[0])
            lo = ks[0]
        else:
            lo, hi = ks[0] - 1, ks[-1] + 1  # invariant: lo passes (or is below the range), hi fails (or is above)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if state.visit(mid):
                    lo = mid
                else:
                    hi = mid
        chosen_row, chosen_sol, folder = state.choose(lo, failing=target is not None)
        for other in state.folders.values():
            if other != folder:
                shutil.rmtree(other, ignore_errors=True)
    except BaseException:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    state.frontier.sort(key=lambda r: (r["k"], r["recovery"], r["finalist"]))
    doc = _document(state, ks, L, lo, chosen_row, dense_row, dense_loss, len(held))
    doc["seconds"] = {"capture": capture_seconds, "screening": state.screen_seconds,
                      "total": time.perf_counter() - t0}
    return SearchOutcome(doc, chosen_sol, folder, scratch)


def _message(state: _Search, ks: list[int], lo: int, row: dict | None) -> str:
    if state.target is None:
        return (f"k={lo}: the most layers that pass the gate in {ks[0]}..{ks[-1]}" if row else
                f"no plan of {ks[0]}..{ks[-1]} layers passes the gate")
    assert row is not None
    b = row["budget"]
    plan = (f"target {state.target.text}: k={lo}, layers {row['layers']} ({row['recovery']}): params "
            f"{human('params', b['params'])}, {human('speedup', b['speedup'])}, {human('memory', b['mb'])} "
            f"({b['dtype']})")
    return f"{plan}; passes the gate" if row["passed"] else f"{plan}; FAILS the gate: {'; '.join(row['reasons'])}"


def _document(state: _Search, ks: list[int], L: int, lo: int, chosen_row: dict | None, dense_row: dict,
              dense_loss: float, heldout: int) -> dict[str, Any]:
    """search.json (but its `seconds`)."""
    gate, calib = state.gate, state.calib
    return {
        "kind": "search", "model": state.loaded.ref.name, "num_layers": L, "searched": ks,
        "target": None if state.target is None else {**state.target.to_dict(), "k": lo},
        "chosen": None if chosen_row is None else {
            "removed": chosen_row["removed"], "k": chosen_row["k"], "recovery": chosen_row["recovery"],
            "checkpoint": None, "passed": chosen_row["passed"], "reasons": chosen_row["reasons"],
            "budget": chosen_row["budget"],
            "metrics": {"ppl": chosen_row["ppl"], "average": chosen_row["average"],
                        "ppl_ratio": chosen_row["ppl_ratio"], "retained_acc": chosen_row["retained_acc"]}},
        "message": _message(state, ks, lo, chosen_row),
        "frontier": state.frontier,
        "dense": dense_row,
        "gate": {"max_ppl_ratio": gate.max_ppl_ratio, "min_retained_acc": gate.min_retained_acc,
                 "rank_by": gate.rank_by, "acc_metric": gate.acc_metric},
        "screening": {"dense_heldout_loss": dense_loss, "heldout_windows": heldout,
                      "by_k": {str(k): [c.as_dict() for c in cands] for k, cands in sorted(state.screening.items())}},
        "calibration": {"source": calib.source, "n": calib.n, "seq_len": calib.seq_len, "sha256": calib.sha256},
        "settings": {"eval": to_json(state.evaluation), "search": to_json(state.scfg),
                     "prune": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(state.cfg).items()},
                     **({"heal": to_json(state.heal)} if state.heal is not None else {})},
        "full_evaluations": state.full_evals,
    }


# --------------------------------------------------------------------------- outputs


def write_search(loaded: Loaded, calib: Calibration, outcome: SearchOutcome, out: Path, force: bool = False) -> None:
    """DIR/search.json, search.md, frontier.png and (when a plan was chosen) DIR/checkpoint, atomically; the
    healed finalists' scratch folder is removed either way."""
    from ghosted.io import atomic_dir

    doc = outcome.doc
    try:
        with atomic_dir(out, force=force, kind="search") as tmp:
            if outcome.folder is not None:
                shutil.copytree(outcome.folder, tmp / CHECKPOINT)
                doc["chosen"]["checkpoint"] = str(Path(out) / CHECKPOINT)
            elif outcome.chosen is not None:
                build_checkpoint(loaded, outcome.chosen, calib.sha256, tmp / CHECKPOINT)  # patches the model in place
                doc["chosen"]["checkpoint"] = str(Path(out) / CHECKPOINT)
            write_report_files(doc, tmp)
    finally:
        if outcome.scratch is not None:
            shutil.rmtree(outcome.scratch, ignore_errors=True)

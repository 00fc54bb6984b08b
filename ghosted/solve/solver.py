"""Prune a model end to end: calibrate -> capture -> select -> solve (with the held-out guard) -> apply -> save.

Each step is also callable on its own (the DVC stages and Prefect tasks use them one by one).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

from ghosted.calibration.capture import CapturePlan, CaptureResult, capture
from ghosted.checkpoint.meta import GuardRecord, SolveMeta
from ghosted.config import PruneConfig, to_json
from ghosted.corpora import Calibration
from ghosted.evaluation.perplexity import mean_nll
from ghosted.method import arch
from ghosted.method.fold import layout_for
from ghosted.method.linalg import fold_residual, relative_residual
from ghosted.method.operator import Operator
from ghosted.method.policies import get_policy
from ghosted.method.recovery import RECOVERY
from ghosted.method.selection import CONTIGUOUS, SELECTION, SelectContext, check_k, parse_layers, score_table
from ghosted.method.surgery import Pair, runs, temporarily_pruned
from ghosted.models import Loaded
from ghosted.solve.fit import heldout_windows, selection_policy, solve_cut
from ghosted.solve.guard import foldable_guard, ghost_guard
from ghosted.solve.solution import Solution, build_checkpoint, load_solution, save_solution

# the pieces a caller of `solve` also uses, where it has always found them
__all__ = ["PruneConfig", "Solution", "build_checkpoint", "heldout_windows", "load_solution", "save_solution",
           "solve", "solve_cut"]

# Memory budget for keeping the sums of every candidate block in one pass (else: two passes).
ONE_PASS_BUDGET_BYTES = 6 * 2**30
# Angular / cosine selection: blocks whose sums the one pass keeps, the best by the scores after the first
# forward (a final pick outside them costs a second pass for its cut alone; the result is the same).
SHORTLIST_BLOCKS = 4


def candidate_sums_bytes(d: int, cuts: list[Pair], groups: int, mlp: bool = False, norm: bool = False,
                         shift: bool = False) -> int:
    """Float64 bytes of the d x d sums one capture keeps: one X^T X per distinct start boundary (shared by
    the cuts that start there) plus one X^T Y per cut, per token group; the MLP-output sums (ReplaceMe, foldable)
    add three per cut: Mlp^T Mlp, Mlp^T (Y - A), Mlp^T X; norm features two per start (N^T N, X^T N) and one
    per cut (N^T Y); with the token shift N is twice as wide (N^T N four times the size, X^T N and N^T Y twice)."""
    starts = len({s for s, _ in cuts})
    w = 2 if norm and shift else 1
    per_start = 1 + (w * w + w if norm else 0)
    per_cut = (4 if mlp else 1) + (w if norm else 0)
    return (starts * per_start + len(cuts) * per_cut) * d * d * 8 * groups


def _bos(tokenizer) -> int | None:
    from ghosted.corpora import adds_bos

    return tokenizer.bos_token_id if tokenizer is not None and adds_bos(tokenizer) else None


def run_capture(loaded: Loaded, calib: Calibration, cfg: PruneConfig, pairs: list[Pair], scores: bool,
                progress: bool = True, shortlist: tuple[str, int, int] | None = None) -> CaptureResult:
    method = RECOVERY.get(cfg.recovery)
    needs_full = method.full or cfg.select == "ghost"
    plan = CapturePlan(pairs=pairs, full=needs_full, hadamard=method.hadamard and cfg.variant == "rotate",
                       mlp=method.mlp, scores=scores, heldout=heldout_windows(calib.n, cfg.holdout),
                       shortlist=shortlist, norm=cfg.norm_features, shift=cfg.token_shift)
    return capture(loaded.model, calib.input_ids, plan, cfg.token_policy, batch_size=cfg.batch_size,
                   bos_id=_bos(loaded.tokenizer), progress=progress, layerwise=loaded.layerwise,
                   offload_budget=loaded.offload_budget,
                   device=loaded.capture_device)


def score(loaded: Loaded, calib: Calibration, k: int | None = None, batch_size: int = 4,
          progress: bool = True) -> dict:
    """The per-layer (and per-block for k) score table from one pass."""
    L = arch.num_layers(loaded.model)
    if k is not None:
        check_k(k, L)
    res = capture(loaded.model, calib.input_ids, CapturePlan(full=False, scores=True), "all",
                  batch_size=batch_size, progress=progress, desc="scoring pass", layerwise=loaded.layerwise,
                  offload_budget=loaded.offload_budget,
                  device=loaded.capture_device)
    table = score_table(res, k)
    table["calibration_sha256"] = calib.sha256
    return table


def _loss_fns(loaded: Loaded, calib: Calibration, cfg: PruneConfig, res: CaptureResult | None):
    """Held-out next-token loss of a candidate plan (plain removal, or with its ghost fitted on the fit windows)."""
    held = sorted(heldout_windows(calib.n, cfg.holdout)) or list(range(min(calib.n, 8)))
    ids = calib.input_ids[held]

    def plain(removed: list[int]) -> float:
        with temporarily_pruned(loaded.model, removed) as m:
            return mean_nll(m, ids, cfg.batch_size)

    # the ghost as the guard would build it (auto: under "sink", the sinks out of the fit, a sink shift for them)
    policy = selection_policy(cfg)
    ghost_cfg = replace(cfg, recovery="ghost")

    def ghost(removed: list[int]) -> float:
        ops = {c: solve_cut(res, c, "fit", policy, ghost_cfg, cfg.ridge or cfg.ridge_grid[0]) for c in runs(removed)}
        with temporarily_pruned(loaded.model, removed, ops) as m:
            return mean_nll(m, ids, cfg.batch_size)

    return plain, ghost


def shared_plan(num_layers: int, hidden: int, ks: list[int], methods: list[str], heldout: frozenset[int],
                variant: str = "rotate", norm: bool = False, shift: bool = False) -> CapturePlan:
    """One capture that serves every (k, method) of a grid: scores plus the sums of every candidate block."""
    ms = [RECOVERY.get(m) for m in methods]
    pairs = sorted({(s, s + k) for k in ks for s in range(num_layers - k + 1)})
    return CapturePlan(pairs=pairs, full=True, hadamard=any(m.hadamard for m in ms) and variant == "rotate",
                       mlp=any(m.mlp for m in ms), scores=True, heldout=heldout, norm=norm, shift=shift)


def shared_capture(loaded: Loaded, calib: Calibration, template: PruneConfig, ks: list[int], methods: list[str],
                   progress: bool = True, log: Callable[[str], None] | None = None) -> CaptureResult:
    """The one calibration pass that serves a whole grid (ghosted compare, flows/sweep.py)."""
    model = loaded.model
    template.check_model(arch.num_layers(model), int(model.config.hidden_size))  # before the pass
    plan = shared_plan(arch.num_layers(model), int(model.config.hidden_size), sorted(ks), list(methods),
                       heldout_windows(calib.n, template.holdout), template.variant, template.norm_features,
                       template.token_shift)
    if log is not None:
        log(f"shared calibration pass: {calib.n} x {calib.seq_len} tokens, {len(plan.pairs)} candidate blocks")
    return capture(model, calib.input_ids, plan, template.token_policy, batch_size=template.batch_size,
                   bos_id=_bos(loaded.tokenizer), progress=progress, desc="shared calibration pass",
                   layerwise=loaded.layerwise, offload_budget=loaded.offload_budget, device=loaded.capture_device)


def _select(loaded: Loaded, calib: Calibration, cfg: PruneConfig, shared: CaptureResult | None,
            progress: bool) -> tuple[list[int], CaptureResult, int, dict]:
    """Which layers to remove, and a capture holding the sums of their cuts: (removed, capture, passes, selection)."""
    L = arch.num_layers(loaded.model)
    method = RECOVERY.get(cfg.recovery)
    selection_info: dict = {"metric": cfg.select if cfg.layers is None else "explicit"}
    passes = 0
    if cfg.layers is not None:
        removed = parse_layers(cfg.layers, L)
        res = shared if shared is not None and all(c in shared.fit for c in runs(removed)) else \
            run_capture(loaded, calib, cfg, runs(removed), scores=False, progress=progress)
        passes += res is not shared
        return removed, res, passes, selection_info
    k = int(cfg.remove)
    check_k(k, L)
    candidates = [(s, s + k) for s in range(L - k + 1)]
    groups = 2 if cfg.holdout > 0 else 1
    short = (cfg.select, k, SHORTLIST_BLOCKS) if cfg.select in ("angular", "cosine") else None
    kept = candidates if short is None else candidates[:SHORTLIST_BLOCKS]
    one_pass_bytes = candidate_sums_bytes(int(loaded.model.config.hidden_size), kept, groups, method.mlp,
                                          cfg.norm_features, cfg.token_shift) + 2 * (L + 1) ** 2 * 8
    if shared is not None and shared.cos_sum is not None and all(c in shared.fit for c in candidates):
        res = shared
    elif cfg.select in CONTIGUOUS and (method.full or cfg.select == "ghost") and one_pass_bytes <= ONE_PASS_BUDGET_BYTES:
        res = run_capture(loaded, calib, cfg, candidates, scores=True, progress=progress, shortlist=short)
        passes += 1
    else:
        res = run_capture(loaded, calib, cfg, [], scores=True, progress=progress) if cfg.select != "ppl" else None
        passes += res is not None
    plain_loss, ghost_loss = _loss_fns(loaded, calib, cfg, res)
    ctx = SelectContext(L, res, loss_fn=plain_loss, ghost_loss_fn=ghost_loss, shortlist=cfg.shortlist,
                        ridge=cfg.ridge or cfg.ridge_grid[0])
    removed = SELECTION.get(cfg.select)(ctx, k)
    if res is not None and res.score_tokens:
        selection_info["scores"] = score_table(res, k)
    cuts = runs(removed)
    if res is None or any(c not in res.fit for c in cuts):
        res = run_capture(loaded, calib, cfg, cuts, scores=False, progress=progress)
        passes += 1
    return removed, res, passes, selection_info


def _fit_quality(res: CaptureResult, cfg: PruneConfig, operators: dict[Pair, Operator]) -> dict[str, float]:
    """Relative residual of each cut's operator on every calibration window (1.0 = plain removal)."""
    method = RECOVERY.get(cfg.recovery)
    fit_quality = {}
    for c, op in operators.items():
        if method.residual and op.kind != "identity" and res.total(c).gram is not None:
            fit_quality[f"{c[0]}-{c[1]}"] = relative_residual(res.total(c), op)
        elif cfg.recovery == "foldable" and op.kind != "identity":
            fit_quality[f"{c[0]}-{c[1]}"] = fold_residual(res.total(c), op) / max(float(res.total(c).sq_d), 1e-30)
    return fit_quality


def solve(loaded: Loaded, calib: Calibration, cfg: PruneConfig, progress: bool = True, log=print,
          shared: CaptureResult | None = None, keep_fit_operators: bool = False) -> Solution:
    """Decide which layers to remove and fit the operators (no change to the model).

    `shared`: a capture made once for a whole grid (see shared_plan); used when it holds what this
    configuration needs, so a grid costs one forward pass over the calibration set.
    """
    t0 = time.perf_counter()
    L = arch.num_layers(loaded.model)
    cfg.check_model(L, int(loaded.model.config.hidden_size))  # --remove, --rank: before any pass
    if cfg.recovery == "foldable":  # refuse a family without an exact fold before any pass
        layout_for(arch.get_arch(loaded.model))
    removed, res, passes, selection_info = _select(loaded, calib, cfg, shared, progress)
    cuts = runs(removed)
    log(f"removing layers {_fmt(removed)} of {L} (cuts {cuts})")

    guard = GuardRecord(mode="off")
    if cfg.recovery == "ghost" and cfg.guard != "off" and any(res.heldout[c].n for c in cuts):
        choice, guard = ghost_guard(loaded, calib, cfg, res, removed, cuts, log, progress)
    elif cfg.recovery == "foldable":  # its guard also picks the fold (and resolves "auto" when it is off)
        choice, guard = foldable_guard(loaded, calib, cfg, res, removed, cuts, log, progress)
    else:  # no held-out check: the papers' setting, every token in the fit unless a policy says otherwise
        choice = (get_policy(cfg.token_policy).without_guard, cfg.ridge if cfg.ridge is not None else 1e-6)
    if choice is None:
        policy, ridge = "none", 0.0
        operators = {c: Operator("identity") for c in cuts}
    else:
        policy, ridge = choice[:2]
        fit_cfg = replace(cfg, fold=choice[2]) if len(choice) > 2 else cfg  # foldable: the fold the guard chose
        operators = {c: solve_cut(res, c, "total", policy, fit_cfg, ridge) for c in cuts}
    fit_operators = None
    if (cfg.distill or keep_fit_operators) and choice is not None and all(res.heldout[c].n for c in cuts):
        fit_operators = {c: solve_cut(res, c, "fit", policy, fit_cfg, ridge) for c in cuts}
    operators, distill_info = distill_operators(loaded, calib, cfg, removed, operators, progress, log,
                                                fit_operators=fit_operators)
    meta = SolveMeta(
        removed_layers=removed, cuts=[list(c) for c in cuts], num_layers_dense=L,
        recovery=cfg.recovery, ridge=ridge, token_policy=policy, token_policy_requested=cfg.token_policy,
        selection=selection_info, guard=guard, calibration_relative_residual=_fit_quality(res, cfg, operators),
        capture_passes=passes, config=to_json(cfg),
        tokens_fit={f"{c[0]}-{c[1]}": res.total(c).n for c in cuts},
        solve_seconds=time.perf_counter() - t0,
        # what the statistics saw, for the checkpoint's lineage (the registry logs it as a dataset input)
        calibration={"source": calib.source, "n": calib.n, "seq_len": calib.seq_len, "seed": calib.seed},
    )
    if distill_info is not None:
        meta = meta.updated(distill={key: v for key, v in distill_info.items() if key != "curve"},
                            distill_curve=distill_info["curve"])
    return Solution(removed, operators, meta, fit_operators)


def distill_operators(loaded: Loaded, calib: Calibration, cfg: PruneConfig, removed: list[int],
                      operators: dict[Pair, Operator], progress: bool = True,
                      log: Callable[[str], None] = print,
                      fit_operators: dict[Pair, Operator] | None = None) -> tuple[dict[Pair, Operator], dict | None]:
    """--distill STEPS: train the ghosts of a training-free solution (ghosted.solve.distill). (operators, None) when off.

    The training starts from `fit_operators`, the training-free operators fitted on the fit windows only, and
    runs on those windows; its held-out guard compares them with the distilled ones on the held-out windows,
    which neither has seen. (`operators`, fitted on every window, have seen the held-out windows: comparing
    against them would favour them.) When distillation does not lower the held-out loss, `operators` are kept."""
    if not cfg.distill:
        return operators, None
    from ghosted.solve.distill import DistillConfig, distill

    if not any(op.kind in ("full", "lowrank") for op in operators.values()):
        return operators, {"steps": cfg.distill, "lr": cfg.distill_lr, "kept": "training-free", "steps_run": 0,
                           "reason": "no ghost to train (the guard chose plain removal)", "curve": []}
    start = operators if fit_operators is None else fit_operators
    out = distill(loaded.model, calib.input_ids, removed, start, heldout_windows(calib.n, cfg.holdout),
                  DistillConfig(steps=cfg.distill, lr=cfg.distill_lr), progress=progress, log=log)
    kept = out.operators if out.kept == "distilled" else operators
    return kept, {"steps": cfg.distill, "lr": cfg.distill_lr,
                  "start": "every window" if fit_operators is None else "fit windows only", **out.as_meta()}


def _fmt(removed: list[int]) -> str:
    return ",".join(f"{a}-{b - 1}" if b - a > 1 else str(a) for a, b in runs(removed))

"""Prune a model end to end: calibrate -> capture -> select -> solve (with the held-out guard) -> apply -> save.

Each step is also callable on its own (the DVC stages and Prefect tasks use them one by one).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ghosted.calibration.capture import CapturePlan, CaptureResult, capture
from ghosted.config import PruneConfig  # noqa: F401  re-exported: ghosted.prune.PruneConfig
from ghosted.corpora import Calibration
from ghosted.errors import GhostedError
from ghosted.evaluate.perplexity import mean_nll
from ghosted.method import arch
from ghosted.method.fold import allowed_folds, layout_for
from ghosted.method.linalg import F64, OPERATOR_TENSORS, Operator, fold_residual, relative_residual
from ghosted.method.policies import get_policy
from ghosted.method.recovery import RECOVERY, SolveOptions
from ghosted.method.selection import CONTIGUOUS, SELECTION, SelectContext, check_k, parse_layers, score_table
from ghosted.method.surgery import Pair, apply, runs, temporarily_pruned
from ghosted.models import Loaded, fingerprint
from ghosted.version import __version__

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


@dataclass
class Solution:
    """The decided plan: removed layers, one operator per cut, and everything about how it was chosen."""

    removed: list[int]
    operators: dict[Pair, Operator]
    meta: dict = field(default_factory=dict)
    # the same operators fitted on the fit windows only (the held-out windows left out), when a held-out
    # comparison will follow: distillation starts from these, so its guard compares like with like
    fit_operators: dict[Pair, Operator] | None = None


def heldout_windows(n: int, fraction: float) -> frozenset[int]:
    """The last ceil(fraction * n) windows (never all of them)."""
    if fraction <= 0 or n < 2:
        return frozenset()
    h = min(n - 1, max(1, math.ceil(fraction * n)))
    return frozenset(range(n - h, n))


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
    policy = get_policy(cfg.token_policy).for_selection
    ghost_cfg = replace(cfg, recovery="ghost")

    def ghost(removed: list[int]) -> float:
        ops = {c: solve_cut(res, c, "fit", policy, ghost_cfg, cfg.ridge or cfg.ridge_grid[0]) for c in runs(removed)}
        with temporarily_pruned(loaded.model, removed, ops) as m:
            return mean_nll(m, ids, cfg.batch_size)

    return plain, ghost


def _opts(cfg: PruneConfig, ridge: float) -> SolveOptions:
    return SolveOptions(ridge=ridge, norm=cfg.norm_features, shift=cfg.token_shift, rank=cfg.rank,
                        variant=cfg.variant, fold=cfg.fold)


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
    plan = shared_plan(arch.num_layers(model), int(model.config.hidden_size), sorted(ks), list(methods),
                       heldout_windows(calib.n, template.holdout), template.variant, template.norm_features,
                       template.token_shift)
    if log is not None:
        log(f"shared calibration pass: {calib.n} x {calib.seq_len} tokens, {len(plan.pairs)} candidate blocks")
    return capture(model, calib.input_ids, plan, template.token_policy, batch_size=template.batch_size,
                   bos_id=_bos(loaded.tokenizer), progress=progress, desc="shared calibration pass",
                   layerwise=loaded.layerwise, offload_budget=loaded.offload_budget, device=loaded.capture_device)


def solve(loaded: Loaded, calib: Calibration, cfg: PruneConfig, progress: bool = True, log=print,
          shared: CaptureResult | None = None, keep_fit_operators: bool = False) -> Solution:
    """Decide which layers to remove and fit the operators (no change to the model).

    `shared`: a capture made once for a whole grid (see shared_plan); used when it holds what this
    configuration needs, so a grid costs one forward pass over the calibration set.
    """
    t0 = time.perf_counter()
    model = loaded.model
    L = arch.num_layers(model)
    d = model.config.hidden_size
    method = RECOVERY.get(cfg.recovery)
    if cfg.recovery == "foldable":  # refuse a family without an exact fold before any pass
        layout_for(arch.get_arch(model))
    selection_info: dict = {"metric": cfg.select if cfg.layers is None else "explicit"}
    passes = 0

    if cfg.layers is not None:
        removed = parse_layers(cfg.layers, L)
        res = shared if shared is not None and all(c in shared.fit for c in runs(removed)) else \
            run_capture(loaded, calib, cfg, runs(removed), scores=False, progress=progress)
        passes += res is not shared
    else:
        k = int(cfg.remove)
        check_k(k, L)
        candidates = [(s, s + k) for s in range(L - k + 1)]
        groups = 2 if cfg.holdout > 0 else 1
        short = (cfg.select, k, SHORTLIST_BLOCKS) if cfg.select in ("angular", "cosine") else None
        kept = candidates if short is None else candidates[:SHORTLIST_BLOCKS]
        one_pass_bytes = candidate_sums_bytes(d, kept, groups, method.mlp, cfg.norm_features,
                                              cfg.token_shift) + 2 * (L + 1) ** 2 * 8
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
    cuts = runs(removed)
    log(f"removing layers {_fmt(removed)} of {L} (cuts {cuts})")

    guard_info: dict = {"mode": "off"}
    if cfg.recovery == "ghost" and cfg.guard != "off" and any(res.heldout[c].n for c in cuts):
        choice, guard_info = _guard(loaded, calib, cfg, res, removed, cuts, log)
    elif cfg.recovery == "foldable":  # its guard also picks the fold (and resolves "auto" when it is off)
        choice, guard_info = _foldable_guard(loaded, calib, cfg, res, removed, cuts, log)
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
    fit_quality = {}
    for c, op in operators.items():
        if method.residual and op.kind != "identity" and res.total(c).gram is not None:
            fit_quality[f"{c[0]}-{c[1]}"] = relative_residual(res.total(c), op)
        elif cfg.recovery == "foldable" and op.kind != "identity":
            fit_quality[f"{c[0]}-{c[1]}"] = fold_residual(res.total(c), op) / max(float(res.total(c).sq_d), 1e-30)
    meta = {
        "removed_layers": removed, "cuts": [list(c) for c in cuts], "num_layers_dense": L,
        "recovery": cfg.recovery, "ridge": ridge, "token_policy": policy, "token_policy_requested": cfg.token_policy,
        "selection": selection_info,
        "guard": guard_info, "calibration_relative_residual": fit_quality, "capture_passes": passes,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "tokens_fit": {f"{c[0]}-{c[1]}": res.total(c).n for c in cuts},
        "solve_seconds": time.perf_counter() - t0,
        # what the statistics saw, for the checkpoint's lineage (the registry logs it as a dataset input)
        "calibration": {"source": calib.source, "n": calib.n, "seq_len": calib.seq_len, "seed": calib.seed},
    }
    if distill_info is not None:
        meta["distill"] = {key: v for key, v in distill_info.items() if key != "curve"}
        meta["distill_curve"] = distill_info["curve"]
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


def _guard(loaded: Loaded, calib: Calibration, cfg: PruneConfig, res: CaptureResult, removed: list[int],
           cuts: list[Pair], log) -> tuple[tuple[str, float] | None, dict]:
    """Choose token policy and ridge on held-out windows; None (no recovery) when nothing beats plain removal."""
    grid = [cfg.ridge] if cfg.ridge is not None else list(cfg.ridge_grid)
    policies = get_policy(cfg.token_policy).guard_choices  # auto: its candidates, in its order
    held = sorted(heldout_windows(calib.n, cfg.holdout))
    ids = calib.input_ids[held]
    candidates = {f"{p}/ridge={r:g}": (p, r) for p in policies for r in grid}

    def ops_for(p: str, r: float) -> dict[Pair, Operator]:
        return {c: solve_cut(res, c, "fit", p, cfg, r) for c in cuts}

    scores: dict[str, float] = {}
    if cfg.guard == "loss":
        with temporarily_pruned(loaded.model, removed) as m:
            scores["none"] = mean_nll(m, ids, cfg.batch_size)
        for key, (p, r) in candidates.items():
            with temporarily_pruned(loaded.model, removed, ops_for(p, r)) as m:
                scores[key] = mean_nll(m, ids, cfg.batch_size)
        unit = "held-out next-token loss"
    else:  # boundary: relative unexplained energy on held-out kept tokens (1.0 = plain removal)
        scores["none"] = 1.0
        for key, (p, r) in candidates.items():
            ops = ops_for(p, r)
            scores[key] = sum(relative_residual(res.heldout[c], ops[c]) for c in cuts) / len(cuts)
        unit = "held-out relative boundary error"
    best = min(scores, key=scores.get)
    info = {"mode": cfg.guard, "criterion": unit, "scores": scores, "heldout_windows": len(held), "chosen": best}
    if best == "none":
        info["fallback"] = True
        info["reason"] = (f"no ghost beat plain removal on {unit} (none {scores['none']:.4f}, best ghost "
                          f"{min(v for k, v in scores.items() if k != 'none'):.4f})")
        log(f"WARNING: guard fell back to no recovery: {info['reason']}")
        return None, info
    info["fallback"] = False
    log(f"guard: {best} chosen by {unit} ({scores[best]:.4f} vs none {scores['none']:.4f})")
    return candidates[best], info


# --------------------------------------------------------------------------- foldable: the guard also picks the fold


def _foldable_guard(loaded: Loaded, calib: Calibration, cfg: PruneConfig, res: CaptureResult, removed: list[int],
                    cuts: list[Pair], log) -> tuple[tuple[str, float, str] | None, dict]:
    """Choose fold (cq, replaceme, cq+replaceme) and fit policy on held-out windows; None when plain removal wins.

    Every candidate folds into a plain checkpoint; its hooked form is measured (fold.py: the same logits).
    Without held-out windows (or --guard off): the widest fold the family allows, fitted on every token."""
    ridge = cfg.ridge if cfg.ridge is not None else 1e-6
    folds = allowed_folds(arch.get_arch(loaded.model), cuts, cfg.fold)
    requested = get_policy(cfg.token_policy)
    if cfg.guard == "off" or not any(res.heldout[c].n for c in cuts):
        policy = requested.without_guard
        return (policy, ridge, folds[-1]), {"mode": "off", "chosen": f"{folds[-1]}/{policy}"}
    policies = requested.guard_choices  # auto: its candidates, in its order
    candidates = {f"{f}/{p}": (p, ridge, f) for f in folds for p in policies}
    held = sorted(heldout_windows(calib.n, cfg.holdout))
    ids = calib.input_ids[held]

    def ops_for(p: str, f: str) -> dict[Pair, Operator]:
        return {c: solve_cut(res, c, "fit", p, replace(cfg, fold=f), ridge) for c in cuts}

    scores: dict[str, float] = {}
    if cfg.guard == "loss":
        with temporarily_pruned(loaded.model, removed) as m:
            scores["none"] = mean_nll(m, ids, cfg.batch_size)
        for key, (p, _, f) in candidates.items():
            with temporarily_pruned(loaded.model, removed, ops_for(p, f)) as m:
                scores[key] = mean_nll(m, ids, cfg.batch_size)
        unit = "held-out next-token loss"
    else:  # boundary: relative unexplained energy on held-out kept tokens (1.0 = plain removal)
        scores["none"] = 1.0
        for key, (p, _, f) in candidates.items():
            ops = ops_for(p, f)
            scores[key] = sum(fold_residual(res.heldout[c], ops[c]) / max(float(res.heldout[c].sq_d), 1e-30)
                              for c in cuts) / len(cuts)
        unit = "held-out relative boundary error"
    best = min(scores, key=scores.get)
    info = {"mode": cfg.guard, "criterion": unit, "scores": scores, "heldout_windows": len(held), "chosen": best,
            "fallback": best == "none"}
    if best == "none":
        info["reason"] = (f"no foldable operator beat plain removal on {unit} (none {scores['none']:.4f}, best "
                          f"{min(v for k, v in scores.items() if k != 'none'):.4f})")
        log(f"WARNING: guard fell back to no recovery: {info['reason']}")
        return None, info
    log(f"guard: {best} chosen by {unit} ({scores[best]:.4f} vs none {scores['none']:.4f})")
    return candidates[best], info


def solve_cut(res: CaptureResult, cut: Pair, group: str, policy: str, cfg: PruneConfig, ridge: float) -> Operator:
    """The operator of one cut from the sums of `group` windows under an (effective) token policy.

    A policy with a sink shift ("sink") gives the positions left out of the fit (position 0, BOS) their
    own map at inference, h <- h + mean(Y - X) over the left-out calibration tokens: the first token's state
    is nearly the same vector in every window (SmolLM2-135M: cosine 0.99999 between windows after layer 12),
    and a cut that removes the layers that build that attention sink must rebuild it, which no map fitted
    on ordinary tokens does (see README, "Attention sinks"). A capture that kept the left-out tokens apart
    (every policy but "all") serves every policy."""
    method = RECOVERY.get(cfg.recovery)
    pol = get_policy(policy)
    op = method.solve(pol.fit_sums(res, cut, group), _opts(cfg, ridge))
    if method.residual and op.kind in ("full", "lowrank"):
        shift = pol.shift(res, cut, group)
        if shift is not None:
            op.sink_shift = shift
    return op


def _fmt(removed: list[int]) -> str:
    return ",".join(f"{a}-{b - 1}" if b - a > 1 else str(a) for a, b in runs(removed))


# --------------------------------------------------------------------------- persistence of a solution


def save_solution(sol: Solution, out_dir: Path, force: bool = False, also=None) -> None:
    """operators.safetensors + plan.json, atomically (io.atomic_dir); `also(folder)` adds files to the same
    atomic write (the search report of a searched plan)."""
    from safetensors.torch import save_file

    from ghosted.io import atomic_dir

    with atomic_dir(out_dir, force=force, kind="solution") as tmp:
        tensors, ops = {}, {}
        for (s, b), op in sol.operators.items():
            key = f"{s}-{b}"
            entry = {"kind": op.kind, "scale": op.scale, "info": op.info}
            for name in OPERATOR_TENSORS:
                t = getattr(op, name)
                if t is not None:
                    tensors[f"{key}.{name}"] = t.to(F64).contiguous().cpu()
            ops[key] = entry
        save_file(tensors or {"_empty": torch.zeros(1)}, str(tmp / "operators.safetensors"))
        (tmp / "plan.json").write_text(json.dumps({"removed": sol.removed, "operators": ops, "meta": sol.meta},
                                                  indent=2, default=float) + "\n")
        if also is not None:
            also(tmp)


def load_solution(path: Path) -> Solution:
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "plan.json").exists():
        raise GhostedError(f"{path} has no plan.json: make it with `ghosted solve`")
    from ghosted.checks import reading

    with reading(path, "solution folder", "make it again with `ghosted solve`"):
        plan = json.loads((path / "plan.json").read_text())
        tensors = load_file(str(path / "operators.safetensors"))
        ops = {}
        for key, e in plan["operators"].items():
            s, b = (int(x) for x in key.split("-"))
            kw = {n: tensors.get(f"{key}.{n}") for n in OPERATOR_TENSORS}
            ops[(s, b)] = Operator(e["kind"], scale=e["scale"], info=e["info"], **kw)
        return Solution(plan["removed"], ops, plan["meta"])


def build_checkpoint(loaded: Loaded, sol: Solution, calib_sha256: str, out_dir: Path, force: bool = False) -> dict:
    """Apply the solution to the loaded model IN PLACE and save the checkpoint; returns its ghosted block."""
    from ghosted.checkpoint import format as checkpoint

    model = loaded.model
    base_arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    if base_arch.startswith("Ghosted"):
        raise GhostedError("this model is already a ghosted checkpoint: prune its dense base model instead")
    applied = apply(model, sol.removed, sol.operators)
    meta = {
        "version": __version__,
        "base_model": loaded.ref.name,
        "base_fingerprint": fingerprint(loaded.ref),
        "base_architecture": base_arch,
        "calibration_sha256": calib_sha256,
        "ghosts": [g.as_config() for g in applied.ghosts],
        "folded": applied.folded,
        **{k: sol.meta[k] for k in ("removed_layers", "cuts", "num_layers_dense", "recovery", "ridge",
                                    "token_policy", "guard", "distill", "calibration") if k in sol.meta},
        "num_layers": arch.num_layers(model),
    }
    checkpoint.save(model, loaded.tokenizer, out_dir, meta, force=force)
    return meta

"""The screening of `ghosted search`: candidate plans of k layers ranked by held-out next-token loss, and the
progressive fit of multi-cut plans (see ghosted/solve/search.py for how the search uses them).

Progressive fit (multi-cut plans): the cuts are fitted upstream first; each downstream cut's X/Y sums are
captured on the model with the upstream cuts already removed and their ghosts installed
(surgery.temporarily_pruned), so its operator learns to correct the states it will actually see.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ghosted.calibration.capture import CapturePlan, CaptureResult, capture
from ghosted.config import PruneConfig, SearchConfig
from ghosted.corpora import Calibration
from ghosted.errors import GhostedError
from ghosted.evaluation.perplexity import mean_nll
from ghosted.method.operator import Operator
from ghosted.method.selection import block_scores, ghost_block_errors
from ghosted.method.surgery import Pair, runs, temporarily_pruned
from ghosted.models import Loaded
from ghosted.solve.fit import heldout_windows, selection_policy, solve_cut
from ghosted.solve.grid import format_layers
from ghosted.solve.solver import _bos, _loss_fns

Log = Callable[[str], None]


def _nolog(_msg: str) -> None:
    pass


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


def screen_choice(cfg: PruneConfig) -> tuple[str, float]:
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
    policy, ridge = screen_choice(cfg)
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



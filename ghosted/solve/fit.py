"""The operator of one cut from captured sums, and the held-out windows they are split by."""

from __future__ import annotations

import math

from ghosted.calibration.capture import CaptureResult
from ghosted.config import PruneConfig
from ghosted.errors import GhostedError
from ghosted.method.linalg import fit_detector
from ghosted.method.operator import Operator
from ghosted.method.policies import get_policy
from ghosted.method.recovery import RECOVERY, SolveOptions
from ghosted.method.surgery import Pair


def heldout_windows(n: int, fraction: float) -> frozenset[int]:
    """The last ceil(fraction * n) windows (never all of them)."""
    if fraction <= 0 or n < 2:
        return frozenset()
    h = min(n - 1, max(1, math.ceil(fraction * n)))
    return frozenset(range(n - h, n))


def solve_options(cfg: PruneConfig, ridge: float) -> SolveOptions:
    return SolveOptions(ridge=ridge, norm=cfg.norm_features, shift=cfg.token_shift, raw=not cfg.exportable,
                        rank=cfg.rank,
                        variant=cfg.variant, fold=cfg.fold)


def selection_policy(cfg: PruneConfig) -> str:
    """The token policy ghost-aware selection and the search's screening fit with (one map for every token when
    the ghost must be exportable)."""
    pol = get_policy(get_policy(cfg.token_policy).for_selection)
    return pol.one_map if cfg.exportable else pol.name


def solve_cut(res: CaptureResult, cut: Pair, group: str, policy: str, cfg: PruneConfig, ridge: float) -> Operator:
    """The operator of one cut from the sums of `group` windows under an (effective) token policy.

    A policy with a sink shift ("sink") gives the positions left out of the fit (position 0, BOS) their
    own map at inference, h <- h + mean(Y - X) over the left-out calibration tokens: the first token's state
    is nearly the same vector in every window, and a cut that removes the layers that build that attention
    sink must rebuild it, which no map fitted on ordinary tokens does (see docs/findings.md).
    A capture that kept the left-out tokens apart (every policy but "all") serves every policy."""
    method = RECOVERY.get(cfg.recovery)
    pol = get_policy(policy)
    op = method.solve(pol.fit_sums(res, cut, group), solve_options(cfg, ridge))
    if method.residual and op.kind in ("full", "lowrank"):
        shift = pol.shift(res, cut, group)
        if shift is not None:
            op.sink_shift = shift
    if pol.detector and op.kind == "full" and op.Wn is not None and op.Wp is not None:
        raise GhostedError("token policy detect does not combine with the token shift")
    if pol.detector and op.kind == "full" and op.Wn is not None:
        left = res.left_out(cut, group)
        if left is not None and left.n and left.has_norm:
            fit_detector(op, res.sums(cut, group, "kept"), left)
    return op

"""Recovery methods: one registry entry each, mapping a cut's sums to an Operator.

Adding a method is one function here with `@RECOVERY.register(name)` and its `needs`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ghosted.method.catalog import Registry
from ghosted.method.linalg import (
    solve_ghost,
    solve_linearpatch,
    solve_lowrank,
    solve_replaceme,
    solve_rotate,
    solve_rotate_replaceme,
    solve_scalar,
)
from ghosted.method.operator import Operator
from ghosted.method.sums import PairSums


@dataclass(frozen=True)
class SolveOptions:
    ridge: float = 1e-6  # relative: lambda = ridge * tr(X^T X) / d
    norm: bool = False  # ghost: also regress on the scale-free state n(X) (linalg.solve_ghost)
    shift: bool = False  # with norm: also on the previous token's n(X) (the token shift)
    raw: bool = True  # ghost: map X itself; False (exportable): X + n(X) Wn + b only (linalg.solve_deci)
    rank: int | None = None
    variant: str = "rotate"  # LinearPatch: rotate | diag
    fold: str = "auto"  # foldable: one of FOLDS (auto: cq+replaceme; the guard picks among FOLDS first)


@dataclass(frozen=True)
class Method:
    name: str
    solve: Callable[[PairSums, SolveOptions], Operator]
    full: bool = False  # needs X^T X, X^T Y
    hadamard: bool = False  # needs rotated magnitude sums
    mlp: bool = False  # needs the MLP output of the layer before the cut
    residual: bool = True  # acts on the residual stream at the cut (guardable by boundary error)


RECOVERY: Registry[Method] = Registry("recovery method")


def _register(method: Method) -> Method:
    RECOVERY.register(method.name)(method)
    return method


def _ghost(s: PairSums, o: SolveOptions) -> Operator:
    if o.rank is not None:
        if o.norm:
            from ghosted.errors import GhostedError

            raise GhostedError("a low-rank ghost has no norm features: drop --rank or --norm-features")
        return solve_lowrank(s, o.rank, o.ridge)
    return solve_ghost(s, o.ridge, norm=o.norm, shift=o.shift, raw=o.raw)


_register(Method("ghost", _ghost, full=True))
_register(Method("linearpatch", lambda s, o: solve_linearpatch(s, o.variant), hadamard=True))
_register(Method("replaceme", lambda s, o: solve_replaceme(s, o.ridge), mlp=True, residual=False))
_register(Method("scalar", lambda s, o: solve_scalar(s), full=True))
_register(Method("none", lambda s, o: Operator("identity")))


def _foldable(s: PairSums, o: SolveOptions) -> Operator:
    """One of fold.FOLDS (which the family and the cut allow is checked in prune, see fold.allowed_folds)."""
    from ghosted.errors import GhostedError
    from ghosted.method.fold import FOLDS

    fold = "cq+replaceme" if o.fold == "auto" else o.fold  # auto without a guard: the widest family
    if fold not in FOLDS:
        raise GhostedError(f"unknown fold '{o.fold}': use auto or one of {', '.join(FOLDS)}")
    if fold == "replaceme" and s.mlp_gram is None:
        raise GhostedError("--fold replaceme needs a kept layer before the cut; the cut starts at layer 0")
    if fold == "cq" or s.mlp_gram is None:  # a cut at layer 0 has no layer s-1 to fold T into
        return solve_rotate(s)
    if fold == "replaceme":
        return solve_replaceme(s, o.ridge)
    return solve_rotate_replaceme(s, o.ridge)


# foldable: an operator that folds exactly into the base architecture's weights (a plain checkpoint).
_register(Method("foldable", _foldable, full=True, mlp=True, residual=False))

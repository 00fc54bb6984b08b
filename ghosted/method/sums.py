"""Streaming float64 sums of the calibration states: what every solver reads instead of the activations.

Notation follows docs/method.md. A cut removes the decoder layers [s, s+k). For every calibration token t that
the token policy keeps:
    X_t = h_s       input of the first removed layer            [n, d]
    Y_t = h_{s+k}   input of the first kept layer after the cut [n, d]
    D   = Y - X     what the removed layers added
All sums are float64 and additive, so batches, devices and held-out splits combine by addition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from ghosted._remote.modeling_ghosted import first_positions, scale_free  # noqa: F401  public: the ghost's token rules
from ghosted.errors import GhostedError

F64 = torch.float64
Pair = tuple[int, int]


@dataclass
class PairSums:
    """Streaming float64 sums for one boundary pair (X = h_s, Y = h_{s+k})."""

    d: int
    n: int = 0
    gram: torch.Tensor | None = None  # X^T X        [d, d]
    cross: torch.Tensor | None = None  # X^T Y        [d, d]
    sum_x: torch.Tensor | None = None  # sum of X     [d]
    sum_y: torch.Tensor | None = None  # sum of Y     [d]
    sq_y: torch.Tensor | None = None  # sum |Y|^2    []
    sq_d: torch.Tensor | None = None  # sum |Y - X|^2 []
    abs_x: torch.Tensor | None = None  # sum |X|      [d]  (LinearPatch diag)
    abs_y: torch.Tensor | None = None  # sum |Y|      [d]
    abs_xh: torch.Tensor | None = None  # sum |X H|    [d]  (LinearPatch rotate)
    abs_yh: torch.Tensor | None = None  # sum |Y H|    [d]
    mlp_gram: torch.Tensor | None = None  # Mlp^T Mlp      [d, d] (ReplaceMe; Mlp = MLP output of layer s-1)
    mlp_cross: torch.Tensor | None = None  # Mlp^T (Y - A) [d, d], A = X - Mlp
    mlp_x: torch.Tensor | None = None  # Mlp^T X        [d, d] (foldable: ReplaceMe composed with c Q)
    # norm features (ghost --norm-features): N = n(X), the scale-free state (modeling_ghosted.scale_free); with
    # --token-shift N = [n(X), P], P the previous token's n(X) (modeling_ghosted.previous_states), so m = 2d
    norm_gram: torch.Tensor | None = None  # N^T N [m, m], m = d (or 2d with the token shift)
    xn: torch.Tensor | None = None  # X^T N [d, m]
    norm_cross: torch.Tensor | None = None  # N^T Y [m, d]
    sum_n: torch.Tensor | None = None  # sum of N [m]
    trace_ref: float | None = None  # tr(X^T X) the relative ridge refers to (None: this gram's own trace)

    def add(self, X: torch.Tensor, Y: torch.Tensor, *, full: bool = True, hadamard: torch.Tensor | None = None,
            mlp: torch.Tensor | None = None, gram: bool = True, norm: bool = False,
            N: torch.Tensor | None = None) -> None:
        """Accumulate one batch of selected tokens. X, Y: [n, d] in any dtype/device.
        gram=False leaves X^T X (and with norm, N^T N and X^T N) to a GramStore shared by every cut that starts
        at the same boundary. norm: also the sums of the norm features N = n(X) (needs full); N: the features
        already computed (GramStore.add_norm returns them; [n(X), P] with the token shift, whose P needs the
        windows' token order and so cannot be computed from the selected rows X), so cuts that share X do not
        recompute them."""
        if X.shape[0] == 0:
            return
        X = X.to(F64)
        Y = Y.to(F64)
        self.n += X.shape[0]
        self._acc("sum_x", X.sum(0))
        self._acc("sum_y", Y.sum(0))
        self._acc("sq_y", (Y * Y).sum())
        self._acc("sq_d", ((Y - X) ** 2).sum())
        self._acc("abs_x", X.abs().sum(0))
        self._acc("abs_y", Y.abs().sum(0))
        if full:
            if gram:
                self._acc("gram", X.T @ X)
            self._acc("cross", X.T @ Y)
            if norm:
                N = scale_free(X) if N is None else N.to(F64)
                if gram:
                    self._acc("norm_gram", N.T @ N)
                    self._acc("xn", X.T @ N)
                self._acc("norm_cross", N.T @ Y)
                self._acc("sum_n", N.sum(0))
        if hadamard is not None:
            H = hadamard.to(device=X.device, dtype=F64)
            self._acc("abs_xh", (X @ H).abs().sum(0))
            self._acc("abs_yh", (Y @ H).abs().sum(0))
        if mlp is not None:
            M = mlp.to(F64)
            self._acc("mlp_gram", M.T @ M)
            self._acc("mlp_cross", M.T @ (Y - X + M))
            self._acc("mlp_x", M.T @ X)

    def _acc(self, name: str, value: torch.Tensor) -> None:
        # in place: a new d x d buffer per batch and cut would churn the allocator (same float64 result)
        cur = getattr(self, name)
        if cur is None:
            setattr(self, name, value.clone())
        else:
            cur.add_(value.to(cur.device))

    def __add__(self, other: PairSums) -> PairSums:
        out = PairSums(self.d, self.n + other.n)
        for f in fields(self):
            if f.name in ("d", "n", "trace_ref"):
                continue
            a, b = getattr(self, f.name), getattr(other, f.name)
            setattr(out, f.name, a if b is None else b if a is None else a + b.to(a.device))
        return out

    def to(self, device: str | torch.device) -> PairSums:
        out = PairSums(self.d, self.n, trace_ref=self.trace_ref)
        for f in fields(self):
            if f.name not in ("d", "n", "trace_ref") and getattr(self, f.name) is not None:
                setattr(out, f.name, getattr(self, f.name).to(device))
        return out

    def as_identity_targets(self) -> PairSums:
        """The same tokens with Y replaced by X: in a fit they anchor the operator to identity on their span."""
        out = PairSums(self.d, self.n, gram=self.gram, cross=self.gram, sum_x=self.sum_x, sum_y=self.sum_x,
                       sq_y=None if self.gram is None else torch.trace(self.gram), sq_d=torch.zeros((), dtype=F64),
                       abs_x=self.abs_x, abs_y=self.abs_x, abs_xh=self.abs_xh, abs_yh=self.abs_xh,
                       mlp_gram=self.mlp_gram, mlp_cross=self.mlp_gram, mlp_x=self.mlp_x,
                       norm_gram=self.norm_gram, xn=self.xn, norm_cross=None if self.xn is None else self.xn.T,
                       sum_n=self.sum_n)
        return out

    @property
    def has_norm(self) -> bool:
        return self.norm_gram is not None and self.norm_cross is not None

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("d", "n", "trace_ref")
              and getattr(self, f.name) is not None}
        sd["n"] = torch.tensor(self.n)
        sd["d"] = torch.tensor(self.d)
        return sd

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> PairSums:
        out = cls(int(sd["d"]), int(sd["n"]))
        for k, v in sd.items():
            if k not in ("d", "n"):
                setattr(out, k, v)
        return out


class GramStore:
    """X^T X once per (token group, start boundary s): every cut (s, b) has X = h_s under the same token
    mask, so cuts of several block lengths that start at s share one float64 gram instead of one each
    (with norm features also N^T N and X^T N, which depend on X alone too)."""

    def __init__(self) -> None:
        self.grams: dict[tuple, torch.Tensor] = {}

    def _add(self, key: tuple, g: torch.Tensor) -> torch.Tensor:
        cur = self.grams.get(key)
        if cur is None:
            self.grams[key] = cur = g
        else:
            cur.add_(g)
        return cur

    def add(self, key: tuple, X: torch.Tensor) -> torch.Tensor:
        """Add X^T X of one batch ([n, d], any dtype) to the gram of `key`; returns that (shared) gram."""
        X = X.to(F64)
        return self._add(key, X.T @ X)

    def add_norm(self, key: tuple, X: torch.Tensor, N: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Add N^T N and X^T N of one batch (N = n(X), or the features given); returns those (shared) sums and
        N (float64)."""
        X = X.to(F64)
        N = scale_free(X) if N is None else N.to(F64)
        return self._add((*key, "nn"), N.T @ N), self._add((*key, "xn"), X.T @ N), N

    def nbytes(self) -> int:
        return sum(g.numel() * g.element_size() for g in self.grams.values())



def orthonormal_mixer(d: int) -> torch.Tensor:
    """A normalised Hadamard-type rotation for any d: H_{2^a} (x) DCT_m with d = 2^a * m (m odd).

    Pure Sylvester Hadamard when d is a power of two; otherwise the odd factor is mixed by an
    orthonormal DCT-II, which keeps the 'spread every channel over all others' property.
    """
    a = (d & -d).bit_length() - 1
    p, m = 1 << a, d >> a
    H = torch.ones(1, 1, dtype=F64)
    while H.shape[0] < p:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    H = H / math.sqrt(p)
    if m == 1:
        return H
    k = torch.arange(m, dtype=F64)[:, None]
    n = torch.arange(m, dtype=F64)[None, :]
    D = torch.cos(math.pi * (n + 0.5) * k / m) * math.sqrt(2.0 / m)
    D[0] /= math.sqrt(2.0)
    return torch.kron(H, D.T.contiguous())  # columns orthonormal


class GroupedSums:
    """The sums of every cut in four token groups (fit | heldout windows x kept | left-out tokens), combined the
    way a token policy declares. A dataclass that subclasses it (CaptureResult) holds the four dicts."""

    fit: dict[Pair, PairSums]  # tokens the policy keeps, fit windows
    heldout: dict[Pair, PairSums]  # tokens the policy keeps, held-out windows
    fit_left_out: dict[Pair, PairSums]  # tokens the policy left out (empty when the capture did not keep them)
    heldout_left_out: dict[Pair, PairSums]

    def sums(self, pair: Pair, group: str = "total", combine: str = "kept") -> PairSums:
        """Sums of one cut over windows `group` (fit | heldout | total), combined as a token policy declares:
        kept (the tokens the capture policy kept), all (kept + left out), anchor (kept, plus the
        left-out tokens with target = their own state, pinning the operator to identity on them).
        For all/anchor the relative ridge still refers to the kept tokens' trace."""
        groups = {"fit": [(self.fit, self.fit_left_out)], "heldout": [(self.heldout, self.heldout_left_out)],
                  "total": [(self.fit, self.fit_left_out), (self.heldout, self.heldout_left_out)]}[group]
        if combine not in ("kept", "all", "anchor"):
            raise ValueError(f"combine must be kept, all or anchor, got {combine}")
        kept = _add([g[pair] for g, _ in groups])
        if combine == "kept":
            return kept
        if pair not in self.fit_left_out:
            raise GhostedError("these sums were captured without the left-out tokens (use token policy auto)")
        left = _add([lo[pair] for _, lo in groups])
        if left.n == 0:
            return kept
        if kept.gram is not None and left.gram is None:
            raise GhostedError(f"a '{combine}' fit needs the left-out tokens' full sums: capture with token policy auto")
        out = kept + (left if combine == "all" else left.as_identity_targets())
        out.trace_ref = None if kept.gram is None else float(torch.trace(kept.gram))
        return out

    def left_out(self, pair: Pair, group: str = "total") -> PairSums | None:
        """Sums of the tokens the policy left out of the fit (None when the capture did not keep them)."""
        if pair not in self.fit_left_out:
            return None
        parts = {"fit": [self.fit_left_out], "heldout": [self.heldout_left_out],
                 "total": [self.fit_left_out, self.heldout_left_out]}[group]
        return _add([g[pair] for g in parts])

    def total(self, pair: Pair) -> PairSums:
        """Fit + held-out sums: the final operator uses every kept token."""
        return self.sums(pair, "total")


def _add(parts: list[PairSums]) -> PairSums:
    nonempty = [p for p in parts if p.n]
    if not nonempty:
        return parts[0]
    out = nonempty[0]
    for p in nonempty[1:]:
        out = out + p
    return out

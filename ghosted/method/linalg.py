"""The math, pure tensor functions: streaming sums and closed-form operators.

Notation follows shared/METHOD.md. A cut removes the decoder layers [s, s+k). For every
calibration token t that the token policy keeps:
    X_t = h_s       input of the first removed layer            [n, d]
    Y_t = h_{s+k}   input of the first kept layer after the cut [n, d]
    D   = Y - X     what the removed layers added
All sums are float64 and additive, so batches, devices and held-out splits combine by addition.

Operators act on row vectors: the ghost computes h <- h W (+ b).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch

from ghosted._remote.modeling_ghosted import scale_free

F64 = torch.float64


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


# --------------------------------------------------------------------------- operators


# The tensor fields of an Operator (saved by prune.save_solution, checked by checks.check_solution).
OPERATOR_TENSORS = ("W", "bias", "U", "V", "T", "sink_shift", "Wn", "Wp")


@dataclass
class Operator:
    """What a recovery method produced for one cut: W (and optional bias, low-rank factors, scalar)."""

    kind: str  # "full" | "lowrank" | "scalar" | "fold_down" | "rotate" | "identity"
    W: torch.Tensor | None = None  # [d, d]: h <- h W (kind == "rotate": h <- scale * h W, W orthogonal)
    bias: torch.Tensor | None = None  # [d]
    U: torch.Tensor | None = None  # [d, r]: h <- h + (h U) V^T
    V: torch.Tensor | None = None  # [d, r]
    scale: float | None = None  # kind == "scalar": h <- c h
    T: torch.Tensor | None = None  # kind == "fold_down": ReplaceMe transform of the MLP output [d, d]
    sink_shift: torch.Tensor | None = None  # [d]: position-0 tokens get h <- h + sink_shift instead (see capture)
    Wn: torch.Tensor | None = None  # [d, d], kind "full": h <- h W + n(h) Wn (+ b), n = scale_free (norm features)
    Wp: torch.Tensor | None = None  # [d, d], token shift: + n(h_{t-1}) Wp (modeling_ghosted.previous_states)
    info: dict = field(default_factory=dict)

    def matrix(self, d: int) -> torch.Tensor:
        """The dense d x d map on the residual at the cut (for scoring); fold_down has none."""
        eye = torch.eye(d, dtype=F64)
        if self.kind == "full":
            return self.W.to(F64)
        if self.kind == "lowrank":
            return eye + self.U.to(F64) @ self.V.to(F64).T
        if self.kind == "scalar":
            return self.scale * eye
        if self.kind == "rotate" and self.T is None:
            return self.scale * self.W.to(F64)
        if self.kind == "identity":
            return eye
        raise ValueError(f"operator kind {self.kind} has no residual matrix")


def ridge_lambda(gram: torch.Tensor, ridge: float, trace_ref: float | None = None) -> float:
    """Ridge is relative: lambda = ridge * tr(gram) / d, so one value fits any model scale.

    trace_ref replaces tr(gram) when the gram includes a few massive tokens (attention sinks) that
    would otherwise inflate lambda for every policy that keeps them.
    """
    trace = float(torch.trace(gram)) if trace_ref is None else float(trace_ref)
    return float(ridge) * trace / gram.shape[0]


def _solve_spd(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Solve A Z = B for symmetric positive (semi)definite A in float64, robust to near-singularity."""
    A = (A + A.T) / 2
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return torch.cholesky_solve(B, L)
    return torch.linalg.lstsq(A, B).solution


def solve_ghost(s: PairSums, ridge: float = 1e-6, norm: bool = False, shift: bool = False) -> Operator:
    """M* = (X^T X + lam I)^{-1} X^T (Y - X), W* = I + M*.

    norm: the regressors are [X, n(X)] (n = scale_free): Y - X = X M + n(X) Wn. Each removed layer reads
    its input through an RMSNorm, so what it adds depends on the scale-free state; the extra d columns give
    the closed form that dependence (SmolLM2-135M, layers 10-18: wiki PPL 44.9 -> 42.4). The n(X) block gets
    its own relative ridge (lambda_n = ridge * tr(N^T N) / d).

    shift (token shift, needs norm): the features are [n(X), P], P the previous token's n(X), captured as one
    2d-wide block with one relative ridge; the operator gets Wn and Wp."""
    G, C = s.gram, s.cross
    d = s.d
    dev = G.device
    eye = torch.eye(d, dtype=F64, device=dev)
    lam = ridge_lambda(G, ridge, s.trace_ref)
    rhs = C - G  # X^T (Y - X)
    if shift and not norm:
        raise ValueError("the token shift is a norm-feature option: solve with norm=True")
    if not norm:
        M = _solve_spd(G + lam * eye, rhs)
        return Operator("full", W=eye + M, info={"lambda": lam})
    blocks_g = [[G + lam * eye]]
    blocks_r = [rhs]
    info = {"lambda": lam}
    if norm:
        if not s.has_norm:
            raise ValueError("norm features need the norm sums: capture with CapturePlan(norm=True)")
        m = d * (2 if shift else 1)
        if s.norm_gram.shape[0] != m:
            raise ValueError(f"the sums hold {s.norm_gram.shape[0] // d} feature block(s) of width d; "
                             f"this fit needs {m // d} (capture with CapturePlan(shift={shift}))")
        lam_n = ridge_lambda(s.norm_gram, ridge)
        info["lambda_norm"] = lam_n
        blocks_g[0].append(s.xn)
        blocks_g.append([s.xn.T, s.norm_gram + lam_n * torch.eye(m, dtype=F64, device=dev)])
        blocks_r.append(s.norm_cross - s.xn.T)  # N^T (Y - X)
    Ga = torch.cat([torch.cat(row, dim=1) for row in blocks_g], dim=0)
    Ra = torch.cat(blocks_r, dim=0)
    Z = _solve_spd(Ga, Ra)
    return Operator("full", W=eye + Z[:d], Wn=Z[d:2 * d], Wp=Z[2 * d:3 * d] if shift else None, info=info)


def solve_lowrank(s: PairSums, rank: int, ridge: float = 1e-6) -> Operator:
    """Best rank-r correction I + U V^T: reduced-rank regression on the ridge solution.

    With G = X^T X + lam I and M* the full solution, the optimum over rank-r M is M* P_r, P_r the
    projector on the top-r eigenvectors of M*^T G M* (the fitted discrepancy's covariance).
    """
    d = s.d
    if not 1 <= rank <= d:
        raise ValueError(f"rank must be in [1, {d}], got {rank}")
    full = solve_ghost(s, ridge)
    M = full.W - torch.eye(d, dtype=F64, device=full.W.device)
    G = s.gram + full.info["lambda"] * torch.eye(d, dtype=F64, device=M.device)
    evals, evecs = torch.linalg.eigh(M.T @ G @ M)
    V = evecs[:, -rank:]  # [d, r], top-r
    U = M @ V  # [d, r]
    return Operator("lowrank", U=U, V=V, info={"lambda": full.info["lambda"], "rank": rank})


def solve_scalar(s: PairSums) -> Operator:
    """Least-squares scalar c = tr(X^T Y) / tr(X^T X): Y ~ c X (magnitude compensation)."""
    c = float(torch.trace(s.cross) / torch.trace(s.gram))
    return Operator("scalar", scale=c)


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


def solve_linearpatch(s: PairSums, variant: str = "rotate", hadamard: torch.Tensor | None = None) -> Operator:
    """LinearPatch: P = H diag(s) H^T with s_c = E|(Y H)_c| / E|(X H)_c| (rotate), or diag(s) on raw channels."""
    eps = 1e-12
    if variant == "diag":
        scale = s.abs_y / (s.abs_x + eps)
        return Operator("full", W=torch.diag(scale), info={"variant": "diag"})
    if variant != "rotate":
        raise ValueError(f"LinearPatch variant must be 'rotate' or 'diag', got {variant}")
    if s.abs_xh is None:
        raise ValueError("rotate variant needs the rotated magnitude sums (collect with a hadamard matrix)")
    H = (hadamard if hadamard is not None else orthonormal_mixer(s.d)).to(F64).to(s.abs_xh.device)
    scale = s.abs_yh / (s.abs_xh + eps)
    return Operator("full", W=H @ torch.diag(scale) @ H.T, info={"variant": "rotate"})


def solve_replaceme(s: PairSums, ridge: float = 1e-6) -> Operator:
    """ReplaceMe LSTSQ: T* = (Mlp^T Mlp + a I)^{-1} Mlp^T (Y - A), folded into layer s-1's down projection."""
    if s.mlp_gram is None:
        raise ValueError("ReplaceMe needs the MLP-output sums of the layer before the cut")
    a = ridge_lambda(s.mlp_gram, ridge)
    T = _solve_spd(s.mlp_gram + a * torch.eye(s.d, dtype=F64, device=s.mlp_gram.device), s.mlp_cross)
    return Operator("fold_down", T=T, info={"lambda": a})


def procrustes(gram: torch.Tensor, cross: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Scaled orthogonal Procrustes: argmin over c > 0, Q orthogonal of ||c X Q - Y||_F from X^T X and X^T Y.

    U S V^T = svd(X^T Y), Q = U V^T, c = tr(S) / tr(X^T X). Returns (Q [d, d], c)."""
    U, S, Vh = torch.linalg.svd(cross.to(F64))
    return U @ Vh, float(S.sum() / torch.trace(gram.to(F64)))


def _mlp_split(s: PairSums) -> dict[str, torch.Tensor]:
    """Sums over A = X - Mlp (the residual after attention in layer s-1) and Mlp, from the captured sums."""
    if s.mlp_gram is None or s.mlp_x is None:
        raise ValueError("the fold into layer s-1 needs the MLP-output sums (mlp_gram, mlp_x) of the layer before "
                         "the cut")
    MtM, MtX = s.mlp_gram, s.mlp_x
    MtA = MtX - MtM
    return {"MtM": MtM, "MtA": MtA, "MtY": s.mlp_cross + MtA,
            "AtA": s.gram - MtX - MtX.T + MtM, "AtY": s.cross - (s.mlp_cross + MtA)}


def _folded_sums(s: PairSums, T: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(X'^T X', X'^T Y) for X' = A + Mlp T, the boundary state after T is folded into layer s-1 (T None: X)."""
    if T is None:
        return s.gram, s.cross
    p = _mlp_split(s)
    AtMT = p["MtA"].T @ T
    return p["AtA"] + AtMT + AtMT.T + T.T @ p["MtM"] @ T, p["AtY"] + T.T @ p["MtY"]


def fold_residual(s: PairSums, op: Operator) -> float:
    """sum_t |x'_t M - y_t|^2 of a foldable operator from the sums: x' = a + mlp T (T folded into layer s-1,
    or x), M = c Q (rotate) or I."""
    T = None if op.T is None else op.T.to(F64)
    G, C = _folded_sums(s, T)
    W = op.scale * op.W.to(F64) if op.kind == "rotate" else torch.eye(s.d, dtype=F64, device=G.device)
    return float(torch.trace(W.T @ G @ W) - 2 * torch.trace(W.T @ C) + s.sq_y)


def solve_rotate(s: PairSums) -> Operator:
    """c Q by scaled orthogonal Procrustes between X and Y; folds exactly through RMSNorm (see fold.py)."""
    Q, c = procrustes(s.gram, s.cross)
    return Operator("rotate", W=Q, scale=c)


def solve_rotate_replaceme(s: PairSums, ridge: float = 1e-6, iters: int = 20, tol: float = 1e-5) -> Operator:
    """T folded into layer s-1's down projection composed with c Q at the cut: min ||(A + Mlp T) c Q - Y||^2.

    Alternating exact minimisation from T = I (so never worse on the fit than c Q alone, ridge aside):
    given T, Procrustes on (A + Mlp T, Y); given c Q, T = (Mlp^T Mlp + a I)^{-1} Mlp^T (Y Q^T / c - A).
    At a Procrustes optimum the residual is |Y|^2 - tr(S)^2 / tr(X'^T X'), which is the stopping test."""
    p = _mlp_split(s)
    eye = torch.eye(s.d, dtype=F64, device=s.gram.device)
    a = ridge_lambda(p["MtM"], ridge)
    A = p["MtM"] + a * eye
    L, info = torch.linalg.cholesky_ex((A + A.T) / 2)  # factor once, solve every iteration
    solve_T = (lambda B: torch.cholesky_solve(B, L)) if int(info) == 0 else (lambda B: _solve_spd(A, B))

    def rotation(T: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        G, C = _folded_sums(s, T)
        U, S, Vh = torch.linalg.svd(C)
        tr_g = float(torch.trace(G))
        return U @ Vh, float(S.sum()) / tr_g, float(s.sq_y) - float(S.sum()) ** 2 / tr_g

    T = eye
    Q, c, prev = rotation(T)
    start, steps = prev, 0
    for _ in range(iters):
        T_new = solve_T(p["MtY"] @ Q.T / c - p["MtA"])
        Q_new, c_new, err = rotation(T_new)
        if err > prev:  # the ridge can make a step worse on the unpenalised fit: keep the better one
            break
        T, Q, c, improved = T_new, Q_new, c_new, prev - err
        prev, steps = err, steps + 1
        if improved <= tol * abs(prev):
            break
    return Operator("rotate", W=Q, scale=c, T=T, info={"lambda": a, "steps": steps, "residual_cq": start,
                                                        "residual": prev})


# --------------------------------------------------------------------------- residuals from sums


def residual(s: PairSums, W: torch.Tensor, bias: torch.Tensor | None = None, Wn: torch.Tensor | None = None,
             Wp: torch.Tensor | None = None) -> float:
    """sum_t |x_t W + n(x_t) Wn + p_t Wp + b - y_t|^2 computed from the sums alone (no activations)."""
    dev = s.gram.device
    W = W.to(F64).to(dev)
    r = torch.trace(W.T @ s.gram @ W) - 2 * torch.trace(W.T @ s.cross) + s.sq_y
    pred_sum = s.sum_x @ W
    if Wn is not None:
        if not s.has_norm:
            raise ValueError("a ghost with norm features needs the norm sums to be scored")
        V = (Wn if Wp is None else torch.cat([Wn, Wp])).to(F64).to(dev)
        if V.shape[0] != s.norm_gram.shape[0]:
            raise ValueError("the operator's feature blocks do not match the captured sums (token shift or not)")
        r = r + 2 * torch.trace(W.T @ s.xn @ V) + torch.trace(V.T @ s.norm_gram @ V) - 2 * torch.trace(V.T @ s.norm_cross)
        pred_sum = pred_sum + s.sum_n @ V
    if bias is not None:
        b = bias.to(F64).to(dev)
        r = r + 2 * (pred_sum - s.sum_y) @ b + s.n * (b @ b)
    return float(r)


def relative_residual(s: PairSums, op: Operator) -> float:
    """Residual of the operator divided by the no-recovery residual |Y - X|^2 (1.0 = no better than removal)."""
    base = float(s.sq_d)
    if op.kind == "fold_down" or op.T is not None:
        raise ValueError("operators with a fold into layer s-1 act inside a layer; use fold_residual")
    r = residual(s, op.matrix(s.d), op.bias, op.Wn, op.Wp)
    return r / max(base, 1e-30)


def fold_down_proj(weight: torch.Tensor, bias: torch.Tensor | None, T: torch.Tensor, conv1d: bool
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """New down-projection parameters so the MLP output becomes Mlp T.

    nn.Linear stores weight [d_out, d_in] (out = a W^T + b): W' = T^T W, b' = b T.
    GPT-2's Conv1D stores [d_in, d_out] (out = a W + b): W' = W T.
    """
    T64 = T.to(F64).to(weight.device)
    W = weight.to(F64)
    W_new = (W @ T64) if conv1d else (T64.T @ W)
    b_new = None if bias is None else bias.to(F64) @ T64
    return W_new.to(weight.dtype), (None if b_new is None else b_new.to(bias.dtype))

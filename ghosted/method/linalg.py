"""Closed-form operators from the streaming sums: pure tensor functions (notation: docs/method.md, method/sums.py).

Operators act on row vectors: the ghost computes h <- h W (+ b).
"""

from __future__ import annotations

import torch

from ghosted.method.operator import Operator
from ghosted.method.sums import F64, PairSums, orthonormal_mixer, scale_free


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


def solve_ghost(s: PairSums, ridge: float = 1e-6, norm: bool = False, shift: bool = False,
                raw: bool = True) -> Operator:
    """M* = (X^T X + lam I)^{-1} X^T (Y - X), W* = I + M*.

    norm: the regressors are [X, n(X)] (n = scale_free): Y - X = X M + n(X) Wn. Each removed layer reads
    its input through an RMSNorm, so what it adds depends on the scale-free state; the extra d columns give
    the closed form that dependence. The n(X) block gets its own relative ridge (lambda_n = ridge * tr(N^T N) / d).

    shift (token shift, needs norm): the features are [n(X), P], P the previous token's n(X), captured as one
    2d-wide block with one relative ridge; the operator gets Wn and Wp.

    raw=False (needs norm, not shift): Y - X = n(X) Wn + b, the identity on X plus an affine map of the scale-free
    state and no map of X itself: the form llama.cpp's deci layer runs (solve_deci)."""
    if not raw:
        if not norm or shift:
            raise ValueError("a ghost without the raw map reads only the scale-free state: solve with norm=True, "
                             "shift=False")
        return solve_deci(s, ridge)
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


def solve_deci(s: PairSums, ridge: float = 1e-6) -> Operator:
    """h <- h + n(h) Wn + b: least squares on the regressors [n(X), 1] for the target Y - X, from the sums.

    One llama.cpp `deci` layer computes exactly this form: a linear-attention layer adds wo @ RMSNorm(h), and
    a feed-forward block whose weights are zero adds its down-projection bias (checkpoint/gguf.py). The
    intercept is not penalised; Wn gets the relative ridge of N^T N."""
    if not s.has_norm or s.sum_n is None:
        raise ValueError("the deci form needs the norm sums: capture with CapturePlan(norm=True)")
    d = s.d
    if s.norm_gram.shape[0] != d:
        raise ValueError("the deci form reads n(h) alone: capture without the token shift")
    dev = s.norm_gram.device
    lam_n = ridge_lambda(s.norm_gram, ridge)
    sum_n = s.sum_n.to(F64).to(dev)
    A = torch.zeros(d + 1, d + 1, dtype=F64, device=dev)
    A[:d, :d] = s.norm_gram + lam_n * torch.eye(d, dtype=F64, device=dev)
    A[:d, d] = sum_n
    A[d, :d] = sum_n
    A[d, d] = float(s.n)
    R = torch.cat([s.norm_cross - s.xn.T, (s.sum_y - s.sum_x).to(F64).to(dev)[None]], dim=0)  # [N, 1]^T (Y - X)
    Z = _solve_spd(A, R)
    return Operator("full", W=torch.eye(d, dtype=F64, device=dev), Wn=Z[:d], bias=Z[d],
                    info={"lambda_norm": lam_n, "form": "deci"})


def fit_detector(op: Operator, kept: PairSums, left: PairSums, ridge: float = 1e-3, margin: float = 40.0) -> None:
    """Give `op` (a ghost with norm features) a sink detector: tokens like the left-out ones get their mean move.

    Fisher's discriminant on the scale-free state from the sums alone: w = (S + lam I)^{-1} (mu_left - mu_kept),
    S the pooled within-class covariance of n(X). The threshold sits between the two classes' mean scores,
    weighted by their spreads; the scale puts the kept tokens' mean score `margin` below it, so that the step
    silu(z) - silu(z - 1) is 0 for ordinary tokens and 1 for sinks (an attention sink's state is far from every
    other token's; docs/findings.md). The shift makes the mean left-out token land on its mean target after the
    map: x + delta + n(x + delta) Wn + b = y, solved by a few fixed-point steps on the mean state."""
    d = kept.d
    dev = kept.norm_gram.device
    mu_k, mu_s = kept.sum_n / kept.n, left.sum_n / left.n
    cov_k = kept.norm_gram / kept.n - torch.outer(mu_k, mu_k)
    cov_s = left.norm_gram / left.n - torch.outer(mu_s, mu_s)
    pooled = (kept.n * cov_k + left.n * cov_s) / (kept.n + left.n)
    lam = ridge_lambda(pooled, ridge)
    w = _solve_spd(pooled + lam * torch.eye(d, dtype=F64, device=dev), (mu_s - mu_k)[:, None])[:, 0]
    s_k, s_s = float(w @ mu_k), float(w @ mu_s)
    sd_k = float(max(w @ cov_k @ w, 0.0)) ** 0.5
    sd_s = float(max(w @ cov_s @ w, 0.0)) ** 0.5
    t = (s_k * sd_s + s_s * sd_k) / (sd_k + sd_s) if sd_k + sd_s > 0 else (s_k + s_s) / 2
    scale = margin / max(t - s_k, 1e-12)
    mean_x, mean_y = left.sum_x / left.n, left.sum_y / left.n
    Wn = op.Wn.to(F64).to(dev)
    b = op.bias.to(F64).to(dev) if op.bias is not None else torch.zeros(d, dtype=F64, device=dev)
    W = op.W.to(F64).to(dev)
    delta = mean_y - mean_x
    for _ in range(8):  # the mean left-out state after the shift, through the map, lands on the mean target
        moved = mean_x + delta
        delta = mean_y - moved @ W - scale_free(moved[None])[0] @ Wn - b + delta
    op.detect_w, op.detect_b, op.detect_shift = scale * w, torch.tensor([-scale * t], dtype=F64), delta
    op.info.update(detector={"kept_score": s_k, "left_score": s_s, "kept_sd": sd_k, "left_sd": sd_s,
                             "threshold": t, "scale": scale})


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

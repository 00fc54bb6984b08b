"""The pure math against independent computations on random data."""

from __future__ import annotations

import pytest
import torch

from ghosted.method.linalg import (
    fold_down_proj,
    relative_residual,
    residual,
    solve_ghost,
    solve_linearpatch,
    solve_lowrank,
    solve_replaceme,
    solve_scalar,
)
from ghosted.method.sums import F64, PairSums, orthonormal_mixer


def _data(n: int = 400, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=F64) * 3
    A = torch.randn(d, d, generator=g, dtype=F64) / d**0.5
    Y = X + X @ A + 0.1 * torch.randn(n, d, generator=g, dtype=F64) + 0.5
    return X, Y


def _sums(X, Y, batches: int = 1, **kw) -> PairSums:
    s = PairSums(X.shape[1])
    for xb, yb in zip(X.chunk(batches), Y.chunk(batches)):
        s.add(xb, yb, **kw)
    return s


def test_ghost_equals_independent_least_squares():
    X, Y = _data()
    op = solve_ghost(_sums(X, Y, batches=7), ridge=0.0)
    M_ref = torch.linalg.lstsq(X, Y - X).solution  # independent: QR-based least squares on the raw data
    assert torch.allclose(op.W, torch.eye(16, dtype=F64) + M_ref, atol=1e-9)


def test_ridge_matches_closed_form():
    X, Y = _data()
    ridge = 0.3
    op = solve_ghost(_sums(X, Y), ridge=ridge)
    lam = ridge * float((X * X).sum()) / X.shape[1]
    M = torch.linalg.solve(X.T @ X + lam * torch.eye(16, dtype=F64), X.T @ (Y - X))
    assert torch.allclose(op.W - torch.eye(16, dtype=F64), M, atol=1e-9)


def test_streaming_sums_equal_one_batch_and_add():
    X, Y = _data()
    one, many = _sums(X, Y), _sums(X, Y, batches=9)
    assert torch.allclose(one.gram, many.gram) and torch.allclose(one.cross, many.cross)
    half = _sums(X[:200], Y[:200]) + _sums(X[200:], Y[200:])
    assert half.n == 400 and torch.allclose(half.gram, one.gram)


def test_residual_from_sums_equals_direct():
    X, Y = _data()
    s = _sums(X, Y)
    W = torch.randn(16, 16, dtype=F64)
    b = torch.randn(16, dtype=F64)
    assert residual(s, W, b) == pytest.approx(float(((X @ W + b - Y) ** 2).sum()), rel=1e-9)
    assert relative_residual(s, solve_ghost(s, 0.0)) < 0.05


def test_lowrank_full_rank_equals_full_and_is_optimal_among_ranks():
    X, Y = _data()
    s = _sums(X, Y)
    full = solve_ghost(s, 1e-6)
    lr = solve_lowrank(s, 16, 1e-6)
    assert torch.allclose(torch.eye(16, dtype=F64) + lr.U @ lr.V.T, full.W, atol=1e-8)
    errs = [residual(s, solve_lowrank(s, r, 1e-6).matrix(16)) for r in (1, 4, 8, 16)]
    assert errs == sorted(errs, reverse=True)
    # optimal among rank-4 maps: beats truncating the SVD of M* directly
    M = full.W - torch.eye(16, dtype=F64)
    Uu, S, Vh = torch.linalg.svd(M)
    naive = torch.eye(16, dtype=F64) + Uu[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
    assert residual(s, solve_lowrank(s, 4, 1e-6).matrix(16)) <= residual(s, naive) + 1e-6


def test_scalar_is_least_squares_scale():
    X, _ = _data()
    s = _sums(X, 2.5 * X)
    assert solve_scalar(s).scale == pytest.approx(2.5)


@pytest.mark.parametrize("d", [16, 64, 576, 640, 12])
def test_mixer_is_orthonormal_for_any_size(d):
    H = orthonormal_mixer(d)
    assert torch.allclose(H.T @ H, torch.eye(d, dtype=F64), atol=1e-10)


def test_linearpatch_rotate_and_diag():
    X, Y = _data(d=12)
    H = orthonormal_mixer(12)
    s = _sums(X, Y, batches=3, hadamard=H)
    op = solve_linearpatch(s, "rotate", H)
    assert torch.allclose(op.W, op.W.T, atol=1e-12)  # symmetric by construction
    ratio = (Y @ H).abs().mean(0) / (X @ H).abs().mean(0)
    assert torch.allclose(H.T @ op.W @ H, torch.diag(ratio), atol=1e-10)
    dg = solve_linearpatch(s, "diag")
    assert torch.allclose(torch.diag(dg.W), Y.abs().mean(0) / X.abs().mean(0))


def test_replaceme_solution_and_fold():
    g = torch.Generator().manual_seed(1)
    n, d, inter = 300, 8, 20
    Mlp = torch.randn(n, d, generator=g, dtype=F64)
    A = torch.randn(n, d, generator=g, dtype=F64)
    X = A + Mlp
    T_true = torch.eye(d, dtype=F64) + 0.3 * torch.randn(d, d, generator=g, dtype=F64)
    Y = A + Mlp @ T_true
    s = PairSums(d)
    s.add(X, Y, mlp=Mlp)
    op = solve_replaceme(s, ridge=0.0)
    assert torch.allclose(op.T, T_true, atol=1e-8)
    # folding into nn.Linear [d_out, d_in] and into a Conv1D [d_in, d_out] gives Mlp @ T
    act = torch.randn(5, inter, generator=g, dtype=F64)
    lin = torch.nn.Linear(inter, d, bias=True).double()
    w, b = fold_down_proj(lin.weight.data, lin.bias.data, op.T, conv1d=False)
    assert torch.allclose(act @ w.T + b, lin(act) @ op.T, atol=1e-10)
    Wc, bc = lin.weight.data.T.clone(), lin.bias.data.clone()
    w2, b2 = fold_down_proj(Wc, bc, op.T, conv1d=True)
    assert torch.allclose(act @ w2 + b2, (act @ Wc + bc) @ op.T, atol=1e-10)


def _norm_data(n: int = 600, d: int = 16, seed: int = 1):
    """Y depends on the scale-free state n(X) as well as on X (rows of very different norms)."""
    from ghosted._remote.modeling_ghosted import scale_free

    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=F64) * torch.rand(n, 1, generator=g, dtype=F64) * 8
    A = torch.randn(d, d, generator=g, dtype=F64) / d**0.5
    B = torch.randn(d, d, generator=g, dtype=F64)
    Y = X + X @ A + scale_free(X) @ B + 0.01 * torch.randn(n, d, generator=g, dtype=F64) + 0.3
    return X, Y, scale_free(X)


def test_norm_feature_ghost_equals_lstsq_on_x_and_nx():
    X, Y, N = _norm_data()
    s = _sums(X, Y, batches=5, norm=True)
    op = solve_ghost(s, ridge=0.0, norm=True)
    Z = torch.linalg.lstsq(torch.cat([X, N], 1), Y - X).solution  # independent: QR on the raw regressors
    assert torch.allclose(op.W - torch.eye(16, dtype=F64), Z[:16], atol=1e-7)
    assert torch.allclose(op.Wn, Z[16:32], atol=1e-7)
    assert op.bias is None
    # the residual from sums equals the direct one, and the norm block explains what X alone cannot
    pred = X @ op.W + N @ op.Wn
    assert residual(s, op.W, op.bias, op.Wn) == pytest.approx(float(((pred - Y) ** 2).sum()), rel=1e-7)
    assert relative_residual(s, op) < 0.2 * relative_residual(s, solve_ghost(s, 0.0))


def test_norm_feature_ridge_is_relative_per_block_and_anchor_targets_pin_identity():
    X, Y, N = _norm_data()
    s = _sums(X, Y, norm=True)
    ridge = 0.2
    op = solve_ghost(s, ridge=ridge, norm=True)
    lam_x, lam_n = ridge * float((X * X).sum()) / 16, ridge * float((N * N).sum()) / 16
    F = torch.cat([X, N], 1)
    reg = torch.diag(torch.tensor([lam_x] * 16 + [lam_n] * 16, dtype=F64))
    Z = torch.linalg.solve(F.T @ F + reg, F.T @ (Y - X))
    assert torch.allclose(op.W - torch.eye(16, dtype=F64), Z[:16], atol=1e-8) and torch.allclose(op.Wn, Z[16:], atol=1e-8)
    # tokens whose target is their own state: the norm-feature fit on them alone is the identity map
    ident = solve_ghost(s.as_identity_targets(), ridge=0.0, norm=True)
    assert torch.allclose(ident.W, torch.eye(16, dtype=F64), atol=1e-8) and ident.Wn.abs().max() < 1e-8


def test_norm_features_need_their_sums():
    X, Y = _data()
    with pytest.raises(ValueError, match="norm sums"):
        solve_ghost(_sums(X, Y), norm=True)

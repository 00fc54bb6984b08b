"""Ghost distillation on tiny random models: only the recovery parameters move, the held-out guard decides."""

from __future__ import annotations

import pytest
import torch

from ghosted.errors import GhostedError
from ghosted.evaluation.perplexity import mean_nll
from ghosted.method.operator import Operator
from ghosted.method.sums import F64
from ghosted.method.surgery import temporarily_pruned
from ghosted.solve.distill import DistillConfig, distill, teacher_topk, topk_kl
from tests.tiny_models import make_tiny


def _ids(vocab: int, n: int = 8, t: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (n, t), generator=g)


def _setup():
    torch.manual_seed(0)
    model, _ = make_tiny("llama", num_layers=4)
    ids = _ids(model.config.vocab_size)
    d = model.config.hidden_size
    ops = {(1, 3): Operator("full", W=torch.eye(d, dtype=F64))}  # identity: plain removal, room to learn
    return model, ids, ops


def test_topk_kl_is_zero_for_the_teacher_itself_and_positive_otherwise():
    logits = torch.randn(2, 5, 11)
    v, i = logits.log_softmax(-1).topk(11, dim=-1)
    assert abs(float(topk_kl(logits, v, i))) < 1e-6
    assert float(topk_kl(torch.randn(2, 5, 11), v, i)) > 0


def test_distillation_beats_the_start_on_heldout_and_moves_only_the_ghost():
    model, ids, ops = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    held = frozenset({6, 7})
    res = distill(model, ids, [1, 2], ops, held, DistillConfig(steps=60, lr=3e-3, eval_every=10, patience=10,
                                                               batch_size=2), progress=False, log=lambda m: None)
    assert res.kept == "distilled"
    assert res.heldout_nll_after < res.heldout_nll_before
    assert not torch.equal(res.operators[(1, 3)].W, ops[(1, 3)].W)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())  # restored
    # the returned operator reproduces the reported held-out loss
    with temporarily_pruned(model, [1, 2], res.operators) as m:
        assert abs(mean_nll(m, ids[[6, 7]], 2) - res.heldout_nll_after) < 1e-5


def test_distillation_is_deterministic():
    model, ids, ops = _setup()
    cfg = DistillConfig(steps=20, lr=3e-3, eval_every=10, batch_size=2)
    a = distill(model, ids, [1, 2], ops, frozenset({6, 7}), cfg, progress=False, log=lambda m: None)
    b = distill(model, ids, [1, 2], ops, frozenset({6, 7}), cfg, progress=False, log=lambda m: None)
    assert torch.equal(a.operators[(1, 3)].W, b.operators[(1, 3)].W)


def test_guard_keeps_the_training_free_operator_when_training_does_not_help():
    model, ids, ops = _setup()
    # the largest learning rate the config allows wrecks the operator at the first step: every check is worse
    res = distill(model, ids, [1, 2], ops, frozenset({6, 7}), DistillConfig(steps=10, lr=1.0, eval_every=5,
                                                                             patience=1), progress=False,
                  log=lambda m: None)
    assert res.kept == "training-free"
    assert res.operators[(1, 3)] is ops[(1, 3)]


def test_no_heldout_is_refused_and_zero_steps_is_a_no_op():
    model, ids, ops = _setup()
    with pytest.raises(GhostedError, match="held-out"):
        distill(model, ids, [1, 2], ops, frozenset(), DistillConfig(steps=5), progress=False)
    res = distill(model, ids, [1, 2], ops, frozenset({7}), DistillConfig(steps=0), progress=False)
    assert res.kept == "training-free" and res.steps_run == 0
    with pytest.raises(GhostedError, match="distill.lr"):
        DistillConfig(steps=5, lr=float("nan"))


def test_teacher_topk_shapes():
    model, ids, _ = _setup()
    v, i = teacher_topk(model, ids[:3], k=5, batch_size=2)
    assert v.shape == (3, ids.shape[1] - 1, 5) and i.shape == v.shape and i.dtype == torch.int64


def test_distillation_trains_the_norm_block_of_a_norm_feature_ghost():
    model, ids, ops = _setup()
    d = model.config.hidden_size
    ops = {(1, 3): Operator("full", W=torch.eye(d, dtype=F64), Wn=torch.zeros(d, d, dtype=F64))}
    res = distill(model, ids, [1, 2], ops, frozenset({6, 7}), DistillConfig(steps=60, lr=3e-3, eval_every=10,
                  patience=10, batch_size=2), progress=False, log=lambda m: None)
    assert res.kept == "distilled" and res.operators[(1, 3)].Wn is not None
    assert res.operators[(1, 3)].Wn.abs().max() > 0
    with temporarily_pruned(model, [1, 2], res.operators) as m:
        assert abs(mean_nll(m, ids[[6, 7]], 2) - res.heldout_nll_after) < 1e-5

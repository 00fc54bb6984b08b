"""The chunked next-token loss: the same numbers as the full-logits formula, with a bounded chunk of logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ghosted.checkpoint.format import ghost_classes
from ghosted.evaluation import perplexity
from ghosted.evaluation.perplexity import chunk_rows, mean_nll, split_head
from ghosted.method.operator import Operator
from ghosted.method.surgery import temporarily_pruned
from tests.tiny_models import FAMILIES, HIDDEN, make_tiny, tiny_config


def _ids(vocab: int, n: int = 5, t: int = 23, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (n, t), generator=g)


@torch.no_grad()
def _full_logits_nll(model: torch.nn.Module, input_ids: torch.Tensor, batch_size: int) -> float:
    """The formula before chunking: full logits of each batch, one cross-entropy over them."""
    total, count = 0.0, 0
    for start in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[start:start + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                       reduction="sum").double())
        count += ids[:, 1:].numel()
    return total / count


@pytest.fixture
def small_chunks(monkeypatch):
    """7 tokens per LM-head chunk: every batch spans several chunks, the last one partial."""
    monkeypatch.setattr(perplexity, "MIN_CHUNK_ROWS", 1)
    monkeypatch.setattr(perplexity, "MAX_CHUNK_ROWS", 7)


def _head_rows(model: torch.nn.Module) -> list[int]:
    rows: list[int] = []
    model.get_output_embeddings().register_forward_hook(lambda m, a, out: rows.append(out.shape[:-1].numel()))
    return rows


def _ghost_ops() -> dict:
    g = torch.Generator().manual_seed(1)
    W = torch.eye(HIDDEN, dtype=torch.float64) + 0.1 * torch.randn(HIDDEN, HIDDEN, generator=g, dtype=torch.float64)
    op = Operator("full", W=W, bias=0.1 * torch.randn(HIDDEN, generator=g, dtype=torch.float64))
    op.sink_shift = torch.randn(HIDDEN, generator=g, dtype=torch.float64)
    return {(1, 3): op}


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_loss_equals_full_logits(family, small_chunks):
    """Every family: dense, and pruned with a hooked ghost (bias, sink shift) as the guard measures it."""
    model, _ = make_tiny(family, num_layers=5)
    assert split_head(model) is not None, f"{family} runs the plain forward"
    ids = _ids(model.config.vocab_size)
    rows = _head_rows(model)
    chunked = mean_nll(model, ids, batch_size=2)
    assert max(rows) == 7  # the head never saw more than one chunk of tokens
    assert chunked == pytest.approx(_full_logits_nll(model, ids, 2), rel=1e-6, abs=1e-6)
    with temporarily_pruned(model, [1, 2], _ghost_ops()) as m:
        assert len(m.ghosts) == 1
        chunked = mean_nll(m, ids, batch_size=3)
        assert chunked == pytest.approx(_full_logits_nll(m, ids, 3), rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("family,key,value", [("gemma2", "final_logit_softcapping", 0.5),
                                              ("gemma3_text", "final_logit_softcapping", 0.5),
                                              ("granite", "logits_scaling", 0.25)])
def test_head_post_processing_is_applied(family, key, value, small_chunks):
    """A softcap / logit scale that changes the loss a lot is reproduced exactly."""
    model, _ = make_tiny(family)
    ids = _ids(model.config.vocab_size)
    plain = mean_nll(model, ids)
    setattr(model.config, key, value)
    capped = mean_nll(model, ids)
    assert abs(capped - plain) > 0.05  # the post-processing matters for this model
    assert capped == pytest.approx(_full_logits_nll(model, ids, 4), rel=1e-6, abs=1e-6)


def test_ghost_checkpoint_class_uses_its_base_head():
    """GhostedForCausalLM (a base class plus hooks) takes the chunked path; its ghosts run in the decoder."""
    _, cls = ghost_classes("LlamaForCausalLM")
    torch.manual_seed(0)
    model = cls(tiny_config("llama")).eval()
    assert split_head(model) is not None
    ids = _ids(model.config.vocab_size)
    assert mean_nll(model, ids) == pytest.approx(_full_logits_nll(model, ids, 4), rel=1e-6, abs=1e-6)


def test_overridden_forward_falls_back_to_full_logits():
    """A class whose forward is not its transformers base's runs the plain forward (whatever it does)."""
    base, _ = make_tiny("llama")

    class Scaled(type(base)):
        def forward(self, *a, **k):
            out = super().forward(*a, **k)
            out.logits = out.logits * 3.0
            return out

    model = Scaled(base.config).eval()
    model.load_state_dict(base.state_dict())
    assert split_head(model) is None
    ids = _ids(model.config.vocab_size)
    assert mean_nll(model, ids) == pytest.approx(_full_logits_nll(model, ids, 4), rel=1e-6, abs=1e-6)
    assert abs(mean_nll(model, ids) - mean_nll(base, ids)) > 0.05


def test_chunk_rows_bounds_the_logits():
    assert chunk_rows(49152) * 49152 * 4 <= perplexity.LOGIT_CHUNK_BYTES
    assert chunk_rows(128) == perplexity.MAX_CHUNK_ROWS
    assert chunk_rows(262144) == perplexity.MIN_CHUNK_ROWS


def test_teacher_topk_in_chunks_equals_full_logits(small_chunks):
    """Distillation's cached teacher top-k comes from the same chunks: the values of the full log-softmax."""
    from ghosted.solve.distill import teacher_topk

    model, _ = make_tiny("gemma2")
    ids = _ids(model.config.vocab_size)
    v, i = teacher_topk(model, ids, k=5, batch_size=2)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits[:, :-1].float().log_softmax(-1).topk(5, dim=-1)
    assert v.shape == i.shape == (5, 22, 5)
    assert torch.equal(i, full.indices)
    torch.testing.assert_close(v, full.values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_distill_kl_gradient_in_chunks_equals_full_logits(family, small_chunks):
    """The distillation step's loss and ghost gradients, head in chunks == one backward through full logits."""
    from ghosted.solve.distill import kl_backward, teacher_topk, topk_kl

    model, _ = make_tiny(family, num_layers=5)
    ids = _ids(model.config.vocab_size, n=2)
    v, i = teacher_topk(model, ids, k=6)
    for p in model.parameters():
        p.requires_grad_(False)
    with temporarily_pruned(model, [1, 2], _ghost_ops()) as m:
        params = list(m.ghosts.parameters())
        for p in params:
            p.requires_grad_(True)
        loss = kl_backward(m, ids, v, i)
        chunked = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        full = topk_kl(m(input_ids=ids, use_cache=False).logits[:, :-1], v, i)
        full.backward()
        assert loss == pytest.approx(float(full.detach()), rel=1e-5, abs=1e-6)
        assert loss > 0.01
        for a, p in zip(chunked, params, strict=True):
            torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)

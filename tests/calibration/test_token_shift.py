"""The token-shift ghost (--norm-features --token-shift): exact capture sums, and decoding with a cache that gives
the same tokens and logits as a whole-sequence forward (greedy, beam search, a cropped cache, a saved checkpoint)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from ghosted._remote.modeling_ghosted import SHIFT_TABLE, previous_states, scale_free
from ghosted.calibration.capture import CapturePlan, capture
from ghosted.errors import GhostedError
from ghosted.method import arch
from ghosted.method.linalg import relative_residual, residual, solve_ghost
from ghosted.method.surgery import temporarily_pruned
from ghosted.solve.solver import PruneConfig, build_checkpoint, load_solution, save_solution, solve
from tests.solve.test_prune import _calib, _ids, _loaded, _logits


def _states(model, ids, layers):
    seen = {}
    hooks = [arch.get_layers(model)[i].register_forward_pre_hook(
        lambda _m, a, kw, i=i: seen.__setitem__(i, (a[0] if a else kw["hidden_states"]).detach()), with_kwargs=True)
        for i in layers]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return seen


def test_previous_states_reads_the_token_before_from_position_two_on():
    h = torch.randn(2, 5, 8)
    n = scale_free(h)
    p = previous_states(n, None)
    assert torch.equal(p[:, :2], torch.zeros(2, 2, 8))  # nothing before token 0; token 1 would read the sink
    assert torch.allclose(p[:, 2:], n[:, 1:4])
    # a continuation: the state handed in is read from position 2 on, never the sink's
    prev = torch.randn(2, 1, 8)
    assert torch.allclose(previous_states(n[:, :1], None, prev, past=4)[:, 0], prev[:, 0])
    assert torch.equal(previous_states(n[:, :1], None, prev, past=1), torch.zeros(2, 1, 8))
    # left padding: position ids decide, not the index
    pid = torch.tensor([[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]])
    q = previous_states(n, pid)
    assert torch.equal(q[0, :4], torch.zeros(4, 8)) and torch.allclose(q[0, 4], n[0, 3])


def test_token_shift_capture_sums_are_exact_and_the_fit_beats_norm_features():
    loaded = _loaded("llama")
    calib = _calib(loaded.model)
    res = capture(loaded.model, calib.input_ids, CapturePlan(pairs=[(1, 3), (1, 2)], norm=True, shift=True), "all",
                  progress=False)
    st = _states(loaded.model, calib.input_ids, (1, 3))
    X3, Y3 = st[1].double(), st[3].double()  # [B, T, d]: the windows' token order gives each predecessor
    d = X3.shape[-1]
    N3 = scale_free(X3)
    F = torch.cat([N3, previous_states(N3, None)], -1).reshape(-1, 2 * d)
    X, Y = X3.reshape(-1, d), Y3.reshape(-1, d)
    s = res.fit[(1, 3)]
    for got, want in ((s.norm_gram, F.T @ F), (s.xn, X.T @ F), (s.norm_cross, F.T @ Y), (s.sum_n, F.sum(0))):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    op = solve_ghost(s, 1e-6, norm=True, shift=True)
    assert op.Wp is not None and op.Wn is not None
    # residual from the sums equals the brute-force one
    pred = X @ op.W + F[:, :d] @ op.Wn + F[:, d:] @ op.Wp
    assert residual(s, op.W, None, op.Wn, op.Wp) == pytest.approx(float(((pred - Y) ** 2).sum()), rel=1e-6)
    # the norm-only fit cannot use these sums, and says so
    with pytest.raises(ValueError, match="feature block"):
        solve_ghost(s, 1e-6, norm=True)
    norm_only = capture(loaded.model, calib.input_ids, CapturePlan(pairs=[(1, 3)], norm=True), "all", progress=False)
    assert relative_residual(s, op) < relative_residual(norm_only.fit[(1, 3)],
                                                        solve_ghost(norm_only.fit[(1, 3)], 1e-6, norm=True))


def _shift_solution(family="llama", layers="1-2"):
    loaded = _loaded(family)
    calib = _calib(loaded.model, n=8, t=24)
    sol = solve(loaded, calib, PruneConfig(layers=layers, guard="off", holdout=0.0, norm_features=True,
                                           token_shift=True), progress=False, log=lambda m: None)
    return loaded, calib, sol


@torch.no_grad()
def _cached_logits(model, ids, chunks):
    """Logits of `ids` fed in pieces of the given sizes through one cache."""
    cache, out, at = DynamicCache(config=model.config), [], 0
    for size in chunks:
        out.append(model(input_ids=ids[:, at:at + size], cache=cache, use_cache=True).logits)
        at += size
    return torch.cat(out, 1), cache


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2", "olmo2"])
def test_token_shift_ghost_decodes_with_a_cache_like_a_whole_forward(family):
    loaded, _, sol = _shift_solution(family)
    ids = _ids(loaded.model.config.vocab_size, 2, 12, seed=5)
    with temporarily_pruned(loaded.model, sol.removed, sol.operators) as m:
        whole = _logits(m, ids)
        pieces, cache = _cached_logits(m, ids, [5, 1, 1, 3, 2])
        assert torch.allclose(pieces, whole, atol=1e-4)
        assert next(iter(getattr(cache, SHIFT_TABLE).values()))[1] == 12  # states of all 12 tokens
        if family != "gemma3_text":  # its sliding-window cache cannot be cropped at all
            # a cropped cache (assisted decoding) follows: redo the last 3 tokens
            cache.crop(-3)
            again = m(input_ids=ids[:, 9:], cache=cache, use_cache=True).logits
            assert torch.allclose(again, whole[:, 9:], atol=1e-4)
        # the shift is applied: without it the logits differ
        g = next(iter(m.ghosts.values()))
        w = g.shift_weight.data.clone()
        g.shift_weight.data.zero_()
        assert not torch.allclose(_logits(m, ids), whole, atol=1e-4)
        g.shift_weight.data.copy_(w)


def test_token_shift_ghost_refuses_a_cache_it_did_not_fill():
    loaded, _, sol = _shift_solution()
    ids = _ids(loaded.model.config.vocab_size, 1, 8, seed=6)
    with torch.no_grad():
        cache = DynamicCache(config=loaded.model.config)
        loaded.model(input_ids=ids[:, :5], cache=cache, use_cache=True)  # dense model: 4 layers cached
    with temporarily_pruned(loaded.model, sol.removed, sol.operators) as m, torch.no_grad():
        with pytest.raises(RuntimeError, match="no token-shift state"):
            m(input_ids=ids[:, 5:], cache=cache, use_cache=True)


def test_token_shift_checkpoint_generates_greedy_and_beam_like_full_recompute(tmp_path):
    from ghosted.checkpoint.verify import verify

    loaded, calib, sol = _shift_solution()
    ids = _ids(loaded.model.config.vocab_size, 2, 10, seed=8)
    with temporarily_pruned(loaded.model, sol.removed, sol.operators) as m:
        hooked = _logits(m, ids)
    build_checkpoint(loaded, sol, calib.sha256, tmp_path / "ts")  # prunes loaded.model in place
    assert verify(tmp_path / "ts")["ghosts"] == 1
    cfg = json.loads((tmp_path / "ts" / "config.json").read_text())
    assert [g.get("shift") for g in cfg["ghosted"]["ghosts"]] == [True]
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ts", trust_remote_code=True).eval()
    prompt = _ids(back.config.vocab_size, 2, 6, seed=7)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    for extra in ({}, {"num_beams": 3}):
        with torch.no_grad():
            cached = back.generate(prompt, use_cache=True, **kw, **extra)
            fresh = back.generate(prompt, use_cache=False, **kw, **extra)
        assert torch.equal(cached, fresh), extra
    # a left-padded batch generates what each prompt generates alone (the shift never reads a pad or the sink)
    a_ids, b_ids = prompt[:1], prompt[1:, 2:]
    batch = torch.cat([a_ids, torch.cat([torch.zeros(1, 2, dtype=torch.long), b_ids], 1)])
    mask = torch.ones_like(batch)
    mask[1, :2] = 0
    with torch.no_grad():
        together = back.generate(batch, attention_mask=mask, **kw)
        alone = back.generate(b_ids, **kw)
    assert torch.equal(together[1, 2:], alone[0])
    # the solution round-trips with its shift matrix
    save_solution(sol, tmp_path / "sol")
    assert torch.equal(load_solution(tmp_path / "sol").operators[(1, 3)].Wp, sol.operators[(1, 3)].Wp)
    assert torch.allclose(_logits(back, ids), hooked, atol=1e-5)


def test_token_shift_needs_norm_features(tmp_path, capsys):
    from ghosted.cli import main

    with pytest.raises(GhostedError, match="add --norm-features"):
        PruneConfig(layers="1-2", token_shift=True)
    # on the command line: one error line, nothing written
    assert main(["prune", "smollm2-135m", "--layers", "10-18", "--token-shift", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ghosted: error: --token-shift (prune.token_shift) extends the norm features: add --norm-features"]
    assert list(tmp_path.iterdir()) == []

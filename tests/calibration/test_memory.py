"""Memory bounds of the calibration pass: shared grams, the angular shortlist, the layerwise offload."""

from __future__ import annotations

import tempfile
from dataclasses import replace

import pytest
import torch

from ghosted.calibration import capture as capture_module
from ghosted.calibration.capture import CapturePlan, capture, capture_batch
from ghosted.corpora import Calibration, tokens_sha256
from ghosted.models import Loaded, ModelRef
from ghosted.solve import solver as prune
from ghosted.solve.solver import PruneConfig, candidate_sums_bytes, solve
from tests.solve.test_prune import _assert_same_capture, _ids
from tests.tiny_models import FAMILIES, make_tiny


def _exactly_equal(a, b) -> None:
    assert a.score_tokens == b.score_tokens
    assert torch.equal(a.cos_sum, b.cos_sum) and torch.equal(a.ang_sum, b.ang_sum)
    for group in ("fit", "heldout", "fit_left_out", "heldout_left_out"):
        ga, gb = getattr(a, group), getattr(b, group)
        assert set(ga) == set(gb)
        for pair in ga:
            sa, sb = ga[pair].state_dict(), gb[pair].state_dict()
            assert set(sa) == set(sb)
            assert all(torch.equal(sa[k], sb[k]) for k in sa), (group, pair)


@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_offload_gives_identical_statistics(family, monkeypatch, tmp_path):
    """Every carried state spilled to files (budget 0) == kept in memory == the whole-model pass; the
    offload folder is gone afterwards."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model, _ = make_tiny(family, num_layers=5)
    ids = _ids(model.config.vocab_size, 6, 12)
    am = torch.ones_like(ids)
    am[1, :3] = 0
    plan = CapturePlan(pairs=[(1, 3), (3, 5), (0, 2)], hadamard=True, scores=True, heldout=frozenset({4, 5}))
    kw = dict(attention_mask=am, batch_size=4, progress=False)
    whole = capture(model, ids, plan, "auto", **kw)
    memory = capture(model, ids, plan, "auto", layerwise=True, **kw)
    spilled = capture(model, ids, plan, "auto", layerwise=True, offload_budget=0, **kw)
    assert memory.offloaded_bytes == 0
    # every parked state of every batch: layers 0..5 of 6 windows x 12 tokens x d, float32
    assert spilled.offloaded_bytes >= 6 * 12 * model.config.hidden_size * 4
    _exactly_equal(memory, spilled)
    _assert_same_capture(whole, spilled)
    assert list(tmp_path.iterdir()) == []


def test_cuts_from_one_boundary_share_one_gram():
    """(1, 3) and (1, 4) hold the same X^T X tensor, equal to the one a capture of (1, 4) alone gives."""
    model, _ = make_tiny("llama", num_layers=5)
    ids = _ids(model.config.vocab_size, 6, 12)
    plan = CapturePlan(pairs=[(1, 3), (1, 4), (2, 4)], heldout=frozenset({5}))
    res = capture(model, ids, plan, "auto", batch_size=4, progress=False)
    alone = capture(model, ids, CapturePlan(pairs=[(1, 4)], heldout=frozenset({5})), "auto", batch_size=4,
                    progress=False)
    for group in ("fit", "heldout", "fit_left_out"):
        sums = getattr(res, group)
        assert sums[(1, 3)].gram is sums[(1, 4)].gram
        assert sums[(1, 3)].gram is not sums[(2, 4)].gram
        assert torch.equal(sums[(1, 4)].gram, getattr(alone, group)[(1, 4)].gram)
        assert torch.equal(sums[(1, 4)].cross, getattr(alone, group)[(1, 4)].cross)


@pytest.mark.parametrize("norm, shift", [(False, False), (True, False), (True, True)])
def test_candidate_sums_bytes_is_what_a_capture_keeps(norm, shift):
    """The stated formula (one gram per start boundary + one cross per cut, per group; the norm features' sums,
    twice as wide with the token shift) counts the real tensors."""
    model, _ = make_tiny("llama", num_layers=6)
    d = model.config.hidden_size
    cuts = [(s, s + k) for k in (2, 3) for s in range(6 - k + 1)]
    res = capture(model, _ids(model.config.vocab_size, 6, 12),
                  CapturePlan(pairs=cuts, heldout=frozenset({5}), norm=norm, shift=shift),
                  "sink", batch_size=4, progress=False)
    seen: dict[int, int] = {}
    for group in (res.fit, res.heldout):
        for ps in group.values():
            for t in (ps.gram, ps.cross, ps.norm_gram, ps.xn, ps.norm_cross):
                if t is not None:
                    seen[t.data_ptr()] = t.numel() * t.element_size()
    assert sum(seen.values()) == candidate_sums_bytes(d, cuts, groups=2, norm=norm, shift=shift)


def _calib(model, n: int = 8, t: int = 16) -> Calibration:
    ids = _ids(model.config.vocab_size, n, t, seed=3)
    return Calibration(ids, "random", 0, tokens_sha256(ids))


@pytest.mark.parametrize("select", ["angular", "cosine"])
def test_shortlisted_pass_gives_the_same_plan_and_operators(select, monkeypatch):
    """Sums for a shortlist of 1 (a miss costs a second pass) or of every block: same cut, same operator."""
    model, _ = make_tiny("llama", num_layers=6)
    loaded = Loaded(model, None, ModelRef("tiny", "random", "tiny"))
    calib = _calib(model)
    cfg = PruneConfig(remove=2, select=select, recovery="ghost", guard="off", holdout=0.25,
                      token_policy="sink", batch_size=2)
    out = {}
    for m in (1, 99):
        monkeypatch.setattr(prune, "SHORTLIST_BLOCKS", m)
        out[m] = solve(loaded, calib, cfg, progress=False, log=lambda _: None)
    assert out[1].removed == out[99].removed
    assert out[1].meta.guard == out[99].meta.guard
    for c, op in out[99].operators.items():
        other = out[1].operators[c]
        assert op.kind == other.kind == "full"
        for name in ("W", "bias", "sink_shift"):
            a, b = getattr(op, name), getattr(other, name)
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), name


def test_shortlist_keeps_only_its_blocks():
    model, _ = make_tiny("llama", num_layers=6)
    ids = _ids(model.config.vocab_size, 6, 12)
    cuts = [(s, s + 2) for s in range(5)]
    full = capture(model, ids, CapturePlan(pairs=cuts, scores=True), "sink", batch_size=2, progress=False)
    short = capture(model, ids, CapturePlan(pairs=cuts, scores=True, shortlist=("angular", 2, 2)), "sink",
                    batch_size=2, progress=False)
    assert len(short.fit) == 2 and set(short.fit) <= set(cuts)
    for c in short.fit:
        assert torch.equal(short.fit[c].gram, full.fit[c].gram)
        assert torch.equal(short.fit[c].cross, full.fit[c].cross)


def test_capture_batch_keeps_the_states_within_the_budget():
    # 31 boundary states of 512 x 576 float32 = 36.6 MiB a window: one window under 64 MiB, never zero
    assert capture_batch(8, 31, 512, 576, 4, budget=64 * 2**20) == 1
    assert capture_batch(8, 31, 512, 576, 2, budget=64 * 2**20) == 3  # 18.3 MiB a window in 16 bits
    assert capture_batch(8, 31, 512, 576, 4, budget=128 * 2**20) == 3
    assert capture_batch(8, 31, 512, 576, 4, budget=1) == 1  # one window is the least a forward can take
    assert capture_batch(4, 3, 12, 16, 4, budget=2**30) == 4  # never more than asked
    assert capture_batch(4, 3, 12, 16, 4) == 4  # the default budget: tiny models keep their batch


@pytest.mark.parametrize("layerwise", [False, True])
def test_capture_under_a_state_budget_gives_the_same_statistics(layerwise, monkeypatch):
    """A budget of one window's states: every forward sees one window, and the sums and the score tables are
    those of whole batches (float64 sums: to rounding). A shortlist is ranked after the first forward, so on
    the first window's scores."""
    model, _ = make_tiny("llama", num_layers=6)
    ids = _ids(model.config.vocab_size, 6, 12)
    am = torch.ones_like(ids)
    am[2, :4] = 0
    cuts = [(s, s + 2) for s in range(5)]
    plan = CapturePlan(pairs=cuts, scores=True, heldout=frozenset({5}))
    kw = dict(attention_mask=am, batch_size=4, progress=False, layerwise=layerwise)
    whole = capture(model, ids, plan, "auto", **kw)
    seen: list[int] = []
    handle = model.model.layers[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    d = model.config.hidden_size
    monkeypatch.setattr(capture_module, "CAPTURE_STATE_BUDGET", 7 * 12 * d * 4)  # L+1 = 7 states of one window
    try:
        one = capture(model, ids, plan, "auto", **kw)
        short = capture(model, ids, replace(plan, shortlist=("angular", 2, 3)), "auto", **kw)
    finally:
        handle.remove()
    assert seen and set(seen) == {1}
    _assert_same_capture(whole, one)
    first = capture(model, ids[:1], CapturePlan(scores=True), "auto", attention_mask=am[:1], progress=False)
    best = sorted(sorted(cuts, key=lambda p: (float(first.ang_sum[p]), p[0]))[:3])
    assert sorted(short.fit) == best
    for c in best:
        assert torch.allclose(short.fit[c].cross, whole.fit[c].cross, rtol=1e-6, atol=1e-6)


def test_bench_layerwise_with_offload(tmp_path, run):
    """`ghosted bench --layerwise --offload-budget 0`: every carried state through files, same plan as in memory."""
    import json

    from tests.tiny_models import tiny_config

    cfg = tmp_path / "config.json"
    tiny_config("llama", num_layers=6).to_json_file(cfg)
    reports = {}
    for name, extra in (("memory", ()), ("layerwise", ("--layerwise", "--offload-budget", 0))):
        out = tmp_path / name
        code, _, err = run("bench", f"random:{cfg}", "--n-seqs", "4", "--seq-len", 16, "--remove", 2, "--prompt", 8,
                           "--new-tokens", 4, "--repeats", 1, *extra, "--out", out)
        assert code == 0, err
        reports[name] = json.loads(out.with_suffix(".json").read_text())
    lw = reports["layerwise"]
    assert lw["layerwise"] and lw["runs"][0]["layerwise"] and lw["runs"][0]["offload_budget"] == 0
    assert lw["runs"][0]["removed"] == reports["memory"]["runs"][0]["removed"]
    assert "--layerwise" in (tmp_path / "layerwise.md").read_text()


def test_save_finiteness_check_reads_every_chunk():
    """The checkpoint's finiteness check, chunk by chunk, still finds one inf in a tensor's last chunk."""
    from ghosted.checkpoint.format import _check_finite
    from ghosted.errors import GhostedError

    model, _ = make_tiny("llama")
    _check_finite(model, chunk=7)
    embed = model.get_input_embeddings().weight
    with torch.no_grad():
        embed.view(-1)[-1] = float("inf")
    with pytest.raises(GhostedError, match="embed_tokens"):
        _check_finite(model, chunk=7)

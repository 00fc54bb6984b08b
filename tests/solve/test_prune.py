"""Prune, fit, apply and save on tiny random models: exact invariants."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import ghosted
from ghosted.calibration.capture import CapturePlan, capture
from ghosted.corpora import Calibration, tokens_sha256
from ghosted.method import arch
from ghosted.method.linalg import solve_ghost
from ghosted.method.operator import Operator
from ghosted.method.policies import get_policy
from ghosted.method.sums import F64
from ghosted.method.surgery import apply, runs, temporarily_pruned
from ghosted.models import Loaded, ModelRef
from ghosted.solve.solver import PruneConfig, build_checkpoint, load_solution, save_solution, solve
from tests.tiny_models import FAMILIES, make_tiny


def _ids(vocab: int, n: int = 6, t: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (n, t), generator=g)


def _calib(model, n: int = 6, t: int = 24) -> Calibration:
    ids = _ids(model.config.vocab_size, n, t)
    return Calibration(ids, "random", 0, tokens_sha256(ids))


def _loaded(family: str = "llama", layers: int = 4) -> Loaded:
    model, tok = make_tiny(family, num_layers=layers)
    return Loaded(model, tok, ModelRef(f"tiny-{family}", "folder", "/nonexistent"))


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


def test_remove_zero_layers_changes_nothing():
    model, _ = make_tiny("llama")
    ids = _ids(model.config.vocab_size)
    before = _logits(model, ids)
    apply(model, [], {})
    assert torch.equal(before, _logits(model, ids))


def test_runs_split_noncontiguous_cuts():
    assert runs([5, 1, 2, 7, 8]) == [(1, 3), (5, 6), (7, 9)]


def test_capture_matches_output_hidden_states():
    """Sums from the hooks equal sums over transformers' own hidden_states (inputs of layers)."""
    model, _ = make_tiny("llama")
    ids = _ids(model.config.vocab_size)
    res = capture(model, ids, CapturePlan(pairs=[(1, 3)]), "all", batch_size=4, progress=False)
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    X = hs[1].reshape(-1, hs[1].shape[-1]).to(F64)
    Y = hs[3].reshape(-1, hs[3].shape[-1]).to(F64)
    assert torch.allclose(res.fit[(1, 3)].gram, X.T @ X, rtol=1e-5)
    assert torch.allclose(res.fit[(1, 3)].cross, X.T @ Y, rtol=1e-5)
    op = solve_ghost(res.fit[(1, 3)], ridge=0.0)
    ref = torch.linalg.lstsq(X, Y - X).solution
    assert torch.allclose(op.W - torch.eye(X.shape[1], dtype=F64), ref, atol=1e-6)


def test_token_policy_masks_position_zero_and_bos():
    ids = torch.tensor([[1, 5, 6, 1, 7], [9, 9, 9, 9, 9]])
    am = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])  # second row left-padded
    sink = get_policy("sink").base_mask(ids, am, bos_id=1)
    assert sink.tolist() == [[False, True, True, False, True], [False, False, False, True, True]]
    assert get_policy("all").base_mask(ids, am, bos_id=1).tolist() == am.bool().tolist()


def test_sums_never_see_padding():
    model, _ = make_tiny("llama")
    ids = _ids(model.config.vocab_size, 2, 10)
    am = torch.ones_like(ids)
    am[1, :4] = 0
    res = capture(model, ids, CapturePlan(pairs=[(0, 2)]), "all", attention_mask=am, progress=False)
    assert res.fit[(0, 2)].n == 16


@pytest.mark.parametrize("policy", ["all", "sink"])
@pytest.mark.parametrize("family", FAMILIES)
def test_ghost_checkpoint_round_trip(family, policy, tmp_path):
    """Fit a ghost, apply it, save; plain transformers (trust_remote_code) and ghosted.load give the same logits."""
    loaded = _loaded(family)
    calib = _calib(loaded.model)
    sol = solve(loaded, calib, PruneConfig(layers="1-2", guard="off", holdout=0.0, token_policy=policy),
                progress=False, log=lambda m: None)
    assert (sol.operators[(1, 3)].sink_shift is not None) == (policy == "sink")
    ids = _ids(loaded.model.config.vocab_size, 2, 12, seed=1)
    with temporarily_pruned(loaded.model, sol.removed, sol.operators) as m:
        hooked = _logits(m, ids)
    meta = build_checkpoint(loaded, sol, calib.sha256, tmp_path / "ck")
    assert torch.allclose(_logits(loaded.model, ids), hooked, atol=1e-5)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["ghosted"]["removed_layers"] == [1, 2] and cfg["ghosted"]["num_layers"] == 2
    assert cfg[arch.get_arch(loaded.model).num_layers_key] == 2
    assert meta.ghosts and (tmp_path / "ck" / "modeling_ghosted.py").exists()
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "ck", trust_remote_code=True).eval()
    own = ghosted.load(str(tmp_path / "ck"))
    assert torch.allclose(_logits(remote, ids), hooked, atol=1e-5)
    assert torch.allclose(_logits(own, ids), hooked, atol=1e-5)
    # generation with a KV cache through the ghost hook equals the no-cache path
    out_c = own.generate(ids[:1, :6], max_new_tokens=4, do_sample=False, use_cache=True)
    out_n = own.generate(ids[:1, :6], max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(out_c, out_n)


def _reference_replaceme(model, removed, s, T, ids):
    """Dense model, layers skipped, MLP output of layer s-1 multiplied by T with a hook: the unfused reference."""
    spec = arch.get_arch(model)
    mlp = arch.layer_submodule(arch.get_layers(model)[s - 1], spec.mlp)
    h = mlp.register_forward_hook(lambda _m, _a, out: out @ T.to(out.dtype))
    try:
        with temporarily_pruned(model, removed) as m:
            return _logits(m, ids)
    finally:
        h.remove()


@pytest.mark.parametrize("recovery", ["ghost", "replaceme", "scalar"])
def test_temporarily_pruned_restores_the_model_and_leaves_other_hooks(recovery):
    """After the block: the same layer modules in the same list, the same weights and config, no ghosts, the
    dense logits bit for bit; a hook registered by someone else during the block stays."""
    loaded = _loaded("llama", layers=4)
    model = loaded.model
    calib = _calib(model)
    sol = solve(loaded, calib, PruneConfig(layers="2", recovery=recovery, guard="off", holdout=0.0,
                                           token_policy="sink"), progress=False, log=lambda m: None)
    ids = _ids(model.config.vocab_size, 2, 12, seed=5)
    dense = _logits(model, ids)
    layer_list, modules = arch.get_layers(model), list(arch.get_layers(model))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    calls: list[int] = []
    with temporarily_pruned(model, sol.removed, sol.operators) as m:
        assert arch.num_layers(m) == 3 and m.config.num_hidden_layers == 3
        assert hasattr(m, "ghosts") == (recovery != "replaceme")
        other = arch.get_layers(m)[2].register_forward_pre_hook(lambda _m, _a: calls.append(1))
        pruned = _logits(m, ids)
    assert not torch.equal(pruned, dense)
    assert arch.get_layers(model) is layer_list and list(layer_list) == modules
    assert model.config.num_hidden_layers == 4 and [layer.self_attn.layer_idx for layer in layer_list] == [0, 1, 2, 3]
    assert not hasattr(model, "ghosts")
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert torch.equal(_logits(model, ids), dense)
    assert len(calls) == 2  # the other hook (on dense layer 3) fired inside the block and after it
    other.remove()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "phi3"])
def test_replaceme_fold_reproduces_hooked_model(family, tmp_path):
    loaded = _loaded(family)
    calib = _calib(loaded.model)
    sol = solve(loaded, calib, PruneConfig(layers="2", recovery="replaceme", guard="off", holdout=0.0),
                progress=False, log=lambda m: None)
    ids = _ids(loaded.model.config.vocab_size, 2, 12, seed=2)
    ref = _reference_replaceme(loaded.model, sol.removed, 2, sol.operators[(2, 3)].T, ids)
    build_checkpoint(loaded, sol, calib.sha256, tmp_path / "ck")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ck").eval()  # no custom code needed
    assert not (tmp_path / "ck" / "modeling_ghosted.py").exists()
    assert torch.allclose(_logits(plain, ids), ref, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_scalar_fold_equals_scalar_ghost(family, tmp_path):
    loaded = _loaded(family)
    calib = _calib(loaded.model)
    sol = solve(loaded, calib, PruneConfig(layers="1", recovery="scalar", guard="off", holdout=0.0),
                progress=False, log=lambda m: None)
    c = sol.operators[(1, 2)].scale
    assert c != pytest.approx(1.0)
    ids = _ids(loaded.model.config.vocab_size, 2, 12, seed=3)
    d = loaded.model.config.hidden_size
    with temporarily_pruned(loaded.model, [1], {(1, 2): Operator("full", W=c * torch.eye(d, dtype=F64))}) as m:
        hooked = _logits(m, ids)
    build_checkpoint(loaded, sol, calib.sha256, tmp_path / "ck")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ck").eval()
    assert torch.allclose(_logits(plain, ids), hooked, atol=1e-4)


def test_replaceme_refuses_inexact_fold():
    loaded = _loaded("gemma3_text")
    calib = _calib(loaded.model)
    sol = solve(loaded, calib, PruneConfig(layers="2", recovery="replaceme", guard="off", holdout=0.0),
                progress=False, log=lambda m: None)
    with pytest.raises(ghosted.GhostedError, match="cannot be folded exactly"):
        apply(loaded.model, sol.removed, sol.operators)


def test_noncontiguous_selection_gets_one_operator_per_cut():
    loaded = _loaded("llama", layers=6)
    calib = _calib(loaded.model)
    sol = solve(loaded, calib, PruneConfig(layers="1,3-4", guard="off", holdout=0.0), progress=False,
                log=lambda m: None)
    assert sorted(sol.operators) == [(1, 2), (3, 5)]


@pytest.mark.parametrize("select", ["angular", "bi", "cosine", "ppl", "ghost"])
def test_every_selection_metric_runs(select):
    loaded = _loaded("llama", layers=6)
    calib = _calib(loaded.model, n=8)
    sol = solve(loaded, calib, PruneConfig(remove=2, select=select, guard="off", holdout=0.25, shortlist=2),
                progress=False, log=lambda m: None)
    assert len(sol.removed) == 2 and all(0 <= i < 6 for i in sol.removed)
    if select in ("angular", "cosine", "ghost"):
        assert sol.removed[1] == sol.removed[0] + 1
        assert sol.meta.capture_passes == 1  # scores and sums from the same pass


def test_bi_selection_takes_the_layers_of_lowest_block_influence():
    """BI_i = 1 - E_t cos(h_i, h_{i+1}) from transformers' own hidden states (position 0 left out, as the
    default token policy does): the first pick is the argmin, the k picks are the k smallest."""
    loaded = _loaded("llama", layers=6)
    calib = _calib(loaded.model, n=8)
    sol = solve(loaded, calib, PruneConfig(remove=2, select="bi", guard="off", holdout=0.25),
                progress=False, log=lambda m: None)
    with torch.no_grad():
        hs = loaded.model(input_ids=calib.input_ids, output_hidden_states=True).hidden_states
    bi = [1 - float(torch.nn.functional.cosine_similarity(hs[i][:, 1:].to(F64), hs[i + 1][:, 1:].to(F64),
                                                           dim=-1).mean()) for i in range(6)]
    order = sorted(range(6), key=lambda i: bi[i])
    assert bi[order[1]] - bi[order[0]] > 1e-6 and bi[order[2]] - bi[order[1]] > 1e-6  # no near-ties
    assert order[0] in sol.removed
    assert sol.removed == sorted(order[:2])


def test_ppl_selection_is_greedy_on_held_out_loss():
    """The first pick is the single layer whose removal costs the least held-out loss; the second is the
    best layer to add to it."""
    from ghosted.evaluation.perplexity import mean_nll
    from ghosted.solve.solver import heldout_windows

    loaded = _loaded("llama", layers=5)
    calib = _calib(loaded.model, n=8)
    cfg = PruneConfig(remove=2, select="ppl", guard="off", holdout=0.25)
    sol = solve(loaded, calib, cfg, progress=False, log=lambda m: None)
    ids = calib.input_ids[sorted(heldout_windows(calib.n, cfg.holdout))]

    def loss(removed: list[int]) -> float:
        with temporarily_pruned(loaded.model, removed) as m:
            return mean_nll(m, ids, cfg.batch_size)

    single = {i: loss([i]) for i in range(5)}
    first = min(single, key=single.get)
    assert first in sol.removed
    pair = {j: loss(sorted([first, j])) for j in range(5) if j != first}
    assert sol.removed == sorted([first, min(pair, key=pair.get)])


@pytest.mark.parametrize("method", ["ghost", "linearpatch", "replaceme", "scalar", "none"])
def test_solution_save_load_round_trip(method, tmp_path):
    loaded = _loaded("llama")
    calib = _calib(loaded.model)
    sol = solve(loaded, calib, PruneConfig(layers="1-2", recovery=method, guard="off", holdout=0.0),
                progress=False, log=lambda m: None)
    save_solution(sol, tmp_path / "ops")
    back = load_solution(tmp_path / "ops")
    assert back.removed == sol.removed
    for cut, op in sol.operators.items():
        for name in ("W", "T", "U", "V", "bias"):
            a, b = getattr(op, name), getattr(back.operators[cut], name)
            assert (a is None) == (b is None) and (a is None or torch.allclose(a.to(F64), b))


def _silence(model, layers: list[int]) -> None:
    """Zero the residual writes of `layers`: each then passes its input through unchanged, bit for bit."""
    spec = arch.get_arch(model)
    for i in layers:
        for path in spec.residual_writers:
            arch.layer_submodule(arch.get_layers(model)[i], path).weight.data.zero_()


@pytest.mark.parametrize("policy", ["auto", "sink", "all"])
def test_guard_falls_back_when_no_ghost_beats_plain_removal(policy):
    """Layers 1-2 pass their input through unchanged, so plain removal IS the dense model and every fitted
    ghost is exactly the identity (X^T (Y - X) = 0): no candidate beats plain removal and the guard must
    fall back to no recovery."""
    loaded = _loaded("llama", layers=4)
    _silence(loaded.model, [1, 2])
    calib = _calib(loaded.model, n=8)
    cfg = PruneConfig(layers="1-2", guard="loss", holdout=0.25, token_policy=policy)
    sol = solve(loaded, calib, cfg, progress=False, log=lambda m: None)
    g = sol.meta.guard
    assert g.fallback is True and g.chosen == "none" and sol.meta.token_policy == "none"
    assert all(op.kind == "identity" for op in sol.operators.values())
    expected = {"none"} | {f"{p}/ridge={r:g}" for p in get_policy(policy).guard_choices for r in cfg.ridge_grid}
    assert set(g.scores) == expected
    assert all(v == g.scores["none"] for v in g.scores.values())  # a tie is not a win


def test_guard_falls_back_on_a_ghost_fitted_to_another_map():
    """Boundary guard on planted sums: the fit windows say Y = -X, the held-out windows Y = X + small noise.
    The fitted ghost (W = -I) leaves about 4 |X|^2 / |noise|^2 of unexplained energy against 1.0 for plain
    removal: the fallback is certain."""
    from ghosted.calibration.capture import CaptureResult
    from ghosted.method.sums import PairSums
    from ghosted.solve.guard import ghost_guard

    loaded = _loaded("llama", layers=4)
    calib = _calib(loaded.model, n=8)
    d, cut = loaded.model.config.hidden_size, (1, 3)
    g = torch.Generator().manual_seed(0)
    X_fit, X_held = (torch.randn(200, d, generator=g, dtype=F64) for _ in range(2))
    fit, held = PairSums(d), PairSums(d)
    fit.add(X_fit, -X_fit)
    held.add(X_held, X_held + 0.1 * torch.randn(200, d, generator=g, dtype=F64))
    res = CaptureResult(4, {cut: fit}, {cut: held}, None, None, 0)
    cfg = PruneConfig(layers="1-2", guard="boundary", holdout=0.25, token_policy="all")
    choice, info = ghost_guard(loaded, calib, cfg, res, [1, 2], [cut], log=lambda m: None)
    assert choice is None and info.fallback is True and info.chosen == "none"
    assert min(v for k, v in info.scores.items() if k != "none") > 100.0


def test_lowrank_ghost_saves_and_loads(tmp_path):
    for extra, name in (({"rank": 4}, "lr"),):
        loaded = _loaded("llama")
        calib = _calib(loaded.model)
        sol = solve(loaded, calib, PruneConfig(layers="1-2", guard="off", holdout=0.0, **extra), progress=False,
                    log=lambda m: None)
        ids = _ids(loaded.model.config.vocab_size, 2, 10, seed=4)
        with temporarily_pruned(loaded.model, sol.removed, sol.operators) as m:
            hooked = _logits(m, ids)
        build_checkpoint(loaded, sol, calib.sha256, tmp_path / name)
        back = AutoModelForCausalLM.from_pretrained(tmp_path / name, trust_remote_code=True).eval()
        assert torch.allclose(_logits(back, ids), hooked, atol=1e-5)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    loaded = _loaded("llama")
    calib = _calib(loaded.model)
    sol = solve(loaded, calib, PruneConfig(layers="1", guard="off", holdout=0.0), progress=False, log=lambda m: None)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(loaded.model), "save_pretrained", boom)
    with pytest.raises(RuntimeError):
        build_checkpoint(loaded, sol, calib.sha256, tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []


def test_auto_policy_keeps_left_out_tokens_apart():
    """auto = sink sums + left-out sums; together they equal the all-token sums exactly."""
    model, _ = make_tiny("llama")
    ids = _ids(model.config.vocab_size, 6, 16)
    plan = CapturePlan(pairs=[(1, 3)], heldout=frozenset({4, 5}))
    auto = capture(model, ids, plan, "auto", progress=False)
    every = capture(model, ids, plan, "all", progress=False)
    sink = capture(model, ids, plan, "sink", progress=False)
    both = auto.sums((1, 3), "fit", "all")
    assert both.n == every.fit[(1, 3)].n == sink.fit[(1, 3)].n + 4  # one position 0 per fit window
    assert torch.allclose(both.gram, every.fit[(1, 3)].gram) and torch.allclose(both.cross, every.fit[(1, 3)].cross)
    assert torch.allclose(auto.sums((1, 3), "fit").gram, sink.fit[(1, 3)].gram)
    assert auto.sums((1, 3), "total", "all").n == every.total((1, 3)).n
    anchored = auto.sums((1, 3), "fit", "anchor")
    lo = auto.fit_left_out[(1, 3)]
    assert torch.allclose(anchored.cross - anchored.gram, sink.fit[(1, 3)].cross - sink.fit[(1, 3)].gram)
    assert torch.allclose(anchored.gram, both.gram) and lo.n == 4


def test_auto_capture_fits_each_candidate_as_its_own_capture_does():
    """The guard fits every candidate policy from one auto capture: each fit equals the fit from a capture
    made under that policy alone (ridge 0: the relative ridge's trace reference does not enter)."""
    from ghosted.solve.solver import solve_cut

    model, _ = make_tiny("llama")
    ids = _ids(model.config.vocab_size, 6, 16)
    plan = CapturePlan(pairs=[(1, 3)], heldout=frozenset({5}))
    auto = capture(model, ids, plan, "auto", progress=False)
    cfg = PruneConfig(layers="1-2")
    for name in get_policy("auto").guard_choices:
        own = capture(model, ids, plan, name, progress=False)
        for group in ("fit", "total"):
            a, b = solve_cut(auto, (1, 3), group, name, cfg, 0.0), solve_cut(own, (1, 3), group, name, cfg, 0.0)
            assert torch.allclose(a.W, b.W, atol=1e-6), (name, group)
            assert (a.sink_shift is None) == (b.sink_shift is None) == (name != "sink")
            if a.sink_shift is not None:
                assert torch.allclose(a.sink_shift, b.sink_shift, atol=1e-6)


def test_fp16_overflow_is_reported_not_summed():
    model, _ = make_tiny("llama")
    model.half()
    layer = arch.get_layers(model)[0]
    layer.mlp.down_proj.weight.data.fill_(6e4)  # forces inf in the residual stream after layer 0
    with pytest.raises(ghosted.GhostedError, match="non-finite activations at the input of layer"):
        capture(model, _ids(model.config.vocab_size, 2, 8), CapturePlan(pairs=[(1, 2)]), progress=False)


def test_bf16_model_still_accumulates_float64():
    model, _ = make_tiny("llama")
    model.to(torch.bfloat16)
    res = capture(model, _ids(model.config.vocab_size, 2, 8), CapturePlan(pairs=[(1, 2)]), progress=False)
    assert res.fit[(1, 2)].gram.dtype == torch.float64 and torch.isfinite(res.fit[(1, 2)].gram).all()


def _assert_same_capture(a, b):
    assert a.score_tokens == b.score_tokens
    for x, y in [(a.cos_sum, b.cos_sum), (a.ang_sum, b.ang_sum)]:
        assert (x is None) == (y is None)
        if x is not None:
            assert torch.allclose(x, y, rtol=1e-6, atol=1e-6)
    for group in ("fit", "heldout", "fit_left_out", "heldout_left_out"):
        ga, gb = getattr(a, group), getattr(b, group)
        assert set(ga) == set(gb)
        for pair in ga:
            sa, sb = ga[pair], gb[pair]
            assert sa.n == sb.n
            for name in ("gram", "cross", "sum_x", "sum_y", "abs_xh", "mlp_gram", "mlp_cross"):
                va, vb = getattr(sa, name), getattr(sb, name)
                assert (va is None) == (vb is None), name
                if va is not None:
                    assert torch.allclose(va, vb, rtol=1e-6, atol=1e-6), (group, pair, name)


@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_capture_gives_identical_statistics(family):
    """Layer by layer (each layer run on all batches, states carried forward) == the whole-model pass,
    with left padding, held-out windows, the MLP sums of ReplaceMe, rotated sums and every score."""
    model, _ = make_tiny(family, num_layers=5)
    ids = _ids(model.config.vocab_size, 6, 12)
    am = torch.ones_like(ids)
    am[1, :3] = 0
    am[4, :5] = 0
    plan = CapturePlan(pairs=[(1, 3), (3, 5), (0, 2)], hadamard=True, mlp=arch.get_arch(model).fold_exact,
                       scores=True, heldout=frozenset({4, 5}))
    kw = dict(attention_mask=am, batch_size=4, progress=False)
    whole = capture(model, ids, plan, "auto", **kw)
    before = _logits(model, ids)
    layered = capture(model, ids, plan, "auto", layerwise=True, **kw)
    _assert_same_capture(whole, layered)
    assert torch.equal(before, _logits(model, ids))  # the model is intact afterwards
    assert all(type(m).__name__ != "_Recorder" for m in arch.get_layers(model))


def test_layerwise_capture_refuses_another_device_without_layerwise():
    model, _ = make_tiny("llama")
    with pytest.raises(ghosted.GhostedError, match="layerwise"):
        capture(model, _ids(model.config.vocab_size, 2, 8), CapturePlan(pairs=[(1, 2)]), progress=False,
                device="meta")


def test_sink_shift_routes_position_zero_only():
    from ghosted._remote.modeling_ghosted import Ghost

    g = Ghost(3, sink_shift=True)
    g.weight.data = 2 * torch.eye(3)
    g.sink_shift.data = torch.tensor([100.0, 0.0, 0.0])
    h = torch.ones(2, 4, 3)
    pos = torch.tensor([[0, 1, 2, 3], [1, 1, 0, 1]])  # second row: left padding as generate() numbers it
    out = g(h, pos)
    first = out[..., 0] == 101.0
    assert first.tolist() == [[True, False, False, False], [False, False, True, False]]
    assert torch.all(out[~first] == 2.0)
    assert torch.all(g(h[:, -1:], torch.tensor([[4], [3]])) == 2.0)  # a decode step is never the sink
    assert g(h).tolist()[0][0] == [101.0, 1.0, 1.0]  # no position ids: the first index of a prompt


def test_sink_shift_is_the_mean_move_of_position_zero():
    """The shift equals mean(h_b - h_s) over the windows' first tokens, from transformers' own hidden states."""
    from ghosted.solve.solver import solve_cut

    model, _ = make_tiny("llama")
    ids = _ids(model.config.vocab_size, 6, 16)
    res = capture(model, ids, CapturePlan(pairs=[(1, 3)]), "sink", progress=False)
    op = solve_cut(res, (1, 3), "total", "sink", PruneConfig(layers="1-2"), 1e-6)
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    expected = (hs[3][:, 0] - hs[1][:, 0]).to(F64).mean(0)
    assert torch.allclose(op.sink_shift, expected, atol=1e-6)
    auto = capture(model, ids, CapturePlan(pairs=[(1, 3)]), "auto", progress=False)
    assert torch.allclose(solve_cut(auto, (1, 3), "total", "sink", PruneConfig(layers="1-2"), 1e-6).sink_shift, expected,
                          atol=1e-6)
    assert solve_cut(auto, (1, 3), "total", "anchor", PruneConfig(layers="1-2"), 1e-6).sink_shift is None


def test_sink_capture_keeps_only_the_mean_move_of_left_out_tokens():
    model, _ = make_tiny("llama")
    ids = _ids(model.config.vocab_size, 4, 12)
    res = capture(model, ids, CapturePlan(pairs=[(1, 3)]), "sink", progress=False)
    left = res.left_out((1, 3))
    assert left.n == 4 and left.gram is None and left.sum_x is not None
    with pytest.raises(ghosted.GhostedError, match="token policy auto"):
        res.sums((1, 3), "fit", "all")


def test_ghost_aware_selection_picks_the_planted_repairable_block():
    """Synthetic residual stream, 4 layers, k = 1: block 1 rotates the state (far apart, but a linear map
    repairs it exactly), block 2 barely moves it but adds token-wise noise no map can predict, blocks 0
    and 3 add more noise. Angular distance picks block 2; ghost-aware selection picks block 1."""
    from ghosted.calibration.capture import CaptureResult
    from ghosted.method.selection import SELECTION, SelectContext, ghost_block_errors
    from ghosted.method.sums import PairSums

    d, n, L = 16, 4000, 4
    g = torch.Generator().manual_seed(0)
    A = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))[0]  # an orthogonal map: a big angle
    noise = {0: 1.0, 1: 0.0, 2: 0.15, 3: 1.0}
    fit, held = {}, {}
    ang = torch.zeros(L + 1, L + 1, dtype=F64)
    for s in range(L):
        X = torch.randn(n, d, generator=g, dtype=F64)
        Y = X @ A if s == 1 else X + noise[s] * torch.randn(n, d, generator=g, dtype=F64)
        fit[(s, s + 1)], held[(s, s + 1)] = PairSums(d), PairSums(d)
        fit[(s, s + 1)].add(X[: n // 2], Y[: n // 2])
        held[(s, s + 1)].add(X[n // 2:], Y[n // 2:])
        cos = torch.nn.functional.cosine_similarity(X, Y, dim=-1).clamp(-1, 1)  # over the hidden axis
        ang[s, s + 1] = ang[s + 1, s] = (torch.arccos(cos) / torch.pi).sum()
    res = CaptureResult(L, fit, held, torch.zeros(L + 1, L + 1, dtype=F64), ang, n)
    ctx = SelectContext(L, res, shortlist=1)
    errs = ghost_block_errors(res, 1, 1e-6)
    assert errs[1] < 1e-6 and min(errs[0], errs[2], errs[3]) > 0.5
    assert SELECTION.get("angular")(ctx, 1) == [2]
    assert SELECTION.get("ghost")(ctx, 1) == [1]


def test_norm_feature_ghost_captures_exact_sums_saves_and_loads(tmp_path):
    """--norm-features end to end on a tiny model: the capture's shared sums equal brute force over the kept
    tokens, the fit beats the plain ghost on its own data, and the saved checkpoint (its verify included)
    reloads with the hooked logits."""
    from ghosted._remote.modeling_ghosted import scale_free
    from ghosted.checkpoint.verify import verify
    from ghosted.method.linalg import relative_residual

    loaded = _loaded("llama")
    calib = _calib(loaded.model)
    res = capture(loaded.model, calib.input_ids, CapturePlan(pairs=[(1, 3), (1, 2)], norm=True), "all", progress=False)
    states = {}
    hooks = [arch.get_layers(loaded.model)[i].register_forward_pre_hook(
        lambda _m, a, kw, i=i: states.__setitem__(i, (a[0] if a else kw["hidden_states"]).detach()), with_kwargs=True)
        for i in (1, 3)]
    with torch.no_grad():
        loaded.model(calib.input_ids)
    for h in hooks:
        h.remove()
    X, Y = states[1].reshape(-1, states[1].shape[-1]).double(), states[3].reshape(-1, states[3].shape[-1]).double()
    N = scale_free(X)
    s = res.fit[(1, 3)]
    for got, want in ((s.norm_gram, N.T @ N), (s.xn, X.T @ N), (s.norm_cross, N.T @ Y), (s.sum_n, N.sum(0))):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    assert res.fit[(1, 2)].norm_gram is s.norm_gram  # shared by the cuts that start at the same boundary
    assert relative_residual(s, solve_ghost(s, 1e-6, norm=True)) < relative_residual(s, solve_ghost(s, 1e-6))

    sol = solve(loaded, calib, PruneConfig(layers="1-2", guard="off", holdout=0.0, norm_features=True),
                progress=False, log=lambda m: None)
    assert sol.operators[(1, 3)].Wn is not None
    ids = _ids(loaded.model.config.vocab_size, 2, 10, seed=4)
    with temporarily_pruned(loaded.model, sol.removed, sol.operators) as m:
        hooked = _logits(m, ids)
    with temporarily_pruned(loaded.model, sol.removed, {c: Operator("full", W=op.W) for c, op in sol.operators.items()}) as m:
        assert not torch.allclose(_logits(m, ids), hooked, atol=1e-4)  # the norm block is applied
    build_checkpoint(loaded, sol, calib.sha256, tmp_path / "nf")
    assert verify(tmp_path / "nf")["ghosts"] == 1  # raises on a missing or misshapen norm_weight
    cfg = json.loads((tmp_path / "nf" / "config.json").read_text())
    assert [g.get("norm") for g in cfg["ghosted"]["ghosts"]] == [True]
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "nf", trust_remote_code=True).eval()
    assert torch.allclose(_logits(back, ids), hooked, atol=1e-5)
    # the solution round-trips through save_solution / load_solution
    save_solution(sol, tmp_path / "sol")
    assert torch.equal(load_solution(tmp_path / "sol").operators[(1, 3)].Wn, sol.operators[(1, 3)].Wn)


@pytest.mark.parametrize("kw, reason", [({"recovery": "linearpatch"}, "needs --recovery ghost"),
                                        ({"rank": 4}, "low-rank ghost has no norm features")])
def test_norm_features_refuse_other_methods(kw, reason):
    from ghosted.errors import GhostedError

    with pytest.raises(GhostedError, match=reason):
        PruneConfig(layers="1-2", norm_features=True, **kw)

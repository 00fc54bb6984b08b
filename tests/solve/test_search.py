"""`ghosted search`: progressive multi-cut fit (exact invariant), two-cut preference, the search document and
checkpoint, the no-pass exit, and the --distill hook of the solve."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ghosted.checkpoint.meta import read_meta
from ghosted.config import SearchConfig
from ghosted.corpora import Calibration, tokens_sha256
from ghosted.method import arch
from ghosted.method.linalg import solve_ghost
from ghosted.method.sums import F64, PairSums
from ghosted.method.surgery import temporarily_pruned
from ghosted.models import Loaded, ModelRef
from ghosted.solve.screen import fit_progressive, screen, split_plans
from ghosted.solve.search import k_range
from ghosted.solve.solver import PruneConfig, build_checkpoint, shared_capture, solve
from tests.tiny_models import make_tiny


def _loaded(layers: int = 6) -> Loaded:
    model, tok = make_tiny("llama", num_layers=layers)
    return Loaded(model, tok, ModelRef("tiny-llama", "folder", "/nonexistent"))


def _calib(model, n: int = 8, t: int = 24) -> Calibration:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, model.config.vocab_size, (n, t), generator=g)
    return Calibration(ids, "random", 0, tokens_sha256(ids))


def _silence(model, layers: list[int]) -> None:
    """Zero the residual writes of `layers`: each passes its input through unchanged."""
    spec = arch.get_arch(model)
    for i in layers:
        for path in spec.residual_writers:
            arch.layer_submodule(arch.get_layers(model)[i], path).weight.data.zero_()


@torch.no_grad()
def _states(model, ids: torch.Tensor, i: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    hs = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    d = hs[i].shape[-1]
    return hs[i].reshape(-1, d).to(F64), hs[j].reshape(-1, d).to(F64)


def test_progressive_fit_of_the_second_cut_is_least_squares_on_the_patched_states():
    """Cuts (1,2) and (3,5): the second operator must be exactly the ridge least-squares map fitted on the states
    of the model with layer 1 removed and its ghost installed (pruned indices 2 -> 3), not on the dense states."""
    loaded = _loaded(6)
    calib = _calib(loaded.model)
    cfg = PruneConfig(remove=1, token_policy="all", holdout=0.25)
    ridge = 1e-6
    ops, passes = fit_progressive(loaded, calib, cfg, [1, 3, 4], "total", "all", ridge)
    assert sorted(ops) == [(1, 2), (3, 5)] and passes == 2  # no shared capture: one pass per cut
    first = ops[(1, 2)]
    with temporarily_pruned(loaded.model, [1], {(1, 2): first}) as m:
        X, Y = _states(m, calib.input_ids, 2, 4)  # dense layers 3..4 are pruned layers 2..3
    sums = PairSums(X.shape[1])
    sums.add(X, Y)
    expected = solve_ghost(sums, ridge).W
    got = ops[(3, 5)].W
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-8)
    # the dense model's states give a different map: the invariant is not vacuous
    Xd, Yd = _states(loaded.model, calib.input_ids, 3, 5)
    dense = PairSums(Xd.shape[1])
    dense.add(Xd, Yd)
    assert (solve_ghost(dense, ridge).W - got).abs().max() > 1e-4


def _own_text(model, n: int = 8, t: int = 24) -> Calibration:
    """Windows sampled from the model itself (its LM head sharpened 8x first): the dense model predicts them well,
    so on them any change that matters raises the held-out loss. On uniformly random tokens a random model's
    loss is log V give or take noise, and a perturbation can lower it as easily as raise it."""
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(4, model.config.vocab_size, (n, 1), generator=g)
        for _ in range(t - 1):
            probs = torch.softmax(model(input_ids=ids, use_cache=False).logits[:, -1], -1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], 1)
    return Calibration(ids, "sampled", 0, tokens_sha256(ids))


def test_screening_prefers_two_short_cuts_when_held_out_loss_says_so():
    """Layers 1 and 4 are planted pass-throughs: removing both is free, while every contiguous pair of layers
    removes a working layer. The screen must rank the two-cut plan first; with max_cuts 1 it cannot."""
    loaded = _loaded(6)
    assert not loaded.model.config.tie_word_embeddings  # _own_text sharpens the head, not the embeddings
    _silence(loaded.model, [1, 4])
    calib = _own_text(loaded.model)
    cfg = PruneConfig(remove=2, holdout=0.25)
    res = shared_capture(loaded, calib, cfg, [2], ["ghost"], progress=False)
    assert [1, 4] in split_plans(res, 2, 2)
    best = screen(loaded, calib, cfg, SearchConfig(shortlist=5, split_shortlist=2), res, 2)
    assert best[0].removed == [1, 4] and best[0].source == "two cuts"
    assert all(c.loss > best[0].loss + 1e-2 for c in best[1:])
    single = screen(loaded, calib, cfg, SearchConfig(shortlist=5, max_cuts=1), res, 2)
    assert all(len(c.removed) == 2 and c.removed[1] == c.removed[0] + 1 for c in single)
    assert all(c.loss > best[0].loss + 1e-2 for c in single)


def test_screen_shortlists_the_best_angular_blocks_and_one_boundary_error_pick():
    """Singles screened per k: the `shortlist` blocks of lowest angular distance, plus the block of lowest held-out
    boundary error (unless it is one of them); nothing else."""
    from ghosted.method.selection import block_scores, ghost_block_errors
    from ghosted.solve.screen import screen_choice

    loaded = _loaded(6)
    calib = _own_text(loaded.model)
    cfg = PruneConfig(remove=2, holdout=0.25)
    res = shared_capture(loaded, calib, cfg, [2], ["ghost"], progress=False)
    ang = block_scores(res, 2)["angular"]
    by_angle = sorted(range(len(ang)), key=lambda s: (ang[s], s))
    errs = ghost_block_errors(res, 2, screen_choice(cfg)[1])
    boundary = min((s for s in range(len(errs)) if errs[s] is not None), key=lambda s: errs[s])
    for m in (1, 2):
        got = screen(loaded, calib, cfg, SearchConfig(shortlist=m, max_cuts=1), res, 2)
        singles = {c.removed[0]: c.source for c in got}
        expect = {s: "angular" for s in by_angle[:m]}
        expect.setdefault(boundary, "boundary error")
        assert singles == expect
        assert [c.loss for c in got] == sorted(c.loss for c in got)


def test_k_range_defaults_and_errors():
    assert k_range(30, SearchConfig()) == list(range(6, 16))
    assert k_range(6, SearchConfig(min_remove=2, max_remove=3)) == [2, 3]
    from ghosted.errors import GhostedError

    with pytest.raises(GhostedError, match="below the model's 6 layers"):
        k_range(6, SearchConfig(max_remove=6))
    with pytest.raises(GhostedError, match="min_remove"):
        SearchConfig(min_remove=4, max_remove=2)


def _params(tmp_path: Path, gate: str, search: str = "{min_remove: 1, max_remove: 3, split_shortlist: 1}",
            extra: str = "") -> Path:
    p = tmp_path / "params.yaml"
    p.write_text("calibration: {n: 8, seq_len: 24}\nprune: {select: angular, recovery: ghost}\n"
                 "eval: {ppl: wiki, ppl_windows: 1, seq_len: 24, tasks: none}\n"
                 f"gate: {gate}\nsearch: {search}\n{extra}")
    return p


def test_search_writes_the_document_and_the_chosen_checkpoint(tiny_folder, tmp_path, run):
    params = _params(tmp_path, "{max_ppl_ratio: 1000.0, min_retained_acc: null}")
    out = tmp_path / "search"
    code, stdout, _ = run("search", tiny_folder, "--config", params, "--out", out, "--quiet")
    assert code == 0, stdout
    doc = json.loads((out / "search.json").read_text())
    assert {p.name for p in out.iterdir()} >= {"search.json", "search.md", "frontier.png", "checkpoint"}
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    chosen = doc["chosen"]
    assert chosen["passed"] is True and chosen["checkpoint"] == str(out / "checkpoint")
    assert chosen["k"] == 3 and len(chosen["removed"]) == 3  # everything passes a ratio of 1000: the top of the range
    assert set(chosen["metrics"]) >= {"ppl", "ppl_ratio", "retained_acc"}
    meta = read_meta(out / "checkpoint")
    assert meta.removed_layers == chosen["removed"]
    # binary search over 1..3: k=2, then k=3; the dense model once
    assert [r["k"] for r in doc["frontier"]] == [2, 3] and doc["full_evaluations"] == 3
    for r in doc["frontier"]:
        assert set(r) >= {"removed", "recovery", "passed", "ppl_ratio", "retained_acc"}
        assert r["recovery"] == "ghost" and r["passed"] is True
        assert r["ppl_ratio"]["wiki"] == pytest.approx(r["ppl"]["wiki"] / doc["dense"]["ppl"]["wiki"])
    md = (out / "search.md").read_text()
    assert "| 3 |" in md and "](frontier.png)" in md and "k=3: the most layers" in md


def test_search_exits_1_with_chosen_null_when_nothing_passes(tiny_folder, tmp_path, run):
    params = _params(tmp_path, "{max_ppl_ratio: 1.0, min_retained_acc: null}")  # removal never keeps PPL equal
    out = tmp_path / "search"
    code, stdout, _ = run("search", tiny_folder, "--config", params, "--out", out, "--quiet")
    assert code == 1
    doc = json.loads((out / "search.json").read_text())
    assert doc["chosen"] is None and "no plan of 1..3 layers passes the gate" in doc["message"]
    assert json.loads(stdout)["chosen"] is None
    assert not (out / "checkpoint").exists()
    assert not any(r["passed"] for r in doc["frontier"])
    # a failing k has its finalists (search.finalists, default 2) evaluated in screening order: k=2, then k=1
    for k in (1, 2):
        rows = [r for r in doc["frontier"] if r["k"] == k]
        screened = doc["screening"]["by_k"][str(k)]
        assert [r["finalist"] for r in rows] == [1, 2]
        assert [r["layers"] for r in rows] == [c["layers"] for c in screened[:2]]
    assert doc["full_evaluations"] == 1 + 4
    assert "(finalist 2)" in (out / "search.md").read_text()


def test_solve_with_search_enabled_writes_the_chosen_plan_and_its_report(tiny_folder, tmp_path, run):
    """The pipeline's solve stage with search.enabled: the operators of the searched plan (the same plan
    `ghosted search` chooses) and the search report in the ops folder; fuse then builds the same checkpoint.
    With nothing passing it fails in one line and writes nothing."""
    params = _params(tmp_path, "{max_ppl_ratio: 1000.0, min_retained_acc: null}")
    params.write_text(params.read_text().replace("search: {", "search: {enabled: true, "))
    ops = tmp_path / "ops"
    code, stdout, err = run("solve", tiny_folder, "--config", params, "--out", ops, "--quiet")
    assert code == 0, err
    plan = json.loads((ops / "plan.json").read_text())
    doc = json.loads((ops / "search.json").read_text())
    assert plan["removed"] == doc["chosen"]["removed"] and len(plan["removed"]) == 3
    assert plan["meta"]["search"] == {"chosen_k": 3, "full_evaluations": doc["full_evaluations"]}
    assert {p.name for p in ops.iterdir()} >= {"search.md", "frontier.png", "operators.safetensors"}
    searched = tmp_path / "search"
    assert run("search", tiny_folder, "--config", params, "--out", searched, "--quiet")[0] == 0
    assert json.loads((searched / "search.json").read_text())["chosen"]["removed"] == plan["removed"]
    assert run("fuse", tiny_folder, "--ops", ops, "--out", tmp_path / "fused", "--quiet")[0] == 0
    assert read_meta(tmp_path / "fused").removed_layers == plan["removed"]
    # --remove on the command line wins over search.enabled (an explicit plan)
    code, _, err = run("solve", tiny_folder, "--config", params, "--remove", "1", "--out", tmp_path / "one", "--quiet")
    assert code == 0 and len(json.loads((tmp_path / "one" / "plan.json").read_text())["removed"]) == 1, err
    # nothing passes: one line, no ops folder
    params.write_text(params.read_text().replace("max_ppl_ratio: 1000.0", "max_ppl_ratio: 1.0"))
    code, _, err = run("solve", tiny_folder, "--config", params, "--out", tmp_path / "none", "--quiet")
    assert code == 2 and "Traceback" not in err and "no plan of 1..3 layers passes the gate" in err, err
    assert not (tmp_path / "none").exists()
    params.write_text(params.read_text().replace("enabled: true", "enabled: maybe"))
    code, _, err = run("solve", tiny_folder, "--config", params, "--out", tmp_path / "bad", "--quiet")
    assert code == 2 and "search.enabled" in err, err


def test_distill_hook_records_its_outcome_in_the_checkpoint(tmp_path):
    loaded = _loaded(6)
    calib = _calib(loaded.model)
    cfg = PruneConfig(remove=2, holdout=0.25, distill=4, distill_lr=1e-3)
    sol = solve(loaded, calib, cfg, progress=False, log=lambda m: None)
    info = sol.meta.distill
    assert info["steps"] == 4 and info["kept"] in ("distilled", "training-free")
    if sol.meta.guard.chosen != "none":
        assert 1 <= info["steps_run"] <= 4 and info["heldout_nll_distilled"] <= info["heldout_nll_training_free"]
    meta = build_checkpoint(loaded, sol, calib.sha256, tmp_path / "ckpt")
    assert read_meta(tmp_path / "ckpt").distill == meta.distill == info


def test_distill_needs_ghost_recovery():
    from ghosted.errors import GhostedError

    with pytest.raises(GhostedError, match="needs --recovery ghost"):
        PruneConfig(remove=2, recovery="none", distill=5)


def test_distill_starts_from_operators_that_never_saw_the_heldout_windows(tmp_path):
    """The guard of distillation compares on the held-out windows: its training-free side must be the operators
    fitted without them (the guard's own candidate), not the shipped ones fitted on every window."""
    loaded = _loaded(6)
    calib = _calib(loaded.model)
    # a large learning rate: whatever the training does, the comparison's training-free side is what is checked
    cfg = PruneConfig(remove=2, holdout=0.25, distill=3, distill_lr=1e-2, token_policy="all", guard="loss")
    sol = solve(loaded, calib, cfg, progress=False, log=lambda m: None)
    plain = solve(loaded, calib, replace(cfg, distill=0), progress=False, log=lambda m: None)
    guard = sol.meta.guard
    assert guard.chosen != "none"  # the planted setting gives the ghost something to do
    info = sol.meta.distill
    assert info["start"] == "fit windows only"
    assert abs(info["heldout_nll_training_free"] - guard.scores[guard.chosen]) < 1e-5
    cut = next(iter(sol.operators))
    shipped = plain.operators[cut]
    if info["kept"] == "training-free":  # the operators fitted on every window are the ones kept
        assert torch.equal(sol.operators[cut].W, shipped.W)
    else:
        assert info["heldout_nll_distilled"] < info["heldout_nll_training_free"]
        assert not torch.equal(sol.operators[cut].W, shipped.W)
    assert plain.fit_operators is None and sol.fit_operators is not None
    assert not torch.equal(sol.fit_operators[cut].W, shipped.W)  # fitted on fewer windows

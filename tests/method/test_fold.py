"""--recovery foldable: the math of c Q and its composition with ReplaceMe, and the exact fold into a plain
checkpoint of the base architecture (logits equal the hooked form) on tiny random models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import ghosted
from ghosted.corpora import Calibration, tokens_sha256
from ghosted.evaluation.perplexity import mean_nll
from ghosted.method import arch
from ghosted.method.linalg import fold_residual, procrustes, solve_replaceme, solve_rotate, solve_rotate_replaceme
from ghosted.method.operator import Operator
from ghosted.method.sums import F64, PairSums
from ghosted.method.surgery import apply, temporarily_pruned
from ghosted.models import Loaded, ModelRef
from ghosted.solve.solver import PruneConfig, build_checkpoint, heldout_windows, load_solution, save_solution, solve
from tests.tiny_models import FAMILIES, make_tiny

SPECS = {spec.name: spec for spec in arch._table()[0].values()}  # the arch table by family name
FOLDABLE = [f for f in FAMILIES if SPECS[f].rotation is not None]
NOT_FOLDABLE = [f for f in FAMILIES if SPECS[f].rotation is None]


def _orthogonal(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    return Q * torch.sign(torch.diagonal(R))[None, :]


def _ids(vocab: int, n: int = 6, t: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (n, t), generator=g)


def _loaded(family: str, layers: int = 5, tie: bool = False) -> Loaded:
    model, tok = make_tiny(family, num_layers=layers)
    if tie:  # a tied head (SmolLM2 ties its embedding and head): rebuild the same config tied
        cfg = copy.deepcopy(model.config)
        cfg.tie_word_embeddings = True
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    return Loaded(model, tok, ModelRef(f"tiny-{family}", "folder", "/nonexistent"))


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


def _sums(n: int = 400, d: int = 12, seed: int = 0):
    """Sums of random boundary states with an MLP part: X = A + M; Y a noisy rotated, scaled image of A + M T0."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, d, generator=g, dtype=F64)
    M = torch.randn(n, d, generator=g, dtype=F64)
    T0 = torch.eye(d, dtype=F64) + 0.3 * torch.randn(d, d, generator=g, dtype=F64)
    Y = 1.7 * (A + M @ T0) @ _orthogonal(d, seed + 1) + 0.05 * torch.randn(n, d, generator=g, dtype=F64)
    s = PairSums(d)
    s.add(A + M, Y, mlp=M)
    return s, A, M, Y


def test_procrustes_recovers_a_planted_scaled_rotation():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 16, generator=g, dtype=F64)
    Q0 = _orthogonal(16, 3)
    Q, c = procrustes(X.T @ X, X.T @ (2.5 * X @ Q0))
    assert torch.allclose(Q, Q0, atol=1e-10) and c == pytest.approx(2.5, rel=1e-10)
    assert torch.allclose(Q.T @ Q, torch.eye(16, dtype=F64), atol=1e-10)


def test_fold_residual_from_sums_equals_the_residual_of_the_states():
    s, A, M, Y = _sums()
    for op in (solve_rotate(s), solve_replaceme(s, 0.0), solve_rotate_replaceme(s, 0.0)):
        Xp = A + M @ (op.T if op.T is not None else torch.eye(s.d, dtype=F64))
        out = op.scale * Xp @ op.W if op.kind == "rotate" else Xp
        assert fold_residual(s, op) == pytest.approx(float(((out - Y) ** 2).sum()), rel=1e-9)


def test_composition_fits_better_than_either_part():
    s, *_ = _sums()
    cq, rm, both = solve_rotate(s), solve_replaceme(s, 0.0), solve_rotate_replaceme(s, 0.0, iters=100, tol=0)
    assert fold_residual(s, both) < fold_residual(s, cq)
    assert fold_residual(s, both) < fold_residual(s, rm)
    # the planted map is found: residual near the noise floor (0.05^2 per entry)
    assert fold_residual(s, both) / (s.n * s.d) < 2 * 0.05**2
    assert torch.allclose(both.W.T @ both.W, torch.eye(s.d, dtype=F64), atol=1e-9)


def _plan(model, removed_cuts: list[tuple[int, int]], with_T: bool) -> dict:
    """Random c Q (and T) per cut: the fold identity must hold for any operator, not only fitted ones."""
    d = model.config.hidden_size
    ops = {}
    for j, (s, b) in enumerate(removed_cuts):
        g = torch.Generator().manual_seed(10 + j)
        T = torch.eye(d, dtype=F64) + 0.2 * torch.randn(d, d, generator=g, dtype=F64) if with_T and s > 0 else None
        ops[(s, b)] = Operator("rotate", W=_orthogonal(d, 20 + j), scale=1.3 + 0.4 * j, T=T)
    return ops


@pytest.mark.parametrize("with_T", [False, True])
@pytest.mark.parametrize("family", FOLDABLE)
def test_fold_equals_hooked_form(family, with_T, tmp_path):
    """Two cuts (1-2 and 4): folded weights give the hooked model's logits; the saved folder is a plain
    checkpoint of the base architecture that plain from_pretrained loads to the same logits."""
    loaded = _loaded(family, layers=6, tie=family == "llama")
    model = loaded.model
    if with_T and not arch.get_arch(model).fold_exact:
        pytest.skip(f"{family}: T does not fold exactly (allowed_folds offers cq only)")
    removed = [1, 2, 4]
    ops = _plan(model, [(1, 3), (4, 5)], with_T)
    ids = _ids(model.config.vocab_size, 2, 16, seed=1)
    dense = _logits(model, ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with temporarily_pruned(model, removed, ops) as m:
        hooked = _logits(m, ids)
    after = model.state_dict()  # the hooked run (T folded, c Q hooked) restored the model bit for bit
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert arch.num_layers(model) == 6 and not hasattr(model, "ghosts")
    assert torch.equal(_logits(model, ids), dense)
    assert not torch.allclose(hooked, dense, atol=1e-2)  # the operators matter
    from ghosted.checkpoint.meta import SolveMeta
    from ghosted.solve.solver import Solution

    sol = Solution(removed, ops, SolveMeta(recovery="foldable"))
    meta = build_checkpoint(loaded, sol, "0" * 64, tmp_path / "ck")
    folded = _logits(model, ids)
    assert (folded - hooked).abs().max() < 1e-4
    assert not meta.ghosts and any("rotation" in f for f in meta.folded)
    ck = tmp_path / "ck"
    cfg = json.loads((ck / "config.json").read_text())
    assert "auto_map" not in cfg and not (ck / "modeling_ghosted.py").exists()
    assert cfg["architectures"] == [type(model).__name__]
    with safe_open(str(ck / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("ghosts") for k in f.keys())
    plain = AutoModelForCausalLM.from_pretrained(ck).eval()  # no custom code
    assert arch.num_layers(plain) == 3
    assert (_logits(plain, ids) - hooked).abs().max() < 1e-4
    if family == "llama":  # the tied head was untied: the embedding stays unrotated
        assert cfg["tie_word_embeddings"] is False
        assert plain.get_output_embeddings().weight.data_ptr() != plain.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("family", NOT_FOLDABLE)
def test_families_without_an_exact_fold_are_refused(family):
    assert SPECS[family].rotation_refused
    loaded = _loaded(family, layers=4)
    ids = _ids(loaded.model.config.vocab_size)
    calib = Calibration(ids, "random", 0, tokens_sha256(ids))
    with pytest.raises(ghosted.GhostedError, match="cannot fold a rotation exactly"):
        solve(loaded, calib, PruneConfig(layers="1-2", recovery="foldable", guard="off", holdout=0.0),
              progress=False, log=lambda m: None)
    with pytest.raises(ghosted.GhostedError, match="cannot fold a rotation exactly"):
        apply(loaded.model, [1, 2], _plan(loaded.model, [(1, 3)], False))


def test_guard_picks_among_the_folds_and_records_its_choice(tmp_path):
    """End to end: solve (guard on held-out loss over cq, replaceme, cq+replaceme), save, reload plainly."""
    loaded = _loaded("llama", layers=6, tie=True)
    ids = _ids(loaded.model.config.vocab_size, 8, 32)
    calib = Calibration(ids, "random", 0, tokens_sha256(ids))
    sol = solve(loaded, calib, PruneConfig(layers="2-3", recovery="foldable", holdout=0.25), progress=False,
                log=lambda m: None)
    g = sol.meta.guard.to_dict()
    assert {k.split("/")[0] for k in g["scores"]} == {"none", "cq", "replaceme", "cq+replaceme"}
    assert g["scores"][g["chosen"]] == min(g["scores"].values())  # never worse than removal on held-out
    op = sol.operators[(2, 4)]
    fold = g["chosen"].split("/")[0]
    expected = {"none": "identity", "cq": "rotate", "replaceme": "fold_down", "cq+replaceme": "rotate"}[fold]
    assert op.kind == expected and (op.T is not None) == (fold in ("replaceme", "cq+replaceme"))
    save_solution(sol, tmp_path / "ops")
    back = load_solution(tmp_path / "ops").operators[(2, 4)]
    assert back.kind == op.kind and back.scale == op.scale
    test_ids = _ids(loaded.model.config.vocab_size, 2, 16, seed=5)
    held = ids[sorted(heldout_windows(calib.n, 0.25))]
    with temporarily_pruned(loaded.model, sol.removed, sol.operators) as m:
        hooked = _logits(m, test_ids)
        hooked_nll = mean_nll(m, held, 4)  # the form the guard measures, with the final (all-window) fit
    build_checkpoint(loaded, sol, calib.sha256, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["ghosted"]["recovery"] == "foldable" and cfg["ghosted"]["guard"]["chosen"] == g["chosen"]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ck").eval()
    assert (_logits(plain, test_ids) - hooked).abs().max() < 1e-4
    # the held-out loss of the hooked form the guard measures is the saved checkpoint's
    assert abs(mean_nll(plain, held, 4) - hooked_nll) < 1e-5


@pytest.mark.parametrize("fold", ["cq", "replaceme", "cq+replaceme"])
def test_forced_fold_without_guard(fold):
    loaded = _loaded("qwen2", layers=4)
    ids = _ids(loaded.model.config.vocab_size)
    calib = Calibration(ids, "random", 0, tokens_sha256(ids))
    sol = solve(loaded, calib, PruneConfig(layers="1-2", recovery="foldable", fold=fold, guard="off", holdout=0.0),
                progress=False, log=lambda m: None)
    op = sol.operators[(1, 3)]
    assert op.kind == ("fold_down" if fold == "replaceme" else "rotate")
    assert 0 <= sol.meta.calibration_relative_residual["1-3"] < 1.0


def test_cut_at_layer_zero_has_no_replaceme_candidate():
    loaded = _loaded("llama", layers=4)
    ids = _ids(loaded.model.config.vocab_size, 8, 24)
    calib = Calibration(ids, "random", 0, tokens_sha256(ids))
    sol = solve(loaded, calib, PruneConfig(layers="0-1", recovery="foldable", holdout=0.25), progress=False,
                log=lambda m: None)
    assert not any(k.startswith("replaceme") for k in sol.meta.guard.scores)
    with pytest.raises(ghosted.GhostedError, match="layer 0"):
        solve(loaded, calib, PruneConfig(layers="0-1", recovery="foldable", fold="replaceme", guard="off"),
              progress=False, log=lambda m: None)


def test_granite_offers_cq_only():
    from ghosted.method.fold import allowed_folds

    spec = arch.get_arch(make_tiny("granite")[0])
    assert allowed_folds(spec, [(1, 3)]) == ["cq"]
    with pytest.raises(ghosted.GhostedError, match="not exact for granite"):
        allowed_folds(spec, [(1, 3)], "cq+replaceme")


@pytest.mark.integration
def test_shipped_smollm2_fold_equals_hooked(tmp_path):
    """The real tied SmolLM2-135M: c Q (c = 1.25) with T folded is a plain Llama checkpoint with the hooked logits
    (the norms' eps is the only inexact part: measured 2.9e-5 on logits of magnitude 28)."""
    from pathlib import Path

    from ghosted.checkpoint.meta import SolveMeta
    from ghosted.models import load_model
    from ghosted.solve.solver import Solution

    loaded = load_model("smollm2-135m")
    model = loaded.model
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    T = torch.eye(d, dtype=F64) + 0.05 * torch.randn(d, d, generator=g, dtype=F64)
    ops = {(13, 19): Operator("rotate", W=_orthogonal(d, 0), scale=1.25, T=T)}
    removed = list(range(13, 19))
    ids = loaded.tokenizer("The residual stream carries the hidden state from layer to layer.",
                           return_tensors="pt").input_ids
    with temporarily_pruned(model, removed, ops) as m:
        hooked = _logits(m, ids)
    build_checkpoint(loaded, Solution(removed, ops, SolveMeta(recovery="foldable")), "0" * 64, Path(tmp_path) / "ck")
    assert (_logits(model, ids) - hooked).abs().max() < 1e-4
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ck").eval()
    assert (_logits(plain, ids) - hooked).abs().max() < 1e-4
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is False
    assert "auto_map" not in cfg


def test_fold_option_is_checked_in_the_config():
    from ghosted.config import PruneConfig as Typed
    from ghosted.config import default

    assert PruneConfig is Typed and default(Typed, "fold") == "auto"
    assert PruneConfig.from_dict({"layers": "1-2", "recovery": "foldable", "fold": "cq"}).fold == "cq"
    with pytest.raises(ghosted.GhostedError, match=r"--fold \(prune.fold\) must be auto or one of cq"):
        PruneConfig.from_dict({"layers": "1-2", "recovery": "foldable", "fold": "qc"})

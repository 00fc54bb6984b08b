"""`ghosted search --target` and `search.heal`: the budget arithmetic against a built checkpoint's tensors, the
fewest layers each kind of target needs, the one-line refusals, and healed rows beside the training-free ones."""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ghosted.checkpoint.meta import read_meta
from ghosted.config import SearchConfig
from ghosted.config.target import parse_target
from ghosted.errors import GhostedError
from ghosted.method import arch
from ghosted.solve.budget import model_costs, recovery_params, smallest_k
from ghosted.solve.search import solve_plan
from ghosted.solve.solver import PruneConfig, build_checkpoint, shared_capture
from tests.solve.test_search import _calib, _loaded, _params


def _stored(folder: Path) -> tuple[int, int, int]:
    """(tensors' elements, their bytes, the ghosts' elements) of a checkpoint folder's safetensors."""
    numel = size = ghosts = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                t = st.get_tensor(key)
                numel += t.numel()
                size += t.numel() * t.element_size()
                ghosts += t.numel() if key.startswith("ghosts.") else 0
    return numel, size, ghosts


@pytest.mark.parametrize("removed", [[2, 3], [1, 3, 4]])
def test_budget_figures_equal_the_built_checkpoints_tensors(removed, tmp_path):
    """params and bytes of a solved plan (one cut, and two cuts with a ghost each) are exactly what its checkpoint
    stores; before solving, the bound is above them by at most the optional vectors (4 d + 1 per cut)."""
    loaded = _loaded(6)
    calib = _calib(loaded.model)
    cfg = PruneConfig(remove=1, holdout=0.25, token_policy="all")
    res = shared_capture(loaded, calib, cfg, [len(removed)], ["ghost"], progress=False)
    sol = solve_plan(loaded, calib, cfg, res, removed)
    costs = model_costs(loaded.model)
    rec = recovery_params(loaded.model, removed, sol.operators)
    fig = costs.figures(removed, rec)
    build_checkpoint(loaded, sol, calib.sha256, tmp_path / "ckpt")  # patches the model: figures first
    numel, size, ghosts = _stored(tmp_path / "ckpt")
    assert (fig["params"], fig["bytes"], fig["recovery_params"]) == (numel, size, ghosts)
    assert fig["mb"] == size / 1e6 and fig["dtype"] == "float32" and fig["speedup"] == 6 / (6 - len(removed))
    cuts = 2 if len(removed) == 3 else 1
    if sol.meta.guard.chosen != "none":
        assert ghosts > 0 and ghosts % cuts == 0  # one ghost per cut, of one size
    bound = costs.bound(removed)
    d = loaded.model.config.hidden_size
    assert bound["recovery_params"] == cuts * costs.cut_bound
    assert bound["params"] - fig["params"] == bound["recovery_params"] - ghosts
    if ghosts:
        assert 0 <= costs.cut_bound - ghosts // cuts <= 4 * d + 1


def test_costs_count_the_saved_dtype():
    model = _loaded(6).model.to(torch.float16)
    costs = model_costs(model)
    assert costs.itemsize == 2 and costs.dtype == "float16" and costs.bytes == 2 * costs.params
    assert costs.params == sum(p.numel() for p in model.parameters())
    assert costs.layer_params[0] == sum(p.numel() for p in arch.get_layers(model)[0].parameters())


def test_targets_parse_their_human_forms_and_refuse_bad_ones_in_one_line():
    for text in ("params=100M", "params=1e8", "params=100000000", "params = 0.1B"):
        t = parse_target(text)
        assert (t.kind, t.value) == ("params", pytest.approx(1e8))
    for text in ("memory=400", "memory=400MB", "memory=0.4GB", "MEMORY=400mb"):
        assert parse_target(text).value == pytest.approx(400.0)
    assert parse_target("speedup=1.3").value == parse_target("speedup=1.3x").value == 1.3
    for text, says in (("fast", "KIND=VALUE"), ("speed=1.3", "did you mean 'speedup'"), ("params=-5", "KIND=VALUE"),
                       ("params=0", "above 0"), ("params=10Q", "unknown unit"), ("memory=1e999", "finite"),
                       ("params=", "KIND=VALUE")):
        with pytest.raises(GhostedError, match=says) as err:
            parse_target(text)
        assert "\n" not in str(err.value)
    with pytest.raises(GhostedError, match="search.target"):
        SearchConfig(target="latency=3")
    with pytest.raises(GhostedError, match="decides how many layers"):
        SearchConfig(target="speedup=1.5", min_remove=2)


def test_each_kind_of_target_asks_for_the_fewest_layers_that_meet_it():
    costs = model_costs(_loaded(6).model)
    L = 6
    for value, k in (("1.2", 1), ("1.21", 2), ("1.5", 2), ("2", 3), ("6", 5)):  # L / (L - k) >= value
        assert smallest_k(parse_target(f"speedup={value}"), costs) == k
    for k in (1, 2, 4):
        one_cut = costs.bound(list(range(k)))  # the cheapest recovery: one cut
        assert smallest_k(parse_target(f"params={one_cut['params']}"), costs) == k
        assert smallest_k(parse_target(f"params={one_cut['params'] - 1}"), costs) == k + 1
        assert smallest_k(parse_target(f"memory={one_cut['mb']}MB"), costs) == k
        assert smallest_k(parse_target(f"memory={one_cut['mb'] * 0.999}"), costs) == k + 1
    for text, says in (("speedup=7", "no plan meets it"), ("speedup=1.0", "dense model already meets it"),
                       (f"params={costs.params}", "dense model already meets it"), ("params=10", "no plan meets it"),
                       ("memory=0.001", "no plan meets it")):
        with pytest.raises(GhostedError, match=says) as err:
            smallest_k(parse_target(text), costs)
        assert f"reachable with this model: x1.200 (1 layer removed) to x{L:.3f} (5 of 6" in str(err.value) \
            or not text.startswith("speedup")


def test_target_search_visits_the_fewest_layers_and_keeps_plans_within_the_budget(tiny_folder, tmp_path, run):
    """params = one cut of 2 layers exactly: only k = 2 is visited, and the two-cut plans screened there (two
    ghosts) are over the budget, so every finalist is one block; the checkpoint stores exactly the figures."""
    costs = model_costs(_loaded(6).model)  # the same weights as tiny_folder (seed 0)
    budget = costs.bound([0, 1])["params"]
    params = _params(tmp_path, "{max_ppl_ratio: 1000.0, min_retained_acc: null}", "{split_shortlist: 2}")
    out = tmp_path / "search"
    code, stdout, err = run("search", tiny_folder, "--config", params, "--target", f"params={budget}", "--out", out,
                            "--quiet")
    assert code == 0, err
    doc = json.loads((out / "search.json").read_text())
    assert doc["target"] == {"kind": "params", "value": budget, "text": f"params={budget}", "k": 2}
    assert doc["searched"] == [2] and {r["k"] for r in doc["frontier"]} == {2}
    assert any(len(c["cuts"]) == 2 for c in doc["screening"]["by_k"]["2"])  # screened, but over the budget
    assert all(len(r["cuts"]) == 1 and r["budget"]["params"] <= budget for r in doc["frontier"])
    chosen = doc["chosen"]
    assert chosen["passed"] is True and chosen["reasons"] == [] and chosen["k"] == 2
    numel, size, _ = _stored(out / "checkpoint")
    assert (chosen["budget"]["params"], chosen["budget"]["bytes"]) == (numel, size)
    printed = json.loads(stdout)
    assert printed["chosen"]["passed"] is True and printed["chosen"]["budget"]["params"] == numel
    assert "target params=" in doc["message"] and "passes the gate" in doc["message"]
    md = (out / "search.md").read_text()
    assert "the best plan within params=" in md and "| speed-up |" in md and "x1.500" in md


def test_a_target_that_fails_the_gate_still_writes_its_plan_marked_failing(tiny_folder, tmp_path, run):
    params = _params(tmp_path, "{max_ppl_ratio: 1.0, min_retained_acc: null}", "{split_shortlist: 1}")
    out = tmp_path / "search"
    code, stdout, err = run("search", tiny_folder, "--config", params, "--target", "speedup=1.5", "--out", out,
                            "--quiet")
    assert code == 1, err
    doc = json.loads((out / "search.json").read_text())
    chosen = doc["chosen"]
    assert chosen["k"] == 2 and chosen["passed"] is False and chosen["reasons"]
    assert "FAILS the gate" in doc["message"] and "perplexity ratio" in doc["message"]
    assert read_meta(out / "checkpoint").removed_layers == chosen["removed"]
    assert chosen["budget"]["speedup"] == 1.5
    assert "The chosen plan fails the gate" in (out / "search.md").read_text()
    assert json.loads(stdout)["chosen"]["passed"] is False


@pytest.mark.parametrize("target, says", [("speedup=7", "no plan meets it; reachable with this model: x1.200"),
                                          ("speedup=1.0", "dense model already meets it"),
                                          ("params=lots", "expected KIND=VALUE")])
def test_an_unreachable_or_bad_target_is_one_line(target, says, tiny_folder, tmp_path, run):
    params = _params(tmp_path, "{max_ppl_ratio: 1000.0, min_retained_acc: null}", "{}")
    code, stdout, err = run("search", tiny_folder, "--config", params, "--target", target, "--out",
                            tmp_path / "search", "--quiet")
    errors = [line for line in err.splitlines() if "error" in line]  # stderr also has the loading bar
    assert code == 2 and "Traceback" not in err and len(errors) == 1, err
    assert errors[0].startswith("ghosted: error: --target") and says in errors[0], err
    assert not (tmp_path / "search").exists()


WORDS = "cat dog sun sea hill road tree lake river stone cloud field house bird fish wind rain snow".split()


def test_search_heal_reports_healed_rows_beside_the_training_free_ones(tiny_folder, tmp_path, run, monkeypatch):
    rng = random.Random(1)
    text = tmp_path / "heal.txt"
    text.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(40)) + "." for _ in range(40)))
    other = tmp_path / "other.txt"
    other.write_text("a completely different text about nothing much.\n")
    heal = (f"heal: {{source: {text}, eval_sources: {other}, n: 12, seq_len: 32, steps: 20, eval_every: 2, "
            "lr: 3.0e-3, lora_rank: 2, holdout: 0.25, max_minutes: null}\n")
    params = _params(tmp_path, "{max_ppl_ratio: 1000.0, min_retained_acc: null}", "{finalists: 1, heal: true}", heal)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out = tmp_path / "search"
    code, _, err = run("search", tiny_folder, "--config", params, "--target", "speedup=1.5", "--out", out, "--quiet")
    assert code == 0, err
    doc = json.loads((out / "search.json").read_text())
    rows = {r["recovery"]: r for r in doc["frontier"]}
    assert set(rows) == {"ghost", "ghost+heal"} and rows["ghost"]["removed"] == rows["ghost+heal"]["removed"]
    h = rows["ghost+heal"]["heal"]
    assert h["healed"] is True and h["heldout_nll_after"] < h["heldout_nll_before"] and 1 <= h["steps_run"] <= 20
    assert rows["ghost+heal"]["heal_seconds"] > 0 and rows["ghost"].get("heal") is None
    assert rows["ghost+heal"]["budget"] == rows["ghost"]["budget"]  # healing adds no parameter
    assert doc["full_evaluations"] == 3 and doc["settings"]["heal"]["steps"] == 20
    # the healed row has the lower wiki perplexity here, so the gate's ranking picks it: its healed checkpoint
    # is the one written
    assert rows["ghost+heal"]["ppl"]["wiki"] < rows["ghost"]["ppl"]["wiki"]
    assert doc["chosen"]["recovery"] == "ghost+heal" and read_meta(out / "checkpoint").healed is True
    assert not list(scratch.iterdir())  # the healed finalists' scratch folder is gone
    md = (out / "search.md").read_text()
    assert "| ghost+heal |" in md and "(healed, " in md
    # the pipeline's solve stage writes operators: search.heal is refused there in one line, before loading
    params.write_text(params.read_text().replace("heal: true", "heal: true, enabled: true"))
    code, _, err = run("solve", tiny_folder, "--config", params, "--out", tmp_path / "ops", "--quiet")
    assert code == 2 and "search.heal" in err and "Traceback" not in err, err

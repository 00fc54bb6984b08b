"""The public Python API (ghosted.prune / evaluate / load_params / load / verify) on a real local folder: the
same checkpoint as the command line, typed results, one-line errors."""

from __future__ import annotations

import json

import pytest

import ghosted
from ghosted.errors import GhostedError

TEXT = " ".join(f"The {w} of sentence {i} is a plain word for the calibration text." for i, w in
                enumerate(["cat", "dog", "sun", "sea", "hill", "road", "tree", "lake"] * 40))


@pytest.fixture
def params_file(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    p = tmp_path / "params.yaml"
    p.write_text(f"calibration:\n  source: {text}\n  n: 6\n  seq_len: 32\nprune:\n  remove: 2\n"
                 "eval:\n  ppl: none\n  tasks: none\n")
    return p


def test_prune_through_the_api_equals_the_command_line(tiny_folder, params_file, tmp_path, run):
    params = ghosted.load_params(params_file)
    res = ghosted.prune(str(tiny_folder), params, tmp_path / "api", progress=False)
    assert isinstance(res, ghosted.PruneResult) and res.out == tmp_path / "api"
    assert len(res.removed_layers) == 2 and res.num_layers == 4 and res.recovery == "ghost"
    code, _, err = run("prune", tiny_folder, "--config", params_file, "--out", tmp_path / "cli", "-q")
    assert code == 0, err
    api_cfg = json.loads((tmp_path / "api" / "config.json").read_text())
    cli_cfg = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert api_cfg["ghosted"]["removed_layers"] == cli_cfg["ghosted"]["removed_layers"] == res.removed_layers
    from safetensors.torch import load_file

    for name in ("model.safetensors", "model.ghosted.safetensors"):
        a, b = tmp_path / "api" / name, tmp_path / "cli" / name
        if a.exists() or b.exists():
            ta, tb = load_file(str(a)), load_file(str(b))
            assert ta.keys() == tb.keys() and all(ta[k].equal(tb[k]) for k in ta)
    ghosted.verify(str(res.out))
    model = ghosted.load(str(res.out))
    assert model.config.num_hidden_layers == 4


def test_prune_params_may_be_a_path_and_bad_input_is_one_error(tiny_folder, params_file, tmp_path):
    res = ghosted.prune(str(tiny_folder), params_file, tmp_path / "p", progress=False)
    assert res.num_layers == 4
    with pytest.raises(GhostedError, match="Params"):
        ghosted.prune(str(tiny_folder), 42, tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_evaluate_through_the_api(tiny_folder):
    from ghosted.config import EvalSettings

    out = ghosted.evaluate(str(tiny_folder), EvalSettings(ppl=("passages",), ppl_windows=2, seq_len=32, tasks=()),
                           progress=False)
    assert out["ppl"]["passages"]["ppl"] > 1 and out["zeroshot"] is None

"""`ghosted eval` on a real tiny model folder: the results JSON, efficiency with a baseline, one-line errors."""

from __future__ import annotations

import json

import pytest


def test_eval_writes_results_json(tiny_folder, tmp_path, run):
    out = tmp_path / "results.json"
    code, stdout, _ = run("eval", tiny_folder, "--tasks", "piqa", "--limit", 3, "--ppl", "wiki",
                          "--ppl-windows", 2, "--seq-len", 32, "--out", out, "--quiet")
    assert code == 0
    res = json.loads(out.read_text())
    assert {"model", "ppl", "zeroshot", "seconds"} <= set(res) and "efficiency" not in res
    assert set(res["ppl"]) == {"wiki"}
    wiki = res["ppl"]["wiki"]
    assert wiki["windows"] == 2 and wiki["seq_len"] == 32 and wiki["tokens_scored"] == 2 * 31
    assert 1.0 < wiki["ppl"] < 10 * 128  # a random 128-token model: about the vocabulary size
    piqa = res["zeroshot"]["tasks"]["piqa"]
    assert piqa["n"] == 3 and 0.0 <= piqa["acc_norm"] <= 1.0
    # The hashes of what was scored (the registry logs them as dataset inputs): the windows' token ids, the items
    from transformers import AutoTokenizer

    from ghosted.corpora import load_documents, make_windows, tokens_sha256
    from ghosted.evaluation.zeroshot import default_cache_dir, items_sha256

    ids = make_windows(AutoTokenizer.from_pretrained(tiny_folder), load_documents("wiki"), 32)[:2]
    assert wiki["sha256"] == tokens_sha256(ids)
    assert piqa["sha256"] == items_sha256(default_cache_dir() / piqa["data_file"], 3) != items_sha256(
        default_cache_dir() / piqa["data_file"], 4)
    assert res["zeroshot"]["limit"] == 3 and res["seconds"] > 0
    assert res["command"].startswith("ghosted eval ") and "--tasks piqa" in res["command"]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["ppl"]["wiki"] == pytest.approx(wiki["ppl"])


def test_eval_yaml_section_and_cli_precedence(tiny_folder, tmp_path, run):
    cfg = tmp_path / "params.yaml"
    cfg.write_text("eval:\n  tasks: none\n  ppl: [wiki]\n  ppl_windows: 1\n  seq_len: 16\n")
    code, stdout, _ = run("eval", tiny_folder, "--config", cfg, "--seq-len", 24, "--quiet")
    assert code == 0
    res = json.loads(stdout)  # no --out: the whole result on stdout
    assert res["zeroshot"] is None
    assert res["ppl"]["wiki"]["windows"] == 1 and res["ppl"]["wiki"]["seq_len"] == 24  # CLI beats YAML


def test_eval_efficiency_against_baseline(tiny_folder, tmp_path, run):
    pruned = tmp_path / "pruned"
    assert run("prune", tiny_folder, "--remove", 2, "--n-seqs", 6, "--seq-len", 32, "--out", pruned,
               "--quiet")[0] == 0
    out = tmp_path / "eff.json"
    code, _, err = run("eval", pruned, "--tasks", "none", "--ppl", "none", "--baseline", tiny_folder,
                       "--prompt-len", 16, "--new-tokens", 4, "--repeats", 1, "--efficiency-batch-sizes", "1,2",
                       "--out", out, "--quiet")
    assert code == 0, err
    eff = json.loads(out.read_text())["efficiency"]
    assert eff["model"]["num_layers"] == 4 and eff["baseline"]["num_layers"] == 6
    for side in ("model", "baseline"):
        assert set(eff[side]["batches"]) == {"1", "2"}
        assert eff[side]["checkpoint_bytes"] > 0 and eff[side]["params"] > 0
        for row in eff[side]["batches"].values():
            assert row["prefill_ms"] > 0 and row["decode_tokens_per_s"] > 0
    ratios = eff["ratios"]
    assert ratios["params_ratio"] == pytest.approx(eff["model"]["params"] / eff["baseline"]["params"])
    assert ratios["params_ratio"] < 1 and ratios["checkpoint_bytes_ratio"] < 1
    assert set(ratios["batches"]) == {"1", "2"}


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "piqa,hellaswagg"], "did you mean 'hellaswag'"),
    (["--tasks", "piqa,piqa"], "names a task twice"),
    (["--limit", "0"], "--limit must be a whole number >= 1"),
    (["--ppl-windows", "0"], "--ppl-windows must be a whole number >= 1"),
    (["--ppl", "wikki"], "unknown perplexity source 'wikki'"),
    (["--tasks", "none", "--ppl", "none"], "nothing to evaluate"),
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--model", "/no/such/dir"], "not found"),
    (["--efficiency", "--baseline", "no-such-dense"], "unknown model 'no-such-dense'"),
])
def test_eval_bad_input_gives_one_line_error(argv, message, tiny_folder, tmp_path, run):
    model = str(tiny_folder)
    if "--model" in argv:
        i = argv.index("--model")
        model = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    out = tmp_path / "r.json"
    code, _, err = run("eval", model, *argv, "--out", out, "--quiet")
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("ghosted: error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()

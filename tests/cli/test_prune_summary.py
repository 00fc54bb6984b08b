"""`ghosted prune`'s summary: the checkpoint's parameters against the dense model's."""

from __future__ import annotations

import json

from transformers import AutoModelForCausalLM

from ghosted.checkpoint.format import param_counts
from tests.cli.test_cli import text_file  # noqa: F401 - the fixture


def test_summary_reports_params_against_the_dense_model(tiny_folder, text_file, tmp_path, run):  # noqa: F811
    dense = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_folder).parameters())
    out = tmp_path / "pruned"
    code, stdout, err = run("prune", tiny_folder, "--remove", 2, "--recovery", "none", "--calib-source", text_file,
                            "--n-seqs", 6, "--seq-len", 16, "--out", out, "--summary", tmp_path / "s.json", "-q")
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["params_dense"] == dense and 0 < summary["params"] < dense
    assert summary["ratio"] == round(summary["params"] / dense, 4)
    assert json.loads((tmp_path / "s.json").read_text())["params"] == summary["params"]
    counts = param_counts(out)  # the dense count a checkpoint alone gives (export): the same
    assert counts == {"params": summary["params"], "params_dense": dense}

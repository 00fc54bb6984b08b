"""The CLI: real model folders built here, one-line errors, and the shipped SmolLM2 end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

TEXT = "\n\n".join(
    f"Paragraph {i}: the quick brown fox jumps over the lazy dog, and layer pruning removes blocks. " * 3
    for i in range(60)
)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "calib.txt"
    p.write_text(TEXT)
    return p


def test_prune_local_folder_with_text_file(tiny_folder, text_file, tmp_path, run):
    out = tmp_path / "pruned"
    code, stdout, _ = run("prune", tiny_folder, "--remove", 2, "--calib-source", text_file, "--n-seqs", 6,
                           "--seq-len", 16, "--out", out, "--quiet")
    assert code == 0
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["num_layers"] == 4
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert model.config.num_hidden_layers == 4


def test_calibrate_is_deterministic_and_hashed(tiny_folder, text_file, tmp_path, run):
    hashes = []
    for name in ("a", "b"):
        code, stdout, _ = run("calibrate", tiny_folder, "--calib-source", text_file, "--n-seqs", 4,
                               "--seq-len", 16, "--seed", 3, "--out", tmp_path / name)
        assert code == 0
        hashes.append(json.loads(stdout)["sha256"])
        assert json.loads((tmp_path / name / "calibration.json").read_text())["sha256"] == hashes[-1]
    assert hashes[0] == hashes[1]


def test_score_solve_fuse_equal_prune(tiny_folder, text_file, tmp_path, run):
    args = ["--calib-source", text_file, "--n-seqs", 6, "--seq-len", 16, "--quiet"]
    assert run("calibrate", tiny_folder, *args[:-1], "--out", tmp_path / "cal")[0] == 0
    code, stdout, _ = run("score", tiny_folder, "--calib", tmp_path / "cal", "--remove", 2,
                           "--out", tmp_path / "scores.json", "--quiet")
    assert code == 0 and "angular pick" in stdout
    table = json.loads((tmp_path / "scores.json").read_text())
    assert len(table["layers"]["bi"]) == 6 and len(table["blocks"]["angular"]) == 5
    assert run("solve", tiny_folder, "--calib", tmp_path / "cal", "--remove", 2, "--out", tmp_path / "ops",
                "--quiet")[0] == 0
    assert run("fuse", tiny_folder, "--ops", tmp_path / "ops", "--out", tmp_path / "staged", "--quiet")[0] == 0
    assert run("prune", tiny_folder, "--calib", tmp_path / "cal", "--remove", 2, "--out", tmp_path / "direct",
                "--quiet")[0] == 0
    staged = json.loads((tmp_path / "staged" / "config.json").read_text())["ghosted"]  # what the registry logs
    assert staged["calibration"] == {"source": str(text_file), "n": 6, "seq_len": 16, "seed": 0}
    ids = torch.randint(4, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "staged", trust_remote_code=True).eval()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "direct", trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.allclose(a(ids).logits, b(ids).logits, atol=1e-5)


def test_layerwise_prune_equals_whole_model_prune(tiny_folder, text_file, tmp_path, run):
    """--layerwise changes where the calibration pass runs, not what comes out."""
    args = ["--remove", 2, "--calib-source", text_file, "--n-seqs", 6, "--seq-len", 16, "--quiet"]
    assert run("prune", tiny_folder, *args, "--out", tmp_path / "whole")[0] == 0
    assert run("prune", tiny_folder, *args, "--layerwise", "--out", tmp_path / "layered")[0] == 0
    a = json.loads((tmp_path / "whole" / "config.json").read_text())["ghosted"]
    b = json.loads((tmp_path / "layered" / "config.json").read_text())["ghosted"]
    assert a["removed_layers"] == b["removed_layers"]
    ids = torch.randint(4, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    ma = AutoModelForCausalLM.from_pretrained(tmp_path / "whole", trust_remote_code=True).eval()
    mb = AutoModelForCausalLM.from_pretrained(tmp_path / "layered", trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.allclose(ma(ids).logits, mb(ids).logits, atol=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["prune", "no-such-model", "--remove", "2"], "unknown model 'no-such-model'"),
    (["prune", "TINY", "--remove", "6"], "--remove must be between 1 and 5"),
    (["prune", "TINY", "--layers", "4-2"], "is reversed"),
    (["prune", "TINY", "--layers", "1-3,2"], "more than once"),
    (["prune", "TINY", "--layers", "7"], "out of range"),
    (["prune", "TINY", "--remove", "2", "--recovery", "ghots"], "did you mean 'ghost'"),
    (["prune", "TINY", "--remove", "2", "--token-policy", "sinc"], "unknown token policy 'sinc'; did you mean 'sink'"),
    (["prune", "TINY", "--remove", "2", "--calib-source", "EMPTY", "--seq-len", "16"], "is empty"),
    (["prune", "TINY", "--remove", "2", "--n-seqs", "50000"], "windows"),
    (["prune", "/no/such/dir", "--remove", "2"], "not found"),
    (["prune", "org/not-cached-model", "--remove", "2"], "HF_HUB_OFFLINE"),
    (["prune", "TINY", "--remove", "2", "--layerwise", "--device-map", "auto"], "pick one"),
])
def test_bad_input_gives_one_line_error(argv, message, tiny_folder, text_file, tmp_path, run):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    argv = [str(tiny_folder) if a == "TINY" else str(empty) if a == "EMPTY" else a for a in argv]
    if "--calib-source" not in argv:
        argv += ["--calib-source", str(text_file), "--seq-len", "16", "--n-seqs", argv[argv.index("--n-seqs") + 1]
                 if "--n-seqs" in argv else "4"]
    out = tmp_path / "out"
    code, _, err = run(*argv, "--out", out, "--quiet")
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("ghosted: error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.integration
def test_shipped_smollm2_end_to_end(tmp_path):
    """The real CLI on the real shipped model, small limits; the result loads with plain transformers."""
    out = tmp_path / "smol"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "ghosted.cli", "prune", "smollm2-135m", "--remove", "3",
                           "--n-seqs", "8", "--seq-len", "128", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["num_layers"] == 27
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 27 and cfg["ghosted"]["base_model"] == "smollm2-135m"
    assert cfg["ghosted"]["base_fingerprint"].startswith("sha256:")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()


def test_bench_reports_all_three_ratios(tiny_folder, tmp_path, run):
    out = tmp_path / "bench"
    code, stdout, _ = run("bench", tiny_folder, "--n-seqs", "4,8", "--seq-len", 16, "--remove", 2,
                           "--prompt", 8, "--new-tokens", 4, "--repeats", 1, "--out", out)
    assert code == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert [r["n_seqs"] for r in report["runs"]] == [4, 8]
    for r in report["runs"]:
        assert r["fit_over_forward"] > 0 and r["peak_over_model"] > 0 and r["capture_passes"] == 1
    assert report["speed"]["ideal_speedup"] == pytest.approx(6 / 4)
    assert "prune+fit" in stdout and out.with_suffix(".md").exists()


def test_bench_on_a_random_weight_model_of_a_config(tmp_path, run):
    """random:config.json builds that architecture with random weights (how the 8B figures are taken)."""
    from tests.tiny_models import tiny_config

    cfg = tmp_path / "config.json"
    tiny_config("qwen3", num_layers=6).to_json_file(cfg)
    out = tmp_path / "bench"
    code, stdout, err = run("bench", f"random:{cfg}", "--n-seqs", "4", "--seq-len", 16, "--remove", 2,
                             "--prompt", 8, "--new-tokens", 4, "--repeats", 1, "--out", out)
    assert code == 0, err
    report = json.loads(out.with_suffix(".json").read_text())
    first = report["runs"][0]
    assert first["layers"] == 6 and first["removed"] and first["peak_bytes"] > 0 and first["runtime_bytes"] > 0
    assert report["speed"]["ideal_speedup"] == pytest.approx(6 / 4)
    code, _, err = run("bench", "random:llama-80b", "--n-seqs", "4", "--out", tmp_path / "x")
    assert code == 2 and "unknown random model 'llama-80b'" in err and not (tmp_path / "x.json").exists()

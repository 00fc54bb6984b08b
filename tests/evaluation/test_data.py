"""Calibration windows: mixtures of text sources (A+B), their order, determinism and their errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from ghosted.corpora import build_calibration, mixture_parts
from ghosted.errors import GhostedError
from ghosted.solve.solver import heldout_windows


def _text(path, word: str, docs: int = 80) -> str:
    path.write_text("\n\n".join(f"{word} {i}: " + f"{word} says something about item {i}. " * 4 for i in range(docs)))
    return str(path)


@pytest.fixture(scope="module")
def tok(tiny_folder):
    return AutoTokenizer.from_pretrained(tiny_folder)


@pytest.fixture()
def two_files(tmp_path):
    return _text(tmp_path / "alpha.txt", "alpha"), _text(tmp_path / "beta.txt", "beta")


def test_a_mixture_interleaves_each_sources_own_windows(tok, two_files):
    a, b = two_files
    mix = build_calibration(tok, f"{a}+{b}", 7, 24, seed=3)
    alone_a = build_calibration(tok, a, 4, 24, seed=3).input_ids  # 7 = 4 + 3: the first source takes the remainder
    alone_b = build_calibration(tok, b, 3, 24, seed=3).input_ids
    expected = torch.stack([alone_a[0], alone_b[0], alone_a[1], alone_b[1], alone_a[2], alone_b[2], alone_a[3]])
    assert torch.equal(mix.input_ids, expected)
    assert mix.source == f"{a}+{b}" and mix.n == 7 and mix.seq_len == 24
    again = build_calibration(tok, f"{a}+{b}", 7, 24, seed=3)
    assert again.sha256 == mix.sha256
    assert build_calibration(tok, f"{b}+{a}", 7, 24, seed=3).sha256 != mix.sha256  # the order is part of it
    # the held-out tail (the guard's windows) holds windows of both sources
    tail = [any(torch.equal(mix.input_ids[r], w) for w in alone_a) for r in sorted(heldout_windows(mix.n, 0.5))]
    assert any(tail) and not all(tail)


def test_mixture_errors_are_one_line(tok, two_files, tmp_path):
    a, b = two_files
    for spec, words in ((f"{a}++{b}", "on each side"), (f"{a}+{a}", "twice"), ("passages+nonsense", "nonsense"),
                        (f"{a}+", "on each side")):
        with pytest.raises(GhostedError, match=words):
            build_calibration(tok, spec, 4, 24)
    with pytest.raises(GhostedError, match="at least 2"):
        build_calibration(tok, f"{a}+{b}", 1, 24)
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(GhostedError, match=f"calibration source '{short}'.*gives only 0 windows"):
        build_calibration(tok, f"{a}+{short}", 4, 24)


def test_a_file_whose_name_holds_a_plus_is_one_source(tmp_path):
    plus = _text(tmp_path / "c++notes.txt", "gamma")
    assert mixture_parts(plus) == [plus]
    assert mixture_parts("passages+ptb-train") == ["passages", "ptb-train"]
    assert mixture_parts("hf:wikitext:wikitext-2-raw-v1:train:text") == ["hf:wikitext:wikitext-2-raw-v1:train:text"]


def test_calibrate_cli_takes_the_shipped_mixture(tiny_folder, tmp_path, run):
    code, stdout, _ = run("calibrate", tiny_folder, "--calib-source", "passages+ptb-train", "--n-seqs", 4,
                           "--seq-len", 32, "--out", tmp_path / "cal")
    assert code == 0
    meta = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert meta["source"] == "passages+ptb-train" and meta["n"] == 4 and meta["sha256"] == json.loads(stdout)["sha256"]
    code, _, stderr = run("calibrate", tiny_folder, "--calib-source", "passages+", "--n-seqs", 4, "--seq-len", 32,
                          "--out", tmp_path / "bad")
    assert code != 0 and "Traceback" not in stderr and "on each side" in stderr and not (tmp_path / "bad").exists()

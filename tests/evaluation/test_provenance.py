"""The provenance block of `ghosted eval`: what was evaluated (a checkpoint's content sha256, a base model's
fingerprint) and the protocol (windows' and items' sha256, counts, lengths) with its hash; same inputs, same hashes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ghosted.checkpoint.digest import checkpoint_sha256
from ghosted.evaluation.provenance import differences, protocol, protocol_sha256, provenance

TEXT = "\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog; pruning removes layers. " * 3
                   for i in range(40))
EVAL = ("--ppl", "wiki", "--seq-len", "16", "--tasks", "piqa", "--quiet")
OLD_KEYS = {"model", "dtype", "device", "ppl", "zeroshot", "settings", "versions", "seconds", "command"}


@pytest.fixture(scope="module")
def evals(tiny_folder: Path, tmp_path_factory) -> dict[str, dict]:
    """`ghosted eval` of the tiny dense model: twice the same, once with a window more, once with an item more."""
    from ghosted.cli import main

    root = tmp_path_factory.mktemp("provenance")
    out = {}
    for key, extra in (("a", ("--ppl-windows", "2", "--limit", "2")), ("b", ("--ppl-windows", "2", "--limit", "2")),
                       ("windows", ("--ppl-windows", "3", "--limit", "2")),
                       ("items", ("--ppl-windows", "2", "--limit", "3"))):
        assert main(["eval", str(tiny_folder), *EVAL, *extra, "--out", str(root / f"{key}.json")]) == 0
        out[key] = json.loads((root / f"{key}.json").read_text())
    return out


def test_eval_json_carries_the_provenance_block(evals, tiny_folder):
    from ghosted.models import fingerprint, resolve

    doc = evals["a"]
    assert OLD_KEYS <= set(doc)  # every key the JSON had before is still there
    prov = doc["provenance"]
    assert prov["model"] == {"name": str(tiny_folder), "kind": "base", "fingerprint": fingerprint(resolve(str(tiny_folder)))}
    wiki, piqa = doc["ppl"]["wiki"], doc["zeroshot"]["tasks"]["piqa"]
    assert prov["protocol"] == {"ppl": {"wiki": {"sha256": wiki["sha256"], "windows": 2, "seq_len": 16}},
                                "zeroshot": {"num_fewshot": 0,
                                             "tasks": {"piqa": {"sha256": piqa["sha256"], "n": 2,
                                                                "version": piqa["version"]}}}}
    assert prov["protocol_sha256"] == protocol_sha256(prov["protocol"]) and len(prov["protocol_sha256"]) == 64
    assert prov["limit"] == 2 and {"ghosted", "torch", "transformers", "lm_eval"} <= set(prov["versions"])


def test_same_inputs_give_the_same_hashes_other_windows_or_items_do_not(evals):
    a, b = evals["a"]["provenance"], evals["b"]["provenance"]
    assert a == b  # model identity, protocol and its hash, versions: all the same
    windows, items = evals["windows"]["provenance"], evals["items"]["provenance"]
    assert windows["model"] == items["model"] == a["model"]
    assert len({a["protocol_sha256"], windows["protocol_sha256"], items["protocol_sha256"]}) == 3
    (ppl,) = differences(a["protocol"], windows["protocol"])
    assert ppl.startswith("ppl 'wiki': sha256 ") and "windows 2 (dense) vs 3 (pruned)" in ppl
    (task,) = differences(a["protocol"], items["protocol"], ("first", "second"))
    assert task.startswith("zero-shot task 'piqa': sha256 ") and "n 2 (first) vs 3 (second)" in task


def test_a_checkpoint_is_identified_by_its_content_hash(tiny_folder, tmp_path):
    from ghosted.cli import main

    (tmp_path / "calib.txt").write_text(TEXT)
    ckpt = tmp_path / "ckpt"
    assert main(["prune", str(tiny_folder), "--remove", "2", "--calib-source", str(tmp_path / "calib.txt"),
                 "--n-seqs", "6", "--seq-len", "16", "--quiet", "--out", str(ckpt)]) == 0
    before = checkpoint_sha256(ckpt)
    assert main(["eval", str(ckpt), "--ppl", "wiki", "--ppl-windows", "2", "--seq-len", "16", "--tasks", "none",
                 "--quiet", "--out", str(tmp_path / "pruned.json")]) == 0
    prov = json.loads((tmp_path / "pruned.json").read_text())["provenance"]
    assert prov["model"] == {"name": str(ckpt), "kind": "checkpoint", "checkpoint_sha256": before}
    assert checkpoint_sha256(ckpt) == before  # evaluating wrote nothing into the checkpoint
    assert prov["protocol"]["zeroshot"] is None and prov["limit"] is None


def test_the_limit_is_recorded_but_only_the_items_it_took_are_hashed():
    ppl = {"wiki": {"ppl": 10.0, "sha256": "a" * 64, "windows": 2, "seq_len": 16}}
    zs = {"tasks": {"piqa": {"acc": 0.5, "sha256": "b" * 64, "n": 3, "version": 1.0}}, "num_fewshot": 0}
    ident = {"name": "m", "kind": "base", "fingerprint": "sha256:0"}
    every, capped = provenance(ident, ppl, zs, None, {}), provenance(ident, ppl, zs, 5000, {})
    assert every["protocol_sha256"] == capped["protocol_sha256"] and (every["limit"], capped["limit"]) == (None, 5000)
    assert protocol(ppl, None) == {"ppl": {"wiki": {"sha256": "a" * 64, "windows": 2, "seq_len": 16}}, "zeroshot": None}
    fewshot = {**zs, "num_fewshot": 5}
    assert differences(protocol(ppl, zs), protocol(ppl, fewshot)) == ["num_fewshot 0 (dense) vs 5 (pruned)"]
    assert differences(protocol(ppl, zs), protocol({}, zs)) == ["ppl 'wiki' only in the dense metrics"]
    assert differences(protocol(ppl, zs), protocol(ppl, None)) == ["zero-shot tasks only in the dense metrics"]

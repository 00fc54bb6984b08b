"""Reliability of inputs (issue 30): every file ghosted reads, every number, every registry name and every output
path is checked before work starts, in one `ghosted: error:` line with exit code 2, no traceback, no partial
output and nothing of the user's changed; nothing is clamped silently.

BAD_INPUTS runs each bad input through the real CLI in a sandbox holding a sentinel folder of user data (the
harness of tests/test_reliability.py). The classes:
- JSON files (ghosted.json_io): malformed, huge (over the size bound), deeply nested, not UTF-8 or of the wrong
  shape, in every kind of file ghosted reads: calibration and solution folder metadata, model configs, metrics and
  compare results, a --merge source, converted-model records, .jsonl text sources, checkpoint manifests;
- numeric ranges: every numeric option above or below its stated range (ghosted.config Bounds), on the command
  line and in params.yaml, and the limits that depend on the model (hidden size, positions, layers);
- registry names (model and experiment names): empty, over-long, control characters, characters MLflow refuses;
- outputs: `search --out` follows prune's folder rules; `bench --out DIR/` writes inside DIR or refuses.

The positive cases: `compare --recovery none` alone, `search --out` over its own earlier output with --force,
`bench --out DIR/`, and the Dask sweep (--recovery none alone) with no dashboard or HTTP route listening.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from ghosted.cli import main
from tests.test_reliability import (
    BAD_INPUTS,
    CALIB_FLAGS,
    TEXT,
    Bad,
    _copy,
    _edit_json,
    _error_lines,
    _paths,
    _record,
    _sandbox,
    _then,
    _write,
    snapshot,
)
from tests.tiny_models import make_tiny

DEEP = '{"a": ' * 100 + "1" + "}" * 100  # 100 levels: over json_io.MAX_DEPTH (64)
VERY_DEEP = "[" * 100_000 + "]" * 100_000  # deep enough to crash a recursive parser
HUGE = '{"pad": "' + "x" * (5 << 20) + '"}'  # 5 MiB: over json_io.MAX_BYTES (4 MiB)
NOT_UTF8 = b'{"source": "\xff\xfe"}'

P = "prune {tiny} --calib-source {text} --n-seqs 4 --seq-len 16 --quiet --out {out}"
P2 = P + " --remove 2"
E = "eval {tiny} --ppl {text} --tasks none --ppl-windows 1 --seq-len 16 --quiet --out {sb}/r.json"
B = "bench {tiny} --n-seqs 2 --seq-len 16 --remove 1 --repeats 1 --prompt 8 --new-tokens 4 --out {sb}/bench"
S = "search {tiny} --calib {calib} --quiet"
C = ("compare {tiny} --remove 1 --recovery none --calib {calib} --ppl {text} --tasks none --ppl-windows 1 --seq-len 16 "
     "--quiet")
CAL = "prune {tiny} --calib {sb}/cal --remove 2 --quiet --out {out}"
FUSE = "fuse {tiny} --ops {sb}/ops --quiet --out {out}"
MODEL = "prune {sb}/model --calib {calib} --remove 2 --quiet --out {out}"
REG = "register {ckpt} --metrics {sb}/m.json --dense-metrics {sb}/m.json --tracking-uri sqlite:///{sb}/mlflow.db -q"
YAML_RUN = P2 + " --config {cfg}"
JSONL = P2.replace("{text}", "{sb}/t.jsonl")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A tiny 6-layer Llama folder (64 positions, hidden size 32), calibration text, a calibration folder, a solution
    folder and a checkpoint (as tests/test_reliability.py builds them)."""
    root = tmp_path_factory.mktemp("inputs-world")
    model, tok = make_tiny("llama", num_layers=6)
    model.save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    (root / "text.txt").write_text(TEXT)
    w = {"root": root, "tiny": root / "tiny", "text": root / "text.txt", "calib": root / "calib",
         "ops": root / "ops", "ckpt": root / "ckpt"}
    assert main(["calibrate", str(w["tiny"]), "--calib-source", str(w["text"]), *CALIB_FLAGS,
                 "--out", str(w["calib"])]) == 0
    assert main(["solve", str(w["tiny"]), "--calib", str(w["calib"]), "--remove", "2", "--guard", "off",
                 "--token-policy", "all", "--quiet", "--out", str(w["ops"])]) == 0
    assert main(["fuse", str(w["tiny"]), "--ops", str(w["ops"]), "--quiet", "--out", str(w["ckpt"])]) == 0
    return w


def _cal(data: str | bytes):
    return _then(_copy("calib", "cal"), _write("cal/calibration.json", data))


def _plan(data: str | bytes):
    return _then(_copy("ops", "ops"), _write("ops/plan.json", data))


def _plan_edit(fn):
    return _then(_copy("ops", "ops"), _edit_json("ops/plan.json", fn))


def _model_config(data: str | bytes):
    return _then(_copy("tiny", "model"), _write("model/config.json", data))


def _manifest(data: str | bytes):
    return _then(_copy("ckpt", "ck"), _write("ck/ghosted_manifest.json", data))


def _source_record(data: str):
    return _then(_copy("tiny", "conv"), _write("conv/ghosted_source.json", data))


def _mkdir(rel: str):
    return lambda p: (p["sb"] / rel).mkdir(parents=True)


JSON_FILES = [
    # calibration folder metadata (calibration.json)
    Bad("json-calibration-deep", "nested 100 levels deep", CAL, setup=_cal(DEEP)),
    Bad("json-calibration-very-deep-list", "nested 100000 levels deep", CAL, setup=_cal(VERY_DEEP)),
    Bad("json-calibration-huge", "byte limit", CAL, setup=_cal(HUGE)),
    Bad("json-calibration-not-utf8", "not UTF-8", CAL, setup=_cal(NOT_UTF8)),
    Bad("json-calibration-a-string", "expected a JSON object", CAL, setup=_cal('"calibration"')),
    Bad("json-calibration-empty", "not valid JSON", CAL, setup=_cal("")),
    # solution folder metadata (plan.json)
    Bad("json-plan-deep", "nested 100 levels deep", FUSE, setup=_plan(DEEP)),
    Bad("json-plan-huge", "byte limit", FUSE, setup=_plan(HUGE)),
    Bad("json-plan-a-list", "expected a JSON object", FUSE, setup=_plan("[]")),
    Bad("json-plan-operators-a-list", "'operators' must be a JSON object", FUSE,
        setup=_plan_edit(lambda d: d.update(operators=[1, 2]))),
    Bad("json-plan-removed-a-string", "'removed' must be a JSON list", FUSE,
        setup=_plan_edit(lambda d: d.update(removed="2,3"))),
    Bad("json-plan-no-meta", "it has no 'meta'", FUSE, setup=_plan_edit(lambda d: d.pop("meta") and None)),
    Bad("json-plan-number-of-5000-digits", "not valid JSON", FUSE, setup=_plan('{"removed": ' + "9" * 5000 + "}")),
    # a model folder's config.json
    Bad("json-model-config-deep", "cannot load model", MODEL, setup=_model_config(DEEP)),
    Bad("json-model-config-huge", "cannot load model", MODEL, setup=_model_config(HUGE)),
    Bad("json-model-config-very-deep", "cannot load model", MODEL, setup=_model_config(VERY_DEEP)),
    # metrics JSON (register) and compare results (report, --merge)
    Bad("json-metrics-deep", "nested 100 levels deep", REG, setup=_write("m.json", DEEP)),
    Bad("json-metrics-very-deep", "nested 100000 levels deep", REG, setup=_write("m.json", VERY_DEEP)),
    Bad("json-metrics-huge", "byte limit", REG, setup=_write("m.json", HUGE)),
    Bad("json-compare-deep", "nested 100 levels deep", "report {sb}/rep", setup=_write("rep/compare.json", DEEP)),
    Bad("json-compare-huge", "byte limit", "report {sb}/rep", setup=_write("rep/compare.json", HUGE)),
    Bad("json-compare-not-utf8", "not UTF-8", "report {sb}/rep", setup=_write("rep/compare.json", NOT_UTF8)),
    Bad("json-merge-garbage", "not valid JSON", C + " --out-dir {out} --merge {sb}/old.json",
        setup=_write("old.json", "{oops")),
    Bad("json-merge-deep", "nested 100 levels deep", C + " --out-dir {out} --merge {sb}/old.json",
        setup=_write("old.json", DEEP)),
    # the record beside a converted GGUF (ghosted_source.json)
    Bad("json-source-record-garbage", "not valid JSON", "fingerprint {sb}/conv", setup=_source_record("{oops")),
    Bad("json-source-record-no-sha256", "it has no 'sha256'", "fingerprint {sb}/conv",
        setup=_source_record('{"gguf": "x.gguf"}')),
    Bad("json-source-record-sha256-a-number", "'sha256' must be a string", "fingerprint {sb}/conv",
        setup=_source_record('{"gguf": "x.gguf", "sha256": 5}')),
    # a .jsonl text source, one document per line
    Bad("json-jsonl-deep-line", "nested 100 levels deep", JSONL, setup=_write("t.jsonl", DEEP + "\n")),
    Bad("json-jsonl-line-a-list", "each line must be an object", JSONL, setup=_write("t.jsonl", "[1, 2]\n")),
    # a checkpoint's manifest
    Bad("json-manifest-garbage", "ghosted_manifest.json", "verify {sb}/ck", setup=_manifest("{oops")),
    Bad("json-manifest-deep", "ghosted_manifest.json", "verify {sb}/ck", setup=_manifest(DEEP)),
    Bad("json-manifest-huge", "ghosted_manifest.json", "verify {sb}/ck", setup=_manifest(HUGE)),
    Bad("json-manifest-very-deep", "nested 100000 levels deep", "verify {sb}/ck", setup=_manifest(VERY_DEEP)),
    Bad("json-manifest-duplicate-key", "appears twice", "verify {sb}/ck",
        setup=_manifest('{"algorithm": "sha256", "algorithm": "md5", "files": {}}')),
    # a checkpoint's config.json, read before the checkpoint is verified (eval probes whether it is one)
    Bad("json-checkpoint-config-very-deep", "nested 100000 levels deep",
        "eval {sb}/ck --ppl {text} --tasks none --ppl-windows 1 --seq-len 16 --quiet",
        setup=_then(_copy("ckpt", "ck"), _write("ck/config.json", VERY_DEEP))),
    # an output's marker: unreadable, so the folder is not provably ghosted's and --force does not replace it
    Bad("json-output-marker-very-deep", "never replaces it",
        "solve {tiny} --calib {calib} --remove 2 --quiet --out {sb}/prev --force",
        setup=_then(_copy("ops", "prev"), _write("prev/.ghosted-output", VERY_DEEP))),
]

RANGES = [
    # calibration and prune options
    Bad("range-n-seqs-above", "--n-seqs must be a whole number >= 1 and <= 65536",
        P2.replace("--n-seqs 4", "--n-seqs 70000")),
    Bad("range-seq-len-above", "--seq-len must be a whole number >= 2 and <= 1048576",
        P2.replace("--seq-len 16", "--seq-len 2000000")),
    Bad("range-calibration-tokens", "tokens, over the limit",
        P2.replace("--n-seqs 4", "--n-seqs 60000").replace("--seq-len 16", "--seq-len 60000")),
    Bad("range-seed-above", "--seed must be a whole number >= 0 and <= 4294967295", P2 + " --seed 4294967296"),
    Bad("range-remove-huge", "--remove must be a whole number >= 1 and <= 4096", P + " --remove 1000000000000"),
    Bad("range-rank-huge", "--rank must be a whole number >= 1 and <= 65536", P2 + " --rank 100000000000000000000"),
    Bad("range-rank-above-hidden-size", "above this model's hidden size 32", P2 + " --rank 33"),
    Bad("range-shortlist-huge", "--shortlist must be", P2 + " --shortlist 5000"),
    Bad("range-batch-size-huge", "--batch-size must be", P2 + " --batch-size 5000"),
    Bad("range-distill-huge", "--distill must be", P2 + " --distill 2000000"),
    Bad("range-distill-lr-zero", "--distill-lr (prune.distill_lr) must be in (0, 1]", P2 + " --distill-lr 0"),
    Bad("range-distill-lr-above-one", "--distill-lr (prune.distill_lr) must be in (0, 1]", P2 + " --distill-lr 2"),
    Bad("range-ridge-grid-17-values", "1 to 16 of them", P2 + " --ridge-grid " + ",".join(["0.1"] * 17)),
    Bad("range-offload-budget-negative", "--offload-budget", P2 + " --layerwise --offload-budget=-1"),
    Bad("range-offload-budget-huge", "--offload-budget", P2 + " --layerwise --offload-budget 99999999999999"),
    Bad("range-calib-flag-ignored-with-calib", "brings them ready-made",
        "prune {tiny} --calib {calib} --remove 2 --n-seqs 8 --quiet --out {out}"),
    # evaluation
    Bad("range-eval-limit-10e12", "--limit must be a whole number >= 1 and <= 1000000000", E + " --limit 1000000000000"),
    Bad("range-eval-limit-10e21", "--limit must be", E + " --limit 1000000000000000000000"),
    Bad("range-eval-ppl-windows-huge", "--ppl-windows must be", E.replace("--ppl-windows 1", "--ppl-windows 70000")),
    Bad("range-eval-batch-size-huge", "--batch-size must be", E + " --batch-size 5000"),
    Bad("range-eval-seq-len-huge", "--seq-len must be", E.replace("--seq-len 16", "--seq-len 2000000")),
    Bad("range-eval-repeats-huge", "--repeats must be", E + " --efficiency --repeats 1001"),
    Bad("range-eval-new-tokens-huge", "--new-tokens must be", E + " --efficiency --new-tokens 70000"),
    Bad("range-eval-prompt-len-huge", "--prompt-len must be", E + " --efficiency --prompt-len 2000000"),
    Bad("range-eval-efficiency-batch-size-zero", "needs values >= 1 and <= 4096",
        E + " --efficiency --efficiency-batch-sizes 0"),
    Bad("range-eval-efficiency-17-batch-sizes", "needs 1 to 16 batch sizes",
        E + " --efficiency --efficiency-batch-sizes " + ",".join(["1"] * 17)),
    # search and compare
    Bad("range-search-finalists-huge", "--finalists must be", S + " --finalists 65 --out {sb}/s"),
    Bad("range-search-max-cuts-3", "--max-cuts must be", S + " --max-cuts 3 --out {sb}/s"),
    Bad("range-search-split-shortlist-negative", "--split-shortlist must be", S + " --split-shortlist=-1 --out {sb}/s"),
    Bad("range-search-min-remove-zero", "--min-remove must be", S + " --min-remove 0 --out {sb}/s"),
    Bad("range-search-max-remove-huge", "--max-remove must be", S + " --max-remove 5000 --out {sb}/s"),
    Bad("range-search-distill-negative", "--distill must be", S + " --distill=-1 --out {sb}/s"),
    Bad("range-compare-remove-huge", "--remove takes whole numbers >= 1 and <= 4096",
        C.replace("--remove 1", "--remove 5000") + " --out-dir {out}"),
    Bad("range-compare-65-counts", "--remove needs 1 to 64 layer counts",
        C.replace("--remove 1", "--remove " + ",".join(str(k) for k in range(1, 66))) + " --out-dir {out}"),
    # bench
    Bad("range-bench-seq-len-huge", "--seq-len must be", B.replace("--seq-len 16", "--seq-len 2000000")),
    Bad("range-bench-repeats-huge", "--repeats must be", B.replace("--repeats 1", "--repeats 1001")),
    Bad("range-bench-n-seqs-huge", "--n-seqs values must be", B.replace("--n-seqs 2", "--n-seqs 70000")),
    Bad("range-bench-17-sizes", "--n-seqs takes 1 to 16 sizes", B.replace("--n-seqs 2", "--n-seqs " + ",".join(["2"] * 17))),
    Bad("range-bench-batch-size-huge", "--batch-size must be", B + " --batch-size 5000"),
    Bad("range-bench-remove-every-layer", "--remove must be between 1 and 5", B.replace("--remove 1", "--remove 6")),
    Bad("range-bench-seq-len-beyond-positions", "longer than the model's 64 positions",
        B.replace("--seq-len 16", "--seq-len 100")),
    Bad("range-bench-prompt-beyond-positions", "--prompt + --new-tokens 70 is longer than the model's 64 positions",
        B.replace("--prompt 8", "--prompt 60").replace("--new-tokens 4", "--new-tokens 10")),
    # params.yaml
    Bad("range-yaml-gate-ppl-ratio-huge", "gate.max_ppl_ratio must be in (0, 1000]", YAML_RUN,
        yaml="gate:\n  max_ppl_ratio: 5000\n"),
    Bad("range-yaml-gate-retained-3", "gate.min_retained_acc must be in (0, 2]", YAML_RUN,
        yaml="gate:\n  min_retained_acc: 3\n"),
    Bad("range-yaml-sweep-workers-huge", "sweep.workers must be a whole number >= 1 and <= 1024", YAML_RUN,
        yaml="sweep:\n  workers: 5000\n"),
    Bad("range-yaml-sweep-threads-zero", "sweep.threads_per_worker must be", YAML_RUN,
        yaml="sweep:\n  threads_per_worker: 0\n"),
    Bad("range-yaml-sweep-65-counts", "sweep.remove needs 1 to 64", YAML_RUN,
        yaml="sweep:\n  remove: [" + ", ".join(str(k) for k in range(1, 66)) + "]\n"),
    Bad("range-yaml-sweep-recovery-empty", "sweep.recovery needs at least one recovery method", YAML_RUN,
        yaml="sweep:\n  recovery: []\n"),
    Bad("range-yaml-search-max-cuts", "--max-cuts must be", YAML_RUN, yaml="search:\n  max_cuts: 3\n"),
    Bad("range-yaml-calibration-seed-huge", "--seed must be", YAML_RUN.replace(" --n-seqs 4", ""),
        yaml="calibration:\n  seed: 8589934592\n"),
    Bad("range-yaml-eval-limit-huge", "--limit must be", YAML_RUN, yaml="eval:\n  limit: 1000000000000\n"),
    Bad("range-yaml-efficiency-repeats-huge", "--repeats must be", YAML_RUN, yaml="efficiency:\n  repeats: 1001\n"),
    Bad("range-yaml-prune-distill-lr", "must be in (0, 1]", YAML_RUN, yaml="prune:\n  distill_lr: 5\n"),
]

NAMES = [
    Bad("name-experiment-empty", "registry.experiment must be a non-empty name", YAML_RUN,
        yaml="registry:\n  experiment: ''\n"),
    Bad("name-experiment-control-character", "control character", YAML_RUN,
        yaml='registry:\n  experiment: "ghost\\aed"\n'),
    Bad("name-experiment-over-long", "over the limit of 200", YAML_RUN, yaml=f"registry:\n  experiment: {'x' * 300}\n"),
    Bad("name-experiment-slash", "a name holds letters", YAML_RUN, yaml="registry:\n  experiment: a/b\n"),
    Bad("name-model-colon", "a name holds letters", YAML_RUN, yaml="registry:\n  name: 'models:x'\n"),
    Bad("name-model-quote", "a name holds letters", YAML_RUN, yaml="registry:\n  name: \"it's\"\n"),
    Bad("name-model-newline", "control character", YAML_RUN, yaml='registry:\n  name: "a\\nb"\n'),
    Bad("name-model-trailing-space", "does not end in a space", YAML_RUN, yaml="registry:\n  name: 'ghosted '\n"),
    Bad("name-model-a-number", "registry.name = 5", YAML_RUN, yaml="registry:\n  name: 5\n"),
    Bad("name-cli-empty", "must be a non-empty name", REG + " --name=", setup=_write("m.json", "{}")),
    Bad("name-cli-escape", "control character", REG + " --name=bad\x1bname", setup=_write("m.json", "{}")),
    Bad("name-cli-over-long", "over the limit of 200", REG + " --name=" + "n" * 201, setup=_write("m.json", "{}")),
]

OUTPUTS = [
    Bad("out-search-user-folder", "ghosted did not write", S + " --out {sent}"),
    Bad("out-search-earlier-output-without-force", "pass --force to replace it", S + " --out {sb}/prev",
        setup=_copy("ckpt", "prev")),
    Bad("out-search-is-a-file", "exists and is not a folder", S + " --out {file}"),
    Bad("out-search-under-a-file", "is a file, not a folder", S + " --out {file}/s"),
    Bad("out-bench-folder-under-a-file", "is a file, not a folder", B.replace("{sb}/bench", "{file}/")),
    Bad("out-bench-folder-slash-json-is-a-folder", "is a folder", B.replace("{sb}/bench", "{sb}/d/"),
        setup=_mkdir("d/bench.json")),
    Bad("out-bench-existing-folder-json-is-a-folder", "is a folder", B.replace("{sb}/bench", "{sb}/d"),
        setup=_mkdir("d/bench.json")),
]

CASES = JSON_FILES + RANGES + NAMES + OUTPUTS


def test_case_table():
    """At least 60 distinct bad inputs, ids unique here and apart from tests/test_reliability.py's."""
    ids = [c.id for c in CASES]
    assert len(ids) >= 60 and len(set(ids)) == len(ids)
    assert not set(ids) & {c.id for c in BAD_INPUTS}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_one_line_and_leaves_nothing(case: Bad, world, tmp_path, capsys):
    sb = _sandbox(tmp_path)
    p = _paths(world, sb)
    if case.yaml is not None:
        p["cfg"].write_bytes(case.yaml.encode() if isinstance(case.yaml, str) else case.yaml)
    if case.setup is not None:
        case.setup(p)
    before, world_before = snapshot(sb), snapshot(world["root"])
    capsys.readouterr()
    argv = case.argv.format(**{k: str(v) for k, v in p.items()}).split(" ")
    code = main([a for a in argv if a])
    out, err = capsys.readouterr()
    tb = "Traceback" in err or "Traceback" in out
    lines = _error_lines(err)
    after, world_after = snapshot(sb), snapshot(world["root"])
    partial = sorted(set(after) - set(before))
    lost = sorted(k for k in before if after.get(k) != before[k]) + sorted(
        k for k in world_before if world_after.get(k) != world_before[k])
    _record("bad", case.id, f"[{case.kind}] {case.describe()[:300]}", exit=code,
            error=lines[0] if lines else err.strip()[:300], one_line=len(lines) == 1, traceback=tb, partial=partial,
            lost=lost)
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and case.expect in lines[0], err[-2000:]
    assert len(lines[0]) < 1000 and not tb
    assert not partial, f"left behind: {partial}"
    assert not lost, f"changed or deleted: {lost}"


# --------------------------------------------------------------------------- the readers and ranges themselves


def test_json_reader_bounds(tmp_path):
    from ghosted.errors import GhostedError
    from ghosted.json_io import MAX_DEPTH, index_shards, parse_json, read_json

    assert parse_json('{"a": "[[[[{{{{"}', expect=dict) == {"a": "[[[[{{{{"}  # brackets in strings do not count
    assert parse_json("[" * MAX_DEPTH + "]" * MAX_DEPTH) is not None
    with pytest.raises(GhostedError, match="nested 65 levels"):
        parse_json("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))
    with pytest.raises(ValueError):  # a JSONFileError is also a ValueError: `except ValueError` callers still work
        parse_json("{oops")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors",
                                                "c": "model-1.safetensors"}}))
    assert index_shards(index) == ["model-1.safetensors", "model-2.safetensors"]
    for weight_map in ({"a": "../../etc/passwd"}, {"a": "/abs.safetensors"}, {"a": 5}, {}, [1]):
        index.write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(GhostedError, match="weight index") as exc:
            index_shards(index)
        assert "\n" not in str(exc.value)
    with pytest.raises(GhostedError, match="not found"):
        read_json(tmp_path / "missing.json")


def test_a_deep_safetensors_header_is_one_line(tmp_path):
    """verify reads safetensors headers itself: a deeply nested one was an unexpected RecursionError."""
    from ghosted.checkpoint.verify_tensors import read_header
    from ghosted.errors import GhostedError

    raw = VERY_DEEP.encode()
    (tmp_path / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw)
    with pytest.raises(GhostedError, match="nested 100000 levels deep") as exc:
        read_header(tmp_path / "model.safetensors")
    assert "\n" not in str(exc.value)


def test_every_numeric_option_states_its_range():
    """Each number of every config section declares Bounds: checked before work, and stated in its --help."""
    import types
    import typing
    from dataclasses import fields

    from ghosted.config import SECTIONS, CompareConfig, flag_of

    def numeric(hint) -> bool:
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            return len(args) == 1 and numeric(args[0])
        if typing.get_origin(hint) is tuple:
            return numeric(typing.get_args(hint)[0])
        return hint in (int, float)

    checked = 0
    for cls in [*SECTIONS.values(), CompareConfig]:
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if numeric(hints[f.name]) and f.name != "ks":  # compare's --remove list: checked in CompareConfig
                assert flag_of(f).bounds is not None, f"{cls.__name__}.{f.name} states no range"
                checked += 1
    assert checked >= 30


def test_help_states_the_ranges(capsys):
    assert main(["prune", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "allowed 1 to 65536" in text and "allowed 0 to 1073741824" in text and "hidden size" in text
    assert main(["eval", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "allowed 1 to 1000000000" in text and "evaluated whole" in text


def test_sweep_and_compare_take_recovery_none_alone():
    from flows.sweep import sweep_settings
    from ghosted.config import CompareConfig, PruneConfig

    params = {"prune": {"remove": 2}}
    for recovery in ("none", ["none"]):
        assert sweep_settings({**params, "sweep": {"recovery": recovery}})["recovery"] == ["none"]
    cfg = CompareConfig(ks=(1,), methods="none", prune=PruneConfig(remove=1))
    assert cfg.methods == ("none",) and cfg.cells() == [(1, "none")]


def test_sweep_flags_are_checked_not_replaced():
    """--workers 0 was silently the file's value; now it is refused like sweep.workers: 0."""
    from flows.sweep import sweep_settings
    from ghosted.errors import GhostedError

    params = {"prune": {"remove": 2}, "sweep": {"workers": 3}}
    assert sweep_settings(params, workers=None)["workers"] == 3
    assert sweep_settings(params, workers=1)["workers"] == 1
    with pytest.raises(GhostedError, match="sweep.workers must be"):
        sweep_settings(params, workers=0)


def test_recompress_serve_refuses_in_one_line_without_a_server(monkeypatch, capsys):
    from flows import recompress

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(recompress, "serve", lambda *a, **k: pytest.fail("served without a server"))
    assert recompress.main(["--serve", "--interval", "60"]) == 2
    err = capsys.readouterr().err
    assert len(_error_lines(err)) == 1 and "PREFECT_API_URL" in err and "Traceback" not in err
    for bad in ("inf", "nan", "1e308", "0"):
        with pytest.raises(SystemExit):
            recompress.main(["--serve", "--interval", bad])
        assert "--interval must be" in capsys.readouterr().err


# --------------------------------------------------------------------------- positive cases


def test_compare_with_recovery_none_alone_compares_dense_and_plain_removal(world, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = C.format(tiny=world["tiny"], calib=world["calib"], text=world["text"]).split() + ["--out-dir", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    doc = json.loads((out / "compare.json").read_text())
    assert doc["dense"]["method"] == "dense"
    assert [(c["k"], c["method"]) for c in doc["cells"]] == [(1, "none")]
    assert "error" not in doc["cells"][0] and doc["cells"][0]["ppl"]


def test_search_out_follows_prunes_folder_rules(world, tmp_path, capsys):
    """An earlier search output is replaced with --force (refused without it); a user folder never."""
    cfg = tmp_path / "params.yaml"
    cfg.write_text("prune: {select: angular, recovery: ghost}\n"
                   f"eval: {{ppl: {world['text']}, ppl_windows: 1, seq_len: 16, tasks: none}}\n"
                   f"gate: {{max_ppl_ratio: 1000.0, min_retained_acc: null, rank_by: {world['text']}}}\n"
                   "search: {min_remove: 1, max_remove: 2, split_shortlist: 0, finalists: 1}\n")
    out = tmp_path / "s"
    argv = ["search", str(world["tiny"]), "--calib", str(world["calib"]), "--config", str(cfg), "--quiet",
            "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    assert main(argv) == 2 and "pass --force" in capsys.readouterr().err
    (out / "search.md").unlink()  # the earlier output, less one of its files: still ghosted's to replace
    assert main([*argv, "--force"]) == 0, capsys.readouterr().err
    assert {p.name for p in out.iterdir()} >= {"search.json", "search.md", "checkpoint"}  # the new output
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_bench_out_folder_writes_inside_it(world, tmp_path, capsys):
    from ghosted.cli.bench_cmd import bench_out

    (tmp_path / "there").mkdir()
    assert bench_out(f"{tmp_path}/new/") == tmp_path / "new" / "bench.json"
    assert bench_out(str(tmp_path / "there")) == tmp_path / "there" / "bench.json"
    assert bench_out(str(tmp_path / "b")) == tmp_path / "b.json"
    assert bench_out(str(tmp_path / "b.v2")) == tmp_path / "b.v2.json"  # a dot in the name is kept
    assert bench_out(str(tmp_path / "b.md")) == tmp_path / "b.json"
    argv = B.format(tiny=world["tiny"], sb=tmp_path).replace(f"{tmp_path}/bench", f"{tmp_path}/new/").split()
    assert main(argv) == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["bench.json", "bench.md"]
    assert json.loads((tmp_path / "new" / "bench.json").read_text())["runs"]


def _listening(pids: set[int]) -> set[tuple[str, int]]:
    import psutil

    return {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("inet")
            if c.status == "LISTEN" and c.pid in pids}


def _http_status(ip: str, port: int, path: str) -> int | None:
    """The HTTP status a server answers for `path` (None: not an HTTP server, e.g. a Dask comm port)."""
    try:
        with urllib.request.urlopen(f"http://{ip}:{port}{path}", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except Exception:  # noqa: BLE001 - a Dask comm port does not speak HTTP
        return None


def test_dask_sweep_with_recovery_none_alone_opens_no_dashboard(tmp_path):
    """The sweep on a local Dask cluster (worker processes) with --recovery none alone: the dense model and plain
    removal; while it runs no process of it listens on 8787 and no HTTP server answers any dashboard, /info,
    /metrics or /health page (the README: the dashboard is off)."""
    pytest.importorskip("prefect_dask")
    psutil = pytest.importorskip("psutil")
    import yaml
    from prefect.testing.utilities import prefect_test_harness

    from flows import sweep as sweep_mod

    model, tok = make_tiny("llama", num_layers=4)
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog. " * 3 for i in range(40)))
    ev = {"ppl": str(text), "ppl_windows": 1, "seq_len": 16, "tasks": "none", "batch_size": 4}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "model": str(tmp_path / "tiny"), "calibration": {"source": str(text), "n": 4, "seq_len": 16},
        "prune": {"remove": 1, "guard": "off", "token_policy": "all"}, "eval": ev,
        "sweep": {"remove": [1], "recovery": ["none"], "workers": 1, "threads_per_worker": 1, "eval": ev}}))
    seen: dict[tuple[str, int], dict[str, int | None]] = {}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            me = psutil.Process()
            pids = {me.pid} | {c.pid for c in me.children(recursive=True)}
            for ip, port in _listening(pids) - set(seen):
                seen[(ip, port)] = {path: _http_status(ip, port, path)
                                    for path in ("/status", "/info/main/workers.html", "/metrics", "/health")}
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    with prefect_test_harness(server_startup_timeout=600):
        server_ports = _listening({psutil.Process().pid} | {c.pid for c in psutil.Process().children(recursive=True)})
        watcher.start()
        try:
            res = sweep_mod.run(str(params), str(tmp_path / "work"))
        finally:
            done.set()
            watcher.join()
    assert res["runner"].startswith("dask local cluster, 1 workers")
    assert [(c["k"], c["method"]) for c in res["cells"]] == [(1, "none")] and res["dense"]["method"] == "dense"
    cluster = {addr: codes for addr, codes in seen.items() if addr not in server_ports}
    assert cluster, "the watcher saw no port of the Dask cluster"
    assert all(port != 8787 for _, port in cluster), cluster
    served = {addr: codes for addr, codes in cluster.items() if any(c is not None and c < 400 for c in codes.values())}
    assert not served, f"HTTP pages served by the Dask cluster: {served}"
    assert all(ip in ("127.0.0.1", "::1") for ip, _ in cluster), cluster


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-n", "0", *sys.argv[1:]]))

"""The one YAML reader (ghosted.config.yaml_io) bounds size, depth, node count and aliases, refuses duplicate keys,
and every config error quotes a short prefix of a bad value: one line, whatever the file holds."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ghosted.config import PruneConfig, build, load_params, load_yaml
from ghosted.config.yaml_io import MAX_BYTES, MAX_DEPTH, MAX_NODES
from ghosted.errors import GhostedError, brief

REPO = Path(__file__).resolve().parents[2]

# "billion laughs": 9 levels of 9 aliases each, 9**9 (387 million) strings once expanded, about 350 bytes
BOMB = "a: &a [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n" + "".join(
    f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi")) + "prune: *i\n"


@pytest.fixture(params=["libyaml", "pure-python"])
def loader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both of PyYAML's loaders: the C one where libyaml is built in, the pure-Python fallback."""
    import yaml

    if request.param == "pure-python":
        monkeypatch.delattr(yaml, "CSafeLoader", raising=False)
    elif not hasattr(yaml, "CSafeLoader"):
        pytest.skip("PyYAML without libyaml")
    return request.param


def _write(tmp_path: Path, text: str | bytes, name: str = "params.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def _refused(path: Path, expect: str) -> str:
    with pytest.raises(GhostedError) as info:
        load_params(path)
    msg = str(info.value)
    assert expect in msg and str(path) in msg and "\n" not in msg and len(msg) < 300, msg
    return msg


def test_alias_bomb_is_refused_fast_in_one_short_line_by_the_cli(run, tmp_path: Path) -> None:
    bomb = _write(tmp_path, BOMB, "bomb.yaml")
    assert len(BOMB) < 400
    start = time.perf_counter()
    code, out, err = run("prune", "tiny", "--config", bomb, "--out", tmp_path / "x")
    took = time.perf_counter() - start
    assert code == 2, err
    assert err.count("\n") == 1 and len(err) < 300, err
    assert "more than 10000 keys and values, aliases expanded" in err and "bomb.yaml" in err
    assert took < 1.0, f"{took:.2f} s"
    assert not (tmp_path / "x").exists()


def test_alias_bomb_is_refused_by_both_loaders(loader: str, tmp_path: Path) -> None:
    start = time.perf_counter()
    _refused(_write(tmp_path, BOMB), "more than 10000 keys and values, aliases expanded")
    assert time.perf_counter() - start < 1.0


def test_an_ordinary_alias_loads(loader: str, tmp_path: Path) -> None:
    # what yaml.safe_dump writes for a repeated block: the alias stands for a small value, within every bound
    params = load_params(_write(tmp_path, "eval: &e\n  ppl: wiki\n  tasks: ''\nsweep:\n  eval: *e\n"))
    assert params.sweep.eval.ppl == ("wiki",)
    assert load_params(_write(tmp_path, "prune:\n  remove: &two 2\n  shortlist: *two\n")).prune.shortlist == 2


def test_an_alias_counts_its_whole_value_toward_the_depth_bound(loader: str, tmp_path: Path) -> None:
    deep = "prune:\n  remove: 2\nx: &a [[[[[[[[[[1]]]]]]]]]]\ny: [[[[[[[[[[[[*a]]]]]]]]]]]]\n"
    _refused(_write(tmp_path, deep), "nested deeper than 20 levels, aliases expanded")


def test_anchors_alone_still_load(loader: str, tmp_path: Path) -> None:
    assert load_params(_write(tmp_path, "prune: &p\n  remove: 2\n")).prune.remove == 2


@pytest.mark.parametrize(("text", "expect"), [
    ("prune:\n  remove: 2\n  recovery: ghost\n  remove: 3\n",
     "duplicate key 'remove' in prune: (line 4; first at line 2)"),
    ("prune:\n  remove: 2\ncalibration: {}\nprune:\n  remove: 3\n",
     "duplicate key 'prune' in the top level (line 4; first at line 1)"),
    ("prune: {remove: 2, remove: 3}\n", "duplicate key 'remove' in prune:"),
    ("eval:\n  tasks: none\n  ppl: wiki\n  ppl: ptb\n", "duplicate key 'ppl' in eval: (line 4; first at line 3)"),
    ("prune:\n  ridge_grid: [{a: 1, a: 2}]\n", "duplicate key 'a' in prune.ridge_grid[0]:"),
])
def test_duplicate_keys_are_refused_naming_the_key_and_section(loader: str, tmp_path: Path, text: str,
                                                                expect: str) -> None:
    _refused(_write(tmp_path, text), expect)


def test_duplicate_key_through_the_cli(run, tmp_path: Path) -> None:
    cfg = _write(tmp_path, "prune:\n  remove: 2\n  remove: 3\n")
    code, _, err = run("prune", "tiny", "--config", cfg, "--out", tmp_path / "x")
    assert code == 2 and err.count("\n") == 1 and "duplicate key 'remove' in prune: (line 3" in err, err


def test_an_over_large_file_is_refused_before_parsing(tmp_path: Path) -> None:
    big = _write(tmp_path, "prune:\n  remove: 2\n# " + "x" * MAX_BYTES + "\n")
    start = time.perf_counter()
    _refused(big, f"over the {MAX_BYTES} byte limit for a params file")
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("levels", [MAX_DEPTH + 1, 100_000])
def test_deep_nesting_is_refused(loader: str, tmp_path: Path, levels: int) -> None:
    deep = _write(tmp_path, "prune:\n  remove: " + "[" * levels + "]" * levels + "\n")
    msg = _refused(deep, "nest")  # ours ("nested deeper than 20 levels") or libyaml's own ("maximum nesting depth")
    if levels == MAX_DEPTH + 1:
        assert f"nested deeper than {MAX_DEPTH} levels (line 2)" in msg


def test_nesting_within_the_bound_loads(loader: str, tmp_path: Path) -> None:
    levels = MAX_DEPTH - 2  # the file's mapping and the section take two levels
    assert load_yaml(_write(tmp_path, "prune:\n  x: " + "[" * levels + "]" * levels + "\n")) is not None


def test_too_many_values_are_refused(loader: str, tmp_path: Path) -> None:
    many = _write(tmp_path, "prune:\n  ridge_grid: [" + ", ".join(["1"] * MAX_NODES) + "]\n")
    _refused(many, f"more than {MAX_NODES} keys and values")


@pytest.mark.parametrize(("text", "expect"), [
    ("prune:\n  remove: [1, 2\n", "not valid YAML:"),
    ("prune:\n\tremove: 2\n", "not valid YAML:"),
    (b"prune:\n  remove: \xff\xfe2\n", "cannot read the config file (not UTF-8 text: byte 17 is 0xff)"),
    ("prune:\n  remove: \x00\n", "not valid YAML:"),
    ("prune: !!python/object:os.system {}\n", "not valid YAML: could not determine a constructor"),
    ("prune: {}\n---\nprune: {}\n", "not valid YAML:"),
])
def test_malformed_yaml_is_one_short_line(loader: str, tmp_path: Path, text: str | bytes, expect: str) -> None:
    _refused(_write(tmp_path, text), expect)


def test_a_10_mb_value_in_a_wrong_type_position_is_quoted_briefly() -> None:
    huge = "x" * 10_000_000
    start = time.perf_counter()
    with pytest.raises(GhostedError) as info:
        build(PruneConfig, {"remove": huge}, "prune")
    msg = str(info.value)
    assert msg.startswith("prune.remove = 'xxx") and "...: expected a whole number" in msg and len(msg) < 300, msg
    with pytest.raises(GhostedError) as info:
        build(PruneConfig, {"remove": 2, "ridge_grid": [huge]}, "prune")
    assert len(str(info.value)) < 300
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(("text", "expect"), [
    ("prune:\n  remove: {big}\n", "prune.remove = 'xxx"),  # a wrong type
    ("prune:\n  remove: 2\n  recovery: {big}\n", "unknown recovery method 'xxx"),  # a string, but no such name
    ("prune:\n  ? {big}\n  : 2\n", "unknown prune option 'xxx"),  # `? key` (a plain key stops at 1024 chars)
    ("? {big}\n: {remove: 2}\n", "unknown section 'xxx"),
    ("model: [{big}]\n", "model = ['xxx"),
    ("eval:\n  ppl: {big}\n", "unknown perplexity source 'xxx"),
])
def test_big_values_in_a_file_give_short_errors_through_the_cli(run, tmp_path: Path, text: str, expect: str) -> None:
    cfg = _write(tmp_path, text.replace("{big}", "x" * 900_000))  # under the size bound: it parses
    code, _, err = run("prune", "tiny", "--config", cfg, "--out", tmp_path / "x")
    assert code == 2 and err.count("\n") == 1 and expect in err, err[:400]
    # the value is quoted as a short prefix (an unknown option's line also lists every known option)
    assert "x" * 100 not in err and len(err.replace(str(cfg), "")) < 400, err[:600]


def test_a_10_mb_file_through_the_cli_is_one_short_line(run, tmp_path: Path) -> None:
    cfg = _write(tmp_path, "prune:\n  remove: " + "x" * 10_000_000 + "\n")
    code, _, err = run("prune", "tiny", "--config", cfg, "--out", tmp_path / "x")
    assert code == 2 and err.count("\n") == 1 and len(err) < 300 and "byte limit" in err, err[:400]


def test_brief_quotes_short_values_as_repr_and_cuts_long_ones() -> None:
    for v in ("two", True, None, 2.5, [1, 2], {"a": 1}, (1,)):
        assert brief(v) == repr(v)
    cut = brief("x" * 10_000_000)
    assert cut.startswith("'xxx") and cut.endswith("...") and len(cut) == 80
    nested = [[list(range(10_000))] * 10_000] * 10_000  # 10**12 items if walked
    assert len(brief(nested)) <= 80 and len(brief(nested, limit=20)) <= 20
    assert brief("a\nb") == "'a\\nb'"  # one line


def test_the_committed_params_file_still_loads(loader: str) -> None:
    params = load_params(REPO / "params.yaml")
    assert params.path == REPO / "params.yaml"
    assert load_yaml(REPO / "dvc.yaml")["stages"]  # the pipeline file is within every bound too

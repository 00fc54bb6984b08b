"""`ghosted compare`: one shared capture, in-memory cells that match saved checkpoints, the report files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ghosted.cli import main
from ghosted.config import EvalSettings
from ghosted.corpora import build_calibration
from ghosted.errors import GhostedError
from ghosted.io_temps import MARKER, read_marker
from ghosted.models import load_model
from ghosted.reporting.compare_report import PLOTS, write_report
from ghosted.solve.compare import CompareConfig, run_compare
from ghosted.solve.solver import PruneConfig

GRID = ["--remove", "1,2", "--recovery", "none,ghost", "--tasks", "piqa", "--limit", "2", "--ppl", "wiki",
        "--ppl-windows", "2", "--seq-len", "32", "--n-seqs", "6"]


@pytest.fixture(scope="module")
def report_dir(tiny_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reports") / "reports"
    code = main(["compare", str(tiny_folder), *GRID, "--out-dir", str(out), "--quiet"])
    assert code == 0
    return out


def test_compare_writes_report(report_dir):
    assert sorted(p.name for p in report_dir.iterdir()) == sorted([MARKER, "compare.json", "compare.md", *PLOTS])
    assert sorted(read_marker(report_dir)["files"]) == sorted(["compare.json", "compare.md", *PLOTS])
    for png in PLOTS:
        assert (report_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((report_dir / "compare.json").read_text())
    assert [(c["k"], c["method"]) for c in res["cells"]] == [(1, "none"), (1, "ghost"), (2, "none"), (2, "ghost")]
    assert all("error" not in c for c in res["cells"])
    assert res["dense"]["ppl"]["wiki"]["windows"] == 2 and res["dense"]["zeroshot"]["tasks"]["piqa"]["n"] == 2
    assert res["wall_seconds"] >= res["seconds"] > 0
    assert res["capture"]["pairs"] == 6 + 5  # every block of 1 and of 2 layers, from one pass
    assert all(c["capture_passes"] == 0 for c in res["cells"])  # every cell solved from the shared capture
    assert len(res["scores"]["layers"]["bi"]) == 6 and set(res["scores"]["blocks"]) == {"1", "2"}
    for c in res["cells"]:
        assert len(c["removed"]) == c["k"]
        assert c["retained"] == pytest.approx(c["zeroshot"]["average"]["acc_norm"] / res["dense"]["average"])
    md = (report_dir / "compare.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert table[0].split(" | ")[:6] == ["| k", "method", "removed layers", "wiki PPL", "piqa", "average"]
    assert "retained" in table[0] and len(table) == 1 + 1 + 4  # header, dense, 4 cells
    assert "Wall time:" in md and "ghosted compare " in md and "--remove 1,2" in md
    assert "Items per task: piqa 2; one task's standard error (dense): " in md  # 2 of 1838: not "(all)"
    for png in PLOTS:
        assert f"]({png})" in md
    # regenerating from the JSON gives the same markdown
    assert main(["report", str(report_dir)]) == 0
    assert (report_dir / "compare.md").read_text() == md


def test_in_memory_cells_match_saved_checkpoints(report_dir, tiny_folder, tmp_path, run):
    """The ghost cells' perplexity equals `ghosted prune` + `ghosted eval` of the saved model, same settings."""
    res = json.loads((report_dir / "compare.json").read_text())
    ghost_cells = [c for c in res["cells"] if c["method"] == "ghost"]
    assert any(not c["guard"].get("fallback") for c in ghost_cells), "no ghost cell carries a ghost"
    for cell in ghost_cells:
        ckpt = tmp_path / f"pruned-{cell['k']}"
        code, stdout, err = run("prune", tiny_folder, "--remove", cell["k"], "--recovery", "ghost",
                                "--n-seqs", 6, "--seq-len", 32, "--out", ckpt, "--quiet")
        assert code == 0, err
        assert json.loads(stdout.strip().splitlines()[-1])["removed_layers"] == cell["removed"]
        code, stdout, err = run("eval", ckpt, "--tasks", "none", "--ppl", "wiki", "--ppl-windows", 2,
                                "--seq-len", 32, "--quiet")
        assert code == 0, err
        saved = json.loads(stdout)["ppl"]["wiki"]["ppl"]
        assert saved == pytest.approx(cell["ppl"]["wiki"]["ppl"], rel=1e-4)


def test_every_method_from_one_capture_and_model_restored(tiny_folder, tmp_path):
    text = tmp_path / "eval.txt"  # a small perplexity source: tokenizing all of `wiki` per cell costs seconds
    text.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(40)))
    loaded = load_model(str(tiny_folder))
    calib = build_calibration(loaded.tokenizer, "passages", 6, 32)
    ids = calib.input_ids[:2]
    with torch.no_grad():
        before = loaded.model(ids).logits.clone()
    cfg = CompareConfig(ks=(2, 1), methods=("none", "linearpatch", "replaceme", "scalar", "ghost"),
                        prune=PruneConfig(remove=1, guard="off"),
                        evaluation=EvalSettings(tasks="none", ppl=str(text), ppl_windows=2, seq_len=32))
    logged: list[str] = []
    res = run_compare(loaded, calib, cfg, progress=False, log=logged.append)
    with torch.no_grad():
        after = loaded.model(ids).logits
    assert torch.equal(before, after)  # folds undone, ghosts unhooked, layers back
    assert res["capture"]["pairs"] == 5 + 6  # 6 layers: five blocks of 2, six of 1
    assert logged[0] == "shared calibration pass: 6 x 32 tokens, 11 candidate blocks"
    assert [(c["k"], c["method"]) for c in res["cells"]][:5] == [(1, m) for m in cfg.methods]
    by = {(c["k"], c["method"]): c["ppl"][str(text)]["ppl"] for c in res["cells"]}
    assert len(set(by.values())) > 2  # the methods really differ
    # no tasks: the accuracy plot is not written; a stale one is removed only when ghosted's record proves it its
    # own (a user's accuracy.png stays; tests/test_reliability_writes.py)
    out = tmp_path / "rep"
    out.mkdir()
    (out / "accuracy.png").write_bytes(b"the user's")
    write_report(res, out)
    assert (out / "accuracy.png").read_bytes() == b"the user's" and (out / "ppl_vs_removed.png").exists()
    (out / "accuracy.png").unlink()
    write_report({**res, "settings": {**res["settings"], "eval": {**res["settings"]["eval"], "ppl": []}}}, out)
    assert not (out / "ppl_vs_removed.png").exists()  # ghosted's own, unchanged: removed
    assert "Zero-shot: not evaluated." in (out / "compare.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--remove", "1,2", "--recovery", "none,ghots"], "did you mean 'ghost'"),
    (["--remove", "1,1"], "lists a count twice"),
    (["--remove", "0"], "whole numbers >= 1"),
    (["--remove", "six"], "layer counts like 6,9"),
    (["--remove", "6"], "--remove must be between 1 and 5"),
    (["--remove", "1", "--tasks", "piqa", "--limit", "0"], "--limit must be a whole number >= 1"),
    (["--remove", "1", "--tasks", "none", "--ppl", "none"], "nothing to evaluate"),
    (["--remove", "1", "--select", "angualr"], "did you mean 'angular'"),
])
def test_compare_bad_input_gives_one_line_error(argv, message, tiny_folder, tmp_path, run):
    out = tmp_path / "rep"
    code, _, err = run("compare", tiny_folder, *argv, "--n-seqs", 6, "--seq-len", 32, "--ppl-windows", 1,
                       "--out-dir", out, "--quiet")
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("ghosted: error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()


def test_eval_settings_reject_unknown_keys():
    with pytest.raises(GhostedError, match="unknown eval option"):
        EvalSettings.from_dict({"taks": "piqa"})


def test_interrupted_compare_resumes_where_it_stopped(tiny_folder, tmp_path):
    """After every cell the results so far are on disk; a rerun with the same settings skips them and
    ends with the numbers of an uninterrupted run."""
    text = tmp_path / "eval.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(40)))
    loaded = load_model(str(tiny_folder))
    calib = build_calibration(loaded.tokenizer, "passages", 6, 32)
    cfg = CompareConfig(ks=(1, 2), methods=("none", "ghost"), prune=PruneConfig(remove=1, guard="off"),
                        evaluation=EvalSettings(tasks="none", ppl=str(text), ppl_windows=2, seq_len=32))
    full = run_compare(loaded, calib, cfg, progress=False)
    partial = tmp_path / "compare.partial.json"

    class Stop(Exception):
        pass

    def stop_after_second_cell(msg: str) -> None:
        if msg.startswith("k=1 ghost"):
            raise Stop

    with pytest.raises(Stop):
        run_compare(loaded, calib, cfg, progress=False, log=stop_after_second_cell, partial_path=partial)
    assert [(c["k"], c["method"]) for c in json.loads(partial.read_text())["cells"]] == [(1, "none"), (1, "ghost")]
    lines: list[str] = []
    resumed = run_compare(loaded, calib, cfg, progress=False, log=lines.append, partial_path=partial)
    assert any("dense model and 2 cell(s) already evaluated" in ln for ln in lines)
    assert not any(ln.startswith("evaluating the dense model") or ln.startswith("k=1 ") for ln in lines)
    assert [c["ppl"] for c in resumed["cells"]] == [c["ppl"] for c in full["cells"]]
    # other settings never pick up a stale partial file
    other = CompareConfig(ks=(1,), methods=("none",), prune=PruneConfig(remove=1, guard="off", ridge=0.5),
                          evaluation=cfg.evaluation)
    lines.clear()
    run_compare(loaded, calib, other, progress=False, log=lines.append, partial_path=partial)
    assert any("belongs to other settings" in ln for ln in lines)


def _assert_same_sums(a, b) -> None:
    from dataclasses import fields as dc_fields

    for group in ("fit", "heldout", "fit_left_out", "heldout_left_out"):
        ga, gb = getattr(a, group), getattr(b, group)
        assert ga.keys() == gb.keys()
        for pair in ga:
            for f in dc_fields(ga[pair]):
                x, y = getattr(ga[pair], f.name), getattr(gb[pair], f.name)
                if isinstance(x, torch.Tensor):
                    assert x.dtype == y.dtype == torch.float64 and torch.equal(x, y), (group, pair, f.name)
                else:
                    assert x == y, (group, pair, f.name)
    assert torch.equal(a.cos_sum, b.cos_sum) and torch.equal(a.ang_sum, b.ang_sum)
    assert (a.num_layers, a.score_tokens, a.seconds) == (b.num_layers, b.score_tokens, b.seconds)


def test_shared_capture_round_trips_through_safetensors(tiny_folder, tmp_path):
    """CaptureResult.save/load: every float64 sum back bit for bit, a cell solved from the loaded file equals
    one solved from the capture in memory, and a file changed since it was written is refused."""
    from ghosted.calibration.capture import CaptureResult
    from ghosted.hashing import file_sha256
    from ghosted.solve.solver import shared_capture, solve

    loaded = load_model(str(tiny_folder))
    calib = build_calibration(loaded.tokenizer, "passages", 6, 32)
    tmpl = PruneConfig(remove=1)
    res = shared_capture(loaded, calib, tmpl, [1, 2], ["ghost", "linearpatch", "replaceme"], progress=False)
    path = tmp_path / "stats.safetensors"
    sha = res.save(path)
    assert sha == file_sha256(path) and path.read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle
    back = CaptureResult.load(path, sha256=sha)
    _assert_same_sums(res, back)
    assert any(ps.trace_ref is not None or ps.mlp_gram is not None for ps in back.fit.values())
    for method in ("ghost", "linearpatch", "replaceme"):
        cfg = PruneConfig(remove=2, recovery=method)
        a = solve(loaded, calib, cfg, progress=False, log=lambda _m: None, shared=res)
        b = solve(loaded, calib, cfg, progress=False, log=lambda _m: None, shared=back)
        assert a.removed == b.removed and a.meta.capture_passes == b.meta.capture_passes == 0
        for cut, op in a.operators.items():
            for name in ("W", "bias", "U", "V", "T", "sink_shift"):
                x, y = getattr(op, name, None), getattr(b.operators[cut], name, None)
                assert (x is None and y is None) or torch.equal(x, y), (method, name)

    path.write_bytes(path.read_bytes()[:-8] + bytes(8))
    with pytest.raises(GhostedError, match="sha256 does not match"):
        CaptureResult.load(path, sha256=sha)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(GhostedError, match="not a capture"):
        CaptureResult.load(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(GhostedError, match="unreadable capture file"):
        CaptureResult.load(tmp_path / "junk.safetensors")


def test_run_cell_reports_a_failed_solve_as_a_row(tiny_folder, tmp_path):
    """A configuration the solver refuses (here a layer the model does not have): the cell carries the error
    and the grid goes on."""
    from ghosted.solve.grid import CellResult, run_cell

    text = tmp_path / "eval.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(40)))
    loaded = load_model(str(tiny_folder))
    calib = build_calibration(loaded.tokenizer, "passages", 6, 32)
    ev = EvalSettings(tasks="none", ppl=str(text), ppl_windows=2, seq_len=32)
    logged: list[str] = []
    cell = run_cell(loaded, calib, None, PruneConfig(layers="8", recovery="ghost"), ev, log=logged.append)
    assert cell.error and cell.ppl == {} and cell.method == "ghost"
    assert logged == [f"WARNING: k=0 ghost failed: {cell.error}"]
    row = cell.as_dict()
    assert set(row) == {"k", "method", "error", "seconds"}
    ok = run_cell(loaded, calib, None, PruneConfig(layers="2-3", recovery="ghost", guard="off"), ev)
    assert ok.error is None and ok.removed == [2, 3] and ok.removed_text == "2-3" and ok.token_policy == "all"
    assert CellResult.from_dict(ok.as_dict()) == ok


def test_merge_runs_only_the_new_cells(report_dir, tiny_folder, tmp_path, run):
    """--merge keeps an earlier grid's dense model and cells and runs only the new method's cells; a grid with
    other evaluation settings is refused before any work, in one line."""
    earlier = json.loads((report_dir / "compare.json").read_text())
    out = tmp_path / "merged"
    argv = [a if a != "none,ghost" else "scalar" for a in GRID]
    code = main(["compare", str(tiny_folder), *argv, "--merge", str(report_dir / "compare.json"),
                 "--out-dir", str(out), "--quiet"])
    assert code == 0
    res = json.loads((out / "compare.json").read_text())
    assert [(c["k"], c["method"]) for c in res["cells"]] == [(1, "none"), (1, "ghost"), (1, "scalar"),
                                                             (2, "none"), (2, "ghost"), (2, "scalar")]
    kept = {(c["k"], c["method"]): c for c in earlier["cells"]}
    for c in res["cells"]:
        if c["method"] != "scalar":
            assert c == kept[(c["k"], c["method"])]  # taken as they were, not rerun
        else:
            assert c["ppl"]["wiki"]["windows"] == 2 and "error" not in c
    assert res["dense"]["ppl"] == earlier["dense"]["ppl"]
    assert res["merged"]["cells"] == [[1, "none"], [1, "ghost"], [2, "none"], [2, "ghost"]]
    assert res["settings"]["recovery"] == ["none", "ghost", "scalar"]
    md = (out / "compare.md").read_text()
    assert "Merged: the dense model and 4 cell(s)" in md
    assert len([ln for ln in md.splitlines() if ln.startswith("| ")]) == 1 + 1 + 6
    # other evaluation settings (3 PPL windows, not 2): refused, nothing written
    other = list(argv)
    other[other.index("--ppl-windows") + 1] = "3"
    code, _, err = run("compare", tiny_folder, *other, "--merge", report_dir / "compare.json",
                       "--out-dir", tmp_path / "refused", "--quiet")
    assert code == 2 and "Traceback" not in err
    assert "its evaluation settings" in err and "differs" in err, err
    assert not (tmp_path / "refused").exists()

"""Reliability: the writers beside ghosted.io go through it too (issue 30, class "data loss").

Each case runs the real CLI or the library call next to the user's own files:
- compare --out-dir: a user's file named like a plot (or edited after ghosted wrote it) survives a report that no
  longer draws that plot; only a plot the folder's marker proves ghosted wrote, unchanged, is removed;
- modes: the compare report, `register --reports`' layer_scores.png, the zero-shot task data export and the
  shared statistics file follow the umask (002 and 022), and an existing file keeps its mode;
- kills: the output check's write probe, the join of a split shipped GGUF, a capture-statistics save and the
  layerwise spill folder leave marked temps only, which the next run removes.

With GHOSTED_RELIABILITY_LOG=path every case appends its outcome (tests/test_reliability.py's `_record`): kind
"fault" (fault_kind, ok, expect_exit, ...) for python -m studies.reliability_report.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ghosted.cli import main
from ghosted.hashing import file_sha256
from ghosted.io_temps import read_marker
from tests.test_reliability import _record
from tests.test_reliability_deletion import _error_lines, _lost, _sandbox, _temps, tree, umask

REPO = Path(__file__).resolve().parents[1]
TEXT = "\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog, and pruning removes blocks. " * 3
                   for i in range(60))
ID = "writes:"  # id prefix of this file's cases in the reliability log
PNG = b"\x89PNG\r\n\x1a\n"


def _fault(case: str, fault_kind: str, description: str, code: int, err: str, partial: list[str], lost: list[str],
           ok: bool, expect_exit: int = 0) -> None:
    lines = _error_lines(err)
    _record("fault", ID + case, description, fault_kind=fault_kind, exit=code,
            error=lines[-1] if lines else err.strip()[-300:], one_line=len(lines) == 1, traceback="Traceback" in err,
            partial=partial, lost=lost, ok=ok, expect_exit=expect_exit)


def _cli(capsys, *argv: object) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("writes-text") / "text.txt"
    path.write_text(TEXT)
    return path


def _compare(tiny: Path, text: Path, out: Path) -> list[object]:
    return ["compare", tiny, "--calib-source", text, "--n-seqs", "4", "--seq-len", "16", "--remove", "1",
            "--recovery", "none", "--tasks", "none", "--ppl", text, "--ppl-windows", "1", "--quiet", "--out-dir", out]


# --------------------------------------------------------------------------- A. compare --out-dir: the user's files


def test_compare_out_dir_keeps_the_users_plot_named_files(tiny_folder, text, tmp_path, capsys):
    """The user's ppl.png, accuracy.png (a plot this grid has no tasks for: the old writer unlinked it by name)
    and notes survive `ghosted compare`; the marker records what ghosted wrote."""
    sb = _sandbox(tmp_path)
    rep = sb / "rep"
    rep.mkdir()
    (rep / "ppl.png").write_bytes(PNG + os.urandom(256))
    (rep / "accuracy.png").write_bytes(PNG + os.urandom(256))
    (rep / "notes.md").write_text("my notes on these runs\n")
    os.chmod(rep / "accuracy.png", 0o640)
    user = tree(sb)
    code, err = _cli(capsys, *_compare(tiny_folder, text, rep))
    lost = _lost(user, tree(sb))
    recorded = sorted((read_marker(rep) or {}).get("files") or {})
    ok = code == 0 and not lost and recorded == ["compare.json", "compare.md", "layer_scores.png", "ppl_vs_removed.png"]
    _fault("compare-keeps-user-plots", "deletion in a shared folder", "ghosted compare --tasks none into an --out-dir "
           "holding the user's ppl.png, accuracy.png and notes.md", code, err, [], lost, ok)
    assert code == 0, err
    assert not lost, f"changed or deleted: {lost}"
    assert recorded == ["compare.json", "compare.md", "layer_scores.png", "ppl_vs_removed.png"], recorded
    assert not _temps(rep)


def _no_ppl(rep: Path) -> None:
    """compare.json as if the grid evaluated no perplexity: `ghosted report` then draws no ppl plot."""
    doc = json.loads((rep / "compare.json").read_text())
    doc["settings"]["eval"]["ppl"] = []
    (rep / "compare.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("edited", [False, True], ids=["proven", "edited-by-user"])
def test_a_stale_plot_goes_only_when_ghosted_wrote_it(edited, tiny_folder, text, tmp_path, capsys):
    """A plot the new report does not draw is removed when the marker proves it ghosted's, unchanged; one the user
    replaced with their own bytes (same name) stays."""
    rep = tmp_path / "rep"
    code, err = _cli(capsys, *_compare(tiny_folder, text, rep))
    assert code == 0, err
    plot = rep / "ppl_vs_removed.png"
    assert plot.read_bytes()[:8] == PNG
    if edited:
        plot.write_bytes(PNG + b"the user's own figure")
    before = plot.read_bytes() if edited else None
    _no_ppl(rep)
    code, err = _cli(capsys, "report", rep)
    kept = (plot.is_file() and plot.read_bytes() == before) if edited else not plot.exists()
    listed = "ppl_vs_removed.png" in ((read_marker(rep) or {}).get("files") or {})
    ok = code == 0 and kept and not listed
    _fault(f"stale-plot-{'edited' if edited else 'proven'}", "deletion in a shared folder",
           "ghosted report without perplexity over a ppl plot " + ("the user overwrote (kept)" if edited else
                                                                   "ghosted wrote (removed)"),
           code, err, [], [] if kept or not edited else ["rep/ppl_vs_removed.png"], ok)
    assert code == 0, err
    assert kept, "the user's plot must stay" if edited else "ghosted's own stale plot must go"
    assert not listed
    assert "ppl_vs_removed" not in (rep / "compare.md").read_text()


# --------------------------------------------------------------------------- B. modes under the umask


def _pipeline_reports(out: Path) -> list[Path]:
    from ghosted.config import GateConfig
    from ghosted.evaluation.gate import apply_gate
    from ghosted.reporting.pipeline_report import write_reports

    cfg = GateConfig()
    dense, pruned = {"ppl": {"wiki": {"ppl": 10.0}}}, {"ppl": {"wiki": {"ppl": 12.5}}}
    scores = {"layers": {"bi": [0.3, 0.1, 0.2, 0.4], "angular": [0.2, 0.05, 0.1, 0.3]},
              "blocks": {"angular": [0.2, 0.05, 0.1, 0.3], "cosine": [0.9, 0.99, 0.95, 0.8]}}
    meta = {"base_model": "tiny", "base_fingerprint": "sha256:0", "removed_layers": [1], "num_layers_dense": 4,
            "recovery": "ghost", "calibration_sha256": "0" * 64}
    registration = {"name": "m", "version": "1", "run_id": "r", "decision": "promoted", "champion": "1",
                    "checkpoint_sha256": "0" * 64}
    return write_reports(out, meta, dense, pruned, scores, apply_gate(dense, pruned, cfg), cfg, registration)


@pytest.mark.parametrize("mask", [0o002, 0o022], ids=lambda m: f"umask-{m:03o}")
def test_report_pngs_follow_the_umask(mask, tiny_folder, text, tmp_path, capsys):
    """compare's report (plots, markdown, JSON) and register --reports' files, layer_scores.png included (it was
    written through mkstemp: 0600), get 0666 less the umask."""
    with umask(mask):
        code, err = _cli(capsys, *_compare(tiny_folder, text, tmp_path / "rep"))
        written = _pipeline_reports(tmp_path / "reports")
    want = 0o666 & ~mask
    files = sorted([*(tmp_path / "rep").iterdir(), *written])  # the marker too
    seen = {p.name: _mode(p) for p in files}
    pngs = [p.name for p in files if p.suffix == ".png"]
    ok = code == 0 and set(seen.values()) == {want} and len(pngs) == 3
    _fault(f"report-umask-{mask:03o}", "output modes", f"compare --out-dir and register --reports under umask "
           f"{mask:03o}: every report file (plots too) {want:o}", code, err, [], [], ok)
    assert code == 0, err
    assert len(pngs) == 3, pngs  # ppl_vs_removed, compare's layer_scores, the pipeline's layer_scores
    assert set(seen.values()) == {want}, {k: f"{v:o}" for k, v in seen.items()}
    assert not _temps(tmp_path / "rep") and not _temps(tmp_path / "reports")


def test_an_existing_report_png_keeps_its_mode(tmp_path):
    (tmp_path / "reports").mkdir()
    png = tmp_path / "reports" / "layer_scores.png"
    png.write_bytes(b"old")
    os.chmod(png, 0o640)
    with umask(0o022):
        _pipeline_reports(tmp_path / "reports")
    ok = _mode(png) == 0o640 and png.read_bytes()[:8] == PNG
    _fault("report-png-mode-kept", "output modes", "register --reports onto an existing 0640 layer_scores.png "
           "(umask 022): the mode stays 640", 0, "", [], [], ok)
    assert png.read_bytes()[:8] == PNG
    assert _mode(png) == 0o640, f"{_mode(png):o}"


@pytest.mark.parametrize("mask", [0o002, 0o022, 0o077], ids=lambda m: f"umask-{m:03o}")
def test_zeroshot_task_data_follows_the_umask(mask, tmp_path):
    """The exported task data was forced to 0644 whatever the umask (group-readable under 077, not
    group-writable under 002)."""
    from ghosted.evaluation.zeroshot import export_task_data

    with umask(mask):
        path = export_task_data("copa", tmp_path / "cache")
    want = 0o666 & ~mask
    ok = _mode(path) == want and not _temps(path.parent)
    _fault(f"zeroshot-umask-{mask:03o}", "output modes", f"zero-shot task data export under umask {mask:03o}: "
           f"{want:o}", 0, "", [], [], ok)
    assert _mode(path) == want, f"{_mode(path):o} != {want:o}"
    assert not _temps(path.parent)


def _capture_result():
    """Shared capture statistics of a tiny Llama (a CaptureResult: what the sweep flow saves)."""
    from ghosted.calibration.capture import CapturePlan, capture
    from tests.tiny_models import make_tiny

    model, _ = make_tiny("llama", num_layers=3)
    ids = torch.randint(0, model.config.vocab_size, (4, 8), generator=torch.Generator().manual_seed(0))
    return capture(model, ids, CapturePlan(pairs=[(1, 2)], heldout=frozenset({3})), "auto", batch_size=4,
                   progress=False)


@pytest.mark.parametrize("mask", [0o002, 0o022], ids=lambda m: f"umask-{m:03o}")
def test_shared_statistics_follow_the_umask(mask, tmp_path):
    """The sweep's shared stats.safetensors (CaptureResult.save) was written through mkstemp: 0600."""
    res = _capture_result()
    with umask(mask):
        sha = res.save(tmp_path / "shared" / "stats.safetensors")
    path = tmp_path / "shared" / "stats.safetensors"
    want = 0o666 & ~mask
    ok = _mode(path) == want and file_sha256(path) == sha and not _temps(path.parent)
    _fault(f"stats-umask-{mask:03o}", "output modes", f"shared capture statistics under umask {mask:03o}: {want:o}",
           0, "", [], [], ok)
    assert _mode(path) == want, f"{_mode(path):o} != {want:o}"
    assert file_sha256(path) == sha and not _temps(path.parent)


# --------------------------------------------------------------------------- C. killed runs: temps swept


# Runs the CLI in a real process that SIGKILLs itself when ghosted.io is about to remove a temp whose name holds
# argv[1] (the write probe: right after making it).
_KILL_AT_RMTREE = r"""
import os, shutil, signal, sys
import ghosted.io as gio, ghosted.io_temps as gtemps
class _Shutil:
    def rmtree(self, path, *a, **k):
        if sys.argv[1] in os.path.basename(str(path)):
            os.kill(os.getpid(), signal.SIGKILL)
        return shutil.rmtree(path, *a, **k)
    def __getattr__(self, name):
        return getattr(shutil, name)
gio.shutil = gtemps.shutil = _Shutil()  # every removal ghosted.io makes, in its temp helpers too
from ghosted.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_killed_write_probe_is_swept(tiny_folder, text, tmp_path, capsys):
    sb = _sandbox(tmp_path)
    (sb / ".ghosted-write-check-k3j4h5g6").write_bytes(b"")  # the old probe's name, unmarked: the user's now
    user = tree(sb)
    argv = ["eval", tiny_folder, "--ppl", text, "--tasks", "none", "--ppl-windows", "1", "--seq-len", "16", "--quiet",
            "--out", sb / "r.json"]
    proc = subprocess.run([sys.executable, "-c", _KILL_AT_RMTREE, "ghosted-write-check.tmp-g-", *map(str, argv)],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)
    left = _temps(sb)
    code, err = _cli(capsys, *argv)
    stale, lost = _temps(sb), _lost(user, tree(sb))
    ok = proc.returncode == -signal.SIGKILL and bool(left) and code == 0 and not stale and not lost
    _fault("killed-write-probe-swept", "stale temps of killed runs", "kill -9 of `ghosted eval --out` inside its "
           "output check's write probe, then the same command again", code, err, stale, lost, ok)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert left and all(t.startswith(".ghosted-write-check.tmp-g-") for t in left), left
    assert code == 0 and (sb / "r.json").is_file(), err
    assert not stale, f"not removed: {stale}"
    assert not lost


_SPLIT_PACKAGE = """\
import os, signal
from pathlib import Path
def chunk_paths():
    return [Path(__file__).parent / 'data' / n for n in ('p0', 'p1')]
def assemble(output_path, overwrite=False):
    with open(output_path, 'wb') as f:
        for p in chunk_paths():
            f.write(p.read_bytes())
            if os.environ.get('KILL_IN_ASSEMBLE'):
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
    return Path(output_path)
"""

_ASSEMBLE = r"""
import sys
from ghosted import models
models.SHIPPED["tiny-split"] = {"package": "tiny_split_pkg", "pip": "tiny-split==0", "gguf": "tiny.gguf",
                                "assemble": "yes"}
print(models.shipped_gguf("tiny-split"))
"""


def test_a_killed_gguf_join_is_swept(tmp_path, monkeypatch):
    """gemma3-270m's kind: its GGUF is joined from part files into the cache; a join killed half-way left an
    unmarked `.tiny.gguf.tmp-PID` there for good."""
    from ghosted import models

    site = tmp_path / "site"
    (site / "tiny_split_pkg" / "data").mkdir(parents=True)
    parts = [os.urandom(4096), os.urandom(3000)]
    for name, data in zip(("p0", "p1"), parts):
        (site / "tiny_split_pkg" / "data" / name).write_bytes(data)
    (site / "tiny_split_pkg" / "__init__.py").write_text(_SPLIT_PACKAGE)
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), "GHOSTED_CACHE": str(cache),
           "KILL_IN_ASSEMBLE": "1"}
    proc = subprocess.run([sys.executable, "-c", _ASSEMBLE], env=env, capture_output=True, text=True, timeout=300)
    folders = list((cache / "gguf").iterdir()) if (cache / "gguf").is_dir() else []
    left = _temps(folders[0]) if folders else []
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("GHOSTED_CACHE", str(cache))
    monkeypatch.setitem(models.SHIPPED, "tiny-split", {"package": "tiny_split_pkg", "pip": "tiny-split==0",
                                                       "gguf": "tiny.gguf", "assemble": "yes"})
    try:
        joined = models.shipped_gguf("tiny-split")
    finally:
        sys.modules.pop("tiny_split_pkg", None)
    stale = _temps(joined.parent)
    whole = joined.read_bytes() == b"".join(parts)
    ok = proc.returncode == -signal.SIGKILL and bool(left) and whole and not stale
    _fault("killed-gguf-join-swept", "stale temps of killed runs", "kill -9 while joining a split shipped GGUF, "
           "then the join again", 0, proc.stderr, stale, [], ok)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert left, "the kill should have left the half-joined GGUF in a marked temp"
    assert whole and not stale, stale
    assert sorted(p.name for p in joined.parent.iterdir()) == ["tiny.gguf"]


_KILL_IN_SAVE = r"""
import os, signal, sys
import safetensors.torch as st
from tests.test_reliability_writes import _capture_result
def _save(tensors, filename, metadata=None):
    open(filename, "wb").write(b"0" * 4096)
    os.kill(os.getpid(), signal.SIGKILL)
st.save_file = _save
_capture_result().save(sys.argv[1])
"""


def test_a_killed_statistics_save_is_swept(tmp_path):
    """The sweep's shared statistics: a save killed half-way left an unmarked mkstemp file beside them."""
    path = tmp_path / "shared" / "stats.safetensors"
    path.parent.mkdir()
    (path.parent / ".stats.safetensors.abc123").write_bytes(b"mine")  # mkstemp's old name, unmarked: kept
    proc = subprocess.run([sys.executable, "-c", _KILL_IN_SAVE, str(path)], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    left = _temps(path.parent)
    sha = _capture_result().save(path)
    stale = _temps(path.parent)
    ok = proc.returncode == -signal.SIGKILL and bool(left) and not stale and file_sha256(path) == sha
    _fault("killed-stats-save-swept", "stale temps of killed runs", "kill -9 while saving the shared capture "
           "statistics, then the save again", 0, proc.stderr, stale, [], ok)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert left and not stale, (left, stale)
    assert (path.parent / ".stats.safetensors.abc123").read_bytes() == b"mine"


_KILL_AFTER_SPILL = r"""
import os, signal, sys, tempfile
import torch
tempfile.tempdir = sys.argv[1]
from ghosted.calibration.offload import OffloadStore
store = OffloadStore(0)
store.put(torch.ones(1024))
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_spill_folder_is_swept(tmp_path, monkeypatch):
    """--layerwise --offload-budget spills carried states to a system temp folder (mkdtemp: a kill left it, GBs
    of them, for good); now a marked one that the next spill removes."""
    import tempfile

    from ghosted.calibration.offload import OffloadStore

    (tmp_path / "ghosted-offload-x1y2z3").mkdir()  # mkdtemp's old name, unmarked: never touched
    proc = subprocess.run([sys.executable, "-c", _KILL_AFTER_SPILL, str(tmp_path)],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    left = _temps(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    store = OffloadStore(0)
    h = store.put(torch.arange(16.0))
    live = _temps(tmp_path)
    assert torch.equal(store.get(h), torch.arange(16.0))
    store.close()
    ok = proc.returncode == -signal.SIGKILL and bool(left) and not set(left) & set(live) and not _temps(tmp_path)
    _fault("killed-spill-folder-swept", "stale temps of killed runs", "kill -9 of a layerwise pass with states "
           "spilled to files, then another spill", 0, proc.stderr, _temps(tmp_path), [], ok)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert left, "the kill should have left the spill folder, marked"
    assert not set(left) & set(live), "the next spill should have removed the killed run's folder"
    assert not _temps(tmp_path) and (tmp_path / "ghosted-offload-x1y2z3").is_dir()


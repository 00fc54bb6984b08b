"""Safe outputs: a user's folder is never replaced, checks run before work, a killed run leaves nothing visible
and its temp folders are removed by the next run (real processes, real SIGKILL)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ghosted.checkpoint.verify import verify
from ghosted.cli import main
from ghosted.errors import GhostedError
from ghosted.io import atomic_dir
from ghosted.io_owned import check_out_dir
from ghosted.io_temps import MARKER, remove_stale
from tests.tiny_models import make_tiny

TEXT = "\n\n".join(f"Paragraph {i}: layer pruning removes whole blocks of a language model. " * 3 for i in range(40))
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(a tiny Llama folder, a calibration text file)."""
    base = tmp_path_factory.mktemp("tiny")
    model, tok = make_tiny("llama", num_layers=4)
    model.save_pretrained(base / "tiny-llama")
    tok.save_pretrained(base / "tiny-llama")
    (base / "calib.txt").write_text(TEXT)
    return base / "tiny-llama", base / "calib.txt"


def _prune_argv(tiny: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    model, text = tiny
    return ["prune", str(model), "--layers", "1-2", "--guard", "off", "--calib-source", str(text), "--n-seqs", "4",
            "--seq-len", "16", "--out", str(out), "--quiet", *extra]


def _run(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def _user_folder(parent: Path) -> dict[str, bytes]:
    """A folder of the user's next to the outputs (and a hidden one of theirs): must never change."""
    mine = parent / "mine"
    mine.mkdir(parents=True, exist_ok=True)
    (mine / "notes.txt").write_text("my notes")
    (parent / ".cache").mkdir(exist_ok=True)
    (parent / ".cache" / "keep").write_text("keep")
    return _snapshot(parent, ("mine", ".cache"))


def _snapshot(parent: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    return {str(p.relative_to(parent)): p.read_bytes() for n in names for p in sorted((parent / n).rglob("*"))
            if p.is_file()}


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") and p.name != ".cache")


# --------------------------------------------------------------------------- existing outputs


def test_user_folder_is_never_replaced(tiny, tmp_path: Path, capsys) -> None:
    before = _user_folder(tmp_path)
    for extra in ((), ("--force",)):
        code, err = _run(capsys, _prune_argv(tiny, tmp_path / "mine", *extra))
        assert code == 2 and "never replaced" in err and len(err.strip().splitlines()) == 1, err
    assert _snapshot(tmp_path, ("mine", ".cache")) == before


def test_existing_output_needs_force(tiny, tmp_path: Path, capsys) -> None:
    out = tmp_path / "ck"
    assert _run(capsys, _prune_argv(tiny, out))[0] == 0
    first = (out / "ghosted_manifest.json").read_bytes()
    code, err = _run(capsys, _prune_argv(tiny, out))
    assert code == 2 and "pass --force" in err
    assert (out / "ghosted_manifest.json").read_bytes() == first
    assert _run(capsys, _prune_argv(tiny, out, "--force"))[0] == 0
    verify(out)
    assert _hidden(tmp_path) == []


def test_an_empty_folder_is_filled(tiny, tmp_path: Path, capsys) -> None:
    (tmp_path / "ck").mkdir()
    assert _run(capsys, _prune_argv(tiny, tmp_path / "ck"))[0] == 0
    verify(tmp_path / "ck")


@pytest.mark.parametrize("command", ["calibrate", "solve"])
def test_calibrate_and_solve_refuse_a_user_folder(command: str, tiny, tmp_path: Path, capsys) -> None:
    model, text = tiny

    def argv(out: str, *extra: str) -> list[str]:
        return [command, str(model), "--calib-source", str(text), "--n-seqs", "4", "--seq-len", "16", "--out", out,
                *(["--layers", "1", "--guard", "off", "--quiet"] if command == "solve" else []), *extra]

    before = _user_folder(tmp_path)
    code, err = _run(capsys, argv(str(tmp_path / "mine"), "--force"))
    assert code == 2 and "never replaced" in err
    assert _snapshot(tmp_path, ("mine", ".cache")) == before
    assert _run(capsys, argv(str(tmp_path / "new")))[0] == 0
    assert (tmp_path / "new" / MARKER).is_file()
    code, err = _run(capsys, argv(str(tmp_path / "new")))
    assert code == 2 and "--force" in err
    assert _run(capsys, argv(str(tmp_path / "new"), "--force"))[0] == 0


# --------------------------------------------------------------------------- checks before work


def _bad_outs(tmp_path: Path) -> list[tuple[list[str], str]]:
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-folder").mkdir()
    return [
        (["--out", str(tmp_path / "a-file")], "not a folder"),
        (["--out", str(tmp_path / "a-file" / "ck")], "not a folder"),
        (["--out", str(tmp_path / "ok"), "--summary", str(tmp_path / "a-folder")], "is a folder"),
        (["--out", str(tmp_path / "ok"), "--summary", str(tmp_path / "a-file" / "s.json")], "not a folder"),
    ]


def test_bad_outputs_are_refused_before_any_work(tiny, tmp_path: Path, capsys) -> None:
    for out_args, message in _bad_outs(tmp_path):
        argv = _prune_argv(tiny, tmp_path / "unused")
        argv = argv[:argv.index("--out")] + out_args + ["--quiet"]
        t0 = time.perf_counter()
        code, err = _run(capsys, argv)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (out_args, err)
        assert not (tmp_path / "ok").exists() and not (tmp_path / "unused").exists()
        assert time.perf_counter() - t0 < 5  # refused before loading the model
    assert _hidden(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_parent_is_refused_first(tiny, tmp_path: Path, capsys) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        code, err = _run(capsys, _prune_argv(tiny, locked / "ck"))
        assert code == 2 and "permission denied" in err
    finally:
        locked.chmod(0o700)


def test_pruning_a_ghost_checkpoint_is_refused_before_work(tiny, tmp_path: Path, capsys) -> None:
    assert _run(capsys, _prune_argv(tiny, tmp_path / "ck"))[0] == 0
    argv = _prune_argv(tiny, tmp_path / "again")
    argv[1] = str(tmp_path / "ck")
    code, err = _run(capsys, argv)
    assert code == 2 and "is a ghost checkpoint" in err and not (tmp_path / "again").exists()


# --------------------------------------------------------------------------- temp folders of killed runs


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _killed_writer_temp(parent: Path, name: str) -> Path:
    """The temp folder a real ghosted writer left when it was killed -9 while filling it."""
    code = ("import os, sys; from ghosted.io import temp_dir\n"
            "with temp_dir(sys.argv[1], sys.argv[2]) as t:\n"
            "    (t / 'model.safetensors').write_bytes(b'0' * 100); os.kill(os.getpid(), 9)")
    before = set(parent.iterdir())
    subprocess.run([sys.executable, "-c", code, str(parent), name], env={**os.environ, "PYTHONPATH": str(ROOT)})
    (made,) = set(parent.iterdir()) - before
    return made


def test_stale_temp_folders_are_removed_only_with_their_marker(tmp_path: Path) -> None:
    """Only a temp folder whose marker proves ghosted made it (and names that very folder), and whose writer is
    gone, is removed; a name alone proves nothing."""
    import shutil
    import socket

    from ghosted.io import temp_dir
    from ghosted.io_temps import _host

    dead = _killed_writer_temp(tmp_path, "ck")
    copied = tmp_path / f".ck.tmp-g-{_host()}-{dead.name.split('-')[-2]}-0123abcd"
    shutil.copytree(dead, copied)  # the marker names another folder
    unmarked = tmp_path / f".ck.tmp-g-{_host()}-{_dead_pid()}-abcd1234"
    other_host = tmp_path / f".ck.tmp-g-{'x' + socket.gethostname()[:5]}-{_dead_pid()}-abcd1234"
    old_style = tmp_path / ".ck.tmp-abcd1234"  # the name of an older version's temp: not proof
    for d in (unmarked, other_host, old_style):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"0" * 100)
    os.utime(old_style, (time.time() - 7 * 3600,) * 2)
    assert remove_stale(tmp_path) == [dead]
    with temp_dir(tmp_path, "live") as live:
        assert remove_stale(tmp_path) == [] and live.exists()
    assert copied.exists() and unmarked.exists() and other_host.exists() and old_style.exists()


def test_atomic_dir_failure_leaves_nothing_and_keeps_the_old_output(tmp_path: Path) -> None:
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("first")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "out", force=True) as tmp:
        (tmp / "a").write_text("second")
        raise RuntimeError("disk full")
    assert (tmp_path / "out" / "a").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(GhostedError, match="--force"):
        check_out_dir(tmp_path / "out")


# Stops the prune at a chosen point (SIGSTOP to itself) so the test can SIGKILL it exactly there.
WRAPPER = r"""
import os, signal, sys
point = os.environ["STOP_AT"]
def stop():
    os.kill(os.getpid(), signal.SIGSTOP)
import ghosted.checkpoint.format as ck, ghosted.io as gio, ghosted.io_temps as gtemps, ghosted.solve.solver as pr
if point == "before-save":
    orig_build = pr.build_checkpoint
    def build(*a, **k):
        stop(); return orig_build(*a, **k)
    pr.build_checkpoint = build
elif point == "weights-written":
    orig_manifest = ck.write_manifest
    def manifest(*a, **k):
        stop(); return orig_manifest(*a, **k)
    ck.write_manifest = manifest
elif point.startswith("rename-"):
    n = int(point.split("-")[1])
    class _Os:
        calls = 0
        def replace(self, a, b):
            _Os.calls += 1
            if _Os.calls == n:
                stop()
            return os.replace(a, b)
        def __getattr__(self, name):
            return getattr(os, name)
    gio.os = gtemps.os = _Os()  # every rename ghosted.io makes, in its temp helpers too
from ghosted.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except FileNotFoundError:
        return False


def _kill_at(point: str, argv: list[str], tmp_path: Path) -> None:
    script = tmp_path / "stop_at.py"
    script.write_text(WRAPPER)
    env = {**os.environ, "STOP_AT": point, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not _stopped(proc.pid):
        assert proc.poll() is None, f"finished before {point}: {proc.communicate()[1].decode()[-2000:]}"
        assert time.time() < deadline, f"never reached {point}"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


@pytest.mark.parametrize("point,existing", [
    ("before-save", False),       # during the work: nothing written yet
    ("weights-written", False),   # weights, tokenizer and code in the temp folder, no manifest yet
    ("rename-1", False),          # the finished temp folder, about to be renamed into place
    ("weights-written", True),    # replacing an older output with --force: the old one must stay whole
    ("rename-2", True),           # old output moved aside, new one not yet renamed in
])
def test_kill_9_during_prune(point: str, existing: bool, tiny, tmp_path: Path, capsys) -> None:
    parent = tmp_path / "outs"
    out = parent / "ck"
    user = _user_folder(parent)
    if existing:
        assert _run(capsys, _prune_argv(tiny, out))[0] == 0
        old_manifest = (out / "ghosted_manifest.json").read_bytes()
    _kill_at(point, _prune_argv(tiny, out, *(["--force"] if existing else [])), tmp_path)
    # Nothing partial is visible: the output is absent, or whole (the old one, when the kill came before the swap).
    visible = sorted(p.name for p in parent.iterdir() if not p.name.startswith("."))
    if out.exists():
        verify(out)
        assert existing and (out / "ghosted_manifest.json").read_bytes() == old_manifest
    else:
        assert point == "rename-2" or not existing
    assert visible in (["ck", "mine"], ["mine"])
    left = _hidden(parent)
    if point != "before-save":
        assert left, "the kill should have left a temp folder behind"
    # The next run writing into the same parent removes the leftovers and writes a whole output.
    assert _run(capsys, _prune_argv(tiny, out, "--force"))[0] == 0
    verify(out)
    assert _hidden(parent) == []
    assert _snapshot(parent, ("mine", ".cache")) == user
    assert json.loads((out / "config.json").read_text())["ghosted"]["num_layers"] == 2


def test_what_counts_as_a_ghosted_output(tmp_path: Path) -> None:
    """Only ghosted's own folders may be replaced: its marker or manifest lists every file in it, unchanged. The
    layout or a config.json `ghosted` key proves nothing."""
    from ghosted.io_owned import is_ghosted_output

    def folder(name: str, files: dict[str, str]) -> Path:
        d = tmp_path / name
        d.mkdir()
        for f, text in files.items():
            (d / f).write_text(text)
        return d

    assert not is_ghosted_output(folder("legacy-ck", {"config.json": '{"ghosted": {}}', "model.safetensors": "x"}))
    assert not is_ghosted_output(folder("legacy-ops", {"plan.json": "{}", "operators.safetensors": "x"}))
    assert not is_ghosted_output(folder("hf-model", {"config.json": '{"model_type": "llama"}'}))
    with atomic_dir(tmp_path / "ours") as tmp:
        (tmp / "plan.json").write_text("{}")
    assert is_ghosted_output(tmp_path / "ours")
    (tmp_path / "ours" / "notes.docx").write_text("mine")
    assert not is_ghosted_output(tmp_path / "ours")
    old = folder("backup.tmp-20240101", {"thesis.docx": "mine"})  # looks like an old temp name: not ours
    os.utime(old, (time.time() - 30 * 24 * 3600,) * 2)
    assert remove_stale(tmp_path) == [] and (old / "thesis.docx").exists()

"""Reliability: ghosted deletes or replaces only what it can prove it wrote (issue 30, class "data loss").

Every case runs the real CLI (`ghosted.cli.main` in-process, or a real `ghosted` process killed -9) next to the
user's own files and asserts that each of them is still there, byte-identical and with its mode:
- decoys: folders and files beside --out whose names look like ghosted's temps (old and new patterns, any age,
  any content, forged or copied markers, symlinks) survive the stale sweep;
- --force: a folder ghosted did not write (even with a `ghosted` key in config.json, a calibration layout or a
  forged manifest), or a ghosted output holding one file of the user's, is refused in one line naming it;
- upgrade: the user's files in a rewritten checkpoint are kept as they are (or the upgrade is refused);
- modes: new outputs follow the umask (002 and 022), an existing file or folder keeps its mode;
- kills: the temp of a killed export, prune or JSON write is removed by the next run, and a killed --force
  replace puts the old output back.

With GHOSTED_RELIABILITY_LOG=path every case appends its outcome (tests/test_reliability.py's `_record`, the same
fields): refusals as kind "bad" (exit, error, one_line, traceback, partial, lost), the rest as kind "fault" (plus
fault_kind, ok, expect_exit), for python -m studies.reliability_report.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ghosted.cli import main
from ghosted.io import temp_dir
from ghosted.io_temps import MARKER, _host
from tests.checkpoint.test_export import make_tiny_folder
from tests.test_reliability import _record

REPO = Path(__file__).resolve().parents[1]
TEXT = "\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog, and pruning removes blocks. " * 3
                   for i in range(60))
CALIB = ["--n-seqs", "4", "--seq-len", "16"]
FAST = ["--guard", "off", "--token-policy", "all", "--quiet"]  # with --calib (which brings the windows)
ID = "del:"  # id prefix of this file's cases in the reliability log


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama folder (byte-level tokenizer, so it exports), calibration text and folder, a ghost checkpoint
    and a plain (exportable) checkpoint, all written by the real CLI."""
    root = tmp_path_factory.mktemp("deletion-world")
    w = {"root": root, "tiny": make_tiny_folder(root / "tiny", "llama", num_layers=4), "text": root / "text.txt",
         "calib": root / "calib", "ckpt": root / "ckpt", "plain": root / "plain"}
    w["text"].write_text(TEXT)
    assert main(["calibrate", str(w["tiny"]), "--calib-source", str(w["text"]), *CALIB, "--out", str(w["calib"])]) == 0
    for key, recovery in (("ckpt", "ghost"), ("plain", "none")):
        assert main(["prune", str(w["tiny"]), "--calib", str(w["calib"]), "--layers", "1", "--recovery", recovery,
                     *FAST, "--out", str(w[key])]) == 0
    return w


def _sandbox(tmp_path: Path) -> Path:
    """The user's folder: their data (with modes of their own) beside the outputs."""
    sb = tmp_path / "sb"
    (sb / "user-data" / "nested").mkdir(parents=True)
    (sb / "user-data" / "notes.txt").write_text("the user's own notes: must survive\n")
    (sb / "user-data" / "nested" / "weights.bin").write_bytes(os.urandom(2048))
    os.chmod(sb / "user-data" / "notes.txt", 0o640)
    os.chmod(sb / "user-data" / "nested", 0o750)
    return sb


def tree(root: Path) -> dict[str, tuple[str, str, int]]:
    """Every entry under root (symlinks not followed): (type, sha256 or link target, permission bits)."""
    out: dict[str, tuple[str, str, int]] = {}
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(base) / name
            st = p.lstat()
            rel = p.relative_to(root).as_posix()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p), 0)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", "", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest(), stat.S_IMODE(st.st_mode))
    return out


def _error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("ghosted: error:")]


def _cli(capsys, *argv: object) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _lost(before: dict, after: dict) -> list[str]:
    return sorted(k for k in before if after.get(k) != before[k])


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _fault(case: str, fault_kind: str, description: str, code: int, err: str, partial: list[str], lost: list[str],
           ok: bool, expect_exit: int = 0) -> None:
    lines = _error_lines(err)
    _record("fault", ID + case, description, fault_kind=fault_kind, exit=code,
            error=lines[-1] if lines else err.strip()[-300:], one_line=len(lines) == 1, traceback="Traceback" in err,
            partial=partial, lost=lost, ok=ok, expect_exit=expect_exit)


def _refusal(case: str, description: str, code: int, err: str, partial: list[str], lost: list[str]) -> None:
    lines = _error_lines(err)
    _record("bad", ID + case, f"[output] {description}", exit=code, error=lines[0] if lines else err.strip()[:300],
            one_line=len(lines) == 1, traceback="Traceback" in err, partial=partial, lost=lost)


def _calibrate(w: dict[str, Path], out: Path, *extra: str) -> list[object]:
    return ["calibrate", w["tiny"], "--calib-source", w["text"], *CALIB, "--out", out, *extra]


def _prune(w: dict[str, Path], out: Path, *extra: str) -> list[object]:
    return ["prune", w["tiny"], "--calib", w["calib"], "--layers", "1", *FAST, "--out", out, *extra]


# --------------------------------------------------------------------------- A. decoys beside --out


def _killed_temp(parent: Path, name: str) -> Path:
    """The marked temp folder a real ghosted writer left when it was killed -9 while filling it."""
    code = ("import os, sys; from ghosted.io import temp_dir\n"
            "with temp_dir(sys.argv[1], sys.argv[2]) as t:\n"
            "    (t / 'model.safetensors').write_bytes(b'0' * 4096); os.kill(os.getpid(), 9)")
    before = set(parent.iterdir())
    subprocess.run([sys.executable, "-c", code, str(parent), name], env={**os.environ, "PYTHONPATH": str(REPO)})
    (made,) = set(parent.iterdir()) - before
    return made


def _fill(folder: Path, files: dict[str, bytes], age_s: float = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    if age_s:
        for p in [*folder.rglob("*"), folder]:
            os.utime(p, (time.time() - age_s,) * 2, follow_symlinks=False)


_GHOSTLIKE = {"config.json": b'{"ghosted": {}}', "model.safetensors": os.urandom(512), "notes.md": b"# mine\n"}


def _decoy_legacy_visible(sb: Path) -> None:
    _fill(sb / "cal.tmp-abcdefgh", _GHOSTLIKE, age_s=7 * 3600)


def _decoy_legacy_hidden(sb: Path) -> None:
    _fill(sb / ".cal.tmp-k2j4h6g8", {"calibration.json": b"{}", "tokens.safetensors": b"x"}, age_s=30 * 86400)


def _decoy_new_pattern_unmarked(sb: Path) -> None:
    _fill(sb / f".cal.tmp-g-{_host()}-{_dead_pid()}-abcd1234", _GHOSTLIKE, age_s=86400)


def _decoy_copied_marker(sb: Path) -> None:
    """A copy of a real killed temp under another name: its marker names the original, not the copy."""
    real = _killed_temp(sb, "cal")
    shutil.copytree(real, sb / f".cal.tmp-g-{_host()}-{real.name.split('-')[-2]}-0badc0de")
    shutil.rmtree(real)


def _decoy_garbage_marker(sb: Path) -> None:
    _fill(sb / f".cal.tmp-g-{_host()}-{_dead_pid()}-abcd1234", {MARKER: b"not json {", "a.json": b"{}"})


def _decoy_other_host(sb: Path) -> None:
    name = f".cal.tmp-g-{_host()}-{_dead_pid()}-abcd1234"
    writer = {"host": "another-machine", "pid": int(name.split("-")[-2]), "boot": "x", "started": 1}
    _fill(sb / name, {MARKER: json.dumps({"temp": name, "writer": writer}).encode(), "a.json": b"{}"})


def _decoy_old_unmarked(sb: Path) -> None:
    _fill(sb / f".cal.old-g-{_host()}-{_dead_pid()}-abcd1234", {"x/config.json": b'{"ghosted": {}}', "x/me.txt": b"1"})


def _decoy_symlink_to_user_folder(sb: Path) -> None:
    """A temp-named symlink to a folder of the user's that even holds a marker naming the link."""
    name = f".cal.tmp-g-{_host()}-{_dead_pid()}-abcd1234"
    writer = {"host": socket.gethostname(), "pid": int(name.split("-")[-2])}
    _fill(sb / "linked-data", {MARKER: json.dumps({"temp": name, "writer": writer}).encode(), "data.csv": b"1,2\n"})
    (sb / name).symlink_to("linked-data")


def _decoy_file_with_temp_name(sb: Path) -> None:
    (sb / f".cal.tmp-g-{_host()}-{_dead_pid()}-abcd1234").write_bytes(b"a file of the user's\n")


def _decoy_live_writer(sb: Path) -> contextlib.AbstractContextManager:
    """A real temp folder of a writer that is still running (this process)."""
    return temp_dir(sb, "cal")


@dataclass(frozen=True)
class Decoy:
    id: str
    description: str
    make: Callable[[Path], object]
    command: str = "calibrate"  # the command that writes beside the decoy


DECOYS = [
    Decoy("decoy-legacy-name-7h", "a visible folder NAME.tmp-XXXXXXXX, 7 h old, only ghosted-like file types",
          _decoy_legacy_visible),
    Decoy("decoy-legacy-hidden-30d", "a hidden .NAME.tmp-XXXXXXXX folder, 30 days old, a calibration layout",
          _decoy_legacy_hidden),
    Decoy("decoy-new-pattern-no-marker", "a folder named exactly like a temp of a dead pid, without a marker",
          _decoy_new_pattern_unmarked),
    Decoy("decoy-copied-marker", "a copy of a killed run's temp under another name (its marker names the original)",
          _decoy_copied_marker),
    Decoy("decoy-garbage-marker", "a temp-named folder whose marker file is not JSON", _decoy_garbage_marker),
    Decoy("decoy-other-host", "a temp-named folder whose marker names another machine", _decoy_other_host),
    Decoy("decoy-old-aside-no-marker", "a folder named like a moved-aside old output, no marker",
          _decoy_old_unmarked),
    Decoy("decoy-symlink", "a temp-named symlink to a user folder holding a marker that names the link",
          _decoy_symlink_to_user_folder),
    Decoy("decoy-file", "a file (not a folder) named like a temp of a dead pid", _decoy_file_with_temp_name),
    Decoy("decoy-live-writer", "the marked temp folder of a writer still running", _decoy_live_writer),
    Decoy("decoy-beside-summary", "a temp-looking folder beside a JSON file output (prune --summary)",
          _decoy_new_pattern_unmarked, command="prune"),
    Decoy("decoy-beside-export", "a temp-looking folder and an old-style GGUF temp file beside `export --gguf`",
          lambda sb: (_decoy_legacy_visible(sb), (sb / ".m.gguf.k3j4h5g6.tmp").write_bytes(os.urandom(4096))),
          command="export"),
]


@pytest.mark.parametrize("decoy", DECOYS, ids=lambda d: d.id)
def test_decoy_temp_looking_entries_survive_the_sweep(decoy: Decoy, world, tmp_path, capsys):
    sb = _sandbox(tmp_path)
    made = decoy.make(sb)
    with made if isinstance(made, contextlib.AbstractContextManager) else contextlib.nullcontext():
        before = tree(sb)
        if decoy.command == "calibrate":
            out, argv = sb / "cal", _calibrate(world, sb / "cal")
        elif decoy.command == "prune":
            out, argv = sb / "ck", _prune(world, sb / "ck", "--summary", str(sb / "summary.json"))
        else:
            out, argv = sb / "m.gguf", ["export", world["plain"], "--gguf", sb / "m.gguf"]
        code, err = _cli(capsys, *argv)
        after = tree(sb)
    lost = _lost(before, after)
    ok = code == 0 and out.exists() and not lost
    _fault(decoy.id, "decoy temp-looking user entry beside the output", f"{decoy.description}; then `ghosted "
           f"{decoy.command}` writes beside it", code, err, [], lost, ok)
    assert code == 0, err
    assert out.exists() and not lost, f"changed or deleted: {lost}"


# --------------------------------------------------------------------------- B. --force on what ghosted did not write


def _copy_of(key: str, name: str = "ck") -> Callable[[dict[str, Path], Path], None]:
    def setup(w: dict[str, Path], sb: Path) -> None:
        shutil.copytree(w[key], sb / name, symlinks=True)
    return setup


def _then(*steps: Callable[[dict[str, Path], Path], None]) -> Callable[[dict[str, Path], Path], None]:
    def setup(w: dict[str, Path], sb: Path) -> None:
        for s in steps:
            s(w, sb)
    return setup


def _write(rel: str, data: bytes | str) -> Callable[[dict[str, Path], Path], None]:
    def setup(w: dict[str, Path], sb: Path) -> None:
        p = sb / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
    return setup


def _append(rel: str, text: str) -> Callable[[dict[str, Path], Path], None]:
    def setup(w: dict[str, Path], sb: Path) -> None:
        with open(sb / rel, "a") as f:
            f.write(text)
    return setup


def _mkdir(rel: str) -> Callable[[dict[str, Path], Path], None]:
    return lambda w, sb: (sb / rel).mkdir(parents=True)


def _link(rel: str, target: str) -> Callable[[dict[str, Path], Path], None]:
    return lambda w, sb: (sb / rel).symlink_to(target)


def _unlink(rel: str) -> Callable[[dict[str, Path], Path], None]:
    return lambda w, sb: (sb / rel).unlink()


def _forged_manifest(w: dict[str, Path], sb: Path) -> None:
    (sb / "ck").mkdir()
    (sb / "ck" / "config.json").write_text('{"ghosted": {"format": 2}}')
    (sb / "ck" / "results.csv").write_text("a,b\n1,2\n")
    files = {"config.json": "0" * 64, "results.csv": "1" * 64}
    (sb / "ck" / "ghosted_manifest.json").write_text(json.dumps({"algorithm": "sha256", "files": files}))


@dataclass(frozen=True)
class Force:
    id: str
    description: str
    expect: str  # a fragment of the one error line
    setup: Callable[[dict[str, Path], Path], None]
    argv: Callable[[dict[str, Path], Path], list[object]]


def _prune_force(w, sb):
    return _prune(w, sb / "ck", "--force")


def _calibrate_force(w, sb):
    return _calibrate(w, sb / "ck", "--force")


FORCES = [
    Force("force-user-folder-ghosted-key", "prune --force onto a user's model folder whose config.json has a "
          "`ghosted` key", "never replaced",
          _then(_write("ck/config.json", '{"ghosted": {"format": 2}, "model_type": "llama"}'),
                _write("ck/model.safetensors", os.urandom(256))), _prune_force),
    Force("force-user-calibration-layout", "calibrate --force onto a user's folder of calibration.json + "
          "tokens.safetensors", "never replaced",
          _then(_write("ck/calibration.json", "{}"), _write("ck/tokens.safetensors", os.urandom(64))),
          _calibrate_force),
    Force("force-user-solution-layout", "solve --force onto a user's folder of plan.json + operators.safetensors",
          "never replaced", _then(_write("ck/plan.json", "{}"), _write("ck/operators.safetensors", b"x")),
          lambda w, sb: ["solve", w["tiny"], "--calib", w["calib"], "--layers", "1", *FAST, "--out", sb / "ck",
                         "--force"]),
    Force("force-user-folder-search", "search --force onto a user's folder of notes", "never replaced",
          _write("ck/notes.txt", "mine\n"),
          lambda w, sb: ["search", w["tiny"], "--calib", w["calib"], "--quiet", "--out", sb / "ck", "--force"]),
    Force("force-forged-manifest", "prune --force onto a user's folder whose ghosted_manifest.json lists wrong "
          "sha256s", "holds config.json", _forged_manifest, _prune_force),
    Force("force-output-with-user-file", "prune --force onto a ghosted checkpoint the user added notes.txt to",
          "holds notes.txt", _then(_copy_of("ckpt"), _write("ck/notes.txt", "my notes\n")), _prune_force),
    Force("force-output-with-edited-card", "prune --force onto a ghosted checkpoint whose README.md the user "
          "edited", "holds README.md", _then(_copy_of("ckpt"), _append("ck/README.md", "\nMy findings.\n")),
          _prune_force),
    Force("force-output-with-nested-user-file", "prune --force onto a ghosted checkpoint with a user file two "
          "folders down", "holds extra/deep/eval.md",
          _then(_copy_of("ckpt"), _write("ck/extra/deep/eval.md", "# eval\n")), _prune_force),
    Force("force-fuse-output-with-empty-user-folder", "fuse --force onto a ghosted checkpoint with an empty folder the "
          "user made", "holds drafts", _then(_copy_of("ckpt"), _mkdir("ck/drafts")),
          lambda w, sb: ["fuse", w["tiny"], "--ops", sb / "ops", "--quiet", "--out", sb / "ck", "--force"]),
    Force("force-output-with-user-symlink", "calibrate --force onto a ghosted calibration folder holding a "
          "symlink of the user's", "holds data",
          _then(_copy_of("calib"), _link("ck/data", "../user-data")), _calibrate_force),
    Force("force-copied-without-marker-plus-file", "prune --force onto a checkpoint copied with `cp ck/* new/` "
          "(no marker; its manifest lists the rest) plus a user file", "holds results.json",
          _then(_copy_of("ckpt"), _unlink(f"ck/{MARKER}"), _write("ck/results.json", "{}")), _prune_force),
    Force("force-calibration-without-marker", "calibrate --force onto a calibration output whose marker is gone "
          "(nothing lists its files)", "never replaced", _then(_copy_of("calib"), _unlink(f"ck/{MARKER}")),
          _calibrate_force),
    Force("force-older-marker-without-list", "calibrate --force onto a folder with an older ghosted's marker "
          "that lists no files", "older ghosted",
          _then(_copy_of("calib"), _write(f"ck/{MARKER}", '{"kind": "calibration"}\n')), _calibrate_force),
    Force("no-force-ghosted-output", "calibrate without --force onto an existing ghosted output", "pass --force",
          _copy_of("calib"), lambda w, sb: _calibrate(w, sb / "ck")),
]


@pytest.mark.parametrize("case", FORCES, ids=lambda c: c.id)
def test_force_never_replaces_what_ghosted_did_not_write(case: Force, world, tmp_path, capsys):
    sb = _sandbox(tmp_path)
    if "fuse" in case.id:
        assert main(["solve", str(world["tiny"]), "--calib", str(world["calib"]), "--layers", "1", *FAST,
                     "--out", str(sb / "ops")]) == 0
    case.setup(world, sb)
    before, world_before = tree(sb), tree(world["root"])
    code, err = _cli(capsys, *case.argv(world, sb))
    after, world_after = tree(sb), tree(world["root"])
    lines = _error_lines(err)
    partial = sorted(set(after) - set(before))
    lost = _lost(before, after) + _lost(world_before, world_after)
    _refusal(case.id, case.description, code, err, partial, lost)
    assert code == 2, err
    assert len(lines) == 1 and case.expect in lines[0] and "Traceback" not in err, err
    assert not partial, f"left behind: {partial}"
    assert not lost, f"changed or deleted: {lost}"


def test_force_replaces_a_proven_output_and_keeps_its_mode(world, tmp_path, capsys):
    """The positive side: a ghosted output, intact (even without its marker: the manifest proves it), is replaced
    with --force; the folder keeps the mode the user gave it; the user's folder beside it is untouched."""
    sb = _sandbox(tmp_path)
    shutil.copytree(world["ckpt"], sb / "ck")
    (sb / "ck" / MARKER).unlink()
    os.chmod(sb / "ck", 0o750)
    user = {k: v for k, v in tree(sb).items() if k.startswith("user-data")}
    code, err = _cli(capsys, *_prune(world, sb / "ck", "--force"))
    after = tree(sb)
    lost = _lost(user, after)
    ok = code == 0 and stat.S_IMODE((sb / "ck").stat().st_mode) == 0o750 and (sb / "ck" / MARKER).is_file()
    _fault("force-proven-output-mode-kept", "replace of a proven ghosted output", "prune --force onto an intact "
           "ghosted checkpoint (marker removed, manifest intact) whose folder mode is 0750", code, err, [], lost,
           ok and not lost)
    assert ok and not lost, err


# --------------------------------------------------------------------------- C. upgrade keeps the user's files


def _as_legacy(ck: Path) -> Path:
    """A checkpoint the way ghosted 0.1 wrote it: base model type, weights in model.safetensors, no manifest, no
    marker (see tests/checkpoint/test_checkpoint.py)."""
    cfg = json.loads((ck / "config.json").read_text())
    base = cfg["ghosted"]["base_architecture"]
    cfg.update(model_type="llama", architectures=[base],
               auto_map={"AutoModelForCausalLM": f"modeling_ghosted.Ghosted{base}"})
    cfg["ghosted"].pop("format")
    (ck / "config.json").write_text(json.dumps(cfg))
    (ck / "model.ghosted.safetensors").rename(ck / "model.safetensors")
    for name in ("ghosted_manifest.json", "configuration_ghosted.py", MARKER):
        (ck / name).unlink()
    return ck


def _user_files_in(ck: Path) -> None:
    (ck / "notes.txt").write_text("my notes on this model\n")
    os.chmod(ck / "notes.txt", 0o600)
    (ck / "NOTES.md").write_text("# notes\n")
    (ck / "images").mkdir()
    (ck / "images" / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    (ck / "drafts").mkdir(mode=0o700)
    (ck / "notes-latest.md").symlink_to("NOTES.md")  # a link no loader reads (verify accepts it)
    (ck / ".git").mkdir()
    (ck / ".git" / "HEAD").write_text("ref: refs/heads/main\n")


def _user_part(t: dict, names=("notes.txt", "NOTES.md", "images", "drafts", "notes-latest.md", ".git")) -> dict:
    return {k: v for k, v in t.items() if k.split("/")[0] in names}


def test_upgrade_keeps_every_user_file(world, tmp_path, capsys):
    sb = _sandbox(tmp_path)
    ck = _as_legacy(shutil.copytree(world["ckpt"], sb / "ck"))
    _user_files_in(ck)
    before = _user_part(tree(ck))
    code, err = _cli(capsys, "upgrade", ck)
    after = _user_part(tree(ck))
    lost = _lost(before, after)
    ok = code == 0 and not lost and (ck / MARKER).is_file()
    _fault("upgrade-keeps-user-files", "user files inside a rewritten checkpoint", "`ghosted upgrade` of a legacy "
           "checkpoint holding notes.txt (0600), NOTES.md, images/, an empty folder (0700), a symlink and .git/",
           code, err, [], lost, ok)
    assert code == 0, err
    assert not lost, f"changed or deleted: {lost}"


def test_upgraded_checkpoint_still_protects_the_kept_files(world, tmp_path, capsys):
    """The files upgrade carried over stay the user's: a later --force refuses to replace the folder."""
    sb = _sandbox(tmp_path)
    ck = _as_legacy(shutil.copytree(world["ckpt"], sb / "ck"))
    (ck / "README.md").unlink()  # a legacy card is kept as the user's too (nothing proves ghosted wrote it)
    (ck / "notes.txt").write_text("mine\n")
    assert _cli(capsys, "upgrade", ck)[0] == 0
    before = tree(sb)
    code, err = _cli(capsys, *_prune(world, ck, "--force"))
    after = tree(sb)
    lines = _error_lines(err)
    partial, lost = sorted(set(after) - set(before)), _lost(before, after)
    _refusal("force-after-upgrade-kept-file", "prune --force onto a checkpoint whose upgrade kept the user's "
             "notes.txt", code, err, partial, lost)
    assert code == 2 and len(lines) == 1 and "holds notes.txt" in lines[0], err
    assert not partial and not lost


@pytest.mark.parametrize("name,body", [("extra.py", b"import os\n"), ("backup.safetensors", b"weights"),
                                       ("tokenizer-link.json", None)])
def test_upgrade_refuses_rather_than_drop_a_user_file_a_loader_reads(name, body, world, tmp_path, capsys):
    sb = _sandbox(tmp_path)
    ck = _as_legacy(shutil.copytree(world["ckpt"], sb / "ck"))
    if body is None:
        (ck / name).symlink_to("tokenizer.json")
    else:
        (ck / name).write_bytes(body)
    before = tree(sb)
    code, err = _cli(capsys, "upgrade", ck)
    after = tree(sb)
    lines = _error_lines(err)
    partial, lost = sorted(set(after) - set(before)), _lost(before, after)
    _refusal(f"upgrade-user-{name}", f"`ghosted upgrade` of a legacy checkpoint holding the user's {name}", code,
             err, partial, lost)
    assert code == 2 and len(lines) == 1 and name in lines[0], err
    assert not partial and not lost


def test_upgrade_of_a_current_checkpoint_touches_nothing(world, tmp_path, capsys):
    sb = _sandbox(tmp_path)
    ck = shutil.copytree(world["ckpt"], sb / "ck")
    (ck / "notes.txt").write_text("mine\n")
    before = tree(sb)
    code, err = _cli(capsys, "upgrade", ck)
    lost = _lost(before, tree(sb))
    _fault("upgrade-current-untouched", "user files inside a rewritten checkpoint", "`ghosted upgrade` of a "
           "current checkpoint holding a user file: nothing to rewrite", code, err, [], lost, code == 0 and not lost)
    assert code == 0 and not lost, err


# --------------------------------------------------------------------------- D. modes: umask, existing modes kept


def _modes(root: Path, kind: str) -> set[int]:
    """The permission bits of every `kind` ("file" or "dir") under root, root itself included for "dir"."""
    own = {stat.S_IMODE(root.stat().st_mode)} if kind == "dir" else set()
    return own | {v[2] for v in tree(root).values() if v[0] == kind}


@pytest.mark.parametrize("mask", [0o002, 0o022])
def test_new_outputs_follow_the_umask(mask, world, tmp_path, capsys):
    sb = _sandbox(tmp_path)
    user = tree(sb)
    with umask(mask):
        codes = [_cli(capsys, *_prune(world, sb / "ck", "--summary", str(sb / "summary.json"))),
                 _cli(capsys, *_calibrate(world, sb / "cal")),
                 _cli(capsys, "score", world["tiny"], "--calib", world["calib"], "--quiet", "--out", sb / "s.json"),
                 _cli(capsys, "export", world["plain"], "--gguf", sb / "m.gguf")]
    dirs, files = 0o777 & ~mask, 0o666 & ~mask
    seen = {"dirs": _modes(sb / "ck", "dir") | _modes(sb / "cal", "dir"),
            "files": _modes(sb / "ck", "file") | _modes(sb / "cal", "file")
            | {stat.S_IMODE((sb / n).stat().st_mode) for n in ("summary.json", "s.json", "m.gguf")}}
    lost = _lost(user, tree(sb))
    ok = all(c == 0 for c, _ in codes) and seen == {"dirs": {dirs}, "files": {files}} and not lost
    _fault(f"umask-{mask:03o}", "output modes", f"prune (+ --summary), calibrate, score --out and export under umask "
           f"{mask:03o}: folders {dirs:o}, files {files:o}", max(c for c, _ in codes),
           "".join(e for _, e in codes), [], lost, ok)
    assert all(c == 0 for c, _ in codes), codes
    assert seen == {"dirs": {dirs}, "files": {files}}, seen
    assert not lost


@dataclass(frozen=True)
class Existing:
    id: str
    description: str
    path: str  # the existing output, relative to the sandbox
    mode: int
    argv: Callable[[dict[str, Path], Path], list[object]]
    folder: bool = False


EXISTING = [
    Existing("mode-kept-summary", "prune --summary onto an existing 0640 file", "summary.json", 0o640,
             lambda w, sb: _prune(w, sb / "ck", "--summary", str(sb / "summary.json"))),
    Existing("mode-kept-score-out", "score --out onto an existing 0600 file", "s.json", 0o600,
             lambda w, sb: ["score", w["tiny"], "--calib", w["calib"], "--quiet", "--out", sb / "s.json"]),
    Existing("mode-kept-eval-out", "eval --out onto an existing 0664 file", "r.json", 0o664,
             lambda w, sb: ["eval", w["tiny"], "--ppl", w["text"], "--tasks", "none", "--ppl-windows", "1",
                            "--seq-len", "16", "--quiet", "--out", sb / "r.json"]),
    Existing("mode-kept-gguf", "export --gguf onto an existing 0640 GGUF", "m.gguf", 0o640,
             lambda w, sb: ["export", w["plain"], "--gguf", sb / "m.gguf"]),
    Existing("mode-kept-empty-out-folder", "prune --out into an existing empty 0750 folder", "ck", 0o750,
             lambda w, sb: _prune(w, sb / "ck"), folder=True),
]


@pytest.mark.parametrize("case", EXISTING, ids=lambda c: c.id)
def test_an_existing_output_keeps_its_mode(case: Existing, world, tmp_path, capsys):
    sb = _sandbox(tmp_path)
    target = sb / case.path
    if case.folder:
        target.mkdir()
    else:
        target.write_text("{}\n")
    os.chmod(target, case.mode)
    user = tree(sb / "user-data")
    with umask(0o022):
        code, err = _cli(capsys, *case.argv(world, sb))
    mode = stat.S_IMODE(target.stat().st_mode)
    lost = _lost(user, tree(sb / "user-data"))
    ok = code == 0 and mode == case.mode and not lost and (not case.folder or (target / MARKER).is_file())
    _fault(case.id, "output modes", f"{case.description} (umask 022): the mode stays {case.mode:o}", code, err, [],
           lost, ok)
    assert code == 0, err
    assert mode == case.mode, f"{mode:o} != {case.mode:o}"
    assert not lost


# --------------------------------------------------------------------------- E. killed runs: temps swept, data back


# Runs the CLI in a real process that SIGKILLs itself at the Nth rename ghosted.io makes (1: an output about to be
# put in place; 2 with an existing --force output: the old output moved aside, the new one not yet in).
_KILL_AT_RENAME = r"""
import os, signal, sys
import ghosted.io as gio, ghosted.io_temps as gtemps
n = int(sys.argv[1])
class _Os:
    calls = 0
    def replace(self, a, b):
        _Os.calls += 1
        if _Os.calls == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return os.replace(a, b)
    def __getattr__(self, name):
        return getattr(os, name)
gio.os = gtemps.os = _Os()  # every rename ghosted.io makes, in its temp helpers too
from ghosted.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _killed(n: int, *argv: object) -> int:
    proc = subprocess.run([sys.executable, "-c", _KILL_AT_RENAME, str(n), *map(str, argv)],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    return proc.returncode


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-g-" in p.name or ".old-g-" in p.name)


def test_killed_export_temp_is_removed_by_the_next_export(world, tmp_path, capsys):
    sb = _sandbox(tmp_path)
    (sb / ".m.gguf.k3j4h5g6.tmp").write_bytes(os.urandom(1024))  # an old-style temp name: the user's, kept
    user = tree(sb)
    _killed(1, "export", world["plain"], "--gguf", sb / "m.gguf")
    left = _temps(sb)
    big = sum(p.stat().st_size for t in left for p in (sb / t).rglob("*") if p.is_file())
    code, err = _cli(capsys, "export", world["plain"], "--gguf", sb / "m.gguf")
    stale, lost = _temps(sb), _lost(user, tree(sb))
    ok = bool(left) and big > 0 and code == 0 and not stale and (sb / "m.gguf").is_file() and not lost
    _fault("killed-export-temp-swept", "stale temps of killed runs", "kill -9 of `ghosted export` with the whole GGUF "
           "in its temp, then the same export again", code, err, stale, lost, ok)
    assert left and big > 0, "the kill should have left the GGUF's temp behind"
    assert code == 0 and (sb / "m.gguf").is_file(), err
    assert not stale, f"not removed: {stale}"
    assert not lost


def test_killed_prune_temp_is_removed_by_another_command(world, tmp_path, capsys):
    sb = _sandbox(tmp_path)
    user = tree(sb)
    _killed(1, *_prune(world, sb / "ck"))
    left = _temps(sb)
    code, err = _cli(capsys, *_calibrate(world, sb / "cal"))
    stale, lost = _temps(sb), _lost(user, tree(sb))
    ok = bool(left) and code == 0 and not stale and not (sb / "ck").exists() and not lost
    _fault("killed-prune-temp-swept", "stale temps of killed runs", "kill -9 of `ghosted prune` just before its "
           "output's rename, then `ghosted calibrate` into the same folder", code, err, stale, lost, ok)
    assert left, "the kill should have left the checkpoint's temp behind"
    assert code == 0 and not stale and not lost, err


def test_killed_json_write_temp_is_removed(world, tmp_path, capsys):
    sb = _sandbox(tmp_path)
    (sb / "s.json").write_text('{"mine": 1}\n')
    user = tree(sb)
    _killed(1, "score", world["tiny"], "--calib", world["calib"], "--quiet", "--out", sb / "s.json")
    left = _temps(sb)
    kept_old = (sb / "s.json").read_text() == '{"mine": 1}\n'
    code, err = _cli(capsys, *_calibrate(world, sb / "cal"))
    stale, lost = _temps(sb), _lost({k: v for k, v in user.items() if k != "s.json"}, tree(sb))
    ok = bool(left) and kept_old and code == 0 and not stale and not lost
    _fault("killed-json-write-temp-swept", "stale temps of killed runs", "kill -9 of `ghosted score --out FILE` just "
           "before the rename (FILE keeps its old content), then another command writes into the folder", code, err,
           stale, lost, ok)
    assert left and kept_old
    assert code == 0 and not stale and not lost, err


def test_killed_force_replace_puts_the_old_output_back(world, tmp_path, capsys):
    sb = _sandbox(tmp_path)
    shutil.copytree(world["ckpt"], sb / "ck")
    before = tree(sb)
    _killed(2, *_prune(world, sb / "ck", "--force"))
    gone = not (sb / "ck").exists()
    code, err = _cli(capsys, *_calibrate(world, sb / "cal"))
    after = tree(sb)
    stale, lost = _temps(sb), _lost(before, after)
    ok = gone and code == 0 and not stale and not lost
    _fault("killed-force-swap-restored", "kill -9 during a --force replace", "kill -9 of `ghosted prune --force` "
           "after the old output was moved aside, then another command writes into the folder", code, err, stale,
           lost, ok)
    assert gone, "the kill should have come between moving the old output aside and renaming the new one in"
    assert code == 0 and not stale, err
    assert not lost, f"changed or deleted: {lost}"


def test_case_count():
    """The issue asks for at least 25 distinct cases."""
    single = 1 + 1 + 1 + 1  # force-proven, upgrade-keeps, force-after-upgrade, upgrade-current
    n = len(DECOYS) + len(FORCES) + len(EXISTING) + single + 3 + 2 + 4  # + upgrade refusals, umasks, kills
    assert n >= 25

"""Safe outputs: a reader never sees half a file or half a folder, and ghosted deletes or replaces only what it
can prove it wrote.

- Every output, a folder (`atomic_dir`) or a file (`atomic_file`: --summary, eval --out, a GGUF), is built in a
  hidden temp folder beside it, `.NAME.tmp-g-HOST-PID-RAND`, and renamed into place. From its first moment the
  temp folder holds the marker file MARKER naming the temp folder itself and its writer (host, boot, pid and the
  pid's start time, command line).
- `remove_stale` deletes a temp folder only when its marker proves it: the marker names that very folder, and
  its writer is gone (same host and pid namespace, and the pid is dead or belongs to a newer process; or the
  machine rebooted since).
  A name alone proves nothing: a user's folder that merely looks like a temp is never touched.
- A finished output folder keeps the marker, now listing every file ghosted wrote with its sha256 (and, apart,
  the user's files it carried over, e.g. by `ghosted upgrade`). `force` replaces an existing folder only when
  that list or the folder's ghosted_manifest.json accounts for every file in it, unchanged; any other file is
  named in one line and nothing is deleted.
- In a folder shared with the user's own files (`compare --out-dir`), each file is written through new_temp_file
  and publish_file, and the folder's marker lists the files ghosted wrote there (`record_files`); a file ghosted
  no longer writes is deleted only when that record proves it ghosted's, unchanged (`remove_proven`).
- New files and folders get the usual mode (0666/0777 less the umask); a replaced file or folder keeps the mode
  it had. ghosted never changes the mode of anything it did not create.

This module writes; ghosted.io_temps makes, marks and sweeps the temp folders, ghosted.io_owned tells what a folder
holds and whose (and checks an output path before any work), ghosted.hashing hashes files.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ghosted.errors import GhostedError
from ghosted.hashing import cached_sha256
from ghosted.io_owned import _ancestors, _matches, _proof, _walk, check_out_dir
from ghosted.io_temps import (
    _TMP_RE,
    MARKER,
    _make_temp,
    _read_record,
    _version,
    _write_marker,
    _writer,
    remove_stale,
)

# A replaced folder (`replaces`) accounts for each of its entries; the caller vouches for these (see atomic_dir).
Rewrites = Callable[[Path, str], bool]


# --------------------------------------------------------------------------- writing


def new_temp_dir(parent: str | Path, name: str) -> Path:
    """A new hidden scratch folder in `parent`, marked as this process's (the killed writers' ones there are swept
    first); the caller removes it with shutil.rmtree, and if the process is killed first, the next writer into
    `parent` removes it (its marker proves it is ghosted's)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale(parent)
    return _make_temp(parent, name, "tmp")


@contextmanager
def temp_dir(parent: str | Path, name: str) -> Iterator[Path]:
    """A hidden scratch folder in `parent` (same file system, so renames out of it are atomic), always removed;
    if the process is killed, the next writer into `parent` removes it (its marker proves it is ghosted's)."""
    tmp = new_temp_dir(parent, name)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def carry(src: Path, dst: Path) -> None:
    """Put the user's entry `src` at `dst` unchanged (a hard link where possible, else a copy with its mode;
    a symlink as a symlink; a folder as a folder with its mode)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        dst.mkdir(exist_ok=True)
        os.chmod(dst, stat.S_IMODE(src.stat().st_mode))  # dst is ghosted's new folder: it takes the user's mode
    else:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def _same(a: Path, b: Path) -> bool:
    """`b` holds exactly what `a` holds (a file's bytes, a symlink's target, a folder)."""
    try:
        if a.is_symlink() or b.is_symlink():
            return a.is_symlink() and b.is_symlink() and os.readlink(a) == os.readlink(b)
        if a.is_dir() or b.is_dir():
            return a.is_dir() and b.is_dir()
        return a.is_file() and b.is_file() and cached_sha256(a) == cached_sha256(b)
    except OSError:
        return False


def _account(out: Path, tmp: Path, rewrites: Rewrites | None, flag: str) -> list[str]:
    """Every entry of the folder about to be replaced is ghosted's (its records prove it), vouched for by the
    caller (`rewrites(tmp, name)`: content it carried into `tmp` in another form), or carried into `tmp`
    unchanged; returns the carried ones (the user's). Anything else: refused, nothing replaced."""
    proof = _proof(out)
    owned, owned_dirs = proof if proof is not None else ({}, set())
    files, dirs, other = _walk(out)
    kept: list[str] = []
    entries = sorted(other + [r for r, p in files.items() if r not in owned or not _matches(p, owned[r])])
    entries += sorted(d for d in dirs if d not in owned_dirs and d not in _ancestors(owned))
    for rel in entries:
        if rewrites is not None and rewrites(tmp, rel):
            continue
        if _same(out / rel, tmp / rel):
            kept.append(rel)
            continue
        raise GhostedError(f"{flag} {out} holds {rel}, which ghosted did not write: it is never deleted, so the "
                           "folder was not replaced; move it out of the folder and run again")
    return kept


def _umask() -> int:
    """This process's umask, read without changing it where the system says it (Linux /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _usual_modes(files: dict[str, Path], dirs: set[str], tmp: Path, skip: set[str]) -> None:
    """Give what ghosted made in `tmp` the usual modes under the umask: some writers make their files private
    (safetensors writes 0600). `skip`: the user's entries carried over (hard links: their mode is the user's)."""
    mask = _umask()
    for want, paths in ((0o666 & ~mask, [p for rel, p in files.items() if rel not in skip]),
                        (0o777 & ~mask, [tmp / rel for rel in dirs if rel not in skip])):
        for p in paths:
            if stat.S_IMODE(p.lstat().st_mode) != want:
                os.chmod(p, want)


def _publish_dir(tmp: Path, out: Path, force: bool, kind: str, rewrites: Rewrites | None) -> None:
    if rewrites is None:
        check_out_dir(out, force)  # the folder may have appeared, or changed, while we worked
    elif out.is_symlink() or not out.is_dir():
        raise GhostedError(f"{out} is not a folder: nothing to rewrite")
    replacing = out.is_dir() and any(out.iterdir())
    kept = _account(out, tmp, rewrites, "--out") if replacing else []
    files, dirs, _ = _walk(tmp)
    _usual_modes(files, dirs, tmp, set(kept))
    files.pop(MARKER, None)
    doc = _read_record(tmp / MARKER) or {}
    _write_marker(tmp, {**doc, "kind": kind, "writer": _writer(), "version": _version(),
                        "files": {rel: cached_sha256(p) for rel, p in sorted(files.items()) if rel not in kept},
                        "dirs": sorted(dirs), "kept": kept})
    if out.is_dir():
        os.chmod(tmp, stat.S_IMODE(out.stat().st_mode))  # tmp is ours; the folder keeps the mode it had
    if not replacing:
        os.replace(tmp, out)
        return
    # Move the old output aside, then swap in the new one: a reader sees the old or the new folder, and a kill in
    # between leaves only marked hidden folders: the next run puts the old output back (if still free) and
    # removes them.
    before = set(_walk(out)[0])
    old = _make_temp(out.parent, out.name, "old", replacing=out.name)
    os.replace(out, old / "x")
    try:
        if set(_walk(old / "x")[0]) != before:  # something was added in the last instant: keep everything
            raise GhostedError(f"{out} changed while ghosted replaced it; nothing was replaced: run again")
        os.replace(tmp, out)
    except BaseException:
        if not os.path.lexists(out):
            os.replace(old / "x", out)
            shutil.rmtree(old, ignore_errors=True)  # only its marker is left
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(out: str | Path, force: bool = False, kind: str = "output",
               rewrites: Rewrites | None = None) -> Iterator[Path]:
    """Yield a temp folder to fill; on success it becomes `out` in one rename, on any failure it vanishes.

    An existing `out` is replaced only with `force` and when every file in it is provably ghosted's (see
    check_out_dir). `rewrites(tmp, name)` rewrites `out` in place instead (`ghosted upgrade`): then an entry of
    `out` that ghosted cannot prove it wrote must be vouched for by `rewrites` (its content is in `tmp` in a new
    form) or be in `tmp` unchanged (the user's, carried over: listed as `kept` in the marker), else nothing is
    replaced."""
    out = Path(out)
    if rewrites is None:
        out = check_out_dir(out, force)
    with temp_dir(out.parent, out.name) as tmp:
        yield tmp
        _publish_dir(tmp, out, force, kind, rewrites)


def _file_target(path: str | Path) -> Path:
    path = Path(path)
    if path.is_symlink():  # write where the link points: the user's link stays a link
        path = Path(os.path.realpath(path))
    if path.is_dir():
        raise GhostedError(f"{path} is a folder: give a file path")
    return path


def new_temp_file(path: str | Path) -> Path:
    """A path to write `path`'s new content to: a file in a marked temp folder beside it (publish_file puts it in
    place, discard_temp drops it; a killed writer's is removed by the next writer into that folder)."""
    path = _file_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent)
    # the temp folder's own marker is MARKER: a new marker is written beside it under another name
    return _make_temp(path.parent, path.name, "tmp") / (path.name if path.name != MARKER else f"{MARKER}.new")


def discard_temp(tmp: Path) -> None:
    """Remove the temp folder of new_temp_file, whatever it holds."""
    if _TMP_RE.match(tmp.parent.name) and (tmp.parent / MARKER).is_file():
        shutil.rmtree(tmp.parent, ignore_errors=True)


def publish_file(tmp: Path, path: str | Path) -> None:
    """Rename the finished `tmp` (from new_temp_file) onto `path`; a file already there keeps its mode."""
    path = _file_target(path)
    try:
        # tmp is ours: an existing file keeps its mode, a new one gets the usual mode under the umask
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) if path.is_file() else 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        discard_temp(tmp)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temp path to write; on success it replaces `path` in one rename, on any failure it vanishes."""
    tmp = new_temp_file(path)
    try:
        yield tmp
        publish_file(tmp, path)
    finally:
        discard_temp(tmp)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=float, sort_keys=False) + "\n")


# --------------------------------------------------------------------------- files in a folder shared with the user


def record_files(folder: str | Path, written: Iterable[str], removed: Iterable[str] = (), kind: str = "files") -> None:
    """Add the files ghosted just wrote into `folder` (by name, with their sha256 as they are now) to the folder's
    marker, and drop the names it removed or no longer writes, so that a later run can prove them its own
    (remove_proven). The marker is replaced atomically (keeping its mode) and everything else it records stays;
    an entry under the marker's name that is not a readable record of ghosted's is never replaced (then nothing
    is recorded, and nothing will be removed)."""
    folder = Path(folder)
    path = folder / MARKER
    doc = _read_record(path)
    if doc is None:
        if os.path.lexists(path):
            return
        doc = {"kind": kind, "writer": _writer(), "version": _version(), "dirs": [], "kept": []}
    files = dict(doc["files"]) if isinstance(doc.get("files"), dict) else {}
    written = list(written)
    for name in removed:
        files.pop(name, None)
    for name in written:
        p = folder / name
        if p.is_file() and not p.is_symlink():  # written through a user's link: the link is theirs
            files[name] = cached_sha256(p)
    if isinstance(doc.get("kept"), list):  # a user's file ghosted has now replaced is ghosted's
        doc["kept"] = [k for k in doc["kept"] if k not in written]
    write_text_atomic(path, json.dumps({**doc, "files": dict(sorted(files.items()))}, indent=1, sort_keys=True)
                      + "\n")


def remove_proven(path: str | Path) -> bool:
    """Delete the file `path` only when its folder's marker or manifest proves ghosted wrote it and it is unchanged
    since (a user's file of the same name, or ghosted's file the user edited, stays); True if it was deleted."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return False
    proof = _proof(path.parent)
    want = proof[0].get(path.name) if proof is not None else None  # None too for the records themselves
    if want is None or not _matches(path, want):
        return False
    path.unlink()
    return True


def probe_write(folder: str | Path) -> None:
    """Raise OSError unless ghosted can write in `folder` (permissions, a read-only mount, a full disk): makes a
    marked temp folder holding its marker file and removes it at once. A kill in between leaves only that temp,
    which the next probe or writer into the folder removes (its marker proves it ghosted's); the sweep runs first."""
    folder = Path(folder)
    remove_stale(folder)
    shutil.rmtree(_make_temp(folder, "ghosted-write-check", "tmp"), ignore_errors=True)

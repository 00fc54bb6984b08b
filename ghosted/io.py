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
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from ghosted.errors import GhostedError
from ghosted.json_io import parse_json


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks (the one hash of files: models, checkpoints, statistics)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None off glibc (musl, macOS, Windows)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_memory(collect: bool = True) -> None:
    """Free unreachable objects (`collect`: a full gc, ~0.3 s with transformers imported) and hand the C heap's
    free pages back to the system.

    glibc keeps freed memory in its arenas (resident) until the top of the heap is free; a load or a pass leaves
    its temporaries there, in the resident high-water mark of everything after it. Off glibc only the gc runs."""
    if collect:
        gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


MARKER = ".ghosted-output"  # in every temp folder and every output folder ghosted writes: who wrote it, and what
MANIFEST = "ghosted_manifest.json"  # a checkpoint's file list (checkpoint.format): also proves what ghosted wrote
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<what>tmp|old)-g-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[0-9a-f]{8}$")
_RECORD_MAX = 64 << 20  # bytes of a marker or manifest worth reading (a sharded model's lists are a few KB)
# A replaced folder (`replaces`) accounts for each of its entries; the caller vouches for these (see atomic_dir).
Rewrites = Callable[[Path, str], bool]


# --------------------------------------------------------------------------- who is writing


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"


@lru_cache(maxsize=1)
def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


@lru_cache(maxsize=1)
def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _started(pid: int) -> int | None:
    """When process `pid` started (clock ticks after boot; Linux), to tell it from a later process with its pid."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a process id ghosted records: never treat it as gone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _writer() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot": _boot_id(), "pidns": _pid_namespace(), "pid": pid,
            "started": _started(pid), "command": " ".join(sys.argv)[:500],
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _writer_gone(w: dict) -> bool:
    """The process that made a temp folder has ended (only ever decided for this host)."""
    if w.get("host") != socket.gethostname():
        return False  # another machine's writer (a shared file system): it cannot be checked from here
    boot = _boot_id()
    if boot and w.get("boot") and w["boot"] != boot:
        return True  # the machine rebooted since
    if w.get("pidns") != _pid_namespace():
        return False  # another container's process ids: cannot be checked from here
    pid = w.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    if not _alive(pid):
        return True
    now = _started(pid)
    return now is not None and isinstance(w.get("started"), int) and now != w["started"]  # pid reused


def _read_record(path: Path) -> dict | None:
    """A marker or manifest as a dict; None when absent, not a plain file, too big or not a JSON object."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > _RECORD_MAX:
            return None
        doc = parse_json(path.read_bytes(), str(path), "ghosted record", max_bytes=_RECORD_MAX)
    except (OSError, ValueError):  # JSONFileError is a ValueError
        return None
    return doc if isinstance(doc, dict) else None


def read_marker(folder: str | Path) -> dict | None:
    """The marker of a folder ghosted wrote (kind, writer, files, kept), or None."""
    return _read_record(Path(folder) / MARKER)


def _write_marker(folder: Path, doc: dict) -> None:
    with open(folder / MARKER, "w", encoding="utf-8") as f:  # one write: a torn marker only proves nothing
        f.write(json.dumps(doc, indent=1, sort_keys=True) + "\n")


def _make_temp(parent: Path, name: str, what: str, **extra: str) -> Path:
    """A new hidden folder in `parent` (mode 0777 less the umask), marked as this process's from the start."""
    for _ in range(100):
        tmp = parent / f".{name[:100]}.{what}-g-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(tmp)
        except FileExistsError:
            continue
        try:
            _write_marker(tmp, {"temp": tmp.name, "writer": _writer(), **extra})
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tmp
    raise GhostedError(f"cannot make a temp folder in {parent}: every name tried exists")


def _restore(entry: Path, doc: dict) -> bool:
    """A killed replace's moved-aside output goes back to its place if nothing took it; False if that failed."""
    name, old = doc.get("replacing"), entry / "x"
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or not old.is_dir() or old.is_symlink():
        return True
    target = entry.parent / name
    if os.path.lexists(target):
        return True  # the new output is in place: the old one is what was replaced
    try:
        os.replace(old, target)
    except OSError:
        return False
    return True


def remove_stale(parent: str | Path) -> list[Path]:
    """Delete the temp folders in `parent` whose marker proves ghosted made them and whose writer is gone;
    returns what was removed. A killed replace's old output is first put back where it was, if still free."""
    parent = Path(parent)
    removed: list[Path] = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    host = _host()
    for entry in entries:
        m = _TMP_RE.match(entry.name)
        if not m or m["host"] != host or entry.is_symlink() or not entry.is_dir():
            continue
        doc = _read_record(entry / MARKER)
        w = doc.get("writer") if doc else None
        if (not isinstance(w, dict) or doc.get("temp") != entry.name or w.get("pid") != int(m["pid"])
                or not _writer_gone(w)):
            continue
        if m["what"] == "old" and not _restore(entry, doc):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


# --------------------------------------------------------------------------- what a folder holds, and whose


_DIGESTS: dict[tuple[int, ...], str] = {}


def cached_sha256(path: Path) -> str:
    """file_sha256, remembered for the file as it is now (device, inode, size, mtime, ctime): a file ghosted
    hashes more than once in a run (manifest, marker, the check before a replace) is read once."""
    st = path.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    digest = _DIGESTS.get(key)
    if digest is None:
        digest = _DIGESTS[key] = file_sha256(path)
    return digest


def _walk(folder: Path) -> tuple[dict[str, Path], set[str], list[str]]:
    """(regular files {relative path: path}, folders, other entries: symlinks, devices, unreadable folders)."""
    files: dict[str, Path] = {}
    dirs: set[str] = set()
    other: list[str] = []

    def rel(p: Path) -> str:
        return p.relative_to(folder).as_posix()

    def unreadable(exc: OSError) -> None:
        other.append(rel(Path(exc.filename)) if exc.filename else ".")

    for root, dnames, fnames in os.walk(folder, onerror=unreadable):
        r = Path(root)
        for d in list(dnames):
            if (r / d).is_symlink():
                other.append(rel(r / d))
                dnames.remove(d)
            else:
                dirs.add(rel(r / d))
        for f in fnames:
            p = r / f
            try:
                regular = stat.S_ISREG(p.lstat().st_mode)
            except OSError:
                regular = False
            if regular:
                files[rel(p)] = p
            else:
                other.append(rel(p))
    return files, dirs, sorted(other)


def list_entries(folder: str | Path) -> dict[str, Path]:
    """Every entry under `folder` (files, folders, symlinks, ...) by its path relative to it, sorted."""
    folder = Path(folder)
    files, dirs, other = _walk(folder)
    return {rel: folder / rel for rel in sorted([*files, *dirs, *other]) if rel != "."}


def _ancestors(names: object) -> set[str]:
    out: set[str] = set()
    for name in names:
        parts = str(name).split("/")[:-1]
        out.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


def _proof(folder: Path) -> tuple[dict[str, frozenset[str] | None], set[str]] | None:
    """What the folder's own records prove ghosted wrote: ({file: its sha256s, None for the records themselves},
    folders); None when neither a marker with a file list nor a manifest is there. A file either record lists
    as the user's (`kept`) is never ghosted's."""
    marker, manifest = _read_record(folder / MARKER), _read_record(folder / MANIFEST)
    lists: list[dict] = []
    kept: set[str] = set()
    dirs: set[str] = set()
    if marker is not None and isinstance(marker.get("files"), dict):
        lists.append(marker["files"])
        dirs.update(d for d in marker.get("dirs") or [] if isinstance(d, str))
    if manifest is not None and manifest.get("algorithm") == "sha256" and isinstance(manifest.get("files"), dict):
        lists.append(manifest["files"])
    if not lists:
        return None
    for doc in (marker, manifest):
        if doc is not None and isinstance(doc.get("kept"), list):
            kept.update(k for k in doc["kept"] if isinstance(k, str))
    digests: dict[str, set[str]] = {}
    for files in lists:
        for name, digest in files.items():
            if isinstance(name, str) and isinstance(digest, str) and name not in kept:
                digests.setdefault(name, set()).add(digest)
    owned: dict[str, frozenset[str] | None] = {n: frozenset(d) for n, d in digests.items()}
    owned[MARKER] = None
    if manifest is not None:
        owned[MANIFEST] = None
    return owned, dirs - kept


def _matches(path: Path, want: frozenset[str] | None) -> bool:
    if want is None:
        return True
    try:
        return cached_sha256(path) in want
    except OSError:
        return False


def _foreign(folder: Path) -> list[str] | None:
    """The entries of `folder` ghosted cannot prove it wrote as they are now (user files first); None when the
    folder has no record of ghosted's at all."""
    proof = _proof(folder)
    if proof is None:
        return None
    owned, owned_dirs = proof
    files, dirs, other = _walk(folder)
    bad = sorted(other + [rel for rel, p in files.items() if rel not in owned or not _matches(p, owned[rel])])
    implied = _ancestors(n for n in owned if n in files) | owned_dirs | _ancestors(bad)
    return bad + sorted(d for d in dirs if d not in implied)


def owned_files(folder: str | Path) -> set[str]:
    """The files of `folder` that its marker or manifest proves ghosted wrote, unchanged since."""
    folder = Path(folder)
    proof = _proof(folder)
    if proof is None:
        return set()
    owned = proof[0]
    return {rel for rel, p in _walk(folder)[0].items() if rel in owned and _matches(p, owned[rel])}


def is_ghosted_output(path: str | Path) -> bool:
    """True for a folder ghosted wrote whose every file is still ghosted's own (so `force` may replace it)."""
    path = Path(path)
    return path.is_dir() and not path.is_symlink() and _foreign(path) == []


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


# --------------------------------------------------------------------------- checks before any work


def _writable_ancestor(path: Path, flag: str) -> None:
    """The nearest existing ancestor of `path` must be a writable folder."""
    anc = path.parent
    while not anc.exists():
        if anc == anc.parent:
            break
        anc = anc.parent
    if not anc.is_dir():
        raise GhostedError(f"{flag} {path}: {anc} is not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise GhostedError(f"{flag} {path}: cannot write in {anc} (permission denied); choose another path")


def _check_replace(out: Path, force: bool, flag: str) -> None:
    """An existing non-empty `out` may be replaced: `force`, and every entry provably ghosted's."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        if _proof(out) is None:
            raise GhostedError(f"{flag} {out} is an existing folder that ghosted did not write; it is never "
                               "replaced (not even with --force): choose another path or empty it yourself")
        raise GhostedError(f"{flag} {out} already exists (a ghosted output): pass --force to replace it")
    foreign = _foreign(out)
    if foreign is None:
        if (out / MARKER).is_file():
            raise GhostedError(f"{flag} {out} was written by an older ghosted that did not list its files, so "
                               "ghosted cannot tell them from yours and never replaces it: delete it yourself or "
                               "choose another path")
        raise GhostedError(f"{flag} {out} is an existing folder that ghosted did not write; it is never replaced "
                           "(not even with --force): choose another path or empty it yourself")
    if foreign:
        raise GhostedError(f"{flag} {out} holds {foreign[0]}{_more(foreign)}, which ghosted did not write (or which "
                           "changed since): it is never deleted, so the folder is not replaced, not even with "
                           "--force; move it out of the folder or choose another path")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise GhostedError(f"{flag} {out}: cannot replace it, {out.parent} is not writable")


def check_out_dir(out: str | Path, force: bool = False, flag: str = "--out") -> Path:
    """Refuse, before any work, an output folder that cannot be written or must not be replaced."""
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise GhostedError(f"{flag} {out} exists and is not a folder; choose another path")
    _writable_ancestor(out, flag)
    if out.parent.is_dir():
        remove_stale(out.parent)  # first: a killed replace's old output is back in place before it is judged
    _check_replace(out, force, flag)
    return out


def check_out_file(path: str | Path | None, flag: str) -> Path | None:
    """Refuse, before any work, a file output that is a folder or sits where nothing can be written."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise GhostedError(f"{flag} {path} is a folder: give a file path")
    if path.exists() and not os.access(path, os.W_OK):
        raise GhostedError(f"{flag} {path} is not writable")
    _writable_ancestor(path, flag)
    return path


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


@lru_cache(maxsize=1)
def _version() -> str:
    from ghosted.version import __version__

    return __version__


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

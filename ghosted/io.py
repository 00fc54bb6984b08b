"""Safe outputs: a reader never sees half a file or half a folder, and a user's folder is never replaced.

Every folder ghosted writes is built in a hidden temp folder beside it and renamed into place
(`atomic_dir`). The temp folder's name carries the host and the writer's pid, so the next writer into the
same parent removes the leftovers of a run that was killed (`remove_stale`). A finished output carries a
`.ghosted-output` marker: only a folder with that marker (or the layout of an output written before the
marker existed) is ever replaced, and only with `force`.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from ghosted.errors import GhostedError


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


MARKER = ".ghosted-output"
# Outputs of versions that wrote no marker, by the files they always hold (checkpoint, calibration, solution, model
# cache); the folder must also hold nothing but files of the kinds ghosted writes.
_LEGACY_SIGNATURES = (("config.json",), ("calibration.json", "tokens.safetensors"),
                      ("plan.json", "operators.safetensors"), ("ghosted_source.json", "config.json"))
_WRITTEN_SUFFIXES = {".json", ".safetensors", ".py", ".md", ".png", ".txt", ".model", ".jinja"}
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<what>tmp|old)-g-(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)-[A-Za-z0-9_]+$")
# Temp folders of versions that put no pid in the name: removed once surely abandoned.
_LEGACY_TMP_RE = re.compile(r"^\.?.+\.tmp-[a-z0-9_]{8}$")
LEGACY_TMP_AGE_S = 6 * 3600


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _only_written_files(path: Path) -> bool:
    return all(p.is_file() and not p.is_symlink() and p.suffix in _WRITTEN_SUFFIXES for p in path.iterdir())


def is_ghosted_output(path: Path) -> bool:
    """True for a folder this package wrote (marker, or the layout of an older version's output)."""
    path = Path(path)
    if (path / MARKER).is_file():
        return True
    if not path.is_dir() or not _only_written_files(path):
        return False
    for names in _LEGACY_SIGNATURES:
        if all((path / n).is_file() for n in names):
            if names == ("config.json",):
                try:
                    if "ghosted" not in json.loads((path / "config.json").read_text(encoding="utf-8")):
                        continue
                except (OSError, ValueError, TypeError):
                    continue
            return True
    return False


def remove_stale(parent: Path) -> list[Path]:
    """Delete temp folders in `parent` left by killed writers on this host; returns what was removed."""
    parent = Path(parent)
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    host, now = _host(), time.time()
    for entry in parent.iterdir():
        if not entry.is_dir() or entry.is_symlink():
            continue
        m = _TMP_RE.match(entry.name)
        if m:
            stale = m["host"] == host and not _alive(int(m["pid"]))
        else:
            try:
                stale = (bool(_LEGACY_TMP_RE.match(entry.name)) and now - entry.stat().st_mtime > LEGACY_TMP_AGE_S
                         and _only_written_files(entry))
            except OSError:
                stale = False
        if stale:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


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


def check_out_dir(out: str | Path, force: bool = False, flag: str = "--out") -> Path:
    """Refuse, before any work, an output folder that cannot be written or must not be replaced."""
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise GhostedError(f"{flag} {out} exists and is not a folder; choose another path")
    _writable_ancestor(out, flag)
    if out.is_dir() and any(out.iterdir()):
        if not is_ghosted_output(out):
            raise GhostedError(f"{flag} {out} is an existing folder that ghosted did not write; it is never "
                               "replaced (not even with --force): choose another path or empty it yourself")
        if not force:
            raise GhostedError(f"{flag} {out} already exists (a ghosted output): pass --force to replace it")
        if not os.access(out.parent, os.W_OK | os.X_OK):
            raise GhostedError(f"{flag} {out}: cannot replace it, {out.parent} is not writable")
    remove_stale(out.parent)
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


def _temp_name(name: str, what: str) -> str:
    return f".{name}.{what}-g-{_host()}-{os.getpid()}-"


@contextmanager
def temp_dir(parent: str | Path, name: str) -> Iterator[Path]:
    """A hidden scratch folder in `parent` (same file system, so renames out of it are atomic), always removed;
    if the process is killed, the next writer into `parent` removes it."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale(parent)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_name(name, "tmp"), dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_dir(out: str | Path, force: bool = False, kind: str = "output") -> Iterator[Path]:
    """Yield a temp folder to fill; on success it becomes `out` in one rename, on any failure it vanishes.

    An existing `out` is replaced only if it is a ghosted output and `force` is set (see check_out_dir)."""
    out = check_out_dir(out, force)
    with temp_dir(out.parent, out.name) as tmp:
        yield tmp
        (tmp / MARKER).write_text(json.dumps({"kind": kind}) + "\n", encoding="utf-8")
        check_out_dir(out, force)  # the folder may have appeared while we worked
        if out.is_dir():
            # Move the old output aside, then swap in the new one: a reader sees the old or the new folder,
            # and a kill in between leaves only hidden folders, removed by the next run.
            old = Path(tempfile.mkdtemp(prefix=_temp_name(out.name, "old"), dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    if path.is_dir():
        raise GhostedError(f"{path} is a folder: give a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=float, sort_keys=False) + "\n")

"""Marked temp folders (see ghosted.io for the rules): the marker MARKER that names a temp folder and its writer
(host, boot, pid and the pid's start time, command line) from its first moment, reading and writing such records,
and `remove_stale`, which deletes a temp folder only when its marker proves it and its writer is gone."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import sys
import time
from functools import lru_cache
from pathlib import Path

from ghosted.errors import GhostedError
from ghosted.json_io import parse_json

MARKER = ".ghosted-output"  # in every temp folder and every output folder ghosted writes: who wrote it, and what
MANIFEST = "ghosted_manifest.json"  # a checkpoint's file list (checkpoint.format): also proves what ghosted wrote
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<what>tmp|old)-g-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[0-9a-f]{8}$")
_RECORD_MAX = 64 << 20  # bytes of a marker or manifest worth reading (a sharded model's lists are a few KB)


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


@lru_cache(maxsize=1)
def _version() -> str:
    from ghosted.version import __version__

    return __version__


# --------------------------------------------------------------------------- markers and temp folders


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

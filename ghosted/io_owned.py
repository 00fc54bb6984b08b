"""What a folder holds, and whose (see ghosted.io for the rules): the files and folders its marker or manifest proves
ghosted wrote, unchanged since, and the checks made on an output path before any work."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ghosted.errors import GhostedError
from ghosted.hashing import cached_sha256
from ghosted.io_temps import MANIFEST, MARKER, _read_record, remove_stale


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

"""Boundary checks shared by every command and the Python API: devices, sequence lengths, paths, user files.

Each check raises a one-line GhostedError naming the bad value and the fix, and runs before any work is
written. `describe_fault()` turns an environment fault (disk full, file-size limit, read-only folder, a locked
registry database) into the one line the CLI prints.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ghosted.errors import GhostedError
from ghosted.io import probe_write

DEVICE_HELP = "use cpu, cuda, cuda:N (or mps on Apple silicon)"


# --------------------------------------------------------------------------- numbers


def check_whole(value: Any, low: int, flag: str) -> int:
    """A whole number >= low (bool is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise GhostedError(f"{flag} must be a whole number >= {low}, got {value!r}")
    return value


# --------------------------------------------------------------------------- devices


def check_device(device: Any, flag: str = "--device") -> str:
    """`device` names a device torch has here: cpu, an existing cuda:N, mps, xpu. Returns it as given."""
    import torch

    if not isinstance(device, (str, torch.device)):
        raise GhostedError(f"{flag} must be a device name, got {device!r}: {DEVICE_HELP}")
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise GhostedError(f"{flag} {device!r} is not a device: {DEVICE_HELP}") from None
    if d.type == "cpu":
        return str(device)
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise GhostedError(f"{flag} {device}: {why}; use --device cpu")
        count = torch.cuda.device_count()
        if d.index is not None and d.index >= count:
            raise GhostedError(f"{flag} {device}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
        return str(device)
    backend = getattr(torch.backends, d.type, None) if d.type == "mps" else getattr(torch, d.type, None)
    if d.type in ("mps", "xpu") and backend is not None and backend.is_available():
        return str(device)
    raise GhostedError(f"{flag} {device}: no {d.type} device is available here; {DEVICE_HELP}")


# --------------------------------------------------------------------------- sequence length


def max_positions(config: Any) -> int | None:
    """The longest sequence the model's position table covers (None when the config does not say)."""
    cfg = getattr(config, "get_text_config", lambda: config)()
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def check_seq_len(config: Any, seq_len: int, flag: str = "--seq-len", fix: str | None = None) -> None:
    """seq_len fits the model's positions (beyond them the model's outputs are meaningless or it crashes)."""
    limit = max_positions(config)
    if limit is not None and seq_len > limit:
        raise GhostedError(f"{flag} {seq_len} is longer than the model's {limit} positions "
                           f"(max_position_embeddings): {fix or f'use {flag} {limit} or less'}")


# --------------------------------------------------------------------------- paths


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable(path: Path, flag: str, kind: str = "file") -> None:
    """An output path can be written: not the wrong kind of thing, and its folder accepts new files.

    kind: "file" (a JSON/markdown file) or "folder". The folder check really creates (and removes) a marked
    temp folder holding a small file (ghosted.io.probe_write), which catches read-only mounts, permissions, a
    parent that is a file, and a full disk; a check killed in between leaves only that temp, which the next
    check or writer into the folder removes.
    """
    path = Path(path)
    if kind == "file" and path.is_dir():
        raise GhostedError(f"{flag} {path} is a folder: give a file path, e.g. {path / 'results.json'}")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise GhostedError(f"{flag} {path} exists and is not a folder: give a folder path")
    base = _existing_ancestor(path.parent if path.parent != path else path)
    if not base.is_dir():
        raise GhostedError(f"{flag} {path}: {base} is a file, not a folder; choose another {flag}")
    # The output is written beside the target and renamed; a folder that exists is also written into.
    for folder in (base, path) if kind == "folder" and path.is_dir() else (base,):
        try:
            probe_write(folder)  # a marked temp, removed at once (a killed check's by the next one)
        except OSError as exc:  # the probe writes a file: a full disk is refused here too, before any work
            why = _OS_FIX.get(exc.errno) or f"{exc.strerror}; choose a folder you can write to"
            raise GhostedError(f"{flag} {path}: cannot write in {folder}: {why}") from None


# Output arguments of the commands: (command, argparse dest) -> file or folder. Anything else named `out*`
# or `summary` is checked as a file.
OUTPUT_KINDS = {("prune", "out"): "folder", ("calibrate", "out"): "folder", ("solve", "out"): "folder",
                ("fuse", "out"): "folder", ("search", "out"): "folder", ("heal", "out"): "folder",
                ("compare", "out_dir"): "folder", ("register", "reports"): "folder",
                ("bench", "out"): "prefix", ("report", "out_dir"): "existing folder"}


def check_outputs(command: str, args: Any) -> None:
    """Every output path of a parsed command can be written (before the command does any work)."""
    for dest, value in sorted(vars(args).items()):
        if not isinstance(value, Path) or not (dest.startswith("out") or dest in ("summary", "reports")):
            continue
        kind = OUTPUT_KINDS.get((command, dest), "file")
        flag = dest if kind == "existing folder" else "--" + dest.replace("_", "-")
        if kind == "existing folder":
            continue  # read from and written into by the command itself, which says what is missing
        if kind == "prefix":  # OUT.json and OUT.md
            for suffix in (".json", ".md"):
                check_writable(value.with_suffix(suffix), flag, "file")
            continue
        check_writable(value, flag, kind)


@contextlib.contextmanager
def reading(path: Path, what: str, fix: str) -> Iterator[None]:
    """Turn a broken user file (bad JSON, missing key, truncated tensors) into one line naming the file."""
    try:
        yield
    except GhostedError:
        raise
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise GhostedError(f"{path}: not a valid {what} ({_first_line(exc)}); {fix}") from exc
    except Exception as exc:  # noqa: BLE001 - safetensors' own error type is not importable by one stable name
        if type(exc).__name__ != "SafetensorError":
            raise
        raise GhostedError(f"{path}: not a valid {what} ({_first_line(exc)}); {fix}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    name = type(exc).__name__
    return f"{name}: {text[0][:200]}" if text else name


# --------------------------------------------------------------------------- environment faults


_OS_FIX = {
    errno.ENOSPC: "no space left on the device: free some space or write somewhere else",
    errno.EDQUOT: "disk quota exceeded: free some space or write somewhere else",
    errno.EFBIG: "file too large for this process's file-size limit (ulimit -f): raise it "
                 "(`ulimit -f unlimited`) or write smaller outputs",
    errno.EACCES: "permission denied: choose a path you can write to, or fix its permissions",
    errno.EPERM: "operation not permitted: choose a path you can write to, or fix its permissions",
    errno.EROFS: "read-only file system: write somewhere else",
    errno.ENOENT: "no such file or folder: check the path",
    errno.EISDIR: "is a folder where a file was expected: give a file path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EMFILE: "too many open files: raise the limit (`ulimit -n`)",
    errno.ENOMEM: "out of memory: use a smaller batch, --dtype bfloat16, or a machine with more memory",
    errno.EIO: "input/output error from the disk: check the device",
}
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]


def _size_limit_note(code: int) -> str:
    """A finite file-size limit (ulimit -f) makes writes fail in ways that do not name it (e.g. no temp folder)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, OSError, ValueError):
        return ""
    if soft == resource.RLIM_INFINITY or code == errno.EFBIG:
        return ""
    return f" (this process has a file-size limit of {soft} bytes: `ulimit -f`; raise it with `ulimit -f unlimited`)"


def describe_fault(exc: BaseException) -> str | None:
    """One line for an environment fault (OS error, out of memory, locked database); None for anything else."""
    for e in _chain(exc):
        if "database is locked" in str(e):
            return ("the registry database is locked by another process: wait for it to finish (or stop it) "
                    "and run the command again")
    for e in _chain(exc):
        if isinstance(e, UnicodeDecodeError):
            return f"an input file is not UTF-8 text ({e.reason} at byte {e.start}): check the files you passed"
        if isinstance(e, OSError) and e.errno is not None:
            where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
            fix = _OS_FIX.get(e.errno, f"{e.strerror or os.strerror(e.errno)}")
            if not where and e.strerror and e.strerror != os.strerror(e.errno):
                where = str(e.strerror)[:200]  # e.g. tempfile: "No usable temporary directory found in [...]"
            return (f"{where}: {fix}" if where else fix) + _size_limit_note(e.errno)
        m = _RUST_OS_ERROR.search(str(e))  # safetensors/tokenizers report OS errors as text
        if m and int(m.group(1)) in _OS_FIX:
            return _OS_FIX[int(m.group(1))] + f" ({_first_line(e)})" + _size_limit_note(int(m.group(1)))
        if isinstance(e, MemoryError) or "out of memory" in str(e).lower():
            return _OS_FIX[errno.ENOMEM]
    return None


# --------------------------------------------------------------------------- a solved plan against a model


def check_solution(sol: Any, model: Any, where: Path | str) -> None:
    """A solution folder fits this model: layer indices in range, known operator kinds, d-sized finite tensors."""
    import torch

    from ghosted.method import arch
    from ghosted.method.operator import OPERATOR_TENSORS

    L, d = arch.num_layers(model), int(model.config.hidden_size)
    removed = sol.removed
    if (not isinstance(removed, list) or not removed or len(set(removed)) != len(removed)
            or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < L for i in removed)
            or len(removed) >= L):
        raise GhostedError(f"{where}: removed layers {removed!r} do not fit this {L}-layer model "
                           "(distinct indices in 0..L-1, at least one layer kept): solve again for this model")
    for (s, b), op in sol.operators.items():
        if op.kind not in ("full", "lowrank", "scalar", "fold_down", "identity"):
            raise GhostedError(f"{where}: operator {s}-{b} has unknown kind {op.kind!r}: solve again")
        for name in OPERATOR_TENSORS:
            t = getattr(op, name)
            if t is None:
                continue
            rows = 1 if name == "detect_b" else d  # the sink detector's threshold is one number
            if t.shape[0] != rows or (name in ("W", "T") and tuple(t.shape) != (d, d)):
                raise GhostedError(f"{where}: operator {s}-{b} tensor {name} has shape {list(t.shape)}, "
                                   f"this model's hidden size is {d}: solve again for this model")
            if not bool(torch.isfinite(t).all()):
                raise GhostedError(f"{where}: operator {s}-{b} tensor {name} holds NaN or inf: solve again")
        if op.kind == "scalar" and not (isinstance(op.scale, (int, float)) and math.isfinite(op.scale)):
            raise GhostedError(f"{where}: operator {s}-{b} scale {op.scale!r} is not a finite number: solve again")

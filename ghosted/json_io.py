"""The one safe JSON reader: every JSON file ghosted reads (sidecars, manifests, weight indexes, metrics, the
metadata of calibration and solution folders) goes through `read_json` / `parse_json`.

Such a file is small and shallow, so anything else is refused before it can cost memory or time, each with one
GhostedError line that names the file, what it should be and the fix (mirrors ghosted.config.yaml_io):

- files over `max_bytes` (MAX_BYTES, 4 MiB, unless the call site says otherwise: a tokenizer.json is larger) are
  refused before parsing, and only max_bytes + 1 bytes are ever read;
- nesting deeper than MAX_DEPTH levels is refused on a scan of the brackets, before the parser recurses;
- bytes that are not UTF-8 and text that is not JSON are one line quoting the parser's problem and position,
  never the offending text itself;
- `expect` checks the top-level shape (an object or a list), and `need` a required key with its type.

Numbers: NaN and Infinity are read as Python reads them (ghosted's own writers use default=float).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ghosted.errors import GhostedError, brief

MAX_BYTES = 4 << 20  # 4 MiB: ghosted's sidecars and a model's config.json are a few KB, a big run's search.json ~1 MB
MAX_DEPTH = 64  # nesting levels: ghosted's files use fewer than 10
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = str.maketrans("", "", "".join(chr(c) for c in range(128) if chr(c) not in "[]{}"))
_KINDS = {dict: "a JSON object", list: "a JSON list", str: "a string", int: "a whole number", float: "a number",
          bool: "true or false"}


class JSONFileError(GhostedError, ValueError):
    """A JSON file that cannot be used. Also a ValueError, so a caller that treats any unreadable file as absent
    (`except (OSError, ValueError)`) keeps doing so, while everything else sees the one-line GhostedError."""


def _kind(value: Any) -> str:
    for t, name in ((bool, "true or false"), (dict, "a JSON object"), (list, "a JSON list"), (str, "a string"),
                    (int, "a whole number"), (float, "a number")):
        if isinstance(value, t):
            return name
    return "null" if value is None else type(value).__name__


def _expected(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(_KINDS.get(k, k.__name__) for k in kinds)


def _depth(text: str) -> int:
    """The deepest bracket nesting of a JSON text, strings left out (a linear scan, no recursion)."""
    deepest = level = 0
    for ch in _STRING.sub("", text).translate(_BRACKETS):
        if ch in "[{":
            level += 1
            deepest = max(deepest, level)
        else:
            level -= 1
    return deepest


def _is(value: Any, kind: type | tuple[type, ...]) -> bool:
    """isinstance, except that true/false is not a number unless bool is asked for."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)


def _fail(where: str, what: str, problem: str, fix: str) -> JSONFileError:
    return JSONFileError(f"{where}: not a valid {what}: {problem}" + (f"; {fix}" if fix else ""))


def parse_json(data: str | bytes, where: str = "<string>", what: str = "JSON file", *, fix: str = "",
               expect: type | tuple[type, ...] | None = None, max_bytes: int = MAX_BYTES,
               max_depth: int = MAX_DEPTH, pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """A JSON text under the bounds above (`where` and `what` name it in errors); `expect`: the top-level type;
    `pairs_hook`: json's object_pairs_hook (a ValueError it raises is a one-line error too)."""
    if len(data) > max_bytes:
        raise _fail(where, what, f"{len(data)} bytes, over the {max_bytes} byte limit", fix)
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise _fail(where, what, f"not UTF-8 text (byte {exc.start}, {data[exc.start]:#04x}, is not valid utf-8)", fix) \
                from None
    depth = _depth(data)
    if depth > max_depth:
        raise _fail(where, what, f"nested {depth} levels deep, over the limit of {max_depth}", fix)
    try:
        doc = json.loads(data, object_pairs_hook=pairs_hook)
    except json.JSONDecodeError as exc:
        msg = " ".join(exc.msg.split())[:120]
        raise _fail(where, what, f"not valid JSON ({msg} at line {exc.lineno}, column {exc.colno})", fix) from None
    except (RecursionError, ValueError) as exc:  # ValueError: e.g. a number with more than 4300 digits
        raise _fail(where, what, f"not valid JSON ({brief(str(exc), 120)})", fix) from None
    if expect is not None and not _is(doc, expect):
        raise _fail(where, what, f"expected {_expected(expect)} at the top level, got {_kind(doc)}", fix)
    return doc


def read_json(path: str | Path, what: str = "JSON file", *, fix: str = "",
              expect: type | tuple[type, ...] | None = None, max_bytes: int = MAX_BYTES,
              max_depth: int = MAX_DEPTH) -> Any:
    """A JSON file under the bounds above: a missing, too big, unreadable or malformed file is one line naming
    `path`, `what` it should be and the `fix`."""
    path = Path(path)
    if not path.is_file():
        raise JSONFileError(f"{path} not found" + (f" (a {what} is a file)" if path.exists() else "")
                           + (f"; {fix}" if fix else ""))
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise _fail(str(path), what, f"{size} bytes, over the {max_bytes} byte limit", fix)
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise JSONFileError(f"{path}: cannot read the {what} ({exc.strerror or type(exc).__name__})") from None
    return parse_json(data, str(path), what, fix=fix, expect=expect, max_bytes=max_bytes, max_depth=max_depth)


def need(doc: dict, key: str, kind: type | tuple[type, ...], where: str | Path, what: str = "JSON file",
         fix: str = "") -> Any:
    """doc[key], which must be present and of `kind` (bool is not a number here): one line naming the key."""
    if key not in doc:
        raise _fail(str(where), what, f"it has no {key!r}", fix)
    value = doc[key]
    if not _is(value, kind):
        raise _fail(str(where), what, f"{key!r} must be {_expected(kind)}, got {brief(value, 60)}", fix)
    return value


INDEX_MAX_BYTES = 32 << 20  # a weight index lists one line per tensor: ~100 KB for a 70B model


def index_shards(index: str | Path) -> list[str]:
    """The shard files a `model.safetensors.index*.json` names (sorted, each once): its `weight_map` must map
    tensor names to plain file names in the same folder (no folders, no `..`)."""
    what, fix = "weight index", "save the model again (save_pretrained) or restore the file"
    doc = read_json(index, what, fix=fix, expect=dict, max_bytes=INDEX_MAX_BYTES)
    weight_map = need(doc, "weight_map", dict, index, what, fix)
    shards = set()
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).name != shard or shard in (".", ".."):
            raise _fail(str(index), what, f"tensor {brief(name, 60)} maps to {brief(shard, 60)}, not a file name "
                                          "in the model folder", fix)
        shards.add(shard)
    if not shards:
        raise _fail(str(index), what, "its weight_map is empty", fix)
    return sorted(shards)

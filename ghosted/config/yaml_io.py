"""The one safe YAML reader: every user YAML file the ghosted package reads (params files) goes through `load_yaml`.

A params file is a small mapping a few levels deep, so anything else is refused before it can cost memory or
time, each with one GhostedError line that names the file:

- files over MAX_BYTES (1 MiB) are refused before parsing (only MAX_BYTES + 1 bytes are ever read);
- an alias (`*name`) counts as the whole value it names, so the bounds below hold for the value as loaded:
  nested aliases are how a 400-byte "billion laughs" file expands to gigabytes, and such a file is refused at
  once, while an ordinary alias (a repeated `eval:` block, as yaml.safe_dump writes one) loads;
- nesting deeper than MAX_DEPTH levels is refused (the composer recurses once per level), and so are more
  than MAX_NODES keys and values (a params file holds tens); all three are checked on the parser's event
  stream, before any node is built;
- a key written twice in one mapping is refused (plain YAML loaders keep the last one silently);
- parse errors quote PyYAML's problem and position only, cut to a short line.

Only the safe tags are built (yaml.CSafeLoader, or yaml.SafeLoader without libyaml): no Python objects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ghosted.errors import GhostedError, brief

MAX_BYTES = 1 << 20  # 1 MiB: the committed params.yaml is about 4 KB
MAX_DEPTH = 20  # nesting levels: params files use 4 (file > section > option > list)
MAX_NODES = 10_000  # keys, values and list items together: the committed params.yaml has about 100
_MERGE_TAG = "tag:yaml.org,2002:merge"


def _loader(data: str | bytes) -> Any:
    """A safe loader over `data`: libyaml's (C) where PyYAML has it, else the pure-Python one."""
    import yaml

    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)(data)


def _prescan(data: str | bytes, path: str) -> None:
    """Walk the parser's events once, before any node exists. An alias counts as the whole value it names, so the
    bounds hold for the value as loaded: at most MAX_NODES keys and values and MAX_DEPTH levels (a nested-alias
    "billion laughs" file is refused at once; the composer recurses once per level, so depth is checked first)."""
    import yaml

    loader = _loader(data)
    nodes = 0
    open_: list[list[Any]] = []  # per open collection: [anchor, nodes at its start, deepest level reached inside]
    sizes: dict[str, tuple[int, int]] = {}  # anchor -> (nodes, levels) of the value it names
    try:
        while not loader.check_event(yaml.StreamEndEvent):
            event = loader.get_event()
            line = event.start_mark.line + 1 if event.start_mark else "?"
            if isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                anchor, start, deepest = open_.pop()
                if anchor is not None:  # the value it names: its nodes, and the levels from it down
                    sizes[anchor] = (nodes - start, deepest - len(open_))
                continue
            if not isinstance(event, yaml.NodeEvent):
                continue
            count, levels = sizes.get(event.anchor, (1, 0)) if isinstance(event, yaml.AliasEvent) else (1, 0)
            if isinstance(event, yaml.ScalarEvent) and event.anchor is not None:
                sizes[event.anchor] = (1, 0)
            if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                open_.append([event.anchor, nodes, len(open_) + 1])
                levels = 0
            nodes += count
            reach = len(open_) + levels
            expanded = ", aliases expanded" if isinstance(event, yaml.AliasEvent) else ""
            if nodes > MAX_NODES:
                raise GhostedError(f"{path}: more than {MAX_NODES} keys and values{expanded} (line {line}); "
                                   "a params file holds a few settings per section")
            if reach > MAX_DEPTH:
                raise GhostedError(f"{path}: nested deeper than {MAX_DEPTH} levels{expanded} (line {line}); "
                                   "a params file is a mapping of sections of options")
            for entry in open_:
                entry[2] = max(entry[2], reach)
    finally:
        loader.dispose()


def _check_keys(loader: Any, root: Any, path: str) -> None:
    """Refuse a key written twice in any mapping: "duplicate key 'remove' in prune: (line 7; first at line 3)"."""
    import yaml

    stack: list[tuple[Any, str]] = [(root, "")]
    while stack:
        node, where = stack.pop()
        if isinstance(node, yaml.SequenceNode):
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(node.value))
            continue
        if not isinstance(node, yaml.MappingNode):
            continue
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:  # `<<:` merges are resolved by the loader itself
                stack.append((value_node, where))
                continue
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the loader refuses it with its own error
                continue
            if first is not None:
                section = f"{_plain(where, 60)}:" if where else "the top level"
                raise GhostedError(f"{path}: duplicate key {brief(key, 40)} in {section} (line {line}; first at line "
                                   f"{first}); write each key once")
            seen[key] = line
            name = _plain(key, 40) if isinstance(key, str) else brief(key, 40)
            stack.append((value_node, f"{where}.{name}" if where else name))


def _plain(text: Any, limit: int) -> str:
    """Text for an error line: one line, at most `limit` characters ("..." marks a cut)."""
    text = " ".join(str(text)[: 2 * limit].split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _problem(exc: Exception) -> str:
    """A YAML error as one short clause: PyYAML's problem and where it is, never the offending text itself."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
    at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return _plain(problem, 120) + at


def parse_yaml(data: str | bytes, path: str = "<string>") -> Any:
    """A YAML document under the bounds above (`path` names it in errors); an empty document is None."""
    import yaml

    if len(data) > MAX_BYTES:
        raise GhostedError(f"{path}: {len(data)} characters, over the {MAX_BYTES} limit for a params file")
    try:
        _prescan(data, path)
        loader = _loader(data)
        try:
            root = loader.get_single_node()
            if root is None:
                return None
            _check_keys(loader, root, path)
            return loader.construct_document(root)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise GhostedError(f"{path}: not valid YAML: {_problem(exc)}") from None
    except RecursionError:
        raise GhostedError(f"{path}: nested too deeply to read") from None


def load_yaml(path: str | Path) -> Any:
    """A YAML file under the bounds above: missing, too big, unreadable or malformed files are one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise GhostedError(f"config file not found: {path}")
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise GhostedError(f"{path}: the file is {size} bytes, over the {MAX_BYTES} byte limit for a params "
                               "file (a params file is a few KB)")
        with path.open("rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise GhostedError(f"{path}: cannot read the config file ({exc.strerror or type(exc).__name__})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GhostedError(f"{path}: cannot read the config file (not UTF-8 text: byte {exc.start} is "
                           f"{data[exc.start]:#04x}); save it as UTF-8") from None
    return parse_yaml(text, str(path))

"""Typed building of the config sections: coercion, checks, field options and the one config-to-JSON.

Each section is a frozen dataclass; `build()` turns a mapping into one, rejecting unknown keys, wrong types and
non-finite numbers with a one-line GhostedError that names the key, the value and what is allowed, and the
section's own `__post_init__` checks ranges and cross-field rules. `option()` declares a field once: its default,
its help text and how it appears on the command line (ghosted.cli.options builds the flags from it).
"""

from __future__ import annotations

import difflib
import math
import re
import types
import typing
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from typing import Any

from ghosted.errors import GhostedError, brief

PPL_SOURCES_HELP = "wiki, ptb, passages, ptb-train, a .txt/.jsonl file or hf:NAME:SPLIT:FIELD"
GUARDS = ("loss", "boundary", "off")
VARIANTS = ("rotate", "diag")
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
REGISTER_MODES = ("true", "false", "on_pass")

# Upper bounds no real run reaches; beyond them a value would only exhaust memory or time (each field states its
# range in --help). The limits that depend on the model (its layers, hidden size, positions) are checked once it
# is loaded, before any pass over the data.
MAX_WINDOWS = 65_536  # calibration sequences, perplexity windows
MAX_SEQ_LEN = 1 << 20  # tokens per window (the model's positions bound it further)
MAX_LAYERS = 4_096  # layers to remove (the model's layer count bounds it further)
MAX_BATCH = 4_096  # sequences per forward pass
MAX_STEPS = 1_000_000  # distillation steps
MAX_SEED = 2**32 - 1


# --------------------------------------------------------------------------- typed building


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(hint)[0])}s"
    if is_dataclass(hint):
        return "a mapping"
    return {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}.get(hint, str(hint))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """value checked against the field's type hint; lists become tuples, numbers must be finite."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        for inner in options[:-1]:
            try:
                return _coerce(value, inner, key)
            except GhostedError:
                pass
        try:
            return _coerce(value, options[-1], key)
        except GhostedError as exc:
            if "finite" in str(exc):
                raise
            raise GhostedError(f"{key} = {brief(value)}: expected {_type_name(hint)}") from None
    def bad() -> GhostedError:  # built only when raised: a long list checks each item
        return GhostedError(f"{key} = {brief(value)}: expected {_type_name(hint)}")
    if origin is tuple:
        inner = typing.get_args(hint)[0]
        if isinstance(value, str):  # "1e-6,1e-2" / "wiki,ptb" as on the command line
            if inner is str:
                return value  # the section parses names itself ('none' means empty)
            parts = [p.strip() for p in value.split(",") if p.strip()]
            try:
                value = [inner(p) for p in parts]
            except ValueError:
                raise bad() from None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and inner is not str:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise bad()
        return tuple(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise bad()
        return build(hint, value, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        if not math.isfinite(value):
            raise GhostedError(f"{key} = {brief(value)}: expected a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad()
        return value
    return value


def build(cls: type, values: Mapping[str, Any] | None, section: str) -> Any:
    """A config section from a mapping: unknown keys, wrong types and non-finite numbers are one-line errors."""
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise GhostedError(f"{section}: expected a mapping of options, got {brief(values)}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls) if f.init]
    out = {}
    for k, v in values.items():
        if k not in known:
            close = difflib.get_close_matches(str(k)[:100], known, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise GhostedError(f"unknown {section} option {brief(k)}; {hint}known: {', '.join(known)}")
        out[k] = _coerce(v, hints[k], f"{section}.{k}")
    return cls(**out)


def _typed(cfg: Any, section: str) -> None:
    """Direct construction (the Python API) gets build()'s type and finiteness checks too, and every field's
    declared Bounds are checked (the section's __post_init__ calls this first)."""
    hints = typing.get_type_hints(type(cfg))
    for f in fields(cfg):
        if f.init:
            value = _coerce(getattr(cfg, f.name), hints[f.name], f"{section}.{f.name}")
            object.__setattr__(cfg, f.name, value)
            flag = flag_of(f)
            if flag.bounds is not None and value is not None:
                flag.bounds.check(value, _is_whole(hints[f.name]), option_name(f, section))


def _is_whole(hint: Any) -> bool:
    """int, int | None, tuple[int, ...]: whole numbers (the bounds' error and help say so)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = [a for a in typing.get_args(hint) if a is not type(None)][0]
    if typing.get_origin(hint) is tuple:
        hint = typing.get_args(hint)[0]
    return hint is int


def option_name(f: Any, section: str) -> str:
    """How errors name a field: '--flag (section.key)' for a command-line option, else 'section.key'."""
    flag = flag_of(f)
    return f"--{flag.name} ({section}.{f.name})" if flag.cli else f"{section}.{f.name}"


def merged(base: Any, overrides: Mapping[str, Any], section: str) -> Any:
    """`base` (a section) with the given keys replaced, re-checked (e.g. command-line flags over the file)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if not given:
        return base
    return build(type(base), {**to_json(base), **given}, section)


def to_json(cfg: Any) -> dict[str, Any]:
    """The one config-to-JSON: a section as a plain dict (tuples as lists, nested sections as dicts), for JSON
    documents, YAML, MLflow params and hashing alike."""
    def plain(v: Any) -> Any:
        if is_dataclass(v) and not isinstance(v, type):
            return to_json(v)
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return {f.name: plain(getattr(cfg, f.name)) for f in fields(cfg) if f.init}



def default(cls: type, name: str) -> str:
    """A field's default as help text shows it (lists as 'a,b')."""
    f = {f.name: f for f in fields(cls)}[name]
    v = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
    if isinstance(v, tuple):
        return ",".join(_fmt_num(x) for x in v) if v else "none"
    return _fmt_num(v)


def _fmt_num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _whole(value: Any, low: int, key: str, high: int | None = None) -> None:
    """key: '--flag (section.key)' or 'section.key'."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        name, _, where = key.partition(" (")
        allowed = f">= {low}" if high is None else f">= {low} and <= {high}"
        raise GhostedError(f"{name} must be a whole number {allowed}, got {brief(value)}"
                           + (f" ({where}" if where else ""))


# --------------------------------------------------------------------------- numeric ranges


@dataclass(frozen=True)
class Bounds:
    """The allowed values of a numeric option, declared once on its field (option(..., bounds=...)): checked with
    the types by `_typed` before any work, and stated in the flag's --help. Each item of a list option is
    checked. Nothing is clamped: a value outside is a one-line error naming the option, the value and the range.

    `low_open`/`high_open`: that end itself is excluded. `note`: a further limit checked once the model is known
    (e.g. "at most the model's hidden size"), stated in the help."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    def contains(self, v: float) -> bool:
        if self.low is not None and (v < self.low or (self.low_open and v == self.low)):
            return False
        return self.high is None or not (v > self.high or (self.high_open and v == self.high))

    def text(self, whole: bool) -> str:
        """'>= 1 and <= 65536', '>= 0', '> 0', 'in [0, 1)'."""
        lo, hi = (None if b is None else _fmt_num(int(b) if whole else b) for b in (self.low, self.high))
        if hi is None:
            return f"{'>' if self.low_open else '>='} {lo}"
        if lo is None:
            return f"{'<' if self.high_open else '<='} {hi}"
        if whole and not (self.low_open or self.high_open):
            return f">= {lo} and <= {hi}"
        return f"in {'(' if self.low_open else '['}{lo}, {hi}{')' if self.high_open else ']'}"

    def check(self, value: Any, whole: bool, name: str) -> None:
        """`name`: '--flag (section.key)' or 'section.key' (option_name)."""
        items = value if isinstance(value, tuple) else (value,)
        bad = next((v for v in items if not self.contains(v)), None)
        if bad is None:
            return
        shown = brief(list(value)) if isinstance(value, tuple) else brief(value)
        if isinstance(value, tuple):
            raise GhostedError(f"{name} needs values {self.text(whole)}, got {shown}")
        if whole:
            flag, _, where = name.partition(" (")
            raise GhostedError(f"{flag} must be a whole number {self.text(True)}, got {shown}"
                               + (f" ({where}" if where else ""))
        raise GhostedError(f"{name} must be {self.text(False)}, got {shown}")

    def help(self, whole: bool) -> str:
        shown = self.text(whole)
        if whole and self.low is not None and self.high is not None:
            shown = f"{_fmt_num(int(self.low))} to {_fmt_num(int(self.high))}"
        return f"allowed {shown}" + (f", {self.note}" if self.note else "")


def between(low: float | None, high: float | None = None, **kw: Any) -> Bounds:
    """Bounds(low, high, ...): the closed range of an option (see Bounds)."""
    return Bounds(low, high, **kw)


NAME_MAX_CHARS = 200
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._+-]*")


def check_registry_name(value: Any, key: str) -> str:
    """A registered model or experiment name: 1 to NAME_MAX_CHARS characters, letters, digits, space and . _ + -
    (starting with a letter or digit, no trailing space): safe in MLflow, its filter strings and as a file name."""
    if not isinstance(value, str) or not value:
        raise GhostedError(f"{key} must be a non-empty name, got {brief(value)}")
    if len(value) > NAME_MAX_CHARS:
        raise GhostedError(f"{key} is {len(value)} characters long, over the limit of {NAME_MAX_CHARS}: "
                           f"{brief(value, 40)}; choose a shorter name")
    bad = next((c for c in value if unicodedata.category(c).startswith("C")), None)
    if bad is not None:
        raise GhostedError(f"{key} {brief(value, 60)} holds a control character ({ord(bad):#04x}): "
                           "use letters, digits, space and . _ + -")
    if not _NAME_RE.fullmatch(value) or value.endswith(" "):
        raise GhostedError(f"{key} {brief(value, 60)}: a name holds letters, digits, space and . _ + -, starts with a "
                           "letter or digit and does not end in a space (MLflow refuses / and :, and quotes break its "
                           "filters)")
    return value


def twice(items: Sequence[Any]) -> Any:
    """The first item that appears twice in `items` (None when each appears once), for "... twice (x)" errors."""
    seen = set()
    for item in items:
        if item in seen:
            return item
        seen.add(item)
    return None


def parse_names(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """'a,b' or ['a', 'b'] -> ('a', 'b'); 'none' -> (); None stays None (use the default)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    items = [s.strip() for s in items if s.strip()]
    if items == ["none"]:
        return ()
    return tuple(items)


# --------------------------------------------------------------------------- declaring a field once


@dataclass(frozen=True)
class Flag:
    """How a config field appears on the command line (kept in the field's metadata under "flag")."""

    help: str | Callable[[], str] = ""  # "{default}" is replaced by the field's default as default() shows it
    name: str | None = None  # the flag without dashes when it differs from the field name (n -> n-seqs)
    group: str | None = None  # argument group title (None: the section's)
    method: str | None = None  # a recovery method's own option: its help is grouped under that method
    one_of: str | None = None  # fields sharing this name are mutually exclusive flags (a flag drops the others' YAML)
    metavar: str | None = None
    text: bool = False  # passed on as written; the section parses it (lists of names, "6,9")
    required: bool = False
    cli_default: str | None = None  # the parser's own default (shown in --help and the recorded command)
    cli: bool = True  # False: a params-file setting only
    bounds: Bounds | None = None  # the allowed numbers (checked by _typed, stated in --help)

    @property
    def dest(self) -> str:
        return (self.name or "").replace("-", "_")


def option(default: Any = MISSING, help: str | Callable[[], str] = "", *,
           default_factory: Callable[[], Any] | Any = MISSING, **flag: Any) -> Any:
    """A config field declared once: default, help text, and its flag (see Flag for the keywords)."""
    meta = {"flag": Flag(help=help, **flag)}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    if default is MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


def flag_of(f: Any) -> Flag:
    """A field's Flag (a plain dataclass field gets one from its name, with no help)."""
    flag = f.metadata.get("flag") or Flag(help=f.metadata.get("help", ""))
    return flag if flag.name else replace(flag, name=f.name.replace("_", "-"))

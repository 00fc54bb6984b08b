"""Command-line flags generated from the typed config: an option is declared once, as a config field.

`add_options(parser, Section)` adds one flag per field that has one (ghosted.config.option): the flag name,
help text and grouping come from the field's metadata, the type from its annotation. Every flag defaults to
None, so a flag not given leaves the params file's value (ghosted.config.resolve merges them).
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import fields
from typing import Any

from ghosted.config import default, flag_of


def _number_list(kind: type) -> Callable[[str], tuple]:
    example = "1e-6,1e-2" if kind is float else "1,8"

    def parse(text: str) -> tuple:
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected numbers like {example}, got '{text}'") from None
    return parse


def _plain(hint: Any) -> Any:
    """The annotation without its None: `int | None` -> int; `str | int | None` -> str (the first)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(hint) if a is not type(None)][0]
    return hint


def _help(cls: type, f: Any) -> str:
    """The field's help text with its default, and its allowed range where it declares one (Bounds)."""
    flag = flag_of(f)
    text = flag.help() if callable(flag.help) else flag.help
    text = text.replace("{default}", default(cls, f.name)) if "{default}" in text else text
    if flag.bounds is None:
        return text
    allowed = flag.bounds.help(_whole(typing.get_type_hints(cls)[f.name]))
    return f"{text[:-1]}; {allowed})" if text.endswith(")") else f"{text} ({allowed})"


def _whole(hint: Any) -> bool:
    hint = _plain(hint)
    return (typing.get_args(hint)[0] if typing.get_origin(hint) is tuple else hint) is int


def _kwargs(cls: type, f: Any, hint: Any) -> dict[str, Any]:
    flag = flag_of(f)
    kw: dict[str, Any] = {"dest": flag.dest, "help": _help(cls, f)}
    if flag.metavar:
        kw["metavar"] = flag.metavar
    if flag.required:
        kw["required"] = True
    hint = _plain(hint)
    if hint is bool:
        return {**kw, "action": "store_true", "default": None}
    kw["default"] = flag.cli_default
    if flag.text or hint is str:
        return kw
    if typing.get_origin(hint) is tuple:
        inner = typing.get_args(hint)[0]
        return kw if inner is str else {**kw, "type": _number_list(inner)}
    return {**kw, "type": hint} if hint in (int, float) else kw


def _title(cls: type, f: Any, group: str | None, into: str | None) -> str:
    flag = flag_of(f)
    if into:
        return into
    if flag.method:
        return f"{flag.method} recovery options"
    return flag.group or group or cls.__name__


def add_options(parser: argparse.ArgumentParser, cls: type, *, group: str | None = None,
                only: Iterable[str] | None = None, skip: Iterable[str] = (),
                groups: dict[str, Any] | None = None, into: str | None = None) -> dict[str, Any]:
    """One flag per command-line field of `cls` (all, or `only` those, less `skip`), in argument groups titled
    `into`, else by the field's group, its recovery method, or `group`. Returns the groups (title -> group), to
    add hand-written flags to."""
    hints = typing.get_type_hints(cls)
    wanted = None if only is None else set(only)
    groups = {} if groups is None else groups
    exclusive: dict[tuple[str, str], Any] = {}
    for f in fields(cls):
        flag = flag_of(f)
        if not flag.cli or f.name in skip or (wanted is not None and f.name not in wanted):
            continue
        title = _title(cls, f, group, into)
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        target = groups[title]
        if flag.one_of:
            key = (title, flag.one_of)
            if key not in exclusive:
                exclusive[key] = target.add_mutually_exclusive_group()
            target = exclusive[key]
        target.add_argument("--" + flag.name, **_kwargs(cls, f, hints[f.name]))
    return groups


def flags_of(cls: type) -> dict[str, str]:
    """Flag -> field name for every command-line field of `cls` (e.g. '--n-seqs' -> 'n')."""
    return {"--" + flag_of(f).name: f.name for f in fields(cls) if flag_of(f).cli}

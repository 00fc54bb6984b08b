"""A tiny name -> function registry filled by a decorator; unknown names get a "did you mean"."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

from ghosted.errors import GhostedError, brief

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def deco(fn: F) -> F:
            if name in self._items:
                raise ValueError(f"{self.what} '{name}' registered twice")
            self._items[name] = fn
            return fn
        return deco

    def get(self, name: str) -> F:
        if name not in self._items:
            close = difflib.get_close_matches(str(name)[:100], list(self._items), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise GhostedError(f"unknown {self.what} {brief(name)}{hint} (choose from {', '.join(self.names())})")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

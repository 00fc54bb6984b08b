"""The one exception type users see: raised at the boundary with a fix in the message."""

from __future__ import annotations

import reprlib
from typing import Any


class GhostedError(Exception):
    """A user-facing error: the message names the bad value and how to fix it."""


def brief(value: Any, limit: int = 80) -> str:
    """repr(value) cut to about `limit` characters ("..." marks a cut): the way an error quotes a user's value.

    Bounded in time and memory too: a long string is cut before repr, and containers are walked only a few
    items and levels deep, so a 10 MB value (or a huge nested one) costs nothing to quote."""
    limit = max(limit, 8)
    if isinstance(value, (str, bytes)):
        text = repr(value[: limit + 1])
        cut = len(value) > limit
    else:
        short = reprlib.Repr()
        short.maxlevel, short.maxlist, short.maxtuple, short.maxdict, short.maxset = 3, 8, 8, 6, 6
        short.maxstring = short.maxother = limit
        text = short.repr(value)
        cut = False
    if cut or len(text) > limit:
        return text[: limit - 3] + "..."
    return text

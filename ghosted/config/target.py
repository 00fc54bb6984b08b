"""search.target: a budget for `ghosted search` (params=N, speedup=X or memory=MB), parsed from its human forms.

ghosted.solve.budget computes what a plan costs and which removal meets a Target.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass

from ghosted.errors import GhostedError, brief

KINDS = ("params", "speedup", "memory")
MB = 10**6
_COUNT = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}  # params=100M / 1.5B
_BYTES = {"": MB, "mb": MB, "gb": 10**9, "kb": 10**3, "mib": 2**20, "gib": 2**30}  # memory=400 is 400 MB
_TARGET = re.compile(r"\s*([A-Za-z_]+)\s*=\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*")
EXAMPLES = "params=100M (or 1e8), speedup=1.3 or memory=400 (MB; also 400MB, 0.4GB)"
RELATIVE_SLACK = 1e-9  # a target met up to rounding of its decimal form (speedup=1.25 at 24 of 30 layers)


@dataclass(frozen=True)
class Target:
    """A budget: the plan must have at most `value` params or MB, or at least `value` speed-up."""

    kind: str  # "params" | "speedup" | "memory"
    value: float  # params: a count; speedup: a ratio; memory: MB (10^6 bytes)
    text: str  # as given

    def to_dict(self) -> dict:
        return {"kind": self.kind, "value": self.value, "text": self.text}


def parse_target(text: str) -> Target:
    """'params=100M' / 'speedup=1.3' / 'memory=400MB' -> Target; a one-line GhostedError otherwise."""
    where = f"--target (search.target) {brief(text)}"
    m = _TARGET.fullmatch(str(text))
    if m is None:
        raise GhostedError(f"{where}: expected KIND=VALUE, one of {EXAMPLES}")
    kind, number, unit = m[1].lower(), float(m[2]), m[3].lower()
    if kind not in KINDS:
        close = difflib.get_close_matches(kind, KINDS, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise GhostedError(f"{where}: unknown budget {kind!r}; {hint}use {EXAMPLES}")
    units = {"params": _COUNT, "memory": _BYTES, "speedup": {"": 1, "x": 1}}[kind]
    if unit not in units:
        raise GhostedError(f"{where}: unknown unit {unit!r} for {kind}; use {', '.join(u for u in units if u)} "
                           f"or none ({EXAMPLES})")
    value = number * units[unit] / (MB if kind == "memory" else 1)
    if not (math.isfinite(value) and value > 0):
        raise GhostedError(f"{where}: the value must be a finite number above 0 ({EXAMPLES})")
    return Target(kind, value, str(text).strip())

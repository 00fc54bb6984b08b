"""Run the `ghosted` CLI with crash points armed: the process kills itself (SIGKILL) when the register sequence
reaches one of them (ghosted/mlops/registry/faults.py names them).

    python -m tests.mlops.faults POINT[,POINT...] -- ARGV...     # as `ghosted ARGV...`

For tests only: the product never arms a fault by itself.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterable

from ghosted.mlops.registry import faults


def kill_at(points: Iterable[str]) -> Callable[[str], None]:
    """A faults.point replacement that kills this process, as kill -9 would, at any of `points`."""
    armed = frozenset(points)
    unknown = armed - set(faults.POINTS)
    if unknown:
        raise ValueError(f"unknown crash points {sorted(unknown)}; known: {', '.join(faults.POINTS)}")

    def point(name: str) -> None:
        if name in armed:
            os.kill(os.getpid(), signal.SIGKILL)

    return point


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] != "--":
        print("usage: python -m tests.mlops.faults POINT[,POINT...] -- ARGV...", file=sys.stderr)
        return 2
    faults.point = kill_at(p for p in argv[0].split(",") if p)
    from ghosted.cli import main as ghosted

    return ghosted(argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

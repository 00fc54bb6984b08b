"""Named points of the register sequence where a crash leaves the registry in a state the next register repairs.

`point(name)` marks one and does nothing. The tests of crash recovery replace it to stop the process exactly
there: in-process by monkeypatching `ghosted.mlops.registry.faults.point`, in a `ghosted` subprocess through
tests/mlops/faults.py. Callers look it up at call time (`faults.point(...)`), so a replacement takes effect.
"""

from __future__ import annotations

POINTS = ("run-created", "version-created", "alias-moved")


def point(name: str) -> None:
    """The register sequence has reached `name` (one of POINTS). Does nothing."""

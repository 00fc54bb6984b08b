"""The held-out guard reports each candidate as it goes (its fits and scores run minutes on a real model)."""

from __future__ import annotations

import pytest

from ghosted.solve.solver import PruneConfig, solve
from tests.solve.test_prune import _calib, _loaded


@pytest.mark.parametrize("recovery", ["ghost", "foldable"])
def test_guard_logs_a_line_per_candidate_only_with_progress(recovery: str) -> None:
    loaded = _loaded("llama")
    calib = _calib(loaded.model, n=8)
    cfg = PruneConfig(layers="1-2", recovery=recovery, guard="loss", holdout=0.25)
    lines: list[str] = []
    sol = solve(loaded, calib, cfg, progress=True, log=lines.append)
    scores = sol.meta.guard.scores
    progress = [m for m in lines if m.startswith("guard [")]
    assert len(progress) == len(scores) >= 2
    for (key, value), line in zip(scores.items(), progress):
        assert f"] {key}: held-out next-token loss {value:.4f}" in line
    quiet: list[str] = []
    solve(loaded, calib, cfg, progress=False, log=quiet.append)
    assert not [m for m in quiet if m.startswith("guard [") or "candidate(s)" in m]

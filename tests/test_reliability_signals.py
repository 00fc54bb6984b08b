"""Reliability: more real-process faults (signals other than SIGINT/kill -9 of prune, kills of other commands).

Each run is a real `ghosted` process paused at a known point (tests/test_reliability.py's wrapper), hit by the
fault, then checked: no output at the target path, no traceback, and the next run into the same folder
succeeds and leaves no temp behind (the marked temps of killed runs are swept). Logged for the reliability report.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_reliability import (
    _KILL_POINTS,
    _PAUSE_AFTER,
    _cli_cmd,
    _env,
    _finish,
    _marked,
    _prune_argv,
    _record,
    _wait_for,
    world,  # noqa: F401  (fixture)
)

_CALIB_POINT = "ghosted.corpora:build_calibration"


def _default_signals() -> None:
    """The child starts with the default action of the signals the tests send: a suite started under `nohup`
    (SIGHUP ignored) or from a shell without job control (SIGINT ignored) passes those dispositions on."""
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def _paused(tmp_path: Path, point: str, argv: list[object]) -> tuple[subprocess.Popen, Path]:
    marker = tmp_path.parent / f"{tmp_path.name}.marker"
    proc = subprocess.Popen([sys.executable, "-c", _PAUSE_AFTER, marker, point, *map(str, argv)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_signals)
    return proc, marker


def _hit(proc: subprocess.Popen, marker: Path, sig: int) -> tuple[int, str]:
    reached = _wait_for(lambda: _marked(marker), proc)
    marker.unlink(missing_ok=True)
    if not reached:
        proc.kill()
        proc.wait()
        pytest.fail("the run never reached its pause point")
    proc.send_signal(sig)
    code, _, err = _finish(proc)
    return code, err


def _log(case: str, kind: str, description: str, code: int, err: str, partial: list[str], ok: bool,
         expect: int) -> None:
    lines = [ln for ln in err.splitlines() if ln.startswith("ghosted:")]
    _record("fault", case, description, fault_kind=kind, exit=code, error=lines[-1] if lines else err.strip()[-300:],
            one_line=len(lines) <= 1, traceback="Traceback" in err, partial=partial, lost=[], ok=ok,
            expect_exit=expect)


@pytest.mark.parametrize(("sig", "name"), [(signal.SIGTERM, "SIGTERM"), (signal.SIGHUP, "SIGHUP")])
def test_terminating_signal_during_prune_leaves_no_output_and_the_rerun_sweeps(sig, name, world, tmp_path):  # noqa: F811
    out = tmp_path / "ckpt"
    proc, marker = _paused(tmp_path, _KILL_POINTS["during-solve"], _prune_argv(world, out))
    code, err = _hit(proc, marker, sig)
    partial = [p.name for p in tmp_path.iterdir() if p.name == "ckpt"]
    rerun = subprocess.run(_cli_cmd(*_prune_argv(world, out)), env=_env(), capture_output=True, text=True)
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "ckpt")
    ok = code != 0 and "Traceback" not in err and not partial and rerun.returncode == 0 and out.is_dir() and not left
    _log(f"{name.lower()}-prune", f"{name} during prune", f"{name} to `ghosted prune` during the solve, then the same "
         "prune again", code, err, partial + left, ok, expect=-sig)
    assert code != 0 and "Traceback" not in err, err
    assert not partial, "a killed prune left its output"
    assert rerun.returncode == 0, rerun.stderr
    assert not left, f"temps of the killed run remain: {left}"


def test_kill_9_during_calibrate_then_rerun(world, tmp_path):  # noqa: F811
    out = tmp_path / "calib"
    argv = ["calibrate", world["tiny"], "--calib-source", world["text"], "--n-seqs", 4, "--seq-len", 16, "--out", out]
    proc, marker = _paused(tmp_path, _CALIB_POINT, argv)
    code, err = _hit(proc, marker, signal.SIGKILL)
    partial = [p.name for p in tmp_path.iterdir() if p.name == "calib"]
    rerun = subprocess.run(_cli_cmd(*argv), env=_env(), capture_output=True, text=True)
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "calib")
    ok = code == -9 and not partial and rerun.returncode == 0 and out.is_dir() and not left
    _log("kill-9-calibrate", "kill -9 during calibrate", "kill -9 of `ghosted calibrate` once its windows are built, "
         "then the same command again", code, err, partial + left, ok, expect=-9)
    assert code == -9 and not partial, err
    assert rerun.returncode == 0, rerun.stderr
    assert not left, f"temps of the killed run remain: {left}"


def test_sigint_during_eval_is_one_line_and_writes_nothing(world, tmp_path):  # noqa: F811
    out = tmp_path / "r.json"
    argv = ["eval", world["tiny"], "--ppl", world["text"], "--tasks", "none", "--ppl-windows", 1, "--seq-len", 16,
            "--quiet", "--out", out]
    proc, marker = _paused(tmp_path, _KILL_POINTS["after-model-load"], argv)
    code, err = _hit(proc, marker, signal.SIGINT)
    left = sorted(p.name for p in tmp_path.iterdir())
    ok = code == 130 and "ghosted: interrupted" in err and "Traceback" not in err and not left
    _log("sigint-eval", "SIGINT (Ctrl-C) during eval", "Ctrl-C (SIGINT) during `ghosted eval --out` after the model "
         "is loaded", code, err, left, ok, expect=130)
    assert code == 130 and "Traceback" not in err, err
    assert not left

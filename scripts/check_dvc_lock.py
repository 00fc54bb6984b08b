"""Does the committed dvc.lock match HEAD's code and params? (`dvc status` on a clean checkout of HEAD.)

HEAD is checked out into a temporary git worktree, so uncommitted edits do not count and no output is needed:
outputs that are simply absent there (not pulled) are ignored; a stage is stale when its command, a code or
params dependency, or a git-tracked output differs from what dvc.lock recorded (its numbers do not come from
HEAD's code). Exit 0: up to date; 1: stale (the stages are listed); 2: could not tell.

    .venv/bin/python scripts/check_dvc_lock.py [--repo .]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def _produced(checkout: Path) -> set[str]:
    """Paths that some stage writes (absent in a fresh checkout until `dvc pull` / `dvc repro`)."""
    stages = (yaml.safe_load((checkout / "dvc.yaml").read_text()) or {}).get("stages") or {}
    out = set()
    for st in stages.values():
        for key in ("outs", "metrics", "plots"):
            for e in st.get(key) or []:
                out |= set(e) if isinstance(e, dict) else {str(e)}
    return out


def stale_stages(checkout: Path) -> dict[str, list[str]]:
    """{stage: reasons} from `dvc status --json` in a checkout without outputs (missing outputs ignored)."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=checkout, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError((proc.stderr.strip().splitlines() or ["dvc status failed"])[-1])
    status = json.loads(proc.stdout.strip() or "{}")
    produced = _produced(checkout)
    stale: dict[str, list[str]] = {}
    for stage, entries in status.items():
        reasons = []
        for entry in entries:
            if isinstance(entry, str):  # "changed command", "always changed"
                reasons.append(entry)
                continue
            for kind, changes in entry.items():  # "changed deps" / "changed outs"
                for path, what in changes.items():
                    if isinstance(what, dict):  # params.yaml: {param: modified/new/deleted}
                        reasons += [f"param {k} {v}" for k, v in what.items()]
                    elif what == "deleted" and path in produced:
                        continue  # an output (or an input made by another stage) not in this checkout
                    elif what == "not in cache" or (kind == "changed outs" and path in produced
                                                     and not (checkout / path).exists()):
                        continue
                    else:
                        reasons.append(f"{path} {what}")
        if reasons:
            stale[stage] = reasons
    return stale


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Tell whether the committed dvc.lock matches HEAD's code and params.")
    ap.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    args = ap.parse_args(argv)
    repo = args.repo.resolve()
    try:
        head = _git(repo, "rev-parse", "--short", "HEAD").strip()
        if "dvc.lock" not in _git(repo, "ls-files", "dvc.lock"):
            print(f"dvc.lock: not committed at {head}: run `dvc repro` and commit dvc.lock")
            return 1
        with tempfile.TemporaryDirectory(prefix="check-dvc-lock-") as tmp:
            checkout = Path(tmp) / "head"
            _git(repo, "worktree", "add", "--detach", "--quiet", str(checkout), "HEAD")
            try:
                stale = stale_stages(checkout)
            finally:
                _git(repo, "worktree", "remove", "--force", str(checkout))
    except (subprocess.CalledProcessError, RuntimeError, OSError, json.JSONDecodeError) as exc:
        print(f"dvc.lock: could not check ({exc})")
        return 2
    if not stale:
        print(f"dvc.lock: up to date with the code and params of {head}")
        return 0
    print(f"dvc.lock: STALE at {head}: {len(stale)} stage(s) would rerun "
          "(its metrics do not come from this code; run `dvc repro` and commit dvc.lock and reports/):")
    for stage, reasons in stale.items():
        print(f"  {stage}: {'; '.join(reasons[:6])}" + (f"; ... ({len(reasons)} changes)" if len(reasons) > 6 else ""))
    return 1


if __name__ == "__main__":
    sys.exit(main())

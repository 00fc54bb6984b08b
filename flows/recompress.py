"""The `recompress` flow: run the pipeline on a schedule; DVC decides what is stale.

The base model lives outside the repository (the ghosted cache, a local folder or the hub), so DVC cannot see
it change by itself. This flow reruns dvc.yaml's `fingerprint` stage (`dvc repro --force --single-item
fingerprint`: the hub revision online, else a sha256 of the model's files, written to data/base_model.json)
and then the `compress` flow. An unchanged model rewrites identical bytes and nothing else runs; a new
release changes the file, so every stage that depends on it reruns and `register` registers the result
(registry.register decides whether a failing one becomes a version).

    python -m flows.recompress [--repo .]                                  # once
    python -m flows.recompress --serve --cron "0 3 * * *"                  # a deployment, nightly at 03:00

`--serve` blocks and runs the flow on the schedule; it needs a Prefect API that outlives the process:
start one with `prefect server start` and `export PREFECT_API_URL=http://127.0.0.1:4200/api`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from prefect import flow

from flows.compress import BASE_MODEL_FILE, compress
from ghosted.errors import GhostedError


def _fingerprint(repo: Path) -> str | None:
    path = repo / BASE_MODEL_FILE
    return json.loads(path.read_text()).get("fingerprint") if path.is_file() else None


@flow(name="recompress", log_prints=True)
def recompress(repo: str = ".") -> dict[str, Any]:
    """Re-read the base model's fingerprint, then reproduce whatever that (or anything else) made stale."""
    root = Path(repo).resolve()
    before = _fingerprint(root)
    res = compress(repo=str(root), refresh_fingerprint=True)
    after = res.get("fingerprint")
    if before != after:
        print(f"base model fingerprint {before or 'none'} -> {after}")
    return {**res, "previous": before, "changed": before != after}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.recompress",
                                 description="Refresh the base model's fingerprint and reproduce what is stale.")
    ap.add_argument("--repo", default=".", help="the repository root holding dvc.yaml (default .)")
    ap.add_argument("--serve", action="store_true", help="serve as a deployment on --cron (blocks; needs a "
                                                         "Prefect server, see the module docstring)")
    ap.add_argument("--cron", help="schedule for --serve, e.g. '0 3 * * *' (03:00 daily)")
    ap.add_argument("--name", default="nightly-recompress", help="deployment name for --serve")
    args = ap.parse_args(argv)
    if args.cron and not args.serve:
        ap.error("--cron only applies with --serve")
    # An absolute path: scheduled runs must not depend on where the server was started.
    parameters = {"repo": str(Path(args.repo).resolve())}
    if args.serve:
        recompress.serve(name=args.name, cron=args.cron or "0 3 * * *", parameters=parameters)
        return 0
    try:
        res = recompress(**parameters)
    except GhostedError as exc:
        print(f"ghosted: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(res, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

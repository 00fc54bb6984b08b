"""The `recompress` flow: compress the base model again only when it changed.

The base model's fingerprint (ghosted.models.fingerprint: the hub revision online, else a sha256 of its
files; for a shipped model the GGUF's hash) is compared with the `base_fingerprint` tag of the registered
model `ghosted-<base>` in the MLflow registry, which `ghosted register` sets on every registration, whatever
the gate's verdict (a failing base is not recompressed every night). Equal: nothing runs. Different or
never registered: the `compress` flow runs and registers a new version (and the tag moves).

    python -m flows.recompress [--params params.yaml] [--force]          # once
    python -m flows.recompress --serve --cron "0 3 * * *"                 # a deployment, nightly at 03:00

`--serve` blocks and runs the flow on the schedule; it needs a Prefect API that outlives the process:
start one with `prefect server start` and `export PREFECT_API_URL=http://127.0.0.1:4200/api`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from prefect import flow, task

from ghosted.errors import GhostedError

from .compress import RETRY_DELAYS, _transient, base_fingerprint, compress, load_params


@task(name="recorded-fingerprint", retries=2, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=_transient)
def recorded_fingerprint(params: Path, tracking_uri: str | None, model: str) -> tuple[str, str | None]:
    """(registered model name, base fingerprint of its last registered version or None)."""
    from ghosted.registry import recorded_fingerprint as lookup, registered_name
    from ghosted.tracking import load_config

    _, reg = load_config(params, tracking_uri)
    name = reg.name or registered_name(model)
    return name, lookup(reg, name)


@flow(name="recompress", log_prints=True)
def recompress(params: str = "params.yaml", workdir: str = "out/flow", tracking_uri: str | None = None,
               force: bool = False) -> dict:
    """Run `compress` if the base model's fingerprint differs from the last registered one (or with force)."""
    p = load_params(Path(params))
    model = p["model"]
    fp = base_fingerprint(model)
    name, last = recorded_fingerprint(Path(params), tracking_uri, model)
    if fp == last and not force:
        print(f"{model}: fingerprint {fp} is what {name} last registered; nothing to do")
        return {"ran": False, "name": name, "fingerprint": fp, "previous": last}
    print(f"{model}: fingerprint {fp} (last registered: {last or 'none'}); compressing")
    res = compress(params=params, workdir=workdir, tracking_uri=tracking_uri)
    return {**res, "ran": True, "fingerprint": fp, "previous": last}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.recompress",
                                 description="Recompress the base model when its fingerprint changed.")
    ap.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    ap.add_argument("--workdir", default="out/flow", help="where task outputs go (default out/flow)")
    ap.add_argument("--tracking-uri", help="MLflow URI (default: registry.tracking_uri of the params file)")
    ap.add_argument("--force", action="store_true", help="compress even if the fingerprint is unchanged")
    ap.add_argument("--serve", action="store_true", help="serve as a deployment on --cron (blocks; needs a "
                                                         "Prefect server, see the module docstring)")
    ap.add_argument("--cron", help="schedule for --serve, e.g. '0 3 * * *' (03:00 daily)")
    ap.add_argument("--name", default="nightly-recompress", help="deployment name for --serve")
    args = ap.parse_args(argv)
    if args.cron and not args.serve:
        ap.error("--cron only applies with --serve")
    # Absolute paths: scheduled runs must not depend on where the server was started.
    parameters = {"params": str(Path(args.params).resolve()), "workdir": str(Path(args.workdir).resolve()),
                  "tracking_uri": args.tracking_uri, "force": args.force}
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

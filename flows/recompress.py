"""The `recompress` flow: run the pipeline on a schedule; DVC decides what is stale.

The base model lives outside the repository (the ghosted cache, a local folder or the hub), so DVC cannot see
it change by itself. This flow reruns dvc.yaml's `fingerprint` stage (`dvc repro --force --single-item
fingerprint`: the hub revision online, else a sha256 of the model's files, written to data/base_model.json)
and then the `compress` flow. An unchanged model rewrites identical bytes and nothing else runs; a new
release changes the file, so every stage that depends on it reruns and `register` registers the result
(registry.register decides whether a failing one becomes a version).

    python -m flows.recompress [--repo .]                        # once
    python -m flows.recompress --serve --cron "0 3 * * *"        # the deployment, nightly at 03:00
    python -m flows.recompress --serve --interval 3600           # the deployment, hourly

`--serve` creates (or updates) the deployment `ghosted-recompress/scheduled` on a running Prefect server and runs
its scheduled runs until stopped (Ctrl-C pauses its schedule). It needs that server: PREFECT_API_URL set and the
server answering its health check (`prefect server start`, then `export PREFECT_API_URL=http://127.0.0.1:4200/api`);
without one it ends with one `ghosted: error:` line and exit code 2 (Prefect's throwaway ephemeral server cannot
hold a schedule). One run at a time: a run that comes due while the previous one still runs is cancelled.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from pathlib import Path
from typing import Any

from prefect import flow

from flows.compress import base_fingerprint, compress
from ghosted.errors import GhostedError

DEPLOYMENT = "scheduled"  # the deployment is `ghosted-recompress/scheduled`
HEALTH_TIMEOUT_S = 5.0
MAX_INTERVAL_S = 365 * 86_400.0  # --interval: a year between runs at most (and finite)
START_SERVER = "start one with `prefect server start` and export PREFECT_API_URL=http://127.0.0.1:4200/api"


def _fingerprint(repo: Path) -> str | None:
    return base_fingerprint(repo)


@flow(name="ghosted-recompress", log_prints=True)
def recompress(repo: str = ".") -> dict[str, Any]:
    """Re-read the base model's fingerprint, then reproduce whatever that (or anything else) made stale."""
    root = Path(repo).resolve()
    before = _fingerprint(root)
    res = compress(repo=str(root), refresh_fingerprint=True)
    after = res.get("fingerprint")
    if before != after:
        print(f"base model fingerprint {before or 'none'} -> {after}")
    return {**res, "previous": before, "changed": before != after}


def api_problem() -> str | None:
    """Why no Prefect server can hold the schedule (None: PREFECT_API_URL is set and its server is healthy)."""
    from prefect.settings import PREFECT_API_KEY, PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return f"--serve needs a running Prefect server and PREFECT_API_URL is not set: {START_SERVER}"
    key = PREFECT_API_KEY.value()
    request = urllib.request.Request(url.rstrip("/") + "/health",
                                     headers={"Authorization": f"Bearer {key.get_secret_value()}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=HEALTH_TIMEOUT_S) as resp:
            resp.read()
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        return f"no Prefect server answers at PREFECT_API_URL={url} ({reason}): {START_SERVER}"
    return None


def _schedule(client, deployment: str, cron: str | None, interval: float | None):
    """The deployment's schedule; paused if an operator paused every schedule it had (a restart keeps that)."""
    from prefect.exceptions import ObjectNotFound
    from prefect.schedules import Cron, Interval

    try:
        old = client.read_deployment_by_name(deployment).schedules
    except ObjectNotFound:
        old = []
    active = not old or any(s.active for s in old)
    if not active:
        print(f"the schedule of {deployment} stays paused: resume it with `prefect deployment schedule resume "
              f"{deployment} ID` (ID: `prefect deployment schedule ls {deployment}`)", file=sys.stderr)
    return Cron(cron, active=active) if cron else Interval(interval, active=active)


def serve(parameters: dict[str, Any], name: str, cron: str | None, interval: float | None) -> None:
    """Create or update the deployment `ghosted-recompress/NAME` and run its scheduled runs until stopped; then
    pause it, so a deployment nobody serves piles up no late runs (serving it again unpauses it)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import EntrypointType

    from flows.recompress import recompress as scheduled  # by module path, also under `python -m`

    deployment = f"{scheduled.name}/{name}"
    with get_client(sync_client=True) as client:
        schedule = _schedule(client, deployment, cron, interval)
    one_at_a_time = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)
    try:
        scheduled.serve(name=name, schedule=schedule, parameters=parameters, global_limit=one_at_a_time,
                        entrypoint_type=EntrypointType.MODULE_PATH,
                        description="Refresh the base model's fingerprint; on a change rerun the pipeline and "
                                    "register.")
    finally:  # Prefect's own pause on SIGTERM can lose the race with its exit
        try:
            with get_client(sync_client=True) as client:
                client.pause_deployment(client.read_deployment_by_name(deployment).id)
            print(f"paused the deployment {deployment}", file=sys.stderr)
        except Exception as exc:  # the server may be gone: say so, do not mask the exit
            print(f"ghosted: warning: could not pause the deployment {deployment}: {exc}", file=sys.stderr)


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m flows.recompress",
                                 description="Refresh the base model's fingerprint and reproduce what is stale.")
    ap.add_argument("--repo", default=".", help="the repository root holding dvc.yaml (default .)")
    ap.add_argument("--serve", action="store_true",
                    help=f"create the deployment ghosted-recompress/{DEPLOYMENT} on the Prefect server at "
                         "PREFECT_API_URL and run it on --cron or --interval (blocks)")
    when = ap.add_mutually_exclusive_group()
    when.add_argument("--cron", help="schedule for --serve, e.g. '0 3 * * *' (03:00 daily, the default)")
    when.add_argument("--interval", type=float, help="schedule for --serve: seconds between runs (above 0, at most "
                                                     f"{MAX_INTERVAL_S:.0f}: a year)")
    ap.add_argument("--name", default=DEPLOYMENT, help=f"deployment name for --serve (default {DEPLOYMENT})")
    args = ap.parse_args(argv)
    if (args.cron or args.interval is not None) and not args.serve:
        ap.error("--cron and --interval only apply with --serve")
    if args.interval is not None and not 0 < args.interval <= MAX_INTERVAL_S:
        ap.error(f"--interval must be a number of seconds above 0 and at most {MAX_INTERVAL_S:.0f} (a year), "
                 f"got {args.interval:g}")
    if args.serve and args.interval is None:
        from prefect.client.schemas.schedules import CronSchedule

        args.cron = args.cron or "0 3 * * *"
        try:
            CronSchedule(cron=args.cron)
        except ValueError:
            ap.error(f"--cron {args.cron!r} is not a cron expression (e.g. '0 3 * * *': 03:00 daily)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    # An absolute path: scheduled runs must not depend on where the server was started.
    parameters = {"repo": str(Path(args.repo).resolve())}
    if args.serve:
        problem = api_problem()
        if problem:
            print(f"ghosted: error: {problem}", file=sys.stderr)
            return 2
        serve(parameters, args.name, args.cron, args.interval)
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

"""The `sweep` flow: a grid of (layers removed, recovery) configurations on a distributed task runner.

One task builds the calibration set and captures the shared statistics once (every candidate block's
float64 sums and the layer scores, one forward pass); every configuration is then its own Prefect task
that solves from those statistics and evaluates the pruned model, on a Dask cluster (prefect-dask): a
local cluster by default, or a running cluster at `address`. The dense model is evaluated as one more task.
Every cell is a ghosted.solve.grid.run_cell, as in `ghosted compare`; results go to <out>/sweep.json, sweep.md
and the plots (ghosted/reporting/compare_report.py), with the wall time and the summed task times. The shared statistics
travel to the workers as safetensors with their sha256 (CaptureResult.save/load), never as pickle.

    python -m flows.sweep [--params params.yaml] [--workdir out/sweep] [--out reports/sweep]
                          [--address tcp://scheduler:8786] [--workers 2] [--threads-per-worker 1]
                          [--sequential]

--sequential runs the same tasks one after another in this process (all cores per task): the baseline
the distributed run is measured against. Workers load the model themselves (the ghosted cache, a local
folder or the hub), so on a multi-machine cluster every machine needs the model and the shared workdir.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner

from flows.compress import load_params, transient_failure
from ghosted.errors import GhostedError
from ghosted.json_io import read_json
from ghosted.reporting.compare_report import write_report


def sweep_settings(params: dict[str, Any], **flags: Any) -> dict[str, Any]:
    """The `sweep:` section of params.yaml (ghosted.config.SweepConfig) as a dict, with the command line's `flags`
    (workers, threads_per_worker, address; None: the file's) over it; every cell's config checked."""
    from ghosted.config import PruneConfig, SweepConfig, build, to_json

    given = {k: v for k, v in flags.items() if v is not None}
    cfg = build(SweepConfig, {**(params.get("sweep") or {}), **given}, "sweep")
    for k in cfg.remove:
        for m in cfg.recovery:
            build(PruneConfig, _cell_prune(params, k, m), "prune")
    s = to_json(cfg)
    s["eval"] = {k: v for k, v in s["eval"].items()}
    return s


def _cell_prune(params: dict[str, Any], k: int, method: str) -> dict[str, Any]:
    base = {key: v for key, v in params["prune"].items() if key not in ("remove", "layers", "recovery")}
    return {**base, "remove": k, "recovery": method}


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)


# --------------------------------------------------------------------------- tasks


def _shared_hit(folder: Path) -> dict[str, Any] | None:
    """The record of a complete shared-statistics folder whose capture file still has the recorded sha256."""
    from ghosted.hashing import file_sha256

    record, stats = folder / "shared.json", folder / "stats.safetensors"
    if not (record.is_file() and stats.is_file() and (folder / "calibration").is_dir()):
        return None
    try:
        doc = read_json(record, "shared-statistics record", expect=dict)
    except (OSError, ValueError):  # JSONFileError is a ValueError: recompute
        return None
    if not isinstance(doc, dict) or file_sha256(stats) != doc.get("stats_sha256"):
        print(f"shared statistics in {folder} do not match their recorded sha256: recomputing them")
        return None
    return doc


@task(name="shared-statistics", retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=transient_failure)
def shared_statistics(model: str, calibration: dict, prune: dict, ks: list[int], methods: list[str],
                      evaluation: dict, workdir: str, threads: int) -> dict[str, Any]:
    """Calibration set + one capture serving every configuration, written under workdir/shared/<key>/ as
    safetensors (never pickle) with the file's sha256 recorded beside it; a cache hit is checked against it."""
    from ghosted.config import EvalSettings
    from ghosted.corpora import build_calibration, save_calibration
    from ghosted.io import write_json_atomic
    from ghosted.models import fingerprint, load_model, resolve
    from ghosted.solve.grid import grid_header
    from ghosted.solve.solver import PruneConfig, shared_capture

    _set_threads(threads)
    key = hashlib.sha256(json.dumps([model, fingerprint(resolve(model)), calibration, prune, sorted(ks), sorted(methods)],
                                    sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(workdir) / "shared" / key
    paths = {"calib": str(folder / "calibration"), "stats": str(folder / "stats.safetensors"), "key": key}
    hit = _shared_hit(folder)
    if hit is not None:
        return {**paths, "sha256": hit["stats_sha256"], "reused": "yes", "header": hit["header"]}
    loaded = load_model(model)
    calib = build_calibration(loaded.tokenizer, calibration["source"], int(calibration["n"]),
                              int(calibration["seq_len"]), int(calibration["seed"]))
    tmpl = PruneConfig.from_dict({**prune, "remove": ks[0], "recovery": methods[0]})
    t0 = time.perf_counter()
    res = shared_capture(loaded, calib, tmpl, ks, methods, progress=False)
    header = grid_header(loaded, calib, tmpl, ks, methods, EvalSettings.from_dict(dict(evaluation)), res,
                         time.perf_counter() - t0)
    folder.mkdir(parents=True, exist_ok=True)
    save_calibration(calib, folder / "calibration", force=True)  # a killed run's own leftover
    sha = res.save(folder / "stats.safetensors")  # atomic: a half-written file never carries the name
    write_json_atomic(folder / "shared.json", {"stats_sha256": sha, "header": header})  # last: marks it complete
    return {**paths, "sha256": sha, "reused": "no", "header": header}


@task(name="sweep-cell", retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=transient_failure)
def sweep_cell(model: str, shared: dict[str, Any], k: int, method: str, prune: dict, evaluation: dict,
               threads: int) -> dict[str, Any]:
    """Solve one configuration from the shared statistics and evaluate it in place (k = 0: the dense model)."""
    from ghosted.calibration.capture import CaptureResult
    from ghosted.config import EvalSettings
    from ghosted.corpora import load_calibration
    from ghosted.models import load_model
    from ghosted.solve.grid import run_cell, run_dense
    from ghosted.solve.solver import PruneConfig

    _set_threads(threads)
    settings = EvalSettings.from_dict(dict(evaluation))
    loaded = load_model(model)
    if k == 0:
        cell = run_dense(loaded.model, loaded.tokenizer, settings)
    else:
        res = CaptureResult.load(shared["stats"], sha256=shared["sha256"])  # refuses a file changed since written
        calib = load_calibration(shared["calib"])
        cell = run_cell(loaded, calib, res, PruneConfig.from_dict({**prune, "remove": k, "recovery": method}),
                        settings)
    cell.worker = {"pid": os.getpid(), "threads": threads}
    return cell.as_dict()


# --------------------------------------------------------------------------- flow


@flow(name="ghosted-sweep", log_prints=True)
def sweep(params: str = "params.yaml", workdir: str = "out/sweep", threads_per_task: int = 1) -> dict[str, Any]:
    """Shared statistics once, then every configuration (and the dense model) as concurrent tasks."""
    from ghosted.evaluation.run import versions

    t0 = time.perf_counter()
    p = load_params(Path(params))
    s = sweep_settings(p)
    calibration = p["calibration"]
    prune = {key: v for key, v in p["prune"].items() if key not in ("remove", "layers", "recovery")}
    all_threads = max(1, os.cpu_count() or 1)
    shared = shared_statistics.submit(p["model"], calibration, prune, s["remove"], s["recovery"], s["eval"], workdir,
                                      all_threads).result()
    futures = [sweep_cell.submit(p["model"], shared, 0, "dense", prune, s["eval"], threads_per_task)]
    futures += [sweep_cell.submit(p["model"], shared, k, m, prune, s["eval"], threads_per_task)
                for k in s["remove"] for m in s["recovery"]]
    dense, *cells = [f.result() for f in futures]
    for c in cells:  # the dense model ran beside the cells: retained is filled in here
        if c.get("average") is not None and dense.get("average"):
            c["retained"] = c["average"] / dense["average"]
    wall = time.perf_counter() - t0
    print(f"sweep: {len(cells)} configurations + dense in {wall:.1f}s "
          f"(summed task time {dense['seconds'] + sum(c['seconds'] for c in cells):.1f}s)")
    return {**shared["header"], "kind": "sweep", "dense": dense, "cells": cells, "versions": versions(),
            "seconds": wall, "wall_seconds": wall,
            "shared": {key: shared[key] for key in ("key", "reused", "stats", "sha256")}}


# Dask always starts an HTTP server in the scheduler and each worker (dashboard, /info pages, /metrics, /health):
# the local cluster serves no route on it (every path 404), and the scheduler's is on a random loopback port
# instead of 8787. No dashboard is started (docs/pipeline.md, "Exposure").
NO_HTTP_ROUTES = {"distributed.scheduler.http.routes": [], "distributed.worker.http.routes": []}


def dask_runner(address: str | None, workers: int, threads_per_worker: int):
    """A DaskTaskRunner: a running cluster at `address`, else a local cluster of worker processes without a
    dashboard (run() sets NO_HTTP_ROUTES while the flow runs, so no HTTP route is served either)."""
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": threads_per_worker,
                                          "processes": True, "dashboard_address": None,
                                          "scheduler_kwargs": {"dashboard": False,
                                                               "dashboard_address": "127.0.0.1:0"}})


def run(params: str, workdir: str, address: str | None = None, workers: int | None = None,
        threads_per_worker: int | None = None, sequential: bool = False) -> dict[str, Any]:
    """The sweep on a Dask cluster (or one task at a time with `sequential`); flags over the `sweep:` section."""
    import dask

    p = load_params(Path(params))
    s = sweep_settings(p, workers=workers, threads_per_worker=threads_per_worker, address=address)
    workers, threads, address = s["workers"], s["threads_per_worker"], s["address"]
    if sequential:
        runner, label, per_task = ThreadPoolTaskRunner(max_workers=1), "sequential (one task at a time)", \
            workers * threads
    else:
        runner = dask_runner(address, workers, threads)
        label = f"dask {address}" if address else f"dask local cluster, {workers} workers x {threads} threads"
        per_task = threads
    with dask.config.set(NO_HTTP_ROUTES):
        result = sweep.with_options(task_runner=runner)(params=params, workdir=workdir, threads_per_task=per_task)
    result["runner"] = label
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--workdir", default="out/sweep")
    ap.add_argument("--out", default="reports/sweep", help="folder for sweep.json, sweep.md and the plots")
    ap.add_argument("--address", help="a running Dask scheduler, e.g. tcp://10.0.0.5:8786 (default: local cluster)")
    ap.add_argument("--workers", type=int, help="local cluster worker processes (default: sweep.workers)")
    ap.add_argument("--threads-per-worker", type=int, help="torch threads per task (default: sweep.threads_per_worker)")
    ap.add_argument("--sequential", action="store_true", help="one task at a time in this process (baseline)")
    args = ap.parse_args(argv)
    try:
        result = run(args.params, args.workdir, args.address, args.workers, args.threads_per_worker, args.sequential)
    except GhostedError as exc:
        print(f"ghosted: error: {exc}", file=sys.stderr)
        return 2
    write_report(result, Path(args.out), name="sweep")
    print(json.dumps({"out": args.out, "wall_seconds": round(result["wall_seconds"], 1), "runner": result["runner"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

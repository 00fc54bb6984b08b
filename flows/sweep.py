"""The `sweep` flow: a grid of (layers removed, recovery) configurations on a distributed task runner.

One task builds the calibration set and captures the shared statistics once (every candidate block's
float64 sums and the layer scores, one forward pass); every configuration is then its own Prefect task
that solves from those statistics and evaluates the pruned model, on a Dask cluster (prefect-dask): a
local cluster by default, or a running cluster at `address`. The dense model is evaluated as one more task.
Results go to <out>/sweep.json and <out>/sweep.md, with the wall time and the summed task times.

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

from ghosted.errors import GhostedError

from .compress import _transient, load_params

def sweep_settings(params: dict[str, Any]) -> dict[str, Any]:
    """The `sweep:` section of params.yaml (ghosted.config.SweepConfig) as a dict; every cell's config checked."""
    from ghosted.config import PruneConfig, SweepConfig, as_mapping, build

    cfg = build(SweepConfig, params.get("sweep") or {}, "sweep")
    for k in cfg.remove:
        for m in cfg.recovery:
            build(PruneConfig, _cell_prune(params, k, m), "prune")
    s = as_mapping(cfg)
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


@task(name="shared-statistics", retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=_transient)
def shared_statistics(model: str, calibration: dict, prune: dict, ks: list[int], methods: list[str],
                      workdir: str, threads: int) -> dict[str, str]:
    """Calibration set + one capture serving every configuration; written under workdir/<key>/."""
    import torch

    from ghosted.data import build_calibration, save_calibration
    from ghosted.models import fingerprint, load_model, resolve
    from ghosted.prune import PruneConfig, shared_capture

    _set_threads(threads)
    key = hashlib.sha256(json.dumps([model, fingerprint(resolve(model)), calibration, prune, sorted(ks), sorted(methods)],
                                    sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(workdir) / "shared" / key
    stats = folder / "stats.pt"
    if stats.is_file():
        return {"calib": str(folder / "calibration"), "stats": str(stats), "key": key, "reused": "yes"}
    loaded = load_model(model)
    calib = build_calibration(loaded.tokenizer, calibration["source"], int(calibration["n"]),
                              int(calibration["seq_len"]), int(calibration["seed"]))
    tmpl = PruneConfig.from_dict({**prune, "remove": ks[0], "recovery": methods[0]})
    res = shared_capture(loaded, calib, tmpl, ks, methods, progress=False)
    folder.mkdir(parents=True, exist_ok=True)
    save_calibration(calib, folder / "calibration", force=True)  # a killed run's own leftover
    tmp = stats.with_suffix(".tmp")
    torch.save(res, tmp)
    tmp.replace(stats)  # atomic: a half-written file is never picked up as a cache hit
    return {"calib": str(folder / "calibration"), "stats": str(stats), "key": key, "reused": "no",
            "capture_seconds": f"{res.seconds:.1f}"}


@task(name="sweep-cell", retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=_transient)
def run_cell(model: str, shared: dict[str, str], k: int, method: str, prune: dict, evaluation: dict,
             threads: int) -> dict[str, Any]:
    """Solve one configuration from the shared statistics and evaluate it in place (k = 0: the dense model)."""
    import torch

    from ghosted.compare import EvalSettings, evaluate_quality, format_layers
    from ghosted.data import load_calibration
    from ghosted.models import load_model
    from ghosted.prune import PruneConfig, solve
    from ghosted.surgery import temporarily_pruned

    _set_threads(threads)
    t0 = time.perf_counter()
    settings = EvalSettings.from_dict(dict(evaluation))
    loaded = load_model(model)
    cell: dict[str, Any] = {"k": k, "method": method, "worker_pid": os.getpid(), "threads": threads}
    if k == 0:
        quality = evaluate_quality(loaded.model, loaded.tokenizer, settings, progress=False)
        cell.update(removed=[], ppl={s: v["ppl"] for s, v in quality["ppl"].items()},
                    zeroshot=quality["zeroshot"], seconds=time.perf_counter() - t0)
        return cell
    res = torch.load(shared["stats"], weights_only=False)
    calib = load_calibration(shared["calib"])
    try:
        sol = solve(loaded, calib, PruneConfig.from_dict({**prune, "remove": k, "recovery": method}),
                    progress=False, log=lambda _m: None, shared=res)
    except GhostedError as exc:  # e.g. replaceme on a cut at layer 0: a result of the sweep, not a crash
        cell.update(error=str(exc), seconds=time.perf_counter() - t0)
        return cell
    with temporarily_pruned(loaded.model, sol.removed, sol.operators) as pruned:
        quality = evaluate_quality(pruned, loaded.tokenizer, settings, progress=False)
    cell.update(removed=sol.removed, removed_text=format_layers(sol.removed), guard=sol.meta.get("guard"),
                ridge=sol.meta.get("ridge"), ppl={s: v["ppl"] for s, v in quality["ppl"].items()},
                zeroshot=quality["zeroshot"], seconds=time.perf_counter() - t0)
    return cell


# --------------------------------------------------------------------------- flow


@flow(name="ghosted-sweep", log_prints=True)
def sweep(params: str = "params.yaml", workdir: str = "out/sweep", threads_per_task: int = 1) -> dict[str, Any]:
    """Shared statistics once, then every configuration (and the dense model) as concurrent tasks."""
    t0 = time.perf_counter()
    p = load_params(Path(params))
    s = sweep_settings(p)
    calibration = p["calibration"]
    prune = {key: v for key, v in p["prune"].items() if key not in ("remove", "layers", "recovery")}
    all_threads = max(1, os.cpu_count() or 1)
    shared = shared_statistics.submit(p["model"], calibration, prune, s["remove"], s["recovery"], workdir,
                                      all_threads).result()
    futures = [run_cell.submit(p["model"], shared, 0, "dense", prune, s["eval"], threads_per_task)]
    futures += [run_cell.submit(p["model"], shared, k, m, prune, s["eval"], threads_per_task)
                for k in s["remove"] for m in s["recovery"]]
    cells = [f.result() for f in futures]
    wall = time.perf_counter() - t0
    print(f"sweep: {len(cells) - 1} configurations + dense in {wall:.1f}s "
          f"(summed task time {sum(c['seconds'] for c in cells):.1f}s)")
    return {"model": p["model"], "shared": shared, "cells": cells, "wall_seconds": wall,
            "settings": {k: s[k] for k in ("remove", "recovery", "eval")}}


def dask_runner(address: str | None, workers: int, threads_per_worker: int):
    """A DaskTaskRunner: a running cluster at `address`, else a local cluster of worker processes."""
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": threads_per_worker,
                                          "processes": True, "dashboard_address": None})


def run(params: str, workdir: str, address: str | None = None, workers: int | None = None,
        threads_per_worker: int | None = None, sequential: bool = False) -> dict[str, Any]:
    p = load_params(Path(params))
    s = sweep_settings(p)
    workers = workers or s["workers"]
    threads = threads_per_worker or s["threads_per_worker"]
    address = address or s["address"]
    if sequential:
        runner, label, per_task = ThreadPoolTaskRunner(max_workers=1), "sequential (one task at a time)", \
            workers * threads
    else:
        runner = dask_runner(address, workers, threads)
        label = f"dask {address}" if address else f"dask local cluster, {workers} workers x {threads} threads"
        per_task = threads
    result = sweep.with_options(task_runner=runner)(params=params, workdir=workdir, threads_per_task=per_task)
    result["runner"] = label
    return result


def write_report(result: dict[str, Any], out: Path) -> None:
    from ghosted.io import write_json_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "sweep.json", result)
    cells = result["cells"]
    sources = sorted({s for c in cells for s in (c.get("ppl") or {})})
    lines = [f"# Sweep: {result['model']}", "", "Generated by `python -m flows.sweep`; do not edit by hand.", "",
             "| k | method | removed | " + " | ".join(f"{s} PPL" for s in sources) + " | task seconds | note |",
             "|---|---|---|" + "---|" * len(sources) + "---|---|"]
    for c in cells:
        ppl = [f"{c['ppl'][s]:.2f}" if c.get("ppl") and s in c["ppl"] else "-" for s in sources]
        g = c.get("guard") or {}
        note = c.get("error") or ("" if g.get("mode", "off") == "off" else
                                  f"guard chose {g.get('chosen')}" + (" (fallback)" if g.get("fallback") else ""))
        lines.append(f"| {c['k']} | {c['method']} | {c.get('removed_text', '-')} | " + " | ".join(ppl)
                     + f" | {c['seconds']:.1f} | {note} |")
    lines += ["", f"- Runner: {result['runner']}",
              f"- Wall time: {result['wall_seconds']:.1f} s; summed task time "
              f"{sum(c['seconds'] for c in cells):.1f} s; shared statistics {result['shared'].get('key')} "
              f"(reused: {result['shared'].get('reused')})"]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--workdir", default="out/sweep")
    ap.add_argument("--out", default="reports/sweep", help="folder for sweep.json and sweep.md")
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
    write_report(result, Path(args.out))
    print(json.dumps({"out": args.out, "wall_seconds": round(result["wall_seconds"], 1), "runner": result["runner"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `compress` flow: the stages of dvc.yaml as Prefect tasks (calibrate, score, solve, fuse, evaluate the
dense and the pruned model, register), for scheduled runs with retries.

Each task runs the same `ghosted` command as its DVC stage, in this process, with only its own section of
params.yaml (written next to its output as <output>.yaml). Outputs are content-addressed: a task writes
to <workdir>/<stage>/<key>, where key hashes the task's inputs: its params section, the base model's
fingerprint, the CONTENT of its input files and folders, and the ghosted source code. The same key is the
task's Prefect cache key, so a rerun with unchanged inputs is a cache hit that returns the existing output
without work, and a changed input writes a new folder (an old output is never overwritten while a cache
entry points at it). An output deleted by hand refreshes its cache entry. Register is never cached.

Retries: 2 (after 10 s and 60 s) for failures other than GhostedError: bad input never gets better, a
locked database or an unreachable tracking server may.

    python -m flows.compress [--params params.yaml] [--workdir out/flow] [--tracking-uri URI]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.context import TaskRunContext

from ghosted.errors import GhostedError

SECTIONS = ("model", "calibration", "prune", "eval", "gate", "registry", "sweep")
FILE_OUTPUTS = {"score": ".json", "evaluate": ".json"}  # other stages write folders
RETRY_DELAYS = [10, 60]


# --------------------------------------------------------------------------- params


def load_params(path: Path) -> dict[str, Any]:
    """params.yaml checked up front by ghosted.config (the one reader), as plain per-section dicts for the tasks."""
    from ghosted.config import as_mapping
    from ghosted.config import load_params as typed_params

    params = typed_params(path)
    if not params.model:
        raise GhostedError(f"{path}: `model:` is missing (a shipped name, a local folder or a hub id)")
    if params.prune is None or params.prune.remove is None:
        raise GhostedError(f"{path}: the pipeline needs prune.remove (the score stage scores blocks of that size)")
    return {"model": params.model, "calibration": as_mapping(params.calibration),
            **{s: dict(params.raw[s]) for s in SECTIONS[2:]}}


# --------------------------------------------------------------------------- content keys


@lru_cache(maxsize=256)
def _hash_files(signature: tuple[tuple[str, str, int, int], ...]) -> str:
    from ghosted.models import file_sha256

    h = hashlib.sha256()
    for rel, full, _size, _mtime in signature:
        h.update(rel.encode())
        h.update(file_sha256(Path(full)).encode())
    return h.hexdigest()


def content_hash(path: Path) -> str:
    """sha256 over a file's or folder's files (names and bytes); memoized on size and mtime."""
    path = Path(path)
    if not path.exists():
        return "missing"
    files = [path] if path.is_file() else sorted(
        f for f in path.rglob("*") if f.is_file() and "__pycache__" not in f.parts and not f.name.startswith("."))
    sig = []
    for f in files:
        st = f.stat()
        sig.append((f.name if f == path else f.relative_to(path).as_posix(), str(f), st.st_size, st.st_mtime_ns))
    return _hash_files(tuple(sig))


def code_hash() -> str:
    """The ghosted package's source: a code change invalidates every cached task."""
    import ghosted

    return content_hash(Path(ghosted.__file__).parent)


def stage_key(stage: str, inputs: dict[str, Any]) -> str:
    """The task's cache key and output name: its inputs, Path inputs by content (`out` by name)."""
    h = hashlib.sha256(f"{stage}\0{code_hash()}".encode())
    for name in sorted(inputs):
        v = inputs[name]
        if isinstance(v, Path) and name != "out":
            v = {"content": content_hash(v)}
        h.update(f"\0{name}={json.dumps(v, sort_keys=True, default=str)}".encode())
    return h.hexdigest()


def _cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return stage_key(context.task.name, parameters)


def _transient(task, task_run, state) -> bool:
    """Retry unless the failure is a GhostedError (bad input or config: retrying cannot help)."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, GhostedError)


CACHED = {"cache_key_fn": _cache_key, "persist_result": True, "retries": 2, "retry_delay_seconds": RETRY_DELAYS,
          "retry_condition_fn": _transient}


def output_path(workdir: Path, stage: str, inputs: dict[str, Any]) -> Path:
    return Path(workdir) / stage / (stage_key(stage, inputs)[:16] + FILE_OUTPUTS.get(stage, ""))


def run_stage(stage_task, workdir: Path, **inputs: Any) -> Path:
    """Call a cached stage task with its content-addressed output; refresh the cache if the output is gone."""
    out = output_path(workdir, stage_task.name, inputs)
    return stage_task.with_options(refresh_cache=not out.exists())(**inputs, out=out)


# --------------------------------------------------------------------------- tasks


def ghosted_cli(*argv: Any) -> None:
    """Run one `ghosted` command in this process; its GhostedError propagates (and is not retried)."""
    from ghosted.cli import build_parser

    argv_s = [str(a) for a in argv]
    try:
        args = build_parser().parse_args(argv_s)
    except SystemExit as exc:
        raise GhostedError(f"bad arguments for `ghosted {' '.join(argv_s)}`") from exc
    args.func(args)


def _section_file(out: Path, sections: dict[str, Any]) -> Path:
    """The params a task used, as a YAML file beside its output (also what `--config` reads)."""
    import yaml

    from ghosted.io import write_text_atomic

    cfg = out.parent / f"{out.name}.yaml"
    write_text_atomic(cfg, yaml.safe_dump(sections, sort_keys=False))
    return cfg


@task(name="fingerprint", retries=2, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=_transient)
def base_fingerprint(model: str) -> str:
    """The base model's content fingerprint (ghosted.models.fingerprint)."""
    from ghosted.models import fingerprint, resolve

    return fingerprint(resolve(model))


@task(name="calibrate", **CACHED)
def calibrate(model: str, fingerprint: str, calibration: dict, out: Path) -> Path:
    ghosted_cli("calibrate", model, "--config", _section_file(out, {"calibration": calibration}), "--out", out,
                "--force")  # outputs are named by their inputs: an existing one is this task's own
    return out


@task(name="score", **CACHED)
def score(model: str, fingerprint: str, calib: Path, remove: int, out: Path) -> Path:
    ghosted_cli("score", model, "--calib", calib, "--remove", remove, "--out", out, "--quiet")
    return out


@task(name="solve", **CACHED)
def solve(model: str, fingerprint: str, calib: Path, prune: dict, out: Path) -> Path:
    ghosted_cli("solve", model, "--calib", calib, "--config", _section_file(out, {"prune": prune}), "--out", out,
                "--quiet", "--force")
    return out


@task(name="fuse", **CACHED)
def fuse(model: str, fingerprint: str, ops: Path, out: Path) -> Path:
    ghosted_cli("fuse", model, "--ops", ops, "--out", out, "--quiet", "--force")
    return out


@task(name="evaluate", **CACHED)
def evaluate(model: str | Path, fingerprint: str | None, settings: dict, out: Path) -> Path:
    """`ghosted eval`: the dense model by name (+ fingerprint), or a checkpoint folder (by content)."""
    ghosted_cli("eval", model, "--config", _section_file(out, {"eval": settings}), "--out", out, "--quiet")
    return out


@task(name="register", retries=2, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=_transient)
def register(checkpoint: Path, pruned: Path, dense: Path, scores: Path, params: Path, tracking_uri: str | None,
             reports: Path) -> dict:
    """ghosted.registry.register with the `gate:` and `registry:` sections of params (never cached)."""
    from ghosted.registry import register as register_version
    from ghosted.tracking import load_config

    gate, reg = load_config(params, tracking_uri)
    res = register_version(checkpoint, pruned, dense, gate, reg, scores=scores, reports=reports, log=print)
    print(f"{res['name']} version {res['version']}: gate {res['gate']}; {res['decision']}")
    return res


# --------------------------------------------------------------------------- the flow


@flow(name="compress", log_prints=True)
def compress(params: str = "params.yaml", workdir: str = "out/flow", tracking_uri: str | None = None) -> dict:
    """Calibrate, score, solve, fuse, evaluate dense and pruned, register: each step cached by content."""
    p = load_params(Path(params))
    work = Path(workdir)
    model = p["model"]
    fp = base_fingerprint(model)
    cal = run_stage(calibrate, work, model=model, fingerprint=fp, calibration=p["calibration"])
    scores = run_stage(score, work, model=model, fingerprint=fp, calib=cal, remove=p["prune"]["remove"])
    ops = run_stage(solve, work, model=model, fingerprint=fp, calib=cal, prune=p["prune"])
    ckpt = run_stage(fuse, work, model=model, fingerprint=fp, ops=ops)
    dense = run_stage(evaluate, work, model=model, fingerprint=fp, settings=p["eval"])
    pruned = run_stage(evaluate, work, model=ckpt, fingerprint=None, settings=p["eval"])
    res = register(ckpt, pruned, dense, scores, Path(params), tracking_uri, work / "reports")
    return {**res, "checkpoint": str(ckpt), "fingerprint": fp}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.compress", description="Run the compress flow once.")
    ap.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    ap.add_argument("--workdir", default="out/flow", help="where task outputs go (default out/flow)")
    ap.add_argument("--tracking-uri", help="MLflow URI (default: registry.tracking_uri of the params file)")
    args = ap.parse_args(argv)
    try:
        res = compress(params=args.params, workdir=args.workdir, tracking_uri=args.tracking_uri)
    except GhostedError as exc:
        print(f"ghosted: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(res, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `compress` flow: dvc.yaml's stages, one Prefect task each, in dependency order.

dvc.yaml is the one DAG. Each task runs `dvc repro --single-item STAGE` in a subprocess, so DVC decides what is
stale, runs the stage's command, caches its outputs and updates dvc.lock; after a flow run `dvc status` is
clean and `dvc repro` has nothing to do, and a second flow run finds nothing stale (one `dvc status`), runs
no stage and registers nothing. Prefect adds what DVC lacks:

- run history: every stage is a task run with its log; the stage's output streams into it line by line,
  progress bars (tqdm, with their ETA) as one line every PROGRESS_EVERY_S seconds;
- retries of transient failures (2, after 10 s and 60 s). Bad input never gets better: a GhostedError, a
  params.yaml that ghosted.config rejects (checked before any stage runs), and a stage that exits with a
  `ghosted: error:` line end the flow at once with that one line;
- one compression per base model at a time: an exclusive file lock keyed by the model (under the ghosted
  cache: `<cache>/locks/`), held for the whole run; a second run waits for it. Prefect's own global
  concurrency limits live in an API server's database: with the default ephemeral server every
  `python -m flows.compress` process starts its own, and a crashed run keeps its slot until the slot's lease
  expires, while the OS drops a file lock the moment its process dies and needs no server.

    python -m flows.compress [--repo .]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ghosted.errors import GhostedError
from ghosted.json_io import parse_json, read_json

SECTIONS = ("model", "calibration", "prune", "eval", "gate", "registry", "sweep", "search", "heal")
RETRY_DELAYS = [10, 60]
PROGRESS_EVERY_S = 15.0  # a progress bar becomes one log line this often (plus its final state)
ERROR_PREFIX = "ghosted: error: "
BASE_MODEL_FILE = "data/base_model.json"  # written by the `fingerprint` stage


# --------------------------------------------------------------------------- params


def load_params(path: Path) -> dict[str, Any]:
    """params.yaml checked up front by ghosted.config (the one reader), as plain per-section dicts for the tasks."""
    from ghosted.config import load_params as typed_params
    from ghosted.config import to_json

    params = typed_params(path)
    if not params.model:
        raise GhostedError(f"{path}: `model:` is missing (a shipped name, a local folder or a hub id)")
    if params.prune is None or params.prune.remove is None:
        raise GhostedError(f"{path}: the pipeline needs prune.remove (the score stage scores blocks of that size)")
    return {"model": params.model, "calibration": to_json(params.calibration),
            **{s: dict(params.raw[s]) for s in SECTIONS[2:]}}


# --------------------------------------------------------------------------- the DAG


def _paths(entries: list | None) -> list[str]:
    """Paths of a stage's deps/outs list (entries are "path" or {"path": {options}})."""
    out = []
    for e in entries or []:
        out += list(e) if isinstance(e, dict) else [str(e)]
    return [p.rstrip("/") for p in out]


def stage_order(dvc_yaml: Path) -> list[str]:
    """dvc.yaml's stages sorted so each runs after the stages whose outputs it depends on (ties: file order)."""
    import yaml

    if not Path(dvc_yaml).is_file():
        raise GhostedError(f"{dvc_yaml} not found: run the flow from the repository root or pass --repo")
    stages = (yaml.safe_load(Path(dvc_yaml).read_text()) or {}).get("stages") or {}
    produced = {p: name for name, st in stages.items()
                for key in ("outs", "metrics", "plots") for p in _paths(st.get(key))}

    def upstream(name: str) -> set[str]:
        deps = _paths(stages[name].get("deps"))
        return {producer for d in deps for out, producer in produced.items()
                if producer != name and (d == out or d.startswith(out + "/"))}

    needs = {name: upstream(name) for name in stages}
    order: list[str] = []
    while len(order) < len(stages):
        ready = [n for n in stages if n not in order and needs[n] <= set(order)]
        if not ready:
            raise GhostedError(f"{dvc_yaml}: the stages depend on each other in a cycle")
        order.append(ready[0])
    return order


# --------------------------------------------------------------------------- running DVC


class StageFailed(RuntimeError):
    """A stage that failed without a `ghosted: error:` line (a crash, a kill, a lock): worth a retry."""


def transient_failure(task, task_run, state) -> bool:
    """The retry condition of the flows' tasks: retry unless the failure is a GhostedError (bad input or config:
    retrying cannot help)."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, GhostedError)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # The stages call `ghosted`: the one installed beside this interpreter, with this PYTHONPATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def run_dvc(repo: Path, *args: str, log=print) -> tuple[int, list[str]]:
    """`dvc ARGS` in repo, its output streamed to `log` line by line (progress bars throttled); (rc, lines)."""
    proc = subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=repo, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    lines: deque[str] = deque(maxlen=400)
    last_bar, bar_logged = "", 0.0

    def piece(text: str, is_bar: bool) -> None:
        nonlocal last_bar, bar_logged
        text = text.rstrip()
        if not text:
            return
        if is_bar:  # a tqdm update ends in \r: log the first and then one every PROGRESS_EVERY_S
            last_bar = text
            if time.monotonic() - bar_logged >= PROGRESS_EVERY_S:
                bar_logged = time.monotonic()
                log(text)
            return
        last_bar = ""
        lines.append(text)
        log(text)

    buf = b""
    fd = proc.stdout.fileno()
    while chunk := os.read(fd, 65536):
        buf += chunk
        while (m := re.search(rb"[\r\n]", buf)) is not None:
            text, is_bar = buf[:m.start()].decode(errors="replace"), buf[m.start():m.end()] == b"\r"
            buf = buf[m.end():]
            piece(text, is_bar)
    piece(buf.decode(errors="replace"), False)
    if last_bar:
        log(last_bar)
    return proc.wait(), list(lines)


def _failure(stage: str, rc: int, lines: list[str]) -> Exception:
    """GhostedError for a stage's own `ghosted: error:` line (no retry), StageFailed otherwise."""
    errors = [ln for ln in lines if ln.startswith(ERROR_PREFIX)]
    if errors:
        return GhostedError(errors[-1][len(ERROR_PREFIX):])
    last = next((ln for ln in reversed(lines) if ln.strip()), "no output")
    return StageFailed(f"stage {stage}: `dvc repro` exited with {rc}: {last}")


@task(retries=2, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=transient_failure, cache_policy=NO_CACHE)
def dvc_stage(repo: str, stage: str, force: bool = False) -> dict[str, Any]:
    """`dvc repro --single-item STAGE` (DVC skips it when nothing it depends on changed)."""
    logger = get_run_logger()
    rc, lines = run_dvc(Path(repo), "repro", "--single-item", *(["--force"] if force else []), stage,
                        log=logger.info)
    if rc != 0:
        raise _failure(stage, rc, lines)
    result: dict[str, Any] = {"stage": stage, "ran": any(f"Running stage '{stage}'" in ln for ln in lines)}
    for ln in reversed(lines):  # a stage's JSON summary on stdout (register: the version it made, if any)
        if ln.startswith("{") and ln.endswith("}"):
            with contextlib.suppress(ValueError):  # JSONFileError is a ValueError
                result["output"] = parse_json(ln, f"stage {stage} output", "JSON summary")
                break
    return result


@task(retries=2, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=transient_failure, cache_policy=NO_CACHE)
def dvc_status(repo: str) -> list[str]:
    """The stages `dvc status` reports stale (empty: data and pipelines are up to date)."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=repo, env=_env(),
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    lines = (proc.stdout + proc.stderr).splitlines()
    if proc.returncode != 0:
        raise _failure("status", proc.returncode, lines)
    try:
        status = parse_json(proc.stdout.strip() or "{}", "`dvc status --json`", "status", expect=dict)
    except ValueError as exc:  # JSONFileError is a ValueError
        raise StageFailed(f"`dvc status --json` printed no JSON: {lines[-1] if lines else 'nothing'}") from exc
    return sorted(status)


# --------------------------------------------------------------------------- one run per model


def _model_identity(model: str, repo: Path) -> str:
    local = (repo / model) if not Path(model).is_absolute() else Path(model)
    return str(local.resolve()) if local.exists() else model


@contextlib.contextmanager
def model_lock(model: str, repo: Path, log=print) -> Iterator[Path]:
    """Hold an exclusive lock for this base model (waits while another compression of it runs)."""
    from ghosted.models import cache_dir

    ident = _model_identity(model, repo)
    path = cache_dir() / "locks" / f"compress-{hashlib.sha256(ident.encode()).hexdigest()[:16]}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text().strip() or "another process"
            log(f"another compression of {model} is running ({holder}); waiting for {path}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, repo {repo}".encode())
        yield path
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# --------------------------------------------------------------------------- the flow


def _read(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


@flow(name="compress", log_prints=True)
def compress(repo: str = ".", refresh_fingerprint: bool = False) -> dict[str, Any]:
    """Reproduce dvc.yaml stage by stage (stale ones only); refresh_fingerprint re-reads the base model first."""
    root = Path(repo).resolve()
    with contextlib.chdir(root):  # relative paths in params.yaml name files in the repo (DVC runs stages there)
        params = load_params(root / "params.yaml")  # a bad param ends the run here, before any stage
    order = stage_order(root / "dvc.yaml")
    result: dict[str, Any] = {"repo": str(root), "model": params["model"], "ran": [], "registered": None}
    with model_lock(params["model"], root):
        if refresh_fingerprint and "fingerprint" in order:
            # DVC cannot see inside the model cache: rerun the fingerprint stage; identical bytes rerun nothing.
            before = _read(root / BASE_MODEL_FILE)
            dvc_stage.with_options(name="fingerprint")(str(root), "fingerprint", force=True)
            if _read(root / BASE_MODEL_FILE) != before:
                result["ran"].append("fingerprint")
        stale = dvc_status.with_options(name="status")(str(root))
        if not stale:
            print("data and pipelines are up to date: nothing to run")
        else:
            print(f"stale: {', '.join(stale)}; reproducing {', '.join(order)} in order")
            for stage in order:
                res = dvc_stage.with_options(name=stage)(str(root), stage)
                if res["ran"]:
                    result["ran"].append(stage)
                out = res.get("output") or {}
                if stage == "register" and res["ran"] and out.get("version"):
                    result["registered"] = {k: out.get(k) for k in ("name", "version", "gate", "champion",
                                                                     "decision")}
    if (root / BASE_MODEL_FILE).is_file():
        result["fingerprint"] = base_fingerprint(root)
    return result


def base_fingerprint(repo: Path) -> str | None:
    """The fingerprint recorded in the repository's base-model record (None without the file)."""
    path = Path(repo) / BASE_MODEL_FILE
    if not path.is_file():
        return None
    doc = read_json(path, "base-model record", expect=dict, fix="rerun the fingerprint stage (`dvc repro fingerprint`)")
    value = doc.get("fingerprint")
    return value if isinstance(value, str) else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.compress",
                                 description="Run dvc.yaml's stages as Prefect tasks (stale stages only).")
    ap.add_argument("--repo", default=".", help="the repository root holding dvc.yaml and params.yaml (default .)")
    args = ap.parse_args(argv)
    try:
        res = compress(repo=args.repo)
    except GhostedError as exc:
        print(f"ghosted: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(res, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

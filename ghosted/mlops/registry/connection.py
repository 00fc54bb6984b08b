"""Talking to the MLflow store: a client whose calls retry while SQLite is locked, one-line errors that name the
tracking URI, the cross-process lock of an SQLite registry, and lookups of experiments, models and versions.

A locked SQLite database is retried with backoff for `db_timeout` seconds, then ends in one line; read-only
callers (create=False) never create a database or folders.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ghosted.errors import GhostedError
from ghosted.mlops.registry.names import check_name

if TYPE_CHECKING:
    from ghosted.config import RegistryConfig

DB_TIMEOUT_S = 30.0  # how long calls retry while the SQLite database is locked by another writer
LOCK_TIMEOUT_S = 900.0  # how long a register waits for other registers' short critical sections

T = TypeVar("T")


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


def retry(fn: Callable[[], T], where: str, timeout: float) -> T:
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


class Client:
    """An MlflowClient whose every call is retried while the SQLite database is locked."""

    def __init__(self, uri: str, timeout: float) -> None:
        from mlflow import MlflowClient

        self._where, self._timeout = uri, timeout
        self._client = retry(lambda: MlflowClient(tracking_uri=uri, registry_uri=uri), uri, timeout)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr
        return lambda *a, **k: retry(lambda: attr(*a, **k), self._where, self._timeout)


class NoRegistry(GhostedError):
    """A read-only call found no registry database where the URI points."""


def connect(reg: RegistryConfig, *, create: bool, db_timeout: float = DB_TIMEOUT_S) -> Client:
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
    with mlflow_errors(reg):
        if db is None or not create:
            return Client(uri, db_timeout)
        # Creating or upgrading the schema is not safe from two processes at once: do it under the lock, for
        # both stores MLflow opens on the file (tracking on construction, the registry on its first call).
        with registry_lock(reg):
            client = Client(uri, db_timeout)
            client.search_registered_models(max_results=1)
        return client


@contextmanager
def mlflow_errors(reg: RegistryConfig) -> Iterator[None]:
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


def experiment_id(client: Client, reg: RegistryConfig) -> str:
    """The id of reg.experiment, created (with its artifacts beside an SQLite database) if missing."""
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


def find_model(client: Client, name: str):
    """The registered model `name`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if not _not_found(exc):
            raise
    return None


def registered_model(client: Client, name: str):
    """The registered model, or a one-line error listing the known names."""
    model = find_model(client, name)
    if model is not None:
        return model
    known = sorted(m.name for m in client.search_registered_models())
    raise GhostedError(f"no registered model '{name}'; known: {', '.join(known) or 'none yet (run ghosted register)'}")


def model_versions(client: Client, name: str) -> list:
    """Every version of the registered model `name`, oldest first."""
    return sorted(client.search_model_versions(f"name='{check_name(name)}'"), key=lambda v: int(v.version))


def model_version(client: Client, name: str, version: str | int):
    """One version of `name`, or a one-line error listing the model's versions."""
    from mlflow.exceptions import MlflowException

    registered_model(client, name)
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if not _not_found(exc):
            raise
    versions = [v.version for v in model_versions(client, name)]
    raise GhostedError(f"model '{name}' has no version {version}; versions: {', '.join(map(str, versions)) or 'none'}")

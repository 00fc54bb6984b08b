"""Scheduled recompression against a real Prefect server (`prefect server start`), a real deployment served by
`python -m flows.recompress --serve`, the project's dvc.yaml on a tiny model and MLflow on SQLite."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("prefect")

from tests.mlops.dvc_repo import ROOT, env, make_repo, save_tiny  # noqa: E402

DEPLOYMENT = "ghosted-recompress/scheduled"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prefect_env(home: Path, url: str | None) -> dict[str, str]:
    e = env()
    e.pop("PREFECT_API_URL", None)
    e.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false")
    if url:
        e["PREFECT_API_URL"] = url
    return e


def _tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.is_file() else ""


def _wait(check: Callable[[], object], timeout: float, what: str, log: Path) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := check():
            return got
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; log:\n{_tail(log)}")


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process this test started (SIGTERM: a graceful shutdown), then whatever is left in its session."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """`prefect server start` on a free loopback port with a throwaway PREFECT_HOME; stopped at the end."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    e = _prefect_env(home, None)
    e["PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS"] = "3"  # a resumed schedule gets its runs within seconds
    log = home / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port), "--no-ui"], env=e, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait(lambda: _healthy(url) or proc.poll() is not None, 240, "the Prefect server", log)
        assert proc.poll() is None, f"prefect server start exited:\n{_tail(log)}"
        yield url, home
    finally:
        _stop(proc)


def test_serve_without_a_server_is_one_line_and_exit_2(tmp_path):
    for url in (None, f"http://127.0.0.1:{_free_port()}/api"):  # not set; set, with nothing listening
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "flows.recompress", "--serve", "--interval", "5",
                               "--repo", str(tmp_path)], cwd=ROOT, env=_prefect_env(tmp_path / "home", url),
                              capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
        took = time.monotonic() - t0
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and proc.stdout == "" and len(err) == 1, (proc.returncode, proc.stderr)
        assert err[0].startswith("ghosted: error: ") and "`prefect server start`" in err[0]
        assert ("PREFECT_API_URL is not set" in err[0]) if url is None else (f"at PREFECT_API_URL={url}" in err[0])
        assert took < 30, took


def _client_calls(url: str):
    """Functions reading the served deployment's flow runs and the repo's registered versions."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    def runs(*states: str) -> list:
        with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            return client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["ghosted-recompress"])),
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["scheduled"])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=states))))

    def deployment():
        from prefect.exceptions import ObjectNotFound

        with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            try:
                return client.read_deployment_by_name(DEPLOYMENT)
            except ObjectNotFound:
                return None

    return runs, deployment


def _versions(repo: Path) -> list[str]:
    from mlflow import MlflowClient

    if not (repo / "mlflow.db").is_file():
        return []
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    found = MlflowClient(tracking_uri=uri, registry_uri=uri).search_model_versions("name='ghosted-tiny-llama'")
    return sorted(str(v.version) for v in found)


def _completed_after(runs, t: float) -> list:
    return [r for r in runs("COMPLETED") if r.start_time and r.start_time.timestamp() > t]


@pytest.mark.slow  # about 3 min: two pipeline runs of the tiny model plus a real server (it runs in CI)
def test_the_served_deployment_recompresses_when_the_base_model_changes(prefect_server, tmp_path):
    """`--serve --interval 5` on a real server: the deployment is listed; its first run reproduces the pipeline
    and registers version 1; a run with nothing changed completes and registers nothing; the operator pauses the
    schedule (no run starts), the base model's weights change, the schedule resumes and a run registers
    version 2. The served process stops at the end and pauses its deployment."""
    url, home = prefect_server
    runs, deployment = _client_calls(url)
    repo = make_repo(tmp_path / "repo")
    e = _prefect_env(home, url)
    e["PREFECT_RUNNER_POLL_FREQUENCY"] = "2"
    log = tmp_path / "serve.log"

    def prefect(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "prefect", *args], env=e, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    t0 = time.time()
    with log.open("w") as out:
        serve = subprocess.Popen([sys.executable, "-m", "flows.recompress", "--serve", "--interval", "5",
                                  "--repo", str(repo)], cwd=ROOT, env=e, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        dep = _wait(deployment, 120, "the deployment", log)
        t_deployed = time.time()
        assert dep.parameters == {"repo": str(repo.resolve())} and dep.entrypoint == "flows.recompress.recompress"
        assert "ghosted-recompress/scheduled" in prefect("deployment", "ls").replace("\u2026", "")
        # First run: no fingerprint yet, so the whole pipeline runs and registers version 1.
        # (The registry is read only once a run completed: the register stage creates the database.)
        _wait(lambda: runs("COMPLETED") and _versions(repo) == ["1"], 600, "version 1", log)
        t_v1 = time.time()
        fingerprint = (repo / "data" / "base_model.json").read_text()
        # A later run with nothing changed: completed, and no new version.
        done = max(r.end_time.timestamp() for r in runs("COMPLETED"))
        _wait(lambda: _completed_after(runs, done), 120, "a run with nothing changed", log)
        assert _versions(repo) == ["1"] and (repo / "data" / "base_model.json").read_text() == fingerprint

        # The operator pauses the schedule: runs in flight finish, none is left scheduled and none starts.
        sched = dep.schedules[0].id
        assert "Paused schedule" in prefect("deployment", "schedule", "pause", DEPLOYMENT, str(sched))
        _wait(lambda: not runs("RUNNING", "PENDING"), 120, "the runs in flight", log)
        paused_at = time.time()
        save_tiny(repo / "base" / "tiny-llama", seed=1)  # a new release of the base model
        time.sleep(5)
        assert not runs("SCHEDULED", "RUNNING", "PENDING") and not _completed_after(runs, paused_at)
        assert _versions(repo) == ["1"]

        prefect("deployment", "schedule", "resume", DEPLOYMENT, str(sched))
        t_resumed = time.time()
        _wait(lambda: _completed_after(runs, t_resumed) and _versions(repo) == ["1", "2"], 600, "version 2", log)
        t_v2 = time.time()
        assert (repo / "data" / "base_model.json").read_text() != fingerprint
        assert not runs("FAILED", "CRASHED")
        print(f"\nscheduled recompression: serve start -> deployment {t_deployed - t0:.1f} s, "
              f"deployment -> version 1 {t_v1 - t_deployed:.1f} s, resume after the model changed -> version 2 "
              f"{t_v2 - t_resumed:.1f} s, whole test {time.time() - t0:.1f} s")
    finally:
        _stop(serve)
    assert deployment().paused  # stopping the served process pauses its deployment

"""Hermetic test settings: offline, no telemetry, throwaway Prefect/MLflow/ghosted homes."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

_TMP = tempfile.mkdtemp(prefix="ghosted-tests-")
os.environ.update({
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "TOKENIZERS_PARALLELISM": "false",
})
os.environ.setdefault("PREFECT_HOME", os.path.join(_TMP, "prefect"))

import torch  # noqa: E402

# Tiny models on a shared 2-core machine: one thread avoids oversubscription (0.5 s -> 2 ms per forward).
torch.set_num_threads(1)


import pytest  # noqa: E402

from tests.tiny_models import save_tiny_folder  # noqa: E402


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real Hugging Face folder (weights + tokenizer) of a tiny random 6-layer Llama, shared by every test file."""
    return save_tiny_folder(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """run(*argv) -> (exit code, stdout, stderr) of the `ghosted` CLI called in this process."""
    from ghosted.cli import main

    def _run(*argv: object) -> tuple[int, str, str]:
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return _run


_MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@pytest.fixture(autouse=True)
def _mlflow_uri_env_restored():
    """mlflow.set_tracking_uri/set_registry_uri also export MLFLOW_TRACKING_URI/MLFLOW_REGISTRY_URI for subprocesses:
    a test that points MLflow somewhere must not send a later test's `ghosted register` subprocess there."""
    before = {k: os.environ.get(k) for k in _MLFLOW_ENV}
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


# The longest files first: with one file per xdist worker (scripts/test.sh) the suite ends when the file started
# last ends. A stable sort, so the order inside each file is kept.
_LONGEST_FIRST = ("test_schedule.py", "test_flows.py", "test_reliability.py", "test_registry.py", "test_export.py", "test_cli.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))

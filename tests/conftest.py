"""Hermetic test settings: offline, no telemetry, throwaway Prefect/MLflow/ghosted homes."""

from __future__ import annotations

import os
import tempfile

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

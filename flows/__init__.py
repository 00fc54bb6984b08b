"""Prefect flows around the ghosted pipeline: `compress` (dvc.yaml's stages as retried Prefect tasks) and
`recompress` (refresh the base model's fingerprint, then reproduce what is stale; can be served on a cron)."""

import os

# Prefect's ephemeral API server gets 20 s to start by default; on a busy machine that fails the flow before any
# work. Set before Prefect reads its settings (the user's own value wins).
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

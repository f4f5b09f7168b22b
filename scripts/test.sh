#!/usr/bin/env bash
# Installs everything the tests need (Debian packages, and Python packages into the project's
# virtual environment), then runs lint and the whole test suite. CI runs exactly this (.ci/run).
# The model and recordings are read from ../shared (or EDGE_AGENT_MODEL_DIR / EDGE_AGENT_DEV_AUDIO).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
bash scripts/install-deps.sh
bash scripts/install-audio-test-deps.sh
"$PYTHON" -m ruff check edge_agent tests benchmarks
"$PYTHON" -m pytest -q "$@"

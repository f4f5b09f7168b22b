#!/usr/bin/env bash
# Installs everything the tests need, then runs lint and the whole test suite.
# The model and recordings are read from ../shared (or EDGE_AGENT_MODEL_DIR / EDGE_AGENT_DEV_AUDIO).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/install-audio-test-deps.sh
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m ruff check edge_agent tests benchmarks
"$PYTHON" -m pytest -q "$@"

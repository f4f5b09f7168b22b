#!/usr/bin/env bash
# Installs what edge-agent's tests need on Debian/Ubuntu (run as root or with sudo), Python
# packages into PYTHON's environment (scripts/test.sh sets it to the project's virtual
# environment). Idempotent: packages already present are skipped, so a second run takes seconds.
#   EDGE_AGENT_EXTRAS  pip extras to install (default: everything the tests use)
#   EDGE_AGENT_TORCH   torch requirement when torch is missing (default: torch==2.13.0). On x86-64
#                      PyPI's torch is the multi-GB CUDA build; to get the CPU build first run
#                      pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/debian-packages.sh

# mosquitto: every broker test; portaudio19-dev, python3-dev, gcc: PyAudio (the mic extra);
# chromium (+ a CJK font for readable screenshots): the browser tests; curl: the REST service's
# curl examples; python3, python3-venv: the quickstart test with Debian's own interpreter;
# systemd: systemd-analyze and systemd-sysusers for the unit's tests.
debian_packages=(
  mosquitto mosquitto-clients portaudio19-dev openssl python3 python3-dev python3-venv gcc chromium
  fonts-wqy-microhei curl systemd
)
install_debian_packages "${debian_packages[@]}"
# The Debian package enables a system-wide broker; tests and the quickstart start their own.

PYTHON="${PYTHON:-python3}"
if [ -z "${EDGE_AGENT_SKIP_TORCH:-}" ] && ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q "${EDGE_AGENT_TORCH:-torch==2.13.0}"
fi
EXTRAS="${EDGE_AGENT_EXTRAS-test,fast,torch,modelscope,mic,pinyin,wyoming}"
"$PYTHON" -m pip install -q -e ".${EXTRAS:+[$EXTRAS]}"

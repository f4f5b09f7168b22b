# Sourced by scripts/quickstart.sh and scripts/test.sh: the project's virtual environment,
# created or reused, and PYTHON set to its interpreter (exported for the scripts they call).
#
# Debian 12 and Ubuntu 24.04 refuse `pip install` into the system Python (PEP 668), and `sudo`
# drops an activated environment, so the scripts always install into one:
#   1. the environment the caller has activated (VIRTUAL_ENV), if any;
#   2. else EDGE_AGENT_VENV, default .venv in the project, made from PYTHON (default python3)
#      with --system-site-packages (what the system already has, torch for one, is reused),
#      after installing python3-venv (and python3) with apt-get when they are missing.

source "$(dirname "${BASH_SOURCE[0]}")/debian-packages.sh"

_edge_agent_venv() {
  local base="${PYTHON:-python3}" venv
  if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ] && [ -z "${EDGE_AGENT_VENV:-}" ]; then
    venv="$VIRTUAL_ENV"
  else
    venv="${EDGE_AGENT_VENV:-$(pwd)/.venv}"
  fi
  if [ ! -x "$venv/bin/python" ]; then
    if ! command -v "$base" >/dev/null 2>&1 || ! "$base" -c 'import ensurepip, venv' >/dev/null 2>&1; then
      # Debian's python3 comes without the venv module's pip (ensurepip): python3-venv has it.
      install_debian_packages python3 python3-venv
    fi
    echo "creating a virtual environment in $venv (from $("$base" -c 'import sys; print(sys.executable)'))"
    "$base" -m venv --system-site-packages "$venv"
  fi
  PYTHON="$venv/bin/python"
  export PYTHON
  echo "virtual environment: $venv (to use edge-agent afterwards: source $venv/bin/activate)"
}
_edge_agent_venv

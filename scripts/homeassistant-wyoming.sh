#!/usr/bin/env bash
# Home Assistant's own Wyoming integration against `edge-agent wyoming`, end to end, on loopback.
#
# Installs Home Assistant 2024.3.3 (the newest release that installs on Python 3.11) into a
# virtual environment of its own, with the constraints file shipped inside its wheel
# (homeassistant/package_constraints.txt), josepy<2, and the requirements of the Wyoming
# integration and of the integrations it depends on (read from their manifests). Then starts
# the agent as a Wyoming service on a free loopback port, announced over mDNS on loopback only,
# and runs scripts/homeassistant_wyoming_check.py twice in that environment: the service added
# as discovered over mDNS, and added by host and port. Each run prints a JSON report; the script
# exits 0 when both woke an Assist pipeline on 小云小云 and not on other speech.
#
#   EDGE_AGENT_HA_VENV     where the environment lives (default ~/.cache/edge-agent/homeassistant-2024.3.3)
#   EDGE_AGENT_MODEL_DIR   the model (default ../shared/models/speech_charctc_kws_phone-xiaoyun)
#   EDGE_AGENT_DEV_AUDIO   the recordings (default ../shared/audio/dev)
#   HA_CHECK_OUTPUT        folder for the reports (default: a temporary one, printed)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
HA_VERSION=2024.3.3
VENV="${EDGE_AGENT_HA_VENV:-$HOME/.cache/edge-agent/homeassistant-$HA_VERSION}"
MODEL_DIR="${EDGE_AGENT_MODEL_DIR:-../shared/models/speech_charctc_kws_phone-xiaoyun}"
AUDIO="${EDGE_AGENT_DEV_AUDIO:-../shared/audio/dev}"
OUTPUT="${HA_CHECK_OUTPUT:-$(mktemp -d)}"
mkdir -p "$OUTPUT"

if ! "$VENV/bin/python" -c "import homeassistant.components.wyoming.wake_word, zeroconf, hassil" >/dev/null 2>&1; then
  echo "installing Home Assistant $HA_VERSION into $VENV"
  "$PYTHON" -m venv "$VENV"
  download="$(mktemp -d)"
  "$VENV/bin/pip" download -q --no-deps "homeassistant==$HA_VERSION" -d "$download"
  "$VENV/bin/python" - "$download" <<'EOF'
import sys, zipfile, pathlib
folder = pathlib.Path(sys.argv[1])
(wheel,) = folder.glob("homeassistant-*.whl")
with zipfile.ZipFile(wheel) as archive:
    (folder / "constraints.txt").write_bytes(archive.read("homeassistant/package_constraints.txt"))
EOF
  "$VENV/bin/pip" install -q "$download"/homeassistant-*.whl "josepy<2" -c "$download/constraints.txt"
  # The Wyoming integration's requirements and those of the integrations it depends on, as Home
  # Assistant would install them at run time; zeroconf for its discovery step.
  mapfile -t requirements < <("$VENV/bin/python" - <<'EOF'
import json, pathlib, homeassistant.components as components
root = pathlib.Path(components.__file__).parent
seen, requirements = set(), set()
def visit(domain):
    if domain in seen or not (root / domain / "manifest.json").exists():
        return
    seen.add(domain)
    manifest = json.loads((root / domain / "manifest.json").read_text())
    requirements.update(manifest.get("requirements", []))
    for other in manifest.get("dependencies", []) + manifest.get("after_dependencies", []):
        visit(other)
for domain in ("wyoming", "zeroconf"):
    visit(domain)
print("\n".join(sorted(requirements)))
EOF
)
  "$VENV/bin/pip" install -q "${requirements[@]}" -c "$download/constraints.txt"
  rm -rf "$download"
fi

positive="$(ls "$AUDIO"/pos/*.wav | head -n 1)"
negative="$(ls "$AUDIO"/neg/*.wav | head -n 1)"
port="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
instance="edge-agent-ha-check-$$"
agent_log="$OUTPUT/agent.log"
EDGE_AGENT_WYOMING__ADVERTISE_HOST=127.0.0.1 EDGE_AGENT_WYOMING__ZEROCONF_NAME="$instance" \
  "$PYTHON" -m edge_agent wyoming --model-dir "$MODEL_DIR" --wyoming-host 127.0.0.1 --wyoming-port "$port" \
  >"$agent_log" 2>&1 &
agent=$!
trap 'kill "$agent" 2>/dev/null; wait "$agent" 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  grep -q "announced over mDNS" "$agent_log" && break
  kill -0 "$agent" 2>/dev/null || { cat "$agent_log"; exit 1; }
  sleep 0.2
done
grep -q "announced over mDNS" "$agent_log" || { cat "$agent_log"; echo "the agent did not start"; exit 1; }

status=0
check() {
  local name="$1"; shift
  if "$VENV/bin/python" scripts/homeassistant_wyoming_check.py --port "$port" \
      --positive "$positive" --negative "$negative" "$@" >"$OUTPUT/$name.json" 2>"$OUTPUT/$name.log"; then
    echo "$name: ok"
  else
    echo "$name: FAILED (see $OUTPUT/$name.log)"
    status=1
  fi
  cat "$OUTPUT/$name.json"
}
check discovered --zeroconf-instance "$instance"
check added-by-host
echo "reports in $OUTPUT"
exit "$status"

#!/usr/bin/env bash
# The agent's main job, end to end, on a fresh Debian/Ubuntu machine (as root or with sudo):
#   1. installs what is missing: mosquitto and its clients (Debian), the edge-agent package in
#      the project's virtual environment (scripts/venv.sh: .venv, made if needed), and the
#      modelscope downloader only if the model is not on disk;
#   2. finds the model (EDGE_AGENT_MODEL_DIR, ../shared, the ModelScope cache, or downloads it);
#   3. starts a local mosquitto and the agent;
#   4. streams the model's example recording of 小云小云 to the agent over MQTT, in real time,
#      as a thin device would, and prints the detection the agent publishes;
#   5. stops the agent (it publishes `offline`) and the broker.
# The tests' own packages (chromium, PortAudio headers, torch...) are scripts/test.sh's business.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"

source scripts/debian-packages.sh
debian_packages=(mosquitto mosquitto-clients)
install_debian_packages "${debian_packages[@]}"

source scripts/venv.sh
# Installed already (this checkout, with its dependencies)? Then a second run skips pip.
if ! (cd / && "$PYTHON" -c 'import os, sys, edge_agent, numpy, yaml, paho.mqtt, psutil
sys.exit(os.path.dirname(os.path.dirname(os.path.abspath(edge_agent.__file__))) != sys.argv[1])' "$ROOT") 2>/dev/null
then
  echo "installing edge-agent into the virtual environment"
  "$PYTHON" -m pip install -q -e .
fi

if [ -z "${EDGE_AGENT_MODEL_DIR:-}" ] && [ -f "$ROOT/../shared/models/speech_charctc_kws_phone-xiaoyun/kwsr.net" ]; then
  export EDGE_AGENT_MODEL_DIR="$ROOT/../shared/models/speech_charctc_kws_phone-xiaoyun"
fi
if [ -z "${EDGE_AGENT_MODEL_DIR:-}" ] && ! EDGE_AGENT_MODEL__DOWNLOAD=false "$PYTHON" -m edge_agent model path >/dev/null 2>&1; then
  # Not on disk: the downloader is worth installing only if the hub can be reached (3 s at most).
  # If not, `model path` below says why once, with what else to try.
  if "$PYTHON" -c 'import os, sys; from edge_agent.model_store import hub_unreachable
sys.exit(1 if hub_unreachable(os.environ) else 0)'; then
    echo "the model is not on disk: installing the modelscope downloader"
    "$PYTHON" -m pip install -q -e '.[modelscope]'
  fi
fi
MODEL_DIR="$("$PYTHON" -m edge_agent model path)"
EXAMPLE="$MODEL_DIR/example/kws_xiaoyunxiaoyun.wav"
echo "model: $MODEL_DIR"

WORK="$(mktemp -d)"
PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
cleanup() {
  [ -n "${SUB_PID:-}" ] && kill "$SUB_PID" 2>/dev/null || true
  [ -n "${AGENT_PID:-}" ] && kill -TERM "$AGENT_PID" 2>/dev/null && wait "$AGENT_PID" 2>/dev/null || true
  [ -n "${BROKER_PID:-}" ] && kill "$BROKER_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$PORT" > "$WORK/mosquitto.conf"
mosquitto -c "$WORK/mosquitto.conf" > "$WORK/mosquitto.log" 2>&1 &
BROKER_PID=$!
for _ in $(seq 1 50); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
echo "broker: mosquitto on 127.0.0.1:$PORT"

# Everything the agent publishes, as any MQTT client sees it.
mosquitto_sub -h 127.0.0.1 -p "$PORT" -v -t 'edge_agent/quickstart/availability' -t 'edge_agent/quickstart/info' \
  -t 'edge_agent/quickstart/health' -t 'edge_agent/quickstart/detection' -t 'edge_agent/quickstart/error' \
  > "$WORK/broker-traffic.log" 2>&1 &
SUB_PID=$!

EDGE_AGENT_OUTBOX__PATH="$WORK/outbox.db" "$PYTHON" -m edge_agent run \
  --broker "127.0.0.1:$PORT" --device-id quickstart > "$WORK/agent.log" 2>&1 &
AGENT_PID=$!
online=""
for _ in $(seq 1 300); do
  if grep -q "edge_agent/quickstart/availability online" "$WORK/broker-traffic.log" 2>/dev/null; then
    online=yes
    break
  fi
  kill -0 "$AGENT_PID" 2>/dev/null || break  # the agent exited: its log says why
  sleep 0.1
done
if [ -z "$online" ]; then
  echo "FAILED: the agent did not come online (it exited, or 30 s passed); its log:" >&2
  cat "$WORK/agent.log" >&2
  exit 1
fi
echo "agent: online (edge_agent/quickstart/availability)"

echo "streaming $EXAMPLE to edge_agent/quickstart/audio/demo in real time..."
"$PYTHON" -m edge_agent stream --broker "127.0.0.1:$PORT" --device quickstart --stream demo --wait 2 "$EXAMPLE" \
  | tee "$WORK/detections.jsonl"

kill -TERM "$AGENT_PID"; wait "$AGENT_PID" || true; AGENT_PID=""
sleep 0.3
echo
echo "--- what the broker saw (availability, info, health, detection) ---"
cut -c1-200 "$WORK/broker-traffic.log"
echo "--- agent log ---"
cat "$WORK/agent.log"
if ! grep -q '小云小云' "$WORK/detections.jsonl"; then
  echo "FAILED: no detection of 小云小云 arrived" >&2
  exit 1
fi
echo
echo "OK: 小云小云 detected and published over MQTT."
echo "edge-agent is installed in $(dirname "$(dirname "$PYTHON")"); to use it: source $(dirname "$PYTHON")/activate"

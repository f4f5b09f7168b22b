#!/usr/bin/env bash
# edge-agent on 64-bit and 32-bit ARM, emulated on this x86-64 machine (qemu-user), compared with
# x86-64. Run as root on Debian 12:
#
#   bash scripts/test-arm.sh              # arm64 and armhf
#   bash scripts/test-arm.sh arm64        # one architecture
#   bash scripts/test-arm.sh --engine-tests   # also pytest tests/engine (not slow) in each root
#   bash scripts/test-arm.sh --image      # also build Dockerfile.arm64 and check the image
#                                         # (scripts/build-image.sh)
#
# For each architecture:
#   1. a Debian 12 root (debootstrap --variant=minbase, under qemu; made once, cached in
#      EDGE_AGENT_ARM_CACHE, default /var/cache/edge-agent-arm);
#   2. the runtime installed as a user would, without a compiler:
#      arm64  a venv, PyPI's manylinux aarch64 wheels (numpy, PyYAML, paho-mqtt, psutil, scipy),
#             `pip install 'edge-agent[fast]'`;
#      armhf  Debian's python3-numpy, python3-yaml, python3-psutil (PyPI has no armv7l numpy),
#             a venv with --system-site-packages, `pip install edge-agent` (paho-mqtt from PyPI);
#      the wheels are downloaded on this host and installed with --no-index (pip inside the
#      emulated root may not verify the package index's certificate);
#   3. `edge-agent detect` over every recording of audio/dev (58) with four keywords, whole files
#      and in 100 ms chunks, compared with the same commands on x86-64: every detection's keyword,
#      start, end and confidence must be identical;
#   4. the agent (`edge-agent run`) started in the root against a mosquitto on this host; the
#      model's example recording streamed to it over MQTT in real time (`edge-agent stream`); its
#      detection must arrive and equal x86-64's for the same round trip; `offline` on SIGTERM;
#   5. with --engine-tests: the engine's own tests (tests/engine, not the slow ones: features,
#      network, decoder, batching, accuracy on audio/dev) with pytest in the root; the tests that
#      compare with kaldi-native-fbank or torch skip where those are not installed. About 25
#      minutes per architecture under QEMU on a shared 2-core machine.
#
# Not in CI's default run (scripts/test.sh): with the roots and wheels cached, a run takes about
# 17 minutes on a shared 2-core machine (most of it the 100 ms chunks under QEMU); the first run
# makes the roots (about 3 minutes each) and downloads the wheels.
set -euo pipefail
# shellcheck source=scripts/arm-common.sh
source "$(dirname "$0")/arm-common.sh"

ARCHES=()
WITH_IMAGE=""
WITH_ENGINE_TESTS=""
for argument in "$@"; do
  case "$argument" in
    arm64 | armhf) ARCHES+=("$argument") ;;
    --image) WITH_IMAGE=yes ;;
    --engine-tests) WITH_ENGINE_TESTS=yes ;;
    *) arm_die "unknown argument $argument (arm64, armhf, --engine-tests, --image)" ;;
  esac
done
[ "${#ARCHES[@]}" -gt 0 ] || ARCHES=(arm64 armhf)

arm_require_root
[ -f "$MODEL_DIR/kwsr.net" ] || arm_die "no model in $MODEL_DIR (EDGE_AGENT_MODEL_DIR)"
[ -d "$DEV_AUDIO/pos" ] || arm_die "no recordings in $DEV_AUDIO (EDGE_AGENT_DEV_AUDIO)"
arm_host_packages qemu-user-static binfmt-support debootstrap mosquitto mosquitto-clients
arm_binfmt
STARTED=$SECONDS

WORK="$(mktemp -d /tmp/edge-agent-arm.XXXXXX)"
ARM_CLEANUP+=("rm -rf '$WORK'")
arm_project_wheel "$WORK/dist"
EXAMPLE="$MODEL_DIR/example/kws_xiaoyunxiaoyun.wav"
mapfile -t RECORDINGS < <(arm_recordings)
[ "${#RECORDINGS[@]}" -gt 0 ] || arm_die "no WAV files under $DEV_AUDIO"

# --- x86-64: the reference ------------------------------------------------------------------
arm_log "x86-64: edge-agent detect over ${#RECORDINGS[@]} recordings (whole files, then 100 ms chunks)"
arm_host_detect "$WORK/x86-64-whole.jsonl"
arm_host_detect "$WORK/x86-64-chunked.jsonl" --chunk-ms 100

# --- one emulated architecture: install, detect, compare ---------------------------------------
# In the root: /opt/edge-agent-test (the venv), /mnt/edge-agent/{wheels,dist,model,audio} (bound
# read-only from this host).
VENV=/opt/edge-agent-test
# A command in a root, with a clean environment; chroot and env exec, so the pid is the command's.
root_command() {
  local root="$1"
  shift
  printf '%s\0' chroot "$root" /usr/bin/env -i PATH="$VENV/bin:/usr/sbin:/usr/bin:/sbin:/bin" HOME=/root \
    LANG=C.UTF-8 EDGE_AGENT_MODEL_DIR=/mnt/edge-agent/model "$@"
}
in_root() {
  local command
  mapfile -d '' -t command < <(root_command "$@")
  "${command[@]}"
}

install_runtime() {
  local arch="$1" root="$2" wheels="$3"
  arm_mount_proc "$root"
  arm_bind "$wheels" "$root" /mnt/edge-agent/wheels
  arm_bind "$WORK/dist" "$root" /mnt/edge-agent/dist
  arm_bind "$MODEL_DIR" "$root" /mnt/edge-agent/model
  arm_bind "$DEV_AUDIO" "$root" /mnt/edge-agent/audio
  arm_bind "$REPO/scripts" "$root" /mnt/edge-agent/scripts
  local venv_options=() requirement="edge-agent[fast]"
  if [ "$arch" = armhf ]; then
    venv_options=(--system-site-packages)
    requirement="edge-agent"
  fi
  if [ ! -x "$root$VENV/bin/python" ]; then
    in_root "$root" python3 -m venv "${venv_options[@]}" "$VENV"
  fi
  local wheel
  wheel="/mnt/edge-agent/dist/$(basename "$WORK"/dist/edge_agent-*.whl)"
  # The dependencies (cached wheels), then this checkout's wheel over whatever was there.
  in_root "$root" pip install -q --no-index --find-links /mnt/edge-agent/wheels --find-links /mnt/edge-agent/dist \
    "$requirement"
  in_root "$root" pip install -q --no-index --no-deps --force-reinstall "$wheel"
  in_root "$root" python - <<'PY'
import platform, sys
import numpy, yaml, paho.mqtt, psutil
import edge_agent
try:
    import scipy
    fft = f"scipy {scipy.__version__}"
except ImportError:
    fft = "numpy's FFT (no scipy)"
where = "Debian" if numpy.__file__.startswith("/usr/lib/python3/") else "PyPI wheel"
print(f"  {platform.machine()}, Python {platform.python_version()}, numpy {numpy.__version__} ({where}), "
      f"PyYAML {yaml.__version__}, paho-mqtt {paho.mqtt.__version__}, psutil {psutil.__version__}, {fft}, "
      f"edge-agent {edge_agent.__version__}")
PY
}

root_detect() {
  local root="$1" output="$2"
  shift 2
  local paths
  mapfile -t paths < <(arm_recordings_at /mnt/edge-agent/audio)
  in_root "$root" python -m edge_agent detect --exact --keywords "$ARM_KEYWORDS" "$@" "${paths[@]}" \
    >"$output"
}

# The test tools (wheels for the target: hypothesis has compiled ones) and a copy of tests/ in
# the root.
engine_tests_setup() {
  local arch="$1" root="$2" tools="$ARM_CACHE/wheels/test-tools-$1" machine
  local requirements=("pytest>=8" "pytest-timeout>=2.2" "hypothesis>=6.100")
  machine="$([ "$arch" = arm64 ] && echo aarch64 || echo armv7l)"
  if [ ! -f "$tools/.edge-agent-wheels" ] || [ "$(cat "$tools/.edge-agent-wheels")" != "${requirements[*]}" ]; then
    rm -rf "$tools" && mkdir -p "$tools"
    "$PYTHON" -m pip download -q --dest "$tools" --only-binary=:all: --python-version 3.11 --implementation cp \
      --platform "manylinux_2_28_$machine" --platform "manylinux_2_17_$machine" --platform "manylinux2014_$machine" \
      "${requirements[@]}" >&2
    printf '%s\n' "${requirements[*]}" >"$tools/.edge-agent-wheels"
  fi
  arm_bind "$tools" "$root" /mnt/edge-agent/test-tools
  in_root "$root" pip install -q --no-index --find-links /mnt/edge-agent/test-tools "${requirements[@]}" >&2
  rm -rf "$root/tmp/edge-agent-tests" && mkdir -p "$root/tmp/edge-agent-tests"
  cp -r "$REPO/tests" "$REPO/pyproject.toml" "$root/tmp/edge-agent-tests/"
}

# pytest tests/engine in the root; prints its summary.
engine_tests() {
  local arch="$1" root="$2"
  local output="$WORK/engine-tests-$arch.log" started=$SECONDS
  # edge_agent comes from the venv (the installed wheel); tests/ from the copy.
  if ! chroot "$root" /usr/bin/env -i PATH="$VENV/bin:/usr/bin:/bin" HOME=/root LANG=C.UTF-8 \
    EDGE_AGENT_MODEL_DIR=/mnt/edge-agent/model EDGE_AGENT_DEV_AUDIO=/mnt/edge-agent/audio \
    sh -c 'cd /tmp/edge-agent-tests && python -m pytest tests/engine -m "not slow" -q -p no:cacheprovider -rs' \
    >"$output" 2>&1; then
    tail -60 "$output"
    return 1
  fi
  echo "$arch, tests/engine (not slow) with pytest: $(grep -E '^[0-9]+ passed' "$output" | tail -1) ($((SECONDS - started)) s under QEMU)"
}

# Runs a check that prints one line; the line goes to the summary, a failure stops the run.
RESULTS=()
record() {
  local line
  if line="$("$@")"; then
    RESULTS+=("$line")
    printf '%s\n' "$line"
  else
    printf '%s\n' "$line" >&2
    arm_die "$2"
  fi
}

# --- the MQTT round trip ------------------------------------------------------------------------
PORT="$(arm_free_port)"
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$PORT" >"$WORK/mosquitto.conf"
mosquitto -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
ARM_CLEANUP+=("kill $!")
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
mosquitto_sub -h 127.0.0.1 -p "$PORT" -v -t 'edge_agent/+/availability' >"$WORK/availability.log" 2>&1 &
ARM_CLEANUP+=("kill $!")

# Starts the agent (a command line), streams the example to it, stops it; the detections go to
# OUTPUT. Waits on the broker: `online` before streaming, `offline` after SIGTERM.
round_trip() {
  local device="$1" output="$2"
  shift 2
  "$@" run --broker "127.0.0.1:$PORT" --device-id "$device" >"$WORK/agent-$device.log" 2>&1 &
  local agent=$!
  ARM_CLEANUP+=("kill $agent")
  local waited=0
  until grep -q "^edge_agent/$device/availability online" "$WORK/availability.log"; do
    kill -0 "$agent" 2>/dev/null || { cat "$WORK/agent-$device.log" >&2; arm_die "$device: the agent exited"; }
    [ "$waited" -lt 1200 ] || { cat "$WORK/agent-$device.log" >&2; arm_die "$device: not online after 120 s"; }
    sleep 0.1
    waited=$((waited + 1))
  done
  PYTHONPATH="$REPO" "$PYTHON" -m edge_agent stream --broker "127.0.0.1:$PORT" --device "$device" \
    --stream roundtrip --wait 15 "$EXAMPLE" >"$output" 2>"$WORK/stream-$device.log"
  kill -TERM "$agent"
  wait "$agent" || { cat "$WORK/agent-$device.log" >&2; arm_die "$device: the agent failed on SIGTERM"; }
  grep -q "^edge_agent/$device/availability offline" "$WORK/availability.log" \
    || arm_die "$device: no offline after SIGTERM"
}

# The detections a round trip printed, against x86-64's: the same keywords, starts and ends; the
# same confidence to the 4 decimals the agent publishes, give or take the last digit (a value on
# a rounding boundary may fall either way, see arm_compare_detections).
compare_round_trip() {
  "$PYTHON" - "$1" "$2" "$3" <<'PY'
import json, sys
def load(path):
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
reference, ours, label = load(sys.argv[1]), load(sys.argv[2]), sys.argv[3]
fields = lambda rows: [(r["keyword"], r["start"], r["end"]) for r in rows]
shown = json.dumps([[r["keyword"], r["start"], r["end"], r["confidence"]] for r in ours], ensure_ascii=False)
if not ours or fields(ours) != fields(reference) or any(
    abs(a["confidence"] - b["confidence"]) > 1.5e-4 for a, b in zip(reference, ours)
):
    sys.exit(f"{label}: {shown}; x86-64: {[[r['keyword'], r['start'], r['end'], r['confidence']] for r in reference]}")
same = all(a["confidence"] == b["confidence"] for a, b in zip(reference, ours))
verdict = "" if sys.argv[1] == sys.argv[2] else (
    ", identical to x86-64" if same else ", x86-64's but for the last digit of the confidence")
print(f"{label}: detection published over MQTT {shown} (keyword, start, end, confidence){verdict}")
PY
}

arm_log "x86-64: agent round trip through mosquitto on 127.0.0.1:$PORT"
round_trip arm-test-x86-64 "$WORK/roundtrip-x86-64.jsonl" env PYTHONPATH="$REPO" \
  EDGE_AGENT_MODEL_DIR="$MODEL_DIR" EDGE_AGENT_OUTBOX__PATH="$WORK/outbox-x86-64.db" "$PYTHON" -m edge_agent
record compare_round_trip "$WORK/roundtrip-x86-64.jsonl" "$WORK/roundtrip-x86-64.jsonl" "x86-64 round trip"

for arch in "${ARCHES[@]}"; do
  step=$SECONDS
  root="$(arm_root "$arch")"
  wheels="$(arm_wheels "$arch")"
  arm_log "$arch: installing the runtime in $root"
  install_runtime "$arch" "$root" "$wheels"
  arm_log "$arch: edge-agent detect over ${#RECORDINGS[@]} recordings, whole files"
  root_detect "$root" "$WORK/$arch-whole.jsonl"
  record arm_compare_detections "$WORK/x86-64-whole.jsonl" "$WORK/$arch-whole.jsonl" "$arch, whole files"
  arm_log "$arch: the same in 100 ms chunks"
  root_detect "$root" "$WORK/$arch-chunked.jsonl" --chunk-ms 100
  record arm_compare_detections "$WORK/x86-64-chunked.jsonl" "$WORK/$arch-chunked.jsonl" "$arch, 100 ms chunks"
  arm_log "$arch: agent round trip (the agent in the $arch root, mosquitto and the sender on this host)"
  mapfile -d '' -t agent_command < <(root_command "$root" EDGE_AGENT_OUTBOX__PATH=/tmp/edge-agent-test-outbox.db edge-agent)
  round_trip "arm-test-$arch" "$WORK/roundtrip-$arch.jsonl" "${agent_command[@]}"
  record compare_round_trip "$WORK/roundtrip-x86-64.jsonl" "$WORK/roundtrip-$arch.jsonl" "$arch round trip"
  if [ -n "$WITH_ENGINE_TESTS" ]; then
    arm_log "$arch: pytest tests/engine -m 'not slow' in the root"
    engine_tests_setup "$arch" "$root"
    record engine_tests "$arch" "$root"
  fi
  arm_log "$arch: done in $((SECONDS - step)) s"
done

if [ -n "$WITH_IMAGE" ]; then
  bash "$REPO/scripts/build-image.sh"
fi

echo
echo "=== edge-agent on ARM (emulated), compared with x86-64 ($((SECONDS - STARTED)) s) ==="
printf '%s\n' "${RESULTS[@]}"

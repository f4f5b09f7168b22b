#!/usr/bin/env bash
# Builds Dockerfile.arm64 for real on this x86-64 machine (podman, RUN steps under QEMU) and checks
# the image: its size, its configuration, and `edge-agent detect` inside it giving x86-64's
# answers. Run as root on Debian 12:
#
#   bash scripts/build-image.sh
#
# Without an image registry or a package index inside the build:
#   * the base image (BASE_IMAGE) is made here: a Debian 12 arm64 root (debootstrap) with Python
#     3.11, its headers and venv, imported as localhost/edge-agent-base:bookworm-arm64 (the
#     official python:3.11-slim-bookworm holds the same);
#   * pip installs from a folder of wheels downloaded on this host from PyPI (WHEELS=/wheels,
#     mounted read-only into the build); PyAudio is PyPI's source, compiled in the build stage;
#   * torch is left out (TORCH_VERSION empty, EXTRAS without torch): its aarch64 CPU wheel is on
#     PyTorch's own index, not on PyPI. The image is the numpy backend's, the default one.
# `podman run` does not work on this machine (setrlimit RLIMIT_NOFILE is refused), so the built
# image's file system is exported and run with chroot under QEMU, as its user (10001) with its
# environment.
#
# Caches (EDGE_AGENT_ARM_CACHE, default /var/cache/edge-agent-arm): the base root, the wheels,
# podman's storage (podman/). A first build takes about 10 minutes on a 2-core machine.
set -euo pipefail
# shellcheck source=scripts/arm-common.sh
source "$(dirname "$0")/arm-common.sh"

IMAGE="${EDGE_AGENT_IMAGE:-localhost/edge-agent:arm64}"
BASE_IMAGE=localhost/edge-agent-base:bookworm-arm64
BASE_PACKAGES="python3,python3-venv,python3-dev,python-is-python3,ca-certificates"
EXTRAS=fast,mic,modelscope,pinyin

arm_require_root
[ -f "$MODEL_DIR/kwsr.net" ] || arm_die "no model in $MODEL_DIR (EDGE_AGENT_MODEL_DIR)"
[ -d "$DEV_AUDIO/pos" ] || arm_die "no recordings in $DEV_AUDIO (EDGE_AGENT_DEV_AUDIO)"
arm_host_packages qemu-user-static binfmt-support debootstrap podman
arm_binfmt
STARTED=$SECONDS
WORK="$(mktemp -d /tmp/edge-agent-image.XXXXXX)"
ARM_CLEANUP+=("rm -rf '$WORK'")
PODMAN=(podman --root "$ARM_CACHE/podman/storage" --runroot "$ARM_CACHE/podman/run" --cgroup-manager=cgroupfs)

# --- the base image ---------------------------------------------------------------------------
base_root="$(arm_root arm64 image-base-arm64 "$BASE_PACKAGES")"
base_stamp="$ARM_CACHE/podman/base-image.stamp"
# Like the official slim image: no downloaded packages (debootstrap leaves them in apt's cache)
# and no package lists.
base_excludes=(--exclude=./.edge-agent-root --exclude='./var/cache/apt/archives/*.deb'
  --exclude='./var/cache/apt/*.bin' --exclude='./var/lib/apt/lists/*_*')
base_recipe="$(cat "$base_root/.edge-agent-root") ${base_excludes[*]}"
if ! "${PODMAN[@]}" image exists "$BASE_IMAGE" \
  || [ "$(cat "$base_stamp" 2>/dev/null)" != "$base_recipe" ]; then
  arm_log "importing $base_root as $BASE_IMAGE"
  mkdir -p "$ARM_CACHE/podman"
  tar -C "$base_root" "${base_excludes[@]}" --numeric-owner -cf - . \
    | "${PODMAN[@]}" import --quiet --arch arm64 \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
  printf '%s\n' "$base_recipe" >"$base_stamp"
fi

# --- the wheels -------------------------------------------------------------------------------
WHEELS="$ARM_CACHE/wheels/image-arm64"
wheel_requirements=("numpy>=1.24" "pyyaml>=6.0" "paho-mqtt>=2.0,<3" "psutil>=5.9" "scipy>=1.8"
  "modelscope>=1.9" "pypinyin>=0.50" "setuptools>=68" "wheel")
if [ ! -f "$WHEELS/.edge-agent-wheels" ] || [ "$(cat "$WHEELS/.edge-agent-wheels")" != "${wheel_requirements[*]}" ]; then
  arm_log "downloading the image's wheels (aarch64) and PyAudio's source from PyPI into $WHEELS"
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  "$PYTHON" -m pip download -q --dest "$WHEELS" --only-binary=:all: --python-version 3.11 \
    --implementation cp --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 \
    --platform manylinux2014_aarch64 "${wheel_requirements[@]}"
  "$PYTHON" -m pip download -q --dest "$WHEELS" --no-binary=:all: --no-deps "pyaudio>=0.2.13"
  printf '%s\n' "${wheel_requirements[*]}" >"$WHEELS/.edge-agent-wheels"
fi

# --- the build --------------------------------------------------------------------------------
arm_log "building $IMAGE from Dockerfile.arm64 (linux/arm64, RUN steps under QEMU)"
step=$SECONDS
"${PODMAN[@]}" build --isolation=chroot --platform linux/arm64 --format docker --pull=never \
  --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg WHEELS=/wheels --build-arg TORCH_VERSION= \
  --build-arg EXTRAS="$EXTRAS" --volume "$WHEELS:/wheels:ro" \
  -f "$REPO/Dockerfile.arm64" -t "$IMAGE" "$REPO" >"$WORK/build.log" 2>&1 \
  || { tail -40 "$WORK/build.log" >&2; arm_die "podman build failed"; }
BUILD_SECONDS=$((SECONDS - step))
size_of() { "${PODMAN[@]}" image inspect --format '{{.Size}}' "$1"; }
IMAGE_BYTES="$(size_of "$IMAGE")"
BASE_BYTES="$(size_of "$BASE_IMAGE")"
mb() { awk -v b="$1" 'BEGIN { printf "%.0f MB", b / 1e6 }'; }
RESULTS=("image $IMAGE built in ${BUILD_SECONDS} s: $(mb "$IMAGE_BYTES") uncompressed ($(mb "$BASE_BYTES") of it the base: Debian 12 with Python 3.11)")

"${PODMAN[@]}" image inspect --format '{{json .Config}}' "$IMAGE" >"$WORK/config.json"
# The health check is not part of OCI's configuration: podman keeps it beside it.
"${PODMAN[@]}" image inspect --format '{{json .HealthCheck}}' "$IMAGE" >"$WORK/healthcheck.json"
RESULTS+=("$("$PYTHON" - "$WORK/config.json" "$WORK/healthcheck.json" <<'PY'
import json, sys
config = json.load(open(sys.argv[1]))
health = json.load(open(sys.argv[2])) or {}
print(f"image config: user {config.get('User')}, entrypoint {config.get('Entrypoint')}, cmd {config.get('Cmd')}, "
      f"healthcheck {health.get('Test')}, volumes {sorted(config.get('Volumes') or {})}, "
      f"ports {sorted(config.get('ExposedPorts') or {})}")
PY
)")
printf '%s\n' "${RESULTS[@]}"

# --- inside the image: its file system, its user and environment, under QEMU -------------------
ROOT="$ARM_CACHE/image-root"
arm_log "exporting the image's file system to $ROOT"
rm -rf "$ROOT" && mkdir -p "$ROOT"
container="$("${PODMAN[@]}" create "$IMAGE")"
ARM_CLEANUP+=("${PODMAN[*]} rm -f $container")
"${PODMAN[@]}" export "$container" | tar -C "$ROOT" --numeric-owner -xf -
# Where the size goes: the venv and its largest packages.
site="$ROOT/opt/edge-agent/lib/python3.11/site-packages"
RESULTS+=("of it the venv /opt/edge-agent: $(du -sm "$ROOT/opt/edge-agent" | cut -f1) MB, its largest: $(
  du -sm "$site"/* | sort -rn | head -5 | awk '{ n = split($2, p, "/"); printf "%s%s %s MB", sep, p[n], $1; sep = ", " }')")
printf '%s\n' "${RESULTS[-1]}"
arm_mount_proc "$ROOT"
arm_bind "$MODEL_DIR" "$ROOT" /mnt/edge-agent/model
arm_bind "$DEV_AUDIO" "$ROOT" /mnt/edge-agent/audio
arm_bind "$REPO/scripts" "$ROOT" /mnt/edge-agent/scripts
mapfile -t image_env < <("$PYTHON" -c 'import json, sys; print("\n".join(json.load(open(sys.argv[1]))["Env"]))' "$WORK/config.json")
image_user="$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["User"])' "$WORK/config.json")"
in_image() {
  chroot --userspec="$image_user:$image_user" "$ROOT" /usr/bin/env -i "${image_env[@]}" \
    EDGE_AGENT_MODEL_DIR=/mnt/edge-agent/model "$@"
}

arm_log "in the image: edge-agent --version, and the model's example through the entrypoint's command"
RESULTS+=("in the image, as user $image_user: $(in_image edge-agent --version)")
RESULTS+=("$(in_image edge-agent detect /mnt/edge-agent/model/example/kws_xiaoyunxiaoyun.wav)")
# PyAudio, compiled in the build stage, loads against the runtime's PortAudio (no sound device
# in a chroot: only the library is checked).
RESULTS+=("microphone support: $(in_image python -c 'import pyaudio; print("PyAudio", pyaudio.__version__, "with", pyaudio.get_portaudio_version_text())')")
printf '%s\n' "${RESULTS[@]: -3}"

arm_log "x86-64 reference, then the same in the image: ${ARM_KEYWORDS} over audio/dev"
arm_host_detect "$WORK/x86-64.jsonl"
mapfile -t paths < <(arm_recordings_at /mnt/edge-agent/audio)
step=$SECONDS
in_image python -m edge_agent detect --exact --keywords "$ARM_KEYWORDS" "${paths[@]}" >"$WORK/image.jsonl"
line="$(arm_compare_detections "$WORK/x86-64.jsonl" "$WORK/image.jsonl" "image (arm64), whole files")" \
  || { printf '%s\n' "$line" >&2; arm_die "the image's detections differ from x86-64's"; }
RESULTS+=("$line ($((SECONDS - step)) s under QEMU)")
printf '%s\n' "${RESULTS[-1]}"

echo
echo "=== Dockerfile.arm64 built and checked ($((SECONDS - STARTED)) s) ==="
printf '%s\n' "${RESULTS[@]}"

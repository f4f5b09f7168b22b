# Shared by scripts/test-arm.sh and scripts/build-image.sh (sourced, not run): emulated Debian 12
# roots for arm64 and armhf, wheels for them, mounts into them, and the comparison of detections.
#
# Everything big lives in EDGE_AGENT_ARM_CACHE (default /var/cache/edge-agent-arm), never in the
# repository: roots/bookworm-<arch> (debootstrap, about 300 MB each), wheels/<arch> (PyPI's wheels
# for the target, downloaded on this host: pip inside an emulated root may not reach the index),
# podman/ (image storage). Delete the directory to start from scratch.

ARM_CACHE="${EDGE_AGENT_ARM_CACHE:-/var/cache/edge-agent-arm}"
ARM_MIRROR="${EDGE_AGENT_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
ARM_SUITE=bookworm
PYTHON="${PYTHON:-python3}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SHARED="$(cd "$REPO/.." && pwd)/shared"
MODEL_DIR="${EDGE_AGENT_MODEL_DIR:-$SHARED/models/speech_charctc_kws_phone-xiaoyun}"
DEV_AUDIO="${EDGE_AGENT_DEV_AUDIO:-$SHARED/audio/dev}"
# The keywords compared across machines: the default one and three custom ones of audio/dev
# (README's Accuracy table), so that weak scores near a threshold are compared too.
ARM_KEYWORDS="小云小云,如家酒店,瑞宝分理处:0.002,八角岭:0.002"

# Debian packages of each emulated root. armhf: PyPI has no numpy wheel for 32-bit ARM (armv7l),
# so numpy, PyYAML and psutil come from Debian and the venv sees them (--system-site-packages).
ARM_ROOT_PACKAGES_arm64="python3,python3-venv,python-is-python3"
ARM_ROOT_PACKAGES_armhf="python3,python3-venv,python3-numpy,python3-yaml,python3-psutil"

# Undone in reverse order on exit: mounts into the roots, processes started.
ARM_CLEANUP=()
arm_on_exit() {
  local i
  for ((i = ${#ARM_CLEANUP[@]} - 1; i >= 0; i--)); do
    eval "${ARM_CLEANUP[$i]}" >/dev/null 2>&1 || true
  done
}
trap arm_on_exit EXIT

arm_log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
arm_die() { arm_log "FAILED: $*"; exit 1; }

source "$(dirname "${BASH_SOURCE[0]}")/debian-packages.sh"

arm_require_root() {
  [ "$(id -u)" -eq 0 ] || arm_die "run as root: debootstrap, chroot and mounts need it"
}

# Debian packages on this host, installed when missing (like scripts/install-deps.sh).
arm_host_packages() {
  install_debian_packages "$@"
}

# qemu-user-static registers its interpreters with the F flag (opened at registration), so a
# chroot runs foreign binaries without a copy of qemu inside.
arm_binfmt() {
  if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  fi
  local name
  for name in qemu-aarch64 qemu-arm; do
    update-binfmts --enable "$name" >/dev/null 2>&1 || true
    grep -qx enabled "/proc/sys/fs/binfmt_misc/$name" 2>/dev/null || arm_die "binfmt $name is not enabled"
  done
}

# The Debian 12 root for an architecture (ARM_ROOT_PACKAGES_<arch>), or one of another NAME with
# other PACKAGES, made once: a stamp records how, and a root made otherwise is made again.
arm_root() {
  local arch="$1" packages_var="ARM_ROOT_PACKAGES_$1"
  local name="${2:-$ARM_SUITE-$arch}" packages="${3:-${!packages_var}}"
  local root="$ARM_CACHE/roots/$name"
  local stamp="debootstrap --arch=$arch --variant=minbase --include=$packages $ARM_SUITE $ARM_MIRROR"
  if [ ! -f "$root/.edge-agent-root" ] || [ "$(cat "$root/.edge-agent-root")" != "$stamp" ]; then
    arm_log "making the root $name (debootstrap under emulation, a few minutes, once): $root"
    rm -rf "$root" "$root.partial"
    mkdir -p "$ARM_CACHE/roots"
    debootstrap --arch="$arch" --variant=minbase --include="$packages" "$ARM_SUITE" "$root.partial" \
      "$ARM_MIRROR" >"$ARM_CACHE/roots/$name.log" 2>&1 \
      || arm_die "debootstrap $name: see $ARM_CACHE/roots/$name.log"
    mv "$root.partial" "$root"
    printf '%s\n' "$stamp" >"$root/.edge-agent-root"
  fi
  printf '%s\n' "$root"
}

# Bind-mounts SOURCE read-only at ROOT/TARGET (removed on exit).
arm_bind() {
  local source="$1" root="$2" target="$3"
  mkdir -p "$root$target"
  mountpoint -q "$root$target" && umount -l "$root$target"
  mount --bind "$source" "$root$target"
  mount -o remount,bind,ro "$root$target"
  ARM_CLEANUP+=("umount -l '$root$target'")
}

arm_mount_proc() {
  local root="$1"
  mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"
  ARM_CLEANUP+=("umount -l '$root/proc'")
}

# What the requirement list of pyproject.toml needs on a target, as PyPI's wheels for it.
# arm64 and amd64: everything (numpy, PyYAML, psutil, scipy have manylinux wheels for both);
# armhf: the pure-Python rest (paho-mqtt), the others come from Debian (ARM_ROOT_PACKAGES_armhf).
arm_wheels() {
  local arch="$1" dir="$ARM_CACHE/wheels/$1"
  local requirements machine
  case "$arch" in
    arm64 | amd64) requirements=("numpy>=1.24" "pyyaml>=6.0" "paho-mqtt>=2.0,<3" "psutil>=5.9" "scipy>=1.8") ;;
    armhf) requirements=("paho-mqtt>=2.0,<3") ;;
    *) arm_die "no wheels for $arch" ;;
  esac
  local stamp="${requirements[*]}"
  if [ ! -f "$dir/.edge-agent-wheels" ] || [ "$(cat "$dir/.edge-agent-wheels")" != "$stamp" ]; then
    arm_log "downloading the $arch wheels from PyPI into $dir"
    rm -rf "$dir" && mkdir -p "$dir"
    if [ "$arch" = armhf ]; then
      "$PYTHON" -m pip download -q --dest "$dir" --only-binary=:all: --no-deps "${requirements[@]}"
    else
      machine="$([ "$arch" = arm64 ] && echo aarch64 || echo x86_64)"
      "$PYTHON" -m pip download -q --dest "$dir" --only-binary=:all: --python-version 3.11 \
        --implementation cp --platform "manylinux_2_28_$machine" --platform "manylinux_2_17_$machine" \
        --platform "manylinux2014_$machine" "${requirements[@]}"
    fi
    printf '%s\n' "$stamp" >"$dir/.edge-agent-wheels"
  fi
  printf '%s\n' "$dir"
}

# This checkout as a wheel (built on the host: pure Python, the same for every architecture).
arm_project_wheel() {
  local dist="$1"
  rm -rf "$dist" && mkdir -p "$dist"
  "$PYTHON" -m pip wheel -q --no-deps --wheel-dir "$dist" "$REPO" >/dev/null
  ls "$dist"/edge_agent-*.whl >/dev/null || arm_die "no wheel built in $dist"
}

# The recordings of audio/dev as paths relative to it (the same list on every machine).
arm_recordings() {
  (cd "$DEV_AUDIO" && find pos neg -name '*.wav' | LC_ALL=C sort)
}

# `edge-agent detect --exact` over the recordings on this host (x86-64): the reference.
arm_host_detect() {
  local output="$1"
  shift
  local recordings
  mapfile -t recordings < <(arm_recordings)
  (cd "$DEV_AUDIO" && PYTHONPATH="$REPO" EDGE_AGENT_MODEL_DIR="$MODEL_DIR" \
    "$PYTHON" -m edge_agent detect --exact --keywords "$ARM_KEYWORDS" "$@" "${recordings[@]}") >"$output"
}

# The same recordings as seen from inside a root where audio/dev is bound at TARGET.
arm_recordings_at() {
  local target="$1" name
  while IFS= read -r name; do printf '%s\n' "$target/$name"; done < <(arm_recordings)
}

arm_free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Two runs of `edge-agent detect --exact` side by side. Every file must have the same detections:
# the same keyword, start, end and characters' peak frames, exactly; the same confidence within
# ARM_CONFIDENCE_TOLERANCE (float32 sums in another order, fused multiply-adds: the last bits
# differ). Prints a summary with the largest difference; exits non-zero on any other difference.
ARM_CONFIDENCE_TOLERANCE=1e-5
arm_compare_detections() {
  local reference="$1" candidate="$2" label="$3"
  "$PYTHON" - "$reference" "$candidate" "$label" "$ARM_CONFIDENCE_TOLERANCE" <<'PY'
import json, sys
from pathlib import PurePosixPath

def load(path):
    rows = {}
    for line in open(path, encoding="utf-8"):
        row = json.loads(line)
        name = PurePosixPath(row["file"])
        rows[f"{name.parent.name}/{name.name}"] = row
    return rows

reference, candidate, label = load(sys.argv[1]), load(sys.argv[2]), sys.argv[3]
tolerance = float(sys.argv[4])
if set(reference) != set(candidate):
    sys.exit(f"{label}: files differ: {sorted(set(reference) ^ set(candidate))}")
problems, detections, per_keyword = [], 0, {}
largest, bit_identical, printed_differs = 0.0, 0, 0
exact_fields = ("keyword", "start", "end", "peak_frames")
for name, row in sorted(reference.items()):
    ours = candidate[name]
    if row["error"] or ours["error"]:
        problems.append(f"{name}: error {row['error']!r} / {ours['error']!r}")
        continue
    theirs_list, ours_list = row["detections"], ours["detections"]
    same_shape = len(theirs_list) == len(ours_list) and all(
        all(a[f] == b[f] for f in exact_fields) for a, b in zip(theirs_list, ours_list)
    )
    if not same_shape:
        problems.append(f"{name}: x86-64 {theirs_list} / {label} {ours_list}")
        continue
    for a, b in zip(theirs_list, ours_list):
        detections += 1
        per_keyword[a["keyword"]] = per_keyword.get(a["keyword"], 0) + 1
        difference = abs(a["confidence"] - b["confidence"])
        largest = max(largest, difference)
        bit_identical += difference == 0.0
        printed_differs += round(a["confidence"], 4) != round(b["confidence"], 4)
        if difference > tolerance:
            problems.append(f"{name}: {a['keyword']} confidence {a['confidence']!r} / {b['confidence']!r}")
summary = ", ".join(f"{k} {n}" for k, n in per_keyword.items())
if problems:
    print(f"{label}: {len(problems)} of {len(reference)} files differ from x86-64:")
    print("\n".join("  " + p for p in problems))
    sys.exit(1)
print(
    f"{label}: {len(reference)} files, {detections} detections ({summary}): keyword, start, end "
    f"identical to x86-64; confidence bit-identical in {bit_identical}, largest difference {largest:.1e}"
    + (f" ({printed_differs} printed 4-decimal value(s) differ in the last digit)" if printed_differs else "")
)
PY
}

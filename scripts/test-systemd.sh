#!/usr/bin/env bash
# deploy/systemd run for real: a Debian 12 root booting systemd in systemd-nspawn, the agent
# installed and the unit set up exactly as docs/deployment.md says, against a mosquitto on this
# host. Run as root on Debian 12:
#
#   bash scripts/test-systemd.sh
#
# Checks: the service starts and comes online; it runs as the edge-agent user with no
# capabilities, no new privileges, a system-call filter, a read-only root, no /home, its outbox
# in /var/lib/edge-agent; the model's example streamed over MQTT is detected; killed, it is
# restarted (Restart=on-failure, 5 s) and online again; stopped, it publishes `offline` and exits
# cleanly; systemd's own exposure score of the running unit.
#
# The root is x86-64 (amd64), native: the unit has nothing architecture-specific, and systemd
# as PID 1 under qemu-user is not what a board runs. This machine's PID 1 is not systemd, so the
# container runs without registering with a host systemd (--register=no --keep-unit) and is
# entered with nsenter. Not in CI's default run: about 2 minutes, the first run 3 more for the
# root (cached in EDGE_AGENT_ARM_CACHE).
set -euo pipefail
# shellcheck source=scripts/arm-common.sh
source "$(dirname "$0")/arm-common.sh"

DEVICE=systemd-test
UNIT=edge-agent.service
arm_require_root
[ -f "$MODEL_DIR/kwsr.net" ] || arm_die "no model in $MODEL_DIR (EDGE_AGENT_MODEL_DIR)"
arm_host_packages debootstrap systemd-container mosquitto mosquitto-clients
STARTED=$SECONDS
WORK="$(mktemp -d /tmp/edge-agent-systemd.XXXXXX)"
ARM_CLEANUP+=("rm -rf '$WORK'")

root="$(arm_root amd64 bookworm-amd64-systemd "systemd,systemd-sysv,dbus,procps,python3,python3-venv")"
wheels="$(arm_wheels amd64)"
arm_project_wheel "$WORK/dist"

# --- the installation of docs/deployment.md, in the root ---------------------------------------
arm_log "installing edge-agent into /opt/edge-agent and the unit, as docs/deployment.md says"
in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }
arm_bind "$wheels" "$root" /mnt/edge-agent/wheels
arm_bind "$WORK/dist" "$root" /mnt/edge-agent/dist
[ -x "$root/opt/edge-agent/bin/python" ] || in_root python3 -m venv /opt/edge-agent
in_root /opt/edge-agent/bin/pip install -q --no-index --find-links /mnt/edge-agent/wheels \
  --find-links /mnt/edge-agent/dist edge-agent
in_root /opt/edge-agent/bin/pip install -q --no-index --no-deps --force-reinstall \
  "/mnt/edge-agent/dist/$(basename "$WORK"/dist/edge_agent-*.whl)"
umount -l "$root/mnt/edge-agent/wheels" "$root/mnt/edge-agent/dist"

PORT="$(arm_free_port)"
cat >"$root/tmp/config.yaml" <<EOF
device:
  id: $DEVICE
mqtt:
  host: 127.0.0.1
  port: $PORT
model:
  dir: /srv/edge-agent/model
  download: false
EOF
mkdir -p "$root/etc/sysusers.d"
install -m 0644 "$REPO/deploy/systemd/edge-agent.sysusers.conf" "$root/etc/sysusers.d/edge-agent.conf"
in_root systemd-sysusers >/dev/null
in_root install -D -m 0640 -g edge-agent /tmp/config.yaml /etc/edge-agent/config.yaml
install -m 0644 "$REPO/deploy/systemd/edge-agent.service" "$root/etc/systemd/system/$UNIT"
in_root systemctl enable "$UNIT" >/dev/null 2>&1
rm -rf "$root/var/lib/edge-agent" "$root/tmp/config.yaml"  # a fresh state directory each run
# The unit's own copy in the root must be the repository's.
cmp -s "$REPO/deploy/systemd/edge-agent.service" "$root/etc/systemd/system/$UNIT"

# --- broker, container ------------------------------------------------------------------------
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$PORT" >"$WORK/mosquitto.conf"
mosquitto -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
ARM_CLEANUP+=("kill $!")
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
mosquitto_sub -h 127.0.0.1 -p "$PORT" -v -t "edge_agent/$DEVICE/availability" >"$WORK/availability.log" 2>&1 &
ARM_CLEANUP+=("kill $!")

arm_log "booting the root with systemd-nspawn (systemd as the container's PID 1)"
systemd-nspawn --register=no --keep-unit --console=passive --quiet -D "$root" -b \
  --bind-ro="$MODEL_DIR:/srv/edge-agent/model" >"$WORK/nspawn.log" 2>&1 &
NSPAWN=$!
ARM_CLEANUP+=("kill $NSPAWN; wait $NSPAWN")
init=""
for _ in $(seq 1 100); do
  init="$(pgrep -P "$NSPAWN" -x systemd || true)"
  [ -n "$init" ] && break
  sleep 0.1
done
[ -n "$init" ] || { cat "$WORK/nspawn.log" >&2; arm_die "the container's systemd did not start"; }
inside() { nsenter -t "$init" -a "$@"; }
journal() { inside journalctl -u "$UNIT" --no-pager -o cat | tail -20 >&2; }

# Waits until the availability topic has said WORD COUNT times.
wait_availability() {
  local word="$1" count="$2" waited=0
  until [ "$(grep -c "availability $word\$" "$WORK/availability.log")" -ge "$count" ]; do
    [ "$waited" -lt 1200 ] || { journal; arm_die "no '$word' number $count after 120 s"; }
    sleep 0.1
    waited=$((waited + 1))
  done
}

RESULTS=()
wait_availability online 1
RESULTS+=("started by systemd at boot: $(inside systemctl is-active "$UNIT"), online on the broker")

main_pid() { inside systemctl show -p MainPID --value "$UNIT"; }
pid="$(main_pid)"
RESULTS+=("$(inside sh -c "
  status=/proc/$pid/status
  uid=\$(awk '/^Uid:/ { print \$2 }' \$status); caps=\$(awk '/^CapEff:/ { print \$2 }' \$status)
  nnp=\$(awk '/^NoNewPrivs:/ { print \$2 }' \$status); seccomp=\$(awk '/^Seccomp:/ { print \$2 }' \$status)
  root=\$(awk '\$5 == \"/\" { print \$6 }' /proc/$pid/mountinfo | cut -d, -f1)
  state=\$(awk '\$5 == \"/var/lib/edge-agent\" { print \$6 }' /proc/$pid/mountinfo | cut -d, -f1)
  home=\$(awk '\$5 == \"/home\" { print \$4 }' /proc/$pid/mountinfo)
  echo \"process: user \$(getent passwd \$uid | cut -d: -f1) (uid \$uid), capabilities \$caps, NoNewPrivs \$nnp, seccomp mode \$seccomp (filter), / \$root, /var/lib/edge-agent \$state, /home from \$home\"
")")

arm_log "streaming the model's example to the service over MQTT"
PYTHONPATH="$REPO" "$PYTHON" -m edge_agent stream --broker "127.0.0.1:$PORT" --device "$DEVICE" \
  --wait 5 "$MODEL_DIR/example/kws_xiaoyunxiaoyun.wav" >"$WORK/detections.jsonl" 2>"$WORK/stream.log"
grep -q '小云小云' "$WORK/detections.jsonl" || { journal; arm_die "no detection from the service"; }
RESULTS+=("detection from the service: $(head -1 "$WORK/detections.jsonl" | cut -c1-160)")
RESULTS+=("its outbox: $(inside ls -l /var/lib/edge-agent/outbox.db | awk '{ print $1, $3, $4, $NF }')")

arm_log "killing the service's process (SIGKILL): systemd restarts it after RestartSec=5s"
inside kill -9 "$pid"
wait_availability offline 1  # the broker's last will
wait_availability online 2
RESULTS+=("killed: last will 'offline', restarted by systemd (NRestarts=$(inside systemctl show -p NRestarts --value "$UNIT"), new pid $(main_pid)), 'online' again")

arm_log "systemctl stop"
inside systemctl stop "$UNIT"
wait_availability offline 2
RESULTS+=("stopped: 'offline' published, $(inside systemctl show -p Result --value "$UNIT"), exit status $(inside systemctl show -p ExecMainStatus --value "$UNIT")")
RESULTS+=("systemd-analyze security of the running unit: $(inside systemd-analyze security "$UNIT" --no-pager | tail -1 | sed 's/^→ //')")

inside systemctl poweroff || true
for _ in $(seq 1 300); do kill -0 "$NSPAWN" 2>/dev/null || break; sleep 0.1; done

echo
echo "=== deploy/systemd/edge-agent.service under systemd ($((SECONDS - STARTED)) s) ==="
printf '%s\n' "${RESULTS[@]}"

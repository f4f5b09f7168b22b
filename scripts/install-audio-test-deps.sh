#!/usr/bin/env bash
# What the real-sound-device tests need (tests/audio/test_microphone_device.py), on Debian/Ubuntu:
# a PulseAudio server the tests start themselves (a null sink whose monitor is the microphone),
# its command-line clients (pactl, paplay) and ALSA's pulse plugin, through which PortAudio
# (PyAudio) sees the server as the `pulse` and `default` devices. Run as root or with sudo;
# idempotent. The system-wide or per-user PulseAudio service is not started: the tests run their
# own server in a private XDG_RUNTIME_DIR.
set -euo pipefail

source "$(dirname "$0")/debian-packages.sh"
install_debian_packages pulseaudio pulseaudio-utils libasound2-plugins

"""The microphone on a real sound device: a PulseAudio server whose null sink's monitor is the input.

Each test starts its own PulseAudio (a private XDG_RUNTIME_DIR, no configuration of the machine's)
with one null sink, ``virtmic``, and makes its monitor the default input. PortAudio sees the
server through ALSA's pulse plugin as the ``pulse`` and ``default`` devices, at the server's
44.1 kHz; ``paplay -d virtmic`` plays a recording into the sink in real time and the agent
captures it. Nothing here is faked: PyAudio, PortAudio, ALSA, the sound server, the agent's
resampler and engine, mosquitto. Killing the server is unplugging the microphone.

scripts/install-audio-test-deps.sh installs the packages (pulseaudio, pulseaudio-utils,
libasound2-plugins); without them these tests skip on a developer machine and fail in CI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edge_agent.mqtt.messages import Availability, parse_iso_utc
from tests.broker import Broker, Client, Received
from tests.conftest import REPO_ROOT, require_module
from tests.support import start_agent_process

SINK = "virtmic"
DEVICE = "mic-test"
# Generous: a real-time device on a loaded 2-core machine. Tests wait on events, never this long
# when things work.
EVENT_SECONDS = 60.0
# paplay returns when the sink has played the file; the engine's decision comes within a few
# hundred milliseconds of the keyword's end (which lies inside the recording), so a detection
# belongs to the recording that was playing when its keyword ended.
POSITIVES = [
    "pos/20200707_spk57db_storenoise52db_40cm_xiaoyun_sox_1.wav",
    "pos/20200707_spk57db_storenoise52db_40cm_xiaoyun_sox_17.wav",
]
NEGATIVES = [
    "neg/fffb071a15834437bbda116b15791c43_4aae779cfe1a4e7a97466e589bfffa96.wav",
    "neg/fffb071a15834437bbda116b15791c43_2550f97f61be4c01b0daa317e0e504d3.wav",
    "neg/fffb071a15834437bbda116b15791c43_c579399dc3e344b49fbe9490a3e13fd7.wav",
]


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (scripts/install-audio-test-deps.sh)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


class PulseServer:
    """A PulseAudio server of this test's own, with the null sink ``virtmic`` as the microphone."""

    def __init__(self) -> None:
        self.binary = tool("pulseaudio")
        self.pactl = tool("pactl")
        self.paplay = tool("paplay")
        # The socket's path must fit a sockaddr_un (108 bytes): a short directory, not tmp_path.
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="pa-"))
        self.runtime_dir.chmod(0o700)
        self.log_path = self.runtime_dir / "pulseaudio.log"
        # HOME too: the server keeps its cookie and state there, not in the user's home.
        self.env = {**os.environ, "XDG_RUNTIME_DIR": str(self.runtime_dir), "HOME": str(self.runtime_dir)}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def client_env(self) -> dict[str, str]:
        """What a client (the agent, PyAudio) needs to find this server."""
        return {"XDG_RUNTIME_DIR": str(self.runtime_dir), "JACK_NO_START_SERVER": "1"}

    def start(self) -> PulseServer:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    "--daemonize=no",
                    "--exit-idle-time=-1",
                    "-n",  # no default.pa: only the modules below
                    "--load=module-native-protocol-unix auth-anonymous=1",
                    f"--load=module-null-sink sink_name={SINK}",
                ],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + EVENT_SECONDS
        while self._pactl("info").returncode != 0:
            assert self.process.poll() is None, f"pulseaudio exited: {self.log_path.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "pulseaudio did not answer"
            time.sleep(0.05)
        result = self._pactl("set-default-source", f"{SINK}.monitor")
        assert result.returncode == 0, result.stderr
        return self

    def kill(self) -> None:
        """Gone at once, as an unplugged device is: no goodbye to its clients."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def play(self, wav: Path) -> None:
        """Play a recording into the sink; returns once it has been played (real time)."""
        result = subprocess.run(
            [self.paplay, "-d", SINK, str(wav)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=EVENT_SECONDS,
        )
        assert result.returncode == 0, result.stderr

    def _pactl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.pactl, *args], env=self.env, capture_output=True, text=True, timeout=EVENT_SECONDS
        )

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)


@pytest.fixture()
def pulse() -> Iterator[PulseServer]:
    require_module("pyaudio")
    server = PulseServer().start()
    yield server
    server.close()


@dataclass
class RunningAgent:
    process: subprocess.Popen[Any]
    client: Client
    log_path: Path

    def topic(self, name: str) -> str:
        return f"edge_agent/{DEVICE}/{name}"

    def health_count(self) -> int:
        return len(self.client.on(self.topic("health")))

    def health_of_mic(self, predicate: Any, after: int = 0) -> dict[str, Any]:
        """The first health report after the first ``after`` whose microphone entry satisfies
        ``predicate`` (waits for it)."""

        def matching(messages: list[Received]) -> list[dict[str, Any]]:
            reports = [m.json() for m in messages[after:]]
            return [r for r in reports if predicate(r["streams"].get("mic", {}))]

        messages = self.client.wait_for(self.topic("health"), lambda ms: bool(matching(ms)), EVENT_SECONDS)
        return matching(messages)[0]

    def detections(self) -> list[dict[str, Any]]:
        return [m.json() for m in self.client.on(self.topic("detection"))]

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


@pytest.fixture()
def mic_agent(pulse: PulseServer, broker: Broker, model_dir: Path, tmp_path: Path) -> Iterator[RunningAgent]:
    """``edge-agent run`` with the default input device as its microphone, on the real broker."""
    config = tmp_path / "config.yaml"
    config.write_text(
        "audio:\n  sources:\n    - type: microphone\n      id: mic\nhealth:\n  interval: 1.0\n",
        encoding="utf-8",
    )
    client = Client(broker.port).connect().subscribe(f"edge_agent/{DEVICE}/#")
    log_path = tmp_path / "agent.log"
    with open(log_path, "wb") as log:
        process = start_agent_process(
            model_dir,
            broker.port,
            DEVICE,
            tmp_path / "outbox.db",
            "-c",
            str(config),
            env={**pulse.client_env, "PYTHONPATH": str(REPO_ROOT)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    agent = RunningAgent(process, client, log_path)
    try:
        client.wait_for(
            agent.topic("availability"),
            lambda ms: any(m.payload == Availability.ONLINE for m in ms),
            timeout=EVENT_SECONDS,
        )
        yield agent
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        client.close()
        if process.returncode not in (0, -15):
            print(agent.log()[-4000:])


def test_edge_agent_devices_lists_the_sound_servers_device(pulse: PulseServer) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent", "devices", "--json"],
        capture_output=True,
        text=True,
        timeout=EVENT_SECONDS,
        cwd=REPO_ROOT,
        env={**os.environ, **pulse.client_env},
    )
    assert result.returncode == 0, result.stderr
    devices = {d["name"]: d for d in json.loads(result.stdout)}
    assert {"pulse", "default"} <= set(devices), devices
    assert devices["default"]["is_default"]
    # The server's own rate: what the agent captures at and resamples to 16 kHz.
    assert devices["default"]["default_sample_rate"] == 44100


@pytest.mark.slow
def test_the_agent_hears_the_keyword_played_into_the_device_and_nothing_else(
    mic_agent: RunningAgent, pulse: PulseServer, dev_audio: Path, example_wav: Path
) -> None:
    mic_agent.health_of_mic(lambda mic: mic.get("running") and mic.get("audio_seconds", 0) > 0)
    # The device's own rate, 44.1 kHz, resampled by the source to the engine's 16 kHz.
    assert re.search(r"microphone mic: capturing from \d+ 'default' at 44100 Hz", mic_agent.log())

    # Negatives between positives, a positive last: a false alarm on a negative would be
    # published before the next positive's detection, which the test waits for.
    playlist = [
        (dev_audio / POSITIVES[0], True),
        (dev_audio / NEGATIVES[0], False),
        (dev_audio / NEGATIVES[1], False),
        (dev_audio / POSITIVES[1], True),
        (dev_audio / NEGATIVES[2], False),
        (example_wav, True),
    ]
    started_at: list[float] = []
    positives = 0
    for wav, positive in playlist:
        started_at.append(time.time())
        pulse.play(wav)
        if positive:
            positives += 1
            mic_agent.client.wait_for(
                mic_agent.topic("detection"), lambda ms, n=positives: len(ms) >= n, timeout=EVENT_SECONDS
            )

    detections = mic_agent.detections()
    assert len(detections) == positives, detections
    assert all(d["keyword"] == "小云小云" and d["stream"] == "mic" for d in detections)
    # Each detection's keyword ended while its positive was playing (the detection's wall time).
    playing = []
    for detection in detections:
        ended = parse_iso_utc(detection["time"])
        playing.append(max(i for i, at in enumerate(started_at) if at <= ended))
    assert playing == [i for i, (_, positive) in enumerate(playlist) if positive], (playing, detections)
    assert all(d["confidence"] >= 0.05 for d in detections)


@pytest.mark.slow
def test_unplugging_the_device_is_reported_and_capture_resumes_when_it_is_back(
    mic_agent: RunningAgent, pulse: PulseServer, example_wav: Path, broker: Broker
) -> None:
    mic_agent.health_of_mic(lambda mic: mic.get("running") and mic.get("audio_seconds", 0) > 0)

    seen = mic_agent.health_count()
    pulse.kill()
    away = mic_agent.health_of_mic(lambda mic: not mic.get("running") and "error" in mic, after=seen)
    assert "stopped delivering audio" in away["streams"]["mic"]["error"] or (
        "no audio input devices found" in away["streams"]["mic"]["error"]
    )
    assert "stopped delivering audio (unplugged, or its driver or sound server went away)" in mic_agent.log()

    seen = mic_agent.health_count()
    pulse.start()
    mic_agent.health_of_mic(lambda mic: mic.get("running"), after=seen)
    assert "capturing again from" in mic_agent.log()
    pulse.play(example_wav)
    (detection,) = mic_agent.client.wait_for(mic_agent.topic("detection"), timeout=EVENT_SECONDS)
    assert detection.json()["keyword"] == "小云小云"

    # The MQTT session lived through it all: online once, never offline, no reconnect.
    availability = [m.payload for m in mic_agent.client.on(mic_agent.topic("availability"))]
    assert availability == [Availability.ONLINE]
    last_health = mic_agent.client.on(mic_agent.topic("health"))[-1].json()
    assert last_health["mqtt_reconnects"] == 0
    assert mic_agent.process.poll() is None

"""Soak: an hour of audio through MQTT in accelerated time, the broker restarted every few minutes.

    python -m benchmarks.soak [--audio-minutes 60] [--speed 12] [--restart-every 5]

Not part of CI (it runs for minutes). The audio/dev recordings, back to back with 0.5 s of
silence, are repeated to ``--audio-minutes`` of audio and streamed to an agent (its own process)
on one MQTT stream at ``--speed`` times real time, in 100 ms chunks. Every ``--restart-every``
minutes *of audio*, right after a keyword was sent, the broker (with persistence, as in
production) is stopped for a second and started again: the keyword's detection races the
shutdown (published just before it, or kept in the agent's outbox and replayed; the
deterministic outage tests are in tests/agent/test_reliability.py).

Agents use clean sessions, so audio published while an agent is reconnecting is lost (as it is
for any live microphone). To compare what arrives with what should, the sender here behaves
like a device with a buffer: before a restart it waits until the broker has all its audio, and
after it, until the agent answers a ``ping`` (it is back and subscribed) before going on. So
the agent receives the whole hour, and what it should detect is computed by running the same
audio through the engine offline, in one pass.

Reported: detections expected, received, missing, unexpected (compared by start and end),
duplicates (by ``seq``), out of order, replayed from the outbox, the agent's RSS after warm-up
and at the end (it must not grow), and the agent's restarts survived.
Results: benchmarks/results/soak.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from benchmarks.common import dev_audio, machine, model_dir, start_agent, write_result
from edge_agent.audio.wav import read_wav, to_mono_16k
from edge_agent.engine.model import KeywordSpec, KwsModel
from edge_agent.mqtt.client import MqttClient
from edge_agent.mqtt.transport import InboundMessage
from tests.broker import Broker

DEVICE = "soak"
TOPIC = f"edge_agent/{DEVICE}"
CHUNK_SAMPLES = 1600
CHUNK_MS = 100


def hour_of_audio(minutes: float) -> np.ndarray:
    gap = np.zeros(8000, np.float32)
    corpus = np.concatenate(
        [
            piece
            for path in sorted(dev_audio().glob("*/*.wav"))
            for piece in (to_mono_16k(read_wav(path)), gap)
        ]
    )
    repeats = int(np.ceil(minutes * 60 * 16000 / corpus.shape[0]))
    return np.tile(corpus, repeats)[: int(minutes * 60 * 16000)]


def expected_detections(audio: np.ndarray) -> list[tuple[float, float]]:
    model = KwsModel.load(model_dir())
    detector = model.detector([KeywordSpec("小云小云")])
    found = detector.feed(audio) + detector.finish()
    return [(round(d.start, 3), round(d.end, 3)) for d in found]


class Watcher:
    """A subscriber with a persistent session: it misses no detection across broker restarts."""

    def __init__(self, port: int) -> None:
        self.events: list[dict[str, Any]] = []
        self.answers: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.client = MqttClient(
            "127.0.0.1",
            port,
            client_id="soak-watcher",
            session_expiry=3600,
            reconnect_delay=(0.2, 1.0),
            on_message=self._on_message,
        ).connect()
        self.client.subscribe(f"{TOPIC}/detection", f"{TOPIC}/cmd_result")  # again after reconnects

    def _on_message(self, message: InboundMessage) -> None:
        with self.lock:
            target = self.events if message.topic.endswith("/detection") else self.answers
            target.append(json.loads(message.payload))

    def answered(self, command_id: str) -> bool:
        with self.lock:
            return any(answer.get("id") == command_id for answer in self.answers)

    def close(self) -> None:
        self.client.close()


class Device:
    """The sending device: QoS 1 audio, and the patience of a device with a buffer."""

    def __init__(self, port: int) -> None:
        self.client = MqttClient(
            "127.0.0.1", port, client_id="soak-device", reconnect_delay=(0.2, 1.0)
        ).connect()

    def send(self, chunk: bytes) -> None:
        if not self.client.wait_connected(30):
            raise SystemExit("the device could not reconnect to the broker")
        self.client.publish(f"{TOPIC}/audio/soak", chunk, qos=1, wait=False)

    def flush(self) -> None:
        """Wait until the broker has acknowledged everything sent so far."""
        self.client.flush(30)

    def wait_for_agent(self, watcher: Watcher) -> None:
        """Ping the agent until it answers: it is connected and subscribed again."""
        deadline = time.monotonic() + 60
        for attempt in itertools.count():
            if not self.client.wait_connected(30):
                raise SystemExit("the device could not reconnect to the broker")
            command_id = f"soak-{time.monotonic_ns()}-{attempt}"
            self.client.publish(f"{TOPIC}/cmd/ping", json.dumps({"id": command_id}), qos=1, wait=False)
            answer_by = time.monotonic() + 1.0
            while time.monotonic() < answer_by:
                if watcher.answered(command_id):
                    return
                time.sleep(0.05)
            if time.monotonic() > deadline:
                raise SystemExit("the agent did not come back within 60 s of a broker restart")

    def close(self) -> None:
        self.client.close()


def restart_points(
    expected: list[tuple[float, float]], every_seconds: float, total_seconds: float
) -> set[int]:
    """Chunk indices to restart the broker after: the first keyword past each period, once its
    detection is due (its end, plus the decoder's hold and the model's look-ahead)."""
    points = set()
    for period in np.arange(every_seconds, total_seconds, every_seconds):
        keyword = next((end for _, end in expected if end >= period), None)
        if keyword is not None:
            points.add(int(np.ceil((keyword + 1.0) * 1000 / CHUNK_MS)))
    return points


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--audio-minutes", type=float, default=60.0)
    parser.add_argument("--speed", type=float, default=12.0, help="times real time")
    parser.add_argument("--restart-every", type=float, default=5.0, help="minutes of audio between restarts")
    args = parser.parse_args()
    audio = hour_of_audio(args.audio_minutes)
    expected = expected_detections(audio)
    pcm = np.clip(np.round(audio), -32768, 32767).astype("<i2").tobytes()
    chunk_bytes = CHUNK_SAMPLES * 2
    chunks = len(pcm) // chunk_bytes
    restarts_at = restart_points(expected, args.restart_every * 60, args.audio_minutes * 60)
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        broker = Broker(workdir, persistence=True).start()
        agent = start_agent(broker.port, DEVICE, workdir / "outbox.db", health__interval="5")
        watcher = Watcher(broker.port)
        device = Device(broker.port)
        process = psutil.Process(agent.pid)
        rss: list[float] = []
        restarts = 0
        try:
            device.wait_for_agent(watcher)
            started = time.monotonic()
            for index in range(chunks):
                delay = started + index * CHUNK_MS / 1000 / args.speed - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                device.send(pcm[index * chunk_bytes : (index + 1) * chunk_bytes])
                if index % 50 == 0:
                    device.flush()  # keep the device's own queue short
                if index % 600 == 0:
                    rss.append(process.memory_info().rss / 1e6)
                if index in restarts_at:
                    device.flush()
                    broker.restart(downtime=1.0)
                    restarts += 1
                    device.wait_for_agent(watcher)
                    # Go on at the same pace from here, without a burst to catch up.
                    started = time.monotonic() - (index + 1) * CHUNK_MS / 1000 / args.speed
            device.client.publish(f"{TOPIC}/audio/soak/control", b'{"action": "end"}', qos=1)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and len(watcher.events) < len(expected):
                time.sleep(0.5)
            time.sleep(3)
            rss.append(process.memory_info().rss / 1e6)
        finally:
            device.close()
            agent.terminate()
            agent.wait(30)
            watcher.close()
            broker.stop()
    events = watcher.events
    seqs = [e["seq"] for e in events]
    received = [(e["start"], e["end"]) for e in sorted(events, key=lambda e: e["seq"])]
    unique = sorted(set(seqs))
    warm = rss[min(2, len(rss) - 1)]
    result = {
        "benchmark": "soak",
        "machine": machine(),
        "audio_minutes": args.audio_minutes,
        "speed": args.speed,
        "broker_restarts": restarts,
        "agent_exit_code": agent.returncode,
        "detections_expected": len(expected),
        "detections_received": len(events),
        "duplicates": len(seqs) - len(unique),
        "missing": len(set(expected) - set(received)),
        "unexpected": len(set(received) - set(expected)),
        "out_of_order": sum(1 for a, b in itertools.pairwise(seqs) if b < a),
        "replayed": sum(1 for e in events if e.get("replayed")),
        "rss_mb_after_warmup": round(warm, 1),
        "rss_mb_end": round(rss[-1], 1),
        "rss_mb_max": round(max(rss), 1),
        "rss_samples_mb": [round(r, 1) for r in rss],
    }
    path = write_result("soak", result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "rss_samples_mb")}, indent=2))
    print(f"written: {path}")


if __name__ == "__main__":
    main()

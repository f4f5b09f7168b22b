"""Live keywords under a flood of bad and heavy input: are they still heard in time, in bounded memory?

    python -m benchmarks.abuse [--seconds 60] [--live 3]

``--live`` thin devices stream the recordings of the wake word in real time (100 ms chunks) while
another process, through the same broker, sends what an attacker or a broken device could:

* three one-hour WAV requests (8-bit, 1 kHz: 3.6 MB each, under the payload limit) and three of
  590 s (below the recording cap: scored a block at a time between live passes);
* 100,000 refused messages, each on a topic of its own (empty audio payloads on ``audio/e<n>``);
* 200 stream ids started and never fed (``{"action": "start"}`` on ``audio/j<n>/control``);
* 16 chunks of 3.9 MB of PCM declared 8-bit 8 kHz (almost 500 s of audio each).

Reported: every live detection's delay from the keyword's end (p50/p95/max) and those missing
against what the engine finds in the same audio, the agent's peak RSS and CPU, how many error
messages the agent published and what it counted as refused. Results: benchmarks/results/abuse.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from benchmarks.common import machine, percentile, positives_back_to_back, start_agent, write_result
from benchmarks.mqtt_latency import CHUNK_MS, CHUNK_SAMPLES, engine_detections
from edge_agent.mqtt.client import MqttClient
from edge_agent.mqtt.transport import InboundMessage
from tests.broker import Broker

DEVICE = "abuse"
PREFIX = f"edge_agent/{DEVICE}"


def long_wav(seconds: float, rate: int = 1000) -> bytes:
    """An 8-bit mono WAV of silence: few bytes per second of audio."""
    frames = int(seconds * rate)
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate, 1, 8)
    return (
        b"RIFF"
        + struct.pack("<I", 4 + 8 + len(fmt) + 8 + frames)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + b"data"
        + struct.pack("<I", frames)
        + b"\x80" * frames
    )


def stream_live(port: int, streams: int, audio: bytes, seconds: float, started: float) -> None:
    publisher = MqttClient("127.0.0.1", port).connect()
    chunk = CHUNK_SAMPLES * 2
    for index in range(int(seconds * 1000 / CHUNK_MS)):
        delay = started + index * CHUNK_MS / 1000 - time.time()
        if delay > 0:
            time.sleep(delay)  # real time: the subject of this benchmark
        offset = (index * chunk) % len(audio)
        for stream in range(streams):
            publisher.publish(f"{PREFIX}/audio/live{stream}", audio[offset : offset + chunk])
    for stream in range(streams):
        publisher.publish(f"{PREFIX}/audio/live{stream}/control", b'{"action": "end"}', qos=1)
    publisher.close()


def flood(port: int, started: float) -> None:
    """Everything bad at once, as fast as one client can send it."""
    time.sleep(max(0.0, started + 2.0 - time.time()))
    client = MqttClient("127.0.0.1", port).connect()
    hour, long = long_wav(3600), long_wav(590)
    for index in range(3):
        client.publish(f"{PREFIX}/detect/request/hour{index}", hour, qos=1)
        client.publish(f"{PREFIX}/detect/request/long{index}", long, qos=1)
    big = bytes(3_900_000)
    for index in range(16):
        client.publish(f"{PREFIX}/audio/big{index}", big, user_properties=[("rate", "8000"), ("width", "1")])
    for index in range(200):
        client.publish(f"{PREFIX}/audio/j{index}/control", b'{"action": "start"}')
    for index in range(100_000):
        client.publish(f"{PREFIX}/audio/e{index}", b"")
    client.flush()
    client.close()


class Watcher:
    def __init__(self, port: int) -> None:
        self.detections: list[tuple[float, dict[str, Any]]] = []
        self.errors = 0
        self.health: dict[str, Any] = {}
        self.online = threading.Event()
        self.lock = threading.Lock()
        self.client = MqttClient("127.0.0.1", port, on_message=self._on_message).connect()
        self.client.subscribe(f"{PREFIX}/detection", f"{PREFIX}/availability", f"{PREFIX}/error", qos=1)
        self.client.subscribe(f"{PREFIX}/health", qos=0)

    def _on_message(self, message: InboundMessage) -> None:
        topic = message.topic.rsplit("/", 1)[-1]
        with self.lock:
            if topic == "detection":
                self.detections.append((message.received_at, json.loads(message.payload)))
            elif topic == "error":
                self.errors += 1
            elif topic == "health":
                self.health = json.loads(message.payload)
            elif message.payload == b"online":
                self.online.set()


def run(seconds: float, live: int, workdir: Path) -> dict[str, Any]:
    samples, _ = positives_back_to_back()
    audio = np.clip(samples, -32768, 32767).astype("<i2").tobytes()
    expected = engine_detections(samples, [0] * live, seconds)
    expected = {(f"live{stream[1:]}", start, end) for stream, start, end in expected}
    broker = Broker(workdir).start()
    agent = start_agent(broker.port, DEVICE, workdir / "outbox.db", health__interval="2")
    watcher = Watcher(broker.port)
    try:
        if not watcher.online.wait(60):
            raise SystemExit("agent did not come online")
        process = psutil.Process(agent.pid)
        process.cpu_percent(None)
        started = time.time() + 0.5
        sender = multiprocessing.Process(
            target=stream_live, args=(broker.port, live, audio, seconds, started)
        )
        attacker = multiprocessing.Process(target=flood, args=(broker.port, started))
        sender.start()
        attacker.start()
        peak_rss = 0.0
        while sender.is_alive():
            peak_rss = max(peak_rss, process.memory_info().rss / 1e6)
            time.sleep(0.2)
        attacker.join(120)
        deadline = time.time() + 10
        while time.time() < deadline and len(watcher.detections) < len(expected):
            time.sleep(0.1)
        cpu = process.cpu_percent(None)
        time.sleep(2.5)  # the next health report
    finally:
        agent.terminate()
        agent.wait(30)
        watcher.client.close()
        broker.stop()
    delays, received = [], set()
    for arrived, event in watcher.detections:
        received.add((event["stream"], event["start"], event["end"]))
        delays.append((arrived - (started + event["end"])) * 1000)
    return {
        "live_streams": live,
        "seconds": seconds,
        "detections_expected": len(expected),
        "detections_received": len(watcher.detections),
        "detections_missing": len(expected - received),
        "delay_ms_p50": _round(percentile(delays, 50)),
        "delay_ms_p95": _round(percentile(delays, 95)),
        "delay_ms_max": _round(max(delays) if delays else None),
        "delays_ms_by_keyword_end": [
            [round(event["end"], 1), _round(delay)]
            for (_, event), delay in zip(watcher.detections, delays, strict=True)
        ],
        "agent_peak_rss_mb": round(peak_rss, 1),
        "agent_cpu_percent": round(cpu, 1),
        "error_messages_published": watcher.errors,
        "refused": watcher.health.get("refused", {}),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="live audio per stream (s)")
    parser.add_argument("--live", type=int, default=3, help="live streams saying the keyword")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        result = run(args.seconds, args.live, Path(workdir))
    result = {"machine": machine(), **result}
    print(json.dumps(result, ensure_ascii=False, indent=2))
    print(f"written: {write_result('abuse', result)}")


if __name__ == "__main__":
    main()

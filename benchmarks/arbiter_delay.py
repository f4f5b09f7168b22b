"""The delay the room arbiter adds: from a room's first detection to its one ``wake``.

    python -m benchmarks.arbiter_delay [--utterances 60] [--devices 3] [--windows 0,200]

mosquitto on loopback; ``edge-agent arbiter`` as its own process; ``--devices`` simulated
devices in one room publish the agent's real ``info`` and ``detection`` messages (levels
included), all of an utterance at once. One watcher, subscribed to the detections and the wakes,
times each utterance from the arrival of its first detection to the arrival of its wake (one
clock for both). Reported per ``--windows`` value (ms): p50, p95 and max of that delay, and of
the delay less the window (what the arbiter's own work and the extra MQTT hop cost). A window
of 0 takes the first detection's device; the hold-off keeps the others from waking again.
Results: benchmarks/results/arbiter_delay.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, machine, percentile, write_result
from edge_agent.mqtt.client import MqttClient
from edge_agent.mqtt.messages import DetectionEvent, iso_utc
from tests.broker import Broker

ROOM = "bench"
# Utterances come this far apart (s): more than the arbiter's hold-off.
HOLDOFF_S = 0.4
KEYWORD = "小云小云"


def detection(device: str, seq: int, level: float) -> bytes:
    event = DetectionEvent(
        device=device,
        stream="mic",
        keyword=KEYWORD,
        confidence=0.95,
        start=1.0,
        end=1.7,
        time=iso_utc(time.time()),
        seq=seq,
        boot_id="bench",
        delay_ms=5.0,
        level_dbfs=level,
        snr_db=25.0,
    )
    return event.to_payload()


def measure(port: int, window_ms: float, devices: int, utterances: int) -> dict[str, Any]:
    names = [f"bench-{i}" for i in range(devices)]
    # The hold-off makes a window of 0 give one wake per utterance too (the first detection's).
    options = [
        "--window",
        str(window_ms),
        "--holdoff",
        str(HOLDOFF_S),
        "--instance",
        f"bench-{int(window_ms)}",
    ]
    options += ["--log-level", "warning"]
    arbiter = subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "arbiter", "--broker", f"127.0.0.1:{port}", *options],
        cwd=REPO,
    )
    try:
        with (
            MqttClient("127.0.0.1", port).connect() as watcher,
            MqttClient("127.0.0.1", port).connect() as sender,
        ):
            watcher.subscribe(
                "edge_agent/+/detection", f"edge_agent/room/{ROOM}/wake", "edge_agent/arbiter/+/presence"
            )
            for name in names:
                info = {"device": name, "room": ROOM, "keywords": [{"text": KEYWORD}], "boot_id": "bench"}
                sender.publish(f"edge_agent/{name}/info", json.dumps(info).encode(), retain=True)
            deadline = time.monotonic() + 30
            while (message := watcher.receive(deadline - time.monotonic())) is not None:
                if message.topic.endswith("/presence") and message.payload:
                    break
            else:
                raise SystemExit("the arbiter did not come up")
            delays: list[float] = []
            winners_right = 0
            for seq in range(1, utterances + 1):
                loudest = names[seq % devices]
                for name in names:
                    sender.publish(
                        f"edge_agent/{name}/detection",
                        detection(name, seq, -20.0 if name == loudest else -35.0),
                    )
                first: float | None = None
                deadline = time.monotonic() + 10
                while (message := watcher.receive(deadline - time.monotonic())) is not None:
                    if message.topic.endswith("/detection") and first is None:
                        first = message.received_at
                    elif message.topic.endswith("/wake"):
                        if first is None:
                            raise SystemExit(f"a wake before any detection: {message.payload[:200]!r}")
                        delays.append((message.received_at - first) * 1000.0)
                        winners_right += json.loads(message.payload)["device"] == loudest
                        break
                else:
                    raise SystemExit(f"no wake for utterance {seq}")
                # The rest of this utterance's detections; the next one after the hold-off.
                next_at = time.monotonic() + HOLDOFF_S + 0.1
                while (remaining := next_at - time.monotonic()) > 0:
                    late = watcher.receive(remaining)
                    if late is not None and late.topic.endswith("/wake"):
                        raise SystemExit(f"a second wake for utterance {seq}")
    finally:
        arbiter.terminate()
        arbiter.wait(15)

    def stats(values: list[float]) -> dict[str, float]:
        return {
            "p50": round(percentile(values, 50) or 0.0, 1),
            "p95": round(percentile(values, 95) or 0.0, 1),
            "max": round(max(values), 1),
        }

    return {
        "window_ms": window_ms,
        "devices": devices,
        "utterances": utterances,
        "winner_is_loudest": winners_right,
        "delay_ms": stats(delays),
        "delay_less_window_ms": stats([d - window_ms for d in delays]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--utterances", type=int, default=60)
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--windows", default="0,200", help="comma-separated windows (ms)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        broker = Broker(Path(folder)).start()
        try:
            for window in (float(w) for w in args.windows.split(",")):
                row = measure(broker.port, window, args.devices, args.utterances)
                rows.append(row)
                print(
                    f"window {window:g} ms: added delay p50 {row['delay_ms']['p50']} ms, "
                    f"p95 {row['delay_ms']['p95']} ms (less the window: p50 "
                    f"{row['delay_less_window_ms']['p50']} ms, p95 {row['delay_less_window_ms']['p95']} ms); "
                    f"the loudest won {row['winner_is_loudest']}/{row['utterances']}"
                )
        finally:
            broker.stop()
    path = write_result(
        "arbiter_delay",
        # The 1-minute load average at the end: on a shared machine the tails follow it.
        {"machine": machine(), "load_average": round(os.getloadavg()[0], 1), "results": rows},
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()

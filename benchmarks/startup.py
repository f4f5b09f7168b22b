"""Start-up: from launching ``edge-agent run`` to its retained ``online`` on the broker.

    python -m benchmarks.startup [--repeat 5]

The model is on local disk (audio/dev's model directory); mosquitto runs on loopback. Reported:
median and worst of ``--repeat`` starts, for the numpy and torch backends.
Results: benchmarks/results/startup.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import machine, start_agent, write_result
from edge_agent.mqtt.client import MqttClient
from tests.broker import Broker


def time_to_online(port: int, backend: str, workdir: Path, index: int) -> float:
    device = f"startup{index}"
    topic = f"edge_agent/{device}/availability"
    with MqttClient("127.0.0.1", port).connect() as watcher:
        watcher.subscribe(topic)
        started = time.time()
        agent = start_agent(port, device, workdir / f"{device}.db", "--backend", backend)
        try:
            deadline = time.monotonic() + 120
            while (message := watcher.receive(deadline - time.monotonic(), topic)) is not None:
                if message.payload == b"online":
                    return message.received_at - started
            raise SystemExit("the agent did not come online")
        finally:
            agent.terminate()
            agent.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        broker = Broker(Path(folder)).start()
        try:
            for backend in ("numpy", "torch"):
                times = [time_to_online(broker.port, backend, Path(folder), i) for i in range(args.repeat)]
                results[backend] = {
                    "median_s": round(statistics.median(times), 3),
                    "max_s": round(max(times), 3),
                }
                median = results[backend]["median_s"]
                print(f"{backend}: online after {median} s (median), worst {max(times):.2f} s")
        finally:
            broker.stop()
    path = write_result("startup", {"benchmark": "startup", "machine": machine(), "results": results})
    print(f"written: {path}")


if __name__ == "__main__":
    main()

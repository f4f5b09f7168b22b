"""The agent's own CPU per audio message: N live streams through mosquitto, per process.

    python -m benchmarks.agent_cpu [--streams 256] [--seconds 20] [--workers 2]

Starts mosquitto on a free loopback port and the agent as its own process (`edge-agent run`,
``engine.workers`` as given), then N devices publish 100 ms chunks of the dev positives (QoS 0,
no properties, the way thin devices do) in real time for S seconds from a process of their own.
Over the steady part of the run (the first 3 s, when the streams open, and the last 2 s are
left out) it reports each of the agent's processes' CPU (100 = one core) and CPU time per audio
message (µs; for a worker process, per message of the whole run, i.e. twice its own share with
two workers), with each thread's CPU where /proc shows it. The engine's own arithmetic is in
the worker processes' figures; the agent's process only receives, checks, queues and sends on.

Cheaper than benchmarks.mqtt_latency (fewer streams suffice for a per-message figure, and
nothing waits for detections), so it serves for A/B comparisons of the ingest path: run it in
two checkouts alternately and compare the ratios (``cd OTHER && python /path/to/agent_cpu.py
--no-save`` measures the other checkout's agent). Results go to benchmarks/results/agent_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from benchmarks.common import machine, positives_back_to_back, start_agent, write_result
from edge_agent.mqtt.client import MqttClient
from edge_agent.mqtt.transport import InboundMessage
from tests.broker import Broker

CHUNK_MS = 100
CHUNK_BYTES = 16000 * 2 * CHUNK_MS // 1000
DEVICE = "bench"
PREFIX = f"edge_agent/{DEVICE}"
WARM_UP_SECONDS = 3.0
TAIL_SECONDS = 2.0


def send_audio(port: int, audio: bytes, streams: int, seconds: float, started: float) -> None:
    """The N devices, in a process of their own."""
    publisher = MqttClient("127.0.0.1", port).connect()
    for index in range(int(seconds * 1000 / CHUNK_MS)):
        due = started + (index + 1) * CHUNK_MS / 1000
        if due > time.time():
            time.sleep(due - time.time())
        begin = (index * CHUNK_BYTES) % (len(audio) - CHUNK_BYTES)
        payload = audio[begin : begin + CHUNK_BYTES]
        for stream in range(streams):
            publisher.publish(f"{PREFIX}/audio/s{stream}", payload, qos=0)
    publisher.flush(10)
    publisher.close()


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of ``pid``."""
    ticks = os.sysconf("SC_CLK_TCK")
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found[int(tid)] = (int(fields[11]) + int(fields[12])) / ticks
    return found


def run(streams: int, seconds: float, workers: int) -> dict[str, Any]:
    samples, _ = positives_back_to_back()
    audio = samples.astype("<i2").tobytes()
    with tempfile.TemporaryDirectory() as folder:
        broker = Broker(Path(folder)).start()
        agent = start_agent(
            broker.port,
            DEVICE,
            Path(folder) / "outbox.db",
            health__interval="2",
            audio__mqtt__max_streams=str(max(64, streams)),
            engine__workers=str(workers),
        )
        online = threading.Event()
        health: dict[str, Any] = {}

        def on_message(message: InboundMessage) -> None:
            if message.topic.endswith("/health"):
                health.update(json.loads(message.payload))
            elif message.payload == b"online":
                online.set()

        watcher = MqttClient("127.0.0.1", broker.port, on_message=on_message).connect()
        watcher.subscribe(f"{PREFIX}/availability", qos=1)
        watcher.subscribe(f"{PREFIX}/health", qos=0)
        try:
            if not online.wait(60):
                raise SystemExit("agent did not come online")
            started = time.time() + 0.5
            sender = multiprocessing.Process(
                target=send_audio, args=(broker.port, audio, streams, seconds, started)
            )
            sender.start()
            time.sleep(0.5 + WARM_UP_SECONDS)
            root = psutil.Process(agent.pid)
            processes = [root, *root.children(recursive=True)]
            before = {p.pid: (sum(p.cpu_times()[:2]), thread_cpu(p.pid)) for p in processes}
            window_started = time.perf_counter()
            time.sleep(seconds - WARM_UP_SECONDS - TAIL_SECONDS)
            after = {p.pid: (sum(p.cpu_times()[:2]), thread_cpu(p.pid)) for p in processes}
            window = time.perf_counter() - window_started
            memory = {p.pid: p.memory_full_info() for p in processes}
            sender.join(30)
            time.sleep(2.5)  # a last health report
        finally:
            agent.terminate()
            agent.wait(30)
            watcher.close()
            broker.stop()
    messages = streams * window * 1000 / CHUNK_MS
    per_process = []
    for process in processes:
        cpu = after[process.pid][0] - before[process.pid][0]
        if cpu <= 0 and process.pid != agent.pid:
            continue  # multiprocessing's resource tracker
        threads = {
            tid: round((spent - before[process.pid][1].get(tid, 0.0)) / window * 100, 1)
            for tid, spent in after[process.pid][1].items()
        }
        per_process.append(
            {
                "process": "agent" if process.pid == agent.pid else "engine worker",
                "cpu_percent": round(cpu / window * 100, 1),
                "cpu_us_per_message": round(cpu / messages * 1e6, 1),
                "threads_cpu_percent": sorted((v for v in threads.values() if v > 0), reverse=True),
                "rss_mb": round(memory[process.pid].rss / 2**20, 1),
                "pss_mb": round(memory[process.pid].pss / 2**20, 1),
            }
        )
    return {
        "streams": streams,
        "engine_workers": workers,
        "messages_per_second": streams * 1000 // CHUNK_MS,
        "window_seconds": round(window, 1),
        "agent_cpu_percent": round(sum(p["cpu_percent"] for p in per_process), 1),
        "processes": per_process,
        "refused": health.get("refused", {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=2, help="engine.workers (1: the engine on a thread)")
    parser.add_argument(
        "--no-save", action="store_true", help="print only (an A/B run from another checkout's root)"
    )
    args = parser.parse_args()
    result = run(args.streams, args.seconds, args.workers)
    print(json.dumps(result, ensure_ascii=False))
    if args.no_save:
        return
    path = write_result("agent_cpu", {"benchmark": "agent_cpu", "machine": machine(), "result": result})
    print(f"written: {path}")


if __name__ == "__main__":
    main()

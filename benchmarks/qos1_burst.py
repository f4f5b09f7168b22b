"""A burst of QoS 1 publishes through mosquitto: first publish to last PUBACK.

    python -m benchmarks.qos1_burst [--messages 128] [--repeat 7]

What a hundred streams firing on the same chunk ask of the MQTT link: ``--messages`` detections
as QoS 1 publishes at once, never more unacknowledged than the broker's Receive Maximum allows.
Timed for the agent's own path (the detection sink: events stored in the outbox in one commit,
handed over within the broker's window and refilled on PUBACKs, through :class:`MqttTransport`,
which sets TCP_NODELAY and re-arms TCP_QUICKACK after every read), for the same path with
delayed ACKs (``agent, delayed ACKs``: ``MqttTransport(quick_ack=False)``), and for a
plain paho client with its defaults (Nagle's algorithm on, everything published at once), each
against mosquitto with its default settings and with ``set_tcp_nodelay true``, on loopback with
nothing else running: what the link itself costs and what each setting changes. Median and worst
of ``--repeat`` bursts, and the median CPU time of this process over a burst (``cpu_ms_median``:
every thread of the publishing side, the sink's and the network thread's; mosquitto is another
process): on a busy machine the burst's length is that CPU waiting for a core, so it is the
figure to compare between two versions of the agent's path.
Results: benchmarks/results/qos1_burst.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import BROKER_NODELAY, machine, write_result
from edge_agent.agent.delivery import Delivery
from edge_agent.agent.errors import ErrorReporter
from edge_agent.agent.items import Detected
from edge_agent.agent.outbox import Outbox
from edge_agent.agent.sink import DetectionSink, DetectionWire, detection_window
from edge_agent.engine.decoder import Detection
from edge_agent.mqtt.transport import MqttTransport
from tests.broker import Broker, Client
from tests.support import agent_config

PAYLOAD = b"x" * 500  # about the size of a detection event


class Burst:
    """Counts PUBACKs; ``wait()`` returns when ``target`` have arrived since ``reset``."""

    def __init__(self) -> None:
        self._acknowledged = 0
        self._target = 0
        self._done = threading.Event()
        self._lock = threading.Lock()

    def reset(self, target: int) -> None:
        with self._lock:
            self._acknowledged, self._target = 0, target
            self._done.clear()

    def acknowledged(self, *_: Any) -> None:
        with self._lock:
            self._acknowledged += 1
            if self._acknowledged >= self._target:
                self._done.set()

    def wait(self, timeout: float) -> bool:
        return self._done.wait(timeout)


Timing = tuple[float, float]  # (first publish to last PUBACK, this process's CPU meanwhile), ms


def timed_bursts(send_burst: Callable[[], None], burst: Burst, messages: int, repeat: int) -> list[Timing]:
    times = []
    for _ in range(repeat + 1):  # the first one warms up
        burst.reset(messages)
        started, cpu = time.perf_counter(), time.process_time()
        send_burst()
        if not burst.wait(30):
            raise SystemExit("the broker did not acknowledge the burst")
        times.append(((time.perf_counter() - started) * 1000, (time.process_time() - cpu) * 1000))
    return times[1:]


def agent_outbox(
    port: int, workdir: Path, messages: int, repeat: int, quick_ack: bool = True
) -> list[Timing]:
    """The agent's path for detections: the detection sink stores a burst in the outbox (one
    commit) and hands it over within the broker's window, refilled on PUBACKs."""
    burst = Burst()
    transport = MqttTransport(agent_config(port, workdir).mqtt, "qos1-burst", quick_ack=quick_ack)
    outbox = Outbox(workdir / "qos1-burst.db")
    wire = DetectionWire(transport, qos=lambda: 1, expiry_seconds=lambda: None)

    def delivery(wake: Callable[[], None]) -> Delivery:
        return Delivery(
            outbox,
            wire.publish,
            lambda: transport.connected,
            "bench",
            window=lambda: detection_window(transport),
            wake=wake,
        )

    sink = DetectionSink("bench", "bench", "bench/burst", ErrorReporter(), outbox, delivery)
    assert sink.delivery is not None
    transport.on_acknowledged(sink.delivery.acknowledged)
    transport.on_acknowledged(burst.acknowledged)
    transport.after_reading(sink.delivery.refill)
    transport.on_connected(sink.wake)
    detection = Detection("小云小云", 0.9, 1.0, 2.0)

    def send_burst() -> None:
        sink.put([Detected(f"s{n}", "mqtt", detection, time.time()) for n in range(messages)])

    transport.start()
    sink.start()
    try:
        if not transport.wait_connected(10):
            raise SystemExit("the transport did not connect")
        return timed_bursts(send_burst, burst, messages, repeat)
    finally:
        sink.stop(flush_seconds=1)
        transport.stop()
        outbox.close()


def plain_paho(port: int, messages: int, repeat: int) -> list[Timing]:
    """paho with its defaults: everything published at once, paho holding back what exceeds its
    window of 20."""
    burst = Burst()
    plain = Client(port).connect()  # the tests' paho client: paho's window and Nagle as they are
    plain.client.on_publish = burst.acknowledged

    def send_burst() -> None:
        for _ in range(messages):
            plain.client.publish("bench/burst", PAYLOAD, qos=1)

    try:
        return timed_bursts(send_burst, burst, messages, repeat)
    finally:
        plain.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    results = []
    clients: dict[str, Callable[[int, Path], list[Timing]]] = {
        "agent outbox": lambda port, work: agent_outbox(port, work, args.messages, args.repeat),
        "agent, delayed ACKs": lambda port, work: agent_outbox(
            port, work, args.messages, args.repeat, quick_ack=False
        ),
        "plain paho": lambda port, work: plain_paho(port, args.messages, args.repeat),
    }
    with tempfile.TemporaryDirectory() as folder:
        for setting in ("", BROKER_NODELAY):
            for client, run in clients.items():
                # A fresh broker and outbox for each: a client connecting second to a broker was
                # seen to run faster than the first, whoever it was.
                work = Path(folder) / f"{len(results)}"
                work.mkdir()
                broker = Broker(work, extra_config=f"{setting}\n" if setting else "").start()
                try:
                    times = run(broker.port, work)
                finally:
                    broker.stop()
                results.append(
                    {
                        "broker": setting or "mosquitto defaults",
                        "client": client,
                        "messages": args.messages,
                        "all_acknowledged_ms_median": round(statistics.median(t for t, _ in times), 1),
                        "all_acknowledged_ms_max": round(max(t for t, _ in times), 1),
                        "cpu_ms_median": round(statistics.median(c for _, c in times), 1),
                    }
                )
    report = {
        "benchmark": "qos1_burst",
        "machine": machine(),
        "payload_bytes": len(PAYLOAD),
        "results": results,
    }
    path = write_result("qos1_burst", report)
    print(f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores")
    print(
        f"{args.messages} QoS 1 publishes of {len(PAYLOAD)} bytes, first publish to last PUBACK,"
        " and the publishing process's CPU meanwhile (ms):"
    )
    print(f"{'broker':>22} {'client':>20} {'median':>8} {'max':>8} {'CPU':>8}")
    for r in results:
        print(
            f"{r['broker']:>22} {r['client']:>20} {r['all_acknowledged_ms_median']:>8.1f}"
            f" {r['all_acknowledged_ms_max']:>8.1f} {r['cpu_ms_median']:>8.1f}"
        )
    print(f"written: {path}")


if __name__ == "__main__":
    main()

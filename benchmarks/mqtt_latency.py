"""End-to-end delay through mosquitto: keyword spoken -> detection received by a subscriber.

    python -m benchmarks.mqtt_latency [--streams 1,16,64,128] [--seconds 60] [--stagger]
                                      [--rounds R] [--against DIR]

Starts mosquitto on a free loopback port and the agent as its own process
(`edge-agent run`), then plays the 25 positive recordings of audio/dev, one after another with
0.5 s of silence between them, on N concurrent streams in real time, in 100 ms chunks, the way
N thin devices with microphones would. A subscriber receives the detections. Every stream
starts at the same place, so all N say the keyword at the same instant: the worst case. With
``--stagger`` stream k starts at the beginning of recording k mod 25 instead (wrapping round at
the end), so that at most ceil(N / 25) streams say it at once, as independent devices would.

delay = arrival time at the subscriber - (wall time the stream started + the detection's
``end`` in stream seconds), i.e. from the moment the end of the keyword was spoken. It includes
the 100 ms chunking, the model's look-ahead (~0.29 s), inference, the outbox and two broker hops.
The devices publish from a process of their own, every round of chunks in one write on one
MQTT 3.1.1 connection at QoS 0 (:mod:`benchmarks.devices`: a fleet is other machines, and its
stand-in should take little of the agent's); how late their chunks left is reported too
(``sender_lag_ms_p95``), since on a small machine the load generator competes with the agent.

Which detections must arrive is known before the run: the engine, in this process, is fed each
distinct stream as the agent will be (100 ms chunks, then the end of the stream), and every
detection it finds must reach the subscriber with the same stream, start and end
(``detections_missing`` and ``detections_unexpected`` count the differences).

Reported per N: detections expected / received / missing / duplicates, p50/p95/p99 delay, how
much of it passed inside the agent (``agent_delay_ms_*``: keyword end to the detection handed
to the broker, from the events' own ``delay_ms``), chunks the agent dropped or refused (from
its retained health), and the agent's CPU and peak memory: the agent is its own process and its
engine's worker processes (``engine.workers``), and both are summed over all of them (CPU: 100 =
one core; RSS counts shared pages once per process, PSS shares them out: both are given), then
per process (``agent_peak_memory_per_process``, sampled once a second, with the kernel's
high-water mark of each process's RSS, which also counts the instants between samples). The
load generator, mosquitto and this process (the subscriber) share the machine with the agent:
their CPU is given too (``others_cpu_percent``), with the load average before the round
(``load_average_before``).

With ``--rounds R`` each N is run R times with a fresh broker and agent: the row is the round
with the median p95, next to every round's p95, the most chunks any round dropped and the most
detections any round missed (a shared machine's speed drifts; one lucky round proves little).
Results go to benchmarks/results/mqtt_latency.json; with ``--broker-nodelay`` (mosquitto told
``set_tcp_nodelay true``, see docs/mqtt.md) to mqtt_latency-nodelay.json, with ``--stagger`` to
mqtt_latency-stagger.json (both: mqtt_latency-nodelay-stagger.json).

``--against DIR`` runs, in every round, the agent of another checkout too (a worktree of the
commit to compare with), with a fresh broker and the same devices, one right after the other
(which goes first alternates from round to round). A shared VM's speed drifts by a quarter
within minutes: two runs at different times compare the VM as much as the code, two agents in
the same rounds compare the code. Each N then has a row per checkout (``this``, ``against``,
each the round with its median p95) and, per round, this agent's p95 and p50 over the other's
(``rounds_p95_vs_against``, ``rounds_p50_vs_against``). Results go to a file of their own
(``mqtt_latency-against.json``, with the suffixes above).
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

import numpy as np
import psutil

from benchmarks.common import (
    BROKER_NODELAY,
    REPO,
    AgentUsage,
    machine,
    model_dir,
    percentile,
    played_stream,
    positives_back_to_back,
    start_agent,
    stream_offsets,
    write_result,
)
from benchmarks.devices import DeviceFleet
from benchmarks.frontend import commit_of
from edge_agent.engine.model import KeywordSpec, KwsModel
from edge_agent.mqtt.client import MqttClient
from edge_agent.mqtt.transport import InboundMessage
from tests.broker import Broker

CHUNK_MS = 100
CHUNK_SAMPLES = 16000 * CHUNK_MS // 1000
KEYWORD = "小云小云"  # the agent's default keyword
DEVICE = "bench"
PREFIX = f"edge_agent/{DEVICE}"


Detected = set[tuple[str, float, float]]  # (stream, start, end), as the events carry them


def engine_detections(audio: np.ndarray, offsets: list[int], seconds: float) -> Detected:
    """What the engine finds in each stream, fed as the agent will be (``seconds`` of audio from
    the stream's offset, wrapping round, in 100 ms chunks, then the end of the stream): the
    detections the subscriber must receive. Streams starting at the same offset hear the same."""
    model = KwsModel.load(model_dir(), backend="numpy", threads=1)
    played = int(seconds * 1000 / CHUNK_MS) * CHUNK_SAMPLES
    per_offset: dict[int, list[tuple[float, float]]] = {}
    for offset in sorted(set(offsets)):
        stream = played_stream(audio, offset, played)
        detector = model.detector([KeywordSpec(KEYWORD)])
        found = [
            d for i in range(0, played, CHUNK_SAMPLES) for d in detector.feed(stream[i : i + CHUNK_SAMPLES])
        ]
        found += detector.finish()
        per_offset[offset] = [(round(d.start, 3), round(d.end, 3)) for d in found]
    return {(f"s{k}", start, end) for k, offset in enumerate(offsets) for start, end in per_offset[offset]}


class MachineShare:
    """How much of the machine each party of a round takes: CPU of the load generator (the
    devices' process), the broker and this process (the subscriber), next to the agent's; and
    each agent process's peak memory (its main process, its engine processes), sampled with
    :meth:`sample`, next to the kernel's high-water mark of its RSS. The figures are for a
    machine the parties share, often with others: the load average before the round says how
    busy it was."""

    def __init__(self, agent_pid: int, others: dict[str, int]) -> None:
        self.load_average = round(os.getloadavg()[0], 2)
        self._agent = psutil.Process(agent_pid)
        self._others = {name: psutil.Process(pid) for name, pid in others.items()}
        started = time.monotonic()
        # name -> (CPU seconds, when) at the first and the latest sample (a process may be gone at the end)
        self._first = {name: (_cpu_seconds(process), started) for name, process in self._others.items()}
        self._latest = dict(self._first)
        self.peak_memory: dict[str, dict[str, float]] = {}  # "main" / "engine N" -> peak RSS, PSS (MB)

    def sample(self) -> None:
        now = time.monotonic()
        for name, process in self._others.items():
            seconds = _cpu_seconds(process)
            if seconds is not None:
                self._latest[name] = (seconds, now)
        try:
            engines = self._agent.children()
        except psutil.Error:
            return
        for name, process in [("main", self._agent), *((f"engine {n}", c) for n, c in enumerate(engines))]:
            try:
                memory = process.memory_full_info()
            except psutil.Error:
                continue
            peak = self.peak_memory.setdefault(name, {"rss_mb": 0.0, "pss_mb": 0.0})
            peak["rss_mb"] = round(max(peak["rss_mb"], memory.rss / 1e6), 1)
            peak["pss_mb"] = round(max(peak["pss_mb"], getattr(memory, "pss", memory.rss) / 1e6), 1)
            high_water = _high_water_mb(process.pid)
            if high_water is not None:
                peak["high_water_rss_mb"] = high_water

    def cpu_percent(self) -> dict[str, float]:
        """CPU between the first and the latest sample (100 = one core), per party but the agent."""
        self.sample()
        used = {}
        for name, (first, first_at) in self._first.items():
            latest, latest_at = self._latest[name]
            if first is not None and latest is not None and latest_at > first_at:
                used[name] = round((latest - first) / (latest_at - first_at) * 100, 1)
        return used


def _high_water_mb(pid: int) -> float | None:
    """The process's peak RSS as the kernel counts it (``VmHWM``: every instant, not only the
    samples), where Linux gives it."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) * 1024 / 1e6, 1)
    except (OSError, ValueError):
        return None
    return None


def _cpu_seconds(process: psutil.Process) -> float | None:
    try:
        times = process.cpu_times()
    except psutil.Error:
        return None
    return float(times.user + times.system)


class Collector:
    def __init__(self, port: int) -> None:
        self.detections: list[tuple[float, dict[str, Any]]] = []
        self.health: dict[str, Any] = {}
        self.lock = threading.Lock()
        self.online = threading.Event()
        self.client = MqttClient("127.0.0.1", port, on_message=self._on_message).connect()
        self.client.subscribe(f"{PREFIX}/detection", f"{PREFIX}/availability", qos=1)
        self.client.subscribe(f"{PREFIX}/health", qos=0)

    def _on_message(self, message: InboundMessage) -> None:
        if message.topic.endswith("/detection"):
            with self.lock:
                self.detections.append((message.received_at, json.loads(message.payload)))
        elif message.topic.endswith("/health"):
            self.health = json.loads(message.payload)
        elif message.payload == b"online":
            self.online.set()

    def close(self) -> None:
        self.client.close()


def send_audio(
    port: int, offsets: list[int], audio: bytes, seconds: float, started: float, lags: Any
) -> None:
    """The N thin devices, in a process of their own, on one connection (:mod:`benchmarks.devices`).

    In the collector's process, 1000+ publishes a second would hold the GIL while detections
    arrive and the measured delay would include the benchmark's own contention. How late each
    round of chunks left (``lags``, ms) is reported, so a slow sender cannot pass for a slow agent.
    """
    fleet = DeviceFleet("127.0.0.1", port, "benchmark-devices")
    chunk = CHUNK_SAMPLES * 2  # bytes
    topics = [f"{PREFIX}/audio/s{stream}" for stream in range(len(offsets))]
    late = []
    for index in range(int(seconds * 1000 / CHUNK_MS)):
        due = started + (index + 1) * CHUNK_MS / 1000  # chunk k holds audio up to (k+1) * 100 ms
        if due > time.time():
            time.sleep(due - time.time())
        payloads: dict[int, bytes] = {}  # per distinct starting point
        for offset in offsets:
            if offset not in payloads:
                begin = (offset * 2 + index * chunk) % len(audio)
                payload = audio[begin : begin + chunk]
                payloads[offset] = payload + audio[: chunk - len(payload)]  # wrapping round
        fleet.publish_round(topics, [payloads[offset] for offset in offsets])
        late.append((time.time() - due) * 1000)
    fleet.publish_round([f"{topic}/control" for topic in topics], [b'{"action": "end"}'] * len(topics))
    fleet.close()
    lags.put(late)


def run_once(
    audio: bytes,
    offsets: list[int],
    total_seconds: float,
    expected: Detected,
    workdir: Path,
    broker_config: str = "",
    checkout: Path = REPO,
    agent_name: str = "this",
) -> dict[str, Any]:
    """One round: ``audio`` (s16le) played from ``offsets`` by as many streams, for
    ``total_seconds``, to the agent of ``checkout`` (``agent_name`` names its outbox);
    ``expected`` what must arrive (:func:`engine_detections`)."""
    streams = len(offsets)
    broker = Broker(workdir, extra_config=broker_config).start()
    agent = start_agent(
        broker.port,
        DEVICE,
        workdir / f"outbox-{streams}-{agent_name}.db",  # each agent its own, whatever its folder's name
        checkout=checkout,
        health__interval="2",
        audio__mqtt__max_streams=str(max(64, streams)),
    )
    collector = Collector(broker.port)
    try:
        if not collector.online.wait(60):
            raise SystemExit("agent did not come online")
        usage = AgentUsage(agent.pid)  # the agent and its engine worker processes
        started = time.time() + 0.5
        lags: multiprocessing.Queue[list[float]] = multiprocessing.Queue()
        sender = multiprocessing.Process(
            target=send_audio, args=(broker.port, offsets, audio, total_seconds, started, lags)
        )
        sender.start()
        assert sender.pid is not None and broker.process is not None
        share = MachineShare(
            agent.pid,
            {"load_generator": sender.pid, "broker": broker.process.pid, "subscriber": os.getpid()},
        )
        while sender.is_alive() and time.time() < started + total_seconds:
            usage.sample()
            share.sample()
            time.sleep(1.0)
        cpu = usage.cpu_percent()
        others_cpu = share.cpu_percent()
        sender_lags = lags.get(timeout=60)
        sender.join(30)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and len(collector.detections) < len(expected):
            time.sleep(0.1)
        time.sleep(2.5)  # a final health report
        health = collector.health
        usage.sample()  # memory after the streams ended (their last steps)
        share.sample()
    finally:
        agent.terminate()
        agent.wait(30)
        collector.close()
        broker.stop()

    delays, agent_delays, keys = [], [], set()
    received: Detected = set()
    duplicates = 0
    for arrived, event in collector.detections:
        key = (event["stream"], event["seq"])
        duplicates += key in keys
        keys.add(key)
        received.add((event["stream"], event["start"], event["end"]))
        delays.append((arrived - (started + event["end"])) * 1000)
        if isinstance(event.get("delay_ms"), (int, float)):
            agent_delays.append(float(event["delay_ms"]))
    refused = health.get("refused", {})
    dropped = sum(s.get("dropped_chunks", 0) for s in health.get("streams", {}).values())
    return {
        "streams": streams,
        "audio_seconds_per_stream": round(total_seconds, 1),
        "detections_expected": len(expected),
        "detections_received": len(collector.detections),
        "detections_missing": len(expected - received),
        "detections_unexpected": len(received - expected),
        "duplicates": duplicates,
        "delay_ms_p50": _round(percentile(delays, 50)),
        "delay_ms_p95": _round(percentile(delays, 95)),
        "delay_ms_p99": _round(percentile(delays, 99)),
        "delay_ms_max": _round(max(delays) if delays else None),
        "agent_delay_ms_p50": _round(percentile(agent_delays, 50)),
        "agent_delay_ms_p95": _round(percentile(agent_delays, 95)),
        "refused": refused,
        "dropped_chunks": dropped,
        "sender_lag_ms_p95": _round(percentile(sender_lags, 95)),
        "agent_processes": usage.processes,
        "agent_cpu_percent": cpu["total"],  # every process of the agent; 100 = one core
        "agent_cpu_percent_per_process": {pid: v for pid, v in cpu.items() if pid != "total"},
        "agent_peak_rss_mb": round(usage.peak_rss_mb, 1),  # summed over its processes
        "agent_peak_pss_mb": round(usage.peak_pss_mb, 1),
        "agent_peak_memory_per_process": share.peak_memory,
        # The rest of the machine's work in the round (100 = one core), and how busy it was before.
        "others_cpu_percent": others_cpu,
        "load_average_before": share.load_average,
        "engine_workers": health.get("worker", {}).get("workers"),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", default="1", help="comma-separated stream counts")
    parser.add_argument("--seconds", type=float, default=60.0, help="audio per stream (max ~250)")
    parser.add_argument("--rounds", type=int, default=1, help="runs per stream count (median p95 reported)")
    parser.add_argument(
        "--broker-nodelay",
        action="store_true",
        help="mosquitto with set_tcp_nodelay true (default: mosquitto's own defaults)",
    )
    parser.add_argument(
        "--stagger",
        action="store_true",
        help="streams start at different recordings (default: all say the keyword at once)",
    )
    parser.add_argument(
        "--against",
        type=Path,
        default=None,
        help="another checkout whose agent runs in the same rounds (a worktree of another commit)",
    )
    args = parser.parse_args()
    if args.against is not None and not (args.against / "edge_agent" / "__main__.py").is_file():
        raise SystemExit(f"--against {args.against}: no edge_agent package there")
    broker_config = f"{BROKER_NODELAY}\n" if args.broker_nodelay else ""
    results = []
    samples, starts = positives_back_to_back()
    audio = samples.astype("<i2").tobytes()  # what the devices send: s16le
    total_seconds = min(args.seconds, samples.shape[0] / 16000)
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        for count in (int(n) for n in args.streams.split(",")):
            offsets = stream_offsets(count, starts, args.stagger)
            expected = engine_detections(samples, offsets, total_seconds)  # the same every round
            agents = {"this": REPO} if args.against is None else {"this": REPO, "against": args.against}
            played: dict[str, list[dict[str, Any]]] = {name: [] for name in agents}
            for index in range(args.rounds):
                # The order alternates: a drift of the machine's speed favours neither.
                for name in list(agents) if index % 2 == 0 else list(agents)[::-1]:
                    found = run_once(
                        audio, offsets, total_seconds, expected, workdir, broker_config, agents[name], name
                    )
                    played[name].append(found)
                    print(json.dumps({"agent": name, **found}, ensure_ascii=False), flush=True)
            if args.against is None:
                results.append(summarise(played["this"]))
            else:
                results.append(compare(played["this"], played["against"]))
    report = {
        "benchmark": "mqtt_latency",
        "machine": machine(),
        "chunk_ms": CHUNK_MS,
        "broker": f"mosquitto, {BROKER_NODELAY if args.broker_nodelay else 'default settings'}",
        "streams_start": "at different recordings" if args.stagger else "together",
        "results": results,
    }
    name = "mqtt_latency" + ("-nodelay" if args.broker_nodelay else "") + ("-stagger" if args.stagger else "")
    if args.against is not None:
        report["against"] = str(args.against)
        report["against_commit"] = commit_of(args.against)
        name += "-against"
    path = write_result(name, report)
    print(f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores")
    header = (
        "streams",
        "expected",
        "received",
        "missing",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "agent p95",
        "dropped",
        "CPU %",
        "RSS MB",
        "PSS MB",
    )
    if args.against is not None:
        header = ("agent", *header)
    print(" ".join(f"{h:>9}" for h in header), " p95 of every round")
    labelled = [("", r) for r in results]
    if args.against is not None:
        labelled = [(name, r[name]) for r in results for name in ("this", "against")]
    for label, r in labelled:
        row = (
            r["streams"],
            r["detections_expected"],
            r["detections_received"],
            r["worst_round_detections_missing"],
            r["delay_ms_p50"],
            r["delay_ms_p95"],
            r["delay_ms_p99"],
            r["agent_delay_ms_p95"],
            r["dropped_chunks"] + sum(r["refused"].values()),
            r["agent_cpu_percent"],
            r["agent_peak_rss_mb"],
            r["agent_peak_pss_mb"],
        )
        cells = " ".join(f"{value:>9.0f}" if value is not None else f"{'-':>9}" for value in row)
        if label:
            cells = f"{label:>9} {cells}"
        print(cells, " ", ", ".join(f"{p:.0f}" for p in r["rounds_delay_ms_p95"] if p is not None))
    for r in results if args.against is not None else []:
        ratios = r["rounds_p95_vs_against"]
        print(f"{r['streams']} streams, this agent's p95 over the other's, per round: {ratios}")
    print(f"written: {path}")


def compare(this: list[dict[str, Any]], against: list[dict[str, Any]]) -> dict[str, Any]:
    """Two agents' rounds of one N, taken in turn: each one's summary, and per round this
    agent's p95 and p50 over the other's (None where either received nothing)."""

    def ratios(key: str) -> list[float | None]:
        return [
            round(a[key] / b[key], 3) if a[key] is not None and b[key] else None
            for a, b in zip(this, against, strict=True)
        ]

    return {
        "streams": this[0]["streams"],
        "this": summarise(this),
        "against": summarise(against),
        "rounds_p95_vs_against": ratios("delay_ms_p95"),
        "rounds_p50_vs_against": ratios("delay_ms_p50"),
    }


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median p95, with every round's p95 and the worst drops and losses."""
    ordered = sorted(rounds, key=lambda r: (r["delay_ms_p95"] is None, r["delay_ms_p95"] or 0.0))
    row = dict(ordered[(len(ordered) - 1) // 2])
    row["rounds"] = len(rounds)
    row["rounds_delay_ms_p95"] = [r["delay_ms_p95"] for r in rounds]
    row["worst_round_dropped_chunks"] = max(r["dropped_chunks"] for r in rounds)
    row["worst_round_detections_missing"] = max(r["detections_missing"] for r in rounds)
    return row


if __name__ == "__main__":
    main()

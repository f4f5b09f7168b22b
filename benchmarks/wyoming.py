"""The Wyoming server under N concurrent real-time clients, next to wyoming-openwakeword.

    python -m benchmarks.wyoming [--clients 1,8,32,128] [--seconds 30]
                                 [--audio keywords|conversation]
                                 [--openwakeword-python PATH] [--batch-ms 100]
                                 [--event-loop auto|uvloop|asyncio] [--rounds 1] [--against DIR]

For each N, the agent runs as ``edge-agent wyoming`` (its own process, MQTT off, no mDNS; its
event loop ``wyoming.event_loop``: uvloop where installed unless ``--event-loop asyncio``) and N
clients stream to it from another process as Home Assistant does: ``detect`` with the keyword's
name, ``audio-start`` at 16 kHz 16-bit mono, then 10 ms ``audio-chunk``s paced in real time on
an absolute schedule, reading events as they come. With ``--audio keywords`` (the default) each
client plays the 25 positive recordings of audio/dev back to back (0.5 s of silence between
them), client k starting at recording k mod 25, so keywords are spread over time as independent
satellites would say them: the keyword about every 3 s, the decoder's busiest case. With
``--audio conversation`` each plays the 33 recordings of other Mandarin speech with the keyword
after every third (``benchmarks.common.conversation``), client k starting at recording k mod 44:
a room where people talk and say the keyword now and then (openWakeWord's work does not depend
on what it hears; ours does).
Meanwhile one more client asks ``describe`` every half second (Home Assistant allows 1 s).

delay = arrival of a ``detection`` at the client - the wall time its stream started - the
detection's timestamp (the keyword's end in the client's own chunk timestamps): from the moment
the keyword's end was spoken, with the 10 ms chunking, the model's look-ahead (~0.29 s), the
server's batching (``wyoming.batch_ms``) and the engine.

The same clients then stream the same audio to wyoming-openwakeword 1.8.2 with one model
(``ok_nabu``, asked for in ``detect``), started from ``--openwakeword-python`` (the Python of a
virtual environment where ``pip install wyoming-openwakeword==1.8.2 'numpy<2'`` was run); it
does not know Chinese, so only its CPU is compared. CPU is each server process's CPU time over
the middle of the run (after the clients' start, before their end) divided by the wall time,
in percent of one core (``cpu_percent``, the ratio's); ``cpu_percent_all_audio`` is the CPU
from the clients' start until the server is idle again after they leave, per second of audio:
the same figure for a server that keeps up, higher (and ``drain_seconds`` above 0) for one that
fell behind and worked through its sockets' backlog after the window. RSS is the peak sampled.
A row whose clients fell behind their schedule (sender lag p95 over 50 ms: the machine's other
work starved the load generator) is marked ``clients_kept_real_time: false`` and is not to be
quoted. With ``--rounds R`` each N is run R times, ours and theirs in turn: the row is the round
with the median CPU ratio, next to every round's ratio. ``threads_cpu_percent`` is the agent's
busiest threads' CPU over the same window, busiest first (the engine worker's, then the Wyoming
server's event loop). Results: benchmarks/results/wyoming.json.

``--against DIR`` also runs the agent of another checkout (a worktree of the commit to compare
with) in every round, right after this one's, with the same clients: on a machine whose speed
drifts, ``cpu_vs_against`` (this agent's CPU over the other's, per round) is the figure to
compare, not two separate runs.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from benchmarks.common import (
    REPO,
    conversation,
    machine,
    model_dir,
    percentile,
    played_stream,
    positives_back_to_back,
    stream_offsets,
    write_result,
)
from benchmarks.frontend import commit_of
from edge_agent.engine.model import KeywordSpec, KwsModel

CHUNK_MS = 10
CHUNK_BYTES = 16000 * 2 * CHUNK_MS // 1000
KEYWORD = "小云小云"
OPENWAKEWORD_MODEL = "ok_nabu"
DESCRIBE_EVERY_SECONDS = 0.5
# A client waits for its socket to drain beyond this much unsent data.
WRITE_BUFFER_BYTES = 64 * 1024
# CPU is measured between these fractions of the run (clients connecting and leaving excluded).
MEASURE_FROM, MEASURE_TO = 0.15, 0.9
# The clients are real time only if their chunks go out on schedule: beyond this lag (p95) the
# load generator itself fell behind (other work on a shared machine), and the run does not count.
MAX_SENDER_LAG_MS = 50.0
# After the clients leave, a server is idle again once it uses less than this share of a core
# (sampled every IDLE_SAMPLE_SECONDS, for at most MAX_DRAIN_SECONDS): a server that fell behind
# real time is still working through its sockets' backlog, and that work is counted too.
IDLE_CPU_SHARE = 0.05
IDLE_SAMPLE_SECONDS = 0.5
MAX_DRAIN_SECONDS = 60.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- the clients (a process of their own) ----------------------------------------------------------


async def _reader(reader: asyncio.StreamReader, start_at: float, results: dict[str, Any]) -> None:
    from wyoming.event import async_read_event
    from wyoming.wake import Detection

    while (event := await async_read_event(reader)) is not None:
        if Detection.is_type(event.type):
            detection = Detection.from_event(event)
            results["detections"] += 1
            if detection.timestamp is not None:
                results["delays"].append(time.time() - start_at - detection.timestamp / 1000)
        else:
            results["other_events"][event.type] = results["other_events"].get(event.type, 0) + 1


def chunk_header(index: int, audio_bytes: int) -> bytes:
    """The ``audio-chunk`` event of chunk ``index`` as the ``wyoming`` package frames it, without
    its payload: the same for every client (same format, timestamp and length), so it is framed
    once per chunk instead of once per client and chunk."""
    from wyoming.audio import AudioChunk
    from wyoming.event import write_event

    framed = io.BytesIO()
    chunk = AudioChunk(rate=16000, width=2, channels=1, audio=bytes(audio_bytes), timestamp=index * CHUNK_MS)
    write_event(chunk.event(), framed)
    return framed.getvalue()[:-audio_bytes]


async def _clients(
    port: int, streams: list[bytes], name: str, start_at: float, results: dict[str, Any]
) -> None:
    """Every client connects and says what it sends; then one clock sends each client's next
    10 ms chunk every 10 ms (one timer for all, each chunk's event framed once by the
    ``wyoming`` package for every client: the load generator must keep up with 128 clients on a
    small machine). Home Assistant never sends audio-stop: the clients close at the end."""
    from wyoming.audio import AudioStart
    from wyoming.event import async_write_event
    from wyoming.wake import Detect

    connections = [await asyncio.open_connection("127.0.0.1", port) for _ in streams]
    for _, writer in connections:
        await async_write_event(Detect(names=[name]).event(), writer)
        await async_write_event(AudioStart(rate=16000, width=2, channels=1).event(), writer)
    loop = asyncio.get_running_loop()
    readers = [loop.create_task(_reader(reader, start_at, results)) for reader, _ in connections]
    writers = [writer for _, writer in connections]
    lags: list[float] = results["lags"]
    for index, offset in enumerate(range(0, len(streams[0]), CHUNK_BYTES)):
        delay = start_at + index * CHUNK_MS / 1000 - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            lags.append(-delay)
        header = chunk_header(index, len(streams[0][offset : offset + CHUNK_BYTES]))
        for writer, pcm in zip(writers, streams, strict=True):
            writer.write(header + pcm[offset : offset + CHUNK_BYTES])
        for writer in writers:
            if writer.transport.get_write_buffer_size() > WRITE_BUFFER_BYTES:
                await writer.drain()  # a server that stops reading holds this client back
    for reader in readers:
        reader.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    for writer in writers:
        writer.close()


async def _describer(port: int, until: float, latencies: list[float]) -> None:
    from wyoming.client import AsyncTcpClient
    from wyoming.info import Describe, Info

    while time.time() < until:
        asked = time.perf_counter()
        async with AsyncTcpClient("127.0.0.1", port) as client:
            await client.write_event(Describe().event())
            while (event := await client.read_event()) is not None and not Info.is_type(event.type):
                pass
        latencies.append(time.perf_counter() - asked)
        await asyncio.sleep(DESCRIBE_EVERY_SECONDS)


async def _load(port: int, streams: list[bytes], name: str, start_at: float) -> dict[str, Any]:
    results: dict[str, Any] = {"delays": [], "lags": [], "detections": 0, "other_events": {}}
    describe: list[float] = []
    seconds = len(streams[0]) / 32000
    outcomes = await asyncio.gather(
        _clients(port, streams, name, start_at, results),
        _describer(port, start_at + seconds, describe),
        return_exceptions=True,
    )
    results["client_errors"] = [repr(o) for o in outcomes if isinstance(o, BaseException)]
    results["describe"] = describe
    return results


def _load_process(port: int, streams: list[bytes], name: str, start_at: float, queue: Any) -> None:
    queue.put(asyncio.run(_load(port, streams, name, start_at)))


# --- the servers -----------------------------------------------------------------------------------


def start_ours(
    port: int, clients: int, batch_ms: int, event_loop: str, checkout: Path = REPO
) -> subprocess.Popen[Any]:
    """The agent of ``checkout`` (its own ``edge_agent`` package: the working directory comes
    first on ``python -m``'s path)."""
    env = {
        **os.environ,
        "EDGE_AGENT_AUDIO__MQTT__MAX_STREAMS": str(max(64, clients)),
        "EDGE_AGENT_WYOMING__MAX_CONNECTIONS": str(max(256, 2 * clients)),
        "EDGE_AGENT_WYOMING__BATCH_MS": str(batch_ms),
        "EDGE_AGENT_WYOMING__EVENT_LOOP": event_loop,
        "EDGE_AGENT_OUTBOX__PATH": str(Path(tempfile.mkdtemp()) / "outbox.db"),
    }
    command = [sys.executable, "-m", "edge_agent", "wyoming", "--model-dir", str(model_dir())]
    command += ["--wyoming-host", "127.0.0.1", "--wyoming-port", str(port), "--no-zeroconf"]
    return subprocess.Popen([*command, "--log-level", "warning"], cwd=checkout, env=env)


def start_openwakeword(python: str, port: int) -> subprocess.Popen[Any]:
    command = [python, "-m", "wyoming_openwakeword", "--uri", f"tcp://127.0.0.1:{port}"]
    return subprocess.Popen([*command, "--preload-model", OPENWAKEWORD_MODEL], stderr=subprocess.DEVNULL)


def wait_serving(port: int, process: subprocess.Popen[Any], timeout: float = 120.0) -> None:
    """Until ``describe`` is answered."""
    from wyoming.client import AsyncTcpClient
    from wyoming.info import Describe

    async def ask() -> bool:
        try:
            async with AsyncTcpClient("127.0.0.1", port) as client:
                await client.write_event(Describe().event())
                return await asyncio.wait_for(client.read_event(), 5) is not None
        except OSError:
            return False

    deadline = time.monotonic() + timeout
    while not asyncio.run(ask()):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"server on port {port} did not start")
        time.sleep(0.2)


def measure(process: subprocess.Popen[Any], streams: list[bytes], name: str, port: int) -> dict[str, Any]:
    """The clients against one server; its CPU and RSS meanwhile."""
    seconds = len(streams[0]) / 32000
    start_at = time.time() + 1.0 + len(streams) * 0.005  # every client connected before it
    queue: Any = multiprocessing.get_context("spawn").Queue()
    load = multiprocessing.get_context("spawn").Process(
        target=_load_process, args=(port, streams, name, start_at, queue)
    )
    load.start()
    server = psutil.Process(process.pid)
    children = [server, *server.children(recursive=True)]
    peak_rss = 0.0
    cpu_start = cpu_end = streaming_start = None
    threads_start: dict[int, float] = {}
    threads_end: dict[int, float] = {}
    measure_from = start_at + MEASURE_FROM * seconds
    measure_to = start_at + MEASURE_TO * seconds
    while time.time() < start_at + seconds:
        now = time.time()
        peak_rss = max(peak_rss, sum(p.memory_info().rss for p in children) / 1e6)
        if streaming_start is None and now >= start_at:
            streaming_start = sum(sum(p.cpu_times()[:2]) for p in children)
        if cpu_start is None and now >= measure_from:
            cpu_start = (now, sum(sum(p.cpu_times()[:2]) for p in children))
            threads_start = _thread_times(server)
        if cpu_end is None and now >= measure_to:
            cpu_end = (now, sum(sum(p.cpu_times()[:2]) for p in children))
            threads_end = _thread_times(server)
        time.sleep(0.1)
    results = queue.get(timeout=seconds + 120)
    load.join(30)
    streaming_end = time.time()
    cpu_idle, idle_at = _until_idle(children)
    assert cpu_start is not None and cpu_end is not None and streaming_start is not None
    window = cpu_end[0] - cpu_start[0]
    cpu = 100.0 * (cpu_end[1] - cpu_start[1]) / window
    threads = sorted(
        (100.0 * (spent - threads_start.get(thread, 0.0)) / window for thread, spent in threads_end.items()),
        reverse=True,
    )
    delays = [d * 1000 for d in results["delays"]]
    describe = [d * 1000 for d in results["describe"]]
    return {
        "cpu_percent": round(cpu, 1),
        "threads_cpu_percent": [round(share, 1) for share in threads[:3]],
        # All the CPU the stream cost, backlog included, per second of audio; and how long the
        # server went on working after the clients left (about 0: it kept up with real time).
        "cpu_percent_all_audio": round(100.0 * (cpu_idle - streaming_start) / seconds, 1),
        "drain_seconds": round(max(0.0, idle_at - streaming_end), 1),
        "peak_rss_mb": round(peak_rss, 1),
        "detections": results["detections"],
        "other_events": results["other_events"],
        "client_errors": results["client_errors"][:5],
        "delay_ms_p50": _round(percentile(delays, 50)),
        "delay_ms_p95": _round(percentile(delays, 95)),
        "delay_ms_max": _round(max(delays) if delays else None),
        "describe_ms_p95": _round(percentile(describe, 95)),
        "describe_ms_max": _round(max(describe) if describe else None),
        "describes": len(describe),
        "sender_lag_ms_p95": _round(percentile([lag * 1000 for lag in results["lags"]], 95) or 0.0),
    }


def _thread_times(process: psutil.Process) -> dict[int, float]:
    """CPU seconds of each thread of ``process`` (user and system)."""
    return {thread.id: thread.user_time + thread.system_time for thread in process.threads()}


def _until_idle(processes: list[psutil.Process]) -> tuple[float, float]:
    """The processes' CPU time once they are idle again, and the wall time they were."""
    deadline = time.time() + MAX_DRAIN_SECONDS
    before = sum(sum(p.cpu_times()[:2]) for p in processes)
    while True:
        time.sleep(IDLE_SAMPLE_SECONDS)
        now, cpu = time.time(), sum(sum(p.cpu_times()[:2]) for p in processes)
        if cpu - before < IDLE_CPU_SHARE * IDLE_SAMPLE_SECONDS or now > deadline:
            return before, now - IDLE_SAMPLE_SECONDS
        before = cpu


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def stop(process: subprocess.Popen[Any]) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def expected_detections(audio: Any, offsets: list[int], samples: int) -> int:
    """What the engine finds in every client's audio fed in 100 ms pieces, without the end of
    the stream (clients close as Home Assistant does; a keyword at the very end can fire after
    that, and goes nowhere): the detections the clients should receive."""
    model = KwsModel.load(model_dir(), backend="numpy", threads=1)
    step = 1600
    per_offset = {}
    for offset in sorted(set(offsets)):
        stream = played_stream(audio, offset, samples)
        detector = model.detector([KeywordSpec(KEYWORD)])
        per_offset[offset] = sum(len(detector.feed(stream[i : i + step])) for i in range(0, samples, step))
    return sum(per_offset[offset] for offset in offsets)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", default="1,8,32,128", help="numbers of concurrent clients")
    parser.add_argument("--seconds", type=float, default=30.0, help="audio each client streams")
    parser.add_argument(
        "--audio",
        choices=["keywords", "conversation"],
        default="keywords",
        help="what the clients play: the keyword back to back, or other speech with the keyword now and then",
    )
    parser.add_argument("--batch-ms", type=int, default=100, help="the agent's wyoming.batch_ms")
    parser.add_argument(
        "--event-loop",
        choices=["auto", "uvloop", "asyncio"],
        default="auto",
        help="the agent's wyoming.event_loop (auto: uvloop where installed)",
    )
    parser.add_argument(
        "--openwakeword-python",
        default=os.environ.get("OPENWAKEWORD_PYTHON"),
        help="Python of a venv with wyoming-openwakeword 1.8.2 (none: ours only)",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="runs per client count, alternating (median ratio reported)"
    )
    parser.add_argument(
        "--against",
        type=Path,
        default=None,
        help="another checkout whose agent also runs in every round, right after this one's (A/B)",
    )
    parser.add_argument("--name", default="wyoming", help="results file name (benchmarks/results/NAME.json)")
    args = parser.parse_args()
    audio, starts = conversation() if args.audio == "conversation" else positives_back_to_back()
    samples = int(args.seconds * 16000)
    rows = []
    for clients in [int(n) for n in args.clients.split(",")]:
        offsets = stream_offsets(clients, starts, stagger=True)
        streams = [played_stream(audio, offset, samples).astype("<i2").tobytes() for offset in offsets]
        row: dict[str, Any] = {
            "clients": clients,
            # Other work on a shared machine takes CPU from both the servers and the clients.
            "load_average_1min_before": round(os.getloadavg()[0], 2),
            "detections_expected": expected_detections(audio, offsets, samples),
        }
        rounds = [_one_round(args, clients, streams) for _ in range(args.rounds)]
        # The round with the median ratio (or CPU, with neither openWakeWord nor --against): one
        # run on a shared VM moves by a good fraction, and one lucky round proves little.
        ordered = sorted(rounds, key=_round_figure)
        row.update(ordered[(len(ordered) - 1) // 2])
        if args.openwakeword_python:
            row["rounds_cpu_ratio"] = [r["cpu_ratio"] for r in rounds]
        if args.against is not None:
            row["rounds_cpu_vs_against"] = [r["cpu_vs_against"] for r in rounds]
        row["clients_kept_real_time"] = all(
            row[server]["sender_lag_ms_p95"] <= MAX_SENDER_LAG_MS
            for server in ("edge_agent", "against", "openwakeword")
            if server in row
        )
        rows.append(row)
        print(_summary(row), flush=True)
    report = {
        "benchmark": "wyoming",
        "machine": machine(),
        "settings": {
            "seconds": args.seconds,
            "chunk_ms": CHUNK_MS,
            "audio": args.audio,
            "batch_ms": args.batch_ms,
            "rounds": args.rounds,
            "event_loop": _event_loop(args.event_loop),
            "keyword": KEYWORD,
            "openwakeword": "wyoming-openwakeword 1.8.2, --preload-model ok_nabu"
            if args.openwakeword_python
            else None,
            "against": str(args.against) if args.against is not None else None,
            "against_commit": commit_of(args.against) if args.against is not None else None,
        },
        "rows": rows,
    }
    print(f"results: {write_result(args.name, report)}")


def _one_round(args: argparse.Namespace, clients: int, streams: list[bytes]) -> dict[str, Any]:
    """Our server, then openWakeWord's if asked, each on a fresh port with the same clients."""
    result: dict[str, Any] = {}
    checkouts = [("edge_agent", REPO)]
    if args.against is not None:
        checkouts.append(("against", args.against))
    for name, checkout in checkouts:
        port = free_port()
        agent = start_ours(port, clients, args.batch_ms, args.event_loop, checkout)
        try:
            wait_serving(port, agent)
            result[name] = measure(agent, streams, KEYWORD, port)
        finally:
            stop(agent)
    if args.against is not None:
        ours_cpu, other_cpu = result["edge_agent"]["cpu_percent"], result["against"]["cpu_percent"]
        result["cpu_vs_against"] = round(ours_cpu / other_cpu, 3) if other_cpu else None
    if args.openwakeword_python:
        port = free_port()
        theirs = start_openwakeword(args.openwakeword_python, port)
        try:
            wait_serving(port, theirs)
            result["openwakeword"] = measure(theirs, streams, OPENWAKEWORD_MODEL, port)
        finally:
            stop(theirs)
        ours_cpu, their_cpu = result["edge_agent"]["cpu_percent"], result["openwakeword"]["cpu_percent"]
        result["cpu_ratio"] = round(ours_cpu / their_cpu, 4) if their_cpu else None
    return result


def _round_figure(result: dict[str, Any]) -> float:
    """What a round is ranked by: the ratio to openWakeWord, else to the other checkout, else CPU."""
    for ratio in (result.get("cpu_ratio"), result.get("cpu_vs_against")):
        if ratio is not None:
            return float(ratio)
    return float(result["edge_agent"]["cpu_percent"])


def _event_loop(choice: str) -> str:
    """The loop the agent runs with ``wyoming.event_loop`` = ``choice``, and its version."""
    if choice == "asyncio":
        return "asyncio"
    try:
        import uvloop
    except ImportError:
        return "asyncio (uvloop not installed)"
    return f"uvloop {uvloop.__version__}"


def _summary(row: dict[str, Any]) -> str:
    ours = row["edge_agent"]
    text = (
        f"{row['clients']:>4} clients: detections {ours['detections']}/{row['detections_expected']}, "
        f"delay p50 {ours['delay_ms_p50']} p95 {ours['delay_ms_p95']} ms, "
        f"describe p95 {ours['describe_ms_p95']} ms, CPU {ours['cpu_percent']}% "
        f"(threads {ours['threads_cpu_percent']}) "
        f"(all audio {ours['cpu_percent_all_audio']}%, drain {ours['drain_seconds']} s), "
        f"RSS {ours['peak_rss_mb']} MB, sender lag p95 {ours['sender_lag_ms_p95']} ms"
    )
    if "against" in row:
        other = row["against"]
        text += (
            f"; --against CPU {other['cpu_percent']}% (threads {other['threads_cpu_percent']}), "
            f"this / that per round {row['rounds_cpu_vs_against']}"
        )
    if "openwakeword" in row:
        theirs = row["openwakeword"]
        text += (
            f"; openWakeWord CPU {theirs['cpu_percent']}% (all audio {theirs['cpu_percent_all_audio']}%, "
            f"drain {theirs['drain_seconds']} s), RSS {theirs['peak_rss_mb']} MB, "
            f"ratio {row['cpu_ratio']}"
        )
    if not row["clients_kept_real_time"]:
        text += f" [NOT VALID: the clients fell behind real time by more than {MAX_SENDER_LAG_MS:g} ms]"
    return text


if __name__ == "__main__":
    main()

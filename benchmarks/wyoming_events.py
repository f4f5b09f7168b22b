"""CPU per ``audio-chunk`` event of the Wyoming server's read path, in one process.

    python -m benchmarks.wyoming_events [--rounds 5] [--events 30000] [--against DIR]

A real connection (``edge_agent.wyoming.connection``: its ``ClientStream`` on one end of a
socket pair, its ``Connection`` task on uvloop's loop, or asyncio's where uvloop is missing) is
handed, tick after tick, the bytes a Home Assistant client sends in 100 ms: ten 10 ms
``audio-chunk`` events framed by the ``wyoming`` package, as its transport would hand them over
after one socket read; then the server's tick hands the audio over (``flush``, to an ingest
that takes it and drops it). The figure is CPU time per event (``time.process_time``, the best
of ``--rounds``): reading and parsing each event with the ``wyoming`` package, holding its
audio, and the hand-over; not the socket reads themselves, the engine or other clients. Next
to it, ``read_event_us``: the ``wyoming`` package's own ``read_event`` over the same bytes from an
``io.BytesIO``, the part of the figure that no server built on the package can avoid.

``--against DIR`` measures another checkout's connection module the same way, alternating
rounds with this one's in the same run (each in a process of its own, whose ``edge_agent`` is
that checkout's). Results: benchmarks/results/wyoming_events.json. In the full server under
load, ``python -m benchmarks.wyoming`` (its ``threads_cpu_percent``) is the figure to trust; this
one isolates the per-event work from the engine and the machine's other load.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parent.parent
EVENTS_PER_TICK = 10  # 10 ms chunks, 100 ms ticks (wyoming.batch_ms)
CHUNK_BYTES = 320  # 10 ms of 16 kHz 16-bit mono


def tick_bytes() -> bytes:
    """One tick of a Home Assistant client: ten audio-chunk events, as the package frames them."""
    from wyoming.audio import AudioChunk
    from wyoming.event import write_event

    framed = io.BytesIO()
    for index in range(EVENTS_PER_TICK):
        audio = bytes((index + k) % 251 for k in range(CHUNK_BYTES))
        chunk = AudioChunk(rate=16000, width=2, channels=1, audio=audio, timestamp=index * 10)
        write_event(chunk.event(), framed)
    return framed.getvalue()


class _Server:
    """What a connection needs of its server; audio handed over is taken and dropped."""

    batch_ms = 100
    max_event_bytes = 1 << 20

    def __init__(self) -> None:
        self.handed_over = 0
        self.services = SimpleNamespace(ingest=self._ingest, report_error=self._error, keywords=[])

    def _ingest(self, item: Any) -> bool:
        self.handed_over += len(getattr(item, "data", b""))  # chunks; the stream's start and end carry none
        return True

    def _error(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"the connection reported an error: {args} {kwargs}")

    def open_stream(self, connection: Any, session: Any) -> str:
        return "wyoming-bench-1"

    def release_stream(self, session: Any, keep_routing: bool) -> None:
        pass

    def count_bad_event(self) -> None:
        raise RuntimeError("a bad event")


async def _per_event_us(ticks: int, rounds: int) -> list[float]:
    from wyoming.audio import AudioStart
    from wyoming.event import write_event

    from edge_agent.wyoming.connection import ClientStream, Connection

    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    streams: list[Any] = []
    await loop.connect_accepted_socket(lambda: ClientStream(1 << 20, streams.append), ours)
    stream = streams[0]
    server = _Server()
    connection = Connection(server, 1, stream, stream.writer)  # type: ignore[arg-type]
    task = loop.create_task(connection.run())
    start = io.BytesIO()
    write_event(AudioStart(rate=16000, width=2, channels=1).event(), start)
    tick = tick_bytes()

    async def one_tick() -> None:
        stream.release()
        stream.data_received(tick)
        await asyncio.sleep(0)  # the connection's task, if the bytes woke it
        connection.flush()

    await asyncio.sleep(0)
    stream.data_received(start.getvalue())
    for _ in range(3):
        await one_tick()
    results = []
    for _ in range(rounds):
        began = time.process_time()
        for _ in range(ticks):
            await one_tick()
        results.append((time.process_time() - began) / (ticks * EVENTS_PER_TICK) * 1e6)
    if server.handed_over < rounds * ticks * EVENTS_PER_TICK * CHUNK_BYTES:
        raise RuntimeError("the connection did not hand every chunk's audio over")
    connection.close()
    await task
    theirs.close()
    return results


def _read_event_us(ticks: int, rounds: int) -> list[float]:
    from wyoming.event import read_event

    tick = tick_bytes()
    results = []
    for _ in range(rounds):
        began = time.process_time()
        for _ in range(ticks):
            reader = io.BytesIO(tick)
            for _ in range(EVENTS_PER_TICK):
                read_event(reader)
        results.append((time.process_time() - began) / (ticks * EVENTS_PER_TICK) * 1e6)
    return results


def measure(events: int, rounds: int) -> dict[str, list[float]]:
    """This process's figures (its ``edge_agent`` is whichever comes first on its path)."""
    try:
        import uvloop

        new_loop = uvloop.new_event_loop
    except ImportError:
        new_loop = asyncio.new_event_loop
    ticks = max(1, events // EVENTS_PER_TICK)
    loop = new_loop()
    try:
        server_us = loop.run_until_complete(_per_event_us(ticks, rounds))
    finally:
        loop.close()
    return {"server_us": server_us, "read_event_us": _read_event_us(ticks, rounds)}


def _in_checkout(checkout: Path, events: int) -> dict[str, list[float]]:
    """One round of ``measure`` in a process whose ``edge_agent`` is ``checkout``'s."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    command = [sys.executable, __file__, "--measure", "--events", str(events)]
    output = subprocess.run(command, env=env, cwd=checkout, capture_output=True, text=True, check=True)
    return json.loads(output.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds per checkout (best of them reported)")
    parser.add_argument("--events", type=int, default=30000, help="events per round")
    parser.add_argument("--against", type=Path, default=None, help="another checkout, measured in turn")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # one round, JSON out
    args = parser.parse_args()
    if args.measure:
        # Run as a file, in the other checkout: this directory (whose wyoming.py would hide the
        # package) leaves the path; that checkout's edge_agent comes from PYTHONPATH.
        here = str(Path(__file__).resolve().parent)
        sys.path[:] = [entry for entry in sys.path if entry != here]
        print(json.dumps(measure(args.events, 1)))
        return
    sys.path.insert(0, str(REPO))
    from benchmarks.common import machine, write_result
    from benchmarks.frontend import commit_of

    checkouts = {"this": REPO}
    if args.against is not None:
        checkouts["against"] = args.against.resolve()
    runs: dict[str, dict[str, list[float]]] = {name: {} for name in checkouts}
    for _ in range(args.rounds):
        for name, checkout in checkouts.items():
            for key, values in _in_checkout(checkout, args.events).items():
                runs[name].setdefault(key, []).extend(values)
    report: dict[str, Any] = {
        "benchmark": "wyoming_events",
        "machine": machine(),
        "settings": {"events": args.events, "rounds": args.rounds, "events_per_tick": EVENTS_PER_TICK},
        "against": str(args.against) if args.against else None,
        "against_commit": commit_of(args.against) if args.against else None,
    }
    for name, figures in runs.items():
        report[name] = {
            key: {"best": round(min(values), 2), "median": round(statistics.median(values), 2)}
            for key, values in figures.items()
        }
        print(
            f"{name}: {report[name]['server_us']['best']} µs per event in the server "
            f"(median {report[name]['server_us']['median']}); the package's read_event alone "
            f"{report[name]['read_event_us']['best']} µs"
        )
    if "against" in runs:
        ratio = report["this"]["server_us"]["best"] / report["against"]["server_us"]["best"]
        report["ratio_best"] = round(ratio, 3)
        print(f"this / against: {report['ratio_best']}")
    print(f"results: {write_result('wyoming_events', report)}")


if __name__ == "__main__":
    main()

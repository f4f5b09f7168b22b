"""The detection sink: one typed event per detection, numbered and stored together, handed to
the wire, then announced; the worker's wait ends once its batch is handed over."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edge_agent.agent.delivery import Delivery
from edge_agent.agent.errors import ErrorReporter
from edge_agent.agent.items import Detected, StreamClosed
from edge_agent.agent.outbox import Outbox, StoredEvent
from edge_agent.agent.sink import DetectionSink
from edge_agent.engine.decoder import Detection
from edge_agent.mqtt.messages import DetectionEvent, parse_iso_utc

TOPIC = "edge_agent/dev1/detection"


class Wire:
    """Stands in for the broker connection: records each event as it would go out."""

    def __init__(self) -> None:
        self.sent: list[DetectionEvent] = []
        self.connected = threading.Event()
        self.connected.set()

    def publish(self, stored: StoredEvent, replayed: bool) -> int:
        self.sent.append(DetectionEvent.from_stored(stored.body, stored.seq, stored.created, replayed))
        return len(self.sent)


def found(stream: str, keyword: str = "小云小云", end: float = 2.5) -> Detected:
    return Detected(stream, "mqtt", Detection(keyword, 0.9, end - 1.0, end), wall_end=1_700_000_000.0 + end)


@pytest.fixture()
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    store = Outbox(tmp_path / "o.db")
    yield store
    store.close()


def make_sink(outbox: Outbox | None, wire: Wire | None, window: int = 20) -> DetectionSink:
    delivery: Callable[[Callable[[], None]], Delivery] | None = None
    if outbox is not None and wire is not None:

        def delivery(wake: Callable[[], None]) -> Delivery:
            return Delivery(
                outbox, wire.publish, wire.connected.is_set, "boot", window=lambda: window, wake=wake
            )

    return DetectionSink("dev1", "boot", TOPIC, ErrorReporter(), outbox, delivery)


def test_a_batch_is_stored_in_one_commit_handed_over_then_announced(outbox: Outbox) -> None:
    wire = Wire()
    sink = make_sink(outbox, wire)
    announced: list[tuple[DetectionEvent, str, int]] = []
    sink.on_detection(lambda event, kind: announced.append((event, kind, len(wire.sent))))
    statements: list[str] = []
    outbox._db.set_trace_callback(statements.append)
    sink.start()
    try:
        ticket = sink.put([found("a"), found("b", end=3.0), StreamClosed("c", "mqtt")])
        assert sink.wait_handed_over(ticket, 10)
    finally:
        sink.stop(flush_seconds=0)  # the wire never acknowledges: nothing to wait for
    assert statements.count("BEGIN IMMEDIATE") == 1  # one transaction, one fsync
    assert [e.seq for e in wire.sent] == [0, 1] and [e.stream for e in wire.sent] == ["a", "b"]
    assert [(e.seq, kind, handed) for e, kind, handed in announced] == [(0, "mqtt", 2), (1, "mqtt", 2)]
    event = announced[0][0]
    assert event.device == "dev1" and event.boot_id == "boot" and event.keyword == "小云小云"
    assert parse_iso_utc(event.time) == pytest.approx(1_700_000_002.5, abs=1e-3)
    stored = json.loads(outbox._db.execute("SELECT body FROM events ORDER BY seq").fetchone()[0])
    assert "seq" not in stored and "delay_ms" not in stored and "replayed" not in stored
    assert sink.detections == 2 and sink.detections_by_keyword() == {"小云小云": 2}


def test_closed_streams_are_announced_in_order(outbox: Outbox) -> None:
    sink = make_sink(outbox, Wire())
    closed: list[str] = []
    sink.on_stream_closed(lambda result: closed.append(result.stream))
    sink.start()
    sink.put([found("a"), StreamClosed("a", "mqtt")])
    sink.put([StreamClosed("b", "hermes")])
    sink.stop(flush_seconds=0)
    assert closed == ["a", "b"]


def test_without_mqtt_events_are_numbered_in_memory_from_one() -> None:
    sink = make_sink(None, None)
    announced: list[int] = []
    sink.on_detection(lambda event, kind: announced.append(event.seq))
    sink.start()
    ticket = sink.put([found("a"), found("a", end=9.0)])
    assert sink.wait_handed_over(ticket, 10)  # nothing to hand over: as soon as it is numbered
    sink.put([found("b")])
    sink.stop()
    assert announced == [1, 2, 3]


def test_while_disconnected_the_worker_does_not_wait_and_the_backlog_goes_out_later(outbox: Outbox) -> None:
    wire = Wire()
    wire.connected.clear()
    sink = make_sink(outbox, wire)
    sink.start()
    try:
        assert sink.wait_handed_over(sink.put([found("a")]), 10)
        assert wire.sent == [] and outbox.depth() == 1
        wire.connected.set()
        sink.wake()  # what a (re)connection does
        ticket = sink.put([found("b")])
        assert sink.wait_handed_over(ticket, 10)
        assert [e.seq for e in wire.sent] == [0, 1]
    finally:
        sink.stop(flush_seconds=0)


def test_a_failing_listener_does_not_stop_the_others(outbox: Outbox) -> None:
    sink = make_sink(outbox, Wire())
    heard: list[int] = []

    def broken(event: DetectionEvent, kind: str) -> None:
        raise RuntimeError("listener bug")

    sink.on_detection(broken)
    sink.on_detection(lambda event, kind: heard.append(event.seq))
    sink.start()
    sink.put([found("a")])
    sink.stop(flush_seconds=0)
    assert heard == [0]

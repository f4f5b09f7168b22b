"""The detection sink: the one place a detection becomes an event, is stored and goes out.

The engine worker puts its results on this sink's queue; the ``detection-sink`` thread then,
for each batch:

1. makes each detection a typed :class:`~edge_agent.mqtt.messages.DetectionEvent` and stores
   the batch in the outbox, numbered, in one commit (without MQTT: numbered in memory);
2. hands over to MQTT what the broker's window has room for (:class:`Delivery`), each event
   serialised once, at that moment, with its delay and whether it is a replay;
3. tells the detection feed's listeners (integrations, the HTTP API) and the listeners of
   closed streams.

The same thread deletes acknowledged events and replays the backlog after a reconnect. It
calls nothing upstream: the worker only learns, through :meth:`DetectionSink.wait_handed_over`,
when a batch it put has gone out.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from edge_agent.agent.delivery import Delivery
from edge_agent.agent.errors import ErrorReporter
from edge_agent.agent.items import Detected, StreamClosed
from edge_agent.agent.outbox import Outbox, StoredEvent
from edge_agent.mqtt.messages import DetectionEvent, iso_utc
from edge_agent.mqtt.transport import MqttTransport

log = logging.getLogger(__name__)

# How often the sink's thread looks at the outbox without being woken (a missed wake-up, a
# failed hand-over to retry).
_IDLE_SECONDS = 0.5
# Batches whose last number is kept for a waiting worker (it waits for the latest only).
_REMEMBERED_TICKETS = 64

# Places of the broker's window of unacknowledged publishes left to QoS 1 messages other than
# detections (availability, info, command replies): they are few and rarely at the same time.
_OTHER_QOS1_RESERVE = 2

DetectionListener = Callable[[DetectionEvent, str], None]  # (event, stream kind)
ClosedListener = Callable[[StreamClosed], None]


def detection_window(transport: MqttTransport) -> int:
    """Detections awaiting their PUBACK at a time: the broker's window, less room for the
    agent's other QoS 1 messages. At a (re)connect the backlog goes out right after what the
    on-connect hooks publish (info, online, discovery), and together they must stay within the
    broker's Receive Maximum. In the middle of a session, the reserve keeps the client from
    holding a detection back: it would send it later, and a detection sent meanwhile could
    overtake it."""
    reserve = max(_OTHER_QOS1_RESERVE, transport.connect_burst)
    return max(1, transport.send_window - reserve)


class DetectionWire:
    """How a stored detection goes on the wire: QoS 1 or more, serialised at hand-over with
    its delay, a replay without the live expiry (automations can tell and ignore it)."""

    def __init__(
        self,
        transport: MqttTransport,
        qos: Callable[[], int],
        expiry_seconds: Callable[[], int | None],
        clock: Callable[[], float] = time.time,
        probe_topic: str = "edge_agent/probe",
    ) -> None:
        self._transport = transport
        self._probe_topic = probe_topic
        self._qos = qos
        self._expiry = expiry_seconds
        self._clock = clock

    def probe(self) -> int | None:
        """A QoS 1 publish nobody needs to read, whose acknowledgement shows the broker alive."""
        return self._transport.publish(self._probe_topic, b"", qos=1, expiry_seconds=1, hold=False)

    def publish(self, stored: StoredEvent, replayed: bool) -> int | None:
        event = DetectionEvent.from_stored(stored.body, stored.seq, self._clock(), replayed)
        return self._transport.publish(
            stored.topic,
            event.to_payload(),
            qos=max(1, self._qos()),
            expiry_seconds=None if replayed else (self._expiry() or None),
            hold=False,
        )


@dataclass
class _Batch:
    ticket: int
    results: list[Detected | StreamClosed]


class DetectionSink:
    """Numbers, stores, delivers and announces detections on its own thread."""

    def __init__(
        self,
        device_id: str,
        boot_id: str,
        topic: str,
        errors: ErrorReporter,
        outbox: Outbox | None = None,
        delivery: Callable[[Callable[[], None]], Delivery] | None = None,
        on_stall: Callable[[str], None] = lambda reason: None,
    ) -> None:
        """``delivery(wake)`` makes the :class:`Delivery` this sink drives (None: no MQTT).
        ``on_stall(reason)``: the broker stopped acknowledging (the transport drops the
        connection)."""
        self.device_id = device_id
        self.boot_id = boot_id
        self.topic = topic
        self._errors = errors
        self._outbox = outbox
        self._inbox: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self.delivery = delivery(self._wake) if delivery is not None else None
        self._detection_listeners: list[DetectionListener] = []
        self._closed_listeners: list[ClosedListener] = []
        self._lock = threading.Lock()  # tickets and counters
        self._next_ticket = 0
        self._stored_ticket = 0  # every batch up to this one is stored
        self._stored = threading.Condition(self._lock)
        self._last_seqs: dict[int, int] = {}  # ticket -> last seq stored for it (recent ones)
        self._memory_seq = 0  # numbering without an outbox
        self._by_keyword: dict[str, int] = {}
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._on_stall = on_stall
        self._stall_reported = 0.0  # monotonic
        self._skipped_reported = 0

    # --- wiring (before start) ---------------------------------------------------------------
    def on_detection(self, listener: DetectionListener) -> None:
        """``listener(event, stream_kind)`` for every detection, on the sink's thread, after it
        was stored and handed over. It must not block."""
        self._detection_listeners.append(listener)

    def on_stream_closed(self, listener: ClosedListener) -> None:
        self._closed_listeners.append(listener)

    def remove_listener(self, listener: DetectionListener) -> None:
        if listener in self._detection_listeners:
            self._detection_listeners.remove(listener)

    # --- the worker's side -------------------------------------------------------------------
    def put(self, results: list[Detected | StreamClosed]) -> int:
        with self._lock:
            self._next_ticket += 1
            ticket = self._next_ticket
        self._inbox.put(_Batch(ticket, results))
        return ticket

    def wait_handed_over(self, ticket: int, timeout: float) -> bool:
        """Whether the detections of the batch ``ticket`` were stored and handed to MQTT within
        ``timeout`` (at once when they cannot be: no MQTT, or disconnected)."""
        deadline = time.monotonic() + timeout
        with self._stored:
            if not self._stored.wait_for(lambda: self._stored_ticket >= ticket, timeout):
                return False
            last_seq = self._last_seqs.pop(ticket, -1)
        delivery = self.delivery
        if delivery is None or last_seq < 0 or not delivery.connected():
            return True
        return delivery.wait_handed_over(last_seq, max(0.0, deadline - time.monotonic()))

    # --- reading (any thread) ----------------------------------------------------------------
    @property
    def detections(self) -> int:
        with self._lock:
            return sum(self._by_keyword.values())

    def detections_by_keyword(self) -> dict[str, int]:
        with self._lock:
            return dict(self._by_keyword)

    def wake(self) -> None:
        """Look at the outbox now (after a reconnect: replay the backlog)."""
        self._wake()

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="detection-sink", daemon=True)
        self._thread.start()

    def stop(self, flush_seconds: float = 3.0) -> None:
        """Handle what is queued, wait (bounded) for the broker to acknowledge what is stored,
        and stop. What it did not acknowledge stays in the outbox for the next start."""
        if self._thread is None:
            return
        self._stopping.set()
        self._inbox.put(None)
        self._thread.join(max(1.0, flush_seconds + 1.0))
        self._thread = None
        if self.delivery is not None and self._outbox is not None:
            deadline = time.monotonic() + flush_seconds
            while self._outbox.depth() and self.delivery.connected() and time.monotonic() < deadline:
                if not self.delivery.pump():
                    time.sleep(0.02)
            self.delivery.close()
            if self._outbox.depth():
                log.warning("%d detections stay in the outbox until the next start", self._outbox.depth())

    # --- the thread --------------------------------------------------------------------------
    def _wake(self) -> None:
        self._inbox.put(_Batch(0, []))

    def _run(self) -> None:
        while True:
            try:
                item = self._inbox.get(timeout=_IDLE_SECONDS)
            except queue.Empty:
                item = _Batch(0, [])
            batches = [item]
            while True:  # everything queued goes into one commit
                try:
                    batches.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            stopping = any(batch is None for batch in batches)
            try:
                self._handle([batch for batch in batches if batch is not None])
                self._check_outbox()
                self._check_stall()
            except Exception:  # the only thread that delivers detections: it must not die
                log.exception("detection sink failed; retrying")
            if stopping:
                return

    def _check_outbox(self) -> None:
        outbox = self._outbox
        if outbox is not None and outbox.skipped_rows > self._skipped_reported:
            self._errors.report(
                "outbox_damaged",
                f"{outbox.skipped_rows - self._skipped_reported} stored detection(s) in {outbox.path} could "
                "not be read back and were skipped; the others go on",
            )
            self._skipped_reported = outbox.skipped_rows

    def _check_stall(self) -> None:
        if self.delivery is None:
            return
        waited = self.delivery.stalled()
        now = time.monotonic()
        if waited is None or now - self._stall_reported < waited:
            return
        self._stall_reported = now
        reason = f"the broker acknowledged nothing for {waited:.1f} s; reconnecting"
        log.warning("detections: %s", reason)
        self._on_stall(reason)

    def _handle(self, batches: list[_Batch]) -> None:
        detected = [r for batch in batches for r in batch.results if isinstance(r, Detected)]
        events = self._store(detected)
        self._mark_stored(batches, events[-1].seq if events else -1)
        if self.delivery is not None:
            while self.delivery.pump():
                if self._inbox.qsize():
                    break  # new results first; the rest of the window on the next round
        kinds = [r.kind for r in detected]
        for event, kind in zip(events, kinds, strict=True):
            for listener in list(self._detection_listeners):
                try:
                    listener(event, kind)
                except Exception:
                    log.exception("a detection listener failed")
        for batch in batches:
            for result in batch.results:
                if isinstance(result, StreamClosed):
                    self._stream_closed(result)

    def _store(self, detected: list[Detected]) -> list[DetectionEvent]:
        if not detected:
            return []
        events = [self._event(found) for found in detected]
        with self._lock:
            for event in events:
                self._by_keyword[event.keyword] = self._by_keyword.get(event.keyword, 0) + 1
        for found in detected:
            detection = found.detection
            log.info(
                "detected %s in %s: confidence %.3f, %.2f-%.2f s",
                detection.keyword,
                found.stream,
                detection.confidence,
                detection.start,
                detection.end,
            )
        if self._outbox is None:
            numbered = []
            for event in events:
                self._memory_seq += 1
                numbered.append(_numbered(event, self._memory_seq))
            return numbered
        stored = self._outbox.append_many(
            [(self.topic, event.stored_body()) for event in events], self.boot_id
        )
        if self._outbox.write_error is not None:
            self._errors.report(
                "outbox_unwritable",
                f"cannot write the outbox {self._outbox.path} ({self._outbox.write_error}): "
                f"{self._outbox.unwritten} detection(s) held in memory, published as usual but lost "
                "if the agent stops before the file can be written",
            )
        return [_numbered(event, row.seq) for event, row in zip(events, stored, strict=True)]

    def _event(self, found: Detected) -> DetectionEvent:
        detection = found.detection
        return DetectionEvent(
            device=self.device_id,
            stream=found.stream,
            keyword=detection.keyword,
            confidence=round(float(detection.confidence), 4),
            start=round(detection.start, 3),
            end=round(detection.end, 3),
            time=iso_utc(found.wall_end),
            seq=0,
            boot_id=self.boot_id,
            level_dbfs=found.level_dbfs,
            snr_db=found.snr_db,
        )

    def _mark_stored(self, batches: list[_Batch], last_seq: int) -> None:
        with self._stored:
            for batch in batches:
                if batch.ticket:
                    self._stored_ticket = max(self._stored_ticket, batch.ticket)
                    self._last_seqs[batch.ticket] = last_seq
            while len(self._last_seqs) > _REMEMBERED_TICKETS:  # batches nobody waited for
                del self._last_seqs[next(iter(self._last_seqs))]
            self._stored.notify_all()

    def _stream_closed(self, closed: StreamClosed) -> None:
        for listener in list(self._closed_listeners):
            try:
                listener(closed)
            except Exception:
                log.exception("a stream-closed listener failed")


def _numbered(event: DetectionEvent, seq: int) -> DetectionEvent:
    return replace(event, seq=seq)

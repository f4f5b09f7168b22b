"""Store-and-forward for detections: on disk before they are published, gone only after PUBACK.

paho keeps unacknowledged QoS 1 messages in memory only, so a restart or a power cut during an
outage would lose them. Every event is first committed to SQLite (WAL, ``synchronous=FULL``:
a detection is durable before anyone is told about it), then published in sequence order by
:class:`OutboxPublisher`, and deleted when the broker acknowledges it. After a reconnect or a
restart the rest is replayed in order. Deletes skip the fsync: one lost to a power cut only
sends an acknowledged event again. The store is bounded by count and age; the oldest
events go first and every drop is counted (and shown in health).

Sequence numbers come from the same database, so they keep increasing across restarts and
receivers can de-duplicate on ``(device, seq)``.

When the file cannot be written (disk full, a read-only or failing SD card), events are kept in
memory, still numbered and published, and written at the next successful write: nothing is lost
unless the agent stops before then. ``write_error`` says why meanwhile (shown in health).
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    body TEXT NOT NULL,
    created REAL NOT NULL,
    boot_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class StoredEvent:
    seq: int
    topic: str
    body: dict[str, Any]
    created: float
    boot_id: str


class OutboxError(RuntimeError):
    """The outbox file cannot be opened or written."""


class Outbox:
    """A bounded, persistent FIFO of events with a persistent sequence counter. Thread-safe."""

    def __init__(
        self,
        path: str | Path,
        max_events: int = 10_000,
        max_age_seconds: float = 7 * 24 * 3600,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = str(path)
        self.max_events = max_events
        self.max_age_seconds = max_age_seconds
        self._clock = clock
        self._lock = threading.Lock()
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._next_seq = self._counter("next_seq")
        except sqlite3.Error as error:
            raise OutboxError(f"cannot open the outbox {self.path}: {error}") from None
        self.dropped_this_run = 0
        # Numbered events not yet in the file (it could not be written), oldest first.
        self._unwritten: list[StoredEvent] = []
        self.write_error: str | None = None  # why the last write failed; None when it worked

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- writing -------------------------------------------------------------------------
    def append(self, topic: str, make_body: Callable[[int], dict[str, Any]], boot_id: str) -> StoredEvent:
        """Store a new event; ``make_body(seq)`` builds its payload with the assigned number."""
        return self.append_many([(topic, make_body)], boot_id)[0]

    def append_many(
        self, events: list[tuple[str, Callable[[int], dict[str, Any]]]], boot_id: str
    ) -> list[StoredEvent]:
        """Store events (topic, ``make_body(seq)``) in order, in one transaction.

        One commit is one fsync: on an SD card that is 5-20 ms, so the detections of one engine
        pass (a hundred streams can fire on the same chunk) are committed together.
        """
        if not events:
            return []
        now = self._clock()
        with self._lock:
            stored = [
                StoredEvent(seq, topic, make_body(seq), now, boot_id)
                for seq, (topic, make_body) in enumerate(events, start=self._next_seq)
            ]  # a body that cannot be built uses up no numbers
            self._next_seq += len(events)
            self._unwritten += stored
            self._write_unwritten(now)
        return stored

    def remove(self, *seqs: int) -> None:
        """Forget acknowledged events: one transaction (one fsync) for a burst of PUBACKs."""
        with self._lock:
            if self._unwritten:
                gone = set(seqs)
                self._unwritten = [event for event in self._unwritten if event.seq not in gone]
            try:
                # Without an fsync: a delete lost to a power cut only sends an acknowledged event
                # again (receivers de-duplicate by seq), while an fsync per window of PUBACKs
                # (5-20 ms on an SD card) would hold up the next window. The next insert, with
                # one, makes it durable too (SQLite's WAL keeps commits in order).
                with self._transaction(durable=False):
                    self._db.executemany("DELETE FROM events WHERE seq = ?", [(seq,) for seq in seqs])
            except sqlite3.Error as error:
                # Left in the file they are sent again after a restart: receivers de-duplicate.
                log.warning(
                    "outbox %s: cannot delete %d acknowledged event(s): %s", self.path, len(seqs), error
                )

    def expire(self) -> int:
        """Drop events older than the age bound now (and retry a failed write); returns how many."""
        with self._lock:
            if self._unwritten:
                return self._write_unwritten(self._clock())
            try:
                with self._transaction():
                    return self._enforce_bounds(self._clock())
            except sqlite3.Error as error:
                log.warning("outbox %s: cannot drop old events: %s", self.path, error)
                return 0

    # --- reading -------------------------------------------------------------------------
    def pending(self, after_seq: int = -1, limit: int = 100) -> list[StoredEvent]:
        """Events after ``after_seq`` in order: the file's, then those it could not take yet."""
        found = self.try_pending(after_seq, limit, wait=True)
        assert found is not None
        return found

    def try_pending(self, after_seq: int, limit: int, wait: bool = False) -> list[StoredEvent] | None:
        """:meth:`pending`, or None at once if another thread is using the file (a commit may
        be waiting for the disk): for the network thread, which must not wait on it."""
        if not self._lock.acquire(blocking=wait):
            return None
        try:
            try:
                rows = self._db.execute(
                    "SELECT seq, topic, body, created, boot_id FROM events "
                    "WHERE seq > ? ORDER BY seq LIMIT ?",
                    (after_seq, limit),
                ).fetchall()
            except sqlite3.Error as error:
                # Nothing rather than the held events alone, which would overtake the stored ones.
                log.warning("outbox %s cannot be read: %s", self.path, error)
                return []
            unwritten = [event for event in self._unwritten if event.seq > after_seq]
        finally:
            self._lock.release()
        stored = [StoredEvent(r[0], r[1], json.loads(r[2]), r[3], r[4]) for r in rows]
        return (stored + unwritten)[:limit]  # unwritten events were numbered after every stored one

    def depth(self) -> int:
        with self._lock:
            try:
                stored = int(self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0])
            except sqlite3.Error:
                stored = 0  # unreadable: pending() reports it
            return stored + len(self._unwritten)

    @property
    def unwritten(self) -> int:
        """Events held in memory only, because the file could not be written."""
        with self._lock:
            return len(self._unwritten)

    @property
    def dropped_total(self) -> int:
        with self._lock:
            return self._counter("dropped")

    # --- internals (lock held) -----------------------------------------------------------
    def _transaction(self, durable: bool = True) -> _Transaction:
        return _Transaction(self._db, durable)

    def _counter(self, name: str) -> int:
        row = self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def _write_unwritten(self, now: float) -> int:
        """Store the events held in memory, with the counter, in one transaction; returns the
        number of old events dropped by the bounds. On failure they stay held (bounded too)."""
        try:
            with self._transaction():
                self._db.executemany(
                    "INSERT INTO events (seq, topic, body, created, boot_id) VALUES (?, ?, ?, ?, ?)",
                    [
                        (e.seq, e.topic, json.dumps(e.body, ensure_ascii=False), e.created, e.boot_id)
                        for e in self._unwritten
                    ],
                )
                self._set_counter("next_seq", self._next_seq)
                dropped = self._enforce_bounds(now)
        except sqlite3.Error as error:
            if self.write_error is None:
                log.error(
                    "cannot write the outbox %s (%s): detections are kept in memory until it can be "
                    "written, and lost if the agent stops before",
                    self.path,
                    error,
                )
            self.write_error = str(error)
            excess = len(self._unwritten) - self.max_events
            if excess > 0:
                del self._unwritten[:excess]
                self.dropped_this_run += excess
            return max(excess, 0)
        if self.write_error is not None:
            log.warning(
                "outbox %s can be written again: %d held event(s) stored", self.path, len(self._unwritten)
            )
            self.write_error = None
        self._unwritten.clear()
        return dropped

    def _set_counter(self, name: str, value: int) -> None:
        self._db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            (name, value),
        )

    def _bump(self, name: str, by: int = 1) -> int:
        value = self._counter(name)
        self._set_counter(name, value + by)
        return value

    def _enforce_bounds(self, now: float) -> int:
        dropped = self._db.execute(
            "DELETE FROM events WHERE created < ?", (now - self.max_age_seconds,)
        ).rowcount
        count = int(self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0])
        if count > self.max_events:
            dropped += self._db.execute(
                "DELETE FROM events WHERE seq IN (SELECT seq FROM events ORDER BY seq LIMIT ?)",
                (count - self.max_events,),
            ).rowcount
        if dropped:
            self._bump("dropped", dropped)
            self.dropped_this_run += dropped
            log.warning("outbox full or events too old: dropped the %d oldest", dropped)
        return dropped


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT; ``durable=False`` commits without waiting for the disk."""

    def __init__(self, db: sqlite3.Connection, durable: bool = True) -> None:
        self._db = db
        self._durable = durable

    def __enter__(self) -> None:
        if not self._durable:
            self._db.execute("PRAGMA synchronous=NORMAL")  # in WAL mode: no fsync at COMMIT
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except BaseException:  # a locked or failing file: later inserts must still be durable
            if not self._durable:
                self._db.execute("PRAGMA synchronous=FULL")
            raise

    def __exit__(self, kind: object, error: object, trace: object) -> None:
        try:
            if kind is None:
                try:
                    self._db.execute("COMMIT")
                except sqlite3.Error:
                    if self._db.in_transaction:  # a failed COMMIT leaves it open: undo, then report
                        self._db.execute("ROLLBACK")
                    raise
            elif self._db.in_transaction:  # SQLite may have rolled back itself (disk full, I/O error)
                self._db.execute("ROLLBACK")
        finally:
            if not self._durable:
                self._db.execute("PRAGMA synchronous=FULL")


class OutboxPublisher:
    """Publishes outbox events in order while connected; deletes each on its PUBACK.

    ``publish(event, replayed) -> mid`` hands one event to MQTT; acknowledgements come back
    through :meth:`acknowledged`. Events already handed over stay in paho's session and are
    re-sent by paho itself after a reconnect, so they are not published twice by us.

    paho calls ``on_publish`` while holding its outgoing-message lock, and before it counts the
    message out of its own window: so :meth:`acknowledged` only enqueues the message id. The
    window is refilled by :meth:`refill`, which the network thread calls once it has read a
    batch of packets, and otherwise by this publisher's own thread, which also deletes the
    acknowledged events from the outbox. (Waking another thread for every refill costs up to a
    switch interval, 5 ms, whenever the network thread is busy parsing audio: a hundred
    detections need several refills.)
    """

    def __init__(
        self,
        outbox: Outbox,
        publish: Callable[[StoredEvent, bool], int | None],
        is_connected: Callable[[], bool],
        boot_id: str,
        live_window_seconds: float = 2.0,
        window: Callable[[], int] = lambda: 20,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``window()``: how many events may await their PUBACK at a time (the broker's
        Receive Maximum: a client that sends more is disconnected)."""
        self._outbox = outbox
        self._publish = publish
        self._is_connected = is_connected
        self._boot_id = boot_id
        self._live_window = live_window_seconds
        self._window = window
        self._clock = clock
        # Held while acknowledgements are taken and events handed over (either thread).
        self._handing = threading.Lock()
        self._in_flight: dict[int, int] = {}  # mid -> seq; under _handing
        self._acknowledged: list[int] = []  # seqs acknowledged, not yet deleted from the outbox
        self._last_handed = -1  # highest seq handed to MQTT in this run
        self._handed = threading.Condition()  # notified when _last_handed grows
        self._acks: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._refilled_by_reader = False  # set once refill() is called (the network thread does)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.published = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="outbox-publisher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def notify(self) -> None:
        """Something changed: a new event, a connection."""
        self._wake.set()

    def wait_handed_over(self, seq: int, timeout: float) -> bool:
        """Block (at most ``timeout`` s) until the events up to ``seq`` are handed to MQTT.

        The engine worker calls this after a batch of detections, so that while they go out
        (in windows of the broker's Receive Maximum, each refilled on its PUBACKs) it holds
        neither the GIL nor a core: the next chunk can wait a few milliseconds, a detection
        should not. Returns whether they were all handed over in time.
        """
        with self._handed:
            return self._handed.wait_for(lambda: self._last_handed >= seq, timeout)

    def acknowledged(self, mid: int) -> None:
        """Called on paho's network thread: enqueue only. This publisher's thread is woken only
        while nothing calls :meth:`refill`; otherwise it deletes acknowledged events when it
        wakes anyway (within 0.5 s), instead of competing with the refills for every PUBACK."""
        self._acks.put(mid)
        if not self._refilled_by_reader:
            self._wake.set()

    def refill(self) -> None:
        """Hand over as many events as PUBACKs received so far made room for, on the calling
        thread (the network thread, after reading). Never waits for the publisher thread: when
        that one is busy handing over, it sees these acknowledgements itself."""
        self._refilled_by_reader = True
        if self._acks.empty() or self._stopping.is_set():
            return
        if not self._handing.acquire(blocking=False):
            self._wake.set()  # it may have taken the acknowledgements before these arrived
            return
        try:
            self._take_acknowledgements()
            self._hand_over(wait_for_outbox=False)
        except Exception:  # on the network thread: report, never raise into it
            log.exception("outbox publisher failed to refill its window; its thread retries")
            self._wake.set()
        finally:
            self._handing.release()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def flush(self, timeout: float) -> bool:
        """Wait until everything stored so far is acknowledged (used at shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._outbox.depth() == 0:
                return True
            self._wake.set()
            time.sleep(0.02)
        return self._outbox.depth() == 0

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                with self._handing:
                    self._take_acknowledgements()
                    handed = self._hand_over()
                    # PUBACKs that came in meanwhile: their room is used on the next round, at
                    # once (refill() skipped them while this thread held the lock).
                    handed += self._take_acknowledgements()
                # Deleted once the next events are on their way, outside the lock: when a hundred
                # streams fire at once, the window refills many times, and a delete between a
                # PUBACK and the next publish would delay every later detection.
                self._forget_acknowledged()
            except Exception:  # the only thread that delivers detections: it must not die
                log.exception("outbox publisher failed; retrying")
                handed = 0
            if not handed:
                self._wake.wait(0.5)

    def _take_acknowledgements(self) -> int:
        """PUBACKs received so far free their place in the window (in memory only); returns
        how many places they freed."""
        freed = 0
        while True:
            try:
                mid = self._acks.get_nowait()
            except queue.Empty:
                return freed
            seq = self._in_flight.pop(mid, None)
            if seq is not None:
                self._acknowledged.append(seq)
                freed += 1

    def _forget_acknowledged(self) -> None:
        """Delete the acknowledged events from the outbox, in one transaction."""
        with self._handing:
            seqs, self._acknowledged = self._acknowledged, []
        if not seqs:
            return
        try:
            self._outbox.remove(*seqs)
        except BaseException:
            with self._handing:  # deleted at the next try
                self._acknowledged[:0] = seqs
            raise
        self.published += len(seqs)

    def _hand_over(self, wait_for_outbox: bool = True) -> int:
        """Publish what the window has room for; ``wait_for_outbox=False`` (the network thread):
        when the outbox is busy, leave it to this publisher's thread instead of waiting."""
        room = self._window() - len(self._in_flight)
        if room <= 0 or not self._is_connected():
            return 0
        events = self._outbox.try_pending(self._last_handed, room, wait=wait_for_outbox)
        if events is None:
            self._wake.set()
            return 0
        handed = 0
        for event in events:
            replayed = event.boot_id != self._boot_id or self._clock() - event.created > self._live_window
            mid = self._publish(event, replayed)
            if mid is None:
                break  # disconnected meanwhile; retried on the next wake-up
            self._in_flight[mid] = event.seq
            with self._handed:
                self._last_handed = event.seq
                self._handed.notify_all()
            handed += 1
        return handed

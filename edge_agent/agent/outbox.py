"""Store-and-forward for detections: on disk before they are published, gone only after PUBACK.

paho keeps unacknowledged QoS 1 messages in memory only, so a restart or a power cut during an
outage would lose them. Every event is first committed to SQLite (WAL, ``synchronous=FULL``:
a detection is durable before anyone is told about it), then published in sequence order
(:class:`~edge_agent.agent.delivery.Delivery`), and deleted when the broker acknowledges it.
After a reconnect or a restart the rest is replayed in order. Deletes skip the fsync: one lost
to a power cut only sends an acknowledged event again. The store is bounded by count and age;
the oldest events go first and every drop is counted (and shown in health).

Sequence numbers come from the same database, so they keep increasing across restarts. A block
of numbers ahead is reserved on disk as numbers are given, and a run that did not close the
outbox (a crash, a kill, a power cut) is followed by one that starts past that block: numbers
given while the disk could not be written are not given again. An event's identity is
``(device, boot_id, seq)``; receivers de-duplicate on it.

A file that cannot be opened as an outbox (not a database, damaged) is moved aside, named in
:attr:`Outbox.recovered`, and a new one started: detections must keep flowing. A stored event
that cannot be read back (damaged row) is skipped, counted and logged, never blocking the ones
after it. When no file can be opened at all, events are kept in memory (``write_error`` says so).

When the file cannot be written (disk full, a read-only or failing SD card), events are kept in
memory, still numbered and published, and written at the next successful write: nothing is lost
unless the agent stops before then. ``write_error`` says why meanwhile (shown in health).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
    text: str = field(default="", repr=False, compare=False)  # body as stored (JSON)


# Sequence numbers reserved on disk ahead of the last one given (see the module docstring).
SEQ_RESERVE = 1024


def _decode_row(row: tuple[Any, ...]) -> StoredEvent | None:
    """A stored row as an event, or None when it cannot be one (damaged)."""
    seq, topic, text, created, boot_id = row
    try:
        body = json.loads(text)
    except (TypeError, ValueError):
        return None
    if not isinstance(body, dict) or not isinstance(topic, str) or not topic:
        return None
    return StoredEvent(seq, topic, body, created, str(boot_id))


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
        self.dropped_this_run = 0
        self.skipped_rows = 0  # stored events that could not be read back, skipped
        # Numbered events not yet in the file (it could not be written), oldest first.
        self._unwritten: list[StoredEvent] = []
        self.write_error: str | None = None  # why the last write failed; None when it worked
        self.recovered: str | None = None  # what happened to an unreadable file, for a report
        try:
            self._db = self._open(self.path)
        except sqlite3.DatabaseError as error:
            self._db = self._start_afresh(error)
        except (sqlite3.Error, OSError) as error:
            self._db = self._in_memory(error)
        self._next_seq = self._first_number()

    def _open(self, path: str) -> sqlite3.Connection:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            db.execute("SELECT COUNT(*) FROM events").fetchone()
        except BaseException:
            db.close()
            raise
        return db

    def _start_afresh(self, error: BaseException) -> sqlite3.Connection:
        """The file is not a readable outbox: keep it aside for a look, start a new one."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self._clock()))
        aside = Path(f"{self.path}.corrupt-{stamp}")
        try:
            for suffix in ("", "-wal", "-shm"):
                part = Path(self.path + suffix)
                if part.exists():
                    os.replace(part, Path(str(aside) + suffix))
            db = self._open(self.path)
        except (sqlite3.Error, OSError) as again:
            return self._in_memory(again)
        self.recovered = (
            f"{self.path} could not be read as an outbox ({error}); moved to {aside}, a new one started"
        )
        log.error("%s", self.recovered)
        return db

    def _in_memory(self, error: BaseException) -> sqlite3.Connection:
        """No file to keep events in: keep them in memory, published as usual, and say so."""
        self.write_error = f"cannot open the outbox {self.path}: {error}"
        log.error("%s; detections are kept in memory only, and lost if the agent stops", self.write_error)
        return self._open(":memory:")

    def _first_number(self) -> int:
        """Where numbering goes on: after the last number stored, or, when the last run did not
        close the outbox, past the block it had reserved (it may have given numbers it could
        not store). The run is marked unclosed until :meth:`close`."""
        stored = self._counter("next_seq")
        highest = self._db.execute("SELECT MAX(seq) FROM events").fetchone()[0]
        first = max(stored, highest + 1 if highest is not None else 0)
        if not self._counter("closed", default=1):
            first = max(first, self._counter("seq_ceiling"))
        try:
            with self._transaction():
                self._set_counter("closed", 0)
                self._reserve(first)
        except sqlite3.Error as error:
            log.warning("outbox %s: cannot reserve sequence numbers: %s", self.path, error)
        return first

    def close(self) -> None:
        with self._lock:
            try:
                with self._transaction():
                    self._set_counter("next_seq", self._next_seq)
                    self._set_counter("closed", 1)
            except sqlite3.Error as error:  # the next start skips the reserved block instead
                log.warning("outbox %s: not closed cleanly: %s", self.path, error)
            self._db.close()

    # --- writing -------------------------------------------------------------------------
    def append(self, topic: str, body: dict[str, Any], boot_id: str) -> StoredEvent:
        """Store a new event; its number is assigned here (it is not part of ``body``)."""
        return self.append_many([(topic, body)], boot_id)[0]

    def append_many(self, events: list[tuple[str, dict[str, Any]]], boot_id: str) -> list[StoredEvent]:
        """Store events (topic, body) in order, numbered, in one transaction.

        One commit is one fsync: on an SD card that is 5-20 ms, so the detections of one engine
        pass (a hundred streams can fire on the same chunk) are committed together.
        """
        if not events:
            return []
        now = self._clock()
        encoded = [json.dumps(body, ensure_ascii=False) for _, body in events]  # refused before numbering
        with self._lock:
            stored = [
                StoredEvent(seq, topic, body, now, boot_id, text)
                for seq, (topic, body), text in zip(
                    range(self._next_seq, self._next_seq + len(events)), events, encoded, strict=True
                )
            ]
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
        stored, damaged = [], []
        for row in rows:
            event = _decode_row(row)
            if event is None:
                damaged.append(row[0])
            else:
                stored.append(event)
        if damaged:
            self._skip(damaged)
        return (stored + unwritten)[:limit]  # unwritten events were numbered after every stored one

    def _skip(self, seqs: list[int]) -> None:
        """Rows that cannot be read back as events: removed (they would block every later one)."""
        self.skipped_rows += len(seqs)
        log.error(
            "outbox %s: %d stored event(s) cannot be read back and are skipped: seq %s",
            self.path,
            len(seqs),
            seqs,
        )
        if self._lock.acquire(timeout=1.0):
            try:
                with self._transaction(durable=False):
                    self._db.executemany("DELETE FROM events WHERE seq = ?", [(seq,) for seq in seqs])
            except sqlite3.Error as error:
                log.warning("outbox %s: cannot remove damaged rows: %s", self.path, error)
            finally:
                self._lock.release()

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

    def _counter(self, name: str, default: int = 0) -> int:
        row = self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else default

    def _reserve(self, next_seq: int) -> None:
        """Keep the reserved block ahead of ``next_seq`` (in the caller's transaction)."""
        if self._counter("seq_ceiling") - next_seq < SEQ_RESERVE // 2:
            self._set_counter("seq_ceiling", next_seq + SEQ_RESERVE)

    def _write_unwritten(self, now: float) -> int:
        """Store the events held in memory, with the counter, in one transaction; returns the
        number of old events dropped by the bounds. On failure they stay held (bounded too)."""
        try:
            with self._transaction():
                self._db.executemany(
                    "INSERT INTO events (seq, topic, body, created, boot_id) VALUES (?, ?, ?, ?, ?)",
                    [
                        (
                            e.seq,
                            e.topic,
                            e.text or json.dumps(e.body, ensure_ascii=False),
                            e.created,
                            e.boot_id,
                        )
                        for e in self._unwritten
                    ],
                )
                self._set_counter("next_seq", self._next_seq)
                self._reserve(self._next_seq)
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

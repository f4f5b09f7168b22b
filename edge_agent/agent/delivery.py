"""Outbox events to the broker, in order, within its window; deleted on their PUBACK.

:class:`Delivery` has no thread of its own. The detection sink's thread drives it
(:meth:`Delivery.pump`: hand over what the window has room for, delete what was acknowledged);
the MQTT network thread may refill the window as soon as it has read PUBACKs
(:meth:`Delivery.refill`), without waiting for the sink's thread to be scheduled: when many
streams fire at once, the window of the broker's Receive Maximum refills several times and each
thread switch would add its wait to every later detection.

``publish(event, replayed) -> mid`` is the one I/O seam: it puts one stored event on the wire
(see :class:`edge_agent.agent.sink.DetectionWire`), deciding there and then whether it is live
or a replay. Every connection is a new MQTT session (the transport does not let its client
resend a dead session's messages verbatim): :meth:`Delivery.new_session` hands what was left
unacknowledged over again, from the oldest, each as what it is by then.

A broker that stops working while the connection still looks alive (a frozen process: its
kernel keeps accepting our packets, to be read and delivered whenever it resumes) must not be
handed a detection flagged live. So events go out only on a link heard from within
:data:`FRESH_SECONDS`: when it has been quiet longer, a probe is sent first (``probe()``, a QoS 1
publish) and the events wait for its acknowledgement. A probe (or an event) left unacknowledged
for :data:`STALL_SECONDS` is noticed by :meth:`Delivery.stalled`; the sink then has the
transport drop the connection, and what waited goes out after the reconnect, as a replay.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from edge_agent.agent.outbox import Outbox, StoredEvent

log = logging.getLogger(__name__)

# An event handed over later than this after it was stored is marked replayed (seconds).
LIVE_WINDOW_SECONDS = 2.0
# Events handed over and unacknowledged, with no acknowledgement at all, for this long: the broker
# has stopped (seconds).
STALL_SECONDS = 5.0
# Events go out only on a link the broker was heard on within this long (seconds); after a quiet
# spell a probe is answered first.
FRESH_SECONDS = 1.0


class Delivery:
    """The window of events awaiting their PUBACK. Thread-safe."""

    def __init__(
        self,
        outbox: Outbox,
        publish: Callable[[StoredEvent, bool], int | None],
        is_connected: Callable[[], bool],
        boot_id: str,
        *,
        window: Callable[[], int] = lambda: 20,
        wake: Callable[[], None] = lambda: None,
        live_window_seconds: float = LIVE_WINDOW_SECONDS,
        clock: Callable[[], float] = time.time,
        last_heard: Callable[[], float] | None = None,
        probe: Callable[[], int | None] = lambda: None,
    ) -> None:
        """``window()``: how many events may await their PUBACK at a time (the broker's Receive
        Maximum: a client that sends more is disconnected). ``wake()``: asks the driving thread
        for a :meth:`pump` (acknowledgements arrived and nobody refills). ``last_heard()``: when
        the broker last sent anything (monotonic; None: the link is taken as always fresh);
        ``probe()``: a QoS 1 publish whose acknowledgement shows the broker alive (its mid)."""
        self._outbox = outbox
        self._publish = publish
        self._is_connected = is_connected
        self._boot_id = boot_id
        self._window = window
        self._wake = wake
        self._live_window = live_window_seconds
        self._clock = clock
        # Held while acknowledgements are taken and events handed over (either thread).
        self._handing = threading.Lock()
        self._in_flight: dict[int, int] = {}  # mid -> seq; under _handing
        self._acknowledged: list[int] = []  # seqs acknowledged, not yet deleted; under _handing
        self._acks: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._refilled_by_reader = False  # set once refill() is called (the network thread does)
        self._last_handed = -1  # highest seq handed over in this run
        self._handed = threading.Condition()  # notified when _last_handed grows
        self._closed = False
        self.published = 0
        self._handed_at: dict[int, float] = {}  # mid -> monotonic time of the hand-over
        self._last_acknowledged = 0.0  # monotonic
        self._last_heard = last_heard
        self._probe = probe
        self._probe_mid: int | None = None  # the probe awaiting its acknowledgement
        self._probe_sent = 0.0  # monotonic

    # --- network thread --------------------------------------------------------------------
    def acknowledged(self, mid: int) -> None:
        """A PUBACK: enqueue only. The driving thread is woken only while nothing calls
        :meth:`refill`; otherwise it deletes acknowledged events on its next pump anyway."""
        self._acks.put(mid)
        if not self._refilled_by_reader:
            self._wake()

    def refill(self) -> None:
        """Hand over as many events as PUBACKs received so far made room for, on the calling
        thread. Never waits: when the driving thread is handing over, or the outbox is busy
        (a commit waiting for the disk), it is left to the driving thread."""
        self._refilled_by_reader = True
        if self._acks.empty() or self._closed:
            return
        if not self._handing.acquire(blocking=False):
            self._wake()  # it may have taken the acknowledgements before these arrived
            return
        try:
            self._take_acknowledgements()
            self._hand_over(wait_for_outbox=False)
        except Exception:  # on the network thread: report, never raise into it
            log.exception("could not refill the window of detections; the sink retries")
            self._wake()
        finally:
            self._handing.release()

    # --- driving thread --------------------------------------------------------------------
    def pump(self) -> int:
        """Take acknowledgements, hand over what the window has room for, then delete the
        acknowledged events (after the next ones are on their way: a delete between a PUBACK
        and the next publish would delay every later detection). Returns how many were
        handed over or acknowledged: zero means there is nothing to do until the next wake."""
        with self._handing:
            progress = self._take_acknowledgements()
            progress += self._hand_over()
            # PUBACKs that came in meanwhile (refill() skipped them while this thread held the
            # lock): their room is used on the next pump, at once.
            progress += self._take_acknowledgements()
        self._forget_acknowledged()
        return progress

    def close(self) -> None:
        """No more hand-overs from the network thread (the agent stops)."""
        self._closed = True

    def new_session(self) -> None:
        """A new MQTT session began (network thread, at the CONNACK): what was in flight on the
        last one is handed over again, in order, from the oldest unacknowledged event."""
        with self._handing:
            self._take_acknowledgements()
            self._in_flight.clear()
            self._handed_at.clear()
            self._probe_mid = None
            with self._handed:
                self._last_handed = -1
        self._forget_acknowledged()  # before the replay: nothing acknowledged goes out again

    def stalled(self, now: float | None = None) -> float | None:
        """Seconds the oldest unacknowledged event (or probe) has waited with no
        acknowledgement arriving meanwhile, when that is longer than :data:`STALL_SECONDS`;
        None otherwise."""
        now = time.monotonic() if now is None else now
        with self._handing:
            sent = list(self._handed_at.values())
            if self._probe_mid is not None:
                sent.append(self._probe_sent)
            if not sent:
                return None
            waited = now - max(min(sent), self._last_acknowledged)
        return waited if waited > STALL_SECONDS else None

    # --- any thread -------------------------------------------------------------------------
    def connected(self) -> bool:
        return self._is_connected()

    @property
    def last_handed(self) -> int:
        return self._last_handed

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def wait_handed_over(self, seq: int, timeout: float) -> bool:
        """Block (at most ``timeout`` s) until the events up to ``seq`` are handed over."""
        with self._handed:
            return self._handed.wait_for(lambda: self._last_handed >= seq, timeout)

    # --- internals --------------------------------------------------------------------------
    def _link_fresh(self) -> bool:
        """Whether the broker was heard from lately; if not, a probe goes out (once) and the
        events wait for its acknowledgement (lock held)."""
        if self._last_heard is None:
            return True
        now = time.monotonic()
        if now - max(self._last_heard(), self._last_acknowledged) <= FRESH_SECONDS:
            return True
        if self._probe_mid is None:
            self._probe_mid = self._probe()
            self._probe_sent = now
        return False

    def _take_acknowledgements(self) -> int:
        """PUBACKs received so far free their place in the window (in memory only)."""
        freed = 0
        while True:
            try:
                mid = self._acks.get_nowait()
            except queue.Empty:
                return freed
            if mid == self._probe_mid:
                self._probe_mid = None
                self._last_acknowledged = time.monotonic()
                freed += 1
                continue
            seq = self._in_flight.pop(mid, None)
            self._handed_at.pop(mid, None)
            if seq is not None:
                self._acknowledged.append(seq)
                self._last_acknowledged = time.monotonic()
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
        room = self._window() - len(self._in_flight)
        if room <= 0 or not self._is_connected():
            return 0
        events = self._outbox.try_pending(self._last_handed, room, wait=wait_for_outbox)
        if events is None:
            self._wake()
            return 0
        if events and not self._link_fresh():
            return 0
        handed = 0
        for event in events:
            replayed = event.boot_id != self._boot_id or self._clock() - event.created > self._live_window
            mid = self._publish(event, replayed)
            if mid is None:
                break  # disconnected meanwhile; retried on the next pump
            self._in_flight[mid] = event.seq
            self._handed_at[mid] = time.monotonic()
            with self._handed:
                self._last_handed = event.seq
                self._handed.notify_all()
            handed += 1
        return handed

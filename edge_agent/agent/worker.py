"""The engine worker: the one thread that converts audio and runs every stream's detector.

Audio items arrive on a :class:`WorkQueue` (bounded: a full queue refuses audio, never blocks
the thread that received it); detections leave on the detection sink's queue. The worker
calls nobody back: it reports refused input to the :class:`ErrorReporter` it was given, and
results go downstream as :class:`~edge_agent.agent.items.Detected` and
:class:`~edge_agent.agent.items.StreamClosed` items.

Each pass takes everything queued: audio is gathered per stream and run as one batched engine
pass, flushed before any other item, so stream controls and configuration changes keep their
place in the order things arrived. Everything that changes the worker's state (new keywords,
mute, stream limits, a reloaded model) is itself an item on the queue, applied on this thread
between two passes: no lock is needed around a detector.

The worker is supervised: an exception while handling one item is reported for that item and
the loop goes on; if the loop itself dies, ``alive`` turns false and health shows it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from edge_agent.agent.errors import ErrorReporter
from edge_agent.agent.false_alarms import FalseAlarmWindow
from edge_agent.agent.items import (
    AudioChunk,
    AudioItem,
    Detected,
    EngineSettings,
    PcmChunk,
    RecordingRequest,
    StreamClosed,
    StreamEnd,
    StreamStart,
    WavChunk,
    is_network_kind,
)
from edge_agent.agent.streams import StreamSnapshot, StreamState
from edge_agent.audio.pcm import DEFAULT_PCM, AudioFormatError, PcmFormat
from edge_agent.audio.wav import WavError
from edge_agent.engine.decoder import CompiledKeyword, Detection
from edge_agent.engine.detector import feed_many
from edge_agent.engine.model import KwsModel
from edge_agent.recording import Recording, RecordingBusy, RecordingScan

log = logging.getLogger(__name__)

# Most queued items taken into one pass.
_MAX_BATCH_ITEMS = 4096
# How often an idle worker looks for streams that went quiet (seconds).
_IDLE_CHECK_SECONDS = 0.5
# After a batch of detections the worker waits at most this long for the sink to hand them to
# MQTT before analysing more audio: while they go out (several windows of the broker's Receive
# Maximum when many streams fire at once) it holds neither the GIL nor a core ...
_HAND_OVER_WAIT_SECONDS = 0.1
# ... and after such a wait timed out (a broker that stopped acknowledging), it does not wait at
# all for this long: it must not lose a tenth of a second on every chunk.
_NO_WAIT_AFTER_TIMEOUT_SECONDS = 5.0


# Recordings scored at once (each holds its WAV and a detector); more are refused as busy.
MAX_RECORDINGS = 4


@dataclass(frozen=True)
class _Job:
    request: RecordingRequest
    scan: RecordingScan


@dataclass(frozen=True)
class _Apply:
    """Run ``action`` on the worker thread, then set ``done``."""

    action: Callable[[], None]
    done: threading.Event = field(default_factory=threading.Event)


_Item = AudioItem | RecordingRequest | _Apply


def _item_bytes(item: _Item) -> int:
    return int(getattr(item, "nbytes", 0))


class WorkQueue:
    """The worker's inbox, bounded in bytes of audio (a 20 ms chunk and a 60 s file differ
    3000-fold, so items are not the unit). Controls and configuration changes carry no audio
    and are always admitted. Any thread may put; only the worker takes.

    When the bound is reached, the oldest queued audio chunks make room for the new one (fresh
    audio is worth more to a live stream than stale audio); each one dropped is handed to the
    ``evicted`` listener (:meth:`on_evicted`), which counts and reports it. Recordings and
    controls are never dropped."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: deque[_Item | None] = deque()
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._taker_waits = False  # the worker sleeps in take(): only then is it woken
        self._bytes = 0  # queued and taken but not yet handled
        self._seconds = 0.0
        self._waiting_audio_bytes = 0  # audio still queued (what may be dropped)
        self.high_water = 0
        self.refused = 0
        self._evicted: Callable[[AudioItem], None] = lambda item: None

    def on_evicted(self, listener: Callable[[AudioItem], None]) -> None:
        """``listener(item)`` for each queued audio chunk dropped to make room (any thread)."""
        self._evicted = listener

    def put(self, item: _Item) -> bool:
        """Queue ``item``, dropping the oldest queued audio if its audio would overflow the
        bound; False (refused) when even that is not enough. Never blocks."""
        audio = type(item) in _AUDIO_TYPES or _is_audio(item)
        if audio:
            size: int = item.nbytes  # type: ignore[union-attr]
            seconds: float = item.seconds  # type: ignore[union-attr]
        else:
            size, seconds = _item_bytes(item), 0.0
        dropped: list[AudioItem] = []
        with self._lock:
            if size and self._bytes + size > self.max_bytes:
                # Only audio still waiting can go (what the worker took is being scored).
                if not audio or self._bytes - self._waiting_audio_bytes + size > self.max_bytes:
                    self.refused += 1
                    return False
                dropped = self._make_room(size)
            self._items.append(item)
            self._bytes += size
            self._seconds += seconds
            if audio:
                self._waiting_audio_bytes += size
            if self._bytes > self.high_water:
                self.high_water = self._bytes
            if self._taker_waits:
                self._ready.notify()
        for chunk in dropped:
            self._evicted(chunk)
        return True

    def extend(self, items: list[_Item]) -> None:
        """Queue ``items`` whose bound is kept elsewhere (a worker process's read-ahead: the
        agent counts them until they are handled): nothing is dropped or refused."""
        size = seconds = audio_bytes = 0
        for item in items:
            if type(item) in _AUDIO_TYPES or _is_audio(item):
                nbytes = item.nbytes  # type: ignore[union-attr]
                size += nbytes
                audio_bytes += nbytes
                seconds += item.seconds  # type: ignore[union-attr]
            else:
                size += _item_bytes(item)
        with self._lock:
            self._items.extend(items)
            self._bytes += size
            self._seconds += seconds
            self._waiting_audio_bytes += audio_bytes
            if self._bytes > self.high_water:
                self.high_water = self._bytes
            if self._taker_waits:
                self._ready.notify()

    def _make_room(self, size: int) -> list[AudioItem]:
        """Take the oldest waiting audio chunks out until ``size`` fits (lock held). Controls
        met on the way go back to the front in their order: a drop costs the items it passes,
        not a copy of the queue (a worker far behind drops at every put)."""
        dropped: list[AudioItem] = []
        kept: list[_Item | None] = []
        items = self._items
        while items and self._bytes + size > self.max_bytes:
            queued = items.popleft()
            if _is_audio(queued):
                dropped.append(queued)  # type: ignore[arg-type]
                self._count(queued, -1)
            else:
                kept.append(queued)
        items.extendleft(reversed(kept))
        return dropped

    def _count(self, item: _Item | None, sign: int) -> None:
        size = _item_bytes(item)
        self._bytes += sign * size
        self._seconds += sign * _item_seconds(item)
        if _is_audio(item):
            self._waiting_audio_bytes += sign * size

    def close(self) -> None:
        with self._lock:
            self._items.append(None)
            self._ready.notify()

    def take(self, timeout: float) -> list[_Item | None]:
        """Everything waiting (at least one item, or none after ``timeout``)."""
        with self._lock:
            if not self._items and timeout > 0:
                self._taker_waits = True
                try:
                    self._ready.wait(timeout)
                finally:
                    self._taker_waits = False
            items = self._items
            if len(items) <= _MAX_BATCH_ITEMS:
                batch = list(items)
                items.clear()
            else:
                batch = [items.popleft() for _ in range(_MAX_BATCH_ITEMS)]
            if self._waiting_audio_bytes:
                taken = 0
                for item in batch:
                    if type(item) in _AUDIO_TYPES or _is_audio(item):
                        taken += item.nbytes  # type: ignore[union-attr]
                self._waiting_audio_bytes -= taken
            return batch

    def release(self, item: _Item) -> None:
        """``item`` (taken) was handled: its audio no longer counts."""
        size = _item_bytes(item)
        if size:
            self.release_amount(size, _item_seconds(item))

    def release_amount(self, size: int, seconds: float) -> None:
        """Taken items of ``size`` bytes and ``seconds`` of audio in all were handled (by a
        worker process, which reports totals rather than items)."""
        with self._lock:
            self._bytes -= size
            self._seconds -= seconds

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    @property
    def queued_seconds(self) -> float:
        """Seconds of live audio waiting (what the worker is behind by)."""
        return max(self._seconds, 0.0)

    def __len__(self) -> int:
        return len(self._items)


def _is_audio(item: object) -> bool:
    return isinstance(item, (PcmChunk, WavChunk, AudioChunk))


# The audio item types themselves (a type check per item is the cheapest on hot paths; a
# subclass, should there be one, is found by _is_audio).
_AUDIO_TYPES = frozenset({PcmChunk, WavChunk, AudioChunk})


def _item_seconds(item: object) -> float:
    return float(item.seconds) if _is_audio(item) else 0.0  # type: ignore[union-attr]


class ResultSink(Protocol):
    """Where the worker's results go (the detection sink's queue)."""

    def put(self, results: list[Detected | StreamClosed]) -> int:
        """Queue results; returns a ticket for :meth:`wait_handed_over`."""

    def wait_handed_over(self, ticket: int, timeout: float) -> bool:
        """Whether the sink handed everything up to ``ticket`` on within ``timeout``."""


@dataclass(frozen=True)
class WorkerBacklog:
    """How far behind one engine worker is (health shows one per worker)."""

    worker: int
    pid: int
    alive: bool
    queued_seconds: float  # live audio waiting for it
    queued_bytes: int
    streams: int
    restarts: int = 0


@dataclass
class WorkerStats:
    items: int = 0
    item_errors: int = 0
    streams_opened: int = 0
    streams_closed: int = 0
    muted_seconds: float = 0.0


class FalseAlarmReadings(Protocol):
    """Detections per hour and near misses, as health reads them."""

    def detections_per_hour(self) -> float: ...

    def near_misses(self) -> dict[str, float]: ...


class Engine(Protocol):
    """What the rest of the agent (live configuration, health, presence, services) needs of the
    engine: :class:`EngineWorker`, one thread of this process, or ``engine_pool.EnginePool``,
    the same worker loop in worker processes."""

    last_error: str | None

    @property
    def alive(self) -> bool: ...

    @property
    def stats(self) -> WorkerStats: ...

    @property
    def false_alarms(self) -> FalseAlarmReadings: ...

    @property
    def settings(self) -> EngineSettings: ...

    @property
    def keywords(self) -> list[CompiledKeyword]: ...

    @property
    def muted(self) -> bool: ...

    def start(self) -> None: ...

    def stop(self, timeout: float = 5.0) -> None: ...

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued before the call was handled."""
        ...

    def apply(self, settings: EngineSettings, timeout: float = 10.0) -> bool: ...

    def replace_model(
        self, model: KwsModel, keywords: Sequence[CompiledKeyword], timeout: float = 10.0
    ) -> bool: ...

    def snapshots(self) -> list[StreamSnapshot]: ...

    def stream_ids(self) -> list[str]: ...

    def backlog(self) -> list[WorkerBacklog]:
        """How far behind each worker is."""
        ...


class EngineWorker:
    """Owns every stream's detector and runs them on one thread."""

    def __init__(
        self,
        model: KwsModel,
        settings: EngineSettings,
        inbox: WorkQueue,
        results: ResultSink,
        errors: ErrorReporter,
    ) -> None:
        self._model = model
        self._settings = settings
        self._inbox = inbox
        self._results = results
        self._errors = errors
        self._streams: dict[str, StreamState] = {}
        self._streams_lock = threading.Lock()  # the dict only: other threads take snapshots
        self._recently_closed: dict[str, float] = {}  # stream id -> wall time of its last audio
        self._thread: threading.Thread | None = None
        self._no_wait_until = 0.0
        self._jobs: deque[_Job] = deque()  # recordings being scored, in turn
        self.stats = WorkerStats()
        self.false_alarms = FalseAlarmWindow()  # detections and near misses, for health
        self.alive = False
        self.last_error: str | None = None

    # --- lifecycle (any thread) ------------------------------------------------------------
    def start(self) -> None:
        self.alive = True
        self._thread = threading.Thread(target=self._run, name="engine-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Process what is queued, finish every stream (their last detections), stop."""
        if self._thread is None:
            return
        self._inbox.put(_Apply(self._finish_all))
        self._inbox.close()
        self._thread.join(timeout)
        self._thread = None

    def call(self, action: Callable[[], None], timeout: float) -> bool:
        """Run ``action`` on the worker thread after everything queued before it; wait for it.
        Returns False when it did not run within ``timeout`` (a dead or wedged worker)."""
        item = _Apply(action)
        self._inbox.put(item)
        return item.done.wait(timeout)

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far has been processed."""
        return self.call(lambda: None, timeout)

    def apply(self, settings: EngineSettings, timeout: float = 10.0) -> bool:
        """New keywords, decoder settings, mute and limits, from the next chunk on (waits)."""
        return self.call(lambda: self._apply(settings), timeout)

    def replace_model(
        self, model: KwsModel, keywords: Sequence[CompiledKeyword], timeout: float = 10.0
    ) -> bool:
        """A reloaded model: every stream gets a fresh detector (their state cannot carry over)."""

        def apply() -> None:
            self._model = model
            self._settings = replace(self._settings, keywords=tuple(keywords))
            for stream in self._stream_list():
                stream.detector = model.detector(self._settings.keywords, self._settings.decoder)
                if self._settings.near_misses:
                    stream.detector.take_near_misses()  # starts the near-miss pass
                stream.restart(stream.format)

        return self.call(apply, timeout)

    # --- reading (any thread) --------------------------------------------------------------
    @property
    def settings(self) -> EngineSettings:
        return self._settings

    @property
    def keywords(self) -> list[CompiledKeyword]:
        return list(self._settings.keywords)

    @property
    def muted(self) -> bool:
        return self._settings.muted

    def snapshots(self) -> list[StreamSnapshot]:
        return [stream.snapshot() for stream in self._stream_list()]

    def stream_ids(self) -> list[str]:
        with self._streams_lock:
            return list(self._streams)

    def backlog(self) -> list[WorkerBacklog]:
        """How far behind the engine is: this one thread."""
        inbox = self._inbox
        seconds = round(inbox.queued_seconds, 2)
        return [WorkerBacklog(0, os.getpid(), self.alive, seconds, inbox.queued_bytes, len(self._streams))]

    # --- the loop ----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            next_idle_check = 0.0
            while True:
                # With recordings to score, look at the queue without waiting: live audio first,
                # then one block of a recording, and so on.
                batch = self._inbox.take(0.0 if self._jobs else _IDLE_CHECK_SECONDS)
                if not self._process(batch):
                    return
                if time.monotonic() >= next_idle_check:
                    self._close_idle_streams()
                    next_idle_check = time.monotonic() + _IDLE_CHECK_SECONDS
                self._step_recording()
        except BaseException as error:  # pragma: no cover - visible in health
            self.last_error = f"worker died: {type(error).__name__}: {error}"
            log.critical(self.last_error)
            raise
        finally:
            self.alive = False

    def _process(self, batch: list[_Item | None]) -> bool:
        """Handle a batch in order; returns False at the stop sentinel."""
        waiting: dict[str, StreamState] = {}
        found: list[Detected | StreamClosed] = []
        try:
            # The batch was taken: its audio no longer counts against the queue's bound (one
            # release for the batch; what fails below is reported, not retried).
            size, seconds = 0, 0.0
            for item in batch:
                if item is not None:
                    size += _item_bytes(item)
                    seconds += _item_seconds(item)
            if size:
                self._inbox.release_amount(size, seconds)
            for item in batch:
                if item is None:
                    self._run_audio(waiting, found)
                    return False
                self.stats.items += 1
                try:
                    if isinstance(item, (PcmChunk, WavChunk, AudioChunk)):
                        self._gather(item, waiting, found)
                    else:
                        # What came before this item is scored and handed on first: whoever
                        # waits for it (a drain, a change) then sees everything that preceded it.
                        self._run_audio(waiting, found)
                        self._emit(found)
                        found = []
                        self._handle(item, found)
                except Exception as error:  # noqa: BLE001 - one bad item must not stop the worker
                    self._item_failed(getattr(item, "stream", None), error)
            self._run_audio(waiting, found)
            return True
        finally:
            self._emit(found)

    def _handle(self, item: _Item, found: list[Detected | StreamClosed]) -> None:
        if isinstance(item, StreamStart):
            existing = self._streams.get(item.stream)
            if existing is not None:
                self._found(existing, existing.finish(), found)
                existing.restart(item.fmt)
            else:
                self._open(item.stream, item.kind, item.fmt, item.origin)
        elif isinstance(item, StreamEnd):
            existing = self._streams.get(item.stream)
            if existing is not None:
                self._close(existing, found)
        elif isinstance(item, RecordingRequest):
            self._start_recording(item)
        elif isinstance(item, _Apply):
            try:
                item.action()
            finally:
                item.done.set()

    def _gather(
        self, item: PcmChunk | WavChunk | AudioChunk, waiting: dict[str, StreamState], found: list
    ) -> None:
        fmt = (item.fmt or DEFAULT_PCM) if isinstance(item, PcmChunk) else None
        stream = self._open(item.stream, item.kind, fmt, item.origin)
        if stream is None:
            return
        if self._settings.muted:
            self.stats.muted_seconds += item.seconds
            if isinstance(item, AudioChunk) and item.final:
                stream.restart(None)  # the stream ended while muted: the next one starts afresh
            return
        if isinstance(item, AudioChunk):
            samples, at = item.samples, item.captured_at
        else:
            try:
                samples = stream.convert(item)
            except (WavError, AudioFormatError) as error:
                self._errors.report("bad_wav", str(error), topic=item.origin, stream=item.stream)
                return
            at = item.received_at
        gap = stream.append(samples, at)
        waiting[stream.id] = stream
        if gap and not isinstance(item, AudioChunk):
            self._errors.report(
                "audio_gap",
                f"audio arrived {gap:.1f} s later than the stream's own length allows: audio sent "
                "meanwhile was probably lost (broker restart, network outage) or the sender paused; "
                "detection goes on from here",
                topic=item.origin,
                stream=stream.id,
            )
        if isinstance(item, AudioChunk) and item.final:
            self._run_audio(waiting, found)
            self._found(stream, stream.finish(), found)
            stream.restart(None)

    def _run_audio(self, waiting: dict[str, StreamState], found: list[Detected | StreamClosed]) -> None:
        """One batched engine pass over the audio gathered per stream."""
        streams = [stream for stream in waiting.values() if stream.has_pending]
        waiting.clear()
        if not streams:
            return
        chunks = [stream.take_pending() for stream in streams]
        started = time.perf_counter()
        try:
            results = feed_many([stream.detector for stream in streams], chunks)
        except Exception as error:  # noqa: BLE001 - reported; the streams go on with the next audio
            self._item_failed(streams[0].id if len(streams) == 1 else None, error)
            return
        elapsed = time.perf_counter() - started
        total = sum(chunk.shape[0] for chunk in chunks) or 1
        for stream, chunk, detections in zip(streams, chunks, results, strict=True):
            stream.counters.processing_seconds += elapsed * chunk.shape[0] / total
            self._found(stream, detections, found)

    def _emit(self, found: list[Detected | StreamClosed]) -> None:
        """Results of a pass downstream; then, if it held detections, a short bounded wait
        for the sink to hand them on (see :data:`_HAND_OVER_WAIT_SECONDS`)."""
        if not found:
            return
        ticket = self._results.put(found)
        if not any(isinstance(result, Detected) for result in found):
            return
        now = time.monotonic()
        if now < self._no_wait_until:
            return
        if not self._results.wait_handed_over(ticket, _HAND_OVER_WAIT_SECONDS):
            self._no_wait_until = now + _NO_WAIT_AFTER_TIMEOUT_SECONDS

    # --- streams ---------------------------------------------------------------------------
    def _stream_list(self) -> list[StreamState]:
        with self._streams_lock:
            return list(self._streams.values())

    def _open(self, stream_id: str, kind: str, fmt: PcmFormat | None, origin: str) -> StreamState | None:
        """The stream's state, opened on first sight within the limits; None when refused."""
        stream = self._streams.get(stream_id)
        if stream is not None:
            if stream.kind != kind:
                self._errors.report(
                    "stream_conflict",
                    f"stream id {stream_id!r} is already used by a {stream.kind} source",
                    topic=origin,
                    stream=stream_id,
                )
                return None
            return stream
        limit = self._settings.max_streams
        at_limit = is_network_kind(kind) and sum(1 for s in self._streams.values() if s.kind == kind) >= limit
        if at_limit and not self._reclaim_silent(kind):
            self._errors.report(
                "too_many_streams",
                f"already {limit} {kind} audio streams (audio.mqtt.max_streams); stream refused",
                topic=origin,
                stream=stream_id,
            )
            return None
        closed_at = self._recently_closed.pop(stream_id, None)
        if closed_at is not None:
            pause = time.time() - closed_at
            self._errors.report(
                "audio_gap",
                f"stream resumed {pause:.1f} s after it went quiet and was closed; it starts afresh "
                "(audio sent meanwhile was lost?)",
                topic=origin,
                stream=stream_id,
            )
        settings = self._settings
        detector = self._model.detector(settings.keywords, settings.decoder)
        if settings.near_misses:
            # The near-miss pass starts at the first call: from the first audio on, then, even
            # when a whole utterance arrives in the stream's first batch.
            detector.take_near_misses()
        stream = StreamState(stream_id, kind, detector, fmt)
        with self._streams_lock:
            self._streams[stream_id] = stream
        self.stats.streams_opened += 1
        log.info("stream %s (%s) opened", stream_id, kind)
        return stream

    def _reclaim_silent(self, kind: str) -> bool:
        """Free the slot of a stream of ``kind`` that was started but never sent audio the
        engine could use (the longest waiting first): a real stream must not be locked out by
        names alone. Returns whether one was freed."""
        silent = [s for s in self._stream_list() if s.kind == kind and s.counters.chunks == 0]
        if not silent:
            return False
        stream = min(silent, key=lambda s: s.last_activity)
        self._errors.report(
            "stream_reclaimed",
            f"stream {stream.id!r} never sent usable audio; its slot went to a new stream",
            stream=stream.id,
        )
        found: list[Detected | StreamClosed] = []
        self._close(stream, found)
        self._emit(found)
        return True

    def _close(self, stream: StreamState, found: list[Detected | StreamClosed], idle: bool = False) -> None:
        self._found(stream, stream.finish(), found)
        with self._streams_lock:
            self._streams.pop(stream.id, None)
        if idle:
            # Remembered (boundedly) so that a stream coming back after an outage is reported.
            if len(self._recently_closed) > 10 * self._settings.max_streams:
                self._recently_closed.clear()
            self._recently_closed[stream.id] = stream.counters.last_audio or time.time()
        self.stats.streams_closed += 1
        log.info("stream %s closed after %.1f s of audio", stream.id, stream.counters.audio_seconds)
        found.append(StreamClosed(stream.id, stream.kind))

    def _close_idle_streams(self) -> None:
        now = time.monotonic()
        found: list[Detected | StreamClosed] = []
        for stream in self._stream_list():
            # Local sources (microphone, files) are continuous by nature; streams that arrive
            # over the network end by going quiet.
            if is_network_kind(stream.kind) and now - stream.last_activity > self._settings.idle_timeout:
                self._close(stream, found, idle=True)
        self._emit(found)

    def _finish_all(self) -> None:
        while self._jobs:
            job = self._jobs.popleft()
            job.request.reply(RecordingBusy(f"{job.request.source}: the agent is stopping"))
        found: list[Detected | StreamClosed] = []
        for stream in self._stream_list():
            if is_network_kind(stream.kind):
                self._close(stream, found)
            else:
                self._found(stream, stream.finish(), found)
        self._emit(found)

    def _found(
        self, stream: StreamState, detections: list[Detection], found: list[Detected | StreamClosed]
    ) -> None:
        stream.counters.detections += len(detections)
        near = stream.detector.take_near_misses() if self._settings.near_misses else {}
        self.false_alarms.note(len(detections), near)
        for detection in detections:
            level = stream.keyword_level(detection)
            found.append(
                Detected(
                    stream.id,
                    stream.kind,
                    detection,
                    stream.wall_time(detection.end),
                    level_dbfs=level.level_dbfs if level is not None else None,
                    snr_db=level.snr_db if level is not None else None,
                )
            )

    # --- configuration (worker thread) -------------------------------------------------------
    def _apply(self, settings: EngineSettings) -> None:
        old = self._settings
        if settings.keywords != old.keywords or settings.decoder != old.decoder:
            for stream in self._stream_list():
                stream.detector.set_keywords(list(settings.keywords), settings.decoder)
        if old.near_misses and not settings.near_misses:
            for stream in self._stream_list():
                stream.detector.stop_near_misses()
        if settings.near_misses and not old.near_misses:
            for stream in self._stream_list():
                stream.detector.take_near_misses()  # starts the near-miss pass
        if old.muted and not settings.muted:
            # Audio was skipped while muted: every stream starts afresh.
            for stream in self._stream_list():
                stream.restart(stream.format)
        self._settings = settings

    # --- whole recordings --------------------------------------------------------------------
    def _start_recording(self, request: RecordingRequest) -> None:
        """Check the recording (a bad one is answered at once) and queue it for scoring."""
        if len(self._jobs) >= MAX_RECORDINGS:
            request.reply(
                RecordingBusy(f"{request.source}: {MAX_RECORDINGS} recordings are being scored; try again")
            )
            return
        try:
            recording = Recording(request.wav, name=request.source)
        except WavError as error:
            request.reply(error)
            return
        settings = self._settings
        keywords = request.keywords if request.keywords is not None else settings.keywords
        decoder = request.decoder if request.decoder is not None else settings.decoder
        scan = RecordingScan(self._model, keywords, decoder, recording.blocks())
        self._jobs.append(_Job(request, scan))

    def _step_recording(self) -> None:
        """One block of the oldest recording, then it waits its turn again."""
        if not self._jobs:
            return
        job = self._jobs.popleft()
        try:
            more = job.scan.step()
        except WavError as error:
            job.request.reply(error)
            return
        except Exception as error:  # noqa: BLE001 - this request fails; the worker goes on
            self._item_failed(None, error)
            job.request.reply(WavError(f"{job.request.source}: internal error: {error}"))
            return
        if more:
            self._jobs.append(job)
        else:
            job.request.reply(job.scan.result())

    def _item_failed(self, stream: str | None, error: Exception) -> None:
        self.stats.item_errors += 1
        self.last_error = f"{type(error).__name__}: {error}"
        log.exception("worker failed (stream %s)", stream)
        self._errors.report("internal_error", self.last_error, stream=stream)

"""The inference worker: the one thread that runs detectors, fed through a bounded queue.

Network callbacks and audio sources only *submit* work (never block, never infer); this
thread converts audio, runs each stream's detector in arrival order, answers whole-file
requests, and closes streams that went quiet. A full queue refuses new work (counted and
reported) instead of growing without bound. The worker is supervised: an exception while
handling one item is reported for that item and the loop goes on; if the loop itself dies,
``alive`` turns false and health shows it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from edge_agent.audio.pcm import AudioFormatError, PcmConverter, PcmFormat, level_dbfs
from edge_agent.audio.wav import WavError, parse_wav, to_mono_16k
from edge_agent.engine.decoder import CompiledKeyword, Detection
from edge_agent.engine.detector import KeywordDetector, feed_many
from edge_agent.engine.features import SAMPLE_RATE_HZ
from edge_agent.engine.model import DecoderSettings, KwsModel

log = logging.getLogger(__name__)

# Time constant of the input level reported in health (seconds).
_LEVEL_SECONDS = 1.0
# A stream whose audio arrives this much later than its length explains has lost audio (s).
GAP_SECONDS = 1.0
# Most queued items taken into one batch.
_MAX_BATCH_ITEMS = 4096


# --- work items ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PcmChunk:
    """Raw PCM bytes of an MQTT stream; ``fmt`` when the message declared its format."""

    stream: str
    data: bytes
    received_at: float
    topic: str
    fmt: PcmFormat | None = None


@dataclass(frozen=True)
class SampleChunk:
    """16 kHz mono samples from a local source (microphone, file)."""

    stream: str
    kind: str
    samples: np.ndarray
    captured_at: float
    final: bool = False


@dataclass(frozen=True)
class StreamControlItem:
    stream: str
    action: str  # "start" | "end"
    topic: str
    fmt: PcmFormat | None = None


@dataclass(frozen=True)
class FileRequest:
    """A whole WAV file to scan; ``reply(result)`` is called on the worker thread."""

    wav: bytes
    source: str
    reply: Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class CallItem:
    """Run ``action`` on the worker thread, between audio chunks (configuration changes)."""

    action: Callable[[], None]


WorkItem = PcmChunk | SampleChunk | StreamControlItem | FileRequest | CallItem


def _item_bytes(item: WorkItem) -> int:
    if isinstance(item, PcmChunk):
        return len(item.data)
    if isinstance(item, SampleChunk):
        return int(item.samples.nbytes)
    if isinstance(item, FileRequest):
        return len(item.wav)
    return 0


@dataclass(frozen=True)
class Found:
    """A detection with the stream it was made on and the wall time of the keyword's end."""

    stream: StreamState
    detection: Detection
    wall_end: float


class WorkerEvents(Protocol):
    """What the worker reports to the agent (called on the worker thread)."""

    def detected(self, found: list[Found]) -> None:
        """The detections of one engine pass (or one finished stream), in order."""

    def refuse(
        self, code: str, message: str, topic: str | None = None, stream: str | None = None
    ) -> None: ...

    def stream_closed(self, stream: str) -> None: ...


# --- per-stream state ------------------------------------------------------------------------


@dataclass
class StreamCounters:
    audio_seconds: float = 0.0
    chunks: int = 0
    dropped_chunks: int = 0
    processing_seconds: float = 0.0
    last_audio: float | None = None  # wall clock
    level_power: float | None = None  # smoothed mean square, 16-bit units
    detections: int = 0
    errors: int = 0
    gaps: int = 0
    gap_seconds: float = 0.0

    def rtf(self) -> float | None:
        return self.processing_seconds / self.audio_seconds if self.audio_seconds > 0 else None


class StreamState:
    """One audio stream: its detector, its format converter, its counters, its clock."""

    def __init__(self, stream_id: str, kind: str, detector: KeywordDetector, fmt: PcmFormat | None) -> None:
        self.id = stream_id
        self.kind = kind
        self.detector = detector
        self.converter = PcmConverter(fmt) if fmt is not None else None
        self.counters = StreamCounters()
        self.last_activity = time.monotonic()
        # (samples fed so far, wall time of the last of them): maps stream time to wall time.
        self._clock_marks: deque[tuple[int, float]] = deque(maxlen=256)
        self._samples_fed = 0
        self._pending: list[np.ndarray] = []
        self._clock_offset: float | None = None

    def append(self, samples: np.ndarray, captured_at: float) -> float:
        """Queue converted audio for the next batch; counters and clock are updated now.

        Returns the seconds of audio missing before this chunk (0.0 normally): arrival time
        minus stream position stays constant for a real-time sender, and jumps by the length
        of whatever was lost on the way (a broker restart, a network outage).
        """
        gap = 0.0
        offset = captured_at - (self._samples_fed + samples.shape[0]) / SAMPLE_RATE_HZ
        if self._clock_offset is not None and offset - self._clock_offset > GAP_SECONDS:
            gap = offset - self._clock_offset
            self.counters.gaps += 1
            self.counters.gap_seconds += gap
        self._clock_offset = offset
        self._samples_fed += samples.shape[0]
        self._clock_marks.append((self._samples_fed, captured_at))
        self._pending.append(samples)
        self._account(samples, captured_at)
        return gap

    def take_pending(self) -> np.ndarray:
        pending, self._pending = self._pending, []
        if len(pending) == 1:
            return pending[0]
        return np.concatenate(pending) if pending else np.zeros(0, np.float32)

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def finish(self) -> list[Detection]:
        tail = self.converter.finish() if self.converter is not None else np.zeros(0, np.float32)
        if tail.size:
            self._samples_fed += tail.shape[0]
        audio = np.concatenate([self.take_pending(), tail])
        detections = self.detector.feed(audio) if audio.size else []
        detections += self.detector.finish()
        # Walls are computed before the reset of the clock marks.
        return detections

    def restart(self, fmt: PcmFormat | None) -> None:
        """A new stream under the same id: fresh detector state and clock, new format."""
        self.detector.reset()
        self.converter = PcmConverter(fmt) if fmt is not None else None
        self._clock_marks.clear()
        self._samples_fed = 0
        self._pending = []
        self._clock_offset = None

    def wall_time(self, stream_seconds: float) -> float:
        """Wall-clock time at ``stream_seconds`` into the stream (from arrival times)."""
        target = int(round(stream_seconds * SAMPLE_RATE_HZ))
        for fed, wall in self._clock_marks:
            if fed >= target:
                return wall - (fed - target) / SAMPLE_RATE_HZ
        if self._clock_marks:
            fed, wall = self._clock_marks[-1]
            return wall - (fed - target) / SAMPLE_RATE_HZ
        return time.time()

    def _account(self, samples: np.ndarray, captured_at: float) -> None:
        counters = self.counters
        seconds = samples.shape[0] / SAMPLE_RATE_HZ
        counters.audio_seconds += seconds
        counters.chunks += 1
        counters.last_audio = captured_at
        self.last_activity = time.monotonic()
        if samples.size:
            power = float(np.dot(samples, samples)) / samples.shape[0]
            weight = min(1.0, seconds / _LEVEL_SECONDS)
            previous = counters.level_power
            counters.level_power = power if previous is None else previous + weight * (power - previous)

    def level(self) -> float | None:
        power = self.counters.level_power
        if power is None:
            return None
        return level_dbfs(np.array([np.sqrt(power)], dtype=np.float64))


# --- the worker ------------------------------------------------------------------------------


@dataclass
class WorkerStats:
    items: int = 0
    refused_items: int = 0
    item_errors: int = 0
    streams_opened: int = 0
    streams_closed: int = 0
    muted_seconds: float = 0.0
    queue_high_water: int = 0
    refusals: dict[str, int] = field(default_factory=dict)


class EngineWorker:
    """Owns every stream's detector and runs them on one thread."""

    def __init__(
        self,
        model: KwsModel,
        keywords: Sequence[CompiledKeyword],
        settings: DecoderSettings,
        events: WorkerEvents,
        *,
        max_streams: int = 64,
        idle_timeout: float = 10.0,
        max_queued_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self._model = model
        self._keywords = list(keywords)
        self._settings = settings
        self._events = events
        self.max_streams = max_streams
        self.idle_timeout = idle_timeout
        # Bounded by bytes, not items: a 20 ms chunk and a 60 s file request differ 3000-fold.
        self._queue: queue.Queue[WorkItem | None] = queue.Queue()
        self.max_queued_bytes = max_queued_bytes
        self._queued_bytes = 0
        self._queued_lock = threading.Lock()
        self._streams: dict[str, StreamState] = {}
        self._recently_closed: dict[str, float] = {}  # stream id -> wall time of its last audio
        self._streams_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self.stats = WorkerStats()
        self.muted = False
        self.alive = False
        self.last_error: str | None = None

    # --- submitting (any thread, never blocks) ------------------------------------------
    def submit(self, item: WorkItem) -> bool:
        size = _item_bytes(item)
        with self._queued_lock:
            if self._queued_bytes + size > self.max_queued_bytes and not isinstance(item, CallItem):
                self.stats.refused_items += 1
                return False
            self._queued_bytes += size
            if self._queued_bytes > self.stats.queue_high_water:
                self.stats.queue_high_water = self._queued_bytes
        self._queue.put_nowait(item)
        return True

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._stopped.clear()
        self.alive = True
        self._thread = threading.Thread(target=self._run, name="engine-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0, finish_streams: bool = True) -> None:
        """Process what is queued, finish every stream (their last detections), stop."""
        if self._thread is None:
            return
        if finish_streams:
            self._queue.put(CallItem(self._finish_all))
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None

    def drain(self, timeout: float = 10.0) -> bool:
        """Block until everything submitted so far has been processed (tests, shutdown)."""
        done = threading.Event()
        deadline = time.monotonic() + timeout
        while not self.submit(CallItem(done.set)):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return done.wait(max(0.0, deadline - time.monotonic()))

    # --- configuration (applied on the worker thread) -------------------------------------
    def set_keywords(
        self, keywords: Sequence[CompiledKeyword], settings: DecoderSettings | None = None
    ) -> None:
        """New keywords (and decoder settings) for every stream, from the next chunk on."""

        def apply() -> None:
            self._keywords = list(keywords)
            if settings is not None:
                self._settings = settings
            for stream in self.streams():
                stream.detector.set_keywords(self._keywords, settings)

        self._queue.put(CallItem(apply))

    def replace_model(self, model: KwsModel, keywords: Sequence[CompiledKeyword]) -> None:
        """A reloaded model: every stream gets a fresh detector (their state cannot carry over)."""

        def apply() -> None:
            self._model = model
            self._keywords = list(keywords)
            for stream in self.streams():
                stream.detector = model.detector(self._keywords, self._settings)
                stream.restart(stream.converter.format if stream.converter else None)

        self._queue.put(CallItem(apply))

    @property
    def keywords(self) -> list[CompiledKeyword]:
        return list(self._keywords)

    def set_muted(self, muted: bool) -> None:
        def apply() -> None:
            if self.muted and not muted:
                # Audio was skipped while muted: every stream starts afresh.
                for stream in self.streams():
                    stream.restart(stream.converter.format if stream.converter else None)
            self.muted = muted

        self._queue.put(CallItem(apply))

    def streams(self) -> list[StreamState]:
        with self._streams_lock:
            return list(self._streams.values())

    # --- the loop --------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                try:
                    first = self._queue.get(timeout=0.5)
                except queue.Empty:
                    self._close_idle_streams()
                    continue
                batch = [first]
                # Everything already waiting joins this batch: when the worker falls behind, the
                # batches grow and the per-chunk overhead shrinks, instead of the delay growing.
                while len(batch) < _MAX_BATCH_ITEMS:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                if not self._process(batch):
                    return
                self._close_idle_streams()
        except BaseException as error:  # pragma: no cover - visible in health
            self.last_error = f"worker died: {type(error).__name__}: {error}"
            log.critical(self.last_error)
            raise
        finally:
            self.alive = False

    def _process(self, batch: list[WorkItem | None]) -> bool:
        """Handle a batch in order. Audio is gathered per stream and run as one engine pass,
        flushed before any other item, so controls and configuration changes keep their place.
        Returns False at the stop sentinel."""
        waiting: dict[str, StreamState] = {}
        for item in batch:
            if item is None:
                self._run_audio(waiting)
                return False
            with self._queued_lock:
                self._queued_bytes -= _item_bytes(item)
            self.stats.items += 1
            try:
                if isinstance(item, PcmChunk):
                    self._gather_pcm(item, waiting)
                elif isinstance(item, SampleChunk):
                    self._gather_samples(item, waiting)
                else:
                    self._run_audio(waiting)
                    self._handle(item)
            except Exception as error:  # noqa: BLE001 - one bad item must not stop the worker
                self._item_failed(getattr(item, "stream", None), error)
        self._run_audio(waiting)
        return True

    def _item_failed(self, stream: str | None, error: Exception) -> None:
        self.stats.item_errors += 1
        self.last_error = f"{type(error).__name__}: {error}"
        log.exception("worker failed (stream %s)", stream)
        try:
            self._events.refuse("internal_error", self.last_error, stream=stream)
        except Exception:
            log.exception("could not report a worker error")

    def _run_audio(self, waiting: dict[str, StreamState]) -> None:
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
        found = []
        for stream, chunk, detections in zip(streams, chunks, results, strict=True):
            stream.counters.processing_seconds += elapsed * chunk.shape[0] / total
            found += self._found(stream, detections)
        if found:
            self._events.detected(found)

    def _handle(self, item: WorkItem) -> None:
        if isinstance(item, StreamControlItem):
            self._handle_control(item)
        elif isinstance(item, FileRequest):
            item.reply(self.scan_wav(item.wav, item.source))
        elif isinstance(item, CallItem):
            item.action()

    def _stream(
        self, stream_id: str, kind: str, fmt: PcmFormat | None, topic: str | None
    ) -> StreamState | None:
        stream = self._streams.get(stream_id)
        if stream is not None:
            if stream.kind != kind:
                self._refuse(
                    "stream_conflict",
                    f"stream id {stream_id!r} is already used by a {stream.kind} source",
                    topic,
                    stream_id,
                )
                return None
            return stream
        if kind == "mqtt" and sum(1 for s in self._streams.values() if s.kind == "mqtt") >= self.max_streams:
            self._refuse(
                "too_many_streams",
                f"already {self.max_streams} MQTT audio streams (audio.mqtt.max_streams); stream refused",
                topic,
                stream_id,
            )
            return None
        closed_at = self._recently_closed.pop(stream_id, None)
        if closed_at is not None and topic is not None:
            pause = time.time() - closed_at
            self._refuse(
                "audio_gap",
                f"stream resumed {pause:.1f} s after it went quiet and was closed; it starts afresh "
                "(audio sent meanwhile was lost?)",
                topic,
                stream_id,
            )
        detector = self._model.detector(self._keywords, self._settings)
        stream = StreamState(stream_id, kind, detector, fmt)
        with self._streams_lock:
            self._streams[stream_id] = stream
        self.stats.streams_opened += 1
        log.info("stream %s (%s) opened", stream_id, kind)
        return stream

    def _gather_pcm(self, item: PcmChunk, waiting: dict[str, StreamState]) -> None:
        stream = self._stream(item.stream, "mqtt", item.fmt or PcmFormat(), item.topic)
        if stream is None:
            return
        if self.muted:
            self.stats.muted_seconds += len(item.data) / (item.fmt or PcmFormat()).bytes_per_second
            return
        if item.fmt is not None and (stream.converter is None or stream.converter.format != item.fmt):
            # A chunk declaring a different format: convert from here on; keep detector state.
            stream.converter = PcmConverter(item.fmt)
        if stream.converter is None:
            stream.converter = PcmConverter(PcmFormat())
        gap = stream.append(stream.converter.convert(item.data), item.received_at)
        waiting[stream.id] = stream
        if gap:
            self._refuse(
                "audio_gap",
                f"audio arrived {gap:.1f} s later than the stream's own length allows: audio sent "
                "meanwhile was probably lost (broker restart, network outage) or the sender paused; "
                "detection goes on from here",
                item.topic,
                stream.id,
            )

    def _gather_samples(self, item: SampleChunk, waiting: dict[str, StreamState]) -> None:
        stream = self._stream(item.stream, item.kind, None, None)
        if stream is None:
            return
        if self.muted:
            self.stats.muted_seconds += item.samples.shape[0] / SAMPLE_RATE_HZ
            if item.final:
                stream.restart(None)  # the stream ended while muted: the next one starts afresh
            return
        stream.append(item.samples, item.captured_at)
        waiting[stream.id] = stream
        if item.final:
            self._run_audio(waiting)
            self._emit(stream, stream.finish())
            stream.restart(None)

    def _handle_control(self, item: StreamControlItem) -> None:
        if item.action == "start":
            existing = self._streams.get(item.stream)
            if existing is not None:
                self._emit(existing, existing.finish())
                existing.restart(item.fmt or PcmFormat())
            else:
                self._stream(item.stream, "mqtt", item.fmt or PcmFormat(), item.topic)
        elif item.action == "end":
            existing = self._streams.get(item.stream)
            if existing is not None:
                self._close(existing)

    def _close(self, stream: StreamState, idle: bool = False) -> None:
        self._emit(stream, stream.finish())
        with self._streams_lock:
            self._streams.pop(stream.id, None)
        if idle:
            # Remembered (boundedly) so that a stream coming back after an outage is reported.
            if len(self._recently_closed) > 10 * self.max_streams:
                self._recently_closed.clear()
            self._recently_closed[stream.id] = stream.counters.last_audio or time.time()
        self.stats.streams_closed += 1
        log.info("stream %s closed after %.1f s of audio", stream.id, stream.counters.audio_seconds)
        self._events.stream_closed(stream.id)

    def _close_idle_streams(self) -> None:
        now = time.monotonic()
        for stream in self.streams():
            # Local sources (microphone, files) are continuous by nature; streams that arrive
            # over the network end by going quiet.
            if stream.kind in ("mqtt", "hermes") and now - stream.last_activity > self.idle_timeout:
                self._close(stream, idle=True)

    def _finish_all(self) -> None:
        for stream in self.streams():
            if stream.kind == "mqtt":
                self._close(stream)
            else:
                self._emit(stream, stream.finish())

    def _emit(self, stream: StreamState, detections: list[Detection]) -> None:
        found = self._found(stream, detections)
        if found:
            self._events.detected(found)

    @staticmethod
    def _found(stream: StreamState, detections: list[Detection]) -> list[Found]:
        stream.counters.detections += len(detections)
        return [Found(stream, detection, stream.wall_time(detection.end)) for detection in detections]

    def _refuse(self, code: str, message: str, topic: str | None, stream: str | None) -> None:
        self.stats.refusals[code] = self.stats.refusals.get(code, 0) + 1
        self._events.refuse(code, message, topic=topic, stream=stream)

    # --- whole files ---------------------------------------------------------------------
    def scan_wav(self, wav: bytes, source: str) -> dict[str, Any]:
        """Detections in one WAV file with a fresh detector; errors are a result, not raised."""
        started = time.perf_counter()
        try:
            samples = to_mono_16k(parse_wav(wav, source=source))
        except (WavError, AudioFormatError) as error:
            return {"ok": False, "error": str(error)}
        detector = self._model.detector(self._keywords, self._settings)
        detections = detector.finish(samples)  # the whole recording in one pass
        return {
            "ok": True,
            "detected": bool(detections),
            "detections": [d.to_dict() for d in detections],
            "duration_s": round(samples.shape[0] / SAMPLE_RATE_HZ, 3),
            "processing_ms": round((time.perf_counter() - started) * 1000, 2),
        }

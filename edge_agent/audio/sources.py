"""Local audio sources: the contract every source meets, and WAV files played like a microphone.

A source produces :class:`AudioChunk` objects (16 kHz mono float32 in 16-bit units, the agent's
one audio contract) on its own daemon thread and hands each to a non-blocking :data:`Sink`. The
sink returns False when its queue is full; the source counts a dropped chunk, except a file
source replaying as fast as possible (``realtime: false``), which offers the chunk again: a batch
replay must be lossless.

Chunks are cut from one continuous stream (files and the silence between them), so every chunk
holds exactly ``chunk_ms`` of audio except the final one, which may be shorter. The microphone
source lives in :mod:`edge_agent.audio.microphone` (it needs the optional PyAudio).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar, runtime_checkable

import numpy as np

from edge_agent.audio.wav import TARGET_SAMPLE_RATE_HZ, WavError, read_wav, to_mono_16k

if TYPE_CHECKING:
    from edge_agent.config import AudioSourceConfig, FileSource

logger = logging.getLogger(__name__)

SAMPLE_RATE_HZ = TARGET_SAMPLE_RATE_HZ
# A batch replay whose sink is full offers the chunk again after this pause: short enough that a
# draining consumer is not kept waiting, long enough not to spin a core.
RETRY_SLEEP_SECONDS = 0.005
# stop() waits at most this long for a worker thread; a sink stuck longer is the consumer's bug,
# and the thread is a daemon, so it cannot keep the process alive.
JOIN_TIMEOUT_SECONDS = 2.0
# Losses are counted always (stats) but logged at most this often, so a slow consumer cannot flood
# the log with one line per chunk.
LOSS_LOG_INTERVAL_SECONDS = 10.0

_T = TypeVar("_T")


@dataclass(frozen=True)
class AudioChunk:
    """A chunk of a local stream, as the agent ingests it (see :mod:`edge_agent.agent.items`)."""

    stream: str
    kind: str  # the source's type: "file", "microphone"
    samples: np.ndarray  # float32 1-D, 16 kHz mono, in 16-bit units (full scale 32768); read-only
    captured_at: float  # time.time() when the LAST sample was captured (mic) or played (file)
    final: bool = False  # True on the last chunk of a stream (end of the last file when not looping)

    @property
    def seconds(self) -> float:
        return self.samples.shape[0] / SAMPLE_RATE_HZ

    @property
    def nbytes(self) -> int:
        return int(self.samples.nbytes)

    @property
    def origin(self) -> str:
        return self.kind


# Non-blocking; returns False when the consumer's queue is full (the source counts a dropped chunk).
Sink = Callable[[AudioChunk], bool]


@dataclass
class SourceStats:
    chunks: int = 0  # chunks the sink accepted
    dropped_chunks: int = 0  # chunks lost: refused by the sink, or (microphone) no room in the buffer
    overflows: int = 0  # device/driver overruns reported by PortAudio
    running: bool = False  # the worker thread is producing
    error: str | None = None  # the last error, for health; kept after recovery until the next one


@runtime_checkable
class AudioSource(Protocol):
    stream_id: str

    def start(self, sink: Sink) -> None:
        """Start producing on the source's own daemon thread(s); returns at once."""

    def stop(self) -> None:
        """Stop and join the threads (bounded wait); idempotent."""

    def stats(self) -> SourceStats: ...

    def describe(self) -> dict[str, object]:
        """JSON-able description for the device's retained ``info`` message."""

    @property
    def finished(self) -> bool:
        """True when a non-looping file source has played everything."""


class FixedChunker:
    """Cuts a continuous stream into chunks of ``chunk_samples``, carrying the rest across pushes."""

    def __init__(self, chunk_samples: int) -> None:
        if chunk_samples < 1:
            raise ValueError(f"chunk_samples must be at least 1, got {chunk_samples}")
        self.chunk_samples = chunk_samples
        self._pending = np.zeros(0, dtype=np.float32)

    @property
    def pending_samples(self) -> int:
        return int(self._pending.size)

    def push(self, samples: np.ndarray) -> list[np.ndarray]:
        """Add samples; return the chunks now complete (views into ``samples`` where possible)."""
        size = self.chunk_samples
        chunks: list[np.ndarray] = []
        start = 0
        if self._pending.size:
            missing = size - self._pending.size
            if samples.size < missing:
                self._pending = np.concatenate([self._pending, samples])
                return chunks
            chunks.append(np.concatenate([self._pending, samples[:missing]]))
            start = missing
        whole = (samples.size - start) // size
        chunks.extend(samples[start + i * size : start + (i + 1) * size] for i in range(whole))
        # A copy, so a pending tail does not keep a whole decoded file alive.
        self._pending = samples[start + whole * size :].astype(np.float32, copy=True)
        return chunks

    def finish(self) -> list[np.ndarray]:
        """The short last chunk, if any samples are pending."""
        rest, self._pending = self._pending, np.zeros(0, dtype=np.float32)
        return [rest] if rest.size else []


class LossLog:
    """Logs a growing loss counter: the first loss at once, then at most every interval."""

    def __init__(
        self, stream_id: str, what: str, interval_seconds: float = LOSS_LOG_INTERVAL_SECONDS
    ) -> None:
        self._stream_id = stream_id
        self._what = what
        self._interval_seconds = interval_seconds
        self._logged = 0
        self._next_log_at = 0.0

    def update(self, total: int) -> None:
        if total <= self._logged:
            return
        now = time.monotonic()
        if now < self._next_log_at:
            return
        logger.warning("audio source %s: %d %s so far", self._stream_id, total, self._what)
        self._logged = total
        self._next_log_at = now + self._interval_seconds


def _with_last(items: Iterable[_T]) -> Iterator[tuple[_T, bool]]:
    """Each item with whether it is the last; reads one item ahead."""
    iterator = iter(items)
    try:
        current = next(iterator)
    except StopIteration:
        return
    for following in iterator:
        yield current, False
        current = following
    yield current, True


def _read_only(samples: np.ndarray) -> np.ndarray:
    # Chunks may be views of one decoded file and may reach several consumers: none may write.
    view = samples.view()
    view.flags.writeable = False
    return view


class _Stopped(Exception):
    """Internal: stop() was called while the worker waited."""


class FileAudioSource:
    """Plays a WAV file, or every ``*.wav`` under a folder (sorted by relative path), like a mic.

    * Each file goes through :func:`~edge_agent.audio.wav.to_mono_16k`; ``gap_seconds`` of digital
      silence separate consecutive files (also across a loop's restart, never after the last).
    * ``realtime: true`` releases chunks on an absolute schedule against ``time.monotonic()``: the
      chunk that ends at sample ``n`` of the stream is released at ``start + n / 16000`` s, so
      late wake-ups do not accumulate drift; a refused chunk is dropped and counted, as a
      microphone would lose it. ``realtime: false`` emits as fast as the sink accepts and offers
      a refused chunk again until it is taken.
    * A file that cannot be read is skipped; its error is kept in :meth:`stats`. If a whole pass
      over the files plays nothing (missing path, empty folder, only bad files) the source stops
      with the error set and :attr:`finished` true.
    * The last chunk of the last file (not looping) has ``final=True``.
    """

    def __init__(self, config: FileSource) -> None:
        self.config = config
        self.stream_id = config.id
        self._chunk_samples = SAMPLE_RATE_HZ * config.chunk_ms // 1000
        self._gap_samples = round(config.gap_seconds * SAMPLE_RATE_HZ)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._chunks = 0
        self._dropped_chunks = 0
        self._error: str | None = None
        self._running = False
        self._finished = False
        self._files_found: int | None = None
        self._reported: set[str] = set()  # files whose error was logged (a loop would repeat it)
        self._drop_log = LossLog(config.id, "chunks dropped (the consumer's queue was full)")
        # Realtime schedule: monotonic start, and samples released since then.
        self._schedule_start: float | None = None
        self._scheduled_samples = 0

    # --- AudioSource ------------------------------------------------------------------------

    def start(self, sink: Sink) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                raise RuntimeError(f"audio source {self.stream_id!r} is already running")
            self._stop.clear()
            self._running = True
            self._finished = False
            self._schedule_start = None
            self._scheduled_samples = 0
            self._thread = threading.Thread(
                target=self._run, args=(sink,), name=f"audio-file-{self.stream_id}", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return  # never started, or stop() called from inside the sink
        thread.join(timeout=JOIN_TIMEOUT_SECONDS)
        if thread.is_alive():
            logger.warning(
                "file source %s: worker still busy %.1f s after stop (sink blocking?)",
                self.stream_id,
                JOIN_TIMEOUT_SECONDS,
            )

    def stats(self) -> SourceStats:
        with self._lock:
            return SourceStats(
                chunks=self._chunks,
                dropped_chunks=self._dropped_chunks,
                overflows=0,
                running=self._running,
                error=self._error,
            )

    def describe(self) -> dict[str, object]:
        return {
            "type": "file",
            "id": self.stream_id,
            "path": self.config.path,
            "files": self._files_found,
            "loop": self.config.loop,
            "realtime": self.config.realtime,
            "sample_rate_hz": SAMPLE_RATE_HZ,
            "chunk_ms": self.config.chunk_ms,
            "gap_seconds": self.config.gap_seconds,
        }

    @property
    def finished(self) -> bool:
        return self._finished

    # --- worker -----------------------------------------------------------------------------

    def _run(self, sink: Sink) -> None:
        try:
            self._play(sink)
            finished = not self._stop.is_set()
        except _Stopped:
            finished = False
        except Exception as error:
            # Most likely the sink raised: the death must show in health, not only in a log.
            logger.exception("file source %s stopped by an error", self.stream_id)
            self._set_error(f"stopped by an error: {error!r}")
            finished = False
        with self._lock:
            self._running = False
            self._finished = finished

    def _play(self, sink: Sink) -> None:
        chunker = FixedChunker(self._chunk_samples)
        played_any = False
        for samples, is_last in _with_last(self._decoded_files()):
            if played_any and self._gap_samples:
                for chunk in chunker.push(np.zeros(self._gap_samples, dtype=np.float32)):
                    self._deliver(sink, chunk, final=False)
            played_any = True
            chunks = chunker.push(samples)
            if is_last:
                chunks.extend(chunker.finish())
                if not chunks:  # only when a file decodes to nothing; the stream still ends
                    chunks.append(np.zeros(0, dtype=np.float32))
            for i, chunk in enumerate(chunks):
                self._deliver(sink, chunk, final=is_last and i == len(chunks) - 1)

    def _decoded_files(self) -> Iterator[np.ndarray]:
        """Decoded files in play order, pass after pass when looping; ends on a pass with none."""
        while True:
            paths = self._discover()
            played = 0
            last_error = None
            for path in paths:
                if self._stop.is_set():
                    return
                try:
                    samples = to_mono_16k(read_wav(path))
                except (WavError, OSError, ValueError, MemoryError) as error:
                    last_error = str(error) if str(path) in str(error) else f"{path}: {error}"
                    self._set_error(last_error)
                    if str(path) not in self._reported:
                        self._reported.add(str(path))
                        logger.warning("file source %s: skipping %s", self.stream_id, last_error)
                    continue
                played += 1
                yield samples
            if played == 0:
                if paths:
                    self._set_error(
                        f"{self.config.path}: none of the {len(paths)} WAV file(s) could be read "
                        f"(last error: {last_error})"
                    )
                return
            if not self.config.loop:
                return

    def _discover(self) -> list[Path]:
        """The files of one pass; an error is recorded when there are none."""
        root = Path(self.config.path)
        if root.is_dir():
            # Sorted by path relative to the folder: sub-folders play in name order too.
            paths = sorted(
                (p for p in root.rglob("*") if p.suffix.lower() == ".wav" and p.is_file()),
                key=lambda p: p.relative_to(root).as_posix(),
            )
            if not paths:
                self._set_error(f"{root}: the folder holds no .wav files")
        elif root.exists():
            paths = [root]
        else:
            paths = []
            self._set_error(f"{root}: no such file or folder")
        self._files_found = len(paths)
        return paths

    def _deliver(self, sink: Sink, samples: np.ndarray, final: bool) -> None:
        """Hand one chunk to the sink, paced and with the refusal policy of the mode."""
        if self.config.realtime:
            self._wait_until_played(samples.size)
        elif self._stop.is_set():
            raise _Stopped
        chunk = AudioChunk(self.stream_id, "file", _read_only(samples), time.time(), final)
        while not sink(chunk):
            if self.config.realtime:
                with self._lock:
                    self._dropped_chunks += 1
                self._drop_log.update(self._dropped_chunks)
                return
            if self._stop.wait(RETRY_SLEEP_SECONDS):
                raise _Stopped
        with self._lock:
            self._chunks += 1

    def _wait_until_played(self, samples: int) -> None:
        now = time.monotonic()
        if self._schedule_start is None:
            self._schedule_start = now
        self._scheduled_samples += samples
        release_at = self._schedule_start + self._scheduled_samples / SAMPLE_RATE_HZ
        # Waiting on the stop event, not time.sleep, so stop() interrupts the wait at once.
        if self._stop.wait(max(0.0, release_at - now)):
            raise _Stopped

    def _set_error(self, text: str) -> None:
        with self._lock:
            self._error = text


def create_source(config: AudioSourceConfig) -> AudioSource:
    """The source for one ``audio.sources`` entry; the microphone needs the ``mic`` extra."""
    # Imported here: the engine's worker processes import this module (its audio items) and
    # need none of the configuration.
    from edge_agent.config import FileSource

    if isinstance(config, FileSource):
        return FileAudioSource(config)
    # Imported here: the microphone module is light, but keeps PyAudio concerns out of this one.
    from edge_agent.audio.microphone import MicrophoneAudioSource

    return MicrophoneAudioSource(config)

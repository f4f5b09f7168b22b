"""One audio stream on the engine worker: its input converter, detector, counters and clock.

Only the worker thread changes a :class:`StreamState`; other threads read
:class:`StreamSnapshot` copies (health, metrics).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from edge_agent.agent.items import PcmChunk, WavChunk
from edge_agent.audio.levels import EnergyHistory, KeywordLevel
from edge_agent.audio.pcm import DEFAULT_PCM, PcmConverter, PcmFormat, level_dbfs
from edge_agent.audio.wav import WavFrameConverter
from edge_agent.engine.decoder import Detection
from edge_agent.engine.detector import KeywordDetector
from edge_agent.engine.features import SAMPLE_RATE_HZ

# Time constant of the input level reported in health (seconds).
LEVEL_SECONDS = 1.0
# A stream whose audio arrives this much later than its length explains has lost audio (s).
GAP_SECONDS = 1.0
# Clock marks kept per stream, to map stream time to wall time for recent detections.
_CLOCK_MARKS = 256


@dataclass
class StreamCounters:
    audio_seconds: float = 0.0
    chunks: int = 0
    processing_seconds: float = 0.0
    last_audio: float | None = None  # wall clock
    level_power: float | None = None  # smoothed mean square, 16-bit units
    detections: int = 0
    gaps: int = 0
    gap_seconds: float = 0.0

    def rtf(self) -> float | None:
        return self.processing_seconds / self.audio_seconds if self.audio_seconds > 0 else None


@dataclass(frozen=True)
class StreamSnapshot:
    """A stream's counters at one moment, safe to read on any thread."""

    id: str
    kind: str
    audio_seconds: float
    chunks: int
    rtf: float | None
    last_audio: float | None
    level_dbfs: float | None
    detections: int
    gaps: int
    gap_seconds: float


class _ClockMarks:
    """The last :data:`_CLOCK_MARKS` (samples fed so far, wall time of the last of them) of a
    stream, which map its stream time to wall time. Two fixed arrays used as a ring: a worker
    holds hundreds of streams, and a deque of tuples would cost each several times as much."""

    def __init__(self) -> None:
        self._fed = np.zeros(_CLOCK_MARKS, np.int64)
        self._wall = np.zeros(_CLOCK_MARKS, np.float64)
        self._count = 0  # marks added since the last clear

    def add(self, fed: int, wall: float) -> None:
        slot = self._count % _CLOCK_MARKS
        self._fed[slot] = fed
        self._wall[slot] = wall
        self._count += 1

    def clear(self) -> None:
        self._count = 0

    def wall_time(self, sample: int) -> float:
        """Wall time of ``sample`` (from the stream's start): the first mark at or after it, or
        the last mark, less the samples between them; now when there is no mark."""
        if self._count == 0:
            return time.time()
        order = np.arange(max(0, self._count - _CLOCK_MARKS), self._count) % _CLOCK_MARKS
        fed = self._fed[order]
        at = min(int(np.searchsorted(fed, sample)), order.shape[0] - 1)
        return float(self._wall[order[at]]) - (int(fed[at]) - sample) / SAMPLE_RATE_HZ


class StreamState:
    """One audio stream: converts its input, queues it for the next batch, maps its clock."""

    def __init__(self, stream_id: str, kind: str, detector: KeywordDetector, fmt: PcmFormat | None) -> None:
        self.id = stream_id
        self.kind = kind
        self.detector = detector
        self._pcm = PcmConverter(fmt) if fmt is not None else None
        self._wav: WavFrameConverter | None = None
        self.counters = StreamCounters()
        self.last_activity = time.monotonic()
        self._clock = _ClockMarks()
        self._samples_fed = 0
        self._pending: list[np.ndarray] = []
        self._clock_offset: float | None = None
        # Recent frame energies: the level of each detected keyword is measured against them.
        self.energy = EnergyHistory()

    # --- input ------------------------------------------------------------------------------
    def convert(self, item: PcmChunk | WavChunk) -> np.ndarray:
        """The chunk as 16 kHz mono samples. A PCM chunk in a new format switches the
        converter; the detector keeps its state. Raises for undecodable input."""
        if isinstance(item, PcmChunk):
            if item.fmt is not None and (self._pcm is None or self._pcm.format != item.fmt):
                self._pcm = PcmConverter(item.fmt)
            elif self._pcm is None:
                self._pcm = PcmConverter(DEFAULT_PCM)
            return self._pcm.convert(item.data)
        if self._wav is None:
            self._wav = WavFrameConverter()
        return self._wav.convert(item.data, source=item.origin)

    @property
    def format(self) -> PcmFormat | None:
        return self._pcm.format if self._pcm is not None else None

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
        self._clock.add(self._samples_fed, captured_at)
        self._pending.append(samples)
        self.energy.push(samples)
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

    # --- ends -------------------------------------------------------------------------------
    def finish(self) -> list[Detection]:
        """Score everything held (pending audio, converter tails, the decoder's look-ahead)."""
        tails = [converter.finish() for converter in (self._pcm, self._wav) if converter is not None]
        for tail in tails:
            self._samples_fed += tail.shape[0]
        audio = np.concatenate([self.take_pending(), *tails])
        detections = self.detector.feed(audio) if audio.size else []
        return detections + self.detector.finish()

    def restart(self, fmt: PcmFormat | None) -> None:
        """A new stream under the same id: fresh detector state and clock, new format."""
        self.detector.reset()
        self._pcm = PcmConverter(fmt) if fmt is not None else None
        self._wav = None
        self._clock.clear()
        self._samples_fed = 0
        self._pending = []
        self._clock_offset = None
        self.energy.reset()

    # --- time and telemetry -----------------------------------------------------------------
    def wall_time(self, stream_seconds: float) -> float:
        """Wall-clock time at ``stream_seconds`` into the stream (from arrival times)."""
        return self._clock.wall_time(int(round(stream_seconds * SAMPLE_RATE_HZ)))

    def keyword_level(self, detection: Detection) -> KeywordLevel | None:
        """The detected keyword's level and its margin over the stream's recent background."""
        return self.energy.keyword_level(detection.start, detection.end)

    def _account(self, samples: np.ndarray, captured_at: float) -> None:
        counters = self.counters
        seconds = samples.shape[0] / SAMPLE_RATE_HZ
        counters.audio_seconds += seconds
        counters.chunks += 1
        counters.last_audio = captured_at
        self.last_activity = time.monotonic()
        if samples.size:
            power = float(np.dot(samples, samples)) / samples.shape[0]
            weight = min(1.0, seconds / LEVEL_SECONDS)
            previous = counters.level_power
            counters.level_power = power if previous is None else previous + weight * (power - previous)

    def level(self) -> float | None:
        power = self.counters.level_power
        if power is None:
            return None
        return level_dbfs(np.array([np.sqrt(power)], dtype=np.float64))

    def snapshot(self) -> StreamSnapshot:
        counters = self.counters
        return StreamSnapshot(
            id=self.id,
            kind=self.kind,
            audio_seconds=counters.audio_seconds,
            chunks=counters.chunks,
            rtf=counters.rtf(),
            last_audio=counters.last_audio,
            level_dbfs=self.level(),
            detections=counters.detections,
            gaps=counters.gaps,
            gap_seconds=counters.gap_seconds,
        )

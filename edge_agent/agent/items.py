"""What flows between the agent's threads: audio into the engine worker, results out of it.

Every way audio reaches the agent (MQTT raw PCM, Hermes WAV frames, the microphone and file
sources, Wyoming clients) becomes one of the *audio items* below (local sources make
:class:`~edge_agent.audio.sources.AudioChunk` items themselves) and goes through
:meth:`edge_agent.agent.ingest.Ingest.submit` onto the worker's queue. Conversion to the
engine's 16 kHz mono happens on the worker thread, per stream, never on the thread that
received the audio. The worker answers with *results* on the detection sink's queue.

A stream is named by its id and has a *kind* (``mqtt``, ``hermes``, ``microphone``, ...): the
worker keeps one detector per stream id, and limits the streams of each network kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edge_agent.audio.pcm import DEFAULT_PCM, MIN_RATE_HZ, PcmFormat
from edge_agent.audio.sources import AudioChunk
from edge_agent.engine.decoder import CompiledKeyword, DecoderSettings, Detection

# Streams fed by local hardware or files: continuous by nature, never closed for going quiet
# and not counted against the network stream limits.
LOCAL_KINDS = frozenset({"microphone", "file"})
# The fewest bytes a second of raw PCM can take (8 kHz, mono, 8-bit): a chunk whose stream
# declared its format earlier is at most this long.
MIN_PCM_BYTES_PER_SECOND = MIN_RATE_HZ * 1
# What a queued chunk takes besides its bytes: the item, its fields, its place in the queue.
QUEUED_ITEM_BYTES = 256


def is_network_kind(kind: str) -> bool:
    return kind not in LOCAL_KINDS


# --- audio into the worker ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PcmChunk:
    """Raw PCM bytes of a network stream (MQTT audio, Wyoming chunks). ``fmt`` when the chunk
    declares its format; otherwise the stream's own (declared when it started, or 16 kHz mono
    s16le)."""

    stream: str
    kind: str
    data: bytes
    fmt: PcmFormat | None
    received_at: float  # time.time() when the chunk arrived: the wall time of its last sample
    origin: str  # where it came from (a topic, a peer): named in error reports
    # Worked out once, when it is made: the rate limit, the queue's accounting (in and out) and
    # health all ask, for every chunk of every stream. Slots: thousands wait at a time.
    seconds: float = field(init=False, repr=False, compare=False)
    nbytes: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        size = len(self.data)
        fmt = self.fmt
        # Its length in the declared format, or the default one (a stream's own declared format
        # is known only to the worker).
        object.__setattr__(self, "seconds", size / (fmt or DEFAULT_PCM).bytes_per_second)
        # What it holds while it waits for the engine: its bytes. (Its samples exist only while
        # the worker scores the batch it took, a bounded number of chunks at a time.)
        object.__setattr__(self, "nbytes", size + QUEUED_ITEM_BYTES)

    @property
    def longest_seconds(self) -> float:
        """Its length in the declared format, or at most (the stream's own format unknown here)."""
        per_second = self.fmt.bytes_per_second if self.fmt is not None else MIN_PCM_BYTES_PER_SECOND
        return len(self.data) / per_second


@dataclass(frozen=True)
class WavChunk:
    """One complete small WAV file carrying a stream's next chunk (a Hermes ``audioFrame``).

    ``seconds`` is read from its header by whoever makes the item (cheap, no decoding), so the
    rate limit can apply before the worker decodes it."""

    stream: str
    kind: str
    data: bytes
    seconds: float
    received_at: float
    origin: str

    @property
    def nbytes(self) -> int:
        """What it holds while it waits for the engine (see :class:`PcmChunk`)."""
        return len(self.data) + QUEUED_ITEM_BYTES


@dataclass(frozen=True)
class StreamStart:
    """A stream (re)starts, optionally declaring its PCM format: what was pending is finished
    first, and the detector starts afresh."""

    stream: str
    kind: str
    fmt: PcmFormat | None
    origin: str


@dataclass(frozen=True)
class StreamEnd:
    """A stream ended: its last audio is scored, its state freed (its slot too)."""

    stream: str
    kind: str
    origin: str


AudioItem = PcmChunk | WavChunk | AudioChunk | StreamStart | StreamEnd


# --- control of the worker ---------------------------------------------------------------------


@dataclass(frozen=True)
class EngineSettings:
    """What the worker applies on its own thread when the configuration changes."""

    keywords: tuple[CompiledKeyword, ...]
    decoder: DecoderSettings
    muted: bool
    max_streams: int  # per network kind
    idle_timeout: float  # seconds without audio before a network stream is closed
    near_misses: bool = False  # collect the scores that came close (a second decoding pass)


@dataclass(frozen=True)
class RecordingRequest:
    """A whole recording to score with a fresh detector, a block at a time between passes
    over live streams; ``reply(result)`` runs on the worker with a RecordingResult or the
    WavError that ended it. ``keywords``/``decoder``: this request's own, else the agent's."""

    wav: bytes
    source: str
    reply: Callable[[Any], None]
    keywords: tuple[CompiledKeyword, ...] | None = None
    decoder: DecoderSettings | None = None

    @property
    def nbytes(self) -> int:
        return len(self.wav)


# --- results out of the worker -----------------------------------------------------------------


@dataclass(frozen=True)
class Detected:
    """A detection on a stream, with the wall-clock time of the keyword's end and how loud the
    keyword was (None when the stream's energy history no longer held it)."""

    stream: str
    kind: str
    detection: Detection
    wall_end: float
    level_dbfs: float | None = None
    snr_db: float | None = None


@dataclass(frozen=True)
class StreamClosed:
    """A network stream's state was freed (it ended or went quiet)."""

    stream: str
    kind: str

"""The one way audio enters the engine: :meth:`Ingest.submit`.

MQTT raw PCM, Hermes frames, the microphone and file sources, Wyoming clients: each turns what
it received into an audio item (:mod:`edge_agent.agent.items`) and submits it here, on its own
thread. Submitting never blocks and never converts audio: it applies the limits every input
shares (the rate limit of network streams, the worker's bounded queue), reports what it refuses,
and queues the rest for the engine worker.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from edge_agent.agent.errors import ErrorReporter
from edge_agent.agent.items import (
    AudioChunk,
    AudioItem,
    PcmChunk,
    StreamEnd,
    StreamStart,
    WavChunk,
    is_network_kind,
)
from edge_agent.agent.limits import AudioRateLimiter
from edge_agent.agent.worker import WorkQueue

# Streams whose dropped chunks are remembered for health (least recently dropping forgotten).
_MAX_DROP_COUNTERS = 4096


class Ingest:
    """Admits audio items to the worker's queue. Thread-safe."""

    def __init__(
        self,
        queue: WorkQueue,
        errors: ErrorReporter,
        max_rate_factor: float = 0.0,
        rate_limiter: AudioRateLimiter | None = None,
    ) -> None:
        self._queue = queue
        self._errors = errors
        self._limiter = rate_limiter or AudioRateLimiter()
        self.max_rate_factor = max_rate_factor  # replaced whole by live configuration changes
        self._lock = threading.Lock()
        self._dropped: OrderedDict[str, int] = OrderedDict()
        queue.on_evicted(self._evicted)

    def submit(self, item: AudioItem) -> bool:
        """Queue ``item`` for the engine; False when it was refused (and reported). Local
        sources are given this method as their sink."""
        if isinstance(item, (StreamStart, StreamEnd)):
            self._queue.put(item)  # controls carry no audio: always admitted
            return True
        if isinstance(item, (PcmChunk, WavChunk)) and is_network_kind(item.kind):
            factor = self.max_rate_factor
            if not self._limiter.allow(item.stream, item.seconds, factor):
                self._errors.report(
                    "rate_limited",
                    f"stream sends faster than {factor:g}x real time (audio.mqtt.max_rate_factor); "
                    "chunk refused",
                    topic=item.origin,
                    stream=item.stream,
                )
                return False
        if self._queue.put(item):
            return True
        self._dropped_for_backlog(item, "audio chunk dropped")
        return False

    def _evicted(self, item: AudioItem) -> None:
        """The queue dropped a waiting chunk to make room for newer audio: counted and reported
        like a refused one."""
        self._dropped_for_backlog(item, "the oldest waiting audio chunk dropped for newer audio")

    def _dropped_for_backlog(self, item: AudioItem, what: str) -> None:
        self._count_drop(item.stream)
        if not isinstance(item, AudioChunk):
            # A local source counts its own drops (and a batch replay offers the chunk again).
            self._errors.report(
                "queue_full", f"the engine is behind; {what}", topic=item.origin, stream=item.stream
            )

    def forget(self, stream: str) -> None:
        """A stream closed: its rate-limit bucket and drop counter go."""
        self._limiter.forget(stream)
        with self._lock:
            self._dropped.pop(stream, None)

    def dropped(self, stream: str) -> int:
        """Chunks of ``stream`` refused or dropped because the worker's queue was full."""
        with self._lock:
            return self._dropped.get(stream, 0)

    def _count_drop(self, stream: str) -> None:
        with self._lock:
            self._dropped[stream] = self._dropped.get(stream, 0) + 1
            self._dropped.move_to_end(stream)
            while len(self._dropped) > _MAX_DROP_COUNTERS:
                self._dropped.popitem(last=False)

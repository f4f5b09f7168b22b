"""Input limits shared by every way audio reaches the agent (MQTT streams, Hermes sites, ...)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

# Audio a stream may send ahead of real time before the rate limit applies (seconds).
RATE_BURST_SECONDS = 5.0
# Streams remembered at most. The least recently seen are forgotten first: a forgotten stream
# starts again with a full bucket, which costs at most one burst of audio.
MAX_BUCKETS = 4096


@dataclass
class _Bucket:
    allowance: float
    updated: float


class AudioRateLimiter:
    """A token bucket of audio seconds per stream, refilled at ``factor`` x real time.

    A stream may send :data:`RATE_BURST_SECONDS` ahead of real time at once (a reconnecting
    device catching up), then no faster than ``factor`` times real time on average.
    """

    def __init__(
        self,
        burst_seconds: float = RATE_BURST_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        max_buckets: int = MAX_BUCKETS,
    ) -> None:
        self.burst_seconds = burst_seconds
        self._clock = clock
        self._max_buckets = max_buckets
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def allow(self, stream: str, seconds: float, factor: float) -> bool:
        """Take ``seconds`` of audio for ``stream`` if its bucket holds them; ``factor`` <= 0: no limit."""
        if factor <= 0:
            return True
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(stream)
            if bucket is None:
                bucket = self._buckets[stream] = _Bucket(self.burst_seconds, now)
                if len(self._buckets) > self._max_buckets:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(stream)
            bucket.allowance = min(self.burst_seconds, bucket.allowance + (now - bucket.updated) * factor)
            bucket.updated = now
            if seconds > bucket.allowance:
                return False
            bucket.allowance -= seconds
            return True

    def forget(self, stream: str) -> None:
        with self._lock:
            self._buckets.pop(stream, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._buckets)

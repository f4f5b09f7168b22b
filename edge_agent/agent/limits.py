"""Input limits shared by every way audio reaches the agent (MQTT streams, Hermes sites)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

# Audio a stream may send ahead of real time before the rate limit applies (seconds).
RATE_BURST_SECONDS = 5.0


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
        self, burst_seconds: float = RATE_BURST_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.burst_seconds = burst_seconds
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def allow(self, stream: str, seconds: float, factor: float) -> bool:
        """Take ``seconds`` of audio for ``stream`` if its bucket holds them; ``factor`` <= 0: no limit."""
        if factor <= 0:
            return True
        now = self._clock()
        with self._lock:
            bucket = self._buckets.setdefault(stream, _Bucket(self.burst_seconds, now))
            bucket.allowance = min(self.burst_seconds, bucket.allowance + (now - bucket.updated) * factor)
            bucket.updated = now
            if seconds > bucket.allowance:
                return False
            bucket.allowance -= seconds
            return True

    def forget(self, stream: str) -> None:
        with self._lock:
            self._buckets.pop(stream, None)

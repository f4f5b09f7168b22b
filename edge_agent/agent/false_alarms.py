"""False-alarm telemetry: detections per hour and near misses over the last hour.

The engine worker notes, after every pass over a stream, how many detections it made and the
stream's near misses (:meth:`KeywordDetector.take_near_misses`: the best confidence of a match
that stayed below its keyword's threshold); health reads the last hour. A device whose
detections per hour are far above its group's, or whose near misses crowd the threshold, is
likely to wake without being spoken to (``edge-agent fleet`` flags the first, docs/fleet.md).

The hour is kept in one-minute buckets, so memory does not grow with the number of streams or
detections. Thread-safe: the worker writes, the health thread reads.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

HOUR_S = 3600.0
BUCKET_S = 60.0


@dataclass
class _Bucket:
    index: int  # whole minutes since the window started
    detections: int = 0
    near_misses: dict[str, float] = field(default_factory=dict)


class FalseAlarmWindow:
    """Detections and per-keyword best near misses of the last hour."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._started = clock()
        self._buckets: deque[_Bucket] = deque()
        self._lock = threading.Lock()

    def note(self, detections: int, near_misses: Mapping[str, float]) -> None:
        if not detections and not near_misses:
            return
        with self._lock:
            bucket = self._current()
            bucket.detections += detections
            for keyword, score in near_misses.items():
                bucket.near_misses[keyword] = max(score, bucket.near_misses.get(keyword, 0.0))

    def detections_per_hour(self) -> float:
        """Detections in the last hour; scaled up to an hour while the agent has run less."""
        with self._lock:
            self._expire()
            count = sum(bucket.detections for bucket in self._buckets)
        observed = min(HOUR_S, max(BUCKET_S, self._clock() - self._started))
        return round(count * HOUR_S / observed, 1)

    def near_misses(self) -> dict[str, float]:
        """Per keyword, the best near miss of the last hour (keywords without one left out)."""
        best: dict[str, float] = {}
        with self._lock:
            self._expire()
            for bucket in self._buckets:
                for keyword, score in bucket.near_misses.items():
                    best[keyword] = max(score, best.get(keyword, 0.0))
        return {keyword: round(score, 4) for keyword, score in sorted(best.items())}

    def _index(self) -> int:
        return int((self._clock() - self._started) // BUCKET_S)

    def _current(self) -> _Bucket:
        index = self._index()
        if not self._buckets or self._buckets[-1].index != index:
            self._buckets.append(_Bucket(index))
            self._expire()
        return self._buckets[-1]

    def _expire(self) -> None:
        oldest = self._index() - int(HOUR_S // BUCKET_S) + 1
        while self._buckets and self._buckets[0].index < oldest:
            self._buckets.popleft()

"""Refused input, reported once per cause: counted, logged and published on ``error``.

Every component that refuses something (a malformed chunk, a stream over the limit, a full
queue) calls :meth:`ErrorReporter.report`; nothing refuses silently. Counting is exact and
shown in health; what is logged and published is rate-limited twice, so that a flood of bad
input cannot become a flood of log lines and error messages:

* per cause (code and topic, or stream): one report per :data:`ERROR_INTERVAL_SECONDS`, the next
  one saying how many were suppressed meanwhile;
* overall: at most :data:`ERRORS_PER_SECOND` reports a second on average (bursts of
  :data:`ERROR_BURST`), whatever the number of distinct causes.

The per-cause memory is bounded (least recently reported causes are forgotten first).
Thread-safe: one lock guards every counter.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Identical errors (same code and topic or stream) are reported at most this often (seconds).
ERROR_INTERVAL_SECONDS = 1.0
# Reports published per second overall, on average, and in a burst.
ERRORS_PER_SECOND = 10.0
ERROR_BURST = 20
# Causes remembered for the per-cause interval.
MAX_REMEMBERED_CAUSES = 1024


@dataclass(frozen=True)
class Refusal:
    """One report as published: the code, what happened, where, and how many like it were
    suppressed since the last report of the same cause."""

    code: str
    message: str
    topic: str | None
    stream: str | None
    suppressed: int
    time: float


@dataclass
class _Cause:
    last_reported: float
    suppressed: int = 0


class ErrorReporter:
    """Counts every refusal; logs and publishes them within the rate limits above."""

    def __init__(
        self,
        publish: Callable[[Refusal], None] = lambda refusal: None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._publish = publish
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._causes: OrderedDict[tuple[str, str | None], _Cause] = OrderedDict()
        self._budget = float(ERROR_BURST)
        self._budget_updated = clock()
        self.suppressed_total = 0

    def report(self, code: str, message: str, topic: str | None = None, stream: str | None = None) -> None:
        """Count a refusal; log and publish it unless its cause (or everyone) reported recently."""
        now = self._clock()
        key = (code, topic or stream)
        with self._lock:
            self._counts[code] = self._counts.get(code, 0) + 1
            cause = self._causes.get(key)
            if cause is not None and now - cause.last_reported < ERROR_INTERVAL_SECONDS:
                cause.suppressed += 1
                self.suppressed_total += 1
                return
            self._budget = min(
                float(ERROR_BURST), self._budget + (now - self._budget_updated) * ERRORS_PER_SECOND
            )
            self._budget_updated = now
            if self._budget < 1.0:
                if cause is not None:
                    cause.suppressed += 1
                self.suppressed_total += 1
                return
            self._budget -= 1.0
            suppressed = cause.suppressed if cause is not None else 0
            self._causes[key] = _Cause(now)
            self._causes.move_to_end(key)
            while len(self._causes) > MAX_REMEMBERED_CAUSES:
                self._causes.popitem(last=False)
        log.warning("%s%s: %s", code, f" (stream {stream})" if stream else "", message)
        refusal = Refusal(code, message, topic, stream, suppressed, self._wall_clock())
        try:
            self._publish(refusal)
        except Exception:  # reporting must never fail the caller, who is serving others
            log.exception("could not publish an error report")

    def counts(self) -> dict[str, int]:
        """Refusals since start, by code."""
        with self._lock:
            return dict(self._counts)

    def count(self, code: str) -> int:
        with self._lock:
            return self._counts.get(code, 0)

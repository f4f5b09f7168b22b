"""The seam between the HTTP layer and whatever answers it.

The HTTP code (``api.py``, ``server.py``) knows nothing of the agent, MQTT or how the model is
loaded: it talks to an :class:`ApiBackend`. Two implementations exist:

* :class:`edge_agent.http.agent_backend.AgentBackend` adapts a running :class:`Agent`
  (``edge-agent run`` with ``http.enabled``);
* :class:`edge_agent.http.standalone.StandaloneBackend` loads the model in a background thread
  for ``edge-agent serve`` (HTTP only, no MQTT).

Backends report refusals as exceptions that carry their HTTP meaning (:class:`BadRequest` is a
400, :class:`NotReady` a 503); anything else that escapes a backend is a bug, logged by the
server and answered with a generic 500.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, Protocol, runtime_checkable

from edge_agent.audio.levels import KeywordLevel
from edge_agent.engine.decoder import CompiledKeyword, Detection
from edge_agent.recording import best_detection, detection_dict, zip_levels

MetricKind = Literal["counter", "gauge"]


class ApiError(Exception):
    """A refusal the client should see: ``status`` and a one-line ``message`` (never a traceback)."""

    status = 500

    def __init__(self, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})


class BadRequest(ApiError):
    """The request itself is wrong (audio, threshold, keyword): 400."""

    status = 400


class PayloadTooLarge(ApiError):
    """The upload, or the audio in it, is larger than the limits: 413."""

    status = 413


class NotReady(ApiError):
    """The model is loading, failed to load, or every detection slot is busy: 503."""

    status = 503

    def __init__(self, message: str, retry_after_seconds: int = 1) -> None:
        super().__init__(message, {"Retry-After": str(retry_after_seconds)})


@dataclass(frozen=True)
class KeywordRequest:
    """One entry of ``/detect``'s ``keywords`` field: ``TEXT`` or ``TEXT:THRESHOLD``."""

    text: str
    threshold: float | None = None


@dataclass(frozen=True)
class DetectResult:
    """What ``POST /detect`` answers: every detection of one whole file, and the best one."""

    detections: tuple[Detection, ...]
    keywords: tuple[CompiledKeyword, ...]
    audio_seconds: float
    processing_seconds: float
    # How loud each detection's keyword was (RMS dBFS, SNR), in the order of ``detections``.
    levels: tuple[KeywordLevel | None, ...] = ()
    # The strongest score of the request's keywords, detected or not (0.0: nothing like them).
    best_score: float = 0.0
    # The request asked for the best match (threshold 0) rather than for detections.
    best_match: bool = False

    @property
    def best(self) -> Detection | None:
        """The most confident detection (the earliest of equals)."""
        return best_detection(self.detections)

    def to_dict(self, now: datetime | None = None) -> dict[str, Any]:
        """Our fields and those of the REST service around the ModelScope model (``success``,
        ``message``, ``confidence`` even when nothing was detected, ``timestamp`` of the answer),
        so that its clients work unchanged."""
        best = self.best
        summary = best.to_dict() if best is not None else None
        if summary is not None:
            message = f"detected {summary['keyword']} at {summary['start']:.2f}-{summary['end']:.2f} s"
        else:
            message = "no keyword detected"
        return {
            "success": True,
            "detected": best is not None,
            "message": message,
            # The top-level fields repeat the best detection, rounded like `edge-agent detect`.
            "keyword": summary["keyword"] if summary else None,
            "confidence": summary["confidence"] if summary else round(self.best_score, 4),
            "start": summary["start"] if summary else None,
            "end": summary["end"] if summary else None,
            "processing_time_ms": round(self.processing_seconds * 1000.0, 2),
            "timestamp": iso_timestamp(now),
            "duration_s": round(self.audio_seconds, 3),
            "detections": [detection_dict(d, level) for d, level in zip_levels(self.detections, self.levels)],
            "keywords": [{"text": k.text, "threshold": k.threshold} for k in self.keywords],
            "best_match": self.best_match,
        }


def iso_timestamp(now: datetime | None = None) -> str:
    """The time of an answer, ISO 8601 in UTC with milliseconds (``2025-01-31T12:00:00.000+00:00``)."""
    return (now or datetime.now(timezone.utc)).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Sample:
    """One Prometheus sample: a value and its labels."""

    value: float
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricFamily:
    """A metric and its samples. Counters are named without ``_total``; the renderer adds it."""

    name: str
    kind: MetricKind
    help: str
    samples: tuple[Sample, ...] = ()

    @classmethod
    def single(cls, name: str, kind: MetricKind, help: str, value: float | None) -> MetricFamily:
        """A family with one unlabelled sample, or none when the value is unknown."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return cls(name, kind, help)
        return cls(name, kind, help, (Sample(float(value)),))


@runtime_checkable
class ApiBackend(Protocol):
    """What the HTTP layer needs. Every method is called from request threads, concurrently."""

    def ready(self) -> bool:
        """True when :meth:`detect` can run (model loaded, engine alive)."""

    def status(self) -> dict[str, Any]:
        """Health: ``status`` (``ok``, ``loading``, ``starting``, ``failed``), ``model_loaded``,
        ``uptime_s``, ``broker_connected`` (``None`` without MQTT) and anything useful."""

    def info(self) -> dict[str, Any]:
        """``model`` (id, revision, backend...), ``keywords`` (text, threshold, durations),
        ``version``; raises :class:`NotReady` before the model is loaded."""

    def detect(
        self, wav: bytes, threshold: float | None, keywords: Sequence[KeywordRequest] | None
    ) -> DetectResult:
        """Detections in one whole WAV file, exactly as ``edge-agent detect`` finds them.

        ``threshold`` replaces every keyword's threshold; ``keywords`` replaces the configured
        keywords for this request only. Raises :class:`BadRequest` or :class:`NotReady`.
        """

    def metrics(self) -> list[MetricFamily]:
        """Samples for ``/metrics``; must answer while loading too (readiness is a metric)."""

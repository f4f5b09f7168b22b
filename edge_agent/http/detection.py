"""Whole-file detection for HTTP uploads, shared by both backends, with its own counters.

The pipeline is the one of ``edge-agent detect``: a :class:`edge_agent.recording.Recording`
scored by :func:`edge_agent.recording.detect_recording`. Keeping it identical is what lets a
user move from the CLI (or the REST service they came from) to ``POST /detect`` and get the same
answers; a test checks it on every development recording.

Where the scoring runs is the backend's choice (a :data:`Scorer`): on the request's thread for
``edge-agent serve``, on the agent's engine worker between live passes for ``edge-agent run``.
A semaphore bounds how many requests are scored at once; one that waits too long gets a 503.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from edge_agent.audio.wav import WavError
from edge_agent.engine.decoder import CompiledKeyword, DecoderSettings
from edge_agent.engine.lexicon import LexiconError, normalize_keyword
from edge_agent.engine.model import DEFAULT_THRESHOLD, KeywordSpec, KwsModel
from edge_agent.http.backend import (
    BadRequest,
    DetectResult,
    KeywordRequest,
    MetricFamily,
    NotReady,
    PayloadTooLarge,
    Sample,
)
from edge_agent.recording import (
    MAX_RECORDING_SECONDS,
    Recording,
    RecordingBusy,
    RecordingResult,
    RecordingTooLong,
    detect_recording,
)

# Custom keywords per request, at most: decoding cost grows with each one.
MAX_KEYWORDS_PER_REQUEST = 16
# Detections allowed to run at once, and how long a request waits for a slot before a 503.
DEFAULT_MAX_CONCURRENT = 2
DEFAULT_WAIT_SECONDS = 30.0
# Longest audio one request may hold (the byte limit alone does not bound it).
MAX_AUDIO_SECONDS = MAX_RECORDING_SECONDS
# The name the WAV parser puts at the start of its messages (the multipart field's name).
AUDIO_FIELD = "audio_file"


# Scores one uploaded WAV with these keywords and settings (raises WavError and its kinds).
Scorer = Callable[[bytes, Sequence[CompiledKeyword], DecoderSettings], RecordingResult]


def local_scorer(model: Callable[[], KwsModel]) -> Scorer:
    """Scoring on the request's own thread (``edge-agent serve``: no live streams to protect)."""

    def score(wav: bytes, keywords: Sequence[CompiledKeyword], settings: DecoderSettings) -> RecordingResult:
        recording = Recording(wav, name=AUDIO_FIELD, max_seconds=MAX_AUDIO_SECONDS)
        return detect_recording(model(), keywords, settings, recording)

    return score


class DetectionService:
    """Runs ``/detect`` requests against a loaded model and counts what it did."""

    def __init__(
        self,
        model: Callable[[], KwsModel],
        keywords: Callable[[], Sequence[CompiledKeyword]],
        settings: Callable[[], DecoderSettings],
        max_concurrent: int = DEFAULT_MAX_CONCURRENT,
        wait_seconds: float = DEFAULT_WAIT_SECONDS,
        scorer: Scorer | None = None,
    ) -> None:
        """``scorer``: how a WAV is scored (default: on the request's thread, a block at a time)."""
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be at least 1, got {max_concurrent}")
        # Callables, not values: the agent can change its model, keywords and settings while running.
        self._model = model
        self._keywords = keywords
        self._settings = settings
        self._score = scorer or local_scorer(model)
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self.max_concurrent = max_concurrent
        self.wait_seconds = wait_seconds
        self._lock = threading.Lock()
        self.requests: dict[str, int] = {"ok": 0, "bad_request": 0, "busy": 0}
        self.audio_seconds = 0.0
        self.processing_seconds = 0.0
        self.detections: dict[str, int] = {}

    # --- the request -------------------------------------------------------------------------
    def detect(
        self, wav: bytes, threshold: float | None, keywords: Sequence[KeywordRequest] | None
    ) -> DetectResult:
        try:
            compiled = self.keywords_for(threshold, keywords)
        except BadRequest:
            self._count("bad_request")
            raise
        if not self._slots.acquire(timeout=self.wait_seconds):
            self._count("busy")
            raise NotReady(
                f"busy: {self.max_concurrent} detections are running; try again",
                retry_after_seconds=max(1, int(self.wait_seconds // 10)),
            )
        try:
            started = time.perf_counter()
            try:
                recording = self._score(wav, compiled, self._settings())
            except RecordingTooLong as error:
                self._count("bad_request")
                raise PayloadTooLarge(str(error)) from None
            except (RecordingBusy, TimeoutError) as error:
                self._count("busy")
                raise NotReady(str(error)) from None
            except WavError as error:
                self._count("bad_request")
                raise BadRequest(str(error)) from None
            elapsed = time.perf_counter() - started
        finally:
            self._slots.release()
        detections = list(recording.detections)
        result = DetectResult(
            detections=tuple(detections),
            keywords=tuple(compiled),
            audio_seconds=recording.audio_seconds,
            processing_seconds=elapsed,
            levels=recording.levels,
        )
        with self._lock:
            self.requests["ok"] += 1
            self.audio_seconds += result.audio_seconds
            self.processing_seconds += elapsed
            for detection in detections:
                self.detections[detection.keyword] = self.detections.get(detection.keyword, 0) + 1
        return result

    def keywords_for(
        self, threshold: float | None, keywords: Sequence[KeywordRequest] | None
    ) -> list[CompiledKeyword]:
        """The request's keywords: the configured ones (threshold replaced if given) or its own."""
        if not keywords:
            configured = list(self._keywords())
            if threshold is None:
                return configured
            return [self._checked(lambda k=k: replace(k, threshold=threshold), k.text) for k in configured]
        if len(keywords) > MAX_KEYWORDS_PER_REQUEST:
            raise BadRequest(
                f"keywords: {len(keywords)} given, at most {MAX_KEYWORDS_PER_REQUEST} per request"
            )
        compiled: list[CompiledKeyword] = []
        seen: set[str] = set()
        for request in keywords:
            text = normalize_keyword(request.text)
            if not text:
                raise BadRequest("keywords: empty keyword")
            if text in seen:
                raise BadRequest(f"keywords: {request.text!r} is listed twice")
            seen.add(text)
            wanted = request.threshold if request.threshold is not None else threshold
            spec = KeywordSpec(request.text, DEFAULT_THRESHOLD if wanted is None else wanted)
            compiled.append(self._checked(lambda spec=spec: self._model().compile(spec), request.text))
        return compiled

    @staticmethod
    def _checked(make: Callable[[], CompiledKeyword], text: str) -> CompiledKeyword:
        try:
            return make()
        except LexiconError as error:
            # The lexicon's message names the character and its code point.
            raise BadRequest(f"keywords: {error}") from None
        except ValueError as error:
            raise BadRequest(f"keywords: {text!r}: {error}") from None

    def _count(self, outcome: str) -> None:
        with self._lock:
            self.requests[outcome] = self.requests.get(outcome, 0) + 1

    # --- telemetry ---------------------------------------------------------------------------
    def metrics(self) -> list[MetricFamily]:
        with self._lock:
            requests = dict(self.requests)
            detections = dict(self.detections)
            audio, processing = self.audio_seconds, self.processing_seconds
        return [
            MetricFamily(
                "edge_agent_http_detect_requests",
                "counter",
                "POST /detect requests by outcome (ok, bad_request, busy).",
                tuple(Sample(v, {"outcome": k}) for k, v in sorted(requests.items())),
            ),
            MetricFamily.single(
                "edge_agent_http_detect_audio_seconds",
                "counter",
                "Audio processed by POST /detect (seconds).",
                audio,
            ),
            MetricFamily.single(
                "edge_agent_http_detect_processing_seconds",
                "counter",
                "Time spent decoding and detecting in POST /detect (seconds).",
                processing,
            ),
            MetricFamily.single(
                "edge_agent_http_detect_rtf",
                "gauge",
                "Real-time factor of POST /detect so far: processing seconds per audio second.",
                processing / audio if audio > 0 else None,
            ),
            MetricFamily(
                "edge_agent_detections",
                "counter",
                "Keyword detections, by keyword and source (http: POST /detect; stream: live audio).",
                tuple(Sample(v, {"keyword": k, "source": "http"}) for k, v in sorted(detections.items())),
            ),
        ]

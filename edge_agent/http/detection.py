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
from collections import deque
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
    best_detection,
    detect_recording,
)
from edge_agent.scoring import recording_scores

# Custom keywords per request, at most: decoding cost grows with each one.
MAX_KEYWORDS_PER_REQUEST = 16
# Detections allowed to run at once, and how long a request waits for a slot before a 503.
DEFAULT_MAX_CONCURRENT = 2
DEFAULT_WAIT_SECONDS = 30.0
# Longest audio one request may hold (the byte limit alone does not bound it).
MAX_AUDIO_SECONDS = MAX_RECORDING_SECONDS
# The name the WAV parser puts at the start of its messages (the multipart field's name).
AUDIO_FIELD = "audio_file"
# A request threshold of 0 asks for the best match, detected or not (the REST service's meaning).
BEST_MATCH_THRESHOLD = 0.0
# Processing times kept for /info's typical latency.
LATENCY_WINDOW = 100


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
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)

    # --- the request -------------------------------------------------------------------------
    def detect(
        self, wav: bytes, threshold: float | None, keywords: Sequence[KeywordRequest] | None
    ) -> DetectResult:
        """Detections in ``wav``, and the best score of the request's keywords even when none was
        detected. ``threshold`` 0 reports the best match as the detection, however weak."""
        best_match = threshold == BEST_MATCH_THRESHOLD
        try:
            compiled = self.keywords_for(None if best_match else threshold, keywords)
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
                audio_seconds = Recording(wav, name=AUDIO_FIELD, max_seconds=MAX_AUDIO_SECONDS).seconds
                if best_match:
                    scored, best_score = self._best_match(wav, compiled)
                else:
                    scored = self._score(wav, compiled, self._settings())
                    best = best_detection(scored.detections)
                    # How close the keywords came when none was detected, as `edge-agent eval`
                    # scores a file.
                    best_score = best.confidence if best is not None else self._best_score(wav, compiled)
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
        detections = scored.detections if scored is not None else ()
        result = DetectResult(
            detections=tuple(detections),
            keywords=tuple(compiled),
            audio_seconds=audio_seconds,
            processing_seconds=elapsed,
            levels=scored.levels if scored is not None else (),
            best_score=best_score,
            best_match=best_match,
        )
        with self._lock:
            self.requests["ok"] += 1
            self.audio_seconds += result.audio_seconds
            self.processing_seconds += elapsed
            self._latencies.append(elapsed)
            for detection in detections:
                self.detections[detection.keyword] = self.detections.get(detection.keyword, 0) + 1
        return result

    def _best_score(self, wav: bytes, keywords: Sequence[CompiledKeyword]) -> float:
        scores = self._keyword_scores(wav, keywords)
        return max(scores.values(), default=0.0)

    def _keyword_scores(self, wav: bytes, keywords: Sequence[CompiledKeyword]) -> dict[str, float]:
        # On the request's thread (at most max_concurrent at once), a block at a time: the
        # worker's scan reports detections, not how close a keyword came.
        recording = Recording(wav, name=AUDIO_FIELD, max_seconds=MAX_AUDIO_SECONDS)
        return recording_scores(self._model(), keywords, self._settings(), recording.blocks())

    def _best_match(
        self, wav: bytes, keywords: Sequence[CompiledKeyword]
    ) -> tuple[RecordingResult | None, float]:
        """The best-scoring keyword's strongest match as the only detection (none when no keyword
        scores above the floor), and its score."""
        scores = self._keyword_scores(wav, keywords)
        text, score = max(scores.items(), key=lambda item: item[1], default=("", 0.0))
        if score <= 0.0:
            return None, 0.0
        keyword = next(k for k in keywords if k.text == text)
        found = self._score(wav, [replace(keyword, threshold=score)], self._settings())
        best = best_detection(found.detections)
        if best is None:
            return None, score
        index = found.detections.index(best)
        level = found.levels[index] if index < len(found.levels) else None
        return replace(found, detections=(best,), levels=(level,)), best.confidence

    def typical_latency_ms(self) -> float | None:
        """Median processing time of the recent requests, or None before the first one."""
        with self._lock:
            latencies = sorted(self._latencies)
        if not latencies:
            return None
        return round(latencies[len(latencies) // 2] * 1000.0, 1)

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

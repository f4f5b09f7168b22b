"""Whole recordings: a WAV in, its detections out.

One pipeline for every whole-file path, so that they all give the same answers:
``edge-agent detect`` and ``eval``, HTTP ``POST /detect`` and MQTT ``detect/request``:
:func:`load_recording` (``parse_wav`` -> ``to_mono_16k``, with a duration cap) then
:func:`detect_recording` (a fresh detector over the whole file in one pass, or fed in chunks as
a stream would be).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edge_agent.audio.wav import WavError, parse_wav, read_wav, to_mono_16k
from edge_agent.engine.decoder import CompiledKeyword, DecoderSettings, Detection
from edge_agent.engine.features import SAMPLE_RATE_HZ
from edge_agent.engine.model import KwsModel

# Longest audio one request may hold. The byte limit alone does not bound it: a few MB of 8-bit
# audio at 1 kHz is an hour, gigabytes once resampled to 16 kHz float32, and minutes of CPU.
MAX_RECORDING_SECONDS = 600.0


class RecordingTooLong(WavError):
    """A recording longer than the caller's cap; the message says both durations."""


@dataclass(frozen=True)
class RecordingResult:
    """Every detection of one recording, its length and the engine's time on it."""

    detections: tuple[Detection, ...]
    audio_seconds: float
    processing_seconds: float

    @property
    def best(self) -> Detection | None:
        return best_detection(self.detections)


def best_detection(detections: Sequence[Detection]) -> Detection | None:
    """The most confident detection (the earliest of equals)."""
    if not detections:
        return None
    return max(detections, key=lambda d: (d.confidence, -d.start))


def load_recording(
    source: bytes | bytearray | memoryview | str | os.PathLike[str],
    *,
    name: str = "<bytes>",
    max_seconds: float | None = MAX_RECORDING_SECONDS,
) -> np.ndarray:
    """A WAV (bytes, or a path) as the engine's 16 kHz mono samples.

    Raises :class:`WavError` (the message starts with ``name`` or the path) and
    :class:`RecordingTooLong` before converting anything longer than ``max_seconds``."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        decoded = parse_wav(source, source=name)
        label = name
    else:
        decoded = read_wav(source)
        label = os.fspath(source)
    seconds = decoded.info.duration_seconds
    if max_seconds is not None and seconds > max_seconds:
        raise RecordingTooLong(
            f"{label}: {seconds:.1f} s of audio, more than the {max_seconds:g} s one request may "
            "hold; split the recording"
        )
    return to_mono_16k(decoded)


def detect_recording(
    model: KwsModel,
    keywords: Sequence[CompiledKeyword],
    settings: DecoderSettings,
    samples: np.ndarray,
    chunk_samples: int = 0,
) -> RecordingResult:
    """Detections in one recording with a fresh detector: the whole of it in one pass, or fed
    in chunks of ``chunk_samples`` as a live stream would be (the same detections)."""
    detector = model.detector(keywords, settings)
    started = time.perf_counter()
    detections: list[Detection] = []
    if chunk_samples > 0:
        for offset in range(0, samples.shape[0], chunk_samples):
            detections.extend(detector.feed(samples[offset : offset + chunk_samples]))
        detections.extend(detector.finish())
    else:
        detections.extend(detector.finish(samples))
    return RecordingResult(
        detections=tuple(detections),
        audio_seconds=samples.shape[0] / SAMPLE_RATE_HZ,
        processing_seconds=time.perf_counter() - started,
    )

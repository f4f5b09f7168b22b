"""Whole recordings: a WAV in, its detections out.

One pipeline for every whole-file path, so that they all give the same answers:
``edge-agent detect`` and ``eval``, HTTP ``POST /detect`` and MQTT ``detect/request``. A
:class:`Recording` checks the WAV's header and its length (a cap on every path: a few MB of 8-bit
audio at 1 kHz is an hour of audio) and then yields the engine's 16 kHz mono samples a block at a
time, decoded and resampled as it goes; :func:`detect_recording` runs a fresh detector over them.
A recording is never decoded whole, so its memory does not grow with its length, and the engine
worker can score it a block at a time between passes over live streams.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_agent.audio.levels import EnergyHistory, KeywordLevel
from edge_agent.audio.resample import Resampler
from edge_agent.audio.wav import TARGET_SAMPLE_RATE_HZ, WavError, wav_blocks
from edge_agent.engine.decoder import CompiledKeyword, DecoderSettings, Detection
from edge_agent.engine.detector import KeywordDetector
from edge_agent.engine.features import SAMPLE_RATE_HZ
from edge_agent.engine.model import KwsModel

# Longest audio one request may hold. The byte limit alone does not bound it.
MAX_RECORDING_SECONDS = 600.0
# Audio decoded and scored at a time (seconds of the recording).
BLOCK_SECONDS = 4.0


class RecordingTooLong(WavError):
    """A recording longer than the caller's cap; the message says both durations."""


class RecordingBusy(WavError):
    """The engine is scoring as many recordings as it takes at once; try again."""


@dataclass(frozen=True)
class RecordingResult:
    """Every detection of one recording, its length and the engine's time on it."""

    detections: tuple[Detection, ...]
    audio_seconds: float
    processing_seconds: float
    # How loud each detection's keyword was, in the order of ``detections`` (None: unknown).
    levels: tuple[KeywordLevel | None, ...] = ()

    @property
    def best(self) -> Detection | None:
        return best_detection(self.detections)

    def detection_dicts(self) -> list[dict[str, object]]:
        """Each detection as JSON, with its keyword's level when known."""
        return [detection_dict(d, level) for d, level in zip_levels(self.detections, self.levels)]


def zip_levels(
    detections: Sequence[Detection], levels: Sequence[KeywordLevel | None]
) -> list[tuple[Detection, KeywordLevel | None]]:
    """Detections with their levels (None where a level is missing)."""
    return [(d, levels[i] if i < len(levels) else None) for i, d in enumerate(detections)]


def detection_dict(detection: Detection, level: KeywordLevel | None) -> dict[str, object]:
    """A detection as whole-file answers carry it: the engine's fields, then its level."""
    body = detection.to_dict()
    body["level_dbfs"] = level.level_dbfs if level is not None else None
    body["snr_db"] = level.snr_db if level is not None else None
    return body


def best_detection(detections: Sequence[Detection]) -> Detection | None:
    """The most confident detection (the earliest of equals)."""
    if not detections:
        return None
    return max(detections, key=lambda d: (d.confidence, -d.start))


class Recording:
    """A WAV file (bytes or a path), checked, read as the engine's samples a block at a time.

    Raises :class:`WavError` (the message starts with ``name`` or the path) for a header it
    cannot use, and :class:`RecordingTooLong` for more than ``max_seconds`` of audio, before
    decoding anything; a bad sample (NaN floats) raises WavError from :meth:`blocks`."""

    def __init__(
        self,
        source: bytes | bytearray | memoryview | str | os.PathLike[str],
        *,
        name: str = "<bytes>",
        max_seconds: float | None = MAX_RECORDING_SECONDS,
    ) -> None:
        if isinstance(source, (bytes, bytearray, memoryview)):
            data, label = source, name
        else:
            label = os.fspath(source)
            try:
                data = Path(label).read_bytes()
            except OSError as error:
                raise WavError(f"{label}: cannot read: {error.strerror or error}") from error
        self.name = label
        self.info, self._blocks = wav_blocks(data, source=label, block_seconds=BLOCK_SECONDS)
        seconds = self.info.duration_seconds
        if max_seconds is not None and seconds > max_seconds:
            raise RecordingTooLong(
                f"{label}: {seconds:.1f} s of audio, more than the {max_seconds:g} s one request may "
                "hold; split the recording"
            )

    @property
    def seconds(self) -> float:
        return self.info.duration_seconds

    def blocks(self) -> Iterator[np.ndarray]:
        """16 kHz mono float32 samples in 16-bit units, a block at a time; once."""
        rate = self.info.sample_rate
        resampler = Resampler(rate, TARGET_SAMPLE_RATE_HZ) if rate != TARGET_SAMPLE_RATE_HZ else None
        for frames in self._blocks:
            if frames.shape[1] == 1:
                mono = frames[:, 0].astype(np.float32)
            else:
                mono = frames.mean(axis=1, dtype=np.float64).astype(np.float32)
            yield mono if resampler is None else resampler.process(mono).astype(np.float32)
        if resampler is not None:
            tail = resampler.flush().astype(np.float32)
            if tail.size:
                yield tail

    def samples(self) -> np.ndarray:
        """The whole recording at once (the CLI's ``eval``, which needs every frame's outputs)."""
        pieces = list(self.blocks())
        return np.concatenate(pieces) if pieces else np.zeros(0, np.float32)


class RecordingScan:
    """One recording being scored by a fresh detector, a block at a time (:meth:`step`)."""

    def __init__(
        self,
        model: KwsModel,
        keywords: Sequence[CompiledKeyword],
        settings: DecoderSettings,
        blocks: Iterable[np.ndarray],
    ) -> None:
        self._detector: KeywordDetector = model.detector(keywords, settings)
        self._blocks = iter(blocks)
        self._detections: list[Detection] = []
        self._levels: list[KeywordLevel | None] = []
        self._energy = EnergyHistory()
        self._samples = 0
        self._seconds = 0.0
        self.done = False

    def step(self) -> bool:
        """Score the next block (or finish); returns whether there is more to do. Raises the
        reader's WavError for a block that cannot be decoded."""
        if self.done:
            return False
        started = time.perf_counter()
        try:
            block = next(self._blocks)
        except StopIteration:
            self._add(self._detector.finish())
            self.done = True
        else:
            self._samples += block.shape[0]
            self._energy.push(block)
            self._add(self._detector.feed(block))
        self._seconds += time.perf_counter() - started
        return not self.done

    def _add(self, detections: list[Detection]) -> None:
        # Measured now, while the bounded energy history still holds the keyword.
        for detection in detections:
            self._detections.append(detection)
            self._levels.append(self._energy.keyword_level(detection.start, detection.end))

    def result(self) -> RecordingResult:
        return RecordingResult(
            tuple(self._detections), self._samples / SAMPLE_RATE_HZ, self._seconds, tuple(self._levels)
        )


def detect_recording(
    model: KwsModel,
    keywords: Sequence[CompiledKeyword],
    settings: DecoderSettings,
    audio: Recording | np.ndarray,
    chunk_samples: int = 0,
) -> RecordingResult:
    """Detections in one recording with a fresh detector. A :class:`Recording` is scored a
    block at a time; samples already in memory in chunks of ``chunk_samples`` (0: in one
    pass), as a live stream would be: the engine finds the same detections either way."""
    if isinstance(audio, Recording):
        blocks: Iterable[np.ndarray] = audio.blocks()
    elif chunk_samples > 0:
        blocks = (
            audio[offset : offset + chunk_samples] for offset in range(0, audio.shape[0], chunk_samples)
        )
    else:
        detector = model.detector(keywords, settings)
        started = time.perf_counter()
        found = detector.finish(audio)  # the whole recording in one pass
        elapsed = time.perf_counter() - started
        energy = EnergyHistory(seconds=audio.shape[0] / SAMPLE_RATE_HZ + 1.0)
        energy.push(audio)
        levels = tuple(energy.keyword_level(d.start, d.end) for d in found)
        return RecordingResult(tuple(found), audio.shape[0] / SAMPLE_RATE_HZ, elapsed, levels)
    scan = RecordingScan(model, keywords, settings, blocks)
    while scan.step():
        pass
    return scan.result()

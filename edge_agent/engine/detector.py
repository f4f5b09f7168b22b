"""Per-stream keyword detector: 16 kHz mono samples in, detections out.

This is the engine's whole public surface for audio: everything else (files, microphones, MQTT
streams, HTTP uploads) converts its audio to 16 kHz mono at its own edge and calls
:meth:`KeywordDetector.feed`. One detector per stream: it holds that stream's feature
remainder, network memory and decoder state, and nothing global.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from edge_agent.engine.decoder import CompiledKeyword, Detection, process_many
from edge_agent.engine.features import SAMPLE_RATE_HZ, FeatureStream, accept_many

if TYPE_CHECKING:
    from edge_agent.engine.model import DecoderSettings, KwsModel

# Largest piece of audio run through the network at once (4 s).
_BLOCK_SAMPLES = 4 * SAMPLE_RATE_HZ


class KeywordDetector:
    """Feed audio chunks of any size in order; :meth:`finish` at the end of the stream."""

    def __init__(
        self, model: KwsModel, keywords: Sequence[CompiledKeyword], settings: DecoderSettings
    ) -> None:
        self._model = model
        self._settings = settings
        self._features = FeatureStream(model.cmvn)
        self._network_state = model.network.new_state()
        self._decoder = model.decoder(keywords, settings)
        self._samples_seen = 0

    @property
    def keywords(self) -> list[CompiledKeyword]:
        return self._decoder.keywords

    @property
    def audio_seconds(self) -> float:
        """Audio fed since the stream started (or was reset)."""
        return self._samples_seen / SAMPLE_RATE_HZ

    def feed(self, samples: np.ndarray) -> list[Detection]:
        """Add 16 kHz mono samples (int16, or float in 16-bit units); return new detections."""
        samples = np.asarray(samples)
        if samples.ndim != 1:
            raise ValueError(f"expected a 1-D array of mono samples, got shape {samples.shape}")
        if samples.shape[0] > _BLOCK_SAMPLES:
            # Long inputs (whole files) in blocks: the network's intermediate matrices are
            # 2599 columns wide, so an unbounded block would cost ~30 MB per minute of audio.
            # Chunking never changes results.
            found: list[Detection] = []
            for offset in range(0, samples.shape[0], _BLOCK_SAMPLES):
                found += self._feed_block(samples[offset : offset + _BLOCK_SAMPLES])
            return found
        return self._feed_block(samples)

    def _feed_block(self, samples: np.ndarray) -> list[Detection]:
        if samples.size == 0:
            return []
        # One stream is a batch of one: the same path, and the same savings, as many streams.
        return feed_many([self], [samples])[0]

    def finish(self) -> list[Detection]:
        """End of stream: score the last frames, return what they hold, and start afresh."""
        features = self._features.finish()
        posteriors = self._model.network.forward(
            self._network_state, features, final=True, columns=self._decoder.columns
        )
        detections = self._decoder.process(posteriors) + self._decoder.finish()
        self.reset()
        return detections

    def reset(self) -> None:
        """Forget the stream; the next sample is time 0 of a new one."""
        self._features.reset()
        self._network_state = self._model.network.new_state()
        self._decoder.reset()
        self._samples_seen = 0

    def set_keywords(
        self, keywords: Sequence[CompiledKeyword], settings: DecoderSettings | None = None
    ) -> None:
        """Replace the keywords (and decoder settings) without losing the stream: times keep
        counting from its start. A keyword being spoken at the moment of the swap may be missed.
        """
        if settings is not None:
            self._settings = settings
        self._decoder = self._model.decoder(keywords, self._settings, first_frame=self._decoder.frames_seen)


def feed_many(detectors: Sequence[KeywordDetector], chunks: Sequence[np.ndarray]) -> list[list[Detection]]:
    """:meth:`KeywordDetector.feed` for many streams at once, with the same results.

    The streams' windows share one FFT, and their frames go through the network together (one
    matrix product per layer for all of them); each detector keeps its own state. Detectors
    must come from one model; those with different keyword outputs are batched separately.
    """
    results: list[list[Detection]] = [[] for _ in detectors]
    groups: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    for i, (detector, chunk) in enumerate(zip(detectors, chunks, strict=True)):
        samples = np.asarray(chunk)
        if samples.ndim != 1 or samples.shape[0] > _BLOCK_SAMPLES:
            results[i] = detector.feed(samples)  # large or invalid: the one-stream path
            continue
        key = (id(detector._model), tuple(int(c) for c in detector._decoder.columns))
        groups.setdefault(key, []).append(i)
    for members in groups.values():
        batch = [detectors[i] for i in members]
        for i in members:
            detectors[i]._samples_seen += int(np.asarray(chunks[i]).shape[0])
        features = accept_many([d._features for d in batch], [np.asarray(chunks[i]) for i in members])
        network = batch[0]._model.network
        decoders = [d._decoder for d in batch]
        posteriors = network.forward_many(
            [d._network_state for d in batch],
            features,
            columns=batch[0]._decoder.columns,
            skip=lambda bounds, decoders=decoders: [
                decoder.rows_without_need(b) for decoder, b in zip(decoders, bounds, strict=True)
            ],
        )
        found = process_many([d._decoder for d in batch], posteriors)
        for i, detections in zip(members, found, strict=True):
            results[i] = detections
    return results

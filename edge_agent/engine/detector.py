"""Per-stream keyword detector: 16 kHz mono samples in, detections out.

This is the engine's whole public surface for audio: everything else (files, microphones, MQTT
streams, HTTP uploads) converts its audio to 16 kHz mono at its own edge and calls
:meth:`KeywordDetector.feed`. One detector per stream: it holds that stream's feature
remainder, network memory and decoder state, and nothing global.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from edge_agent.engine.decoder import (
    CompiledKeyword,
    DecoderSettings,
    Detection,
    KeywordDecoder,
    process_many,
    process_one,
)
from edge_agent.engine.features import (
    DECIMATION,
    FRAME_SHIFT_SAMPLES,
    OUTPUT_FRAME_SECONDS,
    SAMPLE_RATE_HZ,
    FeatureStream,
    accept_many,
)
from edge_agent.engine.network import OutputLayer

if TYPE_CHECKING:
    from edge_agent.engine.model import KwsModel

# Largest piece of audio run through the network at once (8 s): long enough that the per-call
# costs vanish, short enough that a block's working arrays stay in the CPU's caches.
_BLOCK_SAMPLES = 8 * SAMPLE_RATE_HZ
# Batches of fewer streams than this let an idle stream set short chunks aside (see
# KeywordDetector._defers): a step's per-call costs are then shared by few streams, and halving
# the steps saves. In larger batches those costs are shared already, and the steps where idle
# streams run two chunks at once would hold twice the audio and features at once.
IDLE_DEFERRAL_MAX_STREAMS = 31
# Larger batches run in groups of at most this many streams, one after the other: past it a
# larger group saves little per stream, while a group's working arrays (its audio, features,
# hidden rows, bounds and exact posteriors) grow with its streams.
BATCH_GROUP_STREAMS = 128
# Near misses (telemetry) are matches that reach this share of a keyword's threshold but not
# the threshold itself.
NEAR_MISS_SHARE = 0.25


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
        self._hidden = _HiddenRows(model.network.output.input_dim)
        self._deferred = np.zeros(0, dtype=np.float32)
        self._defer_limit = deferrable_samples(keywords)
        # Near-miss telemetry: a second decoder at lower thresholds, made on the first
        # take_near_misses() call. The detections never depend on it.
        self._near_decoder: KeywordDecoder | None = None
        self._near_misses: dict[str, float] = {}

    @property
    def keywords(self) -> list[CompiledKeyword]:
        return self._decoder.keywords

    @property
    def audio_seconds(self) -> float:
        """Audio fed since the stream started (or was reset)."""
        return self._samples_seen / SAMPLE_RATE_HZ

    def feed(self, samples: np.ndarray) -> list[Detection]:
        """Add 16 kHz mono samples (int16, or float in 16-bit units); return new detections."""
        samples = _mono(samples)
        if samples.shape[0] > _BLOCK_SAMPLES:
            # Long inputs (whole files) in blocks, so that working arrays stay small.
            # Chunking never changes results.
            found: list[Detection] = []
            for offset in range(0, samples.shape[0], _BLOCK_SAMPLES):
                found += self._feed_block(samples[offset : offset + _BLOCK_SAMPLES])
            return found
        return self._feed_block(samples)

    def _feed_block(self, samples: np.ndarray) -> list[Detection]:
        """:func:`feed_many` for this stream alone (a live microphone's every chunk): the same
        steps and arithmetic, without a batch's grouping and layout."""
        if samples.size == 0:
            return []
        self._samples_seen += samples.shape[0]
        ready = self._defers(samples)
        if ready is None:
            return []
        features = self._features.accept(ready)
        if features.shape[0] == 0:
            # Audio that completes no network frame is set aside by _defers; should any come
            # through, the network and the decoder would pass over it without a change of state.
            return []
        return _decode_one(self, self._model.network.hidden(self._network_state, features))

    def finish(self, samples: np.ndarray | None = None) -> list[Detection]:
        """End of stream: score the last frames, return what they hold, and start afresh.

        ``samples``, if given, are the stream's last samples: ``finish(recording)`` on a fresh
        detector decodes a whole recording in one pass, the same as ``feed`` then ``finish``.
        """
        detections: list[Detection] = []
        if self._deferred.size:
            # Audio fed but not yet run (see feed_many): it goes first, counted once.
            self._samples_seen -= self._deferred.shape[0]
            tail = np.zeros(0, dtype=np.float32) if samples is None else _mono(samples)
            samples = np.concatenate([self._deferred, tail.astype(np.float32, copy=False)])
            self._deferred = self._deferred[:0]
        if samples is None:
            features = self._features.finish()
        else:
            samples = _mono(samples)
            # All but the last block as usual; the last one is ended in the same pass.
            last = max(0, (samples.shape[0] - 1) // _BLOCK_SAMPLES) * _BLOCK_SAMPLES
            if last:
                detections += self.feed(samples[:last])
            tail = samples[last:]
            self._samples_seen += tail.shape[0]
            features = self._features.accept(tail, final=True)
        hidden = self._model.network.hidden(self._network_state, features, final=True)
        detections += _decode_one(self, hidden) + self._decoder.finish()
        if self._near_decoder is not None:
            self._note_near_misses(self._near_decoder.finish())
        self.reset()
        return detections

    def reset(self) -> None:
        """Forget the stream; the next sample is time 0 of a new one."""
        self._features.reset()
        self._network_state = self._model.network.new_state()
        self._decoder.reset()
        if self._near_decoder is not None:
            self._near_decoder.reset()
        self._hidden = _HiddenRows(self._model.network.output.input_dim)
        self._samples_seen = 0
        self._deferred = self._deferred[:0]

    def set_keywords(
        self, keywords: Sequence[CompiledKeyword], settings: DecoderSettings | None = None
    ) -> None:
        """Replace the keywords (and decoder settings) without losing the stream: times keep
        counting from its start. A keyword being spoken at the moment of the swap may be missed.
        """
        if settings is not None:
            self._settings = settings
        # Audio deferred by feed_many goes to the new keywords: the swap takes effect where the
        # decoder stands, a little earlier in the stream than the last sample fed.
        self._decoder = self._model.decoder(keywords, self._settings, first_frame=self._decoder.frames_seen)
        self._defer_limit = deferrable_samples(keywords)
        if self._near_decoder is not None:
            self._near_decoder = self._near_miss_decoder()

    def take_near_misses(self) -> dict[str, float]:
        """Per keyword, the best confidence of a match that reached :data:`NEAR_MISS_SHARE` of its
        threshold but not the threshold, since the last call; keywords without one are left out.

        The first call starts the near-miss decoding (it costs a second decoding pass of the
        frames where a match may reach the lower thresholds): only callers that read near
        misses pay for them.
        """
        if self._near_decoder is None:
            self._near_decoder = self._near_miss_decoder()
        found, self._near_misses = self._near_misses, {}
        return found

    def stop_near_misses(self) -> None:
        """End the near-miss pass (a later :meth:`take_near_misses` starts it afresh)."""
        self._near_decoder = None
        self._near_misses = {}

    def _near_miss_decoder(self) -> KeywordDecoder:
        lowered = [
            dataclasses.replace(k, threshold=k.threshold * NEAR_MISS_SHARE) for k in self._decoder.keywords
        ]
        return self._model.decoder(lowered, self._settings, first_frame=self._decoder.frames_seen)

    def _note_near_misses(self, matches: list[Detection]) -> None:
        thresholds = {k.text: k.threshold for k in self._decoder.keywords}
        for match in matches:
            if match.confidence < thresholds.get(match.keyword, 0.0):
                best = self._near_misses.get(match.keyword, 0.0)
                self._near_misses[match.keyword] = max(best, match.confidence)

    def _defers(self, samples: np.ndarray, idle_may_wait: bool = True) -> np.ndarray | None:
        """None if ``samples`` are set aside for the next call (see :func:`feed_many`), else the
        samples to run now: those set aside, then these. ``idle_may_wait``: whether an idle
        stream sets short chunks aside (see :data:`IDLE_DEFERRAL_MAX_STREAMS`)."""
        deferred = self._deferred
        waiting = deferred.shape[0] + samples.shape[0]
        # Idle, a short wait delays no detection (deferrable_samples). Whatever the decoder's
        # state, audio that completes no network frame would change nothing past the front-end
        # (a third of 20 ms chunks): it waits too, and the front-end runs once for both.
        idle_waits = idle_may_wait and waiting < self._defer_limit and self._decoder.idle
        if idle_waits or self._features.frames_after(waiting) == 0:
            # A copy in float32 (what astype would give), made by the concatenation itself.
            self._deferred = np.concatenate((deferred, samples), dtype=np.float32, casting="unsafe")
            return None
        if deferred.shape[0] == 0:
            return samples
        self._deferred = deferred[:0]
        return np.concatenate((deferred, samples), dtype=np.float32, casting="unsafe")


def deferrable_samples(keywords: Sequence[CompiledKeyword]) -> int:
    """How much audio a stream whose decoder is idle may set aside without delaying any
    detection: less than the shortest distance between a keyword's first and last character.

    Idle, no partial match can still reach its threshold: a keyword not begun yet is found no
    earlier than its first character's frame plus that distance plus one (the frame that
    lets it fire), which needs more audio than that distance. Whatever is set aside is run with
    the next chunk, through the same arithmetic: chunking never changes the detections.
    """
    return min(_character_distance_frames(k) for k in keywords) * DECIMATION * FRAME_SHIFT_SAMPLES


def _character_distance_frames(keyword: CompiledKeyword) -> int:
    """Whole network frames between the first and last character of any match long enough to
    count (``firing.keyword_span`` sets a span from that distance; 0 for one character)."""
    n = len(keyword.token_groups)
    if n == 1:
        return 0
    span_frames = keyword.min_duration / OUTPUT_FRAME_SECONDS
    # The span is the distance plus twice the larger of one frame and half the mean distance
    # between characters: a lower bound of the distance from each case.
    return max(0, int(min(span_frames - 2, span_frames * (n - 1) / n)))


def _mono(samples: np.ndarray) -> np.ndarray:
    samples = np.asarray(samples)
    if samples.ndim != 1:
        raise ValueError(f"expected a 1-D array of mono samples, got shape {samples.shape}")
    return samples


def feed_many(detectors: Sequence[KeywordDetector], chunks: Sequence[np.ndarray]) -> list[list[Detection]]:
    """:meth:`KeywordDetector.feed` for many streams at once, with the same results.

    The streams' windows share one FFT, and their frames go through the network together (one
    matrix product per layer for all of them); each detector keeps its own state. Detectors
    must come from one model; those with different keyword outputs are batched separately, and a
    batch of more than :data:`BATCH_GROUP_STREAMS` streams in groups of that many.
    """
    results: list[list[Detection]] = [[] for _ in detectors]
    runs: dict[int, np.ndarray] = {}
    groups: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    idle_may_wait = len(detectors) <= IDLE_DEFERRAL_MAX_STREAMS
    for i, (detector, chunk) in enumerate(zip(detectors, chunks, strict=True)):
        samples = np.asarray(chunk)
        if samples.ndim != 1 or samples.shape[0] > _BLOCK_SAMPLES:
            results[i] = detector.feed(samples)  # large or invalid: the one-stream path
            continue
        if samples.size == 0:
            continue
        detector._samples_seen += samples.shape[0]
        # A stream with nothing going on sets short chunks aside and runs them with the next one
        # (a live microphone: per-chunk costs halve), when that delays no detection.
        ready = detector._defers(samples, idle_may_wait)
        if ready is None:
            continue
        runs[i] = ready
        key = (id(detector._model), detector._decoder.columns_key)
        groups.setdefault(key, []).append(i)
    for group in groups.values():
        for first in range(0, len(group), BATCH_GROUP_STREAMS):
            members = group[first : first + BATCH_GROUP_STREAMS]
            batch = [detectors[i] for i in members]
            features = accept_many([d._features for d in batch], [runs[i] for i in members])
            hidden = batch[0]._model.network.hidden_many([d._network_state for d in batch], features)
            for i, detections in zip(members, _decode(batch, hidden), strict=True):
                results[i] = detections
    return results


def _decode(detectors: Sequence[KeywordDetector], hidden: Sequence[np.ndarray]) -> list[list[Detection]]:
    """Decode new hidden rows of detectors sharing one model and one set of decoder columns.

    The decoders get cheap upper bounds for every row, and exact posteriors only for the rows
    they ask for: one output-layer product for all streams' asked rows at a time.
    """
    output: OutputLayer = detectors[0]._model.network.output
    columns = detectors[0]._decoder.columns
    for detector, rows in zip(detectors, hidden, strict=True):
        detector._hidden.append(rows, keep=detector._decoder.history_frames)
    counts = [rows.shape[0] for rows in hidden]
    every = np.concatenate(hidden) if len(hidden) > 1 else hidden[0]
    bounds = output.bounds(every, columns).astype(np.float64)  # once, not per decoder
    if min(counts) == max(counts):  # streams fed in step: one reshape gives each its rows
        per_stream = list(bounds.reshape(len(counts), counts[0], bounds.shape[1]))
    else:
        edges = np.cumsum([0, *counts]).tolist()
        per_stream = [bounds[edges[i] : edges[i + 1]] for i in range(len(counts))]

    def resolver(owners: Sequence[KeywordDetector]) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
        def resolve(frames: list[np.ndarray]) -> list[np.ndarray]:
            asking = [i for i, f in enumerate(frames) if f.size]
            exact = output.posteriors_of((owners[i]._hidden.rows(frames[i]) for i in asking), columns)
            answers = [exact[:0]] * len(frames)
            offset = 0
            for i in asking:
                answers[i] = exact[offset : offset + frames[i].size]
                offset += frames[i].size
            return answers

        return resolve

    found = process_many([d._decoder for d in detectors], per_stream, resolver(detectors))
    near = [i for i, d in enumerate(detectors) if d._near_decoder is not None]
    if near:
        # The near-miss decoders read the same bounds and rows; their matches are only telemetry.
        owners = [detectors[i] for i in near]
        matches = process_many(
            [d._near_decoder for d in owners],  # type: ignore[misc]
            [per_stream[i] for i in near],
            resolver(owners),
        )
        for owner, matched in zip(owners, matches, strict=True):
            owner._note_near_misses(matched)
    return found


def _decode_one(detector: KeywordDetector, hidden: np.ndarray) -> list[Detection]:
    """:func:`_decode` for one detector: its bounds, and the exact posteriors of the rows its
    decoder asks for, with no batch to lay out."""
    if hidden.shape[0] == 0:
        return []  # nothing new: the decoder would skip the empty span too
    output: OutputLayer = detector._model.network.output
    decoder = detector._decoder
    columns = decoder.columns
    held = detector._hidden
    near = detector._near_decoder
    keep = decoder.history_frames if near is None else max(decoder.history_frames, near.history_frames)
    held.append(hidden, keep=keep)
    bounds = output.bounds(hidden, columns).astype(np.float64)

    def resolve(frames: list[np.ndarray]) -> list[np.ndarray]:
        return [output.posteriors(held.rows(frames[0]), columns)]

    found = process_one(decoder, bounds, resolve)
    if near is not None:
        # The near-miss decoder reads the same keywords' columns: the same bounds and rows.
        detector._note_near_misses(process_one(near, bounds, resolve))
    return found


class _HiddenRows:
    """A stream's recent hidden rows (the output layer's inputs), by absolute frame, so that the
    decoder can ask for the exact posteriors of any frame it still holds.

    The rows live in a ring: frame ``f`` at row ``(f - offset) % capacity``. A step writes its
    few rows in place and nothing moves; the ring holds the rows kept and one step's new rows,
    with a few to spare, and is made anew when a step brings more. Every stream of a batch has
    one, so rows to spare cost memory hundreds of times over. The decoder asks for runs of
    consecutive frames, which are handed over as views: a run that wraps round first has the
    ring laid out afresh from its oldest row (rarely: only streams where a keyword may be under
    way ask), so that a burst of requests from every stream costs no copy of their rows.
    """

    # Rows beyond the rows kept and the new ones, when the ring is (re)made: for steps that
    # bring a row more than the step that made it (100 ms chunks bring 3 or 4).
    _SPARE_ROWS = 2

    def __init__(self, width: int) -> None:
        self._ring = np.zeros((0, width), dtype=np.float32)
        self._offset = 0  # the absolute frame at ring row 0, modulo the ring's size
        self._first = 0  # absolute frame of the oldest row held
        self._end = 0  # absolute frame after the newest

    def append(self, rows: np.ndarray, keep: int) -> None:
        """Add new rows, keeping ``keep`` rows from before (as the decoder keeps its history)."""
        count = rows.shape[0]
        if count == 0:
            return  # the decoder skips empty spans too, keeping everything it holds
        end = self._end
        if end - self._first > keep:
            self._first = end - keep
        ring = self._ring
        capacity = ring.shape[0]
        if end + count - self._first > capacity:
            self._remake(keep + count + self._SPARE_ROWS)
            ring = self._ring
            capacity = ring.shape[0]
        at = (end - self._offset) % capacity
        stop = at + count
        # Always a copy: ``rows`` is a view of the whole batch's hidden matrix.
        if stop <= capacity:
            ring[at:stop] = rows
        else:
            ring[at:] = rows[: capacity - at]
            ring[: stop - capacity] = rows[capacity - at :]
        self._end = end + count

    def _remake(self, capacity: int) -> None:
        """A ring of ``capacity`` rows with the rows held from its first row on."""
        ring = np.empty((capacity, self._ring.shape[1]), dtype=np.float32)
        held = self._end - self._first
        if held:
            frames = np.arange(self._first - self._offset, self._end - self._offset)
            np.take(self._ring, frames, axis=0, out=ring[:held], mode="wrap")
        self._ring, self._offset = ring, self._first

    def rows(self, frames: np.ndarray) -> np.ndarray:
        """The rows of ``frames`` (absolute): a view of the ring for consecutive frames in order
        (what the decoder asks for), to be read before the next :meth:`append`; else a copy."""
        if frames.size == 0:
            return self._ring[:0]
        low, high = int(frames.min()), int(frames.max())
        if low < self._first or high >= self._end:
            raise IndexError(f"frames {low}..{high} are no longer held")
        if high - low + 1 == frames.size and (frames.size == 1 or bool((frames[1:] > frames[:-1]).all())):
            capacity = self._ring.shape[0]
            start = (low - self._offset) % capacity
            if start + frames.size > capacity:  # the run wraps round: the ring starts afresh
                self._remake(capacity)
                start = low - self._offset
            return self._ring[start : start + frames.size]
        return np.take(self._ring, frames - self._offset, axis=0, mode="wrap")

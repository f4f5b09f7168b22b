"""Synthetic posteriors for the decoder's tests: mostly blank, a few tokens where asked, and
the ways of decoding them (exact posteriors, or loose bounds with exact values on demand)."""

from __future__ import annotations

import numpy as np

from edge_agent.engine.decoder import CompiledKeyword, Detection, KeywordDecoder, process_many

FRAME = 0.03
BLANK, A, B, C, D, X = range(6)
VOCAB = 6


def posteriors(length: int, events: dict[int, dict[int, float]]) -> np.ndarray:
    """Frames of mostly blank; ``events[frame] = {token: probability}``, the rest on blank."""
    p = np.zeros((length, VOCAB))
    p[:, BLANK] = 1.0
    for frame, tokens in events.items():
        for token, prob in tokens.items():
            p[frame, token] = prob
        p[frame, BLANK] = 1.0 - sum(tokens.values())
    return p


def keyword(
    text: str, tokens: list[int], threshold: float = 0.3, low: float = 0.1, high: float = 2.5
) -> CompiledKeyword:
    return CompiledKeyword(text, tuple((t,) for t in tokens), threshold, low, high)


def decode(
    p: np.ndarray, keywords: list[CompiledKeyword], chunk: int = 0, **options: float
) -> list[Detection]:
    decoder = KeywordDecoder(keywords, frame_seconds=FRAME, **options)
    found: list[Detection] = []
    if chunk:
        for start in range(0, p.shape[0], chunk):
            found += decoder.process(p[start : start + chunk])
    else:
        found += decoder.process(p)
    return found + decoder.finish()


ABCD = keyword("abcd", [A, B, C, D])


def spoken(
    start: int, probs: tuple[float, ...] = (0.9, 0.9, 0.9, 0.9), spacing: int = 6
) -> dict[int, dict[int, float]]:
    pairs = zip([A, B, C, D], probs, strict=True)
    return {start + i * spacing: {token: prob} for i, (token, prob) in enumerate(pairs)}


def random_speech(
    rng: np.random.Generator,
    keywords_said: int,
    lowest_probability: float,
    closest_spacing: int,
    other_frames: int,
    faintest_other: float,
    length: int = 600,
) -> np.ndarray:
    """``length`` frames where "abcd" is said ``keywords_said`` times (each character's
    posterior from ``lowest_probability`` to 0.95, ``closest_spacing`` to 11 frames apart,
    overlapping at times), among ``other_frames`` frames of other speech (a random character, or
    a keyword's one alone, from ``faintest_other`` to 0.6)."""
    events: dict[int, dict[int, float]] = {}
    for start in rng.integers(0, length - 40, size=keywords_said):
        probs = tuple(float(p) for p in rng.uniform(lowest_probability, 0.95, size=4))
        events.update(spoken(int(start), probs, spacing=int(rng.integers(closest_spacing, 12))))
    for frame in rng.integers(0, length, size=other_frames):
        events.setdefault(int(frame), {int(rng.integers(1, 6)): float(rng.uniform(faintest_other, 0.6))})
    return posteriors(length, events)


# --- bounds and exact posteriors on demand (process_many with a resolver) ------------------


def same_detections(got: list[list[Detection]], expected: list[list[Detection]]) -> bool:
    """Equal keywords, peaks and times; confidences equal but for float rounding (a recurrence
    summed from another first frame)."""

    def key(found: list[Detection]) -> list[tuple[object, ...]]:
        return sorted((d.end, d.keyword, d.peak_frames, d.start, round(d.confidence, 9)) for d in found)

    return [key(g) for g in got] == [key(e) for e in expected]


class CountingResolver:
    """Hands out exact posteriors by absolute frame, and counts what it was asked for."""

    def __init__(self, streams: list[np.ndarray]) -> None:
        self.streams = streams
        self.asked = [0] * len(streams)
        self.calls = 0

    def __call__(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        self.calls += 1
        self.largest = max(getattr(self, "largest", 0), sum(f.size for f in frames))
        for i, wanted in enumerate(frames):
            assert len(set(wanted.tolist())) == wanted.size  # never the same frame twice in a call
            self.asked[i] += wanted.size
        return [stream[wanted] for stream, wanted in zip(self.streams, frames, strict=True)]


def loose_bounds(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Upper bounds of every posterior, as loose as an output layer's subset softmax can be."""
    return np.minimum(1.0, p * rng.uniform(1.0, 30.0, size=p.shape) + rng.uniform(0, 1e-4, size=p.shape))


def decode_lazily(
    signals: list[np.ndarray], keywords: list[CompiledKeyword], chunk: int, seed: int
) -> tuple[list[list[Detection]], CountingResolver]:
    """Decode from bounds, resolving exact values on demand; returns detections and the resolver."""
    rng = np.random.default_rng(seed)
    decoders = [KeywordDecoder(keywords, frame_seconds=FRAME) for _ in signals]
    columns = decoders[0].columns
    exact = [s[:, columns] for s in signals]
    bounds = [loose_bounds(e, rng) for e in exact]
    resolver = CountingResolver(exact)
    found: list[list[Detection]] = [[] for _ in signals]
    for start in range(0, max(s.shape[0] for s in signals), chunk):
        pieces = [b[start : start + chunk] for b in bounds]
        for i, detections in enumerate(process_many(decoders, pieces, resolver)):
            found[i] += detections
    for i, decoder in enumerate(decoders):
        found[i] += decoder.finish()
    return found, resolver

"""Lowering a threshold only adds detections: every keyword occurrence reported at a threshold is
reported at every lower one, as confident or more, at times that overlap it (firing.py says
why). Checked on every recording of audio/dev for the wake word and the README's custom
keywords, and on synthetic posteriors drawn by hypothesis."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.audio.wav import read_wav, to_mono_16k
from edge_agent.engine.decoder import CompiledKeyword, Detection, KeywordDecoder
from edge_agent.engine.detector import feed_many
from edge_agent.engine.model import KeywordSpec
from tests.engine.decoder_signals import FRAME, VOCAB, A, B, C, D, decode, keyword

GRID = (1e-4, 3e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5, 0.9)
KEYWORDS = ("小云小云", "如家酒店", "瑞宝分理处", "八角岭")
SOX_5 = "pos/20200707_spk57db_storenoise52db_40cm_xiaoyun_sox_5.wav"


def missing_at_lower(higher: Sequence[Detection], lower: Sequence[Detection]) -> list[Detection]:
    """The detections of ``higher`` that ``lower`` does not report as confident or more at times
    that overlap them."""
    return [
        d
        for d in higher
        if not any(
            other.keyword == d.keyword
            and other.confidence >= d.confidence * (1 - 1e-9)
            and other.start < d.end
            and d.start < other.end
            for other in lower
        )
    ]


def assert_monotone(found: dict[float, list[Detection]], what: str) -> None:
    thresholds = sorted(found)
    for i, low in enumerate(thresholds):
        for high in thresholds[i + 1 :]:
            assert missing_at_lower(found[high], found[low]) == [], f"{what}: {high} -> {low}"


@pytest.fixture(scope="module")
def dev_posteriors(numpy_model, dev_audio: Path) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    files = sorted(dev_audio.glob("pos/*.wav")) + sorted(dev_audio.glob("neg/*.wav"))
    assert len(files) == 58
    return {f"{p.parent.name}/{p.name}": numpy_model.posteriors(to_mono_16k(read_wav(p))) for p in files}


@pytest.mark.parametrize("text", KEYWORDS)
def test_every_detection_on_audio_dev_survives_every_lower_threshold(
    text: str, numpy_model, dev_posteriors
) -> None:  # type: ignore[no-untyped-def]
    base = numpy_model.compile(KeywordSpec(text))
    for name, posteriors in dev_posteriors.items():
        found = {}
        for threshold in GRID:
            decoder = numpy_model.decoder([replace(base, threshold=threshold)])
            found[threshold] = decoder.process(posteriors) + decoder.finish()
        assert_monotone(found, f"{text} in {name}")


def detections(model, samples: np.ndarray, threshold: float, chunk: int = 0) -> list[Detection]:  # type: ignore[no-untyped-def]
    detector = model.detector([KeywordSpec("小云小云", threshold)])
    if not chunk:
        return detector.finish(samples)
    found = []
    for start in range(0, samples.shape[0], chunk):
        found += detector.feed(samples[start : start + chunk])
    return found + detector.finish()


def key(found: Sequence[Detection]) -> list[tuple[float, float, float]]:
    return [(round(d.confidence, 4), round(d.start, 3), round(d.end, 3)) for d in found]


@pytest.mark.parametrize("threshold", [0.5, 0.05, 0.02, 0.002])
def test_a_weak_partial_match_does_not_hide_the_keyword_on_sox_5(
    threshold: float, numpy_model, dev_audio
) -> None:  # type: ignore[no-untyped-def]
    """The keyword of this recording, 0.9962 at 6.357-7.678 s, is reported at every threshold;
    below 0.025 a weak match borrowing its first characters fires first, and is reported too.
    Whole file, 100 ms chunks and a batch of streams agree."""
    samples = to_mono_16k(read_wav(dev_audio / SOX_5))
    whole = detections(numpy_model, samples, threshold)
    assert (0.9962, 6.357, 7.678) in key(whole)
    assert [d for d in whole if d.confidence < threshold] == []
    assert key(detections(numpy_model, samples, threshold, chunk=1600)) == key(whole)
    streams = [numpy_model.detector([KeywordSpec("小云小云", threshold)]) for _ in range(2)]
    batched: list[list[Detection]] = [[], []]
    # The second stream two output frames (60 ms) behind the first: streams out of step.
    offset = 960
    padded = [samples, np.concatenate([np.zeros(offset, dtype=samples.dtype), samples])]
    for start in range(0, padded[1].shape[0], 1600):
        for i, found in enumerate(feed_many(streams, [p[start : start + 1600] for p in padded])):
            batched[i] += found
    for i, detector in enumerate(streams):
        batched[i] += detector.finish()
    assert key(batched[0]) == key(whole)
    shifted = [(d.confidence, d.start - offset / 16000, d.end - offset / 16000) for d in batched[1]]
    np.testing.assert_allclose(shifted, [(d.confidence, d.start, d.end) for d in whole], atol=1e-3)


# --- synthetic posteriors ------------------------------------------------------------------

TOKENS = (A, B, C, D)


@st.composite
def noisy_speech(draw: st.DrawFn) -> np.ndarray:
    """Up to 160 frames: blank, with keyword characters (and a distractor) here and there at
    random strengths, often in keyword order, as weak partial matches and real keywords are."""
    length = draw(st.integers(40, 160))
    p = np.zeros((length, VOCAB))
    p[:, 0] = 1.0
    events = draw(
        st.lists(
            st.tuples(st.integers(0, length - 1), st.integers(1, VOCAB - 1), st.floats(1e-4, 1.0)),
            max_size=24,
        )
    )
    runs = draw(
        st.lists(
            st.tuples(
                st.integers(0, length - 1),
                st.integers(2, 10),
                st.lists(st.floats(1e-4, 1.0), min_size=4, max_size=4),
            ),
            max_size=4,
        )
    )
    for start, spacing, strengths in runs:
        for i, strength in enumerate(strengths):
            if start + i * spacing < length:
                events.append((start + i * spacing, TOKENS[i], strength))
    for frame, token, strength in events:
        # Clipped: the sums' rounding must not make a posterior negative.
        p[frame, token] = strength * max(0.0, 1.0 - p[frame, 1:].sum() + p[frame, token])
        p[frame, 0] = max(0.0, 1.0 - p[frame, 1:].sum())
    return p


# Derandomised: CI runs the same 300 examples every time (a known counterexample, below, must not
# make a run fail by chance); widen the search locally with --hypothesis-seed.
PROPERTY_SETTINGS = settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
# The decoder's timing settings, three values each, its defaults among them.
TIMING_OPTIONS = st.fixed_dictionaries(
    {
        "refractory_seconds": st.sampled_from([0.0, 0.3, 1.0]),
        "hold_seconds": st.sampled_from([0.06, 0.5, 1.5]),
        "pause_seconds": st.sampled_from([0.03, 0.35, 2.0]),
        "settle_ratio": st.sampled_from([1.0, 2.5, 10.0]),
    }
)


@PROPERTY_SETTINGS
@given(p=noisy_speech(), options=TIMING_OPTIONS)
def test_lowering_the_threshold_only_adds_detections_on_synthetic_posteriors(
    p: np.ndarray, options: dict[str, float]
) -> None:
    found = {t: decode(p, [keyword("abcd", [A, B, C, D], threshold=t)], **options) for t in GRID}
    assert_monotone(found, "abcd")


# Keywords of two to four characters, with a repeated character (its blank dip) and one said twice.
SPELLINGS = ((A, B), (A, B, C), (A, B, C, D), (A, A, B), (A, B, A, B))
# Thresholds whose character floors (t ** (n - 1)) the characters below sit on.
FLOORED = (0.01, 0.05, 0.2, 0.5)


@st.composite
def speech_on_the_floors(draw: st.DrawFn) -> tuple[tuple[int, ...], np.ndarray]:
    """A keyword's spelling, and up to 80 frames of blank with runs of its characters in order,
    overlapping, whose posteriors sit below, near and above the character floors of a few
    thresholds (or anywhere), and other tokens between them here and there (gap penalties: weak
    matches of strong characters): matches whose weakest character, not their confidence, sets
    the highest threshold at which they count, next to more and less confident ones."""
    tokens = draw(st.sampled_from(SPELLINGS))
    n = len(tokens)
    near_floors = [min(1.0, t ** (n - 1) * f) for t in FLOORED for f in (0.5, 0.97, 1.03, 2.0)]
    strength = st.sampled_from([*near_floors, 0.03, 0.1, 0.3, 0.7, 1.0]) | st.floats(1e-4, 1.0)
    # Between character i and the next: nothing, or a token at this frame offset and strength.
    between = st.none() | st.tuples(
        st.integers(1, 7), st.integers(1, VOCAB - 1), st.sampled_from([0.5, 0.95])
    )
    length = draw(st.integers(20, 80))
    runs = draw(
        st.lists(
            st.tuples(
                st.integers(0, length - 1),
                st.integers(1, 8),
                st.lists(st.tuples(strength, between), min_size=n, max_size=n),
            ),
            min_size=1,
            max_size=5,
        )
    )
    p = np.zeros((length, VOCAB))
    p[:, 0] = 1.0

    def say(frame: int, token: int, value: float) -> None:
        if frame < length:
            p[frame, token] = value * max(0.0, 1.0 - p[frame, 1:].sum() + p[frame, token])
            p[frame, 0] = max(0.0, 1.0 - p[frame, 1:].sum())

    for start, spacing, characters in runs:
        for i, (token, (value, other)) in enumerate(zip(tokens, characters, strict=True)):
            say(start + i * spacing, token, value)
            if other is not None and i < n - 1 and other[0] < spacing:
                say(start + i * spacing + other[0], other[1], other[2])
    return tokens, p


@PROPERTY_SETTINGS
@given(spoken=speech_on_the_floors(), options=TIMING_OPTIONS)
def test_lowering_the_threshold_only_adds_detections_when_weak_characters_straddle_floors(
    spoken: tuple[tuple[int, ...], np.ndarray], options: dict[str, float]
) -> None:
    """Lowering the threshold lowers the characters' floors too: it adds matches more confident
    than some that counted before, which must still take no detection's place."""
    tokens, p = spoken
    text = "abcd"[: len(tokens)]
    found = {t: decode(p, [keyword(text, list(tokens), threshold=t)], **options) for t in GRID}
    assert_monotone(found, f"{tokens}")


def test_a_match_unlocked_by_a_lower_character_floor_does_not_silence_a_detection() -> None:
    """Found by the property test above: a, b, c at 1.0 and d at 1e-4 every 2 frames (0.1, but d
    is below 0.05 ** 3), then a, b, c, d at 1, 0.5, 0.5, 1 every 4 frames and more characters
    after them (0.088). At 0.05 the second is reported; at 0.01 the first counts too and fires
    first, but it is weaker (it counts up to 0.046, where d reaches the floor; the second up to
    0.088), so its refractory period does not silence the second, which ranked by confidence it
    did."""
    p = np.zeros((40, VOCAB))
    p[:, 0] = 1.0
    for frame, token, strength in [
        (0, A, 1.0), (2, B, 1.0), (4, C, 1.0), (6, D, 1e-4),
        (9, A, 1.0), (13, B, 0.5), (17, C, 0.5), (18, A, 0.9375), (21, D, 1.0), (24, C, 1.0),
        (27, D, 1.0),
    ]:  # fmt: skip
        p[frame, token] = strength
        p[frame, 0] = 1.0 - strength
    options = {"refractory_seconds": 1.0, "hold_seconds": 0.06, "pause_seconds": 0.03, "settle_ratio": 1.0}
    found = {t: decode(p, [keyword("abcd", [A, B, C, D], threshold=t)], **options) for t in (0.05, 0.01)}
    assert [round(d.confidence, 4) for d in found[0.05]] == [0.0884]
    assert_monotone(found, "abcd")


def test_the_synthetic_decoder_is_the_one_under_test() -> None:
    """decode() builds the decoder the tests mean (a guard against testing a stand-in)."""
    k: CompiledKeyword = keyword("abcd", [A, B, C, D])
    assert KeywordDecoder([k], frame_seconds=FRAME).keywords == [k]

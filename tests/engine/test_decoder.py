"""The keyword decoder on synthetic posteriors: every rule of the detection policy, end to end
through ``KeywordDecoder``, no model. The rules alone, on score sequences: test_firing_policy.py."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.engine.decoder import CompiledKeyword, KeywordDecoder
from tests.engine.decoder_signals import (
    ABCD,
    BLANK,
    FRAME,
    A,
    B,
    C,
    D,
    X,
    decode,
    keyword,
    posteriors,
    same_detections,
    spoken,
)


def test_detects_a_keyword_with_times_covering_its_peaks() -> None:
    p = posteriors(100, spoken(20))
    (found,) = decode(p, [ABCD])
    assert found.keyword == "abcd"
    assert found.confidence == pytest.approx(0.9, abs=1e-6)
    assert found.peak_frames == (20, 26, 32, 38)
    assert found.start < 20 * FRAME and found.end > 38 * FRAME
    assert found.end - found.start <= 2.5


def test_confidence_is_length_normalised() -> None:
    """2- and 4-character keywords with the same per-character evidence score the same."""
    two = keyword("ab", [A, B])
    p = posteriors(80, {10: {A: 0.5}, 16: {B: 0.5}, 40: {A: 0.5}, 46: {B: 0.5}, 52: {C: 0.5}, 58: {D: 0.5}})
    found = {d.keyword: d.confidence for d in decode(p, [two, ABCD])}
    assert found["ab"] == pytest.approx(0.5, abs=1e-6)
    assert found["abcd"] == pytest.approx(0.5, abs=1e-6)


def test_unrelated_speech_between_characters_breaks_the_match() -> None:
    clean = posteriors(100, spoken(20, spacing=8))
    intruded = clean.copy()
    for frame in (28 + 3, 28 + 4):  # a confident other character between B and C
        intruded[frame] = 0.0
        intruded[frame, X] = 0.95
        intruded[frame, BLANK] = 0.05
    assert len(decode(clean, [ABCD])) == 1
    assert decode(intruded, [ABCD]) == []


def test_keyword_ending_on_the_last_frame_is_found_at_finish() -> None:
    p = posteriors(39, spoken(20))  # D on frame 38, the very last one
    decoder = KeywordDecoder([ABCD], frame_seconds=FRAME)
    assert decoder.process(p) == []  # still waiting for the frame after its peak
    (found,) = decoder.finish()
    assert found.peak_frames[-1] == 38


def test_repeated_character_needs_a_blank_between() -> None:
    aa = keyword("aa", [A, A], threshold=0.3, low=0.0)
    one_long_a = posteriors(40, {10: {A: 0.9}, 11: {A: 0.9}, 12: {A: 0.9}})
    two_as = posteriors(40, {10: {A: 0.9}, 11: {A: 0.2}, 12: {A: 0.9}})
    assert decode(one_long_a, [aa]) == []
    (found,) = decode(two_as, [aa])
    assert found.peak_frames == (10, 12)


def test_duration_limits() -> None:
    fast = posteriors(60, spoken(10, spacing=1))  # 4 characters in 0.12 s
    slow = posteriors(300, spoken(10, spacing=40))  # 3.6 s
    assert decode(fast, [keyword("abcd", [A, B, C, D], low=0.25)]) == []
    assert decode(slow, [keyword("abcd", [A, B, C, D], high=2.5)]) == []
    assert len(decode(slow, [keyword("abcd", [A, B, C, D], high=5.0)])) == 1


def test_refractory_period_merges_repeats_but_not_later_keywords() -> None:
    close = posteriors(200, {**spoken(20), **spoken(50)})  # second one 0.9 s later
    apart = posteriors(300, {**spoken(20), **spoken(100)})  # 2.4 s later
    assert len(decode(close, [ABCD], refractory_seconds=1.0)) == 1
    assert len(decode(apart, [ABCD], refractory_seconds=1.0)) == 2
    assert len(decode(close, [ABCD], refractory_seconds=0.0)) == 2


def test_one_spoken_keyword_gives_one_detection_even_without_refractory() -> None:
    smeared = posteriors(100, {**spoken(20), 39: {D: 0.8}, 40: {D: 0.7}})
    assert len(decode(smeared, [ABCD], refractory_seconds=0.0)) == 1


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 17, 64])
def test_chunking_never_changes_detections(chunk: int) -> None:
    rng = np.random.default_rng(chunk)
    events = {**spoken(20), **spoken(120, (0.6, 0.7, 0.5, 0.9)), **spoken(230, (0.9, 0.2, 0.9, 0.9))}
    for frame in rng.integers(0, 300, size=40):
        events.setdefault(int(frame), {int(rng.integers(1, 6)): float(rng.uniform(0.05, 0.6))})
    p = posteriors(300, events)
    whole = decode(p, [ABCD, keyword("cd", [C, D])])
    assert whole  # the test means something only if there is something to find
    # Equal but for float rounding: an exact run extended chunk by chunk sums from other frames.
    assert same_detections([decode(p, [ABCD, keyword("cd", [C, D])], chunk=chunk)], [whole])


def test_weak_match_borrowing_the_first_characters_does_not_hide_the_real_one() -> None:
    """Noise-level a, b early, then a clear 'abcd': report the clear one, with its own times."""
    events = {5: {A: 0.02}, 12: {B: 0.02}, **spoken(40, spacing=8)}
    p = posteriors(120, events)
    (found,) = decode(p, [keyword("abcd", [A, B, C, D], threshold=0.05)])
    assert found.peak_frames == (40, 48, 56, 64)
    assert found.confidence == pytest.approx(0.9, abs=1e-6)


def firing_frame(p: np.ndarray, keywords: list[CompiledKeyword], **options: float) -> int:
    """The frame after which the (one) detection comes out, fed one frame at a time."""
    decoder = KeywordDecoder(keywords, frame_seconds=FRAME, **options)
    for frame in range(p.shape[0]):
        if decoder.process(p[frame : frame + 1]):
            return frame
    raise AssertionError("no detection")


def test_a_weak_match_of_a_repeated_word_fires_without_waiting_for_its_own_second_half() -> None:
    """'abab' said weakly (0.5 a character) then silence: its own second 'ab' is the start of
    another 'abab' that perfect characters would make 1.4x as confident, not twice: no wait."""
    abab = keyword("abab", [A, B, A, B], threshold=0.05)
    events = {20 + 6 * i: {token: 0.5} for i, token in enumerate([A, B, A, B])}
    p = posteriors(150, events)
    frame = firing_frame(p, [abab], hold_seconds=1.5)
    assert frame <= 38 + 2  # one frame after its last character, not 1.5 s (50 frames) later


def test_a_weak_early_match_of_a_repeated_word_waits_for_the_clear_one() -> None:
    """Noise-level 'ab', then a clear 'abab': the weak match ending on the clear word's first
    'ab' must not be reported; the clear word is, with its own times."""
    abab = keyword("abab", [A, B, A, B], threshold=0.05)
    events = {5: {A: 0.02}, 12: {B: 0.02}, **{40 + 8 * i: {t: 0.9} for i, t in enumerate([A, B, A, B])}}
    (found,) = decode(posteriors(150, events), [abab], chunk=1)
    assert found.peak_frames == (40, 48, 56, 64)
    assert found.confidence == pytest.approx(0.9, abs=1e-6)


@pytest.mark.parametrize("settle_ratio, waits", [(2.0, True), (2.5, False)])
def test_a_weak_match_waits_only_for_a_match_that_could_beat_it_by_the_settle_ratio(
    settle_ratio: float, waits: bool
) -> None:
    """'abab' with a first 'ab' at 0.2 and a clear second one, then silence: another 'abab'
    starting on the clear 'ab' could be at most (1 / 0.2) ** 0.5 = 2.24 times as confident:
    worth a wait for a ratio of 2, not for 2.5."""
    abab = keyword("abab", [A, B, A, B], threshold=0.05)
    events = {20: {A: 0.2}, 26: {B: 0.2}, 32: {A: 1.0}, 38: {B: 1.0}}
    frame = firing_frame(posteriors(150, events), [abab], hold_seconds=1.5, settle_ratio=settle_ratio)
    assert (frame > 38 + 5) == waits


def test_settle_ratio_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="settle_ratio"):
        KeywordDecoder([ABCD], frame_seconds=FRAME, settle_ratio=0.5)


def test_a_weak_match_waits_for_a_better_one_only_while_the_speech_goes_on() -> None:
    """'abab' with a weak first 'ab' and a clear second one, then silence: the clear 'ab' is
    the start of another 'abab' that perfect characters would make more than twice as
    confident, so the match waits; but once no character has come for a pause, nothing is
    being said that could complete it, and it fires then, not at the end of the hold."""
    abab = keyword("abab", [A, B, A, B], threshold=0.05)
    events = {20: {A: 0.05}, 26: {B: 0.05}, 32: {A: 0.9}, 38: {B: 0.9}}
    p = posteriors(150, events)
    pause_frames = 10
    frame = firing_frame(p, [abab], hold_seconds=1.5, pause_seconds=pause_frames * FRAME)
    # The last character at 38 still counts through frame 38 + pause_frames - 1; at the next
    # frame no partial match has gained one for a whole pause.
    assert frame == 38 + pause_frames
    # With a pause longer than the hold, it waits the whole hold (50 frames).
    assert firing_frame(p, [abab], hold_seconds=1.5, pause_seconds=3.0) == 38 + 50


SLOW_ABAB = (40, 54, 68, 82)  # a clear 'abab' spoken slowly: a character every 14 frames


@pytest.mark.parametrize(
    "pause_frames, reported",
    [
        (14, [SLOW_ABAB]),
        (20, [SLOW_ABAB]),
        (13, [(5, 12, 40, 54), SLOW_ABAB]),
        (8, [(5, 12, 40, 54), SLOW_ABAB]),
    ],
)
def test_a_weak_early_match_waits_for_the_keyword_while_its_characters_come_within_a_pause(
    pause_frames: int, reported: list[tuple[int, ...]]
) -> None:
    """Noise-level 'ab', then a slow clear 'abab': the weak match ending on its first 'ab' waits
    as long as the next character comes within a pause, and the clear word alone is reported.
    With a pause shorter than the speaker's, the weak match fires first (the trade-off
    engine.pause sets), and the clear word is still reported after it: a weaker detection never
    silences a more confident one."""
    abab = keyword("abab", [A, B, A, B], threshold=0.05)
    events = {
        5: {A: 0.02},
        12: {B: 0.02},
        **{f: {t: 0.9} for f, t in zip(SLOW_ABAB, [A, B, A, B], strict=True)},
    }
    found = decode(
        posteriors(200, events), [abab], chunk=1, hold_seconds=1.5, pause_seconds=pause_frames * FRAME
    )
    assert [d.peak_frames for d in found] == reported


def test_score_does_not_drift_after_long_silence() -> None:
    short = posteriors(60, spoken(20))
    long = posteriors(3000, spoken(2920))
    assert decode(short, [ABCD])[0].confidence == pytest.approx(decode(long, [ABCD])[0].confidence, abs=1e-9)


def test_streams_do_not_share_state() -> None:
    first = KeywordDecoder([ABCD], frame_seconds=FRAME)
    second = KeywordDecoder([ABCD], frame_seconds=FRAME)
    half_a = posteriors(30, {20: {A: 0.9}, 26: {B: 0.9}})
    half_b = posteriors(30, {2: {C: 0.9}, 8: {D: 0.9}})
    first.process(half_a)
    second.process(posteriors(30, {}))
    assert second.process(half_b) + second.finish() == []
    assert len(first.process(half_b) + first.finish()) == 1


def test_below_threshold_is_not_reported() -> None:
    p = posteriors(100, spoken(20, (0.2, 0.2, 0.2, 0.2)))
    assert decode(p, [keyword("abcd", [A, B, C, D], threshold=0.3)]) == []
    assert len(decode(p, [keyword("abcd", [A, B, C, D], threshold=0.1)])) == 1


def test_homophone_group_sums_posteriors() -> None:
    grouped = CompiledKeyword("ab", ((A, X), (B,)), 0.5, 0.0, 2.5)
    p = posteriors(40, {10: {A: 0.3, X: 0.4}, 16: {B: 0.7}})
    (found,) = decode(p, [grouped])
    assert found.confidence == pytest.approx(0.7, abs=1e-6)


def test_times_count_from_the_first_frame_given() -> None:
    p = posteriors(60, spoken(10))
    (from_zero,) = decode(p, [ABCD])
    decoder = KeywordDecoder([ABCD], frame_seconds=FRAME, first_frame=1000)
    (later,) = decoder.process(p) + decoder.finish()
    assert later.peak_frames == tuple(f + 1000 for f in from_zero.peak_frames)
    assert later.start == pytest.approx(from_zero.start + 1000 * FRAME)
    assert later.end == pytest.approx(from_zero.end + 1000 * FRAME)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": 1.5}, "threshold"),
        ({"low": 3.0, "high": 2.0}, "min_duration"),
    ],
)
def test_invalid_keyword_policy_is_refused(kwargs, message) -> None:  # type: ignore[no-untyped-def]
    options = {"threshold": 0.3, "low": 0.1, "high": 2.5, **kwargs}
    with pytest.raises(ValueError, match=message):
        keyword("abcd", [A, B, C, D], **options)


def test_decoder_options_are_checked() -> None:
    with pytest.raises(ValueError, match=r"gap_tolerance"):
        KeywordDecoder([ABCD], frame_seconds=FRAME, gap_tolerance=1.0)
    with pytest.raises(ValueError, match=r"at least one keyword"):
        KeywordDecoder([], frame_seconds=FRAME)


def test_a_character_never_said_cannot_be_carried_by_the_others() -> None:
    """Three clear characters and a fourth at silence level: geometric mean 0.055, no match."""
    events = {20: {A: 0.99}, 26: {B: 0.99}, 32: {C: 0.99}, 38: {D: 1e-5}}
    p = posteriors(80, events)
    assert decode(p, [keyword("abcd", [A, B, C, D], threshold=0.05)]) == []
    events[38] = {D: 1e-3}  # weak but said (floor 0.05**3 = 1.25e-4)
    (found,) = decode(posteriors(80, events), [keyword("abcd", [A, B, C, D], threshold=0.05)])
    assert found.peak_posteriors[-1] == pytest.approx(1e-3)


def test_the_strongest_match_ending_at_a_frame_is_reported_not_the_most_confident() -> None:
    """Two matches of abc end at frame 20: a, b at 0.5, 0.04 (frames 12, 14; confidence 0.271,
    but b reaches only the floor of 0.2: strength 0.2) and a, b at 0.1, 0.1 (frames 5, 8;
    confidence 0.215, strength 0.215). The strongest is reported: it counts at every threshold
    where the other does, so a lower threshold's extra matches never displace it."""
    p = posteriors(30, {5: {A: 0.1}, 8: {B: 0.1}, 12: {A: 0.5}, 14: {B: 0.04}, 20: {C: 1.0}})
    abc = keyword("abc", [A, B, C], threshold=0.1)
    (found,) = decode(p, [abc])
    assert found.peak_frames == (5, 8, 20)
    assert found.confidence == pytest.approx(0.01 ** (1 / 3))
    assert [d.peak_frames for d in decode(p, [keyword("abc", [A, B, C], threshold=0.21)])] == [(5, 8, 20)]
    assert decode(p, [keyword("abc", [A, B, C], threshold=0.22)]) == []

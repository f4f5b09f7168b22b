"""The firing policy on synthetic score sequences: one rule per test, no posteriors, no decoder."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge_agent.engine.decoder.firing import Candidate, Firing, FiringPolicy, keyword_span
from edge_agent.engine.decoder.keywords import CompiledKeyword

FRAME = 0.03
NONE = -math.inf  # no rival at all


def policy(
    threshold: float = 0.05,
    hold_frames: int = 20,
    pause_frames: int = 10,
    settle_ratio: float = 2.5,
    refractory_frames: int = 30,
) -> FiringPolicy:
    return FiringPolicy(
        threshold=threshold,
        min_duration=0.25,
        max_duration=2.5,
        hold_frames=hold_frames,
        pause_frames=pause_frames,
        settle_ratio=settle_ratio,
        refractory_frames=refractory_frames,
    )


def walk(
    rules: FiringPolicy,
    candidates: dict[int, float],
    rivals: dict[int, float] | None = None,
    frames: int = 200,
) -> list[tuple[int, Candidate]]:
    """Frames in order as the search walks them: the match ending at each frame (confidence,
    if any) is offered, then the pending detection is asked whether it is due, given the
    rivals' bound there (log score; none if absent). Returns (frame it fired at, detection)."""
    firing = Firing(rules)
    fired = []
    for frame in range(frames):
        confidence = candidates.get(frame)
        if confidence is not None and firing.offer(Candidate(frame, confidence)):
            continue
        if firing.due(frame, (rivals or {}).get(frame, NONE)):
            fired.append((frame, firing.fire(frame)))
    return fired


def test_times_in_seconds_become_frames_and_a_hold_or_pause_is_at_least_one_frame() -> None:
    keyword = CompiledKeyword("abcd", ((1,), (2,), (3,), (4,)), 0.3, 0.25, 2.5)
    rules = FiringPolicy.for_keyword(
        keyword, FRAME, refractory_seconds=1.0, hold_seconds=0.5, pause_seconds=0.001, settle_ratio=2.5
    )
    assert (rules.refractory_frames, rules.hold_frames, rules.pause_frames) == (33, 17, 1)
    assert (rules.threshold, rules.min_duration, rules.max_duration) == (0.3, 0.25, 2.5)


def test_a_match_counts_from_the_threshold_up() -> None:
    rules = policy(threshold=0.25)
    assert rules.reaches_threshold(math.log(0.25))
    assert not rules.reaches_threshold(math.log(0.2499))


def test_a_match_counts_only_within_the_keyword_durations() -> None:
    rules = policy()
    assert rules.duration_allowed(1.0, 1.25) and rules.duration_allowed(1.0, 3.5)
    assert not rules.duration_allowed(1.0, 1.2)
    assert not rules.duration_allowed(1.0, 3.6)


def test_a_match_with_no_rival_fires_on_the_next_frame() -> None:
    ((frame, detection),) = walk(policy(), {10: 0.06})
    assert frame == 11 and detection.frame == 10


def test_a_more_confident_match_replaces_the_pending_one() -> None:
    """A weak match waits (a rival could still beat it); the clear one comes and replaces it."""
    rivals = {frame: math.log(0.9) for frame in range(11, 18)}
    ((frame, detection),) = walk(policy(), {10: 0.06, 18: 0.9}, rivals)
    assert detection.frame == 18 and frame == 19


def test_a_match_no_more_confident_than_the_pending_one_does_not_replace_it() -> None:
    firing = Firing(policy())
    assert firing.offer(Candidate(10, 0.5))
    assert not firing.offer(Candidate(12, 0.5))
    assert not firing.offer(Candidate(13, 0.4))
    assert not firing.offer(None)
    assert firing.pending == Candidate(10, 0.5)


def test_a_pending_match_waits_while_a_rival_could_beat_it_by_the_settle_ratio() -> None:
    """Pending at 0.1: a rival able to reach 0.3 (3 times) keeps it waiting; once the best rival
    can reach only 0.2 (2 times, below the ratio of 2.5), it fires."""
    rivals = {frame: math.log(0.3) for frame in range(11, 16)} | {16: math.log(0.2)}
    ((frame, _),) = walk(policy(settle_ratio=2.5), {10: 0.1}, rivals)
    assert frame == 16


def test_a_higher_settle_ratio_waits_for_fewer_rivals() -> None:
    rivals = {frame: math.log(0.3) for frame in range(11, 16)}
    ((cautious, _),) = walk(policy(settle_ratio=2.5), {10: 0.1}, rivals)
    ((relaxed, _),) = walk(policy(settle_ratio=3.5), {10: 0.1}, rivals)
    assert (cautious, relaxed) == (16, 11)


def test_the_hold_caps_the_wait() -> None:
    """A rival that could always beat the pending match: it fires a whole hold after its frame."""
    rivals = dict.fromkeys(range(200), 0.0)
    ((frame, detection),) = walk(policy(hold_frames=20), {10: 0.1}, rivals)
    assert detection.frame == 10 and frame == 10 + 20


def test_a_rival_counts_only_while_it_gained_a_character_within_a_pause() -> None:
    """A partial match that gained its last character at frame 2 and holds on (prefix): with a
    pause of 3 frames it bounds frames 2 to 4, and no later frame."""
    prefix = np.full(8, math.log(0.5))
    prefix[:2] = NONE
    ends = np.full(8, NONE)
    ends[2] = math.log(0.5)
    bound = policy(pause_frames=3).rivals_still_spoken(prefix, ends)
    np.testing.assert_array_equal(bound, [NONE, NONE, *[math.log(0.5)] * 3, NONE, NONE, NONE])


def test_a_rival_is_bounded_by_the_best_partial_match_whatever_its_age() -> None:
    """A character just said cannot lift the bound above the best partial match (``prefix``)."""
    prefix = np.full(4, math.log(0.2))
    ends = np.full(4, math.log(0.6))
    np.testing.assert_array_equal(policy(pause_frames=2).rivals_still_spoken(prefix, ends), prefix)


def test_after_a_detection_matches_no_more_confident_ending_in_the_refractory_period_do_not_count() -> None:
    rules = policy(refractory_frames=30)
    fired = walk(rules, {10: 0.9, 25: 0.9, 30: 0.5, 40: 0.9, 41: 0.9})
    assert [detection.frame for _, detection in fired] == [10, 41]


def test_a_weaker_detection_never_silences_a_more_confident_match() -> None:
    """A weak match fires at the end of its hold; the clear keyword it borrowed from comes after
    it, inside its refractory period, and is reported too; what follows the clear one, no more
    confident, is silenced by the clear one."""
    rivals = dict.fromkeys(range(200), 0.0)
    fired = walk(policy(hold_frames=20, refractory_frames=30), {10: 0.06, 35: 0.9, 45: 0.5}, rivals)
    assert [(detection.frame, detection.confidence) for _, detection in fired] == [(10, 0.06), (35, 0.9)]


def test_a_detection_restricts_where_matches_no_more_confident_may_begin() -> None:
    firing = Firing(policy(refractory_frames=30))
    firing.offer(Candidate(10, 0.9))
    assert firing.fire(11) == Candidate(10, 0.9)
    assert firing.pending is None
    # Matches may begin before frame 11 only if more confident than 0.9; ending through frame
    # 40 they must be more confident than 0.9 too.
    assert firing.restrictions(0) == [(11, 0.9)] and firing.restrictions(11) == []
    assert firing.silenced_below(40) == 0.9 and firing.silenced_below(41) == 0.0
    assert not firing.offer(Candidate(40, 0.9)) and firing.offer(Candidate(40, 0.95))


def test_the_refractory_period_lasts_at_least_until_the_detection_fired() -> None:
    """The matches seen while a detection waited were no more confident: they never fire after it."""
    firing = Firing(policy(refractory_frames=5, hold_frames=20))
    firing.offer(Candidate(10, 0.5))
    firing.fire(30)
    assert firing.silenced_below(30) == 0.5 and firing.silenced_below(31) == 0.0


def test_old_detections_are_forgotten_once_no_match_can_reach_them() -> None:
    firing = Firing(policy(refractory_frames=30))
    firing.offer(Candidate(10, 0.9))
    firing.fire(11)
    firing.forget(40, window_frames=20)
    assert firing.fired  # still in its refractory period
    firing.forget(50, window_frames=40)
    assert firing.fired  # a match ending at 50 may begin at 11, before the detection's end
    firing.forget(52, window_frames=40)
    assert not firing.fired


def test_nothing_pending_is_never_due_and_cannot_fire() -> None:
    firing = Firing(policy())
    assert not firing.due(10, NONE)
    with pytest.raises(RuntimeError):
        firing.fire(10)


def test_reset_forgets_the_pending_match_and_the_refractory_period() -> None:
    firing = Firing(policy(refractory_frames=30))
    firing.offer(Candidate(10, 0.9))
    firing.fire(11)
    firing.offer(Candidate(50, 0.9))
    firing.reset()
    assert firing.pending is None and firing.silenced_below(20) == 0.0 and firing.restrictions(0) == []


def test_a_span_covers_the_peaks_by_half_the_mean_distance_between_them() -> None:
    start, end = keyword_span((10, 16, 22, 28), FRAME, 0.0125)
    half = 6 * FRAME / 2
    assert start == pytest.approx(10 * FRAME + 0.0125 - half)
    assert end == pytest.approx(28 * FRAME + 0.0125 + half)


def test_a_span_extends_at_least_one_frame_each_side_and_never_before_zero() -> None:
    start, end = keyword_span((0, 0, 1), FRAME, 0.0)
    assert start == 0.0 and end == pytest.approx(2 * FRAME)


def test_a_one_character_span_extends_three_frames_each_side() -> None:
    start, end = keyword_span((10,), FRAME, 0.0)
    assert (start, end) == (pytest.approx(7 * FRAME), pytest.approx(13 * FRAME))


# --- ranking by strength (the highest threshold at which a match counts) --------------------


def test_a_match_without_a_strength_is_as_strong_as_it_is_confident() -> None:
    assert Candidate(10, 0.5).strength == 0.5 and Candidate(10, 0.5).rank == (0.5, 0.5)
    assert Candidate(10, 0.5, strength=0.2).rank == (0.2, 0.5)


def test_the_stronger_match_replaces_the_pending_one_even_if_less_confident() -> None:
    """Strength first: a more confident match whose weakest character makes it count only at
    lower thresholds does not replace a stronger one; among equally strong matches (sharing
    their weakest character) the more confident one does."""
    firing = Firing(policy())
    assert firing.offer(Candidate(10, 0.5, strength=0.2))
    assert not firing.offer(Candidate(11, 0.9, strength=0.1))
    assert firing.offer(Candidate(12, 0.3, strength=0.3))
    assert not firing.offer(Candidate(13, 0.3, strength=0.3))
    assert firing.offer(Candidate(14, 0.4, strength=0.3))
    assert firing.pending == Candidate(14, 0.4, strength=0.3)


def test_a_detection_silences_the_matches_no_stronger_than_itself_however_confident() -> None:
    """A detection that counts only up to 0.2 (a weak character) silences, in its refractory
    period and before its end, the matches no stronger, more confident or not, and no match
    stronger than itself."""
    firing = Firing(policy(refractory_frames=30))
    firing.offer(Candidate(10, 0.9, strength=0.2))
    firing.fire(11)
    assert firing.silenced_below(40) == 0.2 and firing.restrictions(0) == [(11, 0.2)]
    assert not firing.offer(Candidate(20, 0.95, strength=0.2))
    assert firing.offer(Candidate(20, 0.25, strength=0.25))


def test_the_settle_rule_reads_the_pending_matchs_strength() -> None:
    """Pending at confidence 0.9 but strength 0.1: a rival able to reach 0.3 could be 3 times as
    strong, so it waits (by confidence it would fire at once); rivals that matter are those
    whose every character is above 2.5 times its strength."""
    rules = policy(settle_ratio=2.5)
    assert not rules.settled(0.1, math.log(0.3)) and rules.settled(0.9, math.log(0.3))
    assert rules.rival_level(0.1) == pytest.approx(math.log(0.25))
    firing = Firing(rules)
    firing.offer(Candidate(10, 0.9, strength=0.1))
    assert not firing.due(11, math.log(0.3)) and firing.due(11, math.log(0.2))

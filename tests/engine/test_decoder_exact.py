"""Lazy exact posteriors: decoding from upper bounds, with exact posteriors resolved on demand,
finds what exact posteriors everywhere find (decoder/exact.py); the history and the exact runs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge_agent.engine.decoder import CompiledKeyword, Detection, KeywordDecoder, process_many
from edge_agent.engine.decoder.exact import ExactRuns, History, already_exact
from edge_agent.engine.decoder.recurrence import BOUND_SAFETY, KeywordScorer
from edge_agent.engine.decoder.search import FEASIBLE_SLACK, FIRST_TRY_STRENGTH, KeywordSearch
from tests.engine.decoder_signals import (
    ABCD,
    FRAME,
    A,
    B,
    C,
    CountingResolver,
    D,
    decode,
    decode_lazily,
    keyword,
    posteriors,
    random_speech,
    same_detections,
    spoken,
)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("chunk", [1, 4, 33, 500])
def test_bounds_and_resolution_give_the_exact_detections(seed: int, chunk: int) -> None:
    """Whatever the bounds and the chunking, the detections are those of exact posteriors."""
    rng = np.random.default_rng(seed)
    keywords = [
        ABCD,
        keyword("cd", [C, D], threshold=0.2),
        CompiledKeyword("aa", ((A,), (A,)), 0.2, 0.0, 2.5),
        # Below FIRST_TRY_STRENGTH: windows first read for a stronger match, then again.
        keyword("abcd at 0.05", [A, B, C, D], threshold=0.05),
    ]
    # Unrelated speech and near-misses among the keywords.
    signals = [random_speech(rng, 5, 0.05, 1, other_frames=60, faintest_other=1e-5) for _ in range(5)]
    expected = [decode(s, keywords, chunk=chunk) for s in signals]
    got, _ = decode_lazily(signals, keywords, chunk, seed)
    assert same_detections(got, expected)
    assert sum(len(e) for e in expected) >= 5  # the comparison covered real detections


class FrameLog(CountingResolver):
    """A resolver that also keeps every frame it was asked for."""

    def __init__(self, streams: list[np.ndarray]) -> None:
        super().__init__(streams)
        self.frames: list[int] = []

    def __call__(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        self.frames.extend(int(f) for wanted in frames for f in wanted.tolist())
        return super().__call__(frames)


def decode_one_stream(
    word: CompiledKeyword, signal: np.ndarray, bounds: np.ndarray | None, chunk: int
) -> tuple[list[Detection], FrameLog]:
    """One stream decoded from ``bounds`` (gathered columns; the exact posteriors if None) in
    chunks, exact values resolved on demand; the detections and the resolver."""
    decoder = KeywordDecoder([word], frame_seconds=FRAME)
    exact = signal[:, decoder.columns]
    bounds = exact if bounds is None else bounds
    resolver = FrameLog([exact])
    found: list[Detection] = []
    for start in range(0, signal.shape[0], chunk):
        (detections,) = process_many([decoder], [bounds[start : start + chunk]], resolver)
        found += detections
    return found + decoder.finish(), resolver


@pytest.mark.parametrize("chunk", [3, 200])
@pytest.mark.parametrize(("peak", "read_from_traces"), [(0.9, False), (0.15, True)])
def test_a_clear_keyword_is_read_from_its_first_character_and_a_weak_one_from_where_any_match_may_begin(
    chunk: int, peak: float, read_from_traces: bool
) -> None:
    """At a low threshold a character's floor is tiny (0.05 ** 3 here), and faint traces of the
    first character before a keyword reach it. A candidate's window is first read for a match
    as strong as FIRST_TRY_STRENGTH: a keyword said clearly resolves none of the traces; one
    said weakly (weaker than that) is read again from where a match that counts may begin, over
    the traces. Both are the detections of exact posteriors."""
    assert peak > FIRST_TRY_STRENGTH or read_from_traces
    traces = {frame: {A: 0.01} for frame in range(20, 60, 5)}  # a match may begin there
    word = keyword("abcd", [A, B, C, D], threshold=0.05)
    signal = posteriors(200, traces | spoken(80, (peak,) * 4))
    # The exact posteriors as bounds: what the filter sees is what was said.
    found, resolver = decode_one_stream(word, signal, None, chunk)
    assert same_detections([found], [decode(signal, [word])])
    assert len(found) == 1 and found[0].peak_frames == (80, 86, 92, 98)
    if read_from_traces:
        assert 20 <= min(resolver.frames) < 60
    else:
        assert min(resolver.frames) >= 80  # from the keyword's first character


@pytest.mark.parametrize("chunk", [3, 200])
def test_a_match_found_weaker_than_the_first_reading_is_for_is_read_again_and_an_earlier_one_wins(
    chunk: int,
) -> None:
    """The filter's bound lets a match as strong as FIRST_TRY_STRENGTH end at the keyword's last
    character (its bounds are loose), so the window is first read from where such a match may
    begin: after a first character too faint for one. The match found there is weaker than
    that, so the window is read again from where any match that counts may begin, and the
    match from the earlier first character, stronger, is the detection."""
    early_a, late_a, rest = 0.12, 0.05, 0.15
    assert math.exp(np.mean(np.log([early_a, rest, rest, rest]))) > math.exp(
        np.mean(np.log([late_a, rest, rest, rest]))
    )
    signal = posteriors(200, {60: {A: early_a}, 75: {A: late_a}, 81: {B: rest}, 87: {C: rest}, 93: {D: rest}})
    word = keyword("abcd", [A, B, C, D], threshold=0.05)
    bounds = signal[:, KeywordDecoder([word], frame_seconds=FRAME).columns]  # blank, a, b, c, d
    late_a_bound, rest_bound = 0.9, 0.3
    bounds[75, 1], bounds[81, 2], bounds[87, 3], bounds[93, 4] = (
        late_a_bound,
        rest_bound,
        rest_bound,
        rest_bound,
    )
    # Where a match that strong may begin, from the bounds: not at the earlier first character.
    assert np.mean(np.log([bounds[60, 1], rest_bound, rest_bound, rest_bound])) < math.log(FIRST_TRY_STRENGTH)
    assert np.mean(np.log([late_a_bound, rest_bound, rest_bound, rest_bound])) > math.log(FIRST_TRY_STRENGTH)
    found, resolver = decode_one_stream(word, signal, bounds, chunk)
    assert same_detections([found], [decode(signal, [word])])
    assert [d.peak_frames for d in found] == [(60, 81, 87, 93)]
    assert min(resolver.frames) == 60


def test_quiet_audio_needs_no_exact_posteriors() -> None:
    quiet = posteriors(3000, {})
    one_keyword = posteriors(3000, spoken(1500))
    (nothing, found), resolver = decode_lazily([quiet, one_keyword], [ABCD], chunk=10, seed=0)
    assert nothing == [] and len(found) == 1
    assert resolver.asked[0] == 0  # nothing that could be a character: bounds are enough
    # The keyword's stream resolved its window and hold time, not its 90 seconds.
    assert 0 < resolver.asked[1] < 200


@pytest.mark.parametrize(
    "speech_after",
    [
        pytest.param({}, id="a-weak-ending-alone"),
        # a first character said faintly after the detection: a match may begin there
        pytest.param({80: {A: 0.2}}, id="a-faint-first-character-after-the-detection"),
    ],
)
def test_a_weak_match_reusing_a_detections_characters_resolves_none_of_its_window(
    speech_after: dict[int, dict[int, float]],
) -> None:
    """After a detection, its first characters and a weak ending said later make a match the
    filter proposes; but it begins before the detection's end, so it counts only if stronger
    than the detection, which its bound rules out: none of its window is resolved, and the
    detections are those of exact posteriors. With speech after the detection where a match may
    begin but none could count, only matches beginning after the detection's end are left, and
    whether one of them may count is read from the frames after it alone (the detection's own
    characters cannot help them): nothing after the keyword is resolved either."""
    decoders = [KeywordDecoder([ABCD], frame_seconds=FRAME) for _ in range(2)]
    columns = decoders[0].columns
    alone = posteriors(300, spoken(40))
    # The weak ending comes after the detection's refractory period.
    tail = {**spoken(40), **speech_after, 95: {C: 0.35}, 101: {D: 0.35}}
    followed = posteriors(300, tail)
    exact = [alone[:, columns], followed[:, columns]]
    resolver = CountingResolver(exact)
    found: list[list[Detection]] = [[], []]
    for start in range(0, 300, 4):
        # The exact values themselves as the bounds: what is resolved is what decoding reads.
        pieces = [e[start : start + 4] for e in exact]
        for i, detections in enumerate(process_many(decoders, pieces, resolver)):
            found[i] += detections
    for i, decoder in enumerate(decoders):
        found[i] += decoder.finish()
    assert same_detections(found, [decode(alone, [ABCD], chunk=4), decode(followed, [ABCD], chunk=4)])
    assert [len(f) for f in found] == [1, 1]
    assert resolver.asked[1] == resolver.asked[0]


def test_a_frame_never_resolved_is_never_read() -> None:
    """Exact re-scoring reads only resolved frames: a resolver that answers nothing fails loudly."""
    decoder = KeywordDecoder([ABCD], frame_seconds=FRAME)
    p = posteriors(100, spoken(20))[:, decoder.columns]

    def refuse(frames: list[np.ndarray]) -> list[np.ndarray]:
        return [np.zeros((0, p.shape[1])) for _ in frames]

    with pytest.raises((AssertionError, ValueError)):
        process_many([decoder], [p], refuse)


# --- the history and the exact runs, alone ---------------------------------------------------


def test_the_history_keeps_its_last_rows_and_numbers_frames_from_the_stream_start() -> None:
    history = History.empty(3, first=100).extended(np.full((5, 3), 0.5), exact=False, keep=2)
    assert (history.first, history.end) == (100, 105)
    history = history.extended(np.full((3, 3), 0.25), exact=True, keep=2)
    assert (history.first, history.end) == (103, 108)
    values, exact = history.rows(103, 106)
    np.testing.assert_array_equal(values[:, 0], [0.5, 0.5, 0.25])
    np.testing.assert_array_equal(exact, [False, False, True])


def test_appending_in_place_keeps_what_a_new_extended_history_keeps() -> None:
    """History.append (in place, in a buffer with room to spare that moves its rows to the
    front when full) holds the rows, exactness and frame numbers that extended() would give,
    through many appends of every size and fills between them."""
    rng = np.random.default_rng(3)
    in_place = History.empty(3, first=7)
    rebuilt = History.empty(3, first=7)
    for step in range(300):
        rows = rng.random((int(rng.choice([0, 1, 3, 4, 40, 150])), 3))
        exact = bool(step % 3 == 0)
        keep = int(rng.choice([1, 5, 60]))
        in_place.append(rows, exact, keep)
        rebuilt = rebuilt.extended(rows, exact, keep)
        if in_place.end - in_place.first > 2 and step % 5 == 0:
            frames = np.array([in_place.first + 1, in_place.end - 1])
            in_place.fill(frames, np.full((2, 3), 2.0))
            rebuilt.fill(frames, np.full((2, 3), 2.0))
        assert (in_place.first, in_place.end) == (rebuilt.first, rebuilt.end)
        np.testing.assert_array_equal(in_place.values, rebuilt.values)
        np.testing.assert_array_equal(in_place.exact, rebuilt.exact)
        spans = [(in_place.first, in_place.end)]
        np.testing.assert_array_equal(in_place.unresolved(spans), rebuilt.unresolved(spans))


def test_unresolved_frames_are_those_of_the_spans_not_filled_yet() -> None:
    history = History.empty(2, first=10).extended(np.zeros((8, 2)), exact=False, keep=0)
    history.fill(np.array([12, 13]), np.ones((2, 2)))
    np.testing.assert_array_equal(history.unresolved([(11, 14), (16, 18)]), [11, 16, 17])
    assert history.rows(12, 14)[0].tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert history.unresolved([]).size == 0


def test_unresolved_frames_of_one_span_are_read_from_it_alone() -> None:
    """One span (a match under way, resolved ahead) against the plain definition, up to the
    newest frame, with fills and the buffer's moves in between."""
    rng = np.random.default_rng(8)
    history = History.empty(2, first=5)
    for _ in range(60):
        history.append(rng.random((int(rng.choice([1, 3, 4, 30])), 2)), exact=False, keep=40)
        frames = np.arange(history.first, history.end)
        filled = rng.choice(frames, size=min(5, frames.size), replace=False)
        history.fill(np.sort(filled), np.ones((filled.size, 2)))
        start = int(rng.integers(history.first, history.end))
        stop = int(rng.integers(start, history.end + 1))
        plain = [f for f in range(start, stop) if not history.exact[f - history.first]]
        np.testing.assert_array_equal(history.unresolved([(start, stop)]), plain)
        np.testing.assert_array_equal(history.unresolved([(start, stop), (start, start)]), plain)


def test_on_demand_resolution_asks_for_the_missing_frames_only_in_its_own_slot() -> None:
    history = History.empty(2, first=0).extended(np.zeros((6, 2)), exact=False, keep=0)
    history.fill(np.array([2]), np.ones((1, 2)))
    asked: list[list[list[int]]] = []

    def resolve(frames: list[np.ndarray]) -> list[np.ndarray]:
        asked.append([f.tolist() for f in frames])
        return [np.full((f.size, 2), 0.5) for f in frames]

    ensure = history.on_demand(resolve, index=1, count=3)
    ensure(1, 4)
    ensure(1, 4)  # all exact now: no call
    assert asked == [[[], [1, 3], []]]
    assert history.exact[1:4].all()


def test_an_exact_run_extended_chunk_by_chunk_finds_what_one_run_over_all_its_frames_finds() -> None:
    """Exact frames never change, so a run extended over new frames (a pending match reading
    one more chunk at every step) gives the scores, partial matches and peaks of the run
    computed over all of them at once (but for float rounding, which may pick another frame
    among equally good blank dips between a repeated character's two peaks)."""
    rng = np.random.default_rng(4)
    events = {int(f): {int(rng.integers(1, 6)): float(rng.uniform(0.05, 0.9))} for f in range(0, 90, 3)}
    for start in (8, 50):  # two 'aacd' among the noise, the second with a third 'a' on the way
        events.update({start: {A: 0.8}, start + 4: {A: 0.6}, start + 10: {C: 0.7}, start + 14: {D: 0.9}})
    events[57] = {A: 0.7}
    aa_cd = CompiledKeyword("aacd", ((A,), (A,), (C,), (D,)), 0.05, 0.0, 2.5)
    values = posteriors(90, events)[:, :5]  # blank and the keyword's tokens, as gathered
    history = History(values, np.ones(90, dtype=bool), first=0)
    scorer = KeywordScorer(aa_cd, {token: token for token in range(5)}, gap_tolerance=0.5)
    whole = ExactRuns(scorer).covering(history, 0, 90, already_exact)
    pieces = ExactRuns(scorer)
    for stop in (7, 30, 31, 64, 90):
        extended = pieces.covering(history, 0, stop, already_exact)
    assert (extended.start, extended.stop) == (0, 90)
    np.testing.assert_allclose(extended.scores, whole.scores, rtol=1e-12)
    np.testing.assert_allclose(extended.prefix, whole.prefix, rtol=1e-12)
    np.testing.assert_allclose(extended.ends, whole.ends, rtol=1e-12)
    # The terms it ran on, which reruns over its frames reuse: those of the frames.
    terms = scorer.terms(values[None])
    for kept, computed in zip((extended.log_q, extended.gap, extended.dips), terms, strict=True):
        np.testing.assert_array_equal(kept, computed[0])
    matched = np.flatnonzero(np.isfinite(whole.scores)).tolist()
    assert matched  # the comparison covered real matches
    for frame in matched:
        assert scorer.backtrace(extended.pointers, frame) == scorer.backtrace(whole.pointers, frame)


def test_runs_from_two_starts_read_in_turn_are_each_computed_once_and_extended() -> None:
    """A candidate after a recent detection reads the run from its window's start and the run
    from the detection's end, frame after frame: both are kept (and extended), so neither is
    recomputed when the other was read; each is what a run of its own would be, and the least
    recently used goes when more starts come."""
    rng = np.random.default_rng(5)
    events = {int(f): {int(rng.integers(1, 6)): float(rng.uniform(0.05, 0.9))} for f in range(0, 90, 3)}
    events.update({8: {A: 0.8}, 12: {A: 0.6}, 18: {C: 0.7}, 22: {D: 0.9}, 30: {A: 0.9}, 44: {D: 0.8}})
    aa_cd = CompiledKeyword("aacd", ((A,), (A,), (C,), (D,)), 0.05, 0.0, 2.5)
    history = History(posteriors(90, events)[:, :5], np.ones(90, dtype=bool), first=0)
    scorer = KeywordScorer(aa_cd, {token: token for token in range(5)}, gap_tolerance=0.5)
    runs = ExactRuns(scorer)
    computed: list[int] = []
    real_run = scorer.run

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        computed.append(args[0].log_q.shape[1])
        return real_run(*args, **kwargs)

    scorer.run = counted  # type: ignore[method-assign]
    for stop in (40, 41, 42, 60):
        from_window = runs.covering(history, 0, stop, already_exact)
        after_detection = runs.covering(history, 24, stop, already_exact)
    # Each start: computed once, then extended by the new frames only.
    assert computed == [40, 16, 1, 1, 1, 1, 18, 18]
    scorer.run = real_run  # type: ignore[method-assign]
    for start, run in ((0, from_window), (24, after_detection)):
        alone = ExactRuns(scorer).covering(history, start, 60, already_exact)
        assert (run.start, run.stop) == (start, 60)
        np.testing.assert_allclose(run.scores, alone.scores, rtol=1e-12)
        np.testing.assert_allclose(run.ends, alone.ends, rtol=1e-12)
    for start in range(30, 30 + ExactRuns.KEPT):
        runs.covering(history, start, 60, already_exact)
    assert runs.resume_point(0) == 0  # the least recently used went first
    assert runs.resume_point(24) == 24
    assert runs.start_between(31, 40) == 30 + ExactRuns.KEPT - 1


@pytest.mark.parametrize("chunk", [3, 40])
def test_runs_no_match_can_read_any_more_are_forgotten(chunk: int) -> None:
    """Once a keyword was found and fired, and then a window and a hold time of frames went by
    with nothing said, the search keeps none of the runs it read (a stream keeps no memory for
    matches long over)."""
    decoder = KeywordDecoder([ABCD], frame_seconds=FRAME)
    signal = posteriors(400, spoken(20))
    found = []
    for start in range(0, signal.shape[0], chunk):
        found += decoder.process(signal[start : start + chunk])
    assert len(found) == 1
    search = decoder.searches[0]
    assert search.runs.start_between(0, 400) is None


# --- where a candidate's window is read from -------------------------------------------------


def _search_over(values: np.ndarray, word: CompiledKeyword) -> tuple[KeywordSearch, History]:
    """A search of ``word`` whose history holds ``values`` (gathered, exact) from frame 0, with
    every frame where its first character reaches the floor noted as a possible start."""
    decoder = KeywordDecoder([word], frame_seconds=FRAME)
    search = decoder.searches[0]
    history = History(values, np.ones(values.shape[0], dtype=bool), first=0)
    search.note_starts(np.flatnonzero(search.scorer.first_said(values)), history)
    return search, history


def _best_sum_from(log_q: np.ndarray, begin: int, first: int, last: int) -> float:
    """Brute force: the best sum of the characters' logs at increasing frames, the first at
    ``begin`` and the last between ``first`` and ``last`` (forwards, unlike feasible_start)."""
    n = log_q.shape[1]
    best = np.full(last + 1, -np.inf)
    best[begin] = log_q[begin, 0]
    for i in range(1, n):
        reached = np.full(last + 1, -np.inf)
        for frame in range(begin + 1, last + 1):
            reached[frame] = best[:frame].max() + log_q[frame, i]
        best = reached
    return float(best[first:].max()) if n > 1 else float(best[max(first, begin) :].max())


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("strength", [0.2, 0.6])
@pytest.mark.parametrize("earliest_offset", [None, -6, 2])
def test_the_feasible_start_is_the_first_frame_whose_best_sum_reaches_the_level(
    seed: int, strength: float, earliest_offset: int | None
) -> None:
    """The backward pass against a forward brute force: for matches ending in a range of frames
    and as strong as a level (characters below that level's floor left out), beginning
    anywhere in their window or only from a given frame (after a detection's end), which may
    lie inside the range."""
    rng = np.random.default_rng(seed)
    events = {int(f): {int(rng.integers(2, 5)): float(rng.uniform(0.005, 0.95))} for f in range(0, 120, 2)}
    # First characters below the higher level's floor (but above the threshold's): windows that
    # the keywords said later narrow at that level.
    events.update({int(f): {A: float(rng.uniform(0.01, 0.03))} for f in range(1, 120, 4)})
    for start in rng.integers(0, 100, size=4):
        events.update(spoken(int(start), tuple(float(p) for p in rng.uniform(0.3, 0.95, 4)), spacing=3))
    word = keyword("abcd", [A, B, C, D], threshold=0.2)
    search, history = _search_over(posteriors(120, events)[:, :5], word)
    level = math.log(strength)
    q = search.scorer.characters(history.values)
    floor = max(search.said_floor, strength ** (search.n - 1) * BOUND_SAFETY)
    with np.errstate(divide="ignore"):
        log_q = np.where(q >= floor, np.log(q), -np.inf) / search.n
    narrowed = 0
    for last in range(20, 120, 7):
        first = last - 3
        earliest = None if earliest_offset is None else first + earliest_offset
        low = search.window_start(first, history)
        if earliest is not None:
            low = max(low, earliest)
        feasible = search.feasible_start(history, first, last, level, earliest)
        reaching = [
            b for b in range(low, last + 1) if _best_sum_from(log_q, b, first, last) >= level + FEASIBLE_SLACK
        ]
        expected = reaching[0] if reaching else last + 1
        assert feasible == expected
        if earliest is None:
            first_said = search.first_start(first, history)
            narrowed += first_said is not None and first_said < feasible <= last
        else:
            narrowed += feasible > search.feasible_start(history, first, last, level)
    # At 0.6, some windows narrowed and held a possible match; from a given frame, some ranges
    # lost matches that began earlier.
    assert narrowed or (strength < 0.5 and earliest_offset is None)


@pytest.mark.parametrize("threshold", [0.2, 0.28])
@pytest.mark.parametrize("seed", range(4))
def test_the_on_track_start_is_the_first_frame_of_a_partial_match_averaging_the_first_try_strength(
    seed: int, threshold: float
) -> None:
    """Early resolution's start against a forward brute force: the first frame where the first
    character and the next ones (two to n - 1 in all) average, so far, the strength a
    candidate's window is first read for (FIRST_TRY_STRENGTH, or the threshold if higher)."""
    rng = np.random.default_rng(seed)
    events = {int(f): {int(rng.integers(2, 5)): float(rng.uniform(0.005, 0.3))} for f in range(0, 120, 2)}
    # Weak first characters (said, but no partial match from them is on track), then keywords.
    events.update({int(f): {A: float(rng.uniform(0.01, 0.03))} for f in range(1, 120, 4)})
    for start in rng.integers(20, 100, size=3):
        events.update(spoken(int(start), tuple(float(p) for p in rng.uniform(0.4, 0.95, 4)), spacing=3))
    word = keyword("abcd", [A, B, C, D], threshold=threshold)
    search, history = _search_over(posteriors(120, events)[:, :5], word)
    level = math.log(max(threshold, FIRST_TRY_STRENGTH))
    assert search.first_try_level == pytest.approx(level, abs=1e-8)
    q = search.scorer.characters(history.values)
    with np.errstate(divide="ignore"):
        terms = np.where(q >= search.said_floor, np.log(q) - search.first_try_level, -np.inf) / search.n
    narrowed = 0
    for end in range(10, 120, 5):
        low = search.first_start(end, history)
        if low is None:
            continue
        reaching = [
            b
            for b in range(low, end + 1)
            if max(_best_sum_from(terms[:, :j], b, b, end) for j in range(2, search.n)) >= FEASIBLE_SLACK
        ]
        expected = reaching[0] if reaching else None
        assert search.on_track_start(history, end) == expected
        narrowed += expected is not None and expected > low
    assert narrowed  # some windows' on-track start lay after their first possible start


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("strength", [0.25, 0.5])
def test_every_match_as_strong_as_the_level_begins_at_or_after_the_feasible_start(
    seed: int, strength: float
) -> None:
    """The exact recurrence over a candidate's whole window finds no match that strong before
    the feasible start: starting the run there loses nothing that could count."""
    rng = np.random.default_rng(seed)
    events = {int(f): {int(rng.integers(1, 5)): float(rng.uniform(0.01, 0.95))} for f in range(0, 200, 2)}
    for start in rng.integers(0, 180, size=6):
        events.update(spoken(int(start), tuple(float(p) for p in rng.uniform(0.4, 0.95, 4)), spacing=3))
    word = keyword("abcd", [A, B, C, D], threshold=0.25)
    search, history = _search_over(posteriors(200, events)[:, :5], word)
    level = math.log(strength)
    counted = 0
    for last in range(200):
        window = search.first_start(last, history)
        if window is None:
            continue
        search.runs.reset()
        run = search.runs.covering(history, window, last + 1, already_exact)
        score = float(run.scores[last - window])
        if score < level:
            continue
        peaks = search.scorer.backtrace(run.pointers, last - window)
        weakest = min(float(run.log_q[p, i]) for i, p in enumerate(peaks))
        if search.scorer.log_strength(score, weakest) >= level:
            assert window + peaks[0] >= search.feasible_start(history, last, last, level)
            counted += 1
    assert counted  # the property was checked on real matches


def test_speech_earlier_in_the_window_adds_no_exact_frames() -> None:
    """First characters said before a keyword, too weak for any match from them to count, leave
    its window resolved from the keyword's own first character: as many exact frames as the
    keyword alone in silence (bounds equal to the exact values here, as tight as bounds get)."""
    word = keyword("abcd", [A, B, C, D], threshold=0.3)
    said = spoken(1500, (0.9, 0.5, 0.5, 0.5))
    noisy = dict(said)
    noisy.update({frame: {A: 0.03} for frame in range(1430, 1500, 5)})  # above A's floor, hopeless
    asked = []
    for events in (said, noisy):
        decoder = KeywordDecoder([word], frame_seconds=FRAME)
        exact = posteriors(3000, events)[:, decoder.columns]
        resolver = CountingResolver([exact])
        found = []
        for start in range(0, 3000, 10):
            found += process_many([decoder], [exact[start : start + 10]], resolver)[0]
        assert len(found + decoder.finish()) == 1
        asked.append(resolver.asked[0])
    assert asked[1] == asked[0]

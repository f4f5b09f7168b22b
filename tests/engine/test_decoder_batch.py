"""Many streams at once (decoder/batch.py): process_many gives what one decoder per stream
gives, and the passes it shares between streams change no detection."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.engine.decoder import CompiledKeyword, KeywordDecoder, batch, process_many
from edge_agent.engine.decoder.recurrence import KeywordScorer
from edge_agent.engine.decoder.search import NEG_INF, drop_hopeless, under_way_rows
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


@pytest.mark.parametrize("in_step", [False, True])
def test_process_many_equals_one_decoder_per_stream_on_synthetic_posteriors(in_step: bool) -> None:
    """Streams with ragged chunks (0 to 5 frames each, laid out with padding) and streams fed
    in step (as many frames each, stacked as they are)."""
    rng = np.random.default_rng(11)
    keywords = [
        CompiledKeyword("abcd", ((1,), (2,), (3,), (4,)), 0.2, 0.05, 2.5),
        CompiledKeyword("aa", ((1,), (1,)), 0.2, 0.0, 2.5),
    ]
    streams = 12
    length = 400
    signals = []
    for _ in range(streams):
        p = np.zeros((length, 6))
        p[:, 0] = 1.0
        for start in rng.integers(0, length - 40, size=4):
            for k, token in enumerate((1, 2, 3, 4)):
                prob = float(rng.uniform(0.05, 0.95))
                p[start + 6 * k, token] = prob
                p[start + 6 * k, 0] = 1 - prob
        noise = rng.integers(0, length, size=30)
        p[noise, 5] = 0.7
        p[noise, 0] = 0.3
        signals.append(p)
    alone = [KeywordDecoder(keywords, frame_seconds=0.03) for _ in range(streams)]
    together = [KeywordDecoder(keywords, frame_seconds=0.03) for _ in range(streams)]
    expected: list[list] = [[] for _ in range(streams)]
    got: list[list] = [[] for _ in range(streams)]
    position = [0] * streams
    for step in range(200):
        chunks = []
        for i in range(streams):
            # ragged: 0 to 5 frames per stream per step; in step: 3 or 4 frames for all
            size = 3 + step % 2 if in_step else int(rng.integers(0, 6))
            chunks.append(signals[i][position[i] : position[i] + size])
            position[i] += size
        for i in range(streams):
            expected[i] += alone[i].process(chunks[i])
        for i, found in enumerate(process_many(together, chunks)):
            got[i] += found
    for i in range(streams):
        expected[i] += alone[i].finish()
        got[i] += together[i].finish()
    assert got == expected
    assert sum(len(e) for e in expected) > 10  # the comparison covered real detections


def test_real_time_streams_resolve_a_match_as_it_goes_instead_of_all_at_once(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Ten streams, in real-time chunks, say the keyword at the same instant. Each resolves its
    window while the keyword is being said, so no single call asks for every window at once;
    the detections do not change."""
    monkeypatch.setattr(batch, "EARLY_RESOLUTION_MIN_STREAMS", 10)  # a batch as large as that
    streams = [posteriors(300, spoken(150, spacing=8)) for _ in range(10)]
    early, early_resolver = decode_lazily(streams, [ABCD], chunk=3, seed=1)
    monkeypatch.setattr(batch, "EARLY_RESOLUTION_FRAMES", 0)
    late, late_resolver = decode_lazily(streams, [ABCD], chunk=3, seed=1)
    assert same_detections(early, late) and all(len(found) == 1 for found in early)
    assert early_resolver.largest < late_resolver.largest / 2


def test_small_batches_resolve_a_window_only_when_a_candidate_comes() -> None:
    """Below EARLY_RESOLUTION_MIN_STREAMS nothing is resolved ahead: a match begun but never
    finished (half the streams say only the keyword's first two characters) costs no exact
    frames; the detections are those of a large batch resolving ahead."""
    begun = {150: {A: 0.9}, 158: {B: 0.9}}
    streams = [posteriors(300, spoken(150, spacing=8) if i % 2 else begun) for i in range(10)]
    small, small_resolver = decode_lazily(streams, [ABCD], chunk=3, seed=1)
    original = batch.EARLY_RESOLUTION_MIN_STREAMS
    try:
        batch.EARLY_RESOLUTION_MIN_STREAMS = 10
        large, large_resolver = decode_lazily(streams, [ABCD], chunk=3, seed=1)
    finally:
        batch.EARLY_RESOLUTION_MIN_STREAMS = original
    assert same_detections(small, large)
    assert [len(found) for found in small] == [i % 2 for i in range(10)]
    assert sum(small_resolver.asked) < sum(large_resolver.asked)


@pytest.mark.parametrize("chunk", [3, 33])
def test_streams_finding_a_keyword_together_share_their_exact_runs(chunk: int, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Many streams meeting a candidate in the same chunk get their exact runs in one
    recurrence; the detections (confidence, times and peaks) are those of one run per stream."""
    rng = np.random.default_rng(5)
    streams = []
    for i in range(9):
        probs = tuple(float(p) for p in rng.uniform(0.3, 0.95, size=4))
        events = spoken(100 + i % 3, probs, spacing=int(rng.integers(3, 9)))  # ragged windows
        events.update(spoken(400, probs, spacing=5))
        streams.append(posteriors(600, events))
    primed = []
    original = batch.prime_exact_runs

    def counting(decoders, first_frames, exact_work):  # type: ignore[no-untyped-def]
        primed.append(original(decoders, first_frames, exact_work))
        return primed[-1]

    monkeypatch.setattr(batch, "prime_exact_runs", counting)
    together, _ = decode_lazily(streams, [ABCD], chunk=chunk, seed=2)
    monkeypatch.setattr(batch, "prime_exact_runs", lambda *args: None)
    alone, _ = decode_lazily(streams, [ABCD], chunk=chunk, seed=2)
    assert max(primed) >= 6  # most streams computed their run in the same recurrence
    assert all(len(found) == 2 for found in together)
    assert together == alone
    assert [[(d.peak_frames, d.peak_posteriors) for d in found] for found in together] == [
        [(d.peak_frames, d.peak_posteriors) for d in found] for found in alone
    ]


@pytest.mark.parametrize("chunk", [2, 7, 20])
def test_a_keyword_begun_in_the_refractory_period_and_ended_after_it_is_found_in_every_stream(
    chunk: int,
) -> None:
    """After a detection, the partial matches go on through its refractory period: a keyword
    begun there and finished after it is found, from bounds in many streams at once exactly as
    from exact posteriors one stream at a time."""
    streams = _second_keyword_in_refractory_period()
    together, _ = decode_lazily(streams, [ABCD], chunk=chunk, seed=3)
    assert same_detections(together, _one_decoder_each(streams))
    assert all(len(found) == 2 for found in together)


def _second_keyword_in_refractory_period() -> list[np.ndarray]:
    """Eight streams: the first keyword's last peak is at frame 38 or 39 (no detection before
    frame 72); the second begins inside that second (frames 56-59) and ends after it (74-83)."""
    return [
        posteriors(200, {**spoken(20 + i % 2), **spoken(56 + i % 4, spacing=6 + i % 3)}) for i in range(8)
    ]


def _one_decoder_each(streams: list[np.ndarray]) -> list[list]:
    """Each stream's detections from a decoder of its own given exact posteriors."""
    found = []
    for signal in streams:
        decoder = KeywordDecoder([ABCD], frame_seconds=0.03)
        found.append(decoder.process(signal) + decoder.finish())
    return found


def test_hopeless_partial_matches_are_dropped_for_many_streams_as_for_one() -> None:
    """drop_hopeless and under_way_rows over (streams, n) carries give, row by row, what
    keep_carries and the on-track rule give for one stream, partial matches at the threshold
    and none at all included."""
    rng = np.random.default_rng(4)
    decoder = KeywordDecoder([ABCD], frame_seconds=0.03)
    search = decoder.searches[0]
    threshold = search.log_threshold
    levels = np.array([NEG_INF, threshold - 1.0, threshold - 1e-12, threshold, threshold + 1e-12, -0.1, 0.0])
    carry = rng.choice(levels, size=(200, search.n))
    carry_pre = rng.choice(levels, size=(200, search.n))
    carry[:20] = NEG_INF  # no partial match at all
    carry_pre[:20] = NEG_INF
    many, many_pre = carry.copy(), carry_pre.copy()
    alive = drop_hopeless(many, many_pre, threshold)
    under_way = under_way_rows(many, search)
    for row in range(carry.shape[0]):
        search.keep_carries(carry[row].copy(), carry_pre[row].copy())
        np.testing.assert_array_equal(many[row], search.carry)
        np.testing.assert_array_equal(many_pre[row], search.carry_pre)
        assert alive[row] == search.alive
        # On track: k characters of n with a log score of at least k / n of the threshold's.
        on_track = [search.carry[k - 1] >= threshold * k / search.n for k in range(2, search.n)]
        assert under_way[row] == any(on_track)
    assert 0 < sum(alive) < len(alive) and 0 < sum(under_way) < len(under_way)


def test_decoders_of_one_keyword_configuration_share_a_group() -> None:
    """process_many groups streams by a number given once per configuration: equal for equal
    keywords and settings, whoever made the decoder, different otherwise."""
    first = KeywordDecoder([ABCD], frame_seconds=0.03)
    same = KeywordDecoder([ABCD], frame_seconds=0.03)
    other_threshold = KeywordDecoder(
        [
            CompiledKeyword(
                "abcd", ABCD.token_groups, ABCD.threshold / 2, ABCD.min_duration, ABCD.max_duration
            )
        ],
        frame_seconds=0.03,
    )
    other_hold = KeywordDecoder([ABCD], frame_seconds=0.03, hold_seconds=0.9)
    assert first.group == same.group
    assert len({first.group, other_threshold.group, other_hold.group}) == 3


@pytest.mark.parametrize(("probability", "resolved_ahead"), [(0.9, True), (0.15, False)])
def test_only_partial_matches_on_track_are_resolved_ahead(probability: float, resolved_ahead: bool) -> None:
    """A large batch resolves ahead the window of a match whose first characters are said as
    clearly as the keyword must be (their geometric mean reaches the threshold, 0.3), and not
    that of two weak characters (0.15 each: a partial match above the threshold, but one that
    the rest of the keyword would have to lift), the common case in speech."""
    begun = {150: {A: probability}, 158: {B: probability}}
    exact = [posteriors(300, begun)[:, [0, A, B, 3, 4]] for _ in range(10)]
    decoders = [KeywordDecoder([ABCD], frame_seconds=0.03) for _ in exact]
    resolver = CountingResolver(exact)
    original = batch.EARLY_RESOLUTION_MIN_STREAMS
    try:
        batch.EARLY_RESOLUTION_MIN_STREAMS = 10
        for start in range(0, 300, 3):
            # The exact posteriors as bounds: what the filter sees is what was said.
            assert process_many(decoders, [e[start : start + 3] for e in exact], resolver) == [[]] * 10
    finally:
        batch.EARLY_RESOLUTION_MIN_STREAMS = original
    assert (sum(resolver.asked) > 0) == resolved_ahead


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("chunk", [3, 10])
def test_resolving_ahead_changes_no_detection(seed: int, chunk: int, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A batch large enough to resolve matches under way ahead of need, on loose bounds, with
    keywords said often (some inside another's refractory period) among other speech: the
    detections are those of exact posteriors, stream by stream."""
    monkeypatch.setattr(batch, "EARLY_RESOLUTION_MIN_STREAMS", 10)
    rng = np.random.default_rng(seed)
    # The last one below FIRST_TRY_STRENGTH: windows first read for a stronger match.
    keywords = [
        ABCD,
        keyword("cd", [C, D], threshold=0.2),
        keyword("abcd at 0.05", [A, B, C, D], threshold=0.05),
    ]
    signals = [random_speech(rng, 6, 0.2, 2, other_frames=80, faintest_other=1e-3) for _ in range(12)]
    expected = [decode(s, keywords, chunk=chunk) for s in signals]
    got, resolver = decode_lazily(signals, keywords, chunk, seed)
    assert same_detections(got, expected)
    assert sum(len(e) for e in expected) >= 20 and sum(resolver.asked) > 0


def test_a_detections_own_characters_keep_no_stream_resolving_ahead(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """After a detection its first characters stay in the partial matches, on track (a
    stronger match may still reuse them). That is no reason to resolve the frames that follow
    as they come: a match beginning inside a detection counts only if stronger than it, and
    the filter says whether one may be when it proposes it (its window is resolved then). In
    speech after the keyword (a character now and then, no keyword) nothing past the
    detection's hold time is resolved, and the detections are those of a small batch, which
    resolves nothing ahead."""
    monkeypatch.setattr(batch, "EARLY_RESOLUTION_MIN_STREAMS", 10)
    speech = {frame: {C: 0.4} for frame in range(230, 400, 30)}
    signals = [posteriors(600, spoken(150, spacing=8) | speech) for _ in range(10)]
    decoders = [KeywordDecoder([ABCD], frame_seconds=FRAME) for _ in signals]
    exact = [signal[:, decoders[0].columns] for signal in signals]
    asked: list[int] = []

    class FrameLog(CountingResolver):
        def __call__(self, frames: list[np.ndarray]) -> list[np.ndarray]:
            asked.extend(int(f) for wanted in frames for f in wanted.tolist())
            return super().__call__(frames)

    resolver = FrameLog(exact)
    found: list[list] = [[] for _ in signals]
    for start in range(0, 600, 3):
        # The exact posteriors as bounds: what the filter sees is what was said.
        chunks = [e[start : start + 3] for e in exact]
        for i, detections in enumerate(process_many(decoders, chunks, resolver)):
            found[i] += detections
    small, _ = decode_lazily(signals[:1], [ABCD], chunk=3, seed=1)
    assert all(len(f) == 1 for f in found) and same_detections(found[:1], small)
    detection = found[0][0]
    hold_end = round(detection.end / FRAME) + decoders[0].searches[0].policy.hold_frames + 1
    assert asked and max(asked) <= hold_end


@pytest.mark.parametrize("chunk", [7, 20])
def test_after_a_detection_both_runs_a_candidate_reads_are_shared_between_streams(
    chunk: int, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """A keyword begun inside a recent detection's window is read from its window's start and
    from the detection's end (the matches beginning before it are silenced unless stronger):
    both runs are computed for every stream in one recurrence, none stream by stream, and the
    detections are those of one decoder per stream."""
    streams = _second_keyword_in_refractory_period()
    rows_per_run: list[int] = []
    run = KeywordScorer.run

    def counted(self, terms, *args, **kwargs):  # type: ignore[no-untyped-def]
        rows_per_run.append(terms.log_q.shape[0])
        return run(self, terms, *args, **kwargs)

    monkeypatch.setattr(KeywordScorer, "run", counted)
    together, _ = decode_lazily(streams, [ABCD], chunk=chunk, seed=3)
    assert rows_per_run.count(1) == 0
    assert same_detections(together, _one_decoder_each(streams))
    assert all(len(found) == 2 for found in together)

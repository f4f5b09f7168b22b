"""The recurrence maths (decoder/recurrence.py) against its definition, frame by frame."""

from __future__ import annotations

import itertools

import numpy as np

from edge_agent.engine.decoder import CompiledKeyword
from edge_agent.engine.decoder.recurrence import NEG_INF, KeywordScorer, Terms

COLUMNS = {token: token for token in range(6)}  # gathered column = token, blank at 0


def scorer(*groups: tuple[int, ...], threshold: float = 0.05) -> KeywordScorer:
    return KeywordScorer(CompiledKeyword("k", groups, threshold, 0.0, 2.5), COLUMNS, gap_tolerance=0.5)


def random_terms(rng: np.random.Generator, streams: int, frames: int, n: int) -> Terms:
    """Terms as the scorer makes them: most characters not said (-inf), gaps at most 0."""
    said = rng.random((streams, frames, n)) < 0.3
    log_q = np.where(said, rng.uniform(-2.0, 0.0, said.shape), NEG_INF)
    between = (streams, frames, n - 1)
    gap = np.where(rng.random(between) < 0.5, 0.0, rng.uniform(-1.5, 0.0, between))
    return Terms(log_q, gap, rng.random(between) < 0.6)


def frame_by_frame(
    terms: Terms, carry: np.ndarray, carry_pre: np.ndarray, repeated: list[bool]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The definition: A_i(t) = max(V_i(t), A_i(t-1) + g_i(t)), V_{i+1}(t) = L_{i+1}(t) + A_i(t-1);
    a repeated character's A_i starts only on a blank dip, from its partial match before it."""
    log_q, gap, dips = terms
    streams, frames, n = log_q.shape
    scores = np.full((streams, frames), NEG_INF)
    a, pre = carry.copy(), carry_pre.copy()
    for t in range(frames):
        new_a, new_pre = np.full_like(a, NEG_INF), np.full_like(pre, NEG_INF)
        value = log_q[:, t, 0]
        for i in range(n - 1):
            if repeated[i]:
                new_pre[:, i] = np.maximum(value, pre[:, i] + gap[:, t, i])
                after_dip = np.where(dips[:, t, i], pre[:, i] + gap[:, t, i], NEG_INF)
                new_a[:, i] = np.maximum(after_dip, a[:, i] + gap[:, t, i])
            else:
                new_a[:, i] = np.maximum(value, a[:, i] + gap[:, t, i])
            value = log_q[:, t, i + 1] + a[:, i]
        scores[:, t] = value
        a, pre = new_a, new_pre
    return scores, a, pre


def test_the_vectorised_recurrence_is_the_frame_by_frame_definition() -> None:
    """Several streams at once, from carried partial matches, with a repeated character."""
    rng = np.random.default_rng(0)
    keyword = scorer((1,), (1,), (2,), (3,))
    assert keyword.repeated == [True, False, False]
    terms = random_terms(rng, streams=4, frames=60, n=4)
    carry = np.where(rng.random((4, 4)) < 0.5, rng.uniform(-3.0, 0.0, (4, 4)), NEG_INF)
    carry[:, -1] = NEG_INF
    carry_pre = np.full((4, 4), NEG_INF)
    carry_pre[:, 0] = rng.uniform(-3.0, 0.0, 4)
    expected = frame_by_frame(terms, carry, carry_pre, keyword.repeated)
    for backtrace in (False, True):
        result = keyword.run(terms, carry, carry_pre, backtrace=backtrace)
        np.testing.assert_allclose(result.scores, expected[0], atol=1e-9)
        np.testing.assert_allclose(result.carry, expected[1], atol=1e-9)
        np.testing.assert_allclose(result.carry_pre, expected[2], atol=1e-9)
    assert np.isfinite(expected[0]).sum() > 20  # the comparison covered real matches


def test_partial_matches_without_back_pointers_are_those_of_the_backtraced_run() -> None:
    """The rivals of a pending match read the best partial match at each frame and the best one
    whose last character is there, and no back-pointers: the same values, none computed."""
    rng = np.random.default_rng(6)
    keyword = scorer((1,), (1,), (2,), (3,))
    terms = random_terms(rng, streams=3, frames=50, n=4)
    no_match = np.stack([keyword.no_match()] * 3)
    backtraced = keyword.run(terms, no_match, no_match, backtrace=True)
    partials = keyword.run(terms, no_match, no_match, partials=True)
    assert partials.pointers == []
    np.testing.assert_array_equal(partials.prefix, backtraced.prefix)
    np.testing.assert_array_equal(partials.ends, backtraced.ends)
    np.testing.assert_array_equal(partials.scores, backtraced.scores)
    assert np.isfinite(partials.prefix).sum() > 20  # the comparison covered partial matches
    plain = keyword.run(terms, no_match, no_match)
    assert plain.prefix.size == plain.ends.size == 0 and plain.pointers == []


def test_the_backtraced_peaks_add_up_to_the_best_score() -> None:
    """Each character's log posterior at its peak, plus the gap penalties of the frames between
    two peaks, is the score of the match ending at the last peak."""
    rng = np.random.default_rng(1)
    keyword = scorer((1,), (2,), (3,))
    terms = random_terms(rng, streams=1, frames=80, n=3)
    result = keyword.run(terms, keyword.no_match()[None], keyword.no_match()[None], backtrace=True)
    pointers = [tuple(a[0] for a in entry) for entry in result.pointers]
    ends = np.flatnonzero(np.isfinite(result.scores[0])).tolist()
    assert len(ends) > 10
    for last in ends:
        peaks = keyword.backtrace(pointers, last)
        assert peaks[-1] == last and all(a < b for a, b in itertools.pairwise(peaks))
        total = sum(terms.log_q[0, p, i] for i, p in enumerate(peaks))
        total += sum(terms.gap[0, peaks[i] + 1 : peaks[i + 1], i].sum() for i in range(len(peaks) - 1))
        assert abs(total - result.scores[0, last]) < 1e-9


def test_a_homophone_group_sums_its_outputs() -> None:
    gathered = np.array([[0.2, 0.1, 0.3, 0.4, 0.0, 0.0]])
    np.testing.assert_allclose(scorer((1, 2), (3,)).characters(gathered), [[0.4, 0.4]])


def test_a_character_below_its_floor_is_not_said() -> None:
    """Floor threshold^(n-1): 0.05 for two characters."""
    keyword = scorer((1,), (2,), threshold=0.05)
    gathered = np.array([[[0.5, 0.049, 0.451, 0, 0, 0], [0.5, 0.05, 0.45, 0, 0, 0]]])
    log_q = keyword.terms(gathered).log_q
    assert log_q[0, 0, 0] == NEG_INF and np.isfinite(log_q[0, 1, 0])


def test_the_optimistic_terms_are_never_below_the_exact_ones() -> None:
    """Upper bounds of the posteriors on frames that are not exact give terms at least as high as
    the exact posteriors would: the filtering pass can only over-estimate."""
    rng = np.random.default_rng(2)
    keyword = scorer((1,), (1,), (2,), (3,), threshold=0.3)
    exact = rng.dirichlet(np.ones(6), size=(2, 50))
    bounds = np.minimum(1.0, exact * rng.uniform(1.0, 10.0, exact.shape))
    is_exact = rng.random((2, 50)) < 0.5
    values = np.where(is_exact[..., None], exact, bounds)
    true = keyword.terms(exact)
    optimistic = keyword.optimistic_terms(values, is_exact, np.zeros((2, 50), dtype=bool))
    assert (optimistic.log_q >= true.log_q).all()
    assert (optimistic.gap >= true.gap).all()
    assert (optimistic.dips >= true.dips).all()


def test_optimistic_terms_of_bounds_alone_are_those_of_rows_that_are_not_exact() -> None:
    """Rows of bounds only (no exact row among them: the filtering pass over new rows) get the
    terms that the general rule gives rows that are not exact (most favourable gap and dip),
    killed rows included, for keywords with and without a repeated character."""
    rng = np.random.default_rng(6)
    for groups in [((1,), (2,), (3,), (4,)), ((1,), (1,), (2,)), ((1, 5), (2,))]:
        keyword = scorer(*groups)
        for _ in range(50):
            values = rng.dirichlet(np.full(6, 0.3), size=(3, 7))
            killed = rng.random((3, 7)) < 0.2
            alone = keyword.optimistic_terms(values, np.zeros((3, 7), dtype=bool), killed)
            # With one exact row in another stream, the general rule runs on these rows too.
            exact = np.zeros((4, 7), dtype=bool)
            exact[3, 0] = True
            mixed = keyword.optimistic_terms(
                np.concatenate([values, values[:1]]), exact, np.concatenate([killed, killed[:1]])
            )
            for got, want in zip(alone, mixed, strict=True):
                assert got.dtype == want.dtype
                np.testing.assert_array_equal(got, want[:3])


def test_the_filtering_pass_on_python_floats_is_the_numpy_pass_to_the_last_bit() -> None:
    """filter_bounds (one stream's few rows of bounds, on Python floats) gives the scores and
    carries of optimistic_terms then run, bit for bit: characters below the floor, killed rows,
    repeated characters, carries with and without partial matches."""
    rng = np.random.default_rng(9)
    levels = np.array([NEG_INF, 0.0, -0.1, -1.0, -2.5, -3.0])
    cases = 0
    for groups in [((1,), (2,), (1,), (2,)), ((1,), (1,), (2,)), ((1, 5), (2,)), ((1,),), ((3,), (3,), (3,))]:
        for threshold in (0.002, 0.05, 0.3):
            keyword = scorer(*groups, threshold=threshold)
            for trial in range(60):
                frames = int(rng.integers(1, 12))
                values = rng.dirichlet(np.full(6, 0.2), size=frames)
                if trial % 4 == 0:  # exact zeros, values near and far from the floors
                    values[:, 1:] = rng.choice([0.0, 1e-5, 0.5], size=(frames, 5))
                killed = rng.random(frames) < 0.2
                carry = rng.choice(levels, size=keyword.n)
                carry_pre = rng.choice(levels, size=keyword.n)
                characters = keyword.characters(values)
                terms = keyword.optimistic_terms(
                    values[None], np.zeros((1, frames), dtype=bool), killed[None], characters[None]
                )
                passed = keyword.run(terms, carry[None], carry_pre[None])
                got = keyword.filter_bounds(characters, killed, carry, carry_pre)
                for python, numpy in zip(
                    got, (passed.scores[0], passed.carry[0], passed.carry_pre[0]), strict=True
                ):
                    assert python.shape == numpy.shape
                    assert np.array_equal(python, numpy) and np.array_equal(
                        np.signbit(python), np.signbit(numpy)
                    )
                cases += 1
    assert cases == 900

"""Scoring one keyword over posteriors: the per-frame terms and the max-plus recurrence.

Pure arithmetic on arrays, no state: :class:`KeywordScorer` turns posteriors into per-frame
terms and runs the recurrence over them for several streams at once; what to run it on, and
what to do with the scores, is the search's business (``search.py``).

A keyword is a sequence of *token groups* (usually one output per character; several when
homophones are merged). A match picks one frame per character, in order; its score is

    log confidence = (1/n) * sum_i log q_i(f_i)  +  sum over gap frames u of log h(u)

``q_i(f)`` is the posterior of character i's group at frame f, so the first term is the log of
the geometric mean of the n peak posteriors: keywords of every length share one [0, 1] scale
(the usual decoder's square root of a product does not); each character must also reach
``threshold ** (n - 1)`` by itself, so strong characters cannot carry one never said. A match
therefore counts up to the threshold ``min(confidence, q_min ** (1 / (n - 1)))``, its
*strength* (:meth:`KeywordScorer.log_strength`), by which the firing rules rank matches.
``h(u)`` penalises frames *between* two characters that belong to neither of them nor to blank:
``h = min(1, c / (1 - gap_tolerance))`` with ``c = blank + q_i + q_{i+1}``. Unrelated speech
between the characters therefore breaks the match, instead of letting a decoder stitch a keyword
out of syllables spread over 2.5 s. A repeated character (two identical groups in a row) also
needs a frame where blank beats it in between, as CTC itself requires.

The best match ending at each frame is a max-plus recurrence that numpy evaluates for a whole
chunk at once (a running maximum per character), so decoding costs a few array operations per
chunk. The same recurrence serves two passes: the *filtering* pass, over upper bounds of the
terms (:meth:`KeywordScorer.optimistic_terms`), which ignores the maximum duration and can
only over-estimate; and the *exact* runs over a candidate's window, with back-pointers for its
timings (:meth:`KeywordScorer.backtrace`).
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import numpy as np

from edge_agent.engine.decoder.keywords import CompiledKeyword

NEG_INF = -np.inf
# Posteriors are floored before the log so that log(0) never produces -inf arithmetic warnings.
POSTERIOR_FLOOR = 1e-10
# Gap penalty that ends every partial match in the filtering pass (finite, so that running sums
# of it stay finite; any partial match is far below any threshold after one such frame).
KILL = -1.0e4
# A bound compared with a character's floor is lowered by this factor first: the bound and the
# exact posterior come from separate float32 products, whose roundings may differ in the last
# bits.
BOUND_SAFETY = 1.0 - 1e-4
# The exact terms keep characters a little below the floor: whether a match counts is decided on
# its strength (:meth:`KeywordScorer.log_strength`), and the floor must not drop a match whose
# strength reaches the threshold but for the last bits of a power and a log.
EXACT_FLOOR_SAFETY = 1.0 - 1e-9


class Terms(NamedTuple):
    """Per-frame terms of the recurrence for s streams and t frames."""

    log_q: np.ndarray  # (s, t, n): each character's log posterior over n, -inf if not said
    gap: np.ndarray  # (s, t, n-1): log gap penalty between characters i and i+1
    dips: np.ndarray  # (s, t, n-1): blank beats character i (a repeated character may go on)


class Pass(NamedTuple):
    """What one run of the recurrence over (s, t) frames gives."""

    scores: np.ndarray  # (s, t): the best match ending at each frame
    carry: np.ndarray  # (s, n): partial matches carried out of the last frame
    carry_pre: np.ndarray  # (s, n): a repeated character's partial matches before its blank dip
    # With ``backtrace`` only (empty otherwise): per character but the last, the back-pointers
    # (one array, or two for a repeated character); the best partial match at each frame (any
    # number of characters but all); and the best one whose last character is at that very frame.
    pointers: list[tuple[np.ndarray, ...]]
    prefix: np.ndarray
    ends: np.ndarray


class KeywordScorer:
    """The terms and the recurrence of one keyword, over gathered posterior columns."""

    def __init__(self, keyword: CompiledKeyword, columns: dict[int, int], gap_tolerance: float) -> None:
        """``columns`` maps each network output to its column in the gathered posteriors."""
        self.n = len(keyword.token_groups)
        # Every character must reach threshold^(n-1) on its own: without it, clear characters
        # carry one that was never said (the first three of 小云小云 then silence would pass the
        # default threshold).
        # A real keyword's weakest character is far above this floor; for a poorly recognised
        # custom keyword the threshold is low and the floor negligible.
        self.char_floor = keyword.threshold ** (self.n - 1)
        self.gap_scale = 1.0 / (1.0 - gap_tolerance)
        # Columns of the gathered posterior matrix summed for each character.
        self.group_columns = [np.array([columns[t] for t in group]) for group in keyword.token_groups]
        # One output per character (the usual case): a single gather instead of n sums.
        self.single_columns = (
            np.array([cols[0] for cols in self.group_columns])
            if all(c.size == 1 for c in self.group_columns)
            else None
        )
        self.repeated = [
            set(keyword.token_groups[i]) == set(keyword.token_groups[i + 1]) for i in range(self.n - 1)
        ]
        #: :meth:`no_match`, read-only and shared: for the exact runs that start afresh
        self.no_match_shared = self.no_match()
        self.no_match_shared.flags.writeable = False

    def no_match(self) -> np.ndarray:
        """Carries of no partial match at all (a new array: the caller may change it)."""
        return np.full(self.n, NEG_INF)

    # --- per-frame terms ------------------------------------------------------------------
    def characters(self, gathered: np.ndarray) -> np.ndarray:
        """q: each character's posterior (or bound) (..., n) from gathered columns (..., c)."""
        if self.single_columns is not None:
            return gathered[..., self.single_columns]
        return np.stack([gathered[..., cols].sum(axis=-1) for cols in self.group_columns], axis=-1)

    def said(self, values: np.ndarray) -> np.ndarray:
        """Rows (..., c) where some character may reach its floor (exact values or bounds)."""
        return (self.characters(values) >= self.char_floor * BOUND_SAFETY).any(axis=-1)

    def first_said(self, values: np.ndarray) -> np.ndarray:
        """Rows (..., c) where the first character may reach its floor (exact value or bound):
        every frame where a match may begin."""
        return self.characters(values)[..., 0] >= self.char_floor * BOUND_SAFETY

    def terms(self, gathered: np.ndarray) -> Terms:
        """The terms of exact gathered posteriors (s streams, t frames, columns)."""
        blank = gathered[..., 0]
        q = self.characters(gathered)
        with np.errstate(divide="ignore"):
            log_q = np.log(q) / self.n
        # A character below the floor was not said: it cannot be part of a match.
        log_q[q < self.char_floor * EXACT_FLOOR_SAFETY] = NEG_INF
        if self.n == 1:
            empty = np.zeros((*q.shape[:-1], 0))
            return Terms(log_q, empty, empty.astype(bool))
        consistent = blank[..., None] + q[..., :-1] + np.where(self.repeated, 0.0, q[..., 1:])
        gap = np.log(np.minimum(np.maximum(consistent * self.gap_scale, POSTERIOR_FLOOR), 1.0))
        dips = blank[..., None] > q[..., :-1]
        return Terms(log_q, gap, dips)

    def optimistic_terms(
        self, values: np.ndarray, exact: np.ndarray, killed: np.ndarray, characters: np.ndarray | None = None
    ) -> Terms:
        """:meth:`terms` for the filtering pass, never below the exact terms: rows that are not
        ``exact`` hold upper bounds, which give upper bounds of L, and the most favourable gap
        and dip; ``killed`` rows lie too far from any first character for a match to pass.
        ``characters``: :meth:`characters` of ``values``, if the caller has them already."""
        q = self.characters(values) if characters is None else characters
        with np.errstate(divide="ignore"):
            log_q = np.log(q) / self.n
        log_q[q < self.char_floor * BOUND_SAFETY] = NEG_INF
        log_q[killed] = NEG_INF
        if self.n == 1:
            empty = np.zeros((*q.shape[:-1], 0))
            return Terms(log_q, empty, empty.astype(bool))
        if not exact.any():
            # Bounds only (rows just computed, the usual case): the most favourable gap and dip
            # everywhere, as below, without the exact terms that would be overwritten.
            gap = np.zeros((*q.shape[:-1], self.n - 1))
            dips = np.ones((*q.shape[:-1], self.n - 1), dtype=bool)
        else:
            blank = values[..., 0]
            consistent = blank[..., None] + q[..., :-1] + np.where(self.repeated, 0.0, q[..., 1:])
            gap = np.log(np.minimum(np.maximum(consistent * self.gap_scale, POSTERIOR_FLOOR), 1.0))
            dips = blank[..., None] > q[..., :-1]
            gap[~exact] = 0.0
            dips[~exact] = True
        gap[killed] = KILL
        return Terms(log_q, gap, dips)

    def filter_bounds(
        self, characters: np.ndarray, killed: np.ndarray, carry: np.ndarray, carry_pre: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The filtering pass over a few rows of one stream that are all bounds: what
        :meth:`optimistic_terms` then :meth:`run` give (scores (t,), carry (n,), carry_pre
        (n,)), from the characters' bounds (t, n), the ``killed`` rows (t,) and the carries (n,).

        The logs come from numpy and the rest is the same additions, subtractions and maxima in
        the same order on Python floats, so the results are the same to the last bit; a live
        microphone's chunk is a dozen numbers, for which forty numpy calls cost more than the
        arithmetic."""
        n = self.n
        with np.errstate(divide="ignore"):
            log_q = np.log(characters) / n
        log_q[characters < self.char_floor * BOUND_SAFETY] = NEG_INF
        log_q[killed] = NEG_INF
        terms = log_q.tolist()
        frames = len(terms)
        # Bounds: no gap penalty (the most favourable) but on killed rows, and a blank dip
        # everywhere; the same for every pair of characters.
        gaps = [KILL if kill else 0.0 for kill in killed.tolist()]
        cumulative = list(itertools.accumulate(gaps))
        carries = carry.tolist()
        carries_pre = carry_pre.tolist()
        new_carry = [NEG_INF] * n
        new_carry_pre = [NEG_INF] * n
        value = [row[0] for row in terms]
        for i in range(n - 1):
            if self.repeated[i]:
                best = carries_pre[i]
                a_pre = []
                for f in range(frames):
                    best = max(best, value[f] - cumulative[f])
                    a_pre.append(best + cumulative[f])
                previous_pre = [carries_pre[i], *a_pre[:-1]]
                entries = [previous_pre[f] + gaps[f] - cumulative[f] for f in range(frames)]
                new_carry_pre[i] = a_pre[-1]
            else:
                entries = [value[f] - cumulative[f] for f in range(frames)]
            best = carries[i]
            a_i = []
            for f in range(frames):
                best = max(best, entries[f])
                a_i.append(best + cumulative[f])
            new_carry[i] = a_i[-1]
            previous = [carries[i], *a_i[:-1]]
            value = [terms[f][i + 1] + previous[f] for f in range(frames)]
        return np.array(value), np.array(new_carry), np.array(new_carry_pre)

    # --- the recurrence ------------------------------------------------------------------
    def run(
        self,
        terms: Terms,
        carry: np.ndarray,
        carry_pre: np.ndarray,
        backtrace: bool = False,
        partials: bool | None = None,
    ) -> Pass:
        """The recurrence over s streams at once from their carries (s, n): arrays are
        (s, t, ...). Only exact runs settle pending matches, so only they get back-pointers
        (``backtrace``), prefix and ends (``partials``, by default with the back-pointers; the
        rivals of a pending match need them without).

        A_i(t) = max(V_i(t), A_i(t-1) + g_i(t)) and V_{i+1}(t) = L_{i+1}(t) + A_i(t-1), i.e.
        A_i(t) = G_i(t) + running max of (V_i - G_i) with G_i the cumulative gap penalty.
        """
        log_q, gap, dips = terms
        if partials is None:
            partials = backtrace
        streams = log_q.shape[0]
        value = log_q[..., 0]  # V_1
        new_carry = np.full((streams, self.n), NEG_INF)
        new_carry_pre = np.full((streams, self.n), NEG_INF)
        pointers: list[tuple[np.ndarray, ...]] = []
        prefix = np.full_like(value, NEG_INF) if partials else np.empty(0)
        ends = np.full_like(value, NEG_INF) if partials else np.empty(0)
        for i in range(self.n - 1):
            if partials:
                np.maximum(ends, value, out=ends)
            cumulative = np.cumsum(gap[..., i], axis=1)
            if not self.repeated[i]:
                best, arg = running_max(value - cumulative, carry[:, i], backtrace)
                a_i = best + cumulative
                if backtrace:
                    pointers.append((arg,))
            else:
                best_pre, arg_pre = running_max(value - cumulative, carry_pre[:, i], backtrace)
                a_pre = best_pre + cumulative
                previous_pre = np.concatenate((carry_pre[:, i, None], a_pre[:, :-1]), axis=1)
                entry = np.where(dips[..., i], previous_pre + gap[..., i] - cumulative, NEG_INF)
                best, arg = running_max(entry, carry[:, i], backtrace)
                a_i = best + cumulative
                new_carry_pre[:, i] = a_pre[:, -1]
                if backtrace:
                    pointers.append((arg, arg_pre))
                if partials:
                    # Before its blank dip a repeated character's partial match is only in a_pre.
                    np.maximum(prefix, a_pre, out=prefix)
            new_carry[:, i] = a_i[:, -1]
            if partials:
                np.maximum(prefix, a_i, out=prefix)
            previous = np.concatenate((carry[:, i, None], a_i[:, :-1]), axis=1)
            value = log_q[..., i + 1] + previous
        return Pass(value, new_carry, new_carry_pre, pointers, prefix, ends)

    def backtrace(self, pointers: list[tuple[np.ndarray, ...]], last: int) -> list[int]:
        """The frame of each character's peak in the best match ending at frame ``last``, as
        offsets in one stream's back-pointers."""
        peaks = [last]
        t = last
        for i in range(self.n - 2, -1, -1):
            entry = pointers[i]
            t = t - 1  # V_{i+1}(t) used A_i(t-1)
            if len(entry) == 1:
                t = int(entry[0][t])
            else:
                dip_frame = int(entry[0][t])
                t = int(entry[1][dip_frame - 1])
            peaks.append(t)
        peaks.reverse()
        return peaks

    def log_strength(self, log_score: float, weakest: float) -> float:
        """The log of a match's *strength*, the highest threshold at which it counts, from its log
        confidence and its weakest character's term (``log q / n`` at its peak, as in the terms):
        at a threshold t it counts iff its confidence reaches t and every character reaches
        ``t ** (n - 1)``, i.e. iff ``min(confidence, q_min ** (1 / (n - 1)))`` reaches t. One
        character: its confidence."""
        if self.n == 1:
            return log_score
        return min(log_score, weakest * self.n / (self.n - 1))

    def term_level(self, log_strength: float) -> float:
        """The term (``log q / n``) of a character whose own strength (``q ** (1 / (n - 1))``,
        the threshold whose floor it just reaches) is ``exp(log_strength)``."""
        return log_strength * (self.n - 1) / self.n

    def peak_posteriors(self, log_q: np.ndarray, peaks: list[int]) -> tuple[float, ...]:
        """Each character's posterior at its peak, from one stream's ``log_q`` (t, n)."""
        return tuple(float(math.exp(log_q[p, i] * self.n)) for i, p in enumerate(peaks))


def running_max(values: np.ndarray, initial: np.ndarray, with_arg: bool) -> tuple[np.ndarray, np.ndarray]:
    """Running maximum along axis 1 of (s, t) ``values``, seeded per stream with ``initial``;
    with the latest arg-max if asked. The seed stands for frames before this block (arg -1)."""
    seeded = np.concatenate((initial[:, None], values), axis=1)
    best = np.maximum.accumulate(seeded, axis=1)
    if not with_arg:
        return best[:, 1:], best[:, 1:]
    positions = np.where(seeded >= best, np.arange(-1, values.shape[1]), -2)
    arg = np.maximum.accumulate(positions, axis=1)
    return best[:, 1:], arg[:, 1:]

"""One keyword in one stream: where the recurrence, the exact runs and the firing policy meet.

:class:`KeywordSearch` keeps what a keyword's decoding carries from chunk to chunk (partial
matches, the frames where a match may begin, its recent exact runs, the pending detection) and
decodes new frames in three moves:

1. the *filtering* pass (``recurrence.py``, over bounds where posteriors are not exact)
   proposes the frames where a match may reach the threshold; it never under-estimates;
2. each proposed frame that may matter (:meth:`KeywordSearch._may_count`) is re-scored exactly
   over the keyword's window (``exact.py``) and backtracked for its timings: the recurrence
   gives the most confident match, and the floor is raised past its weakest character while
   that character, not its confidence, limits its strength, to find the strongest
   (:meth:`KeywordSearch._strongest`; the firing rules rank by strength, see ``firing.py``);
3. the firing policy (``firing.py``) decides which match is pending and when it fires, given
   the bound of the partial matches that could still beat it. A detection silences the matches
   no stronger than itself that end in its refractory period or begin before its end, so the
   exact re-scoring finds the best match that is not silenced (:meth:`KeywordSearch._exact`).

Only the frames where a counting match may begin are re-scored: before a window is resolved,
the characters' values held (bounds where not exact) give, read backwards from the candidates, the
first frame from which any match could still reach the threshold (:meth:`KeywordSearch.feasible_start`);
the window of a keyword is far longer than the keyword, and what lies before that frame is left
as bounds.

Frames where no character may be said cost nothing: their partial matches carry over
(:meth:`KeywordSearch.expire`), and a frame a whole window after the last frame where a match
could begin ends every partial match (:meth:`KeywordSearch.killed`). Many streams' searches of
one keyword are stepped together by ``batch.py``, which calls the public methods here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edge_agent.engine.decoder.exact import Ensure, ExactRun, ExactRuns, History, already_exact
from edge_agent.engine.decoder.firing import Candidate, Firing, FiringPolicy, keyword_span
from edge_agent.engine.decoder.keywords import CompiledKeyword, Detection
from edge_agent.engine.decoder.recurrence import BOUND_SAFETY, NEG_INF, KeywordScorer, Terms

# Absolute frame standing for "no character start seen".
NEVER = -(10**12)
# How far a filtering bound may fall below the exact log score of the same match: the two are
# sums of the same terms from different first frames.
BOUND_TOLERANCE = 1e-9
# How far below the threshold a backward bound (:meth:`KeywordSearch.feasible_start`) may fall
# and still keep its first frame: it sums the same logs in another order, and a bound row and the
# exact row of the same frame come from separate float32 products (see BOUND_SAFETY).
FEASIBLE_SLACK = math.log(BOUND_SAFETY)
# A candidate's window is first read only from where a match this strong may begin (when the
# threshold is lower). A keyword said clearly is far stronger than the threshold, while its
# window read from where a match just reaching the threshold may begin goes back over faint
# traces of its first character: at a low threshold a character's floor (threshold ** (n - 1))
# is so small that the silence before a keyword reaches it, and exact rows are most of the cost
# of a burst of detections. If the strongest match found there is weaker than this, the window
# is read again from where a match reaching the threshold may begin (those rows are resolved
# then): a weak detection costs a second run, and is the same detection.
FIRST_TRY_STRENGTH = 0.25
# KeywordSearch.feasible_start results kept: the levels a window is read for, and a pending
# detection's.
_FEASIBLE_KEPT = 3


def drop_hopeless(carry: np.ndarray, carry_pre: np.ndarray, log_threshold: float) -> list[bool]:
    """Drop the partial matches below the threshold from many streams' carries (streams, n), in
    place, as :meth:`KeywordSearch.keep_carries` does for one; returns, per stream, whether any
    partial match is left."""
    carry[carry < log_threshold] = NEG_INF
    carry_pre[carry_pre < log_threshold] = NEG_INF
    # What is left is at or above the threshold: finite.
    return ((carry.max(axis=1) > NEG_INF) | (carry_pre.max(axis=1) > NEG_INF)).tolist()


def under_way_rows(carry: np.ndarray, search: KeywordSearch) -> list[bool]:
    """Per stream, from carries (streams, n) of ``search``'s keyword kept as
    :meth:`KeywordSearch.keep_carries` keeps them: whether a partial match of two or more
    characters (but not all) may be on track, its characters' geometric mean so far reaching
    the strength a candidate's window is first read for (``FIRST_TRY_STRENGTH``, or the
    threshold if higher).

    What early resolution (``batch.py``) waits for. A keyword being said is on track at every
    character; speech whose bounds let two characters through only just above the threshold,
    far more common, is not, and resolving its window ahead of need would be wasted. Which
    frames are resolved when never changes a detection."""
    if search.n <= 2:
        return [False] * carry.shape[0]
    return (carry[:, 1 : search.n - 1] >= search.on_track).any(axis=1).tolist()


def _first_reaching(terms: np.ndarray, level: float, stops: range) -> int | None:
    """The first row u from which terms (t, c) summed at increasing rows, column 0 at u then
    columns 1, 2, ... in order, reach ``level``: through the last column, or stopping after any
    column in ``stops``; None if no row does. Read backwards, each column from the next one's
    best completion (a suffix maximum): one pass per column."""
    columns = terms.shape[1]
    best = np.maximum.accumulate(terms[::-1, columns - 1])[::-1]
    sums = terms[:, columns - 1]
    for i in range(columns - 2, -1, -1):
        sums = terms[:, i].copy()
        after = best[1:]
        if i in stops:
            after = np.maximum(after, 0.0)  # or stop here (the last row too)
        else:
            sums[-1] = NEG_INF  # the next column needs a later row
        sums[:-1] += after
        if i:
            best = np.maximum.accumulate(sums[::-1])[::-1]
    begins = np.flatnonzero(sums >= level)
    return int(begins[0]) if begins.size else None


@dataclass
class Filtered:
    """A filtering pass over a search's new frames: per frame, an upper bound of the best
    match's score, and the partial matches carried out of the last frame."""

    scores: np.ndarray
    carry: np.ndarray
    carry_pre: np.ndarray


class KeywordSearch:
    """Decoding state of one keyword in one stream: its partial matches, where matches may
    begin, its exact run and its firing state."""

    def __init__(
        self,
        keyword: CompiledKeyword,
        columns: dict[int, int],
        frame_seconds: float,
        frame_center_seconds: float,
        gap_tolerance: float,
        refractory_seconds: float,
        hold_seconds: float,
        pause_seconds: float,
        settle_ratio: float,
    ) -> None:
        self.keyword = keyword
        self.scorer = KeywordScorer(keyword, columns, gap_tolerance)
        self.n = self.scorer.n
        self.frame_seconds = frame_seconds
        self.frame_center_seconds = frame_center_seconds
        self.policy = FiringPolicy.for_keyword(
            keyword,
            frame_seconds,
            refractory_seconds=refractory_seconds,
            hold_seconds=hold_seconds,
            pause_seconds=pause_seconds,
            settle_ratio=settle_ratio,
        )
        self.firing = Firing(self.policy)
        self.runs = ExactRuns(self.scorer)
        # What the filter compares its bounds with (and what a partial match must keep to stay
        # alive): the threshold, less the last bits by which a bound may fall below the exact
        # score of the same match. Whether a match counts is decided on its exact score.
        self.log_threshold = self.policy.log_threshold - BOUND_TOLERANCE
        self.window_frames = int(math.ceil(keyword.max_duration / frame_seconds)) + 1
        #: the log strength a candidate's window is first read for (FIRST_TRY_STRENGTH)
        self.first_try_level = max(self.log_threshold, math.log(FIRST_TRY_STRENGTH))
        # A partial match of k characters is on track while its characters' geometric mean so
        # far reaches that strength: its log score at least k / n of its log (k = 2..n-1). Early
        # resolution (batch.py) reads ahead what the first reading of a window needs.
        self.on_track = self.first_try_level * np.arange(2, self.n) / self.n
        #: a character's bound below this cannot reach the floor (``KeywordScorer.said``)
        self.said_floor = self.scorer.char_floor * BOUND_SAFETY
        self.reset()

    def reset(self) -> None:
        self.carry = self.scorer.no_match()  # A_i at the last frame seen
        self.carry_pre = self.scorer.no_match()  # repeated characters: before the blank dip
        self.alive = False  # any finite carry
        self.firing.reset()
        self.runs.reset()
        # Recent absolute frames where a match may begin (KeywordScorer.first_said), and the latest.
        self.starts = np.zeros(0, dtype=np.int64)
        self.last_start = NEVER
        # (first, last, level, earliest or -1, frame) of the latest feasible_starts, the newest
        # last: each valid for any frames inside, at its level or above, and matches beginning
        # that late or later. A few, for the levels a window is read for (_levels_to_try).
        self._feasible: list[tuple[int, int, float, int, int]] = []

    @property
    def pending(self) -> Candidate | None:
        """The detection waiting to fire, if any."""
        return self.firing.pending

    def killed(self, frames: np.ndarray) -> np.ndarray:
        """Which absolute ``frames`` no match can pass through: the last first-character start
        at or before them is a whole window (or more) older. Only the filtering pass uses it."""
        if self.starts.size == 0:
            return np.ones(frames.shape, dtype=bool)
        index = np.searchsorted(self.starts, frames, side="right") - 1
        last = np.where(index >= 0, self.starts[np.maximum(index, 0)], NEVER)
        return frames - last >= self.window_frames

    def note_starts(self, found: np.ndarray, history: History) -> None:
        """Record new frames where a match may begin (absolute, increasing); forget those too
        old to matter for the frames still to come."""
        oldest = history.first - self.window_frames
        kept = self.starts[self.starts >= oldest]
        self.starts = np.concatenate([kept, found])
        self.last_start = int(found[-1])

    def idle_over(self, values: np.ndarray) -> bool:
        """Nothing to do in these rows (t, c) but :meth:`expire`: no detection is pending and no
        character may reach its floor in any of them (so no match may begin there either)."""
        return self.firing.pending is None and not self.scorer.said(values).any()

    def keep_carries(self, carry: np.ndarray, carry_pre: np.ndarray, alive: bool | None = None) -> None:
        """End of a span with nothing to report: keep the partial matches that can still win.

        A partial match below the threshold can only lose score from here (each further
        character adds log q <= 0): it is dropped, so that quiet audio returns to the idle path.
        ``alive``: whether any is left, if the caller has dropped them already (for many
        streams at once: :func:`drop_hopeless`).
        """
        if alive is None:
            carry[carry < self.log_threshold] = NEG_INF
            carry_pre[carry_pre < self.log_threshold] = NEG_INF
            alive = bool(carry.max() > NEG_INF or carry_pre.max() > NEG_INF)  # left: finite
        self.carry, self.carry_pre, self.alive = carry, carry_pre, alive

    def expire(self, end_frame: int) -> None:
        """A span where no character was said: partial matches carry over as if its frames
        cost nothing (an over-estimate, as the filter may make), a repeated character's partial
        match as if it passed its blank dip there; unless the span's last frame is a whole
        window past the last first character, which ends them all."""
        if not self.alive:
            return
        if end_frame - 1 - self.last_start >= self.window_frames:
            self.carry = self.scorer.no_match()
            self.carry_pre = self.scorer.no_match()
            self.alive = False
            # Every run starts where a match may begin, at or before the last such frame: no
            # match read from now on (nothing is pending) reaches back that far.
            self.runs.reset()
            return
        for i, repeated in enumerate(self.scorer.repeated):
            if repeated:
                self.carry[i] = max(self.carry[i], self.carry_pre[i])

    def filter_pass(
        self,
        values: np.ndarray,
        exact: np.ndarray,
        frames: np.ndarray,
        carry: np.ndarray,
        carry_pre: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The over-estimating recurrence over s streams' rows (s, t, c) from their carries."""
        terms = self.scorer.optimistic_terms(values, exact, self.killed(frames))
        scores, new_carry, new_carry_pre, _, _, _ = self.scorer.run(terms, carry, carry_pre)
        return scores, new_carry, new_carry_pre

    # --- streaming -----------------------------------------------------------------------
    def window_start(self, frame: int, history: History) -> int:
        """First frame a match ending at ``frame`` may use."""
        return max(frame + 1 - self.window_frames, history.first)

    def frames_read(self, history: History, frames: np.ndarray, bounds: np.ndarray) -> list[tuple[int, int]]:
        """The [start, stop) spans that exact decoding reads for the pending match, if any, and
        for the candidates at ``frames`` (increasing) whose filtering ``bounds`` (log scores)
        may count (:meth:`_may_count`), each to its hold time: from where the pending match's
        rivals may begin (:meth:`rivals_start`), and from where a candidate's match that
        counts may begin (:meth:`feasible_start`)."""
        hold = self.policy.hold_frames
        spans = []
        if self.pending is not None:
            start = self.rivals_start(history)
            stop = min(history.end, self.pending.frame + 1 + hold)
            if start is not None and start < stop:
                spans.append((start, stop))
        counting = [
            (frame, bound)
            for frame, bound in zip(frames.tolist(), bounds.tolist(), strict=True)
            if self._may_count(bound, frame)
        ]
        if not counting:
            return spans
        last = counting[-1][0]
        # What the first reading of each candidate's window reads (_best_from), as far as the
        # values held tell (a match found there may still turn out weaker, and then more is
        # resolved): the candidates read for the same strengths share a feasible start, made
        # once for all of them (read for its own frames, a candidate only gets a later one).
        by_levels: dict[tuple[float, ...], list[tuple[int, float]]] = {}
        for frame, bound in counting:
            by_levels.setdefault(tuple(self._levels_to_try(last, bound)), []).append((frame, bound))
        for levels, members in by_levels.items():
            first, final = members[0][0], members[-1][0]
            for frame, bound in members:
                options = self._options(history, frame, bound)
                if not options:
                    continue  # every match ending here is silenced by a detection stronger than it
                earliest = options[0][0]
                for level in levels:
                    feasible = self.feasible_start(history, first, final, level, earliest)
                    if feasible <= frame:
                        break
                else:
                    continue  # no match ending here can count: nothing to read for it
                start = self.first_start(frame, history, earliest)
                if start is not None:
                    spans.append((max(start, feasible), min(history.end, frame + 1 + hold)))
        return spans

    def _level(self, last: int) -> float:
        """The log confidence that a match ending at frame ``last`` or before (among the frames
        being decoded) must reach to change anything now (:meth:`_may_count`): the threshold, or
        the pending detection's strength or a recent detection's, taken at ``last`` (a recent
        detection silences fewer matches the later they end)."""
        pending = self.firing.pending
        floor = max(self.firing.silenced_below(last), pending.strength if pending is not None else 0.0)
        return self.log_threshold if floor <= 0.0 else max(self.log_threshold, math.log(floor))

    def _levels_to_try(self, last: int, bound: float) -> list[float]:
        """The log strengths for which the window of a candidate ending at ``last`` is read, in
        turn (:meth:`_best_from`): the one it is first read for if higher and if the filter's
        ``bound`` of its log confidence lets a match reach it, then :meth:`_level`."""
        level = self._level(last)
        # The bound and an exact score may differ in their last bits (sums from other origins).
        if level < self.first_try_level < bound + BOUND_TOLERANCE:
            return [self.first_try_level, level]
        return [level]

    def feasible_start(
        self, history: History, first: int, last: int, level: float, earliest: int | None = None
    ) -> int:
        """The earliest frame where a match ending at one of the frames ``first`` .. ``last``
        (and beginning at ``earliest`` or later) may begin and still reach the log score
        ``level`` (``last + 1`` if none may), from the values held: bounds, or exact posteriors
        where resolved.

        Read backwards, each character from the next one's best completion: a match's log score
        is its characters' logs less gap penalties, so the best sum of the characters' logs at
        increasing frames, leaving the penalties out, is at least the score of every match that
        begins at a frame. Every match that could change anything (count, rank above the
        pending detection, not be silenced: its confidence reaches ``level``) begins at or
        after the frame found, so the exact run may start there: its best and strongest matches
        that count are those of a run from the window's first possible start. Later rows
        turning exact can only lower the sums: a result stays valid for any frames inside the
        range it was computed for, at its level or above, for matches beginning as late or
        later, and is kept for them. ``earliest`` is where the options of :meth:`_options` let a
        match begin: right after a detection, only after its end when nothing beginning inside
        it may be stronger than it, and the matches left cannot borrow its characters.
        """
        floor_start = -1 if earliest is None else earliest
        valid = [
            cached
            for cached in self._feasible
            if cached[0] <= first and last <= cached[1] and cached[2] <= level and cached[3] <= floor_start
        ]
        if valid:
            return max(valid, key=lambda cached: cached[2])[4]  # the closest level: the latest start
        # The first frame where a match ending in the range may begin: in the window of one
        # ending at ``first``, and by ``last``.
        bottom = self.window_start(first, history)
        if earliest is not None:
            bottom = max(bottom, earliest)
        low = self._start_between(bottom, last)
        found = last + 1
        if low is not None:
            values, _ = history.rows(low, last + 1)
            q = self.scorer.characters(values)
            with np.errstate(divide="ignore"):
                log_q = np.log(q) / self.n
            # A match that strong has no character below its level's floor (KeywordScorer.
            # log_strength), and ends in the range: its last character is there.
            floor = math.exp(level * (self.n - 1)) * BOUND_SAFETY
            log_q[q < max(floor, self.said_floor)] = NEG_INF
            log_q[: max(first - low, 0), -1] = NEG_INF
            begins = _first_reaching(log_q, level + FEASIBLE_SLACK, stops=range(0))
            if begins is not None:
                found = low + begins
        self._feasible = [*self._feasible, (first, last, level, floor_start, found)][-_FEASIBLE_KEPT:]
        return found

    def on_track_start(self, history: History, end: int) -> int | None:
        """The first frame, in the window of a match ending at frame ``end`` and after the last
        recent detection's end, where a partial match on track up to ``end`` (two characters or
        more but not all, averaging the threshold: see :func:`under_way_rows`) may begin, from
        the values held; None if none may. Where early resolution starts (``batch.py``): a
        keyword being said is on track from its first character, and the window before it is
        mostly other speech. Which frames are resolved early never changes a detection."""
        low = self.first_start(end, history)
        if low is None or self.n <= 2:
            return None
        restrictions = self.firing.restrictions(low)
        if restrictions:
            # Only after the last recent detection: a match reusing a detection's characters
            # counts only if stronger than the detection, and whether it may be is known once the
            # filter proposes it, which then resolves its window (frames_read).
            low = self.first_start(end, history, restrictions[-1][0])
            if low is None:
                return None
        values, _ = history.rows(low, end + 1)
        q = self.scorer.characters(values)
        with np.errstate(divide="ignore"):
            # Each character's term less its share of the strength a window is first read for: on
            # track when they sum to 0.
            terms = (np.log(q) - self.first_try_level) / self.n
        terms[q < self.said_floor] = NEG_INF
        # Characters 1 .. j for some j from 2 to n - 1: the last one left out, a stop allowed after
        # any of the others but the first.
        begins = _first_reaching(terms[:, :-1], FEASIBLE_SLACK, stops=range(1, self.n - 2))
        return None if begins is None else low + begins

    def rivals_start(self, history: History) -> int | None:
        """Where the exact run read by the pending match's rivals (:meth:`_rivals`) starts: the
        first frame of its window, from its first possible start to its hold time, where the
        first character is strong enough for a partial match to reach the rivals' level
        (:meth:`FiringPolicy.rival_level`; a partial match's log score is at most its first
        character's term, and the settle rule compares the rivals with that level only); a
        kept run's start if one lies between (its rows are exact already). If no frame held
        is, the end of what is held (no rival to read yet); None if no match may begin in the
        window."""
        pending = self.pending
        assert pending is not None
        start = self.first_start(pending.frame, history)
        if start is None:
            return None
        stop = min(history.end, pending.frame + 1 + self.policy.hold_frames)
        values, _ = history.rows(start, stop)
        level = math.exp(self.n * (self.policy.rival_level(pending.strength) + FEASIBLE_SLACK))
        strong = np.flatnonzero(self.scorer.characters(values)[:, 0] >= max(level, self.said_floor))
        if strong.size == 0:
            return stop
        found = start + int(strong[0])
        reusable = self.runs.start_between(start, found)
        return found if reusable is None else reusable

    def match_start(self, frame: int, history: History, earliest: int | None, level: float) -> int | None:
        """Where the exact run for a candidate match ending at ``frame`` (and beginning at
        ``earliest`` or later) starts, for the matches whose log strength may reach ``level``;
        None if no such match may end there: a kept run's start if one lies between the window's
        first possible start and the feasible start (its rows are exact already), else the first
        possible start from the feasible one on."""
        start = self.first_start(frame, history, earliest)
        if start is None:
            return None
        feasible = self.feasible_start(history, frame, frame, level, earliest)
        if feasible <= start:
            return start
        if feasible > frame:
            return None
        reusable = self.runs.start_between(start, feasible)
        return self.first_start(frame, history, feasible) if reusable is None else reusable

    def first_start(self, frame: int, history: History, earliest: int | None = None) -> int | None:
        """The first frame, in the window of a match ending at ``frame`` (and not before
        ``earliest``), where the first character reaches its floor: no match begins earlier, so
        rows before it are never read."""
        low = self.window_start(frame, history)
        if earliest is not None:
            low = max(low, earliest)
        return self._start_between(low, frame)

    def _start_between(self, low: int, high: int) -> int | None:
        """The first frame from ``low`` to ``high`` where a match may begin, or None."""
        index = int(np.searchsorted(self.starts, low))
        if index == self.starts.shape[0] or int(self.starts[index]) > high:
            return None
        return int(self.starts[index])

    def process(
        self,
        history: History,
        first_frame: int,
        ensure: Ensure = already_exact,
        filtered: Filtered | None = None,
    ) -> list[Detection]:
        """Decode the frames from ``first_frame`` on; ``history`` holds them and those before.

        ``filtered``: the filtering pass over these frames, if already made (any over-estimate
        will do: it only proposes frames for exact re-scoring). A detection does not end the
        partial matches (a stronger match may still reuse its characters), so one pass
        serves the whole span.
        """
        if filtered is None:
            values, exact = history.rows(first_frame)
            frames = np.arange(first_frame, history.end)
            passed = self.filter_pass(
                values[None], exact[None], frames[None], self.carry[None], self.carry_pre[None]
            )
            filtered = Filtered(passed[0][0], passed[1][0], passed[2][0])
        scores = filtered.scores
        candidates = np.flatnonzero(scores >= self.log_threshold)
        count = scores.shape[0]
        firing = self.firing
        detections: list[Detection] = []
        rivals: tuple[int, np.ndarray] | None = None  # (first frame, bound per frame) of the pending
        i = 0
        while i < count:
            if firing.pending is None:
                # Nothing pending: jump straight to the next frame that may hold a match.
                j = int(np.searchsorted(candidates, i))
                if j == candidates.shape[0]:
                    break
                i = int(candidates[j])
            frame = first_frame + i
            if (
                scores[i] >= self.log_threshold
                and self._may_count(float(scores[i]), frame)
                and firing.offer(self._exact(history, frame, ensure, float(scores[i])))
            ):
                rivals = None  # a new pending detection: its own window, its own rivals
                i += 1
                continue
            if firing.pending is None:
                i += 1
                continue
            if rivals is None:
                rivals = self._rivals(history, firing.pending, ensure)
            index = frame - rivals[0]
            best_rival = rivals[1][index] if index >= 0 else NEG_INF
            if firing.due(frame, best_rival):
                detections.append(self._fire(frame))
                rivals = None
            i += 1
        self.keep_carries(filtered.carry, filtered.carry_pre)
        firing.forget(history.end, self.window_frames)
        # A match read from now on ends at a later frame, or is the pending one (it fires within
        # its hold time): none begins a window and a hold time before the end.
        self.runs.drop_before(history.end - self.window_frames - self.policy.hold_frames)
        return detections

    def _may_count(self, bound: float, frame: int) -> bool:
        """Whether a match ending at ``frame`` whose log score is at most ``bound`` could change
        anything: rank above the pending detection, or be stronger than what is silenced there.
        A match's strength is at most its confidence, so ``bound`` bounds it too (and one as
        strong as the pending detection but no stronger than ``bound`` is no more confident)."""
        pending = self.firing.pending
        floor = max(self.firing.silenced_below(frame), pending.strength if pending is not None else 0.0)
        # The bound and an exact score may differ in their last bits (sums from other origins).
        return floor <= 0.0 or bound + BOUND_TOLERANCE > math.log(floor)

    def _rivals(self, history: History, pending: Candidate, ensure: Ensure) -> tuple[int, np.ndarray]:
        """The rivals' bound (:meth:`FiringPolicy.rivals_still_spoken`) at each frame from the
        pending match's window up to its hold time (it fires by then), counting only matches
        that begin inside that window and whose every character exceeds
        :meth:`FiringPolicy.rival_level` (the others could never be ``settle_ratio`` times as
        strong, and which of them the threshold lets through must not change when the pending
        match fires); returns the first frame and the values."""
        start = self.rivals_start(history)
        stop = pending.frame + 1 + self.policy.hold_frames
        if start is None or start >= min(stop, history.end):
            # No rival up to the frames held (and none at all if the pending match's window
            # were empty, which cannot happen): nothing to read for them.
            return min(stop, history.end), np.zeros(0)
        run = self.runs.covering(history, start, stop, ensure)
        bound = self.policy.rivals_still_spoken(run.prefix, run.ends)
        if self.policy.settled(pending.strength, float(bound.max(initial=NEG_INF))):
            return start, bound  # settled against every rival: fewer of them change nothing
        level = self.scorer.term_level(self.policy.rival_level(pending.strength))
        log_q = np.where(run.log_q > level, run.log_q, NEG_INF)
        if not np.isfinite(log_q[:, :-1]).any():
            return start, np.full(bound.shape, NEG_INF)
        no_match = self.scorer.no_match_shared[None]
        terms = Terms(log_q[None], run.gap[None], run.dips[None])
        passed = self.scorer.run(terms, no_match, no_match, partials=True)
        return start, self.policy.rivals_still_spoken(passed.prefix[0], passed.ends[0])

    def runs_to_prime(
        self, filtered: Filtered, first_frame: int, history: History
    ) -> list[tuple[int, int, int]]:
        """The exact runs that :meth:`process` is about to compute or extend for these filtered
        frames (``first_frame`` on), as (start, begin, stop): the window of the pending match,
        or else those of the first candidate that may become pending (from its window's start,
        and from the end of each recent detection that silences matches beginning before it:
        :meth:`_exact` reads both), each computed from ``begin`` (its start, or where the run
        kept from there stops) through the hold time of the last candidate, as far as the
        frames are exact. Empty if there is nothing to compute."""
        frames = np.flatnonzero(filtered.scores >= self.log_threshold) + first_frame
        if self.pending is not None:
            anchor = self.pending.frame
            starts = [self.rivals_start(history)]
        else:
            eligible = [
                frame
                for frame in frames.tolist()
                if self._may_count(float(filtered.scores[frame - first_frame]), frame)
            ]
            if not eligible:
                return []
            anchor = eligible[0]
            bound = float(filtered.scores[anchor - first_frame])
            options = self._options(history, anchor, bound)
            # The run that _best_from computes first for each option.
            levels = self._levels_to_try(anchor, bound)
            starts = [
                next(
                    (
                        s
                        for level in levels
                        if (s := self.match_start(anchor, history, earliest, level)) is not None
                    ),
                    None,
                )
                for earliest, _ in options
            ]
        last = max(anchor, int(frames[-1])) if frames.size else anchor
        stop = min(history.end, last + 1 + self.policy.hold_frames)
        spans = []
        for start in dict.fromkeys(s for s in starts if s is not None):
            begin = self.runs.resume_point(start)
            end = stop
            missing = np.flatnonzero(~history.rows(begin, stop)[1])
            if missing.size:
                end = begin + int(missing[0])  # the rest is resolved on demand, if ever read
            if end > begin:
                spans.append((start, begin, end))
        return spans

    def _fire(self, frame: int) -> Detection:
        """Emit the pending detection at ``frame``."""
        return self._detection(self.firing.fire(frame))

    def finish(self) -> list[Detection]:
        pending = self.pending
        return [] if pending is None else [self._fire(pending.frame + 1)]

    # --- exact re-scoring ----------------------------------------------------------------
    def _exact(self, history: History, frame: int, ensure: Ensure, bound: float) -> Candidate | None:
        """The highest-ranked match ending at ``frame`` that counts and that no recent detection
        silences, or None; ``bound``: the filtering pass's bound of its log confidence.

        A detection silences the matches that begin before its end unless they are stronger
        than itself. With detections ending at r_1 < ... < r_m in the window, a match beginning
        at or after r_j counts if it is stronger than every detection after the j-th: the best
        match beginning at or after r_j is taken if it clears that level, and the best of these
        over j (with r_0 the window's start) is the best match allowed (:meth:`_options`).
        """
        best: Candidate | None = None
        for earliest, level in self._options(history, frame, bound):
            found = self._best_from(history, frame, earliest, ensure, bound)
            if found is not None and found.strength > level and (best is None or found.rank > best.rank):
                best = found
        return best

    def _options(self, history: History, frame: int, bound: float) -> list[tuple[int, float]]:
        """Where the matches ending at ``frame`` may begin, and the strength each must exceed
        (see :meth:`_exact`): (the window's start, the strongest detection that ends in the
        window), then (r_j, the strongest after the j-th) for the recent detections ending at
        r_1 < ... < r_m; by increasing start and non-increasing strength. Only those that a match
        whose log confidence is at most ``bound`` may exceed (a strength is at most a confidence):
        right after a detection, matches that reuse its characters are stronger than it only if
        the filter's bound says they may be, and their window is neither read nor resolved."""
        low = self.window_start(frame, history)
        restrictions = self.firing.restrictions(low)
        levels = [c for _, c in restrictions]
        options = [(low, max(levels, default=0.0))]
        options += [(resume, max(levels[j + 1 :], default=0.0)) for j, (resume, _) in enumerate(restrictions)]
        # The bound and an exact score may differ in their last bits (sums from other origins).
        return [
            (earliest, level)
            for earliest, level in options
            if level <= 0.0 or bound + BOUND_TOLERANCE > math.log(level)
        ]

    def _best_from(
        self, history: History, frame: int, earliest: int, ensure: Ensure, bound: float
    ) -> Candidate | None:
        """The highest-ranked match ending at ``frame`` within the duration window that begins
        at ``earliest`` or later, if it counts; ``bound``: the filtering pass's bound of its log
        confidence.

        Its window is read from where a match of the strength of :data:`FIRST_TRY_STRENGTH` may
        begin (when the threshold is lower): every match beginning before is weaker than that
        (:meth:`feasible_start`), so if the strongest one found is at least that strong it is
        the highest-ranked of all; if not (and the window was read from a later frame than the
        first where a match may begin), it is read again from where a match that counts may
        begin."""
        levels = self._levels_to_try(frame, bound)
        for tried, level in enumerate(levels, start=1):
            window_start = self.match_start(frame, history, earliest, level)
            if window_start is None:
                continue
            # Through the hold time after it too: if the match is pending, firing reads those
            # frames, and later candidates near it share the run.
            run = self.runs.covering(history, window_start, frame + 1 + self.policy.hold_frames, ensure)
            last = frame - window_start
            score = float(run.scores[last])
            if not self.policy.reaches_threshold(score):
                continue  # no match that confident here: none that strong either
            log_strength, score, peaks, log_q = self._strongest(run, last, score)
            # Final if at least that strong, or if the run begins where any match may: it holds
            # every match ending here, as a later reading would.
            if (
                tried == len(levels)
                or log_strength >= level
                or window_start == self.first_start(frame, history, earliest)
            ):
                return self._counting(frame, window_start, log_strength, score, peaks, log_q)
        return None

    def _counting(
        self,
        frame: int,
        window_start: int,
        log_strength: float,
        score: float,
        peaks: list[int],
        log_q: np.ndarray,
    ) -> Candidate | None:
        """The strongest match ending at ``frame``, found in the run from ``window_start`` (its
        log strength and confidence, peaks as offsets and the terms it was found in), if it counts."""
        if not self.policy.reaches_threshold(log_strength):
            return None
        absolute = tuple(window_start + p for p in peaks)
        posteriors = self.scorer.peak_posteriors(log_q, peaks)
        if not self.policy.duration_allowed(*self._span(absolute)):
            return None
        return Candidate(frame, float(math.exp(score)), absolute, posteriors, float(math.exp(log_strength)))

    def _strongest(
        self, run: ExactRun, last: int, score: float
    ) -> tuple[float, float, list[int], np.ndarray]:
        """The highest-ranked match ending at offset ``last`` in ``run`` (which starts at the
        match's window), from the most confident one (log ``score``): its log strength, log
        confidence, peaks (offsets) and the characters' terms it was found in.

        The recurrence finds the most confident match, not the strongest. If the most confident
        one is as strong as it is confident, nothing is stronger (a strength is at most a
        confidence). Otherwise its weakest character limits it: every match with a character
        that weak or weaker is no stronger, so they are dropped (the characters' terms at or
        below its weakest one) and the most confident of the rest is looked at in turn, until
        one is as strong as it is confident or none is more confident than the strongest so far.
        """
        log_q = run.log_q[: last + 1]
        peaks = self.scorer.backtrace(run.pointers, last)
        weakest = min(float(log_q[p, i]) for i, p in enumerate(peaks))
        log_strength = self.scorer.log_strength(score, weakest)
        best = (log_strength, score, peaks, log_q)
        no_match = self.scorer.no_match_shared[None]
        gap, dips = run.gap[None, : last + 1], run.dips[None, : last + 1]
        while log_strength < score:
            log_q = np.where(log_q > weakest, log_q, NEG_INF)
            if not (np.isfinite(log_q).any(axis=0).all() and np.isfinite(log_q[last, -1])):
                break  # some character is never stronger (often: its weakest was its best)
            terms = Terms(log_q[None], gap, dips)
            # Scores alone first: usually nothing left is more confident than the strongest so
            # far is strong, and then no back-pointers are needed.
            score = float(self.scorer.run(terms, no_match, no_match).scores[0, last])
            if score <= best[0]:
                break
            passed = self.scorer.run(terms, no_match, no_match, backtrace=True)
            peaks = self.scorer.backtrace([tuple(a[0] for a in entry) for entry in passed.pointers], last)
            weakest = min(float(log_q[p, i]) for i, p in enumerate(peaks))
            log_strength = self.scorer.log_strength(score, weakest)
            # Stronger than the last: its weakest character is above the last one's, and its
            # confidence above the last one's strength.
            best = (log_strength, score, peaks, log_q)
        return best

    def _span(self, peak_frames: tuple[int, ...]) -> tuple[float, float]:
        return keyword_span(peak_frames, self.frame_seconds, self.frame_center_seconds)

    def _detection(self, candidate: Candidate) -> Detection:
        start, end = self._span(candidate.peak_frames)
        return Detection(
            keyword=self.keyword.text,
            confidence=candidate.confidence,
            start=start,
            end=end,
            peak_frames=candidate.peak_frames,
            peak_posteriors=candidate.peak_posteriors,
        )

"""CTC keyword decoder: finds keywords in a stream of network posteriors. Pure, no I/O.

A keyword is a sequence of *token groups* (usually one output per character; several when
homophones are merged). A match picks one frame per character, in order; its score is

    log confidence = (1/n) * sum_i log q_i(f_i)  +  sum over gap frames u of log h(u)

``q_i(f)`` is the posterior of character i's group at frame f, so the first term is the log of
the geometric mean of the n peak posteriors: keywords of every length share one [0, 1] scale
(the usual decoder's square root of a product does not); each character must also reach
``threshold ** (n - 1)`` by itself, so strong characters cannot carry one never said.
``h(u)`` penalises frames *between*
two characters that belong to neither of them nor to blank: ``h = min(1, c / (1 - gap_tolerance))``
with ``c = blank + q_i + q_{i+1}``. Unrelated speech between the characters therefore breaks
the match, instead of letting a decoder stitch a keyword out of syllables spread over 2.5 s.
A repeated character (two identical groups in a row) also needs a frame where blank beats it
in between, as CTC itself requires.

The best match ending at each frame is a max-plus recurrence that numpy evaluates for a whole
chunk at once (a running maximum per character), so decoding costs a few array operations per
chunk. That pass ignores the maximum duration, so it can only over-estimate; frames where it
reaches the threshold are re-scored exactly over the last ``max_duration`` seconds and
backtracked for timings. A detection fires one frame after its best frame once no match that
began within the keyword's maximum duration before it could still be ``settle_ratio`` times as
confident (or after the hold time); a partial match that gained no character for a whole pause
counts no more, since a keyword being spoken goes on within one. Then the keyword's search
restarts after it and stays quiet for the refractory period: one spoken keyword, one detection.

**Exact posteriors only where they matter.** Normalising a posterior needs the network's whole
output layer (2599 outputs), half of its arithmetic. The decoder can work from cheap upper
bounds instead (:func:`process_many` with ``resolve``): on a frame where every keyword
character's bound is below its floor, no character can be matched there, and treating the gap
penalty as zero only over-estimates the recurrence, which is only a filter. So it asks
``resolve`` for exact posteriors of (1) every frame where some character's bound reaches its
floor, and (2) every frame of the window of a candidate match and of a pending detection. The
exact re-scoring and the firing rule read nothing else, so the detections are those of a
decoder given exact posteriors everywhere (the tests compare the two on real recordings).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edge_agent.engine.decoder.exact import (
    Ensure,
    ExactRun,
    ExactRuns,
    History,
    Resolver,
    already_exact,
)
from edge_agent.engine.decoder.firing import Candidate, Firing, FiringPolicy, keyword_span
from edge_agent.engine.decoder.keywords import CompiledKeyword, Detection
from edge_agent.engine.decoder.recurrence import NEG_INF, KeywordScorer, Terms
from edge_agent.engine.decoder.settings import (
    DEFAULT_GAP_TOLERANCE,
    DEFAULT_HOLD_SECONDS,
    DEFAULT_PAUSE_SECONDS,
    DEFAULT_REFRACTORY_SECONDS,
    DEFAULT_SETTLE_RATIO,
    DecoderSettings,
)

# Spans of at most this many frames (1 s: audio arriving in real time, not whole recordings)
# resolve a match under way as it goes.
_EARLY_RESOLUTION_FRAMES = 34
# ... a few frames at a time: each step resolves, oldest first, at most as many frames as it
# brought plus this many (the window so far is up to the keyword's maximum duration long).
_EARLY_RESOLUTION_BACKLOG_FRAMES = 16
# Absolute frame standing for "no character start seen".
_NEVER = -(10**12)

__all__ = [
    "DEFAULT_GAP_TOLERANCE",
    "DEFAULT_HOLD_SECONDS",
    "DEFAULT_PAUSE_SECONDS",
    "DEFAULT_REFRACTORY_SECONDS",
    "DEFAULT_SETTLE_RATIO",
    "CompiledKeyword",
    "DecoderSettings",
    "Detection",
    "KeywordDecoder",
    "process_many",
]

@dataclass
class _Filtered:
    """A filtering pass over a search's new frames: per frame, an upper bound of the best
    match's score, and the partial matches carried out of the last frame."""

    scores: np.ndarray
    carry: np.ndarray
    carry_pre: np.ndarray


class _KeywordSearch:
    """Decoding state of one keyword in one stream."""

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
        self.log_threshold = self.policy.log_threshold
        self.window_frames = int(math.ceil(keyword.max_duration / frame_seconds)) + 1
        self.reset()

    def reset(self) -> None:
        self.carry = np.full(self.n, NEG_INF)  # A_i at the last frame seen
        self.carry_pre = np.full(self.n, NEG_INF)  # repeated characters: before the blank dip
        self.alive = False  # any finite carry
        self.search_from = 0  # absolute frame where paths may start (after the last detection)
        self.firing.reset()
        self.runs.reset()
        # Recent absolute frames where a match may begin (see first_said), and the latest.
        self.starts = np.zeros(0, dtype=np.int64)
        self.last_start = _NEVER

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
        last = np.where(index >= 0, self.starts[np.maximum(index, 0)], _NEVER)
        return frames - last >= self.window_frames

    def note_starts(self, found: np.ndarray, history: History) -> None:
        """Record new frames where a match may begin (absolute, increasing); forget those too
        old to matter for the frames still to come."""
        oldest = history.first - self.window_frames
        kept = self.starts[self.starts >= oldest]
        self.starts = np.concatenate([kept, found])
        self.last_start = int(found[-1])

    def under_way(self) -> bool:
        """A partial match of two or more characters (but not all) may be alive."""
        return self.n > 2 and bool((self.carry[1 : self.n - 1] >= self.log_threshold).any())

    def keep_carries(self, carry: np.ndarray, carry_pre: np.ndarray) -> None:
        """End of a span with nothing to report: keep the partial matches that can still win.

        A partial match below the threshold can only lose score from here (each further
        character adds log q <= 0): it is dropped, so that quiet audio returns to the idle path.
        """
        carry[carry < self.log_threshold] = NEG_INF
        carry_pre[carry_pre < self.log_threshold] = NEG_INF
        self.carry, self.carry_pre = carry, carry_pre
        self.alive = bool(np.isfinite(carry).any() or np.isfinite(carry_pre).any())

    def expire(self, end_frame: int) -> None:
        """A span where no character was said: partial matches carry over as if its frames
        cost nothing (an over-estimate, as the filter may make), a repeated character's partial
        match as if it passed its blank dip there; unless the span's last frame is a whole
        window past the last first character, which ends them all."""
        if not self.alive:
            return
        if end_frame - 1 - self.last_start >= self.window_frames:
            self.carry = np.full(self.n, NEG_INF)
            self.carry_pre = np.full(self.n, NEG_INF)
            self.alive = False
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
        return max(frame + 1 - self.window_frames, self.search_from, history.first)

    def frames_read(self, frames: np.ndarray, history: History) -> list[tuple[int, int]]:
        """The [start, stop) spans that exact decoding reads for candidates or a pending match
        at ``frames``: from the first possible start in each one's window to its hold time."""
        spans = []
        for frame in frames.tolist():
            start = self.first_start(frame, history)
            if start is not None:
                spans.append((start, min(history.end, frame + 1 + self.policy.hold_frames)))
        return spans

    def first_start(self, frame: int, history: History) -> int | None:
        """The first frame, in the window of a match ending at ``frame``, where the first
        character reaches its floor: no match begins earlier, so rows before it are never read."""
        low = self.window_start(frame, history)
        index = int(np.searchsorted(self.starts, low))
        if index == self.starts.shape[0] or int(self.starts[index]) > frame:
            return None
        return int(self.starts[index])

    def process(
        self,
        history: History,
        first_frame: int,
        ensure: Ensure = already_exact,
        filtered: _Filtered | None = None,
        restarts: list[tuple[_KeywordSearch, int]] | None = None,
    ) -> list[Detection]:
        """Decode the frames from ``first_frame`` on; ``history`` holds them and those before.

        ``filtered``: the filtering pass over these frames, if already made (any over-estimate
        will do: it only proposes frames for exact re-scoring).

        ``restarts``: if given, a search that fired and has only refractory frames left (no
        match can fire there; the filtering pass only carries partial matches out) adds
        ``(self, first frame left)`` to it instead of making that pass: the caller makes it
        for many streams at once (:func:`_carry_through_restarts`).

        After a detection the search restarts right after its last character, which may lie
        before ``first_frame`` (a match held over from the previous chunk), so spans are always
        taken from ``history``.
        """
        detections: list[Detection] = []
        span_start = first_frame
        while span_start < history.end:
            fired = self._process_span(history, span_start, ensure, filtered)
            if fired is None:
                break
            detection, span_start = fired
            detections.append(detection)
            filtered = None  # the search restarts: its own pass, from no partial match
            if restarts is None or span_start >= history.end:
                continue
            if self.firing.quiet_through(history.end - 1):
                restarts.append((self, span_start))
                break
        return detections

    def _process_span(
        self, history: History, first_frame: int, ensure: Ensure, filtered: _Filtered | None
    ) -> tuple[Detection, int] | None:
        if filtered is None:
            values, exact = history.rows(first_frame)
            frames = np.arange(first_frame, history.end)
            passed = self.filter_pass(
                values[None], exact[None], frames[None], self.carry[None], self.carry_pre[None]
            )
            filtered = _Filtered(passed[0][0], passed[1][0], passed[2][0])
        scores, carry, carry_pre = filtered.scores, filtered.carry, filtered.carry_pre
        candidates = np.flatnonzero(scores >= self.log_threshold)
        count = scores.shape[0]
        firing = self.firing
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
                and firing.considers(frame)
                and firing.offer(self._exact(history, frame, ensure))
            ):
                rivals = None  # a new pending detection: its own window, its own rivals
                i += 1
                continue
            if firing.pending is None:
                i += 1
                continue
            if rivals is None:
                rivals = self._rivals(history, firing.pending.frame, ensure)
            index = frame - rivals[0]
            best_rival = rivals[1][index] if index >= 0 else NEG_INF
            if firing.due(frame, best_rival):
                return self._fire()
            i += 1
        self.keep_carries(carry, carry_pre)
        return None

    def _rivals(self, history: History, pending_frame: int, ensure: Ensure) -> tuple[int, np.ndarray]:
        """The rivals' bound (:meth:`FiringPolicy.rivals_still_spoken`) at each frame from the
        pending match's window up to its hold time (it fires by then), counting only matches
        that begin inside that window; returns the first frame and the values."""
        start = self.first_start(pending_frame, history)
        if start is None:  # cannot happen (the pending match began in the window), but harmless
            return pending_frame + 1, np.zeros(0)
        run = self.runs.covering(history, start, pending_frame + 1 + self.policy.hold_frames, ensure)
        return start, self.policy.rivals_still_spoken(run.prefix, run.ends)

    def run_to_prime(
        self, filtered: _Filtered, first_frame: int, history: History
    ) -> tuple[int, int, int] | None:
        """The exact run that :meth:`process` is about to compute or extend for these filtered
        frames (``first_frame`` on), as (start, begin, stop): the window of the pending match,
        or else of the first candidate that may become pending, computed from ``begin`` (its
        start, or where the run computed so far stops) through the hold time of the last
        candidate, as far as the frames are exact. None if there is nothing to compute."""
        frames = np.flatnonzero(filtered.scores >= self.log_threshold) + first_frame
        if self.pending is not None:
            anchor = self.pending.frame
        else:
            eligible = frames[frames > self.firing.quiet_until]
            if eligible.size == 0:
                return None
            anchor = int(eligible[0])
        start = self.first_start(anchor, history)
        if start is None:
            return None
        last = max(anchor, int(frames[-1])) if frames.size else anchor
        stop = min(history.end, last + 1 + self.policy.hold_frames)
        begin = self.runs.resume_point(start)
        missing = np.flatnonzero(~history.rows(begin, stop)[1])
        if missing.size:
            stop = begin + int(missing[0])  # the rest is resolved on demand, if ever read
        return (start, begin, stop) if stop > begin else None

    def _fire(self) -> tuple[Detection, int]:
        """Emit the pending detection and restart the search right after it."""
        candidate, resume_frame = self.firing.fire()
        self.carry = np.full(self.n, NEG_INF)
        self.carry_pre = np.full(self.n, NEG_INF)
        self.alive = False
        self.search_from = resume_frame
        return self._detection(candidate), resume_frame

    def finish(self) -> list[Detection]:
        detections: list[Detection] = []
        if self.pending is not None:
            detections.append(self._fire()[0])
        return detections

    # --- exact re-scoring ----------------------------------------------------------------
    def _exact(self, history: History, frame: int, ensure: Ensure) -> Candidate | None:
        """Best match ending at ``frame`` within the duration window, or None."""
        window_start = self.first_start(frame, history)
        if window_start is None:
            return None
        # Through the hold time after it too: if the match is pending, firing reads those
        # frames, and later candidates near it share the run.
        run = self.runs.covering(history, window_start, frame + 1 + self.policy.hold_frames, ensure)
        last = frame - window_start
        score = float(run.scores[last])
        if not self.policy.reaches_threshold(score):
            return None
        peaks = self.scorer.backtrace(run.pointers, last)
        absolute = tuple(window_start + p for p in peaks)
        posteriors = self.scorer.peak_posteriors(run.log_q, peaks)
        if not self.policy.duration_allowed(*self._span(absolute)):
            return None
        return Candidate(frame, float(math.exp(score)), absolute, posteriors)

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


class KeywordDecoder:
    """Finds keywords in one stream of posteriors; feed chunks in order, then :meth:`finish`."""

    def __init__(
        self,
        keywords: Sequence[CompiledKeyword],
        *,
        blank_id: int = 0,
        frame_seconds: float,
        frame_center_seconds: float = 0.0,
        gap_tolerance: float = DEFAULT_GAP_TOLERANCE,
        refractory_seconds: float = DEFAULT_REFRACTORY_SECONDS,
        hold_seconds: float = DEFAULT_HOLD_SECONDS,
        pause_seconds: float = DEFAULT_PAUSE_SECONDS,
        settle_ratio: float = DEFAULT_SETTLE_RATIO,
        first_frame: int = 0,
    ) -> None:
        """``first_frame`` numbers the first frame fed (a decoder swapped in mid-stream)."""
        if not keywords:
            raise ValueError("at least one keyword is needed")
        if not 0.0 <= gap_tolerance < 1.0:
            raise ValueError(f"gap_tolerance must be in [0, 1), got {gap_tolerance}")
        if refractory_seconds < 0:
            raise ValueError(f"refractory_seconds must be >= 0, got {refractory_seconds}")
        if not settle_ratio >= 1.0:  # NaN too
            raise ValueError(f"settle_ratio must be >= 1, got {settle_ratio}")
        if not pause_seconds > 0.0:
            raise ValueError(f"pause_seconds must be > 0, got {pause_seconds}")
        tokens = sorted({t for k in keywords for group in k.token_groups for t in group} - {blank_id})
        #: network outputs the decoder reads: blank first, then every keyword token
        self.columns = np.array([blank_id, *tokens], dtype=np.int64)
        self.columns_key = (blank_id, *tokens)  # hashable: decoders reading the same outputs
        column_of = {int(token): i for i, token in enumerate(self.columns)}
        self.frame_seconds = frame_seconds
        self._searches = [
            _KeywordSearch(
                k,
                column_of,
                frame_seconds,
                frame_center_seconds,
                gap_tolerance,
                refractory_seconds,
                hold_seconds,
                pause_seconds,
                settle_ratio,
            )
            for k in keywords
        ]
        # Exact re-scoring looks back a window from frames up to one hold time old.
        self.history_frames = max(s.window_frames + s.policy.hold_frames for s in self._searches) + 1
        self._signature = tuple(
            (
                s.keyword,
                s.scorer.gap_scale,
                s.window_frames,
                s.policy.refractory_frames,
                s.policy.hold_frames,
                s.policy.pause_frames,
                s.policy.log_settle_ratio,
                tuple(self.columns),
            )
            for s in self._searches
        )
        self.reset(first_frame)

    @property
    def keywords(self) -> list[CompiledKeyword]:
        return [s.keyword for s in self._searches]

    def reset(self, first_frame: int = 0) -> None:
        self._frames_seen = first_frame
        self._history = History.empty(self.columns.shape[0], first_frame)
        for search in self._searches:
            search.reset()

    @property
    def frames_seen(self) -> int:
        return self._frames_seen

    def process(self, posteriors: np.ndarray) -> list[Detection]:
        """Decode (n, outputs) posteriors, or (n, len(columns)) if already gathered."""
        return process_many([self], [posteriors])[0]

    def finish(self) -> list[Detection]:
        """End of stream: emit detections still waiting for their next frame, then reset."""
        detections = [d for search in self._searches for d in search.finish()]
        detections.sort(key=lambda d: (d.end, d.keyword))
        self.reset()
        return detections

    def _begin(self, posteriors: np.ndarray, exact: bool) -> int:
        """Append new frames to the history; returns the absolute frame of the first.

        The history keeps ``history_frames`` rows from before this call and every new row, so
        that a long chunk is decoded whole."""
        if posteriors.shape[1] == self.columns.shape[0]:
            gathered = posteriors.astype(np.float64, copy=False)
        else:
            gathered = posteriors[:, self.columns].astype(np.float64)
        first_frame = self._frames_seen
        self._frames_seen += gathered.shape[0]
        self._history = self._history.extended(gathered, exact, self.history_frames)
        return first_frame

    @property
    def history_first(self) -> int:
        """Absolute frame of the oldest row the decoder keeps (it may ask to resolve it)."""
        return self._history.first

    @property
    def signature(self) -> tuple[object, ...]:
        """Decoders with equal signatures can share one vectorised recurrence."""
        return self._signature


def _stack_spans(
    decoders: Sequence[KeywordDecoder],
    first_frames: Sequence[int],
    stops: Sequence[int | None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The frames of several decoders from ``first_frames`` (to ``stops``, or to the end of
    each history) as (streams, longest, columns) values, exactness and absolute frame numbers,
    and which cells are padding (pure blank, exact, past a stream's end: they can neither
    start, continue nor penalise a match)."""
    ends = stops if stops is not None else [None] * len(decoders)
    spans = [
        d._history.rows(first, stop) for d, first, stop in zip(decoders, first_frames, ends, strict=True)
    ]
    lengths = np.fromiter((values.shape[0] for values, _ in spans), np.int64, len(spans))
    longest = int(lengths.max())
    streams = len(spans)
    frames = np.asarray(first_frames, dtype=np.int64)[:, None] + np.arange(longest)
    if int(lengths.min()) == longest:
        # Every span as long (one stream, or streams fed in step): no padding to lay out.
        return (
            np.stack([values for values, _ in spans]),
            np.stack([flags for _, flags in spans]),
            frames,
            np.zeros((streams, longest), dtype=bool),
        )
    stacked = np.zeros((streams, longest, decoders[0].columns.shape[0]))
    stacked[..., 0] = 1.0
    exact = np.ones((streams, longest), dtype=bool)
    row = np.repeat(np.arange(streams), lengths)
    column = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    stacked[row, column] = np.concatenate([values for values, _ in spans])
    exact[row, column] = np.concatenate([flags for _, flags in spans])
    padding = np.arange(longest)[None, :] >= lengths[:, None]
    return stacked, exact, frames, padding


def _search_key(decoder: KeywordDecoder, search: _KeywordSearch) -> tuple[object, ...]:
    """Searches with equal keys share one vectorised recurrence: the same keyword settings in
    decoders reading the same outputs."""
    return (decoder.signature, decoder._searches.index(search))


def _pad(terms: Terms, padding: np.ndarray) -> None:
    """Make the padding cells of stacked rows inert: they can neither start nor continue a match
    (log q = -inf), cost nothing (gap 0) and let no repeated character through (no dip), so the
    partial matches carried out of a padded row are those of its last real frame."""
    terms.log_q[padding] = NEG_INF
    terms.gap[padding] = 0.0
    terms.dips[padding] = False


def _resolve(decoders: Sequence[KeywordDecoder], wanted: list[np.ndarray], resolve: Resolver) -> None:
    """One ``resolve`` call for every decoder's wanted frames (none if nobody wants any)."""
    if not any(frames.size for frames in wanted):
        return
    for decoder, frames, exact in zip(decoders, wanted, resolve(wanted), strict=True):
        decoder._history.fill(frames, np.asarray(exact, dtype=np.float64))


def _prime_exact_runs(
    decoders: Sequence[KeywordDecoder],
    first_frames: Sequence[int | None],
    exact_work: list[list[tuple[_KeywordSearch, _Filtered]]],
) -> int:
    """The exact runs that the searches with a candidate or a pending match are about to
    compute or extend one by one, computed together: one recurrence over (streams, frames) per
    keyword, each stream's frames in a row of its own from its own carries, padded at the end
    with frames that change nothing. Each row is the same arithmetic as the one-stream run, so
    the detections are the same; when many streams finish a keyword in the same chunk (many
    devices hearing one speaker) this is most of the chunk's decoding work. Returns how many
    runs were computed."""
    computed = 0
    groups: dict[tuple[object, ...], list[tuple[int, _KeywordSearch, int, int, int]]] = {}
    for i, work in enumerate(exact_work):
        for search, filtered in work:
            span = search.run_to_prime(filtered, first_frames[i], decoders[i]._history)  # type: ignore[arg-type]
            if span is not None:
                groups.setdefault(_search_key(decoders[i], search), []).append((i, search, *span))
    for members in groups.values():
        if len(members) < 2:
            continue  # nothing to share: the one-stream path computes it
        template = members[0][1]
        # Every row is exact: run_to_prime stops each span at its first unresolved frame.
        stacked, _, _, padding = _stack_spans(
            [decoders[i] for i, _, _, _, _ in members],
            [begin for _, _, _, begin, _ in members],
            [stop for _, _, _, _, stop in members],
        )
        lengths = (~padding).sum(axis=1)
        terms = template.scorer.terms(stacked)
        log_q = terms.log_q
        _pad(terms, padding)
        carries = [search.runs.carries(start, begin) for _, search, start, begin, _ in members]
        carry = np.stack([c for c, _ in carries])
        carry_pre = np.stack([c for _, c in carries])
        scores, new_carry, new_carry_pre, pointers, prefix, ends = template.scorer.run(
            terms, carry, carry_pre, backtrace=True
        )
        for row, (_, search, start, begin, stop) in enumerate(members):
            length = int(lengths[row])
            piece = ExactRun(
                begin,
                stop,
                scores[row, :length].copy(),
                [tuple(a[row, :length].copy() for a in entry) for entry in pointers],
                log_q[row, :length].copy(),
                prefix[row, :length].copy(),
                ends[row, :length].copy(),
                new_carry[row].copy(),
                new_carry_pre[row].copy(),
            )
            search.runs.store(start, piece)
        computed += len(members)
    return computed


def _carry_through_restarts(
    decoders: Sequence[KeywordDecoder], restarts: list[tuple[int, _KeywordSearch, int]]
) -> None:
    """The filtering passes of searches that fired and have only refractory frames left in
    their chunk, ``(decoder index, search, first frame left)``: one recurrence per keyword for
    all of them (as in :func:`process_many`'s main pass), keeping the partial matches each
    carries out, as :meth:`_KeywordSearch.process` would one by one."""
    groups: dict[tuple[object, ...], list[tuple[int, _KeywordSearch, int]]] = {}
    for i, search, frame in restarts:
        groups.setdefault(_search_key(decoders[i], search), []).append((i, search, frame))
    for members in groups.values():
        template = members[0][1]
        stacked, exact, frames, padding = _stack_spans(
            [decoders[i] for i, _, _ in members], [frame for _, _, frame in members]
        )
        killed = np.stack([search.killed(frames[row]) for row, (_, search, _) in enumerate(members)])
        terms = template.scorer.optimistic_terms(stacked, exact, killed & ~padding)
        _pad(terms, padding)
        carry = np.stack([search.carry for _, search, _ in members])
        carry_pre = np.stack([search.carry_pre for _, search, _ in members])
        _, new_carry, new_carry_pre, _, _, _ = template.scorer.run(terms, carry, carry_pre)
        for row, (_, search, _) in enumerate(members):
            search.keep_carries(new_carry[row].copy(), new_carry_pre[row].copy())


def process_many(
    decoders: Sequence[KeywordDecoder],
    posteriors: Sequence[np.ndarray],
    resolve: Resolver | None = None,
) -> list[list[Detection]]:
    """:meth:`KeywordDecoder.process` for many streams, with the same results.

    Without ``resolve``, ``posteriors`` are exact. With it, they are upper bounds (as
    :meth:`OutputLayer.bounds` gives) and ``resolve`` is asked, at most twice per call and for
    all streams at once, for the exact posteriors of the frames that need them.

    The filtering recurrence of every keyword runs once for all streams (a leading stream axis;
    streams with fewer frames are padded with frames that can neither start, continue nor
    penalise a match). Streams with nothing going on (the common case) cost a few array
    operations in total; a stream with a candidate or a pending detection takes the one-stream
    path for this span, which does the exact re-scoring and timing.
    """
    results: list[list[Detection]] = [[] for _ in decoders]
    exact_input = resolve is None
    first_frames: list[int | None] = []
    for decoder, frames in zip(decoders, posteriors, strict=True):
        first_frames.append(decoder._begin(frames, exact_input) if frames.shape[0] else None)
    active = [i for i, first in enumerate(first_frames) if first is not None]
    # Per stream: the searches with a candidate or a pending detection, decoded exactly below,
    # and the frames their exact decoding will read.
    exact_work: list[list[tuple[_KeywordSearch, _Filtered]]] = [[] for _ in decoders]
    wanted: list[list[tuple[int, int]]] = [[] for _ in decoders]
    # Matches under way in real-time audio: frames to resolve ahead of need, a few per step.
    early: list[list[tuple[int, int]]] = [[] for _ in decoders]
    early_limit = [0] * len(decoders)
    groups: dict[tuple[object, ...], list[int]] = {}
    for i in active:
        groups.setdefault(decoders[i].signature, []).append(i)
    for members in groups.values():
        stacked, exact, frames, padding = _stack_spans(
            [decoders[i] for i in members], [first_frames[i] for i in members]
        )  # type: ignore[misc]
        lengths = (~padding).sum(axis=1)
        for slot in range(len(decoders[members[0]]._searches)):
            searches = [decoders[i]._searches[slot] for i in members]
            template = searches[0]
            # Where a match may begin; the last such frame before this span, per stream.
            begins = template.scorer.first_said(stacked) & ~padding
            before = np.array([s.last_start for s in searches], dtype=np.int64)
            for row in np.flatnonzero(begins.any(axis=1)).tolist():
                searches[row].note_starts(frames[row, begins[row]], decoders[members[row]]._history)
            pending = np.array([s.pending is not None for s in searches])
            # A span where no character may reach its floor can neither start nor complete a
            # match: its partial matches carry over (an over-estimate: the filter may keep them).
            busy = pending | (template.scorer.said(stacked) & ~padding).any(axis=1)
            for row in np.flatnonzero(~busy).tolist():
                searches[row].expire(int(frames[row, 0]) + int(lengths[row]))
            rows = np.flatnonzero(busy)
            if rows.size == 0:
                continue
            # No match passes a frame a whole window after the last frame where one may begin.
            latest = np.maximum.accumulate(np.where(begins[rows], frames[rows], _NEVER), axis=1)
            latest = np.maximum(latest, before[rows, None])
            killed = (frames[rows] - latest >= template.window_frames) & ~padding[rows]
            terms = template.scorer.optimistic_terms(stacked[rows], exact[rows], killed)
            _pad(terms, padding[rows])
            carry = np.stack([searches[r].carry for r in rows])
            carry_pre = np.stack([searches[r].carry_pre for r in rows])
            scores, new_carry, new_carry_pre, _, _, _ = template.scorer.run(terms, carry, carry_pre)
            candidates = scores >= template.log_threshold
            for position, row in enumerate(rows.tolist()):
                search = searches[row]
                found = frames[row, np.flatnonzero(candidates[position])]
                if search.pending is None and found.size == 0:
                    search.keep_carries(new_carry[position], new_carry_pre[position])
                    if (
                        resolve is not None
                        and lengths[row] <= _EARLY_RESOLUTION_FRAMES
                        and search.under_way()
                    ):
                        # Audio in real time, and two or more characters may have been said:
                        # resolve the window so far a few frames per step, and each new frame
                        # as it comes, rather than all of it when the last character arrives
                        # (in the worst case for every stream at the same instant, delaying
                        # every detection). More frames in all; the detections are the same.
                        last = int(frames[row, lengths[row] - 1])
                        early[members[row]] += search.frames_read(
                            np.array([last]), decoders[members[row]]._history
                        )
                        early_limit[members[row]] = int(lengths[row]) + _EARLY_RESOLUTION_BACKLOG_FRAMES
                    continue
                index = members[row]
                # Its scores propose the frames to re-score; all of them are resolved below.
                filtered = _Filtered(
                    scores[position, : lengths[row]], new_carry[position], new_carry_pre[position]
                )
                exact_work[index].append((search, filtered))
                if search.pending is not None:
                    found = np.concatenate([[search.pending.frame], found])
                wanted[index] += search.frames_read(found, decoders[index]._history)
    if resolve is not None:
        # Everything the exact decoding below will read, for every stream, in one call.
        frames_wanted = [decoders[i]._history.unresolved(spans) for i, spans in enumerate(wanted)]
        for i, spans in enumerate(early):
            if spans:  # the oldest first: the backlog shrinks at every step
                ahead = decoders[i]._history.unresolved(spans)[: early_limit[i]]
                frames_wanted[i] = np.union1d(frames_wanted[i], ahead)
        _resolve(decoders, frames_wanted, resolve)
    _prime_exact_runs(decoders, first_frames, exact_work)
    restarts: list[tuple[int, _KeywordSearch, int]] = []
    for i, searches in enumerate(exact_work):
        if not searches:
            continue
        decoder = decoders[i]
        # Resolved above; on demand is a safety net, for spans the filter did not foresee.
        ensure = already_exact if resolve is None else decoder._history.on_demand(resolve, i, len(decoders))
        restarted: list[tuple[_KeywordSearch, int]] = []
        for search, filtered in searches:
            results[i].extend(search.process(decoder._history, first_frames[i], ensure, filtered, restarted))  # type: ignore[arg-type]
        restarts += [(i, search, frame) for search, frame in restarted]
    _carry_through_restarts(decoders, restarts)
    for found in results:
        found.sort(key=lambda d: (d.end, d.keyword))
    return results

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
backtracked for timings. A detection fires one frame after its best frame (the last
character's posterior peak has passed), then the keyword's search restarts after it and
stays quiet for the refractory period: one spoken keyword, one detection.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

_NEG_INF = -np.inf
# Posteriors are floored before the log so that log(0) never produces -inf arithmetic warnings.
_POSTERIOR_FLOOR = 1e-10
# A pending detection fires once no later frame could raise its confidence by more than 10%.
_LOG_SETTLE_RATIO = math.log(0.9)


@dataclass(frozen=True)
class CompiledKeyword:
    """A keyword ready for decoding: network outputs per character and its policy."""

    text: str
    token_groups: tuple[tuple[int, ...], ...]
    threshold: float
    min_duration: float
    max_duration: float

    def __post_init__(self) -> None:
        if not self.token_groups or any(not group for group in self.token_groups):
            raise ValueError(f"keyword {self.text!r} has no tokens")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"keyword {self.text!r}: threshold must be in (0, 1], got {self.threshold}")
        if not 0.0 <= self.min_duration < self.max_duration:
            raise ValueError(
                f"keyword {self.text!r}: need 0 <= min_duration < max_duration, "
                f"got {self.min_duration} and {self.max_duration}"
            )


@dataclass(frozen=True)
class Detection:
    """One keyword found in a stream; times are seconds from the start of the stream."""

    keyword: str
    confidence: float
    start: float
    end: float
    # Network output frame of each character's chosen peak, and its posterior.
    peak_frames: tuple[int, ...] = field(default=(), compare=False)
    peak_posteriors: tuple[float, ...] = field(default=(), compare=False)

    def to_dict(self) -> dict[str, object]:
        return {
            "keyword": self.keyword,
            "confidence": round(self.confidence, 4),
            "start": round(self.start, 3),
            "end": round(self.end, 3),
        }


@dataclass
class _Candidate:
    frame: int  # absolute frame of the last character's peak
    confidence: float
    peak_frames: tuple[int, ...]
    peak_posteriors: tuple[float, ...]


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
    ) -> None:
        self.keyword = keyword
        self.n = len(keyword.token_groups)
        self.frame_seconds = frame_seconds
        self.frame_center_seconds = frame_center_seconds
        self.log_threshold = math.log(keyword.threshold)
        # Every character must reach threshold^(n-1) on its own. Without it three clear
        # characters carry a fourth that was never said: 小云小 then silence scores 0.054 (the 云
        # at 1e-5) against a default threshold of 0.05, while the weakest character of a real
        # 小云小云 in the dev set is 1e-3 (floor 1.25e-4). For poorly recognised custom keywords
        # the threshold is low and the floor negligible (八角岭 at 0.002: 4e-6).
        self.char_floor = keyword.threshold ** (len(keyword.token_groups) - 1)
        self.gap_scale = 1.0 / (1.0 - gap_tolerance)
        self.window_frames = int(math.ceil(keyword.max_duration / frame_seconds)) + 1
        self.refractory_frames = int(round(refractory_seconds / frame_seconds))
        self.hold_frames = max(1, int(round(hold_seconds / frame_seconds)))
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
        self.reset()

    def reset(self) -> None:
        self.carry = np.full(self.n, _NEG_INF)  # A_i at the last frame seen
        self.carry_pre = np.full(self.n, _NEG_INF)  # repeated characters: before the blank dip
        self._carries_alive = False  # any finite carry: kept with the carries, read per chunk
        self.search_from = 0  # absolute frame where paths may start (after the last detection)
        self.quiet_until = -1  # refractory: no detection ending before this frame
        self.pending: _Candidate | None = None

    # --- the recurrence ------------------------------------------------------------------
    def _terms(self, gathered: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-character log posteriors L (s, t, n), gap log penalties g (s, t, n-1) and blank
        dips (s, t, n-1) of gathered posteriors (s streams, t frames, columns)."""
        blank = gathered[..., 0]
        if self.single_columns is not None:
            q = gathered[..., self.single_columns]
        else:
            q = np.stack([gathered[..., cols].sum(axis=-1) for cols in self.group_columns], axis=-1)
        log_q = np.log(np.maximum(q, _POSTERIOR_FLOOR)) / self.n
        # A character below the floor was not said: it cannot be part of a match.
        log_q[q < self.char_floor] = _NEG_INF
        if self.n == 1:
            empty = np.zeros((*q.shape[:-1], 0))
            return log_q, empty, empty.astype(bool)
        consistent = blank[..., None] + q[..., :-1] + np.where(self.repeated, 0.0, q[..., 1:])
        gap = np.log(np.minimum(np.maximum(consistent * self.gap_scale, _POSTERIOR_FLOOR), 1.0))
        dips = blank[..., None] > q[..., :-1]
        return log_q, gap, dips

    def _run(
        self,
        log_q: np.ndarray,
        gap: np.ndarray,
        dips: np.ndarray,
        carry: np.ndarray,
        carry_pre: np.ndarray,
        backtrace: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[np.ndarray, ...]], np.ndarray]:
        """Scores of the best match ending at each frame, new carries, optional backpointers,
        and the best partial match at each frame (any number of characters but all), for s
        streams at once: arrays are (s, t, ...), carries (s, n).

        A_i(t) = max(V_i(t), A_i(t-1) + g_i(t)) and V_{i+1}(t) = L_{i+1}(t) + A_i(t-1), i.e.
        A_i(t) = G_i(t) + running max of (V_i - G_i) with G_i the cumulative gap penalty.
        """
        streams = log_q.shape[0]
        value = log_q[..., 0]  # V_1
        new_carry = np.full((streams, self.n), _NEG_INF)
        new_carry_pre = np.full((streams, self.n), _NEG_INF)
        pointers: list[tuple[np.ndarray, ...]] = []
        prefix = np.full_like(value, _NEG_INF)
        for i in range(self.n - 1):
            cumulative = np.cumsum(gap[..., i], axis=1)
            if not self.repeated[i]:
                best, arg = _running_max(value - cumulative, carry[:, i], backtrace)
                a_i = best + cumulative
                if backtrace:
                    pointers.append((arg,))
            else:
                best_pre, arg_pre = _running_max(value - cumulative, carry_pre[:, i], backtrace)
                a_pre = best_pre + cumulative
                previous_pre = np.concatenate((carry_pre[:, i, None], a_pre[:, :-1]), axis=1)
                entry = np.where(dips[..., i], previous_pre + gap[..., i] - cumulative, _NEG_INF)
                best, arg = _running_max(entry, carry[:, i], backtrace)
                a_i = best + cumulative
                new_carry_pre[:, i] = a_pre[:, -1]
                if backtrace:
                    pointers.append((arg, arg_pre))
            new_carry[:, i] = a_i[:, -1]
            np.maximum(prefix, a_i, out=prefix)
            previous = np.concatenate((carry[:, i, None], a_i[:, :-1]), axis=1)
            value = log_q[..., i + 1] + previous
        return value, new_carry, new_carry_pre, pointers, prefix

    @property
    def live(self) -> bool:
        """A partial match or a pending detection exists: the next span cannot be skipped."""
        return self.pending is not None or self._carries_alive

    def first_character_peak(self, gathered: np.ndarray) -> np.ndarray:
        """Largest posterior of the first character per stream (gathered: (s, t, columns))."""
        first = gathered[..., self.group_columns[0]]
        return first.sum(axis=-1).max(axis=-1) if first.shape[-1] > 1 else first[..., 0].max(axis=-1)

    def keep_carries(self, carry: np.ndarray, carry_pre: np.ndarray) -> None:
        """End of a span with nothing to report: keep the partial matches that can still win.

        A partial match below the threshold can only lose score from here (each further
        character adds log q <= 0): it is dropped, so that quiet audio returns to the idle path.
        """
        carry[carry < self.log_threshold] = _NEG_INF
        carry_pre[carry_pre < self.log_threshold] = _NEG_INF
        self.carry, self.carry_pre = carry, carry_pre
        self._carries_alive = bool(np.isfinite(carry).any() or np.isfinite(carry_pre).any())

    # --- streaming -----------------------------------------------------------------------
    def process(self, history: np.ndarray, history_first: int, first_frame: int) -> list[Detection]:
        """Decode the frames from ``first_frame`` on; ``history`` holds them and those before.

        ``history`` row 0 is absolute frame ``history_first``. After a detection the search
        restarts right after its last character, which may lie before ``first_frame`` (a match
        held over from the previous chunk), so spans are always taken from ``history``.
        """
        detections: list[Detection] = []
        span_start = first_frame
        end = history_first + history.shape[0]
        while span_start < end:
            rows = history[span_start - history_first :]
            fired = self._process_span(rows, history, history_first, span_start)
            if fired is None:
                break
            detection, span_start = fired
            detections.append(detection)
        return detections

    def _idle(self, gathered: np.ndarray) -> bool:
        """Nothing can match in this span: no live partial match and no first character loud
        enough to start one. Most audio is like that; it skips the recurrence entirely."""
        return not self.live and float(self.first_character_peak(gathered[None])[0]) < self.char_floor

    def _process_span(
        self, gathered: np.ndarray, history: np.ndarray, history_first: int, first_frame: int
    ) -> tuple[Detection, int] | None:
        if self._idle(gathered):
            return None
        log_q, gap, dips = self._terms(gathered[None])
        scores, carry, carry_pre, _, prefix = self._run(
            log_q, gap, dips, self.carry[None], self.carry_pre[None]
        )
        scores, carry, carry_pre, prefix = scores[0], carry[0], carry_pre[0], prefix[0]
        candidates = np.flatnonzero(scores >= self.log_threshold)
        count = gathered.shape[0]
        i = 0
        while i < count:
            if self.pending is None:
                # Nothing pending: jump straight to the next frame that may hold a match.
                j = int(np.searchsorted(candidates, i))
                if j == candidates.shape[0]:
                    break
                i = int(candidates[j])
                frame = first_frame + i
                if frame > self.quiet_until:
                    self.pending = self._exact(history, history_first, frame)
                i += 1
                continue
            frame = first_frame + i
            if scores[i] >= self.log_threshold:
                candidate = self._exact(history, history_first, frame)
                if candidate is not None and candidate.confidence > self.pending.confidence:
                    self.pending = candidate
                    i += 1
                    continue
            # A later match can at best complete a partial match seen so far with perfect
            # characters; fire once none could beat the pending match by a margin (at once for
            # a confident match), or when the hold time is over. Waiting matters when a weak
            # match borrowed the first characters of a keyword still being spoken.
            settled = math.log(self.pending.confidence) >= prefix[i] + _LOG_SETTLE_RATIO
            if settled or frame - self.pending.frame >= self.hold_frames:
                return self._fire(self.pending.frame + 1)
            i += 1
        self.keep_carries(carry, carry_pre)
        return None

    def _fire(self, resume_frame: int) -> tuple[Detection, int]:
        """Emit the pending detection and restart the search at ``resume_frame``."""
        assert self.pending is not None
        detection = self._detection(self.pending)
        self.quiet_until = self.pending.frame + self.refractory_frames
        self.pending = None
        self.carry = np.full(self.n, _NEG_INF)
        self.carry_pre = np.full(self.n, _NEG_INF)
        self._carries_alive = False
        self.search_from = resume_frame
        return detection, resume_frame

    def finish(self) -> list[Detection]:
        detections: list[Detection] = []
        if self.pending is not None:
            detections.append(self._fire(self.pending.frame + 1)[0])
        return detections

    # --- exact re-scoring ----------------------------------------------------------------
    def _exact(self, history: np.ndarray, history_first: int, frame: int) -> _Candidate | None:
        """Best match ending at ``frame`` within the duration window, or None."""
        window_start = max(frame + 1 - self.window_frames, self.search_from, history_first)
        rows = history[window_start - history_first : frame - history_first + 1]
        log_q, gap, dips = self._terms(rows[None])
        no_carry = np.full((1, self.n), _NEG_INF)
        scores, _, _, pointers, _ = self._run(log_q, gap, dips, no_carry, no_carry, backtrace=True)
        scores, log_q = scores[0], log_q[0]
        if scores[-1] < self.log_threshold:
            return None
        peaks = self._backtrace([tuple(a[0] for a in entry) for entry in pointers], rows.shape[0] - 1)
        absolute = tuple(window_start + p for p in peaks)
        posteriors = tuple(float(math.exp(log_q[p, i] * self.n)) for i, p in enumerate(peaks))
        candidate = _Candidate(frame, float(math.exp(scores[-1])), absolute, posteriors)
        start, end = self._span(candidate)
        if not self.keyword.min_duration <= end - start <= self.keyword.max_duration:
            return None
        return candidate

    def _backtrace(self, pointers: list[tuple[np.ndarray, ...]], last: int) -> list[int]:
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

    def _span(self, candidate: _Candidate) -> tuple[float, float]:
        """Start/end seconds covering the spoken keyword, not just its posterior peaks.

        A CTC peak sits somewhere inside its character; we extend each side by half the mean
        distance between peaks (one character's width), at least one frame.
        """
        first, last = candidate.peak_frames[0], candidate.peak_frames[-1]
        if self.n > 1:
            half_width = max(self.frame_seconds, (last - first) * self.frame_seconds / (self.n - 1) / 2)
        else:
            half_width = 3 * self.frame_seconds
        start = max(0.0, first * self.frame_seconds + self.frame_center_seconds - half_width)
        end = last * self.frame_seconds + self.frame_center_seconds + half_width
        return start, end

    def _detection(self, candidate: _Candidate) -> Detection:
        start, end = self._span(candidate)
        return Detection(
            keyword=self.keyword.text,
            confidence=candidate.confidence,
            start=start,
            end=end,
            peak_frames=candidate.peak_frames,
            peak_posteriors=candidate.peak_posteriors,
        )


def _running_max(values: np.ndarray, initial: np.ndarray, with_arg: bool) -> tuple[np.ndarray, np.ndarray]:
    """Running maximum along axis 1 of (s, t) ``values``, seeded per stream with ``initial``;
    with the latest arg-max if asked. The seed stands for frames before this block (arg -1)."""
    seeded = np.concatenate((initial[:, None], values), axis=1)
    best = np.maximum.accumulate(seeded, axis=1)
    if not with_arg:
        return best[:, 1:], best[:, 1:]
    positions = np.where(seeded >= best, np.arange(-1, values.shape[1]), -2)
    arg = np.maximum.accumulate(positions, axis=1)
    return best[:, 1:], arg[:, 1:]


class KeywordDecoder:
    """Finds keywords in one stream of posteriors; feed chunks in order, then :meth:`finish`."""

    def __init__(
        self,
        keywords: Sequence[CompiledKeyword],
        *,
        blank_id: int = 0,
        frame_seconds: float,
        frame_center_seconds: float = 0.0,
        gap_tolerance: float = 0.5,
        refractory_seconds: float = 1.0,
        hold_seconds: float = 0.5,
        first_frame: int = 0,
    ) -> None:
        """``first_frame`` numbers the first frame fed (a decoder swapped in mid-stream)."""
        if not keywords:
            raise ValueError("at least one keyword is needed")
        if not 0.0 <= gap_tolerance < 1.0:
            raise ValueError(f"gap_tolerance must be in [0, 1), got {gap_tolerance}")
        if refractory_seconds < 0:
            raise ValueError(f"refractory_seconds must be >= 0, got {refractory_seconds}")
        tokens = sorted({t for k in keywords for group in k.token_groups for t in group} - {blank_id})
        #: network outputs the decoder reads: blank first, then every keyword token
        self.columns = np.array([blank_id, *tokens], dtype=np.int64)
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
            )
            for k in keywords
        ]
        # Exact re-scoring looks back a window from frames up to one hold time old.
        self._history_frames = max(s.window_frames + s.hold_frames for s in self._searches) + 1
        self.reset(first_frame)

    @property
    def keywords(self) -> list[CompiledKeyword]:
        return [s.keyword for s in self._searches]

    def reset(self, first_frame: int = 0) -> None:
        self._frames_seen = first_frame
        self._history = np.zeros((0, self.columns.shape[0]), dtype=np.float64)
        for search in self._searches:
            search.reset()

    @property
    def frames_seen(self) -> int:
        return self._frames_seen

    def process(self, posteriors: np.ndarray) -> list[Detection]:
        """Decode (n, outputs) posteriors, or (n, len(columns)) if already gathered."""
        if posteriors.shape[0] == 0:
            return []
        _, history, history_first, first_frame = self._begin(posteriors)
        detections: list[Detection] = []
        for search in self._searches:
            detections.extend(search.process(history, history_first, first_frame))
        detections.sort(key=lambda d: (d.end, d.keyword))
        return detections

    def finish(self) -> list[Detection]:
        """End of stream: emit detections still waiting for their next frame, then reset."""
        detections = [d for search in self._searches for d in search.finish()]
        detections.sort(key=lambda d: (d.end, d.keyword))
        self.reset()
        return detections

    def rows_without_need(self, bounds: np.ndarray) -> int:
        """How many leading rows need no exact posteriors, given upper bounds of them.

        None while a partial match or a detection is pending; otherwise the rows before the
        first one where some keyword's first character could reach its floor: no match can
        start there, so their values only ever stand before a match's first character.
        """
        if any(search.live for search in self._searches):
            return 0
        needed = bounds.shape[0]
        for search in self._searches:
            first = bounds[:, search.group_columns[0]]
            loud = np.flatnonzero(
                (first.sum(axis=1) if first.shape[1] > 1 else first[:, 0]) >= search.char_floor
            )
            if loud.size:
                needed = min(needed, int(loud[0]))
        return needed

    def _begin(self, posteriors: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
        """Account for new frames: (gathered, history, history_first, first_frame)."""
        if posteriors.shape[1] == self.columns.shape[0]:
            gathered = posteriors.astype(np.float64, copy=False)
        else:
            gathered = posteriors[:, self.columns].astype(np.float64)
        first_frame = self._frames_seen
        self._frames_seen += gathered.shape[0]
        history = np.concatenate([self._history, gathered])
        self._history = history[-self._history_frames :]
        return gathered, history, self._frames_seen - history.shape[0], first_frame

    def _signature(self) -> tuple[object, ...]:
        """Decoders with equal signatures can share one vectorised recurrence."""
        return tuple(
            (s.keyword, s.gap_scale, s.window_frames, s.refractory_frames, s.hold_frames, tuple(self.columns))
            for s in self._searches
        )


def process_many(
    decoders: Sequence[KeywordDecoder], posteriors: Sequence[np.ndarray]
) -> list[list[Detection]]:
    """:meth:`KeywordDecoder.process` for many streams, with the same results.

    The recurrence of every keyword runs once for all streams (a leading stream axis; streams
    with fewer frames are padded with frames that can neither start, continue nor penalise a
    match). Streams with nothing going on (the common case) cost a few array operations in
    total; a stream with a candidate or a pending detection takes the one-stream path for this
    span, which does the exact re-scoring and timing.
    """
    results: list[list[Detection]] = [[] for _ in decoders]
    groups: dict[tuple[object, ...], list[int]] = {}
    spans: list[tuple[np.ndarray, np.ndarray, int, int] | None] = []
    for index, (decoder, frames) in enumerate(zip(decoders, posteriors, strict=True)):
        if frames.shape[0] == 0:
            spans.append(None)
            continue
        spans.append(decoder._begin(frames))
        groups.setdefault(decoder._signature(), []).append(index)
    for members in groups.values():
        lengths = np.array([spans[i][0].shape[0] for i in members])  # type: ignore[index]
        longest = int(lengths.max())
        columns = decoders[members[0]].columns.shape[0]
        stacked = np.zeros((len(members), longest, columns))
        stacked[..., 0] = 1.0  # padding frames are pure blank
        for row, i in enumerate(members):
            gathered = spans[i][0]  # type: ignore[index]
            stacked[row, : gathered.shape[0]] = gathered
        padding = np.arange(longest)[None, :] >= lengths[:, None]
        for slot in range(len(decoders[members[0]]._searches)):
            searches = [decoders[i]._searches[slot] for i in members]
            template = searches[0]
            live = np.array([s.live for s in searches])
            busy = live | (template.first_character_peak(stacked) >= template.char_floor)
            rows = np.flatnonzero(busy)
            if rows.size == 0:
                continue
            log_q, gap, dips = template._terms(stacked[rows])
            log_q[padding[rows]] = _NEG_INF
            gap[padding[rows]] = 0.0
            dips[padding[rows]] = False
            carry = np.stack([searches[r].carry for r in rows])
            carry_pre = np.stack([searches[r].carry_pre for r in rows])
            scores, new_carry, new_carry_pre, _, _ = template._run(log_q, gap, dips, carry, carry_pre)
            candidates = (scores >= template.log_threshold).any(axis=1)
            for position, row in enumerate(rows):
                search = searches[row]
                i = members[row]
                if search.pending is None and not candidates[position]:
                    search.keep_carries(new_carry[position], new_carry_pre[position])
                    continue
                _, history, history_first, first_frame = spans[i]  # type: ignore[misc]
                results[i].extend(search.process(history, history_first, first_frame))
    for found in results:
        found.sort(key=lambda d: (d.end, d.keyword))
    return results

"""Decoding many streams at once: :func:`process_many` and the passes it shares between streams.

Every stream has its own :class:`~stream.KeywordDecoder`; what this module shares is the
arithmetic. The filtering recurrence of each keyword runs once for all streams, with a leading
stream axis: streams with fewer frames are padded with frames that can neither start, continue
nor penalise a match. Streams with nothing going on (the common case) cost a few array
operations in total; a stream with a candidate or a pending detection takes its search's
one-stream path (``search.py``) for the exact re-scoring and the firing rule.

What a burst of streams finishing a keyword in the same chunk (many devices hearing one
speaker) would otherwise do one stream at a time is batched too, each stream in a row of its
own, with the arithmetic of the one-stream path, so the detections are the same:

* the frames the exact decoding will read are resolved in one call for all streams, and with
  audio arriving in real time a match under way is resolved a few frames per step instead of
  all at once when its last character arrives;
* the exact runs that the searches are about to compute or extend (:func:`prime_exact_runs`).

Only public methods of the decoders and searches are used here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from edge_agent.engine.decoder.exact import ExactRun, Resolver, already_exact
from edge_agent.engine.decoder.keywords import Detection
from edge_agent.engine.decoder.recurrence import BOUND_SAFETY, NEG_INF, Terms
from edge_agent.engine.decoder.search import NEVER, Filtered, KeywordSearch, drop_hopeless, under_way_rows

if TYPE_CHECKING:
    from edge_agent.engine.decoder.stream import KeywordDecoder

# Batches of at least this many streams (audio arriving in real time) resolve a match under way
# as it goes: when they all finish a keyword at the same instant, resolving every window in one
# step would make that step longer than a chunk. Smaller batches resolve a window when a
# candidate comes, which reads fewer frames.
EARLY_RESOLUTION_MIN_STREAMS = 128
# One stream's filtering pass over at most this many rows of bounds (a live microphone's chunk)
# is computed on Python floats (KeywordScorer.filter_bounds): on a few numbers numpy's per-call
# costs exceed the arithmetic; on longer spans numpy wins.
PYTHON_FILTER_MAX_FRAMES = 16
# Spans of at most this many frames (1 s: audio arriving in real time, not whole recordings)
# resolve a match under way as it goes.
EARLY_RESOLUTION_FRAMES = 34
# ... a few steps' worth at a time: each step resolves, oldest first, at most as many frames as
# it brought plus this many. A match is often found on track only a few steps before its last
# character, with most of its window (up to the keyword's maximum duration) still to resolve:
# resolved then, it is done before that character comes, and the step where every stream's
# keyword ends (many devices hearing one speaker) does not resolve every window at once.
EARLY_RESOLUTION_BACKLOG_FRAMES = 64


def _stack_spans(
    decoders: Sequence[KeywordDecoder],
    first_frames: Sequence[int],
    stops: Sequence[int | None] | None = None,
    fresh: tuple[Sequence[np.ndarray], bool] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The frames of several decoders from ``first_frames`` (to ``stops``, or to the end of
    each history) as (streams, longest, columns) values, exactness and absolute frame numbers,
    and which cells are padding (pure blank, exact, past a stream's end: they can neither
    start, continue nor penalise a match).

    ``fresh``: the rows each decoder has just appended from ``first_frames`` on (gathered,
    float64) and whether they are exact; the same values as the histories hold, without a
    read of every history."""
    if fresh is not None and len(decoders) > 1:
        return _stack_fresh(first_frames, *fresh)
    if len(decoders) == 1:
        # One stream (a live microphone): views, no copies.
        values, flags = decoders[0].history.rows(first_frames[0], None if stops is None else stops[0])
        length = values.shape[0]
        frames = np.arange(first_frames[0], first_frames[0] + length)[None]
        return values[None], flags[None], frames, np.zeros((1, length), dtype=bool)
    ends = stops if stops is not None else [None] * len(decoders)
    spans = [d.history.rows(first, stop) for d, first, stop in zip(decoders, first_frames, ends, strict=True)]
    # intp: np.repeat's counts must cast safely to it, and it is 32-bit on armv7.
    lengths = np.fromiter((values.shape[0] for values, _ in spans), np.intp, len(spans))
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


def _stack_fresh(
    first_frames: Sequence[int], values: Sequence[np.ndarray], exact_input: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_stack_spans` of rows just appended, all exact or all bounds."""
    lengths = np.fromiter((rows.shape[0] for rows in values), np.intp, len(values))
    longest = int(lengths.max())
    streams = len(values)
    frames = np.asarray(first_frames, dtype=np.int64)[:, None] + np.arange(longest)
    if int(lengths.min()) == longest:
        return (
            np.stack(values),
            np.full((streams, longest), exact_input),
            frames,
            np.zeros((streams, longest), dtype=bool),
        )
    stacked = np.zeros((streams, longest, values[0].shape[1]))
    stacked[..., 0] = 1.0
    padding = np.arange(longest)[None, :] >= lengths[:, None]
    stacked[~padding] = np.concatenate(values)
    exact = padding | exact_input
    return stacked, exact, frames, padding


def _search_key(decoder: KeywordDecoder, search: KeywordSearch) -> tuple[int, int]:
    """Searches with equal keys share one vectorised recurrence: the same keyword settings in
    decoders reading the same outputs."""
    return (decoder.group, decoder.searches.index(search))


def _pad(terms: Terms, padding: np.ndarray) -> None:
    """Make the padding cells of stacked rows inert: they can neither start nor continue a match
    (log q = -inf), cost nothing (gap 0) and let no repeated character through (no dip), so the
    partial matches carried out of a padded row are those of its last real frame."""
    terms.log_q[padding] = NEG_INF
    terms.gap[padding] = 0.0
    terms.dips[padding] = False


def _resolve(decoders: Sequence[KeywordDecoder], wanted: dict[int, np.ndarray], resolve: Resolver) -> None:
    """One ``resolve`` call for the wanted frames of every decoder (by index; none if nobody
    wants any)."""
    asking = [i for i, frames in wanted.items() if frames.size]
    if not asking:
        return
    nothing = np.zeros(0, dtype=np.int64)
    requests = [nothing] * len(decoders)
    for i in asking:
        requests[i] = wanted[i]
    answers = resolve(requests)
    for i in asking:
        decoders[i].history.fill(wanted[i], np.asarray(answers[i], dtype=np.float64))


def prime_exact_runs(
    decoders: Sequence[KeywordDecoder],
    first_frames: Sequence[int | None],
    exact_work: dict[int, list[tuple[KeywordSearch, Filtered]]],
) -> int:
    """The exact runs that the searches with a candidate or a pending match are about to
    compute or extend one by one, computed together: one recurrence over (streams, frames) per
    keyword, each stream's frames in a row of its own from its own carries, padded at the end
    with frames that change nothing. Each row is the same arithmetic as the one-stream run, so
    the detections are the same; when many streams finish a keyword in the same chunk (many
    devices hearing one speaker) this is most of the chunk's decoding work. Returns how many
    runs were computed."""
    computed = 0
    groups: dict[tuple[int, int], list[tuple[int, KeywordSearch, int, int, int]]] = {}
    for i in sorted(exact_work):
        for search, filtered in exact_work[i]:
            for span in search.runs_to_prime(filtered, first_frames[i], decoders[i].history):  # type: ignore[arg-type]
                groups.setdefault(_search_key(decoders[i], search), []).append((i, search, *span))
    for members in groups.values():
        if len(members) < 2:
            continue  # nothing to share: the one-stream path computes it
        template = members[0][1]
        # Every row is exact: runs_to_prime stops each span at its first unresolved frame.
        stacked, _, _, padding = _stack_spans(
            [decoders[i] for i, _, _, _, _ in members],
            [begin for _, _, _, begin, _ in members],
            [stop for _, _, _, _, stop in members],
        )
        lengths = (~padding).sum(axis=1)
        terms = template.scorer.terms(stacked)
        _pad(terms, padding)  # in the padding cells only: each row's own frames keep their terms
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
                *(a[row, :length].copy() for a in terms),
                prefix[row, :length].copy(),
                ends[row, :length].copy(),
                new_carry[row].copy(),
                new_carry_pre[row].copy(),
            )
            search.runs.store(start, piece)
        computed += len(members)
    return computed


def process_many(
    decoders: Sequence[KeywordDecoder],
    posteriors: Sequence[np.ndarray],
    resolve: Resolver | None = None,
) -> list[list[Detection]]:
    """:meth:`KeywordDecoder.process` for many streams, with the same results.

    Without ``resolve``, ``posteriors`` are exact. With it, they are upper bounds (as
    :meth:`OutputLayer.bounds` gives) and ``resolve`` is asked, at most twice per call and for
    all streams at once, for the exact posteriors of the frames that need them (``exact.py``).
    How the work is shared between streams: the module's docstring.
    """
    if len(decoders) == 1:
        return [process_one(decoders[0], posteriors[0], resolve)]
    results: list[list[Detection]] = [[] for _ in decoders]
    exact_input = resolve is None
    first_frames: list[int | None] = [
        decoder.append(frames, exact_input) if frames.shape[0] else None
        for decoder, frames in zip(decoders, posteriors, strict=True)
    ]
    # Per stream with something going on (most have nothing: these are filled sparsely): the
    # searches with a candidate or a pending detection, decoded exactly below, and the frames
    # their exact decoding will read.
    exact_work: dict[int, list[tuple[KeywordSearch, Filtered]]] = {}
    wanted: dict[int, list[tuple[int, int]]] = {}
    # Matches under way in real-time audio: frames to resolve ahead of need, a few per step.
    early: dict[int, list[tuple[int, int]]] = {}
    early_limit: dict[int, int] = {}
    # Worth it for many streams only: a few streams' windows resolved at once are a small
    # product, while resolving ahead reads more frames.
    early_resolution = resolve is not None and len(decoders) >= EARLY_RESOLUTION_MIN_STREAMS
    groups: dict[int, list[int]] = {}
    for i, first in enumerate(first_frames):
        if first is not None:
            groups.setdefault(decoders[i].group, []).append(i)
    for members in groups.values():
        columns = decoders[members[0]].columns.shape[0]
        appended = [posteriors[i] for i in members]
        # The rows just appended, if the histories hold them as they are (gathered, float64).
        fresh = (
            (appended, exact_input)
            if all(rows.shape[1] == columns and rows.dtype == np.float64 for rows in appended)
            else None
        )
        stacked, exact, frames, padding = _stack_spans(
            [decoders[i] for i in members], [first_frames[i] for i in members], fresh=fresh
        )  # type: ignore[misc]
        lengths = (~padding).sum(axis=1)
        padded = bool(padding.any())  # not when streams are fed in step
        # Where each stream's span ends (absolute frame after its last).
        span_ends = (frames[:, 0] + lengths).tolist()
        per_stream = [decoders[i].searches for i in members]
        for slot in range(len(per_stream[0])):
            searches = [stream_searches[slot] for stream_searches in per_stream]
            template = searches[0]
            if len(searches) == 1 and template.idle_over(stacked[0]):
                # One stream (a live microphone) with nothing going on: what the general path
                # below would find too (no frame where a match may begin, nothing busy), without
                # its batch bookkeeping.
                template.expire(span_ends[0])
                continue
            scorer = template.scorer
            characters = scorer.characters(stacked)
            # Where each character may reach its floor (scorer.said, scorer.first_said).
            reach = characters >= template.said_floor
            if padded:
                reach &= ~padding[..., None]
            # Where a match may begin; the last such frame before this span, per stream.
            begins = reach[..., 0]
            before = np.array([s.last_start for s in searches], dtype=np.int64)
            for row in np.flatnonzero(begins.any(axis=1)).tolist():
                searches[row].note_starts(frames[row, begins[row]], decoders[members[row]].history)
            pending = np.array([s.firing.pending is not None for s in searches])
            # A span where no character may reach its floor can neither start nor complete a
            # match: its partial matches carry over (an over-estimate: the filter may keep them).
            busy = pending | reach.any(axis=(1, 2))
            for row in np.flatnonzero(~busy).tolist():
                search = searches[row]
                if search.alive:  # expire() changes nothing in a search with no partial match
                    search.expire(span_ends[row])
            rows = np.flatnonzero(busy)
            if rows.size == 0:
                continue
            # No match passes a frame a whole window after the last frame where one may begin.
            latest = np.maximum.accumulate(np.where(begins[rows], frames[rows], NEVER), axis=1)
            latest = np.maximum(latest, before[rows, None])
            killed = frames[rows] - latest >= template.window_frames
            if padded:
                killed &= ~padding[rows]
            terms = scorer.optimistic_terms(stacked[rows], exact[rows], killed, characters[rows])
            if padded:
                _pad(terms, padding[rows])
            carry = np.stack([searches[r].carry for r in rows])
            carry_pre = np.stack([searches[r].carry_pre for r in rows])
            scores, new_carry, new_carry_pre, _, _, _ = template.scorer.run(terms, carry, carry_pre)
            candidates = scores >= template.log_threshold
            proposing = candidates.any(axis=1).tolist()
            # What keep_carries does, for every busy stream at once (the searches with exact
            # work below do it again at the end of their span: the same carries).
            alive = drop_hopeless(new_carry, new_carry_pre, template.log_threshold)
            under_way = under_way_rows(new_carry, template) if early_resolution else []
            for position, row in enumerate(rows.tolist()):
                search = searches[row]
                if search.firing.pending is None and not proposing[position]:
                    search.keep_carries(new_carry[position], new_carry_pre[position], alive[position])
                    if early_resolution and lengths[row] <= EARLY_RESOLUTION_FRAMES and under_way[position]:
                        # Audio in real time, and two or more characters may have been said,
                        # as clearly as the keyword must be (on track, see under_way_rows):
                        # resolve the window so far a few frames per step, and each new frame
                        # as it comes, rather than all of it when the last character arrives
                        # (in the worst case for every stream at the same instant, delaying
                        # every detection). More frames in all; the detections are the same.
                        # From where the partial match on track may begin, up to the newest
                        # frame held.
                        history = decoders[members[row]].history
                        start = search.on_track_start(history, span_ends[row] - 1)
                        if start is not None:
                            early.setdefault(members[row], []).append((start, history.end))
                        early_limit[members[row]] = int(lengths[row]) + EARLY_RESOLUTION_BACKLOG_FRAMES
                    continue
                index = members[row]
                proposed = np.flatnonzero(candidates[position])
                spans = search.frames_read(
                    decoders[index].history, frames[row, proposed], scores[position, proposed]
                )
                if not spans and search.firing.pending is None:
                    # No proposed frame may end a match that counts: all the exact decoding
                    # would do is keep the carries.
                    search.keep_carries(new_carry[position], new_carry_pre[position], alive[position])
                    continue
                # Its scores propose the frames to re-score; all of them are resolved below.
                filtered = Filtered(
                    scores[position, : lengths[row]], new_carry[position], new_carry_pre[position]
                )
                exact_work.setdefault(index, []).append((search, filtered))
                wanted.setdefault(index, []).extend(spans)
    if resolve is not None:
        # Everything the exact decoding below will read, for every stream, in one call.
        frames_wanted = {i: decoders[i].history.unresolved(spans) for i, spans in wanted.items() if spans}
        for i, spans in early.items():
            if spans:  # the oldest first: the backlog shrinks at every step
                ahead = decoders[i].history.unresolved(spans)[: early_limit[i]]
                frames_wanted[i] = np.union1d(frames_wanted[i], ahead) if i in frames_wanted else ahead
        _resolve(decoders, frames_wanted, resolve)
    prime_exact_runs(decoders, first_frames, exact_work)
    for i in sorted(exact_work):
        decoder = decoders[i]
        # Resolved above; on demand is a safety net, for spans the filter did not foresee.
        ensure = already_exact if resolve is None else decoder.history.on_demand(resolve, i, len(decoders))
        for search, filtered in exact_work[i]:
            results[i].extend(search.process(decoder.history, first_frames[i], ensure, filtered))  # type: ignore[arg-type]
        results[i].sort(key=lambda d: (d.end, d.keyword))
    return results


def process_one(
    decoder: KeywordDecoder, posteriors: np.ndarray, resolve: Resolver | None = None
) -> list[Detection]:
    """:func:`process_many` for one stream (a live microphone's every chunk): the same steps on
    that stream's own rows, without the layout of a batch (no padding, no groups, nothing
    shared to prime), and each character's values gathered once per keyword."""
    if posteriors.shape[0] == 0:
        return []
    first = decoder.append(posteriors, resolve is None)
    searches = decoder.searches
    if posteriors.shape[1] == decoder.columns.shape[0] and _nothing_said(decoder, posteriors):
        # No character of any keyword may reach its floor in these rows and nothing is pending
        # (most of a microphone's chunks, in speech as in silence): what the loop below does for
        # each search, decided from one maximum instead of each keyword's gathers.
        end = first + posteriors.shape[0]
        for search in searches:
            if search.alive:  # expire() changes nothing in a search with no partial match
                search.expire(end)
        return []
    history = decoder.history
    values, exact = history.rows(first)
    length = values.shape[0]
    bounds_only = resolve is not None  # the rows just appended are bounds
    frames = np.arange(first, first + length)
    exact_work: list[tuple[KeywordSearch, Filtered]] = []
    wanted: list[tuple[int, int]] = []
    for search in searches:
        scorer = search.scorer
        characters = scorer.characters(values)
        reach = characters >= scorer.char_floor * BOUND_SAFETY
        said = reach.any(axis=1)
        if search.pending is None and not said.any():
            # Nothing going on (the usual case): no frame where a match may begin, nothing busy.
            search.expire(first + length)
            continue
        # Where a match may begin (``scorer.first_said``); the last such frame before this span.
        begins = reach[:, 0]
        before = search.last_start
        if begins.any():
            search.note_starts(frames[begins], history)
        # No match passes a frame a whole window after the last frame where one may begin.
        latest = np.maximum(np.maximum.accumulate(np.where(begins, frames, NEVER)), before)
        killed = frames - latest >= search.window_frames
        if bounds_only and length <= PYTHON_FILTER_MAX_FRAMES:
            scores, new_carry, new_carry_pre = scorer.filter_bounds(
                characters, killed, search.carry, search.carry_pre
            )
        else:
            terms = scorer.optimistic_terms(values[None], exact[None], killed[None], characters[None])
            passed = scorer.run(terms, search.carry[None], search.carry_pre[None])
            scores, new_carry, new_carry_pre = passed.scores[0], passed.carry[0], passed.carry_pre[0]
        proposed = scores >= search.log_threshold
        found = frames[proposed]
        if search.pending is None and found.size == 0:
            search.keep_carries(new_carry, new_carry_pre)
            continue
        spans = search.frames_read(history, found, scores[proposed])
        if not spans and search.pending is None:
            search.keep_carries(new_carry, new_carry_pre)  # as in process_many
            continue
        exact_work.append((search, Filtered(scores, new_carry, new_carry_pre)))
        wanted += spans
    if not exact_work:
        return []
    if resolve is None:
        ensure = already_exact
    else:
        # Everything the exact decoding below will read, in one call.
        _resolve([decoder], {0: history.unresolved(wanted)}, resolve)
        ensure = history.on_demand(resolve, 0, 1)
    results: list[Detection] = []
    for search, filtered in exact_work:
        results.extend(search.process(history, first, ensure, filtered))
    results.sort(key=lambda d: (d.end, d.keyword))
    return results


def _nothing_said(decoder: KeywordDecoder, gathered: np.ndarray) -> bool:
    """No search of ``decoder`` has a pending detection and no character may reach its floor in
    these rows of gathered columns (blank first): every column but blank is below the lowest
    floor, and a character is one column, or the sum of a few (then all columns together are
    below it)."""
    for search in decoder.searches:
        if search.firing.pending is not None:
            return False
    if decoder.single_column_characters:
        return bool(gathered[:, 1:].max() < decoder.lowest_said_floor)
    return bool(gathered[:, 1:].sum(axis=1).max() < decoder.lowest_said_floor)

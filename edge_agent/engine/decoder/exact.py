"""Lazy exact posteriors: a stream's recent frames, exact or bounded, and the exact runs over them.

Normalising a posterior needs the network's whole output layer (2599 outputs), half of its
arithmetic. The decoder can work from cheap upper bounds instead (``process_many`` with a
:data:`Resolver`): on a frame where every keyword character's bound is below its floor, no
character can be matched there, and treating the gap penalty as zero only over-estimates the
recurrence, which is only a filter. So it asks the resolver for exact posteriors of (1) every
frame where some character's bound reaches its floor, and (2) every frame of the window of a
candidate match and of a pending detection. The exact re-scoring and the firing rule read
nothing else (:func:`require_exact` checks it), so the detections are those of a decoder given
exact posteriors everywhere (the tests compare the two on real recordings).

:class:`History` holds the frames and which of them are exact; :class:`ExactRuns` keeps a
keyword's recent exact runs, which later candidates and the pending detection extend instead of
redoing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edge_agent.engine.decoder.recurrence import KeywordScorer

#: Exact posteriors for the asked frames: per decoder, absolute frame numbers (maybe none) in,
#: (frames, len(columns)) posteriors out.
Resolver = Callable[[list[np.ndarray]], list[np.ndarray]]
#: Makes the history's frames [start, stop) exact (a no-op where they are).
Ensure = Callable[[int, int], None]


def already_exact(start: int, stop: int) -> None:
    """The :data:`Ensure` of a decoder given exact posteriors."""


def require_exact(exact: np.ndarray, what: str) -> None:
    if not exact.all():
        # A bug, not bad input: process_many resolves these rows before they are read.
        raise AssertionError(f"{what} holds frames whose posteriors were never resolved")


class History:
    """A decoder's recent frames: gathered posteriors (or bounds) and which rows are exact.

    The rows live in a buffer with room to spare: :meth:`append` writes a step's few rows in
    place, and the rows still held move to the front only when the room runs out, instead of
    two new arrays per stream at every step. The flags past the newest row are kept False, so
    that appending bounds (every step of a decoder with a resolver) writes no flag.
    """

    # Spare rows beyond what an append needs, when the buffer is (re)allocated.
    _SPARE_ROWS = 64

    __slots__ = ("_end", "_exact", "_first", "_start", "_values")

    def __init__(self, values: np.ndarray, exact: np.ndarray, first: int) -> None:
        """Rows ``values`` (rows, columns) float64 and their exactness (rows,) bool, row 0 being
        absolute frame ``first``; the history owns both arrays from now on."""
        self._values = values
        self._exact = exact
        self._start = 0  # buffer row of absolute frame ``first``
        self._end = values.shape[0]  # buffer row after the newest
        self._first = first

    @classmethod
    def empty(cls, columns: int, first: int) -> History:
        """No frames yet; the first one to come is absolute frame ``first``."""
        return cls(np.zeros((0, columns), dtype=np.float64), np.zeros(0, dtype=bool), first)

    @property
    def values(self) -> np.ndarray:
        """(rows, columns) float64, row 0 being frame :attr:`first` (a view)."""
        return self._values[self._start : self._end]

    @property
    def exact(self) -> np.ndarray:
        """(rows,) bool: which rows hold exact posteriors (a view)."""
        return self._exact[self._start : self._end]

    @property
    def first(self) -> int:
        """Absolute frame of the oldest row held."""
        return self._first

    @property
    def end(self) -> int:
        return self._first + self._end - self._start

    def rows(self, start: int, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Values and exactness of absolute frames [start, stop) (views, valid until the next
        :meth:`append`)."""
        offset = self._start - self._first
        low = start + offset
        high = self._end if stop is None else stop + offset
        return self._values[low:high], self._exact[low:high]

    def append(self, gathered: np.ndarray, exact: bool, keep: int) -> None:
        """Keep the last ``keep`` rows of this history, then add the new ``gathered`` rows (all
        exact or all bounds), in place."""
        count = gathered.shape[0]
        end = self._end
        if end - self._start > keep:
            self._first += end - keep - self._start
            self._start = end - keep
        if end + count <= self._values.shape[0]:  # room to spare: most steps
            self._values[end : end + count] = gathered
            if exact:
                self._exact[end : end + count] = True
            self._end = end + count
            return
        # Out of room: the rows held go to the front of a buffer sized for them, the new
        # rows and some spare (a new one if this one is too small).
        held = self._end - self._start
        needed = held + count
        if needed + self._SPARE_ROWS // 2 > self._values.shape[0]:
            values = np.empty((needed + self._SPARE_ROWS, self._values.shape[1]), dtype=np.float64)
            flags = np.zeros(needed + self._SPARE_ROWS, dtype=bool)
            flags[:held] = self._exact[self._start : self._end]
        else:
            values, flags = self._values, self._exact
            flags[:held] = self._exact[self._start : self._end]  # may overlap: numpy copies safely
            flags[held:] = False
        values[:held] = self._values[self._start : self._end]  # may overlap too
        self._values, self._exact, self._start, self._end = values, flags, 0, held
        values[held : held + count] = gathered
        flags[held : held + count] = exact
        self._end = held + count

    def extended(self, gathered: np.ndarray, exact: bool, keep: int) -> History:
        """A new history: the last ``keep`` rows of this one, then the new ``gathered`` rows (all
        exact or all bounds); this one is left as it is."""
        values = np.concatenate([self.values[-keep:], gathered])
        flags = np.concatenate([self.exact[-keep:], np.full(gathered.shape[0], exact)])
        return History(values, flags, self.end + gathered.shape[0] - values.shape[0])

    def unresolved(self, spans: list[tuple[int, int]]) -> np.ndarray:
        """Frames in any of the [start, stop) ``spans`` that are not exact yet, in order."""
        # The spans of one stream overlap (candidates a few frames apart share their window's
        # start): merged first, each merged span is read as a slice, with no mask to build.
        merged: list[list[int]] = []
        for start, stop in sorted(spans):
            start, stop = max(start, self._first), min(stop, self.end)
            if stop <= start:
                continue
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], stop)
            else:
                merged.append([start, stop])
        if not merged:
            return np.zeros(0, dtype=np.int64)
        offset = self._start - self._first
        exact = self._exact
        found = [np.flatnonzero(~exact[start + offset : stop + offset]) + start for start, stop in merged]
        return found[0] if len(found) == 1 else np.concatenate(found)

    def fill(self, frames: np.ndarray, posteriors: np.ndarray) -> None:
        """Store exact posteriors (gathered columns) for absolute ``frames``."""
        if frames.size == 0:
            return
        rows = frames + (self._start - self._first)
        self._values[rows] = posteriors
        self._exact[rows] = True

    def on_demand(self, resolve: Resolver, index: int, count: int) -> Ensure:
        """Resolution of these frames when asked, as decoder ``index`` of ``count`` in one
        ``resolve`` call."""
        empty = np.zeros(0, dtype=np.int64)

        def ensure(start: int, stop: int) -> None:
            _, exact = self.rows(start, stop)
            missing = np.flatnonzero(~exact) + start
            if missing.size:
                requests = [empty] * count
                requests[index] = missing
                self.fill(missing, np.asarray(resolve(requests)[index], dtype=np.float64))

        return ensure


@dataclass
class ExactRun:
    """The exact recurrence over frames [start, stop), with nothing carried in: per frame, the
    best match ending there, the back-pointers (frame offsets from ``start``), the terms it ran
    on (the characters' log posteriors, the gap penalties and the blank dips: reruns over the
    same frames with some characters dropped reuse them), the best partial match and the best
    one whose last character is there (``ends``), and the partial matches carried out of the
    last frame. Every candidate and
    pending match whose window begins at ``start`` reads it, so one run serves a whole cluster
    of candidate frames; exact frames never change, so a run is extended over new frames
    instead of being redone (a pending match reads one more chunk at every step)."""

    start: int
    stop: int
    scores: np.ndarray
    pointers: list[tuple[np.ndarray, ...]]
    log_q: np.ndarray
    gap: np.ndarray
    dips: np.ndarray
    prefix: np.ndarray
    ends: np.ndarray
    carry: np.ndarray
    carry_pre: np.ndarray


class ExactRuns:
    """One keyword's recent exact runs in one stream, by start.

    A candidate reads the run from its window's start, and, when a recent detection silences
    the matches beginning before its end, the run from that end too (``KeywordSearch._exact``):
    two runs in turn, frame after frame. Keeping only one would recompute each from scratch
    whenever the other was read. A run is a function of its start and of exact frames, which
    never change, so a run kept is always right; the least recently used goes first.
    """

    # Runs kept: the window's start, a detection's end or two, and the rivals' start.
    KEPT = 4

    def __init__(self, scorer: KeywordScorer) -> None:
        self.scorer = scorer
        # start -> run, the most recently used last
        self._runs: dict[int, ExactRun] = {}

    def reset(self) -> None:
        self._runs.clear()

    def drop_before(self, frame: int) -> None:
        """Forget the runs that start before ``frame``: no match read from now on begins there."""
        for start in [start for start in self._runs if start < frame]:
            del self._runs[start]

    def _run_from(self, start: int) -> ExactRun | None:
        """The run kept from ``start`` with at least one frame, marked as the latest used."""
        run = self._runs.pop(start, None)
        if run is None or run.stop <= start:
            return None
        self._runs[start] = run
        return run

    def start_between(self, low: int, high: int) -> int | None:
        """The start of a run kept that lies between ``low`` and ``high`` (a run from there reads
        frames already exact), the most recently used first; else None."""
        for start in reversed(self._runs):
            if low <= start <= high and self._runs[start].stop > start:
                return start
        return None

    def resume_point(self, start: int) -> int:
        """Where a run from ``start`` is to be computed from: where the run kept from ``start``
        stops, else ``start`` itself."""
        run = self._runs.get(start)
        return run.stop if run is not None and run.stop > start else start

    def covering(self, history: History, start: int, stop: int, ensure: Ensure) -> ExactRun:
        """The exact run from ``start`` to at least ``stop`` (or the end of the history),
        resolving its frames with ``ensure`` first."""
        stop = min(history.end, stop)
        run = self._run_from(start)
        if run is not None and run.stop >= stop:
            return run
        begin = start if run is None else run.stop
        ensure(begin, stop)
        values, exact = history.rows(begin, stop)
        require_exact(exact, "a candidate's window")
        terms = self.scorer.terms(values[None])
        carry, carry_pre = self.carries(start, begin)
        scores, carry, carry_pre, pointers, prefix, ends = self.scorer.run(
            terms, carry[None], carry_pre[None], backtrace=True
        )
        pieces = [tuple(a[0] for a in entry) for entry in pointers]
        log_q, gap, dips = (a[0] for a in terms)
        return self.store(
            start,
            ExactRun(
                begin, stop, scores[0], pieces, log_q, gap, dips, prefix[0], ends[0], carry[0], carry_pre[0]
            ),
        )

    def carries(self, start: int, begin: int) -> tuple[np.ndarray, np.ndarray]:
        """What a run from ``start`` carries into frame ``begin``: nothing at its start, the
        partial matches of the run kept from ``start`` when it is extended."""
        if begin == start:
            return self.scorer.no_match_shared, self.scorer.no_match_shared
        run = self._runs.get(start)
        assert run is not None and run.stop == begin
        return run.carry, run.carry_pre

    def store(self, start: int, piece: ExactRun) -> ExactRun:
        """Keep the run from ``start`` to the end of ``piece``, a run just computed from the
        :meth:`carries` into its own start: the whole run if it starts at ``start``, else the
        continuation of the run kept from ``start``."""
        if piece.start == start:
            return self._keep(piece)
        run = self._runs.get(start)
        assert run is not None and run.stop == piece.start
        # A pointer of -1 is "the carried partial match": the one the run's last frame points
        # to. Others count from this piece's first frame.
        offset = piece.start - start
        pointers = [
            tuple(
                np.concatenate([old, np.where(new < 0, old[-1], new + offset)])
                for old, new in zip(old_entry, new_entry, strict=True)
            )
            for old_entry, new_entry in zip(run.pointers, piece.pointers, strict=True)
        ]
        return self._keep(
            ExactRun(
                start,
                piece.stop,
                np.concatenate([run.scores, piece.scores]),
                pointers,
                np.concatenate([run.log_q, piece.log_q]),
                np.concatenate([run.gap, piece.gap]),
                np.concatenate([run.dips, piece.dips]),
                np.concatenate([run.prefix, piece.prefix]),
                np.concatenate([run.ends, piece.ends]),
                piece.carry,
                piece.carry_pre,
            )
        )

    def _keep(self, run: ExactRun) -> ExactRun:
        runs = self._runs
        runs.pop(run.start, None)
        runs[run.start] = run
        if len(runs) > self.KEPT:
            del runs[next(iter(runs))]
        return run

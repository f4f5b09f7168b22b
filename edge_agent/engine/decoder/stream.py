"""The decoder of one stream: its keywords, its recent frames, and the public surface.

:class:`KeywordDecoder` is what the rest of the engine holds per stream. It gathers the
posterior columns its keywords read, keeps the recent frames (``exact.History``) and one
``search.KeywordSearch`` per keyword, and decodes through ``batch.process_many``, even for a
single stream: one path, whatever the number of streams.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from edge_agent.engine.decoder.batch import process_many
from edge_agent.engine.decoder.exact import History
from edge_agent.engine.decoder.keywords import CompiledKeyword, Detection
from edge_agent.engine.decoder.search import KeywordSearch
from edge_agent.engine.decoder.settings import (
    DEFAULT_GAP_TOLERANCE,
    DEFAULT_HOLD_SECONDS,
    DEFAULT_PAUSE_SECONDS,
    DEFAULT_REFRACTORY_SECONDS,
    DEFAULT_SETTLE_RATIO,
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
        self._searches = tuple(
            KeywordSearch(
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
        )
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
        self._group = _group_of(self._signature)
        #: the lowest bound a character must reach to be said (``KeywordSearch.said_floor``) and
        #: whether every character is one column: a chunk with no column above it is quiet
        self.lowest_said_floor = min(s.said_floor for s in self._searches)
        self.single_column_characters = all(s.scorer.single_columns is not None for s in self._searches)
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
    def idle(self) -> bool:
        """No detection pending and no partial match that could still reach its threshold: no
        keyword is under way in the frames decoded so far."""
        # A loop, not all() over a generator: the batched step asks every stream at every step.
        for search in self._searches:  # noqa: SIM110
            if search.alive or search.firing.pending is not None:
                return False
        return True

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

    # --- for process_many ------------------------------------------------------------------
    @property
    def searches(self) -> tuple[KeywordSearch, ...]:
        """One search per keyword, in the keywords' order."""
        return self._searches

    @property
    def history(self) -> History:
        """The frames the searches may still read: the last chunk and what came before it."""
        return self._history

    def append(self, posteriors: np.ndarray, exact: bool) -> int:
        """Add new frames (exact posteriors, or upper bounds) to the history; returns the
        absolute frame of the first.

        The history keeps ``history_frames`` rows from before this call and every new row, so
        that a long chunk is decoded whole."""
        if posteriors.shape[1] != self.columns.shape[0]:
            posteriors = posteriors[:, self.columns]
        gathered = posteriors if posteriors.dtype == np.float64 else posteriors.astype(np.float64)
        first_frame = self._frames_seen
        self._frames_seen = first_frame + gathered.shape[0]
        self._history.append(gathered, exact, self.history_frames)
        return first_frame

    @property
    def history_first(self) -> int:
        """Absolute frame of the oldest row the decoder keeps (it may ask to resolve it)."""
        return self._history.first

    @property
    def signature(self) -> tuple[object, ...]:
        """Decoders with equal signatures can share one vectorised recurrence."""
        return self._signature

    @property
    def group(self) -> int:
        """A number for :attr:`signature`, equal for equal signatures: what the batched step
        groups streams by, without hashing a signature (its keywords and settings) per stream
        and step."""
        return self._group


# Every signature seen, and its number. A number is never reused (``next`` on a count is atomic,
# decoders may be made on several threads); the table grows by one small entry per keyword
# configuration.
_GROUPS: dict[tuple[object, ...], int] = {}
_GROUP_NUMBERS = itertools.count()


def _group_of(signature: tuple[object, ...]) -> int:
    found = _GROUPS.get(signature)
    return _GROUPS.setdefault(signature, next(_GROUP_NUMBERS)) if found is None else found

"""The detector's own bookkeeping: the hidden rows it keeps for exact re-scoring."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.engine.detector import _HiddenRows


def test_hidden_rows_hold_what_the_decoder_may_ask_for_whatever_the_chunk_sizes() -> None:
    """Against the plain definition: after each append, the last ``keep`` rows from before plus
    the new ones, by absolute frame; chunks from 1 row (streaming) to 500 (whole files), with
    the buffer's moves and growth in between."""
    rng = np.random.default_rng(5)
    held = _HiddenRows(3)
    reference = np.zeros((0, 3), dtype=np.float32)
    first = 0  # absolute frame of reference[0]
    frame = 0
    for _ in range(400):
        count = int(rng.choice([0, 1, 3, 4, 33, 500]))
        keep = int(rng.choice([0, 5, 103, 400]))
        rows = rng.standard_normal((count, 3)).astype(np.float32)
        rows[:, 0] = np.arange(frame, frame + count)  # each row names its frame
        frame += count
        source = rows.copy()
        held.append(rows, keep)
        rows[:] = -1.0  # the batch's matrix is reused: what was appended must be a copy
        if count:
            old = reference[-keep:] if keep else reference[:0]
            first += reference.shape[0] - old.shape[0]
            reference = np.concatenate([old, source])
        frames = np.arange(first, first + reference.shape[0])
        np.testing.assert_array_equal(held.rows(frames), reference)
        if first > 0:
            with pytest.raises(IndexError):
                held.rows(np.array([first - 1]))
        with pytest.raises(IndexError):
            held.rows(np.array([first + reference.shape[0]]))

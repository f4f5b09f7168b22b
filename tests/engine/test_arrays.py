"""The strided views the front-end and the network read sliding windows through."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.engine.arrays import sliding_view


def test_a_sliding_view_is_what_as_strided_gives_and_read_only() -> None:
    signal = np.arange(40, dtype=np.float32).reshape(10, 4)
    row, column = signal.strides
    view = sliding_view(signal, (8, 3, 4), (row, row, column))
    expected = np.lib.stride_tricks.sliding_window_view(signal, 3, axis=0).transpose(0, 2, 1)
    np.testing.assert_array_equal(view, expected)
    with pytest.raises(ValueError):
        view[0, 0, 0] = 1.0  # read only: rows overlap
    part = signal[2:]  # a contiguous slice: windows start at its first row
    np.testing.assert_array_equal(sliding_view(part, (2, 4), (row, column)), signal[2:4])


def test_a_view_past_the_end_or_of_a_non_contiguous_array_is_refused() -> None:
    signal = np.zeros((10, 4), dtype=np.float32)
    row, column = signal.strides
    with pytest.raises(ValueError):
        sliding_view(signal, (9, 3, 4), (row, row, column))  # the last window would end at row 11
    with pytest.raises(ValueError, match="C-contiguous"):
        sliding_view(signal[:, :2], (2, 2), (row, column))

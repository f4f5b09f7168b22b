"""A stream's clock: stream time maps to the wall time its audio arrived, over the marks it keeps."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.agent.streams import StreamState
from edge_agent.engine.model import KeywordSpec

CHUNK = 1600  # 100 ms at 16 kHz


@pytest.fixture
def stream(numpy_model) -> StreamState:  # type: ignore[no-untyped-def]
    return StreamState("s", "mqtt", numpy_model.detector([KeywordSpec("小云小云")]), None)


def test_stream_time_maps_to_the_arrival_of_the_chunk_that_held_it(stream: StreamState) -> None:
    """Chunk k arrived at 1000 + k (its last sample): a sample is as old as the samples after
    it in its chunk, and a time past the last chunk runs on from it."""
    for k in range(5):
        stream.append(np.zeros(CHUNK, np.float32), 1000.0 + k)
    assert stream.wall_time(0.1) == pytest.approx(1000.0)  # the end of chunk 0
    assert stream.wall_time(0.15) == pytest.approx(1001.0 - 0.05)  # inside chunk 1
    assert stream.wall_time(0.5) == pytest.approx(1004.0)
    assert stream.wall_time(0.6) == pytest.approx(1004.1)  # past the last chunk


def test_the_clock_keeps_the_latest_marks_when_it_wraps_and_starts_afresh_on_restart(
    stream: StreamState,
) -> None:
    for k in range(1000):  # far more chunks than marks kept
        stream.append(np.zeros(CHUNK, np.float32), 2000.0 + k)
    assert stream.wall_time(99.95) == pytest.approx(2999.0 - 0.05)  # the last chunk
    assert stream.wall_time(90.0) == pytest.approx(2899.0)  # 10 s back: still held
    # Older than every mark kept: counted back from the oldest one held.
    oldest = 1000 - 256
    assert stream.wall_time(1.0) == pytest.approx(2000.0 + oldest - (oldest + 1 - 10) * 0.1)
    stream.restart(None)
    stream.append(np.zeros(CHUNK, np.float32), 5000.0)
    assert stream.wall_time(0.05) == pytest.approx(4999.95)

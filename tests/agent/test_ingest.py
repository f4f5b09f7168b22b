"""The one way in: the limits every input shares, applied and reported before the worker."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from edge_agent.agent.errors import ErrorReporter, Refusal
from edge_agent.agent.ingest import Ingest
from edge_agent.agent.items import AudioChunk, PcmChunk, StreamEnd, StreamStart, WavChunk
from edge_agent.agent.limits import AudioRateLimiter
from edge_agent.agent.worker import WorkQueue

ONE_SECOND = bytes(32000)


def ingest(max_bytes: int = 10**9, factor: float = 2.0) -> tuple[Ingest, WorkQueue, list[Refusal]]:
    refusals: list[Refusal] = []
    queue = WorkQueue(max_bytes)
    return Ingest(queue, ErrorReporter(refusals.append), factor), queue, refusals


def test_network_streams_are_rate_limited_local_ones_not() -> None:
    entry, queue, refusals = ingest(factor=2.0)
    results = [entry.submit(PcmChunk("hasty", "mqtt", ONE_SECOND, None, 0.0, "t")) for _ in range(8)]
    assert results == [True] * 5 + [False] * 3  # the 5 s burst allowance, then refused
    assert [(r.code, r.stream) for r in refusals] == [("rate_limited", "hasty")]  # once per cause
    frame = WavChunk("hermes-a", "hermes", b"RIFF", 6.0, 0.0, "t")
    assert not entry.submit(frame)  # a WAV frame counts its own seconds
    local = AudioChunk("mic", "file", np.zeros(16000 * 8, np.float32), 0.0)
    assert entry.submit(local) and len(queue) == 6


def test_a_full_queue_drops_the_oldest_waiting_audio_counts_it_per_stream_never_controls() -> None:
    second = PcmChunk("a", "mqtt", ONE_SECOND, None, 0.0, "t/a")
    entry, queue, refusals = ingest(max_bytes=second.nbytes + 1000, factor=0)
    assert entry.submit(PcmChunk("a", "mqtt", ONE_SECOND, None, 1.0, "t/a"))
    newer = PcmChunk("a", "mqtt", ONE_SECOND, None, 2.0, "t/a")
    assert entry.submit(newer)  # the older chunk made room, counted and reported
    assert entry.dropped("a") == 1 and queue.take(0) == [newer]
    # What the worker took is being scored: it cannot make room, so new audio is refused.
    assert not entry.submit(PcmChunk("a", "mqtt", ONE_SECOND, None, 3.0, "t/a"))
    assert not entry.submit(AudioChunk("mic", "microphone", np.zeros(16000, np.float32), 0.0))
    assert entry.submit(StreamStart("b", "mqtt", None, "t/b")) and entry.submit(StreamEnd("a", "mqtt", "t/a"))
    assert entry.dropped("a") == 2 and entry.dropped("mic") == 1
    # A local source counts the chunk it could not hand over itself: no error message for it.
    assert [(r.code, r.stream) for r in refusals] == [("queue_full", "a")]
    entry.forget("a")
    assert entry.dropped("a") == 0


def test_controls_before_the_dropped_audio_keep_their_place_and_order() -> None:
    """Room is made from the front: the controls met on the way stay first, in their order,
    and the audio behind them waits as it was."""
    chunk = PcmChunk("a", "mqtt", ONE_SECOND, None, 0.0, "t/a")
    queue = WorkQueue(max_bytes=3 * chunk.nbytes)
    start_b, end_b = StreamStart("b", "mqtt", None, "t/b"), StreamEnd("b", "mqtt", "t/b")
    first, second, third, fourth = (replace(chunk, received_at=float(t)) for t in range(4))
    for item in (first, start_b, second, end_b, third):
        assert queue.put(item)
    assert queue.put(fourth)  # the oldest audio (first) makes room
    assert queue.take(0) == [start_b, second, end_b, third, fourth]


def test_the_rate_limiter_remembers_boundedly_many_streams() -> None:
    limiter = AudioRateLimiter(max_buckets=100)
    for index in range(10_000):
        assert limiter.allow(f"e{index}", 0.1, 2.0)
    assert len(limiter) == 100

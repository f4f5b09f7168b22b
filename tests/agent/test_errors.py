"""The error reporter: exact counts, reports limited per cause and overall, bounded memory."""

from __future__ import annotations

import threading

from edge_agent.agent.errors import (
    ERROR_BURST,
    ERROR_INTERVAL_SECONDS,
    ERRORS_PER_SECOND,
    MAX_REMEMBERED_CAUSES,
    ErrorReporter,
    Refusal,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def reporter() -> tuple[ErrorReporter, list[Refusal], Clock]:
    published: list[Refusal] = []
    clock = Clock()
    return ErrorReporter(published.append, clock=clock), published, clock


def test_a_burst_of_one_cause_is_one_report_then_one_carrying_the_count() -> None:
    errors, published, clock = reporter()
    for _ in range(50):
        errors.report("bad_audio_chunk", "empty audio payload", topic="p/d/audio/noisy")
    assert len(published) == 1 and published[0].suppressed == 0
    clock.now += ERROR_INTERVAL_SECONDS
    errors.report("bad_audio_chunk", "empty audio payload", topic="p/d/audio/noisy")
    assert len(published) == 2 and published[1].suppressed == 49
    assert errors.count("bad_audio_chunk") == 51 == errors.counts()["bad_audio_chunk"]


def test_causes_are_code_and_topic_or_stream() -> None:
    errors, published, _ = reporter()
    errors.report("bad_payload", "x", topic="a")
    errors.report("bad_payload", "x", topic="b")
    errors.report("rate_limited", "x", topic="a")
    errors.report("queue_full", "x", stream="s1")
    errors.report("queue_full", "x", stream="s1")
    assert [(r.code, r.topic, r.stream) for r in published] == [
        ("bad_payload", "a", None),
        ("bad_payload", "b", None),
        ("rate_limited", "a", None),
        ("queue_full", None, "s1"),
    ]


def test_many_distinct_causes_are_limited_overall_and_all_counted() -> None:
    """A flood on distinct topics cannot become a flood of error messages."""
    errors, published, clock = reporter()
    for index in range(100_000):
        errors.report("bad_audio_chunk", "empty audio payload", topic=f"p/d/audio/e{index}")
    assert len(published) == ERROR_BURST
    assert errors.count("bad_audio_chunk") == 100_000
    assert errors.suppressed_total == 100_000 - ERROR_BURST
    clock.now += 1.0  # the budget refills at its rate
    for index in range(100):
        errors.report("bad_audio_chunk", "empty audio payload", topic=f"p/d/audio/f{index}")
    assert len(published) == ERROR_BURST + int(ERRORS_PER_SECOND)


def test_the_memory_of_causes_is_bounded() -> None:
    errors, _, clock = reporter()
    for index in range(3 * MAX_REMEMBERED_CAUSES):
        clock.now += 1.0  # every one reported (budget and interval allow it)
        errors.report("bad_payload", "x", topic=f"t{index}")
    assert len(errors._causes) == MAX_REMEMBERED_CAUSES


def test_a_failing_publisher_never_fails_the_caller() -> None:
    def publish(refusal: Refusal) -> None:
        raise OSError("the link broke")

    errors = ErrorReporter(publish)
    errors.report("bad_payload", "x")  # logged, not raised
    assert errors.count("bad_payload") == 1


def test_counts_are_exact_under_many_threads() -> None:
    errors, _, _ = reporter()
    start = threading.Barrier(8)

    def hammer(thread: int) -> None:
        start.wait()
        for index in range(5_000):
            errors.report(f"code{index % 3}", "x", topic=f"t{thread}-{index % 50}")

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    counts = errors.counts()
    assert sum(counts.values()) == 8 * 5_000
    assert counts == {"code0": 8 * 1667, "code1": 8 * 1667, "code2": 8 * 1666}

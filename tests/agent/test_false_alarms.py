"""False-alarm telemetry: near misses from the detector, the hour's window, and health over MQTT."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.agent.false_alarms import FalseAlarmWindow
from edge_agent.audio.wav import read_wav, to_mono_16k
from edge_agent.engine.detector import NEAR_MISS_SHARE
from edge_agent.engine.model import KeywordSpec
from edge_agent.mqtt.messages import HealthReport
from tests.agent.streaming import pcm16, stream_files
from tests.support import agent_config

PREFIX = "edge_agent/dev1"
CHUNK = 1600  # 100 ms, as audio arrives from a device


def streamed(detector, samples):  # type: ignore[no-untyped-def]
    found = []
    for offset in range(0, samples.shape[0], CHUNK):
        found += detector.feed(samples[offset : offset + CHUNK])
    return found + detector.finish()


def test_near_misses_are_matches_below_the_threshold_and_change_no_detection(
    numpy_model, dev_audio: Path
) -> None:  # type: ignore[no-untyped-def]
    files = sorted(dev_audio.glob("pos/*.wav"))[:4]
    for path in files:
        samples = to_mono_16k(read_wav(path))
        for threshold in (0.05, 0.99):
            plain = numpy_model.detector([KeywordSpec("小云小云", threshold=threshold)])
            watched = numpy_model.detector([KeywordSpec("小云小云", threshold=threshold)])
            assert watched.take_near_misses() == {}  # starts the near-miss decoding
            expected = [(d.keyword, d.confidence, d.start, d.end) for d in streamed(plain, samples)]
            got = [(d.keyword, d.confidence, d.start, d.end) for d in streamed(watched, samples)]
            assert got == expected, path.name
            near = watched.take_near_misses()
            if expected:
                assert near == {}, path.name  # the keyword was heard: no near miss
            else:
                # Missed at 0.99: the positive's score is its near miss.
                assert NEAR_MISS_SHARE * threshold <= near["小云小云"] < threshold, path.name
            assert watched.take_near_misses() == {}  # taken: forgotten
    assert plain.take_near_misses() == {}  # a detector nobody asked decodes no near misses


def test_the_window_keeps_an_hour_in_minutes() -> None:
    now = [1000.0]
    window = FalseAlarmWindow(clock=lambda: now[0])
    window.note(3, {"小云小云": 0.02})
    now[0] += 30 * 60
    window.note(1, {"小云小云": 0.01, "如家酒店": 0.3})
    assert window.detections_per_hour() == pytest.approx(8.0)  # 4 in half an hour
    assert window.near_misses() == {"如家酒店": 0.3, "小云小云": 0.02}
    now[0] += 45 * 60  # the first minute is more than an hour old
    assert window.detections_per_hour() == pytest.approx(1.0)
    assert window.near_misses() == {"如家酒店": 0.3, "小云小云": 0.01}
    now[0] += 3600
    assert window.detections_per_hour() == 0.0 and window.near_misses() == {}


def test_health_carries_detections_per_hour_and_near_misses(
    broker, make_agent, client, tmp_path: Path, dev_audio: Path
) -> None:  # type: ignore[no-untyped-def]
    """Three positives at threshold 0.95: the first is detected, the other two are near misses."""
    make_agent(
        agent_config(
            broker.port,
            tmp_path,
            keywords=[{"text": "小云小云", "threshold": 0.95}],
            engine={"near_misses": True},
        )
    )
    client.subscribe(f"{PREFIX}/#")
    client.wait_for(f"{PREFIX}/health")
    files = sorted(dev_audio.glob("pos/*.wav"))[:3]  # scores 0.997, 0.934, 0.922 (shared/README)
    stream_files(client, {path.stem[-20:]: pcm16(path) for path in files})
    client.wait_for(f"{PREFIX}/detection")

    def telemetry_in(messages) -> bool:  # type: ignore[no-untyped-def]
        if not messages:
            return False
        health = HealthReport.from_payload(messages[-1].payload)
        return bool(health.near_miss) and (health.detections_per_hour or 0) > 0

    health = HealthReport.from_payload(client.wait_for(f"{PREFIX}/health", telemetry_in)[-1].payload)
    assert 0.95 * NEAR_MISS_SHARE <= health.near_miss["小云小云"] < 0.95
    assert health.detections_per_hour == pytest.approx(60.0)  # one in its first minute: 60 an hour


def test_near_misses_can_be_switched_off_live(numpy_model, dev_audio: Path) -> None:  # type: ignore[no-untyped-def]
    from edge_agent.agent.live_config import engine_settings
    from edge_agent.config import load_config, merge_update

    config = merge_update(load_config(None), {"engine": {"near_misses": True}})
    assert engine_settings(config, []).near_misses is True
    assert engine_settings(load_config(None), []).near_misses is False  # off by default

    samples = to_mono_16k(read_wav(sorted(dev_audio.glob("pos/*.wav"))[1]))  # scores 0.934
    detector = numpy_model.detector([KeywordSpec("小云小云", threshold=0.99)])
    detector.take_near_misses()
    streamed(detector, samples[: samples.shape[0] // 2])
    detector.stop_near_misses()  # what the worker does when engine.near_misses turns off
    streamed(detector, samples)
    assert detector.take_near_misses() == {}  # this call starts the pass again, from now on
    streamed(detector, samples)
    assert "小云小云" in detector.take_near_misses()

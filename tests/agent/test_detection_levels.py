"""Every detection carries its keyword's level: MQTT events, measured on the live stream."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.keywords import decoder_settings_from
from edge_agent.mqtt.messages import DetectionEvent
from edge_agent.recording import detect_recording
from tests.agent.streaming import pcm16, stream_files
from tests.support import agent_config

PREFIX = "edge_agent/dev1"


def scaled(pcm: bytes, factor: float) -> bytes:
    samples = np.frombuffer(pcm, "<i2").astype(np.float64) * factor
    return np.clip(np.round(samples), -32768, 32767).astype("<i2").tobytes()


def test_live_detections_carry_the_level_a_whole_file_gives(  # type: ignore[no-untyped-def]
    broker, make_agent, client, tmp_path: Path, example_wav: Path
) -> None:
    config = agent_config(broker.port, tmp_path)
    agent = make_agent(config)
    client.subscribe(f"{PREFIX}/detection")
    pcm = pcm16(example_wav)
    streams = {"near": pcm, "far": scaled(pcm, 0.25)}
    stream_files(client, streams)
    messages = client.wait_for(f"{PREFIX}/detection", lambda m: len(m) >= 2, timeout=30)
    events = {e.stream: e for e in (DetectionEvent.from_payload(m.payload) for m in messages)}
    assert set(events) == {"near", "far"}
    near, far = events["near"], events["far"]
    assert near.level_dbfs is not None and far.level_dbfs is not None
    assert near.level_dbfs - far.level_dbfs == pytest.approx(12.0, abs=0.3)  # 0.25 is -12 dB
    assert near.snr_db == pytest.approx(far.snr_db, abs=1.0)  # the background scaled too
    # The same numbers as the whole-file path (HTTP /detect, `edge-agent detect`) gives.
    keywords, settings = agent.worker.keywords, decoder_settings_from(config)
    for name, event in events.items():
        samples = np.frombuffer(streams[name], "<i2").astype(np.float32)
        result = detect_recording(agent.model, keywords, settings, samples, chunk_samples=1600)
        (level,) = result.levels
        assert level is not None
        assert (event.level_dbfs, event.snr_db) == (level.level_dbfs, level.snr_db)

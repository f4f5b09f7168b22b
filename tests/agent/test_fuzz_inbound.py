"""Fuzzing every inbound path: whatever arrives on a subscribed topic, nothing escapes.

The handlers are the real ones of a real agent (its worker running, its MQTT client created but
never connected: what it would publish is queued, not sent). Afterwards the worker must still be
alive with no internal errors: bad input is refused and reported, never a crash.
"""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.audio.pcm import AudioFormatError, PcmFormat
from edge_agent.audio.wav import WavError, encode_wav, parse_wav
from edge_agent.mqtt.messages import (
    AudioControl,
    DetectionEvent,
    DetectResponse,
    DeviceInfo,
    ErrorReport,
    HealthReport,
    PayloadError,
    Topic,
)
from edge_agent.mqtt.transport import InboundMessage
from tests.broker import free_port
from tests.support import agent_config

PREFIX = "edge_agent/dev1"
FUZZ = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

stream_names = st.text(alphabet=st.characters(blacklist_characters="/+#\x00"), min_size=1, max_size=20)
payloads = st.one_of(
    st.binary(max_size=4000),
    st.binary(max_size=200).map(lambda b: b"RIFF" + b),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=10,
    ).map(lambda value: json.dumps(value).encode()),
)
properties = st.dictionaries(
    st.sampled_from(["rate", "channels", "width", "other"]),
    st.one_of(st.integers(-5, 400_000).map(str), st.text(max_size=6)),
    max_size=3,
)


@pytest.fixture(scope="module")
def fuzz_agent(numpy_model, tmp_path_factory):  # type: ignore[no-untyped-def]
    from edge_agent.agent.app import Agent
    from edge_agent.cli.common import compile_keywords
    from edge_agent.keywords import decoder_settings_from

    folder: Path = tmp_path_factory.mktemp("fuzz")
    config = agent_config(free_port(), folder, mqtt={"max_payload_bytes": 3000})
    agent = Agent(config, numpy_model, compile_keywords(numpy_model, config), decoder_settings_from(config))
    agent.worker.start()
    yield agent
    assert agent.worker.drain(120), f"worker still busy: {agent.worker.queue_depth} items queued"
    assert agent.worker.alive, agent.worker.last_error
    assert agent.worker.stats.item_errors == 0, agent.worker.last_error
    agent.worker.stop()
    assert agent.outbox is not None
    agent.outbox.close()


@FUZZ
@given(stream=stream_names, payload=payloads, props=properties)
def test_audio_topic(fuzz_agent, stream: str, payload: bytes, props: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    fuzz_agent._on_audio(InboundMessage(f"{PREFIX}/audio/{stream}", payload, 0, False, props))


@FUZZ
@given(stream=stream_names, payload=payloads)
def test_control_topic(fuzz_agent, stream: str, payload: bytes) -> None:  # type: ignore[no-untyped-def]
    fuzz_agent._on_control(InboundMessage(f"{PREFIX}/audio/{stream}/control", payload, 1, False))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    request_id=stream_names,
    payload=payloads,
    mutation=st.binary(min_size=1, max_size=8),
    at=st.integers(0, 60),
)
def test_detect_request_topic(fuzz_agent, request_id: str, payload: bytes, mutation: bytes, at: int) -> None:  # type: ignore[no-untyped-def]
    wav = bytearray(encode_wav([0.0] * 800))
    wav[at : at + len(mutation)] = mutation  # a WAV with a damaged header
    for body in (payload, bytes(wav)):
        fuzz_agent._on_detect_request(InboundMessage(f"{PREFIX}/detect/request/{request_id}", body, 1, False))
        fuzz_agent._on_detect_request(
            InboundMessage(
                f"{PREFIX}/detect/request", body, 1, False, response_topic="r/x", correlation_data=b"1"
            )
        )


@FUZZ
@given(payload=payloads)
def test_json_message_parsers(payload: bytes) -> None:
    for kind in (AudioControl, DetectionEvent, DeviceInfo, HealthReport, ErrorReport, DetectResponse):
        with contextlib.suppress(PayloadError):
            kind.from_payload(payload)


@FUZZ
@given(props=properties)
def test_format_properties(props: dict[str, str]) -> None:
    with contextlib.suppress(AudioFormatError):
        PcmFormat.from_properties(props)


@FUZZ
@given(topic=st.text(max_size=60))
def test_topic_matching(topic: str) -> None:
    for template in ("{prefix}/{device}/audio/{stream}", "{prefix}/{device}/detect/request/{request_id}"):
        parts = Topic(template).match(topic)
        assert parts is None or Topic(template).format(**parts) == topic


@FUZZ
@given(
    data=st.binary(max_size=600),
    fmt=st.sampled_from([1, 3, 0xFFFE, 7]),
    bits=st.sampled_from([8, 16, 24, 32, 0]),
)
def test_wav_parser_with_plausible_headers(data: bytes, fmt: int, bits: int) -> None:
    header = b"fmt " + struct.pack("<IHHIIHH", 16, fmt, 1, 16000, 32000, max(1, bits // 8), bits)
    blob = b"RIFF" + struct.pack("<I", 4 + len(header) + 8 + len(data)) + b"WAVE" + header
    blob += b"data" + struct.pack("<I", len(data)) + data
    with contextlib.suppress(WavError):
        parse_wav(blob)

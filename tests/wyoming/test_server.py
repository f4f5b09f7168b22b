"""The Wyoming server against the ``wyoming`` package's own client classes, on the real model.

Every test runs a real agent (the engine worker, the detection sink) with the server on a free
port and no mDNS; clients are ``wyoming.client.AsyncTcpClient`` or, for malformed input, a raw
socket writing with the package's own ``async_write_event``. Waits are on events (the server's
answers, a closed connection, the agent announcing a stream's end), never on time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from pathlib import Path

import pytest
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event, async_write_event
from wyoming.info import Describe, Info
from wyoming.ping import Ping
from wyoming.wake import Detect, Detection

from edge_agent.wyoming.server import WyomingServer, WyomingServerError
from tests.agent.streaming import pcm16
from tests.fleet.helpers import command
from tests.support import agent_config
from tests.wyoming.clients import (
    HOST,
    chunks,
    describe,
    detect,
    read_all,
    run,
    send_audio,
    to_48k_stereo,
    types,
)
from tests.wyoming.helpers import KEYWORD, wyoming_agent


@pytest.fixture()
def positive(dev_audio: Path) -> bytes:
    return pcm16(sorted(dev_audio.glob("pos/*.wav"))[0])


@pytest.fixture()
def negative(dev_audio: Path) -> bytes:
    return pcm16(sorted(dev_audio.glob("neg/*.wav"))[0])


# --- describe ------------------------------------------------------------------------------------


def test_describe_answers_one_wake_program_with_the_keywords_as_models(  # type: ignore[no-untyped-def]
    make_agent,
    tmp_path: Path,
) -> None:
    _agent, server, _ = wyoming_agent(make_agent, tmp_path, name="kitchen-wake")
    info = run(describe(server.port))
    assert info.asr == [] and info.tts == [] and len(info.wake) == 1
    (program,) = info.wake
    assert program.name == "kitchen-wake"
    assert program.installed is True and program.description and program.version
    assert program.attribution.url == "https://modelscope.cn/models/damo/speech_charctc_kws_phone-xiaoyun"
    assert "ModelScope" in program.attribution.name
    (model,) = program.models
    assert model.name == KEYWORD and model.phrase == KEYWORD
    assert model.languages == ["zh"] and model.installed is True
    assert model.attribution == program.attribution
    assert "0.05" in (model.description or "")


def test_ping_gets_pong_and_describe_is_answered_on_the_same_connection(  # type: ignore[no-untyped-def]
    make_agent,
    tmp_path: Path,
) -> None:
    _, server, _ = wyoming_agent(make_agent, tmp_path)

    async def session() -> list[str]:
        async with AsyncTcpClient(HOST, server.port) as client:
            await client.write_event(Ping(text="hi").event())
            pong = await client.read_event()
            await client.write_event(Describe().event())
            info = await client.read_event()
            assert pong is not None and info is not None
            assert pong.data["text"] == "hi"
            return [pong.type, info.type]

    assert run(session()) == ["pong", "info"]


# --- detection -----------------------------------------------------------------------------------


# auto: uvloop where installed (the wyoming extra); asyncio: Python's own loop, which serves the same.
@pytest.mark.parametrize(
    ("batch_ms", "event_loop"),
    [(100, "auto"), (0, "auto"), (100, "asyncio")],
    ids=["on-ticks", "each-chunk", "on-ticks-asyncio"],
)
def test_positive_in_1024_sample_chunks_gives_exactly_one_detection(
    make_agent, tmp_path: Path, positive: bytes, batch_ms: int, event_loop: str
) -> None:  # type: ignore[no-untyped-def]
    _agent, server, events = wyoming_agent(make_agent, tmp_path, batch_ms=batch_ms, event_loop=event_loop)
    answers = run(detect(server.port, positive, names=[KEYWORD]))
    assert types(answers) == ["detection"]  # then the server closed the connection
    detection = Detection.from_event(answers[0])
    assert detection.name == KEYWORD
    # The keyword's end, in the client's own chunk timestamps (ms from its first chunk).
    (event,) = events.detections
    assert detection.timestamp == round(event.end * 1000)
    assert 0 < detection.timestamp <= len(positive) * 1000 // 32000
    assert event.stream.startswith("wyoming-127_0_0_1-")


@pytest.mark.parametrize("event_loop", ["auto", "asyncio"])
def test_a_recording_in_one_chunk_larger_than_the_reader_reads_ahead_is_detected(
    make_agent, tmp_path: Path, positive: bytes, event_loop: str
) -> None:  # type: ignore[no-untyped-def]
    assert len(positive) > 128 * 1024  # reading pauses beyond that, and resumes for the rest
    _, server, _ = wyoming_agent(make_agent, tmp_path, event_loop=event_loop)
    answers = run(detect(server.port, positive, names=[KEYWORD], chunk_samples=len(positive) // 2))
    assert types(answers) == ["detection"]


def test_negative_gives_not_detected(  # type: ignore[no-untyped-def]
    make_agent,
    tmp_path: Path,
    negative: bytes,
) -> None:
    _, server, _ = wyoming_agent(make_agent, tmp_path)
    assert types(run(detect(server.port, negative))) == ["not-detected"]


def test_48_khz_stereo_is_converted_and_detected(  # type: ignore[no-untyped-def]
    make_agent,
    tmp_path: Path,
    positive: bytes,
) -> None:
    _, server, _ = wyoming_agent(make_agent, tmp_path)
    answers = run(detect(server.port, to_48k_stereo(positive), rate=48000, channels=2))
    assert types(answers) == ["detection"]
    assert Detection.from_event(answers[0]).name == KEYWORD


def test_chunks_without_audio_start_open_a_stream_in_their_own_format(
    make_agent, tmp_path: Path, positive: bytes
) -> None:  # type: ignore[no-untyped-def]
    _, server, _ = wyoming_agent(make_agent, tmp_path)

    async def session() -> list[Event]:
        async with AsyncTcpClient(HOST, server.port) as client:
            for chunk in chunks(positive, 2):
                await client.write_event(AudioChunk(rate=16000, width=2, channels=1, audio=chunk).event())
            await client.write_event(AudioStop().event())
            return await read_all(client)

    assert types(run(session())) == ["detection"]


def test_home_assistant_way_closing_after_the_detection_frees_the_stream(
    make_agent, tmp_path: Path, positive: bytes
) -> None:  # type: ignore[no-untyped-def]
    """Home Assistant never sends audio-stop: it reads the detection and closes."""
    agent, server, events = wyoming_agent(make_agent, tmp_path)

    async def session() -> Event | None:
        async with AsyncTcpClient(HOST, server.port) as client:
            await send_audio(client, positive, names=[KEYWORD], chunk_samples=160)
            return await client.read_event()

    answer = run(session())
    assert answer is not None and Detection.from_event(answer).name == KEYWORD
    (closed,) = events.wait_closed(1)
    assert closed == events.detections[0].stream
    assert closed not in agent.worker.stream_ids()
    assert agent.errors.count("bad_event") == 0  # leaving between two events is no error


def test_a_client_that_half_closes_after_describe_still_gets_info(  # type: ignore[no-untyped-def]
    make_agent, tmp_path: Path
) -> None:
    _, server, _ = wyoming_agent(make_agent, tmp_path)

    async def session() -> list[Event]:
        reader, writer = await raw_events(server.port, Describe().event())
        writer.write_eof()  # nothing more to say; still listening
        found = await answers_until_closed(reader)
        writer.close()
        return found

    (answer,) = run(session())
    assert Info.from_event(answer).wake[0].models[0].name == KEYWORD


def test_unknown_wake_word_names_get_an_error_event(  # type: ignore[no-untyped-def]
    make_agent,
    tmp_path: Path,
    positive: bytes,
) -> None:
    agent, server, _ = wyoming_agent(make_agent, tmp_path)
    answers = run(detect(server.port, positive, names=["ok_nabu"]))
    assert types(answers) == ["error", "not-detected"]  # 小云小云 was said, but not asked for
    error = Error.from_event(answers[0])
    assert error.code == "unknown_wake_word"
    assert "ok_nabu" in error.text and KEYWORD in error.text
    assert agent.errors.count("unknown_wake_word") == 1


def test_detections_also_go_out_on_mqtt_named_after_the_client(  # type: ignore[no-untyped-def]
    broker, make_agent, client, tmp_path: Path, positive: bytes
) -> None:
    client.subscribe("edge_agent/dev1/detection")
    _, server, _ = wyoming_agent(make_agent, tmp_path, mqtt_port=broker.port)
    assert types(run(detect(server.port, positive))) == ["detection"]
    (message,) = client.wait_for("edge_agent/dev1/detection")
    published = message.json()
    assert published["keyword"] == KEYWORD
    assert published["stream"].startswith("wyoming-127_0_0_1-")


def test_set_config_of_keywords_changes_the_next_describe(  # type: ignore[no-untyped-def]
    broker, make_agent, client, tmp_path: Path
) -> None:
    _, server, _ = wyoming_agent(make_agent, tmp_path, mqtt_port=broker.port, commands=True)
    assert [m.name for m in run(describe(server.port)).wake[0].models] == [KEYWORD]
    update = {"keywords": [KEYWORD, {"text": "如家酒店", "threshold": 0.1}]}
    (answer,) = command(client, "edge_agent/dev1/cmd/set_config", update)
    assert answer["ok"] and answer["restart_required"] == []
    models = run(describe(server.port)).wake[0].models
    assert [(m.name, m.phrase) for m in models] == [(KEYWORD, KEYWORD), ("如家酒店", "如家酒店")]
    assert "0.1" in (models[1].description or "")


# --- limits and bad clients, while a healthy client streams ----------------------------------------


async def healthy_client_around(  # type: ignore[no-untyped-def]
    port: int,
    pcm: bytes,
    misbehave,
) -> list[Event]:
    """A client streams the first half of ``pcm``, waits for ``misbehave()`` to finish, then
    sends the rest and ``audio-stop``: what it is answered."""
    half = len(pcm) // 2 // 2048 * 2048
    async with AsyncTcpClient(HOST, port) as client:
        await send_audio(client, pcm[:half], names=[KEYWORD])
        await misbehave()
        for index, chunk in enumerate(chunks(pcm[half:], 2)):
            timestamp = (half + index * 2048) // 32
            await client.write_event(
                AudioChunk(rate=16000, width=2, channels=1, audio=chunk, timestamp=timestamp).event()
            )
        await client.write_event(AudioStop().event())
        return await read_all(client)


async def raw_events(
    port: int, *events: Event, then: bytes = b""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(HOST, port)
    for event in events:
        await async_write_event(event, writer)
    if then:
        writer.write(then)
        await writer.drain()
    return reader, writer


async def answers_until_closed(reader: asyncio.StreamReader) -> list[Event]:
    """Events the server wrote before it closed the connection (read with the library)."""
    from wyoming.event import async_read_event

    found = []
    try:
        while (event := await async_read_event(reader)) is not None:
            found.append(event)
    except ConnectionResetError:
        pass
    return found


FORMAT = {"rate": 16000, "width": 2, "channels": 1}
START = AudioStart(**FORMAT).event()


def audio_chunk(pcm: bytes) -> Event:
    return AudioChunk(rate=16000, width=2, channels=1, audio=pcm).event()


@pytest.mark.parametrize("event_loop", ["auto", "asyncio"])
def test_truncated_event_ends_that_client_only(  # type: ignore[no-untyped-def]
    make_agent,
    tmp_path: Path,
    positive: bytes,
    event_loop: str,
) -> None:
    agent, server, events = wyoming_agent(make_agent, tmp_path, event_loop=event_loop)

    async def misbehave() -> None:
        header = json.dumps(
            {
                "type": "audio-chunk",
                "data": {"rate": 16000, "width": 2, "channels": 1},
                "payload_length": 4096,
            }
        )
        _reader, writer = await raw_events(
            server.port, START, audio_chunk(positive[:8000]), then=header.encode() + b"\n" + bytes(100)
        )
        writer.close()  # in the middle of the payload
        await writer.wait_closed()
        events.wait_closed(1)  # its stream was ended and freed

    answers = run(healthy_client_around(server.port, positive, misbehave))
    assert types(answers) == ["detection"]
    assert agent.errors.count("truncated_event") == 1
    assert run(describe(server.port)).wake[0].models[0].name == KEYWORD


def test_unknown_event_type_gets_an_error_and_the_connection_goes_on(
    make_agent, tmp_path: Path, positive: bytes
) -> None:  # type: ignore[no-untyped-def]
    agent, server, _ = wyoming_agent(make_agent, tmp_path)
    seen: list[Event] = []

    async def misbehave() -> None:
        reader, writer = await raw_events(
            server.port, Event(type="frobnicate", data={"x": 1}), Describe().event()
        )
        from wyoming.event import async_read_event

        seen.append(await async_read_event(reader))  # type: ignore[arg-type]
        seen.append(await async_read_event(reader))  # type: ignore[arg-type]
        writer.close()
        await writer.wait_closed()

    answers = run(healthy_client_around(server.port, positive, misbehave))
    assert types(answers) == ["detection"]
    assert [e.type for e in seen] == ["error", "info"]
    assert Error.from_event(seen[0]).code == "unknown_event"
    assert Info.from_event(seen[1]).wake[0].models[0].name == KEYWORD
    assert agent.errors.count("unknown_event") == 1


@pytest.mark.parametrize("event_loop", ["auto", "asyncio"])
def test_a_10_mb_chunk_is_refused_before_it_is_read(  # type: ignore[no-untyped-def]
    make_agent,
    tmp_path: Path,
    positive: bytes,
    event_loop: str,
) -> None:
    agent, server, _ = wyoming_agent(make_agent, tmp_path, event_loop=event_loop)
    seen: list[Event] = []

    async def misbehave() -> None:
        reader, writer = await asyncio.open_connection(HOST, server.port)
        await async_write_event(START, writer)
        with contextlib.suppress(ConnectionError):  # the server may close before 10 MB are written
            await async_write_event(audio_chunk(bytes(10 * 1024 * 1024)), writer)
        seen.extend(await answers_until_closed(reader))
        writer.close()

    answers = run(healthy_client_around(server.port, positive, misbehave))
    assert types(answers) == ["detection"]
    assert agent.errors.count("event_too_large") == 1
    assert types(seen) in (["error"], [])  # [] only if the reset beat the error event
    if seen:
        assert Error.from_event(seen[0]).code == "event_too_large"


def test_a_header_line_longer_than_the_limit_is_refused_before_its_end(
    make_agent, tmp_path: Path, positive: bytes
) -> None:  # type: ignore[no-untyped-def]
    agent, server, _ = wyoming_agent(make_agent, tmp_path, max_event_bytes=4096)
    seen: list[Event] = []

    async def misbehave() -> None:
        reader, writer = await raw_events(server.port, then=b'{"type": "' + b"x" * 8192)
        seen.extend(await answers_until_closed(reader))
        writer.close()

    assert types(run(healthy_client_around(server.port, positive, misbehave))) == ["detection"]
    assert types(seen) == ["error"] and Error.from_event(seen[0]).code == "event_too_large"
    assert "header line longer than 4096 bytes" in (Error.from_event(seen[0]).text or "")
    assert agent.errors.count("event_too_large") == 1


def test_a_header_that_is_not_json_gets_an_error_and_is_closed(
    make_agent, tmp_path: Path, positive: bytes
) -> None:  # type: ignore[no-untyped-def]
    _agent, server, _ = wyoming_agent(make_agent, tmp_path)
    seen: list[Event] = []

    async def misbehave() -> None:
        reader, writer = await raw_events(server.port, then=b"this is not json\n")
        seen.extend(await answers_until_closed(reader))
        writer.close()

    assert types(run(healthy_client_around(server.port, positive, misbehave))) == ["detection"]
    assert types(seen) == ["error"] and Error.from_event(seen[0]).code == "bad_event"


def test_a_client_vanishing_mid_stream_frees_its_stream(  # type: ignore[no-untyped-def]
    make_agent,
    tmp_path: Path,
    positive: bytes,
) -> None:
    agent, server, events = wyoming_agent(make_agent, tmp_path)
    vanished: list[str] = []

    async def misbehave() -> None:
        _reader, writer = await raw_events(
            server.port, START, *[audio_chunk(c) for c in chunks(positive[:32000], 2)]
        )
        writer.transport.abort()  # a reset, no goodbye
        vanished.extend(events.wait_closed(1))

    answers = run(healthy_client_around(server.port, positive, misbehave))
    assert types(answers) == ["detection"]
    assert vanished[0] not in agent.worker.stream_ids()
    assert server.stats.streaming == 0


def test_bad_audio_format_gets_an_error_event(  # type: ignore[no-untyped-def]
    make_agent,
    tmp_path: Path,
) -> None:
    agent, server, _ = wyoming_agent(make_agent, tmp_path)

    async def session() -> list[Event]:
        reader, writer = await raw_events(server.port, AudioStart(rate=16000, width=3, channels=1).event())
        found = await answers_until_closed(reader)
        writer.close()
        return found

    (answer,) = run(session())
    error = Error.from_event(answer)
    assert error.code == "bad_format" and "width" in error.text
    assert agent.errors.count("bad_format") == 1


def test_streaming_clients_beyond_max_streams_get_an_error(
    make_agent, tmp_path: Path, positive: bytes
) -> None:  # type: ignore[no-untyped-def]
    agent, server, _ = wyoming_agent(make_agent, tmp_path, audio={"mqtt": {"max_streams": 1}})

    async def session() -> tuple[list[Event], list[Event]]:
        async with AsyncTcpClient(HOST, server.port) as first:
            await send_audio(first, positive[:32000])
            async with AsyncTcpClient(HOST, server.port) as second:
                await second.write_event(START)
                refused = await read_all(second)
            await send_audio(first, positive[32000:])
            await first.write_event(AudioStop().event())
            return refused, await read_all(first)

    refused, served = run(session())
    assert types(refused) == ["error"] and Error.from_event(refused[0]).code == "too_many_streams"
    assert types(served) == ["not-detected"] or types(served) == ["detection"]
    assert agent.errors.count("too_many_streams") == 1
    assert types(run(detect(server.port, positive))) == ["detection"]  # the slot is free again


def test_connections_beyond_max_connections_get_an_error(  # type: ignore[no-untyped-def]
    make_agent,
    tmp_path: Path,
) -> None:
    _agent, server, _ = wyoming_agent(make_agent, tmp_path, max_connections=1)

    async def session() -> list[Event]:
        async with AsyncTcpClient(HOST, server.port) as first:
            await first.write_event(Ping().event())
            assert await first.read_event() is not None  # the first is being served
            async with AsyncTcpClient(HOST, server.port) as second:
                return await read_all(second)

    (refused,) = run(session())
    assert Error.from_event(refused).code == "too_many_connections"
    assert run(describe(server.port)).wake  # the first left: served again


def test_a_silent_connection_is_closed_after_the_idle_timeout(  # type: ignore[no-untyped-def]
    make_agent,
    tmp_path: Path,
) -> None:
    _, server, _ = wyoming_agent(make_agent, tmp_path, idle_timeout=1.0)

    async def session() -> list[Event]:
        async with AsyncTcpClient(HOST, server.port) as client:
            await client.write_event(Detect(names=None).event())
            return await read_all(client)  # returns when the server closes

    assert run(session()) == []
    assert server.stats.idle_closed == 1


def test_a_taken_port_fails_with_the_address(  # type: ignore[no-untyped-def]
    make_agent,
    tmp_path: Path,
) -> None:
    _, server, _ = wyoming_agent(make_agent, tmp_path)
    config = agent_config(
        1,
        tmp_path,
        mqtt={"enabled": False},
        wyoming={"enabled": True, "port": server.port, "zeroconf": False},
    )
    with pytest.raises(WyomingServerError, match=f"cannot listen on 0.0.0.0:{server.port}"):
        make_agent(config, integrations=lambda agent: [WyomingServer()], start=False)


def test_uvloop_asked_for_but_missing_fails_with_what_to_install(  # type: ignore[no-untyped-def]
    make_agent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    config = agent_config(
        1, tmp_path, mqtt={"enabled": False}, wyoming={"enabled": True, "port": 0, "event_loop": "uvloop"}
    )
    with pytest.raises(
        WyomingServerError, match=r"uvloop is not installed \(pip install 'edge-agent\[wyoming\]'\)"
    ):
        make_agent(config, integrations=lambda agent: [WyomingServer()], start=False)

"""Wyoming clients built from the ``wyoming`` package's own classes, as Home Assistant's are."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.event import Event
from wyoming.info import Describe, Info
from wyoming.wake import Detect

from edge_agent.audio.resample import resample

HOST = "127.0.0.1"
CHUNK_SAMPLES = 1024


async def describe(port: int) -> Info:
    async with AsyncTcpClient(HOST, port) as client:
        await client.write_event(Describe().event())
        while True:
            event = await client.read_event()
            assert event is not None, "the server closed the connection instead of answering"
            if Info.is_type(event.type):
                return Info.from_event(event)


def chunks(pcm: bytes, frame_bytes: int, chunk_samples: int = CHUNK_SAMPLES) -> Iterator[bytes]:
    step = frame_bytes * chunk_samples
    for offset in range(0, len(pcm), step):
        yield pcm[offset : offset + step]


async def send_audio(
    client: AsyncTcpClient,
    pcm: bytes,
    rate: int = 16000,
    width: int = 2,
    channels: int = 1,
    chunk_samples: int = CHUNK_SAMPLES,
    names: list[str] | None = None,
) -> None:
    """``detect``, ``audio-start`` and the recording in ``audio-chunk``s, with millisecond
    timestamps from the start as Home Assistant sends them."""
    await client.write_event(Detect(names=names).event())
    await client.write_event(AudioStart(rate=rate, width=width, channels=channels).event())
    sent = 0
    for chunk in chunks(pcm, width * channels, chunk_samples):
        timestamp = sent * 1000 // (rate * width * channels)
        await client.write_event(
            AudioChunk(rate=rate, width=width, channels=channels, audio=chunk, timestamp=timestamp).event()
        )
        sent += len(chunk)


async def read_all(client: AsyncTcpClient) -> list[Event]:
    """Every event until the server closes the connection."""
    events = []
    while (event := await client.read_event()) is not None:
        events.append(event)
    return events


async def detect(port: int, pcm: bytes, **audio) -> list[Event]:  # type: ignore[no-untyped-def]
    """A whole recording, then ``audio-stop``: every event the server answers with."""
    async with AsyncTcpClient(HOST, port) as client:
        await send_audio(client, pcm, **audio)
        await client.write_event(AudioStop().event())
        return await read_all(client)


def types(events: list[Event]) -> list[str]:
    return [event.type for event in events]


def to_48k_stereo(pcm16k: bytes) -> bytes:
    samples = np.frombuffer(pcm16k, dtype="<i2").astype(np.float32)
    high = np.clip(np.round(resample(samples, 16000, 48000)), -32768, 32767).astype("<i2")
    return np.repeat(high, 2).tobytes()  # left and right interleaved


def run(coroutine):  # type: ignore[no-untyped-def]
    return asyncio.run(coroutine)

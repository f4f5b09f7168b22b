"""Publishing recordings to the agent as MQTT audio streams, the way a thin device would."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from edge_agent.audio.wav import read_wav, to_mono_16k
from tests.broker import Client

CHUNK_MS = 100


def pcm16(path: Path) -> bytes:
    samples = to_mono_16k(read_wav(path))
    return np.clip(np.round(samples), -32768, 32767).astype("<i2").tobytes()


def stream_files(
    client: Client,
    streams: dict[str, bytes],
    prefix: str = "edge_agent/dev1",
    realtime: bool = False,
    chunk_ms: int = CHUNK_MS,
    end: bool = True,
) -> None:
    """Publish every stream's PCM in ``chunk_ms`` chunks, interleaved, then an ``end`` control.

    ``realtime`` paces chunks on an absolute schedule, as a microphone would deliver them.
    """
    chunk_bytes = 16000 * 2 * chunk_ms // 1000
    longest = max(len(pcm) for pcm in streams.values())
    started = time.monotonic()
    for index, offset in enumerate(range(0, longest, chunk_bytes)):
        if realtime:
            delay = started + index * chunk_ms / 1000 - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        for stream, pcm in streams.items():
            if offset < len(pcm):
                client.publish(f"{prefix}/audio/{stream}", pcm[offset : offset + chunk_bytes])
    if end:
        for stream in streams:
            client.publish(f"{prefix}/audio/{stream}/control", json.dumps({"action": "end"}), qos=1)

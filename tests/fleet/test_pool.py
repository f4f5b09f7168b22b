"""Scale-out: worker processes sharing streams through a shared subscription on a real mosquitto."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest

from edge_agent.fleet.pool import PoolTopics
from tests.agent.streaming import pcm16, stream_files
from tests.broker import Client
from tests.support import start_agent_process

PREFIX = "edge_agent"
POOL = "p1"
CHUNK = 3200  # 100 ms
REPLIES = "replies/#"  # start() expects the device subscribed to its answers


@pytest.fixture()
def workers(broker, model_dir: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    watcher = Client(broker.port).connect().subscribe(f"{PREFIX}/+/availability")
    processes = {}
    for index in range(3):
        name = f"w{index}"
        processes[name] = start_agent_process(
            model_dir, broker.port, name, tmp_path / f"{name}.db", "--pool", POOL
        )
    try:
        watcher.wait_for(
            f"{PREFIX}/+/availability",
            lambda m: {x.topic.split("/")[1] for x in m if x.payload == b"online"} >= set(processes),
            timeout=90,
        )
        # An agent subscribes (the pool's shared subscription too) before it says online.
        yield processes
    finally:
        watcher.close()
        for process in processes.values():
            if process.poll() is None:
                process.terminate()
        for process in processes.values():
            process.wait(30)


def start(client: Client, stream: str) -> str:
    """Ask the pool for a worker; returns its id once it has subscribed to the stream. The
    client must be subscribed to :data:`REPLIES`."""
    reply = f"replies/{uuid.uuid4().hex}"
    client.publish(
        PoolTopics.START.format(prefix=PREFIX, pool=POOL, stream=stream),
        b'{"action": "start"}',
        qos=1,
        ResponseTopic=reply,
        CorrelationData=stream.encode(),
    )
    (answer,) = client.wait_for(reply, timeout=15)
    body = answer.json()
    assert body["ok"] is True and body["stream"] == stream
    return str(body["worker"])


def send(client: Client, stream: str, pcm: bytes, end: bool = True) -> None:
    topic = PoolTopics.AUDIO.format(prefix=PREFIX, pool=POOL, stream=stream)
    for offset in range(0, len(pcm), CHUNK):
        client.publish(topic, pcm[offset : offset + CHUNK])
    if end:
        client.publish(
            PoolTopics.CONTROL.format(prefix=PREFIX, pool=POOL, stream=stream), b'{"action": "end"}', qos=1
        )


def after_everything_sent(client: Client, workers: list[str], pcm: bytes) -> None:
    """A keyword streamed to each worker's own audio topic, and its detection awaited: each
    worker handles what this client sent in order and publishes its detections in order, so
    every detection of the pool streams sent before is in once these are."""
    sentinels = {worker: f"sentinel-{uuid.uuid4().hex[:8]}" for worker in workers}
    for worker, stream in sentinels.items():
        stream_files(client, {stream: pcm}, prefix=f"{PREFIX}/{worker}")
    client.wait_for(
        f"{PREFIX}/+/detection",
        lambda m: {(x.json()["device"], x.json()["stream"]) for x in m} >= set(sentinels.items()),
        timeout=60,
    )


def test_thirty_streams_on_three_workers_each_detected_once_by_its_own_worker(  # type: ignore[no-untyped-def]
    broker, workers, dev_audio: Path, example_wav: Path
) -> None:
    device = Client(broker.port).connect().subscribe(f"{PREFIX}/+/detection").subscribe(REPLIES)
    try:
        positives = [pcm16(p) for p in sorted(dev_audio.glob("pos/*.wav"))]
        owner = {f"s{i:02d}": start(device, f"s{i:02d}") for i in range(30)}
        for index, stream in enumerate(owner):
            send(device, stream, positives[index % len(positives)])
        device.wait_for(f"{PREFIX}/+/detection", lambda m: len(m) >= 30, timeout=120)
        after_everything_sent(device, list(workers), pcm16(example_wav))  # a duplicate is in by now
        events = [m.json() for m in device.on(f"{PREFIX}/+/detection")]
        events = [e for e in events if not e["stream"].startswith("sentinel-")]
    finally:
        device.close()
    per_stream = Counter(e["stream"] for e in events)
    assert per_stream == Counter({stream: 1 for stream in owner}), "every stream exactly once"
    assert all(e["device"] == owner[e["stream"]] for e in events), "detected by the worker that claimed it"
    assert len(set(owner.values())) >= 2, f"the broker spread the streams: {Counter(owner.values())}"


def test_a_dead_workers_streams_are_lost_until_started_again(broker, workers, example_wav: Path) -> None:  # type: ignore[no-untyped-def]
    device = (
        Client(broker.port).connect().subscribe(f"{PREFIX}/+/detection").subscribe(f"{PREFIX}/+/availability")
    )
    device.subscribe(REPLIES)
    device.subscribe(PoolTopics.CLAIM.filter(prefix=PREFIX, pool=POOL))
    pcm = pcm16(example_wav)
    try:
        owner = {f"k{i}": start(device, f"k{i}") for i in range(6)}
        victim_name, victim_stream = next((w, s) for s, w in owner.items())
        workers[victim_name].kill()
        workers[victim_name].wait(10)
        device.wait_for(
            f"{PREFIX}/{victim_name}/availability", lambda m: m and m[-1].payload == b"offline", timeout=15
        )
        # The claim still names the dead worker: that is how a device learns to start again.
        claims = device.on(PoolTopics.CLAIM.format(prefix=PREFIX, pool=POOL, stream=victim_stream))
        assert claims and json.loads(claims[-1].payload)["worker"] == victim_name

        send(device, victim_stream, pcm)  # nobody subscribes to this stream any more
        after_everything_sent(device, [w for w in workers if w != victim_name], pcm)
        assert [e for e in device.on(f"{PREFIX}/+/detection") if e.json()["stream"] == victim_stream] == []

        survivor = start(device, victim_stream)  # documented recovery: start the stream again
        assert survivor != victim_name
        send(device, victim_stream, pcm)
        events = device.wait_for(
            f"{PREFIX}/+/detection", lambda m: any(x.json()["stream"] == victim_stream for x in m), timeout=30
        )
        (event,) = [e.json() for e in events if e.json()["stream"] == victim_stream]
        assert event["device"] == survivor
    finally:
        device.close()


def test_stream_cli_uses_the_pool(broker, workers, example_wav: Path) -> None:  # type: ignore[no-untyped-def]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_agent",
            "stream",
            "--broker",
            f"127.0.0.1:{broker.port}",
            "--pool",
            POOL,
            "--stream",
            "cli",
            "--fast",
            "--wait",
            "3",
            str(example_wav),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"pool {POOL}: stream cli served by w" in result.stderr
    (line,) = result.stdout.splitlines()
    assert json.loads(line)["keyword"] == "小云小云"

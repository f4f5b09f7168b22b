"""Faults with a real mosquitto that the tests stop, restart and kill: nothing detected is lost."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

from edge_agent.agent.items import AudioChunk
from edge_agent.audio.sources import FileAudioSource
from edge_agent.audio.wav import read_wav, to_mono_16k
from edge_agent.config import FileSource
from edge_agent.mqtt.messages import DetectionEvent, parse_iso_utc
from edge_agent.recording import Recording, detect_recording
from tests.agent.streaming import pcm16
from tests.broker import Broker, Client, free_port
from tests.support import agent_config, start_agent_process, wait_until

PREFIX = "edge_agent/dev1"


def positives(dev_audio: Path, count: int, folder: Path) -> Path:
    folder.mkdir()
    for path in sorted(dev_audio.glob("pos/*.wav"))[:count]:
        shutil.copy(path, folder / path.name)
    return folder


def keyword_chunks(path: Path, stream: str) -> list[AudioChunk]:
    """A recording as a local source would hand it to the agent: 100 ms chunks, the last final."""
    samples = to_mono_16k(read_wav(path))
    pieces = [samples[offset : offset + 1600] for offset in range(0, samples.shape[0], 1600)]
    return [
        AudioChunk(stream, "file", piece, time.time(), final=index == len(pieces) - 1)
        for index, piece in enumerate(pieces)
    ]


def say(agent, path: Path, stream: str = "mic") -> None:  # type: ignore[no-untyped-def]
    for chunk in keyword_chunks(path, stream):
        assert agent.services.ingest(chunk)


def test_broker_down_while_keywords_are_spoken_loses_nothing(  # type: ignore[no-untyped-def]
    make_agent, numpy_model, dev_audio: Path, tmp_path: Path
) -> None:
    """Keywords before, during and after an outage: each delivered (copies de-duplicated as the
    docs say), in order; those made in the dark go out after it, their delay counting the outage."""
    broker = Broker(tmp_path, persistence=True).start()
    watcher = Client(broker.port, client_id="watcher", clean=False, session_expiry=3600).connect()
    watcher.subscribe(f"{PREFIX}/detection", qos=1)
    recordings = sorted(dev_audio.glob("pos/*.wav"))[:7]
    agent = make_agent(agent_config(broker.port, tmp_path))
    outbox = agent.outbox
    try:
        for path in recordings[:2]:
            say(agent, path)
        watcher.wait_for(f"{PREFIX}/detection", lambda m: len(m) >= 2, timeout=60)
        broker.stop()
        for path in recordings[2:6]:
            say(agent, path)
        wait_until(lambda: outbox.depth() == 4, timeout=60)  # stored, waiting for the broker
        restarted = time.time()
        broker.start()
        watcher.wait_for(f"{PREFIX}/detection", lambda m: len(m) >= 6, timeout=60)
        say(agent, recordings[6])  # after them all: anything extra (a duplicate) came before it
        watcher.wait_for(
            f"{PREFIX}/detection", lambda m: any(DetectionEvent.from_payload(x.payload).seq == 6 for x in m)
        )
        events = [DetectionEvent.from_payload(m.payload) for m in watcher.on(f"{PREFIX}/detection")]
    finally:
        watcher.close()
        agent.stop()
        broker.stop()
    # QoS 1 is at least once: a connection dropped before its PUBACK (a stall on a loaded machine)
    # sends a copy again. Receivers de-duplicate on (boot_id, seq), as docs/mqtt.md says.
    first: dict[tuple[str, int], DetectionEvent] = {}
    for event in events:
        seen = first.setdefault((event.boot_id, event.seq), event)
        assert (seen.keyword, seen.start, seen.end) == (event.keyword, event.start, event.end)
    events = list(first.values())
    assert [e.seq for e in events] == list(range(7)), "each delivered, in order"
    expected = []
    for path in recordings:
        whole = detect_recording(
            numpy_model, agent.worker.keywords, agent.worker.settings.decoder, Recording(path).samples()
        )
        expected += [(d.keyword, round(d.start, 3), round(d.end, 3)) for d in whole.detections]
    assert [(e.keyword, e.start, e.end) for e in events] == expected
    assert all(e.delay_ms is not None for e in events)
    for event in events[2:6]:  # delayed by the outage: the delay says so
        spoken = parse_iso_utc(event.time)
        assert event.delay_ms >= (restarted - spoken) * 1000 - 50
    for event in events:
        if event.delay_ms > 5000:  # far beyond the live window: never passed off as live
            assert event.replayed


def outbox_rows(path: Path) -> int:
    try:
        with sqlite3.connect(path) as db:
            return int(db.execute("SELECT COUNT(*) FROM events").fetchone()[0])
    except sqlite3.Error:
        return 0


def test_sigkill_with_events_in_the_outbox_publishes_them_after_restart(
    model_dir: Path, dev_audio: Path, tmp_path: Path
) -> None:
    port = free_port()  # nobody listens yet: the agent cannot publish
    folder = positives(dev_audio, 3, tmp_path / "three")
    outbox = tmp_path / "outbox.db"
    env = {"EDGE_AGENT_MQTT__RECONNECT_MAX_DELAY": "1"}
    config = tmp_path / "fast.yaml"
    config.write_text(
        f"audio:\n  sources:\n    - type: file\n      id: mic\n      path: {folder}\n      realtime: false\n",
        encoding="utf-8",
    )
    first = start_agent_process(model_dir, port, "dev1", outbox, "-c", str(config), env=env)
    try:
        wait_until(lambda: outbox_rows(outbox) >= 3, timeout=60)
        assert outbox_rows(outbox) == 3
    finally:
        first.kill()  # SIGKILL: no chance to flush anything
        first.wait(10)
    broker = Broker(tmp_path, port=port).start()
    watcher = Client(broker.port).connect().subscribe(f"{PREFIX}/detection")
    second = start_agent_process(model_dir, port, "dev1", outbox, env=env)
    try:
        messages = watcher.wait_for(f"{PREFIX}/detection", lambda m: len(m) >= 3, timeout=60)
        events = [DetectionEvent.from_payload(m.payload) for m in messages]
        assert [e.seq for e in events] == [0, 1, 2]
        assert all(e.replayed for e in events)
        assert len({e.boot_id for e in events}) == 1  # all from the first run's boot
        wait_until(lambda: outbox_rows(outbox) == 0, timeout=10)  # acknowledged, so removed
    finally:
        second.terminate()
        second.wait(30)
        watcher.close()
        broker.stop()


def test_outbox_bound_drops_the_oldest_and_health_shows_it(  # type: ignore[no-untyped-def]
    make_agent, dev_audio: Path, tmp_path: Path
) -> None:
    # The watcher's persistent session exists before the agent ever connects, so the broker keeps
    # what the agent replays the moment it gets in, however fast that is.
    broker = Broker(tmp_path, persistence=True).start()
    session = {"client_id": "bound-watcher", "clean": False, "session_expiry": 600}
    watcher = Client(broker.port, **session).connect()
    watcher.subscribe(f"{PREFIX}/detection").subscribe(f"{PREFIX}/health").close()
    broker.stop()
    folder = positives(dev_audio, 4, tmp_path / "four")
    source = FileAudioSource(FileSource(id="mic", path=str(folder), realtime=False))
    config = agent_config(broker.port, tmp_path, outbox={"max_events": 2})
    agent = make_agent(config, sources=[source], start=False)
    agent.start()
    wait_until(lambda: agent.sink.detections == 4, timeout=60)
    assert agent.outbox is not None and agent.outbox.depth() == 2
    broker.start()
    watcher = Client(broker.port, **session).connect()
    try:
        messages = watcher.wait_for(f"{PREFIX}/detection", lambda m: len(m) >= 2, timeout=30)
        assert [json.loads(m.payload)["seq"] for m in messages] == [2, 3]  # 0 and 1 were the oldest
        health = watcher.wait_for(
            f"{PREFIX}/health", lambda m: any(json.loads(x.payload)["outbox_dropped"] for x in m)
        )
        assert json.loads(health[-1].payload)["outbox_dropped"] == 2
    finally:
        watcher.close()
        agent.stop()
        broker.stop()


@pytest.mark.slow
def test_broker_restart_mid_stream_resumes_and_reports_the_gap(  # type: ignore[no-untyped-def]
    make_agent, example_wav: Path, tmp_path: Path
) -> None:
    broker = Broker(tmp_path, persistence=True).start()
    agent = make_agent(agent_config(broker.port, tmp_path))
    watcher = Client(broker.port, client_id="gap-watcher", clean=False, session_expiry=600).connect()
    watcher.subscribe(f"{PREFIX}/detection").subscribe(f"{PREFIX}/error")
    sender = Client(broker.port, client_id="thin-device").connect()
    pcm = pcm16(example_wav) * 3  # the keyword three times, ~13.6 s
    chunk = 3200
    started = time.monotonic()
    try:
        for index, offset in enumerate(range(0, len(pcm), chunk)):
            delay = started + index * 0.1 - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if index == 55:  # 5.5 s in, between the second and the third keyword
                broker.restart(downtime=2.0)
                restarted_at = time.time()
            sender.publish(f"{PREFIX}/audio/door", pcm[offset : offset + chunk])
        sender.publish(f"{PREFIX}/audio/door/control", b'{"action": "end"}', qos=1)
        errors = watcher.wait_for(f"{PREFIX}/error", lambda m: any(b"audio_gap" in x.payload for x in m), 30)
        gap = next(json.loads(m.payload) for m in errors if b"audio_gap" in m.payload)
        assert gap["stream"] == "door" and "probably lost" in gap["message"]
        detections = watcher.wait_for(f"{PREFIX}/detection", lambda m: len(m) >= 2, timeout=30)
        assert all(json.loads(m.payload)["stream"] == "door" for m in detections)
        last = json.loads(detections[-1].payload)
        spoken = datetime.fromisoformat(last["time"].replace("Z", "+00:00")).timestamp()
        assert spoken > restarted_at  # a keyword spoken after the restart was found: the stream resumed
        assert agent.transport is not None and agent.transport.stats.reconnects >= 1
    finally:
        sender.close()
        watcher.close()
        agent.stop()
        broker.stop()
    # Retained state was lost with the broker's memory and published again after reconnecting.
    broker.start()
    try:
        late = Client(broker.port).connect().subscribe(f"{PREFIX}/info")
        assert late.wait_for(f"{PREFIX}/info", timeout=5)[-1].retain
        late.close()
    finally:
        broker.stop()


def test_availability_and_info_are_restored_after_a_broker_restart(
    broker, make_agent, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    agent = make_agent(agent_config(broker.port, tmp_path))
    broker.restart()  # no persistence: every retained message is gone
    transport = agent.transport
    assert transport is not None
    wait_until(lambda: transport.stats.reconnects >= 1 and transport.connected, timeout=15)
    late = Client(broker.port).connect().subscribe(f"{PREFIX}/availability").subscribe(f"{PREFIX}/info")
    try:
        assert late.wait_for(f"{PREFIX}/availability")[-1].payload == b"online"
        # Subscribed before or after the agent published it again: live or retained. Once it
        # has been published, a client subscribing now gets it retained.
        late.wait_for(f"{PREFIX}/info")
        newcomer = Client(broker.port).connect().subscribe(f"{PREFIX}/info")
        try:
            assert newcomer.wait_for(f"{PREFIX}/info")[-1].retain
        finally:
            newcomer.close()
        # Subscriptions were restored too: a whole-file request is answered.
        late.subscribe("replies/x")
        late.publish(f"{PREFIX}/detect/request", b"not a wav", qos=1, ResponseTopic="replies/x")
        assert json.loads(late.wait_for("replies/x")[-1].payload)["ok"] is False
    finally:
        late.close()


def test_streams_sending_too_fast_are_throttled(broker, make_agent, client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    agent = make_agent(agent_config(broker.port, tmp_path, audio={"mqtt": {"max_rate_factor": 2.0}}))
    client.subscribe(f"{PREFIX}/error")
    one_second = bytes(32000)
    started = time.monotonic()
    for _ in range(12):  # 12 s of audio at once: past the 5 s burst allowance
        client.publish(f"{PREFIX}/audio/hasty", one_second, qos=1)
    (report,) = client.wait_for(f"{PREFIX}/error")[:1]
    assert report.json()["code"] == "rate_limited"

    def accepted() -> int:
        assert agent.worker.drain(10)
        return int(agent.health.report().streams.get("hasty", {}).get("chunks", 0))

    # The last chunks may still be on their way through the broker.
    wait_until(lambda: accepted() + agent.errors.count("rate_limited") >= 12, timeout=10)
    window = time.monotonic() - started  # the agent received everything within this time
    assert accepted() + agent.errors.count("rate_limited") == 12
    assert accepted() <= 5 + 2.0 * window + 1  # the burst, plus twice real time while receiving


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly_with_offline(signal_name: str, model_dir: Path, tmp_path: Path) -> None:
    import signal

    broker = Broker(tmp_path).start()
    watcher = Client(broker.port).connect().subscribe("edge_agent/sig/availability")
    process = start_agent_process(
        model_dir, broker.port, "sig", tmp_path / "o.db", stderr=subprocess.PIPE, text=True
    )
    try:
        watcher.wait_for("edge_agent/sig/availability", lambda m: m and m[-1].payload == b"online", 60)
        process.send_signal(getattr(signal, signal_name))
        _, errors = process.communicate(timeout=30)
        assert process.returncode == 0
        assert f"received {signal_name}, stopping" in errors
        watcher.wait_for("edge_agent/sig/availability", lambda m: m[-1].payload == b"offline")
    finally:
        if process.poll() is None:
            process.kill()
        watcher.close()
        broker.stop()


def test_an_unwritable_outbox_still_delivers_detections_and_says_so(  # type: ignore[no-untyped-def]
    broker, make_agent, client, dev_audio: Path, tmp_path: Path
) -> None:
    from tests.agent.test_outbox import make_read_only

    client.subscribe(f"{PREFIX}/detection").subscribe(f"{PREFIX}/error").subscribe(f"{PREFIX}/health")
    folder = positives(dev_audio, 2, tmp_path / "two")
    source = FileAudioSource(FileSource(id="mic", path=str(folder), realtime=False))
    agent = make_agent(agent_config(broker.port, tmp_path), sources=[source], start=False)
    assert agent.outbox is not None
    make_read_only(agent.outbox)
    agent.start()
    detections = client.wait_for(f"{PREFIX}/detection", lambda m: len(m) >= 2, timeout=60)
    seqs = [json.loads(m.payload)["seq"] for m in detections]
    assert seqs == [seqs[0], seqs[0] + 1]
    errors = client.wait_for(f"{PREFIX}/error", lambda m: any(b"outbox_unwritable" in x.payload for x in m))
    report = next(json.loads(m.payload) for m in errors if b"outbox_unwritable" in m.payload)
    assert "readonly" in report["message"] and "held in memory" in report["message"]
    health = client.wait_for(
        f"{PREFIX}/health",
        lambda m: (
            json.loads(m[-1].payload)["refused"].get("outbox_unwritable")
            and json.loads(m[-1].payload)["outbox_depth"] == 0
        ),  # both acknowledged
    )
    assert json.loads(health[-1].payload)["outbox_unwritten"] == 0  # removed from memory on PUBACK
    assert agent.worker.stats.item_errors == 0

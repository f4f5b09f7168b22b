"""The agent against a real mosquitto: streams, detections, retained state, requests, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
import pytest

from edge_agent.audio.wav import encode_wav, read_wav, to_mono_16k
from edge_agent.mqtt.messages import DetectionEvent, DeviceInfo, HealthReport
from tests.agent.streaming import pcm16, stream_files
from tests.broker import Broker, Client
from tests.support import agent_config, start_agent_process, wait_until

PREFIX = "edge_agent/dev1"


@pytest.fixture(scope="module")
def cli_detections(model_dir: Path, dev_audio: Path) -> dict[str, list[dict]]:
    """What `edge-agent detect` says about every dev recording: the reference for streaming."""
    files = sorted(dev_audio.glob("pos/*.wav")) + sorted(dev_audio.glob("neg/*.wav"))
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent", "detect", "--model-dir", str(model_dir), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    return {Path(line["file"]).stem: line["detections"] for line in lines}


def stream_name(stem: str) -> str:
    return stem[-40:]


def detections_by_stream(client: Client) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for message in client.on(f"{PREFIX}/detection"):
        event = message.json()
        found.setdefault(event["stream"], []).append(event)
    return found


def assert_same(streamed: dict[str, list[dict]], reference: dict[str, list[dict]], names: list[str]) -> None:
    for stem in names:
        got = sorted(streamed.get(stream_name(stem), []), key=lambda e: e["end"])
        expected = reference[stem]
        assert [(e["keyword"], e["start"], e["end"]) for e in got] == [
            (e["keyword"], e["start"], e["end"]) for e in expected
        ], stem
        for event, reference_event in zip(got, expected, strict=True):
            assert event["confidence"] == pytest.approx(reference_event["confidence"], abs=2e-4)


def test_announces_itself_with_retained_state(broker, make_agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    make_agent(agent_config(broker.port, tmp_path))
    probe = Client(broker.port).connect().subscribe(f"{PREFIX}/health")
    probe.wait_for(f"{PREFIX}/health")  # the agent has published its retained state
    probe.close()
    late = Client(broker.port).connect().subscribe(f"{PREFIX}/#")  # joins after: sees retained only
    try:
        late.wait_for(f"{PREFIX}/health")
        availability = late.wait_for(f"{PREFIX}/availability")[-1]
        assert availability.payload == b"online" and availability.retain
        info = late.wait_for(f"{PREFIX}/info")[-1]
        assert info.retain
        parsed = DeviceInfo.from_payload(info.payload)
        assert parsed.device == "dev1" and parsed.model["id"] == "damo/speech_charctc_kws_phone-xiaoyun"
        assert parsed.keywords[0]["text"] == "小云小云" and parsed.platform["machine"]
        health = HealthReport.from_payload(late.wait_for(f"{PREFIX}/health")[-1].payload)
        assert health.memory_rss_mb and health.memory_rss_mb > 10
        assert health.worker["alive"] is True
    finally:
        late.close()


@pytest.mark.slow
def test_health_counts_the_engine_worker_processes_memory(broker, make_agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """With engine.workers 2 most of the agent is in its worker processes: the health report's
    memory (and CPU) covers them, and each worker is listed with its process."""
    import psutil

    make_agent(agent_config(broker.port, tmp_path, engine={"workers": 2}))
    probe = Client(broker.port).connect().subscribe(f"{PREFIX}/health")
    try:
        # The first reports may come before both workers have reported in.
        both = lambda m: m and all(w["alive"] for w in m[-1].json()["worker"]["workers"])  # noqa: E731
        health = HealthReport.from_payload(probe.wait_for(f"{PREFIX}/health", both)[-1].payload)
    finally:
        probe.close()
    workers = health.worker["workers"]
    own = psutil.Process()
    assert len(workers) == 2 and all(w["alive"] and w["pid"] != own.pid for w in workers)
    worker_rss = sum(psutil.Process(w["pid"]).memory_info().rss for w in workers) / 1e6
    assert worker_rss > 40  # each holds numpy and the model
    assert health.memory_rss_mb is not None
    assert health.memory_rss_mb > own.memory_info().rss / 1e6 + worker_rss / 2


def test_info_is_at_the_broker_before_online(broker, make_agent, client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Whoever reacts to ``online`` (and the agent may die right after) can read ``info``."""
    client.subscribe(f"{PREFIX}/#")
    make_agent(agent_config(broker.port, tmp_path))
    client.wait_for(f"{PREFIX}/availability", lambda m: m and m[-1].payload == b"online")
    topics = [m.topic.removeprefix(f"{PREFIX}/") for m in client.messages]
    assert "info" in topics and topics.index("info") < topics.index("availability")


def test_clean_stop_publishes_offline(broker, make_agent, client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    agent = make_agent(agent_config(broker.port, tmp_path))
    client.subscribe(f"{PREFIX}/availability")
    client.wait_for(f"{PREFIX}/availability", lambda m: m and m[-1].payload == b"online")
    agent.stop()
    client.wait_for(f"{PREFIX}/availability", lambda m: m[-1].payload == b"offline")
    retained = Client(broker.port).connect().subscribe(f"{PREFIX}/availability")
    try:
        assert retained.wait_for(f"{PREFIX}/availability")[-1].payload == b"offline"
    finally:
        retained.close()


def test_kill_9_leaves_offline_through_the_last_will(broker, model_dir: Path, tmp_path: Path, client) -> None:  # type: ignore[no-untyped-def]
    client.subscribe("edge_agent/killed/availability")
    process = start_agent_process(model_dir, broker.port, "killed", tmp_path / "k.db")
    try:
        client.wait_for(
            "edge_agent/killed/availability", lambda m: m and m[-1].payload == b"online", timeout=60
        )
        process.kill()
        process.wait(10)
        client.wait_for("edge_agent/killed/availability", lambda m: m[-1].payload == b"offline", timeout=15)
    finally:
        if process.poll() is None:
            process.kill()


def test_recordings_streamed_fast_give_exactly_the_cli_detections(  # type: ignore[no-untyped-def]
    broker, make_agent, client, tmp_path: Path, dev_audio: Path, cli_detections
) -> None:
    # 450 s of audio as fast as the broker goes (about 15 MB of queue should the engine fall
    # that far behind): what is checked here is the detections, not the queue's bound, so it
    # gets room for all.
    make_agent(agent_config(broker.port, tmp_path, engine={"queue_mb": 256}))
    client.subscribe(f"{PREFIX}/detection")
    files = sorted(dev_audio.glob("pos/*.wav")) + sorted(dev_audio.glob("neg/*.wav"))
    for path in files:  # one stream after the other, as fast as the broker takes them
        stream_files(client, {stream_name(path.stem): pcm16(path)})
    expected = sum(len(v) for v in cli_detections.values())
    client.wait_for(f"{PREFIX}/detection", lambda m: len(m) >= expected, timeout=60)
    assert_same(detections_by_stream(client), cli_detections, [p.stem for p in files])


@pytest.mark.slow
def test_recordings_streamed_in_real_time_concurrently(  # type: ignore[no-untyped-def]
    broker, make_agent, client, tmp_path: Path, dev_audio: Path, cli_detections
) -> None:
    """All 58 recordings as 58 simultaneous real-time streams (about 11 s of wall time)."""
    make_agent(agent_config(broker.port, tmp_path))
    client.subscribe(f"{PREFIX}/detection")
    files = sorted(dev_audio.glob("pos/*.wav")) + sorted(dev_audio.glob("neg/*.wav"))
    stream_files(client, {stream_name(p.stem): pcm16(p) for p in files}, realtime=True)
    expected = sum(len(v) for v in cli_detections.values())
    events = client.wait_for(f"{PREFIX}/detection", lambda m: len(m) >= expected, timeout=60)
    assert_same(detections_by_stream(client), cli_detections, [p.stem for p in files])
    parsed = [DetectionEvent.from_payload(m.payload) for m in events]
    assert sorted(e.seq for e in parsed) == list(range(len(parsed)))
    print("delays", sorted((e.delay_ms, e.replayed) for e in parsed))
    assert all(not e.replayed and e.delay_ms is not None and 0 < e.delay_ms < 5000 for e in parsed)


def test_twenty_streams_keep_their_own_state(
    broker, make_agent, client, tmp_path: Path, dev_audio: Path
) -> None:  # type: ignore[no-untyped-def]
    """Half of each keyword on two streams must not add up to a detection (rhasspy#209)."""
    make_agent(agent_config(broker.port, tmp_path))
    client.subscribe(f"{PREFIX}/detection")
    positives = sorted(dev_audio.glob("pos/*.wav"))[:10]
    negatives = sorted(dev_audio.glob("neg/*.wav"))[:10]
    streams = {f"pos{i}": pcm16(p) for i, p in enumerate(positives)}
    streams |= {f"neg{i}": pcm16(p) for i, p in enumerate(negatives)}
    stream_files(client, streams, chunk_ms=50)
    client.wait_for(f"{PREFIX}/detection", lambda m: len(m) >= 10, timeout=60)
    found = detections_by_stream(client)
    assert sorted(found) == [f"pos{i}" for i in range(10)]
    assert all(len(events) == 1 for events in found.values())


def test_split_keyword_across_two_streams_is_not_detected(  # type: ignore[no-untyped-def]
    broker, make_agent, client, tmp_path: Path, example_wav: Path
) -> None:
    make_agent(agent_config(broker.port, tmp_path))
    client.subscribe(f"{PREFIX}/#")
    pcm = pcm16(example_wav)
    middle = int(2.15 * 16000) * 2  # between the two 小云 of the example
    stream_files(client, {"a": pcm[:middle] + bytes(32000), "b": bytes(32000) + pcm[middle:]})
    stream_files(client, {"whole": pcm})
    client.wait_for(f"{PREFIX}/detection")
    client.wait_for(f"{PREFIX}/health", lambda m: len(m) >= 2)  # a second later: nothing else came
    assert [m.json()["stream"] for m in client.on(f"{PREFIX}/detection")] == ["whole"]


def test_declared_formats_are_converted(
    broker, make_agent, client, tmp_path: Path, example_wav: Path
) -> None:  # type: ignore[no-untyped-def]
    from edge_agent.audio.resample import resample

    make_agent(agent_config(broker.port, tmp_path))
    client.subscribe(f"{PREFIX}/detection")
    samples = to_mono_16k(read_wav(example_wav))
    stereo48 = resample(samples, 16000, 48000)
    pcm = np.clip(np.round(np.repeat(stereo48[:, None], 2, axis=1)), -32768, 32767).astype("<i2").tobytes()
    # Declared with MQTT 5 user properties on every chunk.
    chunk = 48000 * 2 * 2 // 10
    for offset in range(0, len(pcm), chunk):
        client.publish(
            f"{PREFIX}/audio/props",
            pcm[offset : offset + chunk],
            UserProperty=[("rate", "48000"), ("channels", "2")],
        )
    client.publish(f"{PREFIX}/audio/props/control", '{"action": "end"}', qos=1)
    # Declared once with a control message (what an MQTT 3.1.1 device can do).
    client.publish(
        f"{PREFIX}/audio/control48/control", '{"action": "start", "rate": 48000, "channels": 2}', qos=1
    )
    stream_files(client, {"control48": pcm})
    events = client.wait_for(f"{PREFIX}/detection", lambda m: len(m) >= 2)
    assert sorted(e.json()["stream"] for e in events) == ["control48", "props"]
    assert all(e.json()["keyword"] == "小云小云" for e in events)


def test_idle_stream_is_closed_and_flushed(
    broker, make_agent, client, tmp_path: Path, example_wav: Path
) -> None:  # type: ignore[no-untyped-def]
    agent = make_agent(agent_config(broker.port, tmp_path, audio={"mqtt": {"idle_timeout": 1.0}}))
    client.subscribe(f"{PREFIX}/detection")
    pcm = pcm16(example_wav)
    keyword_end = int(2.6 * 16000) * 2  # stop right after the keyword: only the flush can find it
    stream_files(client, {"quiet": pcm[:keyword_end]}, end=False)
    client.wait_for(f"{PREFIX}/detection", timeout=10)
    # The worker drops the stream right after handing its last detection over, which may
    # reach us first.
    wait_until(lambda: agent.worker.stream_ids() == [])


def test_whole_file_request_over_mqtt5(broker, make_agent, tmp_path: Path, example_wav: Path) -> None:  # type: ignore[no-untyped-def]
    make_agent(agent_config(broker.port, tmp_path))
    requester = Client(broker.port).connect().subscribe("replies/me")
    try:
        correlation = uuid.uuid4().bytes
        requester.publish(
            f"{PREFIX}/detect/request",
            example_wav.read_bytes(),
            qos=1,
            ResponseTopic="replies/me",
            CorrelationData=correlation,
        )
        (reply,) = requester.wait_for("replies/me")
        assert reply.properties.CorrelationData == correlation
        body = reply.json()
        assert body["ok"] is True and body["detected"] is True
        assert body["detections"][0]["keyword"] == "小云小云"
    finally:
        requester.close()


def test_whole_file_request_over_mqtt311(broker, make_agent, tmp_path: Path, example_wav: Path) -> None:  # type: ignore[no-untyped-def]
    make_agent(agent_config(broker.port, tmp_path, mqtt={"protocol": "3.1.1"}))
    old = Client(broker.port, protocol=paho.MQTTv311).connect().subscribe(f"{PREFIX}/detect/response/+")
    try:
        old.publish(f"{PREFIX}/detect/request/req-42", example_wav.read_bytes(), qos=1)
        (reply,) = old.wait_for(f"{PREFIX}/detect/response/req-42")
        body = reply.json()
        assert body["request_id"] == "req-42" and body["detected"] is True
        old.publish(f"{PREFIX}/detect/request/req-43", b"RIFF\x00\x00\x00\x00WAVEjunk", qos=1)
        (bad,) = old.wait_for(f"{PREFIX}/detect/response/req-43")
        assert (bad.json()["ok"] is False and "WAV" in bad.json()["error"]) or "fmt" in bad.json()["error"]
    finally:
        old.close()


BAD_INPUTS = [
    ("audio/s{i}", b"\x01\x02\x03", "bad_audio_chunk", "not a whole number"),
    ("audio/s{i}", b"", "bad_audio_chunk", "empty"),
    ("audio/s{i}", json.dumps({"action": "end"}).encode(), "bad_audio_chunk", "JSON"),
    ("audio/s{i}", encode_wav(np.zeros(1600)), "bad_audio_chunk", "WAV file"),
    ("audio/s{i}", bytes(70_000), "payload_too_large", "exceeds"),
    ("audio/s{i}/control", b"\xff\xfe not json", "bad_payload", "not UTF-8"),
    ("audio/s{i}/control", b'{"action": "pause"}', "bad_payload", "action must be"),
    ("audio/s{i}/control", b'{"action": "start", "rate": 3}', "bad_payload", "sample rate"),
    ("audio/s{i}/control", b"[1, 2]", "bad_payload", "expected a JSON object"),
    ("detect/request/r{i}", b"garbage that is not a wav", "bad_wav", "not a WAV"),
    ("detect/request/r{i}", b"RIFF\x10\x00\x00\x00WAVEfmt \x10\x00\x00\x00", "bad_wav", ""),
    ("detect/request", b"no way to answer this", "bad_request", "response topic"),
]


def test_bad_input_on_every_topic_is_reported_and_others_keep_working(  # type: ignore[no-untyped-def]
    broker, make_agent, client, tmp_path: Path, example_wav: Path
) -> None:
    agent = make_agent(
        agent_config(broker.port, tmp_path, mqtt={"max_payload_bytes": 65536, "protocol": "3.1.1"})
    )
    client.subscribe(f"{PREFIX}/error")
    client.subscribe(f"{PREFIX}/detection")
    good = pcm16(example_wav)
    chunk = 3200
    for index, (template, payload, code, text) in enumerate(BAD_INPUTS):
        # Distinct topics: identical errors on one topic are rate-limited (tested below).
        topic = template.format(i=index)
        # A healthy stream is interleaved with every bad message.
        client.publish(f"{PREFIX}/audio/healthy", good[index * chunk : (index + 1) * chunk])
        client.publish(f"{PREFIX}/{topic}", payload, qos=1)
        errors = client.wait_for(f"{PREFIX}/error", lambda m, n=index: len(m) > n)
        report = errors[index].json()
        assert report["code"] == code, (topic, report)
        assert text in report["message"], (topic, report)
        assert report["topic"] == f"{PREFIX}/{topic}"
    stream_files(client, {"healthy": good[len(BAD_INPUTS) * chunk :]}, end=False)
    client.publish(f"{PREFIX}/audio/healthy/control", b'{"action": "end"}', qos=1)
    (event,) = client.wait_for(f"{PREFIX}/detection")
    assert event.json()["stream"] == "healthy"
    assert agent.worker.alive
    assert sum(agent.errors.counts().values()) == len(BAD_INPUTS)


def test_too_many_streams_are_refused(broker, make_agent, client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    agent = make_agent(agent_config(broker.port, tmp_path, audio={"mqtt": {"max_streams": 2}}))
    client.subscribe(f"{PREFIX}/error")
    for name in ("a", "b", "c"):
        client.publish(f"{PREFIX}/audio/{name}", bytes(3200))
    (report,) = client.wait_for(f"{PREFIX}/error")
    assert report.json()["code"] == "too_many_streams" and report.json()["stream"] == "c"
    assert sorted(agent.worker.stream_ids()) == ["a", "b"]


def test_repeated_errors_are_reported_once_and_counted(broker, make_agent, client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """(The interval and the count carried by the next report: tests/agent/test_errors.py.)"""
    agent = make_agent(agent_config(broker.port, tmp_path))
    client.subscribe(f"{PREFIX}/error")
    for _ in range(50):
        client.publish(f"{PREFIX}/audio/noisy", b"\x01")
    client.publish(f"{PREFIX}/audio/other", b"\x01", qos=1)  # another cause: reported after them
    reports = client.wait_for(f"{PREFIX}/error", lambda m: any(r.json()["stream"] == "other" for r in m))
    assert [r.json()["stream"] for r in reports] == ["noisy", "other"]  # 50 in a burst: one report
    assert agent.errors.count("bad_audio_chunk") == 51


def test_a_burst_of_detections_goes_out_in_order_within_a_small_broker_window(  # type: ignore[no-untyped-def]
    make_agent, tmp_path: Path, example_wav: Path
) -> None:
    """Twenty streams firing on the same chunk, against a broker that takes 3 unacknowledged
    publishes at a time: the outbox hands them over a window at a time, in order, once each."""
    broker = Broker(tmp_path, extra_config="max_inflight_messages 3\n").start()
    client = Client(broker.port).connect().subscribe(f"{PREFIX}/detection")
    try:
        agent = make_agent(agent_config(broker.port, tmp_path))
        assert agent.transport is not None and agent.transport.send_window == 3
        pcm = pcm16(example_wav)
        stream_files(client, {f"s{i}": pcm for i in range(20)})
        received = client.wait_for(f"{PREFIX}/detection", lambda m: len(m) >= 20, timeout=60)
        events = [m.json() for m in received]
        assert sorted(e["stream"] for e in events) == sorted(f"s{i}" for i in range(20))
        seqs = [e["seq"] for e in events]
        assert seqs == sorted(seqs) and len(set(seqs)) == 20  # in order, each once
        assert not any(e["replayed"] for e in events)
        assert agent.transport.stats.reconnects == 0
        outbox = agent.outbox
        assert outbox is not None
        wait_until(lambda: outbox.depth() == 0, timeout=10)  # every one acknowledged
    finally:
        client.close()
        broker.stop()

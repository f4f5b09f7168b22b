"""One wake per room: the pure decision, the service over a real broker, the CLI with real agents."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.fleet.arbiter import ArbiterService, RoomArbiter, room_discovery
from edge_agent.mqtt.arbiter_messages import RoomWake
from edge_agent.mqtt.client import MqttClient
from edge_agent.mqtt.messages import DetectionEvent, iso_utc
from tests.agent.streaming import pcm16
from tests.broker import Client, Received
from tests.fleet.test_homeassistant import discovery_errors, retained_under
from tests.support import agent_config, wait_until

WAKE = "小云小云"
WAKES = "edge_agent/room/+/wake"
# The test's window is wider than the default: three agents share two busy cores here.
OPTIONS = ("--instance", "arb-test", "--homeassistant", "--window", "1500")


def event(
    stream: str = "mic", level: float | None = -30.0, confidence: float = 0.9, **fields: Any
) -> DetectionEvent:
    values: dict[str, Any] = {
        "device": "ignored",
        "stream": stream,
        "keyword": WAKE,
        "confidence": confidence,
        "start": 1.0,
        "end": 1.7,
        "time": iso_utc(1_800_000_000.0),
        "seq": 1,
        "boot_id": "b1",
        "level_dbfs": level,
        "snr_db": 20.0,
        **fields,
    }
    return DetectionEvent(**values)


def kitchen(*devices: str, **options: Any) -> RoomArbiter:
    arbiter = RoomArbiter(**options)
    for device in devices:
        arbiter.set_device(device, "kitchen", {WAKE})
    return arbiter


# --- the decision ------------------------------------------------------------------------------


def test_the_loudest_wins_once_the_window_closes() -> None:
    arbiter = kitchen("a", "b", "c", window_seconds=0.2)
    assert arbiter.offer("a", event(level=-35.0), now=10.0) == "opened"
    assert arbiter.offer("b", event(level=-25.0), now=10.05) == "joined"
    assert arbiter.offer("c", event(level=-40.0, confidence=0.99), now=10.19) == "joined"
    assert arbiter.next_deadline() == pytest.approx(10.2)
    assert arbiter.due(10.19) == []
    (decision,) = arbiter.due(10.2)
    assert decision.winner.device == "b"
    assert [c.device for c in decision.candidates] == ["b", "a", "c"]
    wake = decision.wake("arb", 0.2, now=10.21)
    assert (wake.room, wake.event_type, wake.device, wake.level_dbfs) == ("kitchen", WAKE, "b", -25.0)
    assert wake.id == "b:b1:1" and wake.added_delay_ms == pytest.approx(210.0)
    assert RoomWake.from_payload(wake.to_payload()) == wake
    assert arbiter.next_deadline() is None


def test_equal_levels_go_to_the_most_confident_then_the_smallest_id() -> None:
    arbiter = kitchen("a", "b", "c")
    arbiter.offer("c", event(confidence=0.95), now=0.0)
    arbiter.offer("b", event(confidence=0.95), now=0.0)
    arbiter.offer("a", event(confidence=0.90), now=0.0)
    assert arbiter.due(1.0)[0].winner.device == "b"


def test_a_level_unknown_loses_to_any_known_one() -> None:
    arbiter = kitchen("old", "new")
    arbiter.offer("old", event(level=None, confidence=1.0), now=0.0)
    arbiter.offer("new", event(level=-70.0, confidence=0.5), now=0.0)
    assert arbiter.due(1.0)[0].winner.device == "new"


def test_a_late_detection_of_a_decided_utterance_is_no_second_wake() -> None:
    arbiter = kitchen("a", "b", window_seconds=0.2, holdoff_seconds=1.0)
    arbiter.offer("a", event(), now=0.0)
    assert len(arbiter.due(0.2)) == 1
    assert arbiter.offer("b", event(), now=0.9) == "late"
    assert arbiter.due(5.0) == []
    assert arbiter.offer("b", event(), now=1.3) == "opened"  # a new utterance
    assert arbiter.counts["late"] == 1


def test_rooms_and_keywords_are_decided_apart() -> None:
    arbiter = kitchen("a")
    arbiter.set_device("h", "hall", {WAKE})
    arbiter.offer("a", event(), now=0.0)
    arbiter.offer("h", event(), now=0.1)
    arbiter.offer("a", event(keyword="如家酒店"), now=0.1)
    decisions = arbiter.due(0.25)
    assert [(d.room, d.keyword) for d in decisions] == [("kitchen", WAKE)]
    assert sorted((d.room, d.keyword) for d in arbiter.due(0.31)) == [("hall", WAKE), ("kitchen", "如家酒店")]


def test_replays_and_devices_without_a_room_wake_nobody() -> None:
    arbiter = kitchen("a")
    assert arbiter.offer("a", event(replayed=True), now=0.0) == "replayed"
    assert arbiter.offer("stranger", event(), now=0.0) == "no_room"
    assert arbiter.due(10.0) == []


def test_rooms_given_by_the_operator_win_over_info_and_may_name_a_stream() -> None:
    arbiter = RoomArbiter(rooms={"server/hall-mic": "hall", "sat1": "porch"})
    arbiter.set_device("server", "kitchen", {WAKE})
    arbiter.set_device("sat1", "kitchen", {WAKE})
    assert arbiter.room_of("server", "hall-mic") == "hall"
    assert arbiter.room_of("server", "other") == "kitchen"
    assert arbiter.room_of("sat1", "mic") == "porch"
    assert arbiter.rooms() == {"hall": [WAKE], "kitchen": [WAKE], "porch": [WAKE]}


def test_the_room_event_entity_passes_home_assistants_schema() -> None:
    topic, payload = room_discovery("edge_agent", "homeassistant", "kitchen", [WAKE, "如家酒店"])
    config = json.loads(payload)
    assert topic == "homeassistant/event/edge_agent_room_kitchen/wake/config"
    assert discovery_errors(topic, config) == []
    assert config["state_topic"] == "edge_agent/room/kitchen/wake"
    assert config["event_types"] == [WAKE, "如家酒店"]


# --- the service over a real broker --------------------------------------------------------------


def info(client: Client, device: str, room: str) -> None:
    body = {"device": device, "room": room, "keywords": [{"text": WAKE}], "boot_id": "b1"}
    client.publish(f"edge_agent/{device}/info", json.dumps(body), qos=1, retain=True)


def detect(client: Client, device: str, level: float, seq: int = 1) -> None:
    body = event(level=level, seq=seq).to_dict() | {"device": device}
    client.publish(f"edge_agent/{device}/detection", json.dumps(body), qos=1)


@pytest.fixture()
def start_arbiter(broker) -> Iterator[Callable[..., tuple[ArbiterService, threading.Event]]]:  # type: ignore[no-untyped-def]
    running: list[tuple[threading.Thread, threading.Event]] = []

    def start(instance: str, window_seconds: float = 0.2) -> tuple[ArbiterService, threading.Event]:
        def make_client(**options: Any) -> MqttClient:
            return MqttClient("127.0.0.1", broker.port, client_id=f"test-{instance}", keepalive=5, **options)

        # No hold-off: the tests' utterances follow each other at once.
        service = ArbiterService(make_client, "edge_agent", instance, RoomArbiter(window_seconds, 0.0))
        stop = threading.Event()
        thread = threading.Thread(target=service.run, args=(stop,), daemon=True)
        thread.start()
        running.append((thread, stop))
        return service, stop

    yield start
    for thread, stop in running:
        stop.set()
        thread.join(10)


def presence_of(client: Client, instance: str, present: bool) -> None:
    topic = f"edge_agent/arbiter/{instance}/presence"
    client.wait_for(topic, lambda m: bool(m) and bool(m[-1].payload) == present)


def test_two_instances_publish_each_wake_once_and_the_second_takes_over(  # type: ignore[no-untyped-def]
    broker, client, start_arbiter
) -> None:
    client.subscribe(WAKES)
    client.subscribe("edge_agent/arbiter/+/presence")
    info(client, "a", "kitchen")
    info(client, "b", "kitchen")
    info(client, "h", "hall")
    first, stop_first = start_arbiter("arb-1")
    presence_of(client, "arb-1", True)
    second, _ = start_arbiter("arb-2")
    presence_of(client, "arb-2", True)
    detect(client, "a", -40.0)
    detect(client, "b", -20.0)
    client.wait_for(WAKES, lambda m: len(m) >= 1)
    detect(client, "h", -30.0)  # another room: its wake comes after any repeat of the first
    wakes = [RoomWake.from_payload(m.payload) for m in client.wait_for(WAKES, lambda m: len(m) >= 2)]
    assert [(w.room, w.device, w.arbiter) for w in wakes] == [
        ("kitchen", "b", "arb-1"),
        ("hall", "h", "arb-1"),
    ]
    # The second decides on its own clock: once it has decided both (a later event than any
    # publish of its own), it must have published nothing.
    wait_until(lambda: second.arbiter.counts["wakes"] == 2, timeout=30)
    assert second.published == 0  # decided alike, silent
    # The first stops (its presence is cleared): the second publishes from now on.
    stop_first.set()
    presence_of(client, "arb-1", False)
    detect(client, "a", -25.0, seq=2)
    detect(client, "b", -30.0, seq=2)
    latest = client.wait_for(WAKES, lambda m: len(m) >= 3)[-1]
    assert (latest.json()["device"], latest.json()["arbiter"]) == ("a", "arb-2")
    assert first.published == 2


def test_a_bad_detection_is_counted_and_the_next_one_still_wakes(  # type: ignore[no-untyped-def]
    broker, client, start_arbiter
) -> None:
    client.subscribe(WAKES)
    client.subscribe("edge_agent/arbiter/+/presence")
    info(client, "a", "kitchen")
    service, _ = start_arbiter("arb-1")
    presence_of(client, "arb-1", True)
    client.publish("edge_agent/a/detection", b"not json", qos=1)
    client.publish("edge_agent/a/detection", json.dumps(event(level="loud").to_dict()), qos=1)  # type: ignore[arg-type]
    detect(client, "a", -30.0)
    (wake,) = client.wait_for(WAKES)
    assert wake.json()["device"] == "a" and service.bad_payloads == 2


# --- three real agents, the real CLI -------------------------------------------------------------


def scaled(pcm: bytes, factor: float) -> bytes:
    samples = np.frombuffer(pcm, "<i2").astype(np.float64) * factor
    return np.clip(np.round(samples), -32768, 32767).astype("<i2").tobytes()


def play_side_by_side(client: Client, streams: dict[str, bytes], chunk_ms: int = 100) -> None:
    """Each device's audio on its own ``mic`` stream, a chunk of each in turn, in real time."""
    chunk = 16000 * 2 * chunk_ms // 1000
    started = time.monotonic()
    for index, offset in enumerate(range(0, max(len(a) for a in streams.values()), chunk)):
        delay = started + index * chunk_ms / 1000 - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # pacing a real-time sender, not waiting for something to happen
        for device, audio in streams.items():
            client.publish(f"edge_agent/{device}/audio/mic", audio[offset : offset + chunk])
    for device in streams:
        client.publish(f"edge_agent/{device}/audio/mic/control", json.dumps({"action": "end"}), qos=1)


def test_three_agents_in_a_room_hear_one_utterance_and_one_wake_names_the_loudest(  # type: ignore[no-untyped-def]
    broker, make_agent, client, tmp_path: Path, example_wav: Path
) -> None:
    levels = {"dev-a": 0.5, "dev-b": 1.0, "dev-c": 0.25}  # dev-b is the closest
    for device in levels:
        config = agent_config(broker.port, tmp_path, device=device)
        make_agent(replace(config, device=replace(config.device, room="kitchen")))
    client.subscribe(WAKES)
    client.subscribe("edge_agent/+/detection")
    client.subscribe("edge_agent/arbiter/+/presence")
    client.subscribe("homeassistant/event/+/+/config")
    arbiter = subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "arbiter", "--broker", f"127.0.0.1:{broker.port}", *OPTIONS],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        presence_of(client, "arb-test", True)
        client.wait_for("homeassistant/event/edge_agent_room_kitchen/wake/config")
        # One utterance, heard by each device at its own distance, in real time, side by side.
        pcm = pcm16(example_wav)
        streams = {device: scaled(pcm, factor) for device, factor in levels.items()}
        play_side_by_side(client, streams)
        detections = client.wait_for("edge_agent/+/detection", lambda m: len(m) >= 3, timeout=60)
        assert sorted(m.topic.split("/")[1] for m in detections) == sorted(levels)
        (wake,) = client.wait_for(WAKES, timeout=15)
        # A detection in another room, after the three: any second kitchen wake comes before its wake.
        client.publish(
            "edge_agent/sentinel/info", json.dumps({"room": "hall", "keywords": []}), qos=1, retain=True
        )
        client.publish("edge_agent/sentinel/detection", json.dumps(event().to_dict()), qos=1)
        wakes: list[Received] = client.wait_for(WAKES, lambda m: any("/hall/" in w.topic for w in m))
        assert [w.topic for w in wakes] == ["edge_agent/room/kitchen/wake", "edge_agent/room/hall/wake"]
        body = RoomWake.from_payload(wake.payload)
        assert body.device == "dev-b" and body.event_type == WAKE
        assert sorted(c["device"] for c in body.candidates) == sorted(levels)
        by_device = {c["device"]: c["level_dbfs"] for c in body.candidates}
        assert by_device["dev-b"] > by_device["dev-a"] > by_device["dev-c"]
        assert wake.properties is not None and wake.properties.MessageExpiryInterval > 0
        (config,) = retained_under(broker.port, "homeassistant/event/+/+/config")  # for a later HA too
        assert config.topic == "homeassistant/event/edge_agent_room_kitchen/wake/config"
        assert discovery_errors(config.topic, config.json()) == []
    finally:
        arbiter.terminate()
        _, stderr = arbiter.communicate(timeout=15)
    assert arbiter.returncode == 0, stderr.decode()
    presence_of(client, "arb-test", False)  # a clean stop clears its presence


def test_when_the_active_instance_crashes_the_other_takes_over(broker, client) -> None:  # type: ignore[no-untyped-def]
    """kill -9: the broker fires the crashed instance's last will (at once here, where the OS
    closes the socket; after 1.5 x keep-alive when its host vanishes), which clears its
    presence; the stand-in publishes from then on."""
    client.subscribe(WAKES)
    client.subscribe("edge_agent/arbiter/+/presence")
    info(client, "a", "kitchen")
    processes = {}
    for instance in ("arb-1", "arb-2"):
        options = ("--instance", instance, "--keepalive", "5", "--holdoff", "0")
        processes[instance] = subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "arbiter", "--broker", f"127.0.0.1:{broker.port}", *options],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        presence_of(client, instance, True)
    try:
        detect(client, "a", -30.0, seq=1)
        assert client.wait_for(WAKES)[-1].json()["arbiter"] == "arb-1"
        processes["arb-1"].kill()
        presence_of(client, "arb-1", False)  # its last will
        detect(client, "a", -30.0, seq=2)
        wakes = client.wait_for(WAKES, lambda m: len(m) >= 2)
        assert [w.json()["arbiter"] for w in wakes] == ["arb-1", "arb-2"]
        assert [w.json()["id"] for w in wakes] == ["a:b1:1", "a:b1:2"]
    finally:
        for process in processes.values():
            process.kill()
            process.wait(10)


def test_an_info_with_keywords_of_the_wrong_shape_is_ignored_not_fatal(  # type: ignore[no-untyped-def]
    broker, client, start_arbiter
) -> None:
    client.subscribe(WAKES)
    client.subscribe("edge_agent/arbiter/+/presence")
    client.publish("edge_agent/odd/info", json.dumps({"room": "kitchen", "keywords": 5}), qos=1, retain=True)
    client.publish("edge_agent/worse/info", json.dumps({"room": 7}), qos=1, retain=True)
    info(client, "a", "kitchen")
    service, _ = start_arbiter("arb-1")
    presence_of(client, "arb-1", True)
    detect(client, "odd", -20.0)  # in the kitchen, though its keywords could not be read
    detect(client, "a", -30.0)
    (wake,) = client.wait_for(WAKES)
    assert wake.json()["device"] == "odd" and service.bad_payloads == 1  # the room 7

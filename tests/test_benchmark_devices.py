"""The MQTT benchmarks' thin devices speak MQTT 3.1.1 as a broker and paho understand it."""

from __future__ import annotations

from pathlib import Path

import paho.mqtt.client as paho
import pytest

from benchmarks.devices import DeviceFleet, DeviceFleetError, publish_prefix, remaining_length
from tests.broker import Broker, Client, free_port


@pytest.mark.parametrize(
    ("length", "encoded"),
    [(0, "00"), (127, "7f"), (128, "8001"), (16_383, "ff7f"), (16_384, "808001"), (268_435_455, "ffffff7f")],
)
def test_remaining_lengths_are_encoded_as_the_standard_gives_them(length: int, encoded: str) -> None:
    assert remaining_length(length).hex() == encoded


def test_a_length_no_packet_can_hold_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot hold"):
        remaining_length(268_435_456)


def test_a_publish_prefix_is_its_fixed_header_and_topic() -> None:
    assert publish_prefix("a/b", 3).hex() == "30" + "08" + "0003" + b"a/b".hex()


def test_every_round_reaches_a_subscriber_in_order(broker: Broker) -> None:
    listener = Client(broker.port, protocol=paho.MQTTv311).connect().subscribe("fleet/#", qos=0)
    fleet = DeviceFleet("127.0.0.1", broker.port, "test-devices")
    topics = ["fleet/s0", "fleet/s1", "fleet/s2"]
    # Payloads whose lengths need one, two and three bytes of remaining length.
    sizes = [10, 3_200, 20_000]
    sent = []
    for round_index in range(3):
        payloads = [bytes([round_index + k]) * size for k, size in enumerate(sizes)]
        fleet.publish_round(topics, payloads)
        sent += list(zip(topics, payloads, strict=True))
    fleet.publish_round(["fleet/last"], [b"end"])
    fleet.close()
    received = listener.wait_for("fleet/#", lambda found: any(m.topic == "fleet/last" for m in found))
    listener.close()
    assert [(m.topic, m.payload) for m in received] == [*sent, ("fleet/last", b"end")]


def test_a_broker_that_refuses_the_connection_is_an_error(tmp_path: Path) -> None:
    port = free_port()
    closed = Broker(tmp_path, extra_config=f"listener {port} 127.0.0.1\nallow_anonymous false\n", port=port)
    closed.start()
    try:
        with pytest.raises(DeviceFleetError, match="refused"):
            DeviceFleet("127.0.0.1", port, "test-devices")
    finally:
        closed.stop()

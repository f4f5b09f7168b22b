"""MqttTransport against a real mosquitto: what the rest of the agent relies on."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.mqtt.transport import MqttTransport
from tests.broker import Broker, Client
from tests.support import agent_config


@pytest.mark.parametrize("bad_topic", ["a/\udcac/response", "a/+/response", ""])
def test_a_topic_mqtt_cannot_carry_drops_that_publish_only(bad_topic: str, tmp_path: Path) -> None:
    """Topics built from inbound names (request ids) may be unencodable; the link must survive it."""
    broker = Broker(tmp_path).start()
    transport = MqttTransport(agent_config(broker.port, tmp_path).mqtt, "transport-test")
    watcher = Client(broker.port).connect().subscribe("ok")
    try:
        transport.start()
        assert transport.wait_connected(10)
        assert transport.publish(bad_topic, b"x", qos=1) is None
        assert transport.publish("ok", b"still here", qos=1) is not None
        received = watcher.wait_for("ok")
        assert [m.payload for m in received] == [b"still here"]
    finally:
        transport.stop()
        watcher.close()
        broker.stop()

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


def test_read_buffer_serves_small_reads_from_one_large_read() -> None:
    import socket

    from edge_agent.mqtt.transport import _ReadBuffer

    left, right = socket.socketpair()
    left.setblocking(False)
    try:
        reader = _ReadBuffer(left)
        with pytest.raises(BlockingIOError):  # nothing yet: paho sees "try again", as from a socket
            reader.recv(1)
        right.sendall(b"\x30\x05hello")
        assert reader.recv(1) == b"\x30"
        assert reader.buffered() == 6 and reader.pending() == 6  # paho will not wait in select()
        assert reader.recv(1) == b"\x05"
        assert reader.recv(100) == b"hello"
        assert reader.buffered() == 0
        assert reader.fileno() == left.fileno()  # everything else is the real socket's
        right.close()
        assert reader.recv(1) == b""  # the peer closed
    finally:
        left.close()

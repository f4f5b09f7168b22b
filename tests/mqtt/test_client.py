"""MqttClient, the command-line tools' client, against a real mosquitto."""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.mqtt.client import MqttClient, MqttClientError
from edge_agent.mqtt.transport import InboundMessage
from tests.broker import Broker, Client, free_port


@pytest.fixture()
def client(broker: Broker) -> Iterator[MqttClient]:
    instance = MqttClient("127.0.0.1", broker.port).connect(timeout=10)
    yield instance
    instance.close()


def test_an_unreachable_broker_is_a_clear_error_at_once() -> None:
    port = free_port()
    with pytest.raises(
        MqttClientError, match=f"cannot connect to the broker 127.0.0.1:{port}: connection refused"
    ):
        MqttClient("127.0.0.1", port).connect(timeout=10)


def test_a_broker_that_never_answers_is_an_error_after_the_timeout() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never sends a CONNACK
        port = silent.getsockname()[1]
        with pytest.raises(MqttClientError, match=rf"no answer \(CONNACK\) .*127.0.0.1:{port} within 0.5 s"):
            MqttClient("127.0.0.1", port).connect(timeout=0.5)


@pytest.fixture()
def locked_broker(tmp_path: Path) -> Iterator[Broker]:
    """Only user "fleet" (password "secret") may connect; it may publish to and read allowed/#."""
    passwords, acl = tmp_path / "passwd", tmp_path / "acl"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "fleet", "secret"], check=True)
    acl.write_text("user fleet\ntopic readwrite allowed/#\n", encoding="utf-8")
    port = free_port()
    broker = Broker(
        tmp_path,
        port=port,
        extra_config=f"listener {port} 127.0.0.1\nallow_anonymous false\n"
        f"password_file {passwords}\nacl_file {acl}\n",
    ).start()
    yield broker
    broker.stop()


def test_a_refused_login_says_why(locked_broker: Broker) -> None:
    with pytest.raises(MqttClientError, match="refused the connection: Not authorized"):
        MqttClient("127.0.0.1", locked_broker.port, username="fleet", password="wrong").connect()


def test_a_publish_the_broker_refuses_is_an_error(locked_broker: Broker) -> None:
    with MqttClient("127.0.0.1", locked_broker.port, username="fleet", password="secret").connect() as client:
        client.publish("allowed/x", b"fine")
        with pytest.raises(MqttClientError, match="refused the publish to forbidden/x: Not authorized"):
            client.publish("forbidden/x", b"no")
        assert client.connected  # a refusal, not a broken connection


def test_subscribe_returns_after_the_suback_and_retained_messages_follow(
    broker: Broker, client: MqttClient
) -> None:
    publisher = Client(broker.port).connect()
    try:
        publisher.publish("state/a", b"retained", qos=1, retain=True)
        assert client.subscribe("state/#", "other/+") == {}
        message = client.receive(10, topic_filter="state/#")
        assert message is not None
        assert (message.topic, message.payload, message.retain) == ("state/a", b"retained", True)
        publisher.publish("other/b", b"live", qos=1)
        live = client.receive(10)
        assert live is not None and (live.payload, live.retain) == (b"live", False)
        assert client.receive(0) is None  # nothing else queued
    finally:
        publisher.close()


def test_publish_returns_once_acknowledged_with_its_properties(broker: Broker, client: MqttClient) -> None:
    watcher = Client(broker.port).connect().subscribe("props")
    try:
        client.publish(
            "props",
            b"x",
            qos=1,
            expiry_seconds=30,
            correlation_data=b"c-1",
            user_properties=[("origin", "test")],
        )
        (received,) = watcher.wait_for("props")
        assert received.properties.CorrelationData == b"c-1"
        assert received.properties.UserProperty == [("origin", "test")]
        assert 0 < received.properties.MessageExpiryInterval <= 30
    finally:
        watcher.close()


def test_request_waits_for_the_reply_with_its_correlation_data(broker: Broker, client: MqttClient) -> None:
    """The responder answers on the request's response topic with its correlation data (a
    stale answer with other correlation data first); messages on other topics stay queued."""
    answered = threading.Event()

    def respond(message: InboundMessage) -> None:
        assert message.response_topic is not None
        responder.publish(message.response_topic, b"stale", correlation_data=b"other", wait=False)
        responder.publish(
            message.response_topic,
            b"pong:" + message.payload,
            correlation_data=message.correlation_data,
            user_properties=[("served-by", "responder")],
            wait=False,
        )
        answered.set()

    responder = MqttClient("127.0.0.1", broker.port, on_message=respond).connect()
    try:
        responder.subscribe("service/ping")
        client.subscribe("elsewhere")
        publisher = Client(broker.port).connect()
        publisher.publish("elsewhere", b"queued", qos=1)
        publisher.close()
        reply = client.request("service/ping", b"42", "replies/me", timeout=10)
        assert answered.is_set()
        assert reply.payload == b"pong:42" and reply.user_properties == {"served-by": "responder"}
        assert reply.topic == "replies/me" and reply.correlation_data is not None
        elsewhere = client.receive(10, topic_filter="elsewhere")
        assert elsewhere is not None and elsewhere.payload == b"queued"
    finally:
        responder.close()


def test_request_without_a_reply_is_an_error(client: MqttClient) -> None:
    with pytest.raises(MqttClientError, match=r"no answer on replies/none within 0\.2 s"):
        client.request("nobody/listens", b"?", "replies/none", timeout=0.2)


def test_after_a_broker_restart_it_reconnects_and_subscribes_again(broker: Broker) -> None:
    client = MqttClient("127.0.0.1", broker.port, reconnect_delay=(0.1, 0.5)).connect()
    try:
        client.subscribe("after/restart")
        broker.restart()
        publisher = Client(broker.port).connect()
        # Retained, so it is delivered whenever the client's new subscription is made.
        publisher.publish("after/restart", b"again", qos=1, retain=True)
        publisher.close()
        message = client.receive(20, topic_filter="after/restart")
        assert message is not None and message.payload == b"again"
        assert client.connected
    finally:
        client.close()


def test_mqtt_311_carries_messages_but_not_requests(broker: Broker) -> None:
    with MqttClient("127.0.0.1", broker.port, mqtt5=False).connect() as client:
        client.subscribe("old/#")
        client.publish("old/x", b"hello", correlation_data=b"dropped")  # properties left out
        message = client.receive(10)
        assert message is not None and (message.payload, message.correlation_data) == (b"hello", None)
        with pytest.raises(MqttClientError, match="needs MQTT 5"):
            client.request("old/x", b"?", "old/reply")


def test_many_quick_publishes_all_arrive_in_order(broker: Broker) -> None:
    """Everything is written by the client's thread, however fast the caller publishes."""
    watcher = Client(broker.port).connect().subscribe("fast", qos=0)
    try:
        with MqttClient("127.0.0.1", broker.port).connect() as client:
            for index in range(2000):
                client.publish("fast", index.to_bytes(2, "big") * 1600, qos=0)
            client.publish("fast", b"end", qos=1)
        received = watcher.wait_for("fast", lambda found: bool(found) and found[-1].payload == b"end")
        assert [int.from_bytes(m.payload[:2], "big") for m in received[:-1]] == list(range(2000))
    finally:
        watcher.close()


def test_close_disconnects_cleanly_and_closes_every_socket(broker: Broker) -> None:
    client = MqttClient("127.0.0.1", broker.port).connect()
    client.close()
    assert client._client.socket() is None and client._wakeup is None
    assert not client.connected
    client.close()  # twice is fine

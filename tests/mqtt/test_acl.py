"""The documented mosquitto ACL, on a real broker: a device is confined to its own subtree."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from tests.broker import Broker, Client, free_port
from tests.support import agent_config, wait_until

REPO = Path(__file__).resolve().parents[2]
USERS = {"dev1": "secret-1", "dev2": "secret-2", "fleet": "secret-fleet"}


@pytest.fixture()
def acl_broker(tmp_path: Path):  # type: ignore[no-untyped-def]
    tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    passwords = tmp_path / "passwd"
    for index, (user, password) in enumerate(USERS.items()):
        subprocess.run(
            [tool, "-b", *(["-c"] if index == 0 else []), str(passwords), user, password], check=True
        )
    port = free_port()
    shipped = (REPO / "deploy" / "mosquitto" / "edge-agent.conf").read_text(encoding="utf-8")
    settings = shipped.replace("/etc/mosquitto/passwd", str(passwords)).replace(
        "/etc/mosquitto/edge-agent.acl", str(REPO / "deploy" / "mosquitto" / "edge-agent.acl")
    )
    broker = Broker(tmp_path, port=port, extra_config=f"listener {port} 127.0.0.1\n{settings}").start()
    yield broker
    broker.stop()


def login(port: int, user: str) -> Client:
    client = Client(port)
    client.client.username_pw_set(user, USERS[user])
    return client.connect()


def test_agent_works_under_the_acl_and_cannot_reach_another_device(  # type: ignore[no-untyped-def]
    acl_broker, make_agent, tmp_path: Path, example_wav: Path
) -> None:
    secret = tmp_path / "password"
    secret.write_text(USERS["dev1"] + "\n", encoding="utf-8")
    make_agent(
        agent_config(acl_broker.port, tmp_path, mqtt={"username": "dev1", "password_file": str(secret)})
    )
    fleet = login(acl_broker.port, "fleet").subscribe("edge_agent/#")
    # Another device's credentials (with the shipped settings, one connection per user: the
    # agent's own credentials would take over its session).
    intruder = login(acl_broker.port, "dev2")
    try:
        fleet.wait_for("edge_agent/dev1/availability", lambda m: m and m[-1].payload == b"online")
        # dev2's credentials cannot publish under dev1, nor read dev1's topics.
        info = intruder.client.publish("edge_agent/dev1/detection", b'{"forged": true}', qos=1)
        info.wait_for_publish(5)
        result, _ = intruder.client.subscribe("edge_agent/dev1/#", qos=1)
        assert result == paho.MQTT_ERR_SUCCESS
        fleet.publish("edge_agent/dev1/detect/request/r1", example_wav.read_bytes(), qos=1)
        (reply,) = fleet.wait_for("edge_agent/dev1/detect/response/r1")
        assert reply.json()["detected"] is True
        # The answer was routed to every allowed subscriber before the fleet's marker on the
        # intruder's own topic: whatever of dev1 the intruder could see came before it.
        intruder.subscribe("edge_agent/dev2/marker")
        fleet.publish("edge_agent/dev2/marker", b"after", qos=1)
        intruder.wait_for("edge_agent/dev2/marker")
        assert [m.json() for m in fleet.on("edge_agent/dev1/detection")] == []  # the forgery never arrived
        assert intruder.on("edge_agent/dev1/#") == []  # and dev1's traffic stays invisible to dev2
    finally:
        fleet.close()
        intruder.close()


def test_wrong_password_is_refused_and_reported(acl_broker, make_agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = agent_config(acl_broker.port, tmp_path, mqtt={"username": "dev1", "password": "wrong"})
    agent = make_agent(config, start=False)
    agent.start()
    transport = agent.transport
    assert transport is not None
    wait_until(lambda: "refused" in (transport.stats.last_error or ""), timeout=10)
    assert not agent.transport.connected
    assert "broker refused the connection" in (agent.transport.stats.last_error or "")


def test_another_user_cannot_take_over_a_device_s_session(  # type: ignore[no-untyped-def]
    acl_broker, make_agent, tmp_path: Path
) -> None:
    """With the shipped settings a client's id is its user name: connecting under other
    credentials with the agent's client id neither disconnects the agent nor fires its last
    will."""
    secret = tmp_path / "password"
    secret.write_text(USERS["dev1"] + "\n", encoding="utf-8")
    agent = make_agent(
        agent_config(acl_broker.port, tmp_path, mqtt={"username": "dev1", "password_file": str(secret)})
    )
    fleet = login(acl_broker.port, "fleet").subscribe("edge_agent/dev1/#")
    impostor = Client(acl_broker.port, client_id=agent.transport.client_id)
    impostor.client.username_pw_set("dev2", USERS["dev2"])
    try:
        fleet.wait_for("edge_agent/dev1/availability", lambda m: m and m[-1].payload == b"online")
        impostor.connect()
        # The agent still answers after the impostor is in: it was never knocked off.
        fleet.publish("edge_agent/dev1/detect/request/r2", b"not a wav", qos=1)
        fleet.wait_for("edge_agent/dev1/detect/response/r2")
        assert [m.payload for m in fleet.on("edge_agent/dev1/availability")] == [b"online"]
        assert agent.transport.stats.reconnects == 0
    finally:
        impostor.close()
        fleet.close()

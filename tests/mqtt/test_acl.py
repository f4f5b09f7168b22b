"""The documented mosquitto ACL, on a real broker: a device is confined to its own subtree."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from tests.broker import Broker, Client, free_port
from tests.support import agent_config

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
    broker = Broker(
        tmp_path,
        port=port,
        extra_config=(
            f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {passwords}\n"
            f"acl_file {REPO / 'deploy' / 'mosquitto' / 'edge-agent.acl'}\n"
        ),
    ).start()
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
    intruder = login(acl_broker.port, "dev1")
    try:
        fleet.wait_for("edge_agent/dev1/availability", lambda m: m and m[-1].payload == b"online")
        fleet.publish("edge_agent/dev1/detect/request/r1", example_wav.read_bytes(), qos=1)
        (reply,) = fleet.wait_for("edge_agent/dev1/detect/response/r1")
        assert reply.json()["detected"] is True

        # dev1's credentials cannot publish under dev2, nor read dev2's topics.
        info = intruder.client.publish("edge_agent/dev2/detection", b'{"forged": true}', qos=1)
        info.wait_for_publish(5)
        result, _ = intruder.client.subscribe("edge_agent/dev2/#", qos=1)
        assert result == paho.MQTT_ERR_SUCCESS
        login(acl_broker.port, "dev2").publish("edge_agent/dev2/health", b"{}", qos=1)
        time.sleep(0.5)
        assert fleet.on("edge_agent/dev2/detection") == []  # the forged message never arrived
        assert intruder.on("edge_agent/dev2/#") == []  # and dev2's traffic stays invisible to dev1
    finally:
        fleet.close()
        intruder.close()


def test_wrong_password_is_refused_and_reported(acl_broker, make_agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = agent_config(acl_broker.port, tmp_path, mqtt={"username": "dev1", "password": "wrong"})
    agent = make_agent(config, start=False)
    agent.start()
    assert agent.transport is not None
    deadline = time.monotonic() + 10
    while "refused" not in (agent.transport.stats.last_error or "") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not agent.transport.connected
    assert "broker refused the connection" in (agent.transport.stats.last_error or "")

"""Remote commands against real agents and a real mosquitto."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from edge_agent.config import load_config, merge_update, remote_overrides_path
from edge_agent.fleet.commands import CommandProcessor
from tests.agent.streaming import pcm16, stream_files
from tests.broker import Client, free_port
from tests.fleet.helpers import command, sentinel_detection, wait_ready
from tests.support import agent_config, start_agent_process


def commanded_agent(make_agent, port: int, tmp_path: Path, device: str = "dev1", groups=(), **sections):  # type: ignore[no-untyped-def]
    """A started agent with the command processor, its command topics subscribed."""
    config = agent_config(port, tmp_path, device=device, **sections)
    if groups:
        config = merge_update(config, {"device": {"groups": list(groups)}})
    agent = make_agent(config, integrations=lambda agent: [CommandProcessor(agent)])
    wait_ready(port, agent)
    return agent


def test_ping_one_device_and_the_whole_fleet(broker, make_agent, client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    agents = [commanded_agent(make_agent, broker.port, tmp_path, device=f"dev{i}") for i in range(3)]
    (one,) = command(client, "edge_agent/dev1/cmd/ping")
    assert one["ok"] and one["device"] == "dev1" and one["result"]["pong"] is True
    assert one["result"]["boot_id"] == agents[1].boot_id
    everyone = command(client, "edge_agent/all/cmd/ping", expect=3)
    assert sorted(answer["device"] for answer in everyone) == ["dev0", "dev1", "dev2"]
    assert all(answer["ok"] for answer in everyone)


def test_group_commands_reach_only_the_group(broker, make_agent, client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    commanded_agent(make_agent, broker.port, tmp_path, device="kitchen1", groups=["kitchen"])
    commanded_agent(make_agent, broker.port, tmp_path, device="hall1", groups=["hall"])
    reply = f"replies/{uuid.uuid4().hex}"
    client.subscribe(reply)
    client.publish(
        "edge_agent/group/kitchen/cmd/ping", json.dumps({"id": "group"}), qos=1, ResponseTopic=reply
    )
    # hall1 answers its commands in the order they arrive: had it received the group's ping, its
    # answer would come before the answer to this one.
    client.publish("edge_agent/hall1/cmd/ping", json.dumps({"id": "later"}), qos=1, ResponseTopic=reply)
    expected = {("group", "kitchen1"), ("later", "hall1")}
    answers = client.wait_for(reply, lambda m: {(a.json()["id"], a.json()["device"]) for a in m} >= expected)
    assert [a.json()["device"] for a in answers if a.json()["id"] == "group"] == ["kitchen1"]


def test_get_config_masks_secrets(broker, make_agent, client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    commanded_agent(make_agent, broker.port, tmp_path, mqtt={"username": "u", "password": "hunter2"})
    # The broker here allows anonymous clients; the agent sends its credentials anyway.
    (answer,) = command(client, "edge_agent/dev1/cmd/get_config")
    assert answer["ok"]
    config = answer["result"]["config"]
    assert config["mqtt"]["password"] == "***" and config["keywords"][0]["text"] == "小云小云"


def test_set_config_keyword_takes_effect_on_the_next_audio(  # type: ignore[no-untyped-def]
    broker, make_agent, client, tmp_path: Path, dev_audio: Path, transcripts, example_wav: Path
) -> None:
    agent = commanded_agent(make_agent, broker.port, tmp_path)
    client.subscribe("edge_agent/dev1/detection")
    hotel = next(dev_audio / name for name, text in transcripts.items() if "如家酒店" in text)
    stream_files(client, {"before": pcm16(hotel)})
    sentinel_detection(client, pcm16(example_wav))  # whatever "before" gives is in by now
    detected = [m.json()["stream"] for m in client.on("edge_agent/dev1/detection")]
    assert detected == ["sentinel"]  # not a keyword yet

    (answer,) = command(client, "edge_agent/dev1/cmd/set_config", {"keywords": ["小云小云", "如家酒店"]})
    assert answer["ok"] and answer["result"]["keywords"] == ["小云小云", "如家酒店"]
    assert answer["restart_required"] == []
    assert answer["result"]["persisted"] is False  # no config file to persist next to
    stream_files(client, {"after": pcm16(hotel)})
    found = client.wait_for(
        "edge_agent/dev1/detection", lambda m: any(e.json()["stream"] == "after" for e in m)
    )
    (event,) = [e for e in found if e.json()["stream"] == "after"]
    assert event.json()["keyword"] == "如家酒店"
    assert [k.text for k in agent.config.keywords] == ["小云小云", "如家酒店"]


@pytest.mark.parametrize(
    "update, reason",
    [
        ({"keywords": ["小☃"]}, "character '☃'"),
        ({"keywords": [{"text": "小云小云", "threshold": 7}]}, "keywords[0].threshold"),
        ({"engine": {"hold": "soon"}}, "engine.hold"),
        ({"no_such_section": {}}, "no_such_section: unknown key"),
        ({}, "needs the keys to change"),
    ],
)
def test_invalid_set_config_is_rejected_and_the_old_config_still_serves(  # type: ignore[no-untyped-def]
    update, reason: str, broker, make_agent, client, tmp_path: Path, example_wav: Path
) -> None:
    agent = commanded_agent(make_agent, broker.port, tmp_path)
    before = agent.config
    (answer,) = command(client, "edge_agent/dev1/cmd/set_config", update)
    assert answer["ok"] is False and reason in answer["error"]
    assert agent.config == before
    client.subscribe("edge_agent/dev1/detection")
    stream_files(client, {"still": pcm16(example_wav)})
    assert client.wait_for("edge_agent/dev1/detection")[0].json()["keyword"] == "小云小云"


def test_restart_required_keys_are_reported(broker, make_agent, client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    commanded_agent(make_agent, broker.port, tmp_path)
    (answer,) = command(
        client, "edge_agent/dev1/cmd/set_config", {"engine": {"threads": 2}, "health": {"interval": 2}}
    )
    assert answer["ok"] and answer["restart_required"] == ["engine.threads"]


def test_connection_settings_are_tried_then_kept_or_put_back(  # type: ignore[no-untyped-def]
    broker, make_agent, client, tmp_path: Path
) -> None:
    agent = commanded_agent(make_agent, broker.port, tmp_path, commands={"connection_trial": 5})
    (kept,) = command(client, "edge_agent/dev1/cmd/set_config", {"mqtt": {"keepalive": 45}})
    assert kept["ok"] and kept["restart_required"] == []
    assert agent.transport.config.keepalive == 45 and agent.config.mqtt.keepalive == 45
    assert agent.transport.stats.reconnects == 1  # it did connect with them
    (refused,) = command(
        client, "edge_agent/dev1/cmd/set_config", {"mqtt": {"port": free_port()}}, timeout=30
    )
    assert not refused["ok"] and "previous settings are back" in refused["error"]
    assert agent.config.mqtt.port == broker.port and agent.transport.config.port == broker.port
    (pong,) = command(client, "edge_agent/dev1/cmd/ping")  # online again, with the old settings
    assert pong["ok"]


def test_mute_and_unmute(broker, make_agent, client, tmp_path: Path, example_wav: Path) -> None:  # type: ignore[no-untyped-def]
    agent = commanded_agent(make_agent, broker.port, tmp_path)
    client.subscribe("edge_agent/dev1/detection")
    (muted,) = command(client, "edge_agent/dev1/cmd/mute")
    assert muted["ok"] and muted["result"]["muted"] is True
    stream_files(client, {"quiet": pcm16(example_wav)})
    # The engine worker applies the unmute after the quiet audio, which arrived before it.
    (unmuted,) = command(client, "edge_agent/dev1/cmd/unmute")
    assert unmuted["ok"] and unmuted["result"]["muted"] is False
    stream_files(client, {"loud": pcm16(example_wav)})
    client.wait_for("edge_agent/dev1/detection", lambda m: any(e.json()["stream"] == "loud" for e in m))
    # The loud stream's detection comes after anything the quiet one could have given.
    assert [e.json()["stream"] for e in client.on("edge_agent/dev1/detection")] == ["loud"]
    # Home Assistant's switch sends {"muted": false} to mute: the same command.
    (again,) = command(client, "edge_agent/dev1/cmd/mute", {"muted": True})
    assert again["result"]["muted"] is True and agent.config.engine.muted is True


def test_reload_model(broker, make_agent, client, tmp_path: Path, example_wav: Path) -> None:  # type: ignore[no-untyped-def]
    agent = commanded_agent(make_agent, broker.port, tmp_path)
    old = agent.model
    (answer,) = command(client, "edge_agent/dev1/cmd/reload_model")
    assert answer["ok"] and agent.model is not old
    client.subscribe("edge_agent/dev1/detection")
    stream_files(client, {"after-reload": pcm16(example_wav)})
    assert client.wait_for("edge_agent/dev1/detection")[0].json()["stream"] == "after-reload"


def test_unknown_disabled_malformed_and_retained_commands(broker, make_agent, client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    agent = commanded_agent(make_agent, broker.port, tmp_path, commands={"allowed": ["ping"]})
    (unknown,) = command(client, "edge_agent/dev1/cmd/selfdestruct")
    assert unknown["ok"] is False and "unknown command 'selfdestruct'" in unknown["error"]
    (disabled,) = command(client, "edge_agent/dev1/cmd/restart")
    assert disabled["ok"] is False and "disabled" in disabled["error"]
    reply = "replies/malformed"
    client.subscribe(reply)
    client.publish("edge_agent/dev1/cmd/ping", b"{not json", qos=1, ResponseTopic=reply)
    assert "not JSON" in client.wait_for(reply)[0].json()["error"]
    assert agent.transport is not None and agent.transport.connected


def test_retained_commands_are_never_executed(broker, make_agent, client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Tasmota's ghost switching: a command left retained would run every time a device
    (re)connects. Retained commands are ignored, at connect and live (MQTT 5 subscriptions use
    retain-as-published), and clearing one with an empty retained message runs nothing."""
    client.subscribe("replies/retained")
    client.publish("edge_agent/dev1/cmd/mute", b"{}", qos=1, retain=True, ResponseTopic="replies/retained")
    agent = commanded_agent(make_agent, broker.port, tmp_path)
    client.publish("edge_agent/dev1/cmd/mute", b"{}", qos=1, retain=True, ResponseTopic="replies/retained")
    client.publish("edge_agent/dev1/cmd/mute", b"", qos=1, retain=True)  # clears it
    # Live, not retained: answered, and after any answer to the commands above (they run in order).
    client.publish("edge_agent/dev1/cmd/ping", b"{}", qos=1, ResponseTopic="replies/retained")
    replies = client.wait_for("replies/retained", lambda m: any(r.json()["command"] == "ping" for r in m))
    assert [(r.json()["command"], r.json()["ok"]) for r in replies] == [("ping", True)]
    assert agent.worker.muted is False


def test_mqtt311_clients_get_answers_on_cmd_result_with_their_id(broker, make_agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    commanded_agent(make_agent, broker.port, tmp_path)
    old = Client(broker.port, protocol=paho.MQTTv311).connect().subscribe("edge_agent/+/cmd_result")
    try:
        old.publish("edge_agent/dev1/cmd/ping", json.dumps({"id": "tx-7"}), qos=1)
        (answer,) = old.wait_for("edge_agent/dev1/cmd_result")
        assert answer.json()["id"] == "tx-7" and answer.json()["ok"] is True
    finally:
        old.close()


def test_set_config_and_mute_persist_beside_the_config_file(
    broker, make_agent, client, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    config_file = tmp_path / "config.yaml"
    config_file.write_text("# my comments stay\nkeywords: [小云小云]\n", encoding="utf-8")
    agent = commanded_agent(make_agent, broker.port, tmp_path)
    agent.config_path = config_file
    (answer,) = command(client, "edge_agent/dev1/cmd/set_config", {"keywords": ["小云小云", "如家酒店"]})
    assert answer["result"]["persisted"] is True
    command(client, "edge_agent/dev1/cmd/mute")
    assert config_file.read_text(encoding="utf-8").startswith("# my comments stay")
    reloaded = load_config(config_file, env={})
    assert [k.text for k in reloaded.keywords] == ["小云小云", "如家酒店"] and reloaded.engine.muted is True
    assert remote_overrides_path(config_file).exists()


def test_restart_command_restarts_the_process(broker, model_dir: Path, tmp_path: Path, client) -> None:  # type: ignore[no-untyped-def]
    client.subscribe("edge_agent/phoenix/info")
    process = start_agent_process(model_dir, broker.port, "phoenix", tmp_path / "o.db")
    try:
        # The agent subscribes to its command topics before it publishes info.
        first = client.wait_for("edge_agent/phoenix/info", timeout=60)[-1].json()["boot_id"]
        (answer,) = command(client, "edge_agent/phoenix/cmd/restart")
        assert answer["ok"] and answer["result"]["restarting"] is True
        infos = client.wait_for(
            "edge_agent/phoenix/info", lambda m: any(x.json()["boot_id"] != first for x in m), timeout=60
        )
        assert infos[-1].json()["boot_id"] != first
        assert process.poll() is None  # same process (re-executed), still running
    finally:
        process.terminate()
        process.wait(30)

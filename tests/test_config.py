from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from edge_agent.cli.config_cmd import REFERENCE_HEADER
from edge_agent.config import (
    ConfigError,
    FileSource,
    MicrophoneSource,
    config_reference,
    example_yaml,
    load_config,
    merge_update,
    parse_config,
    read_password,
    to_dict,
)
from edge_agent.engine.model import DecoderSettings
from edge_agent.keywords import decoder_settings_from

REPO = Path(__file__).resolve().parent.parent


def test_config_yaml_is_the_generated_example_and_valid() -> None:
    assert (REPO / "config.yaml").read_text(encoding="utf-8") == example_yaml()
    config = load_config(REPO / "config.yaml", env={})
    assert config == load_config(None, env={})  # every key at its default


def test_reference_doc_is_generated_from_the_code() -> None:
    assert (REPO / "docs" / "configuration.md").read_text(
        encoding="utf-8"
    ) == REFERENCE_HEADER + config_reference()


def test_every_key_of_the_reference_is_in_config_yaml() -> None:
    text = (REPO / "config.yaml").read_text(encoding="utf-8")
    for key in re.findall(r"^\| `([^`]+)` \|", config_reference(), flags=re.MULTILINE):
        leaf = key.split(".")[-1].replace("[]", "")
        assert re.search(rf"^\s*#?\s*-?\s*{re.escape(leaf)}:", text, flags=re.MULTILINE), key


def test_commented_source_examples_are_valid() -> None:
    text = (REPO / "config.yaml").read_text(encoding="utf-8")
    block = re.search(r"  # sources:\n((?:  #   .*\n)+)", text)
    assert block is not None
    uncommented = "sources:\n" + "".join(
        line.replace("  #   ", "  ", 1) + "\n" for line in block.group(1).splitlines()
    )
    sources = parse_config({"audio": yaml.safe_load(uncommented)}).audio.sources
    assert [type(s) for s in sources] == [MicrophoneSource, FileSource]


@pytest.mark.parametrize(
    "data, message",
    [
        ({"mqtt": {"port": 70000}}, "mqtt.port: must be an integer between 1 and 65535, got 70000"),
        ({"mqtt": {"port": "high"}}, "mqtt.port: must be an integer"),
        ({"mqtt": {"tls": {"enabled": "yes"}}}, "mqtt.tls.enabled: must be true or false, got 'yes'"),
        ({"mqtt": {"protocol": 4}}, "mqtt.protocol: must be one of '5', '3.1.1', got 4"),
        ({"mqtt": {"hostname": "x"}}, "mqtt.hostname: unknown key; allowed here:"),
        ({"keywords": []}, "keywords: at least one keyword"),
        ({"keywords": [{"threshold": 0.1}]}, "keywords[0].text: is required"),
        ({"keywords": ["小云", "小云"]}, "keywords[1].text: '小云' is listed twice"),
        ({"keywords": [{"text": "小云", "min_duration": 3, "max_duration": 2}]}, "keywords[0].min_duration"),
        ({"engine": {"threads": 0}}, "engine.threads: must be an integer between 1 and 64, got 0"),
        ({"engine": {"pause": 0}}, "engine.pause: must be a number between 0.03 and 2"),
        ({"audio": {"sources": [{"type": "speaker"}]}}, "audio.sources[0].type: must be one of"),
        ({"audio": {"sources": [{"type": "file"}]}}, "audio.sources[0].path: is required"),
        (
            {"audio": {"sources": [{"type": "file", "path": "a"}, {"type": "file", "path": "b"}]}},
            "audio.sources[1].id: 'file' is used by two sources",
        ),
        ({"device": {"id": "has space"}}, "device.id: 'has space' does not match"),
        ({"mqtt": {"topic_prefix": "a/#"}}, "mqtt.topic_prefix"),
        ({"mqtt": {"password": "x"}}, "mqtt.username: is required when a password is set"),
        ({"mqtt": {"tls": {"cert_file": "c.pem"}}}, "mqtt.tls.key_file"),
        ({"health": {"interval": float("nan")}}, "health.interval: must be a finite number"),
        ([1, 2], "the top level must be a mapping"),
    ],
)
def test_errors_name_the_key_and_what_is_allowed(data, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as error:
        parse_config(data)
    assert message in str(error.value)


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("mqtt:\n  host: from-file\n  port: 1884\n", encoding="utf-8")
    env = {"EDGE_AGENT_MQTT__PORT": "8883", "EDGE_AGENT_MQTT__TLS__ENABLED": "true", "OTHER": "x"}
    config = load_config(path, env=env)
    assert (config.mqtt.host, config.mqtt.port, config.mqtt.tls.enabled) == ("from-file", 8883, True)
    with pytest.raises(
        ConfigError, match=r"mqtt.port: cannot parse environment variable EDGE_AGENT_MQTT__PORT"
    ):
        load_config(path, env={"EDGE_AGENT_MQTT__PORT": "[1"})
    with pytest.raises(ConfigError, match=r"mqtt.port: must be an integer"):
        load_config(path, env={"EDGE_AGENT_MQTT__PORT": "abc"})


def test_file_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read config file"):
        load_config(tmp_path / "missing.yaml", env={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("mqtt: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"is not valid YAML"):
        load_config(bad, env={})


def test_bare_string_keywords_and_defaults() -> None:
    config = parse_config({"keywords": ["小云小云", {"text": "如家酒店", "threshold": 0.02}]})
    assert [(k.text, k.threshold) for k in config.keywords] == [("小云小云", 0.05), ("如家酒店", 0.02)]
    assert config.client_id == f"edge_agent-{config.device_id}"


def test_decoder_policy_keys_reach_the_decoder_settings() -> None:
    config = parse_config({"engine": {"hold": 0.8, "pause": 0.4, "refractory": 2, "gap_tolerance": 0.3}})
    assert decoder_settings_from(config) == DecoderSettings(
        refractory_seconds=2.0, gap_tolerance=0.3, hold_seconds=0.8, pause_seconds=0.4
    )


def test_update_is_validated_like_the_file() -> None:
    config = parse_config({"device": {"id": "d1"}})
    updated = merge_update(config, {"keywords": [{"text": "如家酒店"}], "engine": {"refractory": 2}})
    assert updated.keywords[0].text == "如家酒店" and updated.engine.refractory == 2.0
    assert updated.device.id == "d1"
    with pytest.raises(ConfigError, match=r"engine.refractory"):
        merge_update(config, {"engine": {"refractory": -1}})


def test_secrets_are_masked_and_read_from_files(tmp_path: Path) -> None:
    config = parse_config({"mqtt": {"username": "u", "password": "hunter2"}})
    assert to_dict(config)["mqtt"]["password"] == "***"
    assert to_dict(config, include_secrets=True)["mqtt"]["password"] == "hunter2"
    secret = tmp_path / "password"
    secret.write_text("from-file\nignored\n", encoding="utf-8")
    from_file = parse_config({"mqtt": {"username": "u", "password_file": str(secret)}})
    assert read_password(from_file.mqtt) == "from-file"
    missing = parse_config({"mqtt": {"username": "u", "password_file": str(tmp_path / "nope")}})
    with pytest.raises(ConfigError, match=r"mqtt.password_file: cannot read"):
        read_password(missing.mqtt)


def test_outbox_path_defaults(tmp_path: Path) -> None:
    config = parse_config({"device": {"id": "d1"}})
    assert config.outbox_path({"STATE_DIRECTORY": "/var/lib/edge-agent"}) == Path(
        "/var/lib/edge-agent/outbox.db"
    )
    assert config.outbox_path({"HOME": str(tmp_path)}) == tmp_path / ".local/state/edge-agent/d1/outbox.db"
    explicit = parse_config({"outbox": {"path": str(tmp_path / "o.db")}})
    assert explicit.outbox_path({}) == tmp_path / "o.db"

"""Validation: types, bounds and cross-key rules, each error naming the key."""

from __future__ import annotations

import pytest

from edge_agent.config import ConfigError, parse_config


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


def test_bare_string_keywords_and_defaults() -> None:
    config = parse_config({"keywords": ["小云小云", {"text": "如家酒店", "threshold": 0.02}]})
    assert [(k.text, k.threshold) for k in config.keywords] == [("小云小云", 0.05), ("如家酒店", 0.02)]
    assert config.client_id == f"edge_agent-{config.device_id}"

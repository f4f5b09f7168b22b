"""The sources (file, environment), updates, secrets, and plain-data output."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.config import ConfigError, load_config, merge_update, parse_config, read_password, to_dict


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


def test_http_lists_take_a_comma_separated_string_and_star_from_the_environment() -> None:
    config = load_config(
        None, env={"EDGE_AGENT_HTTP__CORS_ORIGINS": "*", "EDGE_AGENT_HTTP__ALLOWED_HOSTS": "a.lan, .b"}
    )
    assert config.http.cors_origins == ("*",) and config.http.allowed_hosts == ("a.lan", ".b")
    with pytest.raises(ConfigError, match=r"http.cors_origins\[0\]: 'localhost:3000' does not match"):
        parse_config({"http": {"cors_origins": "localhost:3000"}})
    assert parse_config({}).http.cors_origins == (
        "http://localhost:*",
        "http://127.0.0.1:*",
        "http://[::1]:*",
    )


def test_edge_agent_model_dir_is_model_dir_unless_the_config_sets_one(tmp_path: Path) -> None:
    """`config check` and `get_config` show the directory actually used."""
    assert load_config(None, env={"EDGE_AGENT_MODEL_DIR": "/models/kws"}).model.dir == "/models/kws"
    path = tmp_path / "config.yaml"
    path.write_text("model:\n  dir: /from/file\n", encoding="utf-8")
    assert load_config(path, env={"EDGE_AGENT_MODEL_DIR": "/models/kws"}).model.dir == "/from/file"
    assert load_config(None, env={}).model.dir is None

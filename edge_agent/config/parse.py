"""From parsed YAML to a validated :class:`AgentConfig`: types, bounds and cross-key rules.

:func:`parse_config` is the only way in, whether the data comes from the file, the environment
or a ``set_config`` update, so every source is checked the same way. Each field is converted
by its type hint and checked against the bounds :func:`~edge_agent.config.schema.option` gave
it; then the rules that involve several keys run on the finished tree. Every
:class:`ConfigError` names the key, what is allowed, and what was found.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

from edge_agent.config.schema import (
    COMMA_SEPARATED_KEYS,
    COMMAND_NAMES,
    DEFAULT_MAX_DURATION,
    DEFAULT_MIN_DURATION,
    ID_PATTERN,
    MAX_KEYWORD_CHARACTERS,
    MAX_KEYWORDS,
    SOURCE_TYPES,
    TOPIC_PATTERN,
    AgentConfig,
    ConfigError,
    KeywordConfig,
    bounds_text,
    default_device_id,
)


def parse_config(data: Mapping[str, Any] | None, source: str = "config") -> AgentConfig:
    """Validate a mapping (parsed YAML) into an :class:`AgentConfig`."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError("", f"{source}: the top level must be a mapping, got {_describe(data)}")
    config = _build(AgentConfig, data, "")
    _check_rules(config)
    return config


def _build(cls: type, data: Mapping[str, Any], key: str) -> Any:
    """An instance of the dataclass ``cls`` from ``data``; ``key`` is its dotted path, for errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        prefix = f"{key}." if key else ""
        raise ConfigError(f"{prefix}{unknown[0]}", f"unknown key; allowed here: {', '.join(sorted(fields))}")
    values: dict[str, Any] = {}
    for name, spec in fields.items():
        child = f"{key}.{name}" if key else name
        if name in data:
            values[name] = _convert(data[name], hints[name], child, spec.metadata)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ConfigError(child, f"is required ({spec.metadata.get('doc', '')})")
    return cls(**values)


def _convert(value: Any, hint: Any, key: str, meta: Mapping[str, Any]) -> Any:
    """``value`` as the type ``hint`` of the field at ``key``, checked against its metadata ``meta``."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        if set(args) == set(SOURCE_TYPES.values()):
            return _convert_source(value, key)
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _convert(value, non_none[0], key, meta)
        raise ConfigError(key, f"unsupported union {hint}")
    if origin is Literal:
        allowed = typing.get_args(hint)
        text = str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        if text not in allowed:
            raise ConfigError(
                key, f"must be one of {', '.join(repr(a) for a in allowed)}, got {_describe(value)}"
            )
        return text
    if origin is tuple:
        (item_hint, *_) = typing.get_args(hint)
        if value is None:
            return ()
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            if key.endswith("keywords") and isinstance(value, str):
                value = [value]
            elif key in COMMA_SEPARATED_KEYS and isinstance(value, str):
                value = [item.strip() for item in value.split(",") if item.strip()]
            else:
                raise ConfigError(key, f"must be a list, got {_describe(value)}")
        return tuple(_convert(item, item_hint, f"{key}[{i}]", meta) for i, item in enumerate(value))
    if dataclasses.is_dataclass(hint):
        if hint is KeywordConfig and isinstance(value, str):
            value = {"text": value}
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"must be a mapping, got {_describe(value)}")
        return _build(hint, value, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ConfigError(key, f"must be an integer{bounds_text(meta)}, got {_describe(value)}")
        _check_bounds(value, key, meta)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"must be a number{bounds_text(meta)}, got {_describe(value)}")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(key, f"must be a finite number, got {value}")
        _check_bounds(value, key, meta)
        return value
    if hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {_describe(value)}")
        pattern = meta.get("pattern")
        if pattern is not None and not pattern.match(value):
            raise ConfigError(key, f"{_describe(value)} does not match {pattern.pattern}")
        return value
    raise ConfigError(key, f"unsupported type {hint}")


def _convert_source(value: Any, key: str) -> Any:
    if not isinstance(value, Mapping):
        raise ConfigError(
            key, f"must be a mapping with a type ({', '.join(SOURCE_TYPES)}), got {_describe(value)}"
        )
    kind = value.get("type")
    if kind not in SOURCE_TYPES:
        raise ConfigError(
            f"{key}.type",
            f"must be one of {', '.join(repr(k) for k in SOURCE_TYPES)}, got {_describe(kind)}",
        )
    return _build(SOURCE_TYPES[kind], value, key)


def _check_bounds(value: float, key: str, meta: Mapping[str, Any]) -> None:
    low, high = meta.get("minimum"), meta.get("maximum")
    if (low is not None and value < low) or (high is not None and value > high):
        kind = "an integer" if isinstance(value, int) else "a number"
        raise ConfigError(key, f"must be {kind}{bounds_text(meta)}, got {value}")


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_rules(config: AgentConfig) -> None:
    """Rules a field's type and bounds cannot state: several keys together, list items, reserved names."""
    mqtt = config.mqtt
    if mqtt.reconnect_min_delay > mqtt.reconnect_max_delay:
        raise ConfigError("mqtt.reconnect_min_delay", "must not exceed mqtt.reconnect_max_delay")
    if mqtt.password and mqtt.password_file:
        raise ConfigError("mqtt.password_file", "set either mqtt.password or mqtt.password_file, not both")
    if (mqtt.password or mqtt.password_file) and not mqtt.username:
        raise ConfigError("mqtt.username", "is required when a password is set")
    if (mqtt.tls.cert_file is None) != (mqtt.tls.key_file is None):
        raise ConfigError("mqtt.tls.key_file", "mqtt.tls.cert_file and mqtt.tls.key_file go together")
    # The host name becomes part of topics; refuse one that cannot.
    if config.device.id is None and not ID_PATTERN.match(default_device_id()):
        raise ConfigError("device.id", "cannot be derived from the host name; set it")
    if not config.keywords:
        raise ConfigError("keywords", "at least one keyword is needed")
    if len(config.keywords) > MAX_KEYWORDS:
        raise ConfigError("keywords", f"{len(config.keywords)} keywords; at most {MAX_KEYWORDS}")
    if config.engine.quantize and config.engine.backend != "torch":
        raise ConfigError("engine.quantize", "needs engine.backend: torch")
    seen: set[str] = set()
    for i, keyword in enumerate(config.keywords):
        if len(keyword.text) > MAX_KEYWORD_CHARACTERS:
            raise ConfigError(
                f"keywords[{i}].text",
                f"{len(keyword.text)} characters; a keyword has at most {MAX_KEYWORD_CHARACTERS}",
            )
        if keyword.text in seen:
            raise ConfigError(f"keywords[{i}].text", f"{keyword.text!r} is listed twice")
        seen.add(keyword.text)
        low = keyword.min_duration if keyword.min_duration is not None else DEFAULT_MIN_DURATION
        high = keyword.max_duration if keyword.max_duration is not None else DEFAULT_MAX_DURATION
        if low >= high:
            raise ConfigError(f"keywords[{i}].min_duration", f"must be below max_duration ({low} >= {high})")
    ids = [s.id for s in config.audio.sources]
    for i, source_id in enumerate(ids):
        if ids.index(source_id) != i:
            raise ConfigError(f"audio.sources[{i}].id", f"{source_id!r} is used by two sources")
    for group in config.device.groups:
        if not ID_PATTERN.match(group):
            raise ConfigError("device.groups", f"{group!r} is not a valid group name ([A-Za-z0-9_-])")
    for name in config.commands.allowed:
        if name not in COMMAND_NAMES:
            raise ConfigError(
                "commands.allowed", f"unknown command {name!r}; commands are {', '.join(COMMAND_NAMES)}"
            )
    for site in config.hermes.site_ids:
        if not TOPIC_PATTERN.match(site) or "/" in site:
            raise ConfigError("hermes.site_ids", f"{site!r} cannot be a Hermes site id")
    advertise = config.wyoming.advertise_host
    if advertise is not None:
        try:
            ipaddress.IPv4Address(advertise)
        except ValueError:
            raise ConfigError("wyoming.advertise_host", f"{advertise!r} is not an IPv4 address") from None
    if config.device.id in ("all", "group", "pool"):
        raise ConfigError("device.id", f"{config.device.id!r} is reserved for fleet topics")

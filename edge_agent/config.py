"""The agent's configuration: one typed, frozen tree, validated once at start-up.

Sources, later wins: built-in defaults, the YAML file (``-c FILE``), then environment variables
``EDGE_AGENT_<SECTION>__<KEY>`` (double underscore between levels, values parsed as YAML
scalars, e.g. ``EDGE_AGENT_MQTT__PORT=8883``, ``EDGE_AGENT_MQTT__TLS__CA_FILE=/etc/ca.pem``).
Secrets can be read from files (``mqtt.password_file``) and are never printed.

Every field carries its description and bounds in its metadata; :func:`config_reference`
renders them as the reference table in docs/configuration.md (a test keeps the two equal), so
docs cannot drift from the code. Every error names the key, what is allowed, and what was found.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from edge_agent.engine.model import (
    DEFAULT_GAP_TOLERANCE,
    DEFAULT_HOLD_SECONDS,
    DEFAULT_PAUSE_SECONDS,
    DEFAULT_REFRACTORY_SECONDS,
    DEFAULT_THRESHOLD,
)
from edge_agent.model_store import DEFAULT_MODEL_ID, DEFAULT_REVISION

ENV_PREFIX = "EDGE_AGENT_"
_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_TOPIC_PATTERN = re.compile(r"^[^#+\s]+$")


class ConfigError(ValueError):
    """Invalid configuration; the message starts with the key (``mqtt.port: ...``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


def option(
    default: Any = dataclasses.MISSING,
    *,
    doc: str,
    minimum: float | None = None,
    maximum: float | None = None,
    pattern: re.Pattern[str] | None = None,
    secret: bool = False,
    factory: Any = dataclasses.MISSING,
) -> Any:
    """A config field with its documentation and bounds."""
    metadata = {"doc": doc, "minimum": minimum, "maximum": maximum, "pattern": pattern, "secret": secret}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# --- sections --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DeviceConfig:
    id: str | None = option(
        None,
        doc="Device id used in MQTT topics and client id; letters, digits, _ and -. Default: the hostname.",
        pattern=_ID_PATTERN,
    )
    name: str | None = option(None, doc="Friendly name shown by Home Assistant and the fleet monitor.")
    groups: tuple[str, ...] = option(
        (), doc="Fleet groups; commands sent to {prefix}/group/{name}/cmd/... reach this device."
    )


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    id: str = option(DEFAULT_MODEL_ID, doc="ModelScope model id.")
    revision: str = option(DEFAULT_REVISION, doc="ModelScope revision (branch or tag).")
    dir: str | None = option(
        None,
        doc="Directory holding kwsr.net, kwsr.mvn, kwsr.phn, kwsr.lex; env EDGE_AGENT_MODEL_DIR also works.",
    )
    cache_dir: str | None = option(
        None,
        doc="ModelScope cache to search and download into. "
        "Default: $MODELSCOPE_CACHE or ~/.cache/modelscope/hub.",
    )
    download: bool = option(
        True, doc="Download from ModelScope when the model is not on disk (needs the modelscope extra)."
    )


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    backend: Literal["numpy", "torch"] = option(
        "numpy", doc="Network implementation; torch needs the torch extra."
    )
    threads: int = option(
        1, doc="Threads for the torch backend (numpy runs single-threaded).", minimum=1, maximum=64
    )
    quantize: bool = option(
        False,
        doc="torch backend only: int8 dynamic quantization of the linear layers (faster; see the README).",
    )
    refractory: float = option(
        DEFAULT_REFRACTORY_SECONDS,
        doc="Seconds after a detection during which the same keyword is not reported again.",
        minimum=0.0,
        maximum=60.0,
    )
    gap_tolerance: float = option(
        DEFAULT_GAP_TOLERANCE,
        doc="Share of non-keyword speech a frame between two keyword characters may hold before it "
        "counts against the match.",
        minimum=0.0,
        maximum=0.99,
    )
    muted: bool = option(
        False, doc="Start muted (no audio processed); the mute/unmute commands change and persist it."
    )
    queue_mb: float = option(
        64.0,
        doc="Audio and requests waiting for the engine, at most (MB); "
        "beyond it input is refused and counted.",
        minimum=1.0,
        maximum=4096.0,
    )
    hold: float = option(
        DEFAULT_HOLD_SECONDS,
        doc="Longest wait (s) for a better match before a weak detection is reported; "
        "confident ones fire at once.",
        minimum=0.03,
        maximum=2.0,
    )
    pause: float = option(
        DEFAULT_PAUSE_SECONDS,
        doc="Longest pause (s) between two characters of one spoken keyword: a weak detection stops "
        "waiting for a better match once nothing has gone on for this long (engine.hold caps the wait).",
        minimum=0.03,
        maximum=2.0,
    )


@dataclass(frozen=True, kw_only=True)
class KeywordConfig:
    text: str = option(
        doc="The keyword in Chinese characters, e.g. 小云小云; any characters of the model's lexicon."
    )
    threshold: float = option(
        DEFAULT_THRESHOLD,
        doc="Detection threshold on the confidence in (0, 1] (geometric mean of character posteriors); "
        "tune with `edge-agent eval`.",
        minimum=1e-6,
        maximum=1.0,
    )
    min_duration: float | None = option(
        None,
        doc="Shortest keyword (s); default from the model's keywords.json (0.25).",
        minimum=0.0,
        maximum=10.0,
    )
    max_duration: float | None = option(
        None,
        doc="Longest keyword (s); default from the model's keywords.json (2.5).",
        minimum=0.1,
        maximum=10.0,
    )
    homophones: bool = option(
        False, doc="Also accept characters pronounced the same (needs the pinyin extra)."
    )


@dataclass(frozen=True, kw_only=True)
class TlsConfig:
    enabled: bool = option(False, doc="Connect with TLS.")
    ca_file: str | None = option(
        None, doc="CA certificate(s) to verify the broker (PEM). Default: system CAs."
    )
    cert_file: str | None = option(None, doc="Client certificate (PEM) for mutual TLS.")
    key_file: str | None = option(None, doc="Client private key (PEM) for mutual TLS.")
    insecure: bool = option(
        False, doc="INSECURE: do not verify the broker's certificate or host name. For testing only."
    )


@dataclass(frozen=True, kw_only=True)
class MqttConfig:
    enabled: bool = option(True, doc="Connect to an MQTT broker (off: detections are only logged).")
    host: str = option("localhost", doc="Broker host name or address.")
    port: int = option(1883, doc="Broker port (8883 is usual for TLS).", minimum=1, maximum=65535)
    client_id: str | None = option(None, doc="MQTT client id. Default: edge_agent-{device.id}.")
    username: str | None = option(None, doc="User name.")
    password: str | None = option(
        None, doc="Password (prefer password_file or env EDGE_AGENT_MQTT__PASSWORD).", secret=True
    )
    password_file: str | None = option(None, doc="File whose first line is the password.")
    protocol: Literal["5", "3.1.1"] = option("5", doc="MQTT protocol version.")
    keepalive: int = option(30, doc="Keep-alive interval (s).", minimum=5, maximum=3600)
    topic_prefix: str = option("edge_agent", doc="First level of every topic.", pattern=_TOPIC_PATTERN)
    qos: int = option(1, doc="QoS of detections and replies.", minimum=0, maximum=2)
    tls: TlsConfig = option(factory=TlsConfig, doc="TLS settings.")
    reconnect_min_delay: float = option(
        1.0, doc="First reconnect delay (s); doubles up to the maximum.", minimum=0.1, maximum=600
    )
    reconnect_max_delay: float = option(60.0, doc="Longest reconnect delay (s).", minimum=1.0, maximum=3600)
    max_payload_bytes: int = option(
        4_000_000,
        doc="Largest inbound payload accepted (bytes); larger ones are refused.",
        minimum=1024,
        maximum=256_000_000,
    )
    detection_expiry: int = option(
        30,
        doc="MQTT 5 message expiry (s) of live detections, so a stale wake event is never acted on; 0: none.",
        minimum=0,
        maximum=86400,
    )


@dataclass(frozen=True, kw_only=True)
class MicrophoneSource:
    type: Literal["microphone"] = option("microphone", doc="A local microphone through PyAudio.")
    id: str = option("mic", doc="Stream id in detections and health.", pattern=_ID_PATTERN)
    device: str | None = option(
        None, doc="Input device: index or part of its name (`edge-agent devices`). Default: system default."
    )
    sample_rate: int | None = option(
        None,
        doc="Capture rate; default: the device's default rate, resampled to 16 kHz.",
        minimum=8000,
        maximum=192000,
    )
    chunk_ms: int = option(100, doc="Audio handed to the engine at a time (ms).", minimum=10, maximum=1000)
    buffer_seconds: float = option(
        2.0,
        doc="Captured audio kept while the engine is busy; beyond it chunks are dropped and counted.",
        minimum=0.1,
        maximum=60,
    )


@dataclass(frozen=True, kw_only=True)
class FileSource:
    type: Literal["file"] = option("file", doc="WAV files played as if they were a microphone.")
    id: str = option("file", doc="Stream id in detections and health.", pattern=_ID_PATTERN)
    path: str = option(doc="A WAV file or a folder of WAV files (played in name order).")
    loop: bool = option(False, doc="Start again after the last file.")
    realtime: bool = option(True, doc="Pace playback in real time (false: as fast as possible).")
    chunk_ms: int = option(100, doc="Audio handed to the engine at a time (ms).", minimum=10, maximum=1000)
    gap_seconds: float = option(0.5, doc="Silence inserted between files (s).", minimum=0.0, maximum=60)


AudioSourceConfig = MicrophoneSource | FileSource
_SOURCE_TYPES: dict[str, type] = {"microphone": MicrophoneSource, "file": FileSource}


@dataclass(frozen=True, kw_only=True)
class MqttAudioConfig:
    enabled: bool = option(True, doc="Accept audio streams on {prefix}/{device}/audio/{stream}.")
    max_streams: int = option(
        64, doc="Most concurrent MQTT audio streams; more are refused.", minimum=1, maximum=4096
    )
    idle_timeout: float = option(
        10.0, doc="A stream with no audio for this long (s) is finished and freed.", minimum=0.5, maximum=3600
    )
    max_rate_factor: float = option(
        0.0,
        doc="Refuse audio arriving faster than this many times real time "
        "(0: no limit, e.g. for batch uploads).",
        minimum=0.0,
        maximum=10000,
    )


@dataclass(frozen=True, kw_only=True)
class AudioConfig:
    sources: tuple[AudioSourceConfig, ...] = option(
        (), doc="Local audio sources: microphone and file entries."
    )
    mqtt: MqttAudioConfig = option(factory=MqttAudioConfig, doc="Audio streamed to the agent over MQTT.")


@dataclass(frozen=True, kw_only=True)
class HealthConfig:
    interval: float = option(
        60.0, doc="Seconds between retained health messages.", minimum=1.0, maximum=86400
    )


@dataclass(frozen=True, kw_only=True)
class OutboxConfig:
    path: str | None = option(
        None,
        doc="SQLite file that keeps detections until the broker acknowledges them. Default: "
        "$STATE_DIRECTORY/outbox.db under systemd, else ~/.local/state/edge-agent/{device}/outbox.db.",
    )
    max_events: int = option(
        10_000, doc="Most events kept; the oldest are dropped first.", minimum=1, maximum=10_000_000
    )
    max_age: float = option(
        7 * 24 * 3600.0, doc="Events older than this (s) are dropped.", minimum=1.0, maximum=365 * 24 * 3600.0
    )


COMMAND_NAMES = ("ping", "get_config", "set_config", "mute", "unmute", "reload_model", "restart")


@dataclass(frozen=True, kw_only=True)
class CommandsConfig:
    enabled: bool = option(
        True, doc="Accept remote commands on {prefix}/{device}/cmd/{name}, all/ and group/ topics."
    )
    allowed: tuple[str, ...] = option(
        COMMAND_NAMES, doc=f"Commands accepted ({', '.join(COMMAND_NAMES)}); others get an error answer."
    )


@dataclass(frozen=True, kw_only=True)
class HomeAssistantConfig:
    enabled: bool = option(False, doc="Publish Home Assistant MQTT discovery (event, sensors, mute switch).")
    discovery_prefix: str = option(
        "homeassistant", doc="Home Assistant's discovery prefix.", pattern=_TOPIC_PATTERN
    )


@dataclass(frozen=True, kw_only=True)
class HermesConfig:
    enabled: bool = option(False, doc="Speak Rhasspy's Hermes protocol: audioFrame in, hotword detected out.")
    site_ids: tuple[str, ...] = option((), doc="Sites to listen to; empty: every site.")
    wakeword_id: str = option(
        "xiaoyun", doc="The {wakewordId} of hermes/hotword/{wakewordId}/detected.", pattern=_ID_PATTERN
    )


@dataclass(frozen=True, kw_only=True)
class PoolConfig:
    enabled: bool = option(
        False, doc="Server mode: share streams with other agents of the same pool (docs/scale-out.md)."
    )
    name: str = option(
        "default", doc="Pool name; agents with the same name share the work.", pattern=_ID_PATTERN
    )


@dataclass(frozen=True, kw_only=True)
class HttpConfig:
    enabled: bool = option(False, doc="Serve the local HTTP API, /ui test page and /metrics.")
    host: str = option("127.0.0.1", doc="Address to bind; 0.0.0.0 exposes the API to the network (no auth).")
    port: int = option(8080, doc="TCP port.", minimum=1, maximum=65535)
    max_upload_mb: float = option(
        20.0, doc="Largest WAV accepted by POST /detect (MB); larger gets 413.", minimum=0.1, maximum=1024
    )


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    level: Literal["debug", "info", "warning", "error"] = option("info", doc="Log level.")
    format: Literal["text", "json"] = option("text", doc="Human-readable lines or one JSON object per line.")


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    device: DeviceConfig = option(factory=DeviceConfig, doc="This device.")
    model: ModelConfig = option(factory=ModelConfig, doc="Where the model comes from.")
    engine: EngineConfig = option(factory=EngineConfig, doc="Inference and detection policy.")
    keywords: tuple[KeywordConfig, ...] = option(
        factory=lambda: (KeywordConfig(text="小云小云"),),
        doc="Keywords to spot (a list; a bare string is a keyword with defaults).",
    )
    mqtt: MqttConfig = option(factory=MqttConfig, doc="Broker connection.")
    audio: AudioConfig = option(factory=AudioConfig, doc="Audio inputs.")
    health: HealthConfig = option(factory=HealthConfig, doc="Telemetry.")
    outbox: OutboxConfig = option(factory=OutboxConfig, doc="Store-and-forward of detections.")
    http: HttpConfig = option(factory=HttpConfig, doc="Local HTTP API.")
    commands: CommandsConfig = option(factory=CommandsConfig, doc="Remote commands over MQTT.")
    homeassistant: HomeAssistantConfig = option(
        factory=HomeAssistantConfig, doc="Home Assistant MQTT discovery."
    )
    hermes: HermesConfig = option(factory=HermesConfig, doc="Rhasspy Hermes compatibility.")
    pool: PoolConfig = option(
        factory=PoolConfig, doc="Scale-out: several agents sharing streams through the broker."
    )
    logging: LoggingConfig = option(factory=LoggingConfig, doc="Logs.")

    @property
    def device_id(self) -> str:
        return self.device.id or default_device_id()

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or f"edge_agent-{self.device_id}"

    def outbox_path(self, env: Mapping[str, str] | None = None) -> Path:
        env = os.environ if env is None else env
        if self.outbox.path:
            return Path(self.outbox.path).expanduser()
        if env.get("STATE_DIRECTORY"):
            # systemd's StateDirectory= (may list several, colon-separated)
            return Path(env["STATE_DIRECTORY"].split(":")[0]) / "outbox.db"
        return (
            Path(env.get("HOME", str(Path.home())))
            / ".local"
            / "state"
            / "edge-agent"
            / self.device_id
            / "outbox.db"
        )


# --- parsing ---------------------------------------------------------------------------------


def default_device_id() -> str:
    """The host name reduced to the characters MQTT topics and Home Assistant ids allow."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname().split(".")[0])[:64]
    return cleaned or "edge_agent"


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint) if a is not type(None))
    if origin is tuple:
        return "a list"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _convert(value: Any, hint: Any, key: str, meta: Mapping[str, Any]) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        if set(args) == set(_SOURCE_TYPES.values()):
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
                raise ConfigError(key, f"must be an integer{_bounds(meta)}, got {_describe(value)}")
        _check_bounds(value, key, meta)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"must be a number{_bounds(meta)}, got {_describe(value)}")
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


def _bounds(meta: Mapping[str, Any]) -> str:
    low, high = meta.get("minimum"), meta.get("maximum")
    if low is not None and high is not None:
        return f" between {low:g} and {high:g}"
    if low is not None:
        return f" >= {low:g}"
    if high is not None:
        return f" <= {high:g}"
    return ""


def _check_bounds(value: float, key: str, meta: Mapping[str, Any]) -> None:
    low, high = meta.get("minimum"), meta.get("maximum")
    if (low is not None and value < low) or (high is not None and value > high):
        kind = "an integer" if isinstance(value, int) else "a number"
        raise ConfigError(key, f"must be {kind}{_bounds(meta)}, got {value}")


def _convert_source(value: Any, key: str) -> Any:
    if not isinstance(value, Mapping):
        raise ConfigError(
            key, f"must be a mapping with a type ({', '.join(_SOURCE_TYPES)}), got {_describe(value)}"
        )
    kind = value.get("type")
    if kind not in _SOURCE_TYPES:
        raise ConfigError(
            f"{key}.type",
            f"must be one of {', '.join(repr(k) for k in _SOURCE_TYPES)}, got {_describe(kind)}",
        )
    return _build(_SOURCE_TYPES[kind], value, key)


def _build(cls: type, data: Mapping[str, Any], key: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        prefix = f"{key}." if key else ""
        raise ConfigError(f"{prefix}{unknown[0]}", f"unknown key; allowed here: {', '.join(sorted(fields))}")
    values = {}
    for name, spec in fields.items():
        child = f"{key}.{name}" if key else name
        if name in data:
            values[name] = _convert(data[name], hints[name], child, spec.metadata)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ConfigError(child, f"is required ({spec.metadata.get('doc', '')})")
    return cls(**values)


def _check_rules(config: AgentConfig) -> None:
    """Rules that involve several keys."""
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
    if config.device.id is None and not _ID_PATTERN.match(default_device_id()):
        raise ConfigError("device.id", "cannot be derived from the host name; set it")
    if not config.keywords:
        raise ConfigError("keywords", "at least one keyword is needed")
    if config.engine.quantize and config.engine.backend != "torch":
        raise ConfigError("engine.quantize", "needs engine.backend: torch")
    seen: set[str] = set()
    for i, keyword in enumerate(config.keywords):
        if keyword.text in seen:
            raise ConfigError(f"keywords[{i}].text", f"{keyword.text!r} is listed twice")
        seen.add(keyword.text)
        low = keyword.min_duration if keyword.min_duration is not None else 0.25
        high = keyword.max_duration if keyword.max_duration is not None else 2.5
        if low >= high:
            raise ConfigError(f"keywords[{i}].min_duration", f"must be below max_duration ({low} >= {high})")
    ids = [s.id for s in config.audio.sources]
    for i, source_id in enumerate(ids):
        if ids.index(source_id) != i:
            raise ConfigError(f"audio.sources[{i}].id", f"{source_id!r} is used by two sources")
    for group in config.device.groups:
        if not _ID_PATTERN.match(group):
            raise ConfigError("device.groups", f"{group!r} is not a valid group name ([A-Za-z0-9_-])")
    for name in config.commands.allowed:
        if name not in COMMAND_NAMES:
            raise ConfigError(
                "commands.allowed", f"unknown command {name!r}; commands are {', '.join(COMMAND_NAMES)}"
            )
    for site in config.hermes.site_ids:
        if not _TOPIC_PATTERN.match(site) or "/" in site:
            raise ConfigError("hermes.site_ids", f"{site!r} cannot be a Hermes site id")
    if config.device.id in ("all", "group", "pool"):
        raise ConfigError("device.id", f"{config.device.id!r} is reserved for fleet topics")


def parse_config(data: Mapping[str, Any] | None, source: str = "config") -> AgentConfig:
    """Validate a mapping (parsed YAML) into an :class:`AgentConfig`."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError("", f"{source}: the top level must be a mapping, got {_describe(data)}")
    config = _build(AgentConfig, data, "")
    _check_rules(config)
    return config


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        if not all(path):
            raise ConfigError(name, "empty key in environment variable name")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as error:
            raise ConfigError(".".join(path), f"cannot parse environment variable {name}: {error}") from None
        target = overrides
        for part in path[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(".".join(path), f"conflicts with another environment variable ({name})")
        target[path[-1]] = value
    return overrides


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError("", f"cannot read config file {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ConfigError("", f"config file {path} is not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError("", f"config file {path} is not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"config file {path}: the top level must be a mapping")
    return data


def remote_overrides_path(path: str | Path) -> Path:
    """Where changes made with the ``set_config`` command are kept, beside the config file.

    The user's file is never rewritten (its comments survive); ``config.remote.yaml`` is layered
    over it at start-up, and the environment over both.
    """
    path = Path(path)
    return path.with_name(f"{path.stem}.remote.yaml")


def save_remote_overrides(path: str | Path, update: Mapping[str, Any]) -> Path:
    """Merge ``update`` into the overrides file, atomically; raises OSError when not writable."""
    target = remote_overrides_path(path)
    current = read_config_file(target) if target.exists() else {}
    merged = _merge(current, update)
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_text(
        "# Written by edge-agent's set_config/mute commands; layered over the config file.\n"
        + yaml.safe_dump(merged, allow_unicode=True, sort_keys=False),
        encoding="utf-8",
    )
    os.replace(temporary, target)
    return target


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> AgentConfig:
    """Defaults <- file <- remote overrides (set_config) <- environment, validated."""
    env = os.environ if env is None else env
    data = read_config_file(path) if path is not None else {}
    if path is not None and remote_overrides_path(path).exists():
        data = _merge(data, read_config_file(remote_overrides_path(path)))
    data = _merge(data, _env_overrides(env))
    return parse_config(data, str(path) if path else "defaults")


def merge_update(config: AgentConfig, update: Mapping[str, Any]) -> AgentConfig:
    """Apply a partial update (as ``set_config`` sends it), validated exactly like a file."""
    return parse_config(_merge(to_dict(config, include_secrets=True), update), "update")


def to_dict(config: Any, include_secrets: bool = False) -> Any:
    """Plain data for YAML/JSON; secrets become ``"***"`` unless asked for."""
    if dataclasses.is_dataclass(config):
        result = {}
        for spec in dataclasses.fields(config):
            value = getattr(config, spec.name)
            if spec.metadata.get("secret") and value is not None and not include_secrets:
                result[spec.name] = "***"
            else:
                result[spec.name] = to_dict(value, include_secrets)
        return result
    if isinstance(config, tuple):
        return [to_dict(item, include_secrets) for item in config]
    return config


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two ``to_dict`` trees (lists compare whole)."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys: list[str] = []
        for name in dict.fromkeys([*old, *new]):
            keys += changed_keys(old.get(name), new.get(name), f"{prefix}{name}.")
        return keys
    return [] if old == new else [prefix.rstrip(".")]


def read_password(config: MqttConfig) -> str | None:
    """The MQTT password from the config or its file; file errors name the key."""
    if config.password_file:
        try:
            lines = Path(config.password_file).read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise ConfigError(
                "mqtt.password_file", f"cannot read {config.password_file}: {error.strerror or error}"
            ) from None
        return lines[0] if lines else ""
    return config.password


# --- reference documentation -----------------------------------------------------------------


def config_reference() -> str:
    """The Markdown reference table of every key (docs/configuration.md is this text)."""
    rows = ["| key | type | default | description |", "|---|---|---|---|"]

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for spec in dataclasses.fields(cls):
            key = f"{prefix}{spec.name}"
            hint = hints[spec.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, f"{key}.")
                continue
            if typing.get_origin(hint) is tuple and typing.get_args(hint)[0] == AudioSourceConfig:
                rows.append(f"| `{key}` | a list | `[]` | {spec.metadata['doc']} |")
                for kind, source_cls in _SOURCE_TYPES.items():
                    walk_source(source_cls, f"{key}[] (type: {kind}).")
                continue
            if typing.get_origin(hint) is tuple and dataclasses.is_dataclass(typing.get_args(hint)[0]):
                rows.append(f"| `{key}` | a list | see below | {spec.metadata['doc']} |")
                walk(typing.get_args(hint)[0], f"{key}[].")
                continue
            kind = f"{_type_name(hint)}{_bounds(spec.metadata)}"
            rows.append(f"| `{key}` | {kind} | {_default_text(spec)} | {spec.metadata['doc']} |")

    def walk_source(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for spec in dataclasses.fields(cls):
            rows.append(
                f"| `{prefix}{spec.name}` | {_type_name(hints[spec.name])}{_bounds(spec.metadata)} | "
                f"{_default_text(spec)} | {spec.metadata['doc']} |"
            )

    walk(AgentConfig, "")
    return "\n".join(rows) + "\n"


def _default_text(spec: dataclasses.Field[Any]) -> str:
    if spec.default is not dataclasses.MISSING:
        value = spec.default
    elif spec.default_factory is not dataclasses.MISSING:
        value = to_dict(spec.default_factory())
    else:
        return "required"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        value = list(value)
    return f"`{value}`"


# --- the example file ------------------------------------------------------------------------

_EXAMPLE_HEADER = """\
# edge-agent configuration. Every key is shown with its default and what it does; delete what
# you do not change. Generated by `edge-agent config example` (a test keeps config.yaml equal to
# it). Environment variables override the file: EDGE_AGENT_<SECTION>__<KEY>, e.g.
# EDGE_AGENT_MQTT__HOST=broker.lan. Reference: docs/configuration.md.
"""

_SOURCE_EXAMPLES = """\
  # Local audio sources, each a stream of its own. Examples:
  # sources:
  #   - type: microphone      # needs: pip install 'edge-agent[mic]'; list devices: edge-agent devices
  #     id: mic
  #     device: null          # index, or part of the device name; null: the system default
  #     sample_rate: null     # null: the device's default rate, resampled to 16 kHz
  #     chunk_ms: 100
  #     buffer_seconds: 2.0
  #   - type: file            # WAV files played like a microphone (demos, tests)
  #     id: demo
  #     path: /var/lib/edge-agent/demo.wav
  #     loop: false
  #     realtime: true
  #     chunk_ms: 100
  #     gap_seconds: 0.5
  sources: []
"""


def _yaml_scalar(value: Any) -> str:
    if value is None:
        return "null"
    text = yaml.safe_dump(value, allow_unicode=True, default_flow_style=True, width=1000).strip()
    return text.removesuffix("\n...").strip()


def example_yaml() -> str:
    """A commented YAML file with every key at its default (what config.yaml holds)."""
    lines = [_EXAMPLE_HEADER]

    def list_of_sections(item: type, entries: list[dict[str, Any]], indent: str) -> None:
        docs = {f.name: f.metadata["doc"] for f in dataclasses.fields(item)}
        for entry in entries:
            for position, (key, value) in enumerate(entry.items()):
                lines.append(f"{indent}{'  ' if position else ''}# {docs[key]}")
                lines.append(f"{indent}{'  ' if position else '- '}{key}: {_yaml_scalar(value)}")

    def section(cls: type, indent: str) -> None:
        hints = typing.get_type_hints(cls)
        for spec in dataclasses.fields(cls):
            hint = hints[spec.name]
            doc = spec.metadata["doc"]
            if typing.get_origin(hint) is tuple and typing.get_args(hint)[0] == AudioSourceConfig:
                lines.append(_SOURCE_EXAMPLES.rstrip("\n"))
                continue
            if indent == "":
                lines.append("")
            if dataclasses.is_dataclass(hint):
                lines.append(f"{indent}# {doc}")
                lines.append(f"{indent}{spec.name}:")
                section(hint, indent + "  ")
            elif typing.get_origin(hint) is tuple and dataclasses.is_dataclass(typing.get_args(hint)[0]):
                lines.append(f"{indent}# {doc}")
                lines.append(f"{indent}{spec.name}:")
                list_of_sections(typing.get_args(hint)[0], to_dict(spec.default_factory()), indent + "  ")
            else:
                default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
                bounds = _bounds(spec.metadata).strip()
                lines.append(f"{indent}# {doc}" + (f" ({bounds})" if bounds else ""))
                lines.append(f"{indent}{spec.name}: {_yaml_scalar(to_dict(default))}")

    section(AgentConfig, "")
    return "\n".join(lines) + "\n"

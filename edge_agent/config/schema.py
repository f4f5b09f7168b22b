"""The configuration's schema: every key a field of a frozen dataclass, with its doc and bounds.

:class:`AgentConfig` is the root of the tree. :func:`option` declares a field together with the
documentation and bounds that the parser checks and the reference renders, so that a key is
described in exactly one place. Rules involving several keys live with the parser
(``edge_agent.config.parse``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TOPIC_PATTERN = re.compile(r"^[^#+\s]+$")

# The engine and the model store keep their own copies of these defaults
# (edge_agent.engine.model, edge_agent.model_store). They are written out again here because
# the configuration imports nothing from the engine, so that loading it stays cheap and
# independent; tests/config/test_schema.py keeps each copy equal to the engine's.
DEFAULT_MODEL_ID = "damo/speech_charctc_kws_phone-xiaoyun"
DEFAULT_REVISION = "master"
DEFAULT_THRESHOLD = 0.05
# A keyword's durations come from the model's keywords.json when left unset; these are the
# engine's fallbacks, which the parser uses to check min_duration < max_duration.
DEFAULT_MIN_DURATION = 0.25
DEFAULT_MAX_DURATION = 2.5
DEFAULT_REFRACTORY_SECONDS = 1.0
DEFAULT_GAP_TOLERANCE = 0.5
DEFAULT_HOLD_SECONDS = 0.5
DEFAULT_PAUSE_SECONDS = 0.35


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


def bounds_text(meta: Mapping[str, Any]) -> str:
    """A field's bounds as error messages and the reference word them, e.g. ``" between 1 and 64"``."""
    low, high = meta.get("minimum"), meta.get("maximum")
    if low is not None and high is not None:
        return f" between {low:g} and {high:g}"
    if low is not None:
        return f" >= {low:g}"
    if high is not None:
        return f" <= {high:g}"
    return ""


# --- sections --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DeviceConfig:
    id: str | None = option(
        None,
        doc="Device id used in MQTT topics and client id; letters, digits, _ and -. Default: the host "
        "name and 6 hex characters from the machine id (/etc/machine-id), e.g. raspberrypi-3f2a9c.",
        pattern=ID_PATTERN,
    )
    name: str | None = option(None, doc="Friendly name shown by Home Assistant and the fleet monitor.")
    groups: tuple[str, ...] = option(
        (), doc="Fleet groups; commands sent to {prefix}/group/{name}/cmd/... reach this device."
    )
    room: str | None = option(
        None,
        doc="Room this device listens in; `edge-agent arbiter` turns the room's detections of one "
        "utterance into one wake on {prefix}/room/{room}/wake (the loudest device wins).",
        pattern=ID_PATTERN,
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
    workers: int = option(
        1,
        doc="Engine worker processes, streams shared among them: 1 = the engine on one thread of the "
        "agent's own process; 0 = one process per core (each loads the model: more memory).",
        minimum=0,
        maximum=64,
    )
    quantize: bool = option(
        False,
        doc="torch backend only: int8 dynamic quantization of the linear layers (faster; see the README).",
    )
    refractory: float = option(
        DEFAULT_REFRACTORY_SECONDS,
        doc="Seconds after a detection during which the same keyword is not reported again, "
        "unless stronger: counting at a higher threshold (a lower threshold only adds detections).",
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
    near_misses: bool = option(
        False,
        doc="Track each keyword's near misses (the best score of the last hour that came within a "
        "quarter of the threshold) for health and `edge-agent fleet`: a second, lower-threshold "
        "decoding pass, so off by default (it costs every stream engine time; see README's Speed).",
    )
    pause: float = option(
        DEFAULT_PAUSE_SECONDS,
        doc="Longest pause (s) between two characters of one spoken keyword: a weak detection stops "
        "waiting for a better match once nothing has gone on for this long (engine.hold caps the wait).",
        minimum=0.03,
        maximum=2.0,
    )


# A keyword is a few words: its decoding cost grows with its length, and so do the agent's
# memory and CPU with the number of keywords.
MAX_KEYWORD_CHARACTERS = 16
MAX_KEYWORDS = 32


@dataclass(frozen=True, kw_only=True)
class KeywordConfig:
    text: str = option(
        doc="The keyword in Chinese characters, e.g. 小云小云; any characters of the model's lexicon "
        f"(at most {MAX_KEYWORD_CHARACTERS}; at most {MAX_KEYWORDS} keywords)."
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
        doc=f"Shortest keyword (s); default from the model's keywords.json ({DEFAULT_MIN_DURATION}).",
        minimum=0.0,
        maximum=10.0,
    )
    max_duration: float | None = option(
        None,
        doc=f"Longest keyword (s); default from the model's keywords.json ({DEFAULT_MAX_DURATION}).",
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
    topic_prefix: str = option("edge_agent", doc="First level of every topic.", pattern=TOPIC_PATTERN)
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
    id: str = option("mic", doc="Stream id in detections and health.", pattern=ID_PATTERN)
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
    id: str = option("file", doc="Stream id in detections and health.", pattern=ID_PATTERN)
    path: str = option(doc="A WAV file or a folder of WAV files (played in name order).")
    loop: bool = option(False, doc="Start again after the last file.")
    realtime: bool = option(True, doc="Pace playback in real time (false: as fast as possible).")
    chunk_ms: int = option(100, doc="Audio handed to the engine at a time (ms).", minimum=10, maximum=1000)
    gap_seconds: float = option(0.5, doc="Silence inserted between files (s).", minimum=0.0, maximum=60)


AudioSourceConfig = MicrophoneSource | FileSource
# The ``type`` key of an audio source picks its class.
SOURCE_TYPES: dict[str, type] = {"microphone": MicrophoneSource, "file": FileSource}


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
    allow_sensitive: bool = option(
        False,
        doc="Let set_config change credentials, certificate checks, listening addresses, the client id, "
        "topic prefix, device id and these command settings (off: only this file can).",
    )
    connection_trial: float = option(
        30.0,
        doc="A set_config of broker connection settings is kept only if the device is back online with "
        "them within this long (s); otherwise the previous ones are restored.",
        minimum=5.0,
        maximum=600.0,
    )


@dataclass(frozen=True, kw_only=True)
class HomeAssistantConfig:
    enabled: bool = option(False, doc="Publish Home Assistant MQTT discovery (event, sensors, mute switch).")
    discovery_prefix: str = option(
        "homeassistant", doc="Home Assistant's discovery prefix.", pattern=TOPIC_PATTERN
    )


@dataclass(frozen=True, kw_only=True)
class HermesConfig:
    enabled: bool = option(False, doc="Speak Rhasspy's Hermes protocol: audioFrame in, hotword detected out.")
    site_ids: tuple[str, ...] = option((), doc="Sites to listen to; empty: every site.")
    wakeword_id: str = option(
        "xiaoyun", doc="The {wakewordId} of hermes/hotword/{wakewordId}/detected.", pattern=ID_PATTERN
    )


@dataclass(frozen=True, kw_only=True)
class WyomingConfig:
    enabled: bool = option(
        False,
        doc="Serve Home Assistant's Wyoming protocol: a wake-word service for Assist pipelines "
        "(docs/wyoming.md). Needs the `wyoming` extra.",
    )
    host: str = option("0.0.0.0", doc="Address to listen on (no authentication, like every Wyoming service).")
    port: int = option(
        10400,
        doc="TCP port (10400 is the Wyoming wake-word services' usual one; 0: any free port, logged).",
        minimum=0,
        maximum=65535,
    )
    name: str = option(
        "edge-agent",
        doc="Name of the wake-word program in `describe`; Home Assistant names its entity after it.",
    )
    zeroconf: bool = option(
        True, doc="Advertise the service as _wyoming._tcp over mDNS, for Home Assistant's discovery."
    )
    zeroconf_name: str | None = option(
        None, doc="The mDNS instance name. Default: the device id.", pattern=ID_PATTERN
    )
    advertise_host: str | None = option(
        None,
        doc="IPv4 address announced over mDNS, and the only interface mDNS uses. Default: the host's "
        "non-loopback addresses (all interfaces).",
    )
    max_connections: int = option(
        256,
        doc="Most open client connections; one more gets an error event and is closed. Streaming "
        "clients are also limited by audio.mqtt.max_streams.",
        minimum=1,
        maximum=65536,
    )
    batch_ms: int = option(
        100,
        doc="Every client's audio goes to the engine together, every this many ms: one batched "
        "engine step for all clients instead of one per chunk, for up to this much delay "
        "(0: each chunk as it arrives).",
        minimum=0,
        maximum=500,
    )
    max_event_bytes: int = option(
        1_048_576,
        doc="Largest event data or payload accepted from a client (bytes); a larger one gets an "
        "error event and the connection is closed.",
        minimum=4096,
        maximum=256_000_000,
    )
    idle_timeout: float = option(
        60.0,
        doc="A connection that sends nothing for this long (s) is closed.",
        minimum=1.0,
        maximum=86400,
    )
    event_loop: Literal["auto", "uvloop", "asyncio"] = option(
        "auto",
        doc="The server's event loop: uvloop (a faster loop, in the `wyoming` extra) or Python's own "
        "asyncio; auto: uvloop when it is installed.",
    )


@dataclass(frozen=True, kw_only=True)
class PoolConfig:
    enabled: bool = option(
        False, doc="Server mode: share streams with other agents of the same pool (docs/scale-out.md)."
    )
    name: str = option(
        "default", doc="Pool name; agents with the same name share the work.", pattern=ID_PATTERN
    )


# Pages served from this machine may call the API by default; any other site needs a setting.
DEFAULT_CORS_ORIGINS = ("http://localhost:*", "http://127.0.0.1:*", "http://[::1]:*")
# Loopback names only: another name in the Host header is how a DNS-rebinding page gets in.
DEFAULT_ALLOWED_HOSTS = ("localhost", ".localhost")
ORIGIN_PATTERN = re.compile(r"^(\*|null|https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:([0-9]{1,5}|\*))?)$")
HOST_NAME_PATTERN = re.compile(r"^(\*|\.?[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*)$")
# List keys that also take one comma-separated string (a command-line or environment value).
COMMA_SEPARATED_KEYS = ("http.cors_origins", "http.allowed_hosts")


@dataclass(frozen=True, kw_only=True)
class HttpConfig:
    enabled: bool = option(False, doc="Serve the local HTTP API, /ui test page and /metrics.")
    host: str = option("127.0.0.1", doc="Address to bind; 0.0.0.0 exposes the API to the network (no auth).")
    port: int = option(8080, doc="TCP port.", minimum=1, maximum=65535)
    max_upload_mb: float = option(
        20.0, doc="Largest WAV accepted by POST /detect (MB); larger gets 413.", minimum=0.1, maximum=1024
    )
    cors_origins: tuple[str, ...] = option(
        DEFAULT_CORS_ORIGINS,
        doc="Origins whose web pages may call the API (CORS), e.g. http://localhost:3000; a port of * "
        "matches any port; * alone allows every origin (a page opened from a file has origin null).",
        pattern=ORIGIN_PATTERN,
    )
    allowed_hosts: tuple[str, ...] = option(
        DEFAULT_ALLOWED_HOSTS,
        doc="Host names a request may address (against DNS rebinding); IP addresses are always "
        "accepted; a leading dot matches subdomains; * accepts any name.",
        pattern=HOST_NAME_PATTERN,
    )
    show_paths: bool = option(
        False,
        doc="Show file paths in answers: the model's directory in /info, paths in health errors "
        "(the API has no authentication; the log always has them).",
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
    wyoming: WyomingConfig = option(
        factory=WyomingConfig, doc="Wyoming wake-word service for Home Assistant Assist."
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


# Where the OS keeps the machine's stable random id (systemd, then D-Bus).
MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")
# Hex characters of the machine suffix: 16.7 million values, so that two stock boards with
# the same host name ("raspberrypi") get different ids.
MACHINE_SUFFIX_CHARS = 6


def machine_suffix(paths: tuple[str, ...] = MACHINE_ID_FILES) -> str | None:
    """A short stable suffix derived from the machine id, or None where there is none.

    Hashed with this application's name (as systemd asks of anyone who shows it): the machine
    id itself is never published."""
    for path in paths:
        try:
            with open(path, encoding="ascii", errors="replace") as handle:
                machine_id = handle.readline().strip()
        except OSError:
            continue
        if machine_id:
            digest = hashlib.sha256(b"edge_agent device id:" + machine_id.encode()).hexdigest()
            return digest[:MACHINE_SUFFIX_CHARS]
    return None


def default_device_id(hostname: str | None = None, suffix: str | None = None) -> str:
    """``{host name}-{machine suffix}``, reduced to what MQTT topics and Home Assistant ids
    allow: two boards with the same host name get different ids (two agents with one id knock
    each other off the broker). The host name alone where the OS has no machine id."""
    host = socket.gethostname() if hostname is None else hostname
    suffix = machine_suffix() if suffix is None else suffix
    tail = f"-{suffix}" if suffix else ""
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "_", host.split(".")[0])[: 64 - len(tail)]
    return (cleaned or "edge_agent") + tail

"""Every MQTT message the agent sends or accepts: one typed class per message, owning its topic.

Topics live under ``{prefix}/{device}/`` (``prefix`` = ``mqtt.topic_prefix``, default
``edge_agent``). No other module builds topic strings: they call ``Message.topic(...)`` and
``Message.match(topic)``. JSON payloads carry ``"schema": 1`` so consumers can tell versions
apart. Watch everything an agent says with::

    mosquitto_sub -v -t 'edge_agent/#'

=========================================  ====  ======  ==========================================
topic                                      dir   retain  payload
=========================================  ====  ======  ==========================================
``{p}/{d}/availability``                   out   yes     ``online`` / ``offline`` (last will)
``{p}/{d}/info``                           out   yes     :class:`DeviceInfo` JSON
``{p}/{d}/detection``                      out   no      :class:`DetectionEvent` JSON, QoS 1
``{p}/{d}/health``                         out   yes     :class:`HealthReport` JSON
``{p}/{d}/error``                          out   no      :class:`ErrorReport` JSON
``{p}/{d}/audio/{stream}``                 in    no      raw PCM, 16 kHz mono s16le unless declared
``{p}/{d}/audio/{stream}/control``         in    no      :class:`AudioControl` JSON
``{p}/{d}/detect/request[/{request_id}]``  in    no      a whole WAV file
``{p}/{d}/detect/response/{request_id}``   out   no      :class:`DetectResponse` JSON (MQTT 3.1.1)
=========================================  ====  ======  ==========================================
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import Any, ClassVar, TypeVar

SCHEMA_VERSION = 1
_SEGMENT = r"[^/#+]+"
_PLACEHOLDER = re.compile(r"\{(\w+)\}")

T = TypeVar("T", bound="JsonMessage")


class PayloadError(ValueError):
    """An inbound payload this agent refuses; the message says why."""


class Topic:
    """A topic template such as ``{prefix}/{device}/audio/{stream}``."""

    def __init__(self, template: str) -> None:
        self.template = template
        self.fields = tuple(_PLACEHOLDER.findall(template))
        # prefix may span several levels ("home/edge"); every other field is one level.
        pattern = ""
        for part in re.split(r"(\{\w+\})", template):
            match = _PLACEHOLDER.fullmatch(part)
            if match is None:
                pattern += re.escape(part)
            elif match.group(1) == "prefix":
                pattern += r"(?P<prefix>.+?)"
            else:
                pattern += rf"(?P<{match.group(1)}>{_SEGMENT})"
        self._regex = re.compile(pattern + r"\Z")

    def format(self, **parts: str) -> str:
        for name in self.fields:
            value = parts.get(name)
            if value is None:
                raise ValueError(f"topic {self.template} needs {name}")
            if name != "prefix" and not re.fullmatch(_SEGMENT, value):
                raise ValueError(f"{name} {value!r} cannot be a topic level")
        return self.template.format(**parts)

    def filter(self, **parts: str) -> str:
        """A subscription filter: missing fields become ``+``."""
        return self.template.format(**{name: parts.get(name, "+") for name in self.fields})

    def match(self, topic: str, prefix: str | None = None) -> dict[str, str] | None:
        found = self._regex.match(topic)
        if found is None:
            return None
        parts = found.groupdict()
        if prefix is not None and parts.get("prefix") != prefix:
            return None
        return parts


def iso_utc(epoch: float) -> str:
    """Wall-clock time as carried in payloads: ISO 8601, UTC, milliseconds, ``Z``."""
    return (
        datetime.fromtimestamp(epoch, tz=timezone.utc)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def parse_iso_utc(text: str) -> float:
    """The epoch time of an :func:`iso_utc` string."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _json(payload: dict[str, Any]) -> bytes:
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # A string that is not valid Unicode (a lone surrogate from somebody's topic name):
        # \u escapes keep the JSON valid instead of failing the whole message.
        return json.dumps(payload, ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode("ascii")


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def parse_json_object(payload: bytes, what: str) -> dict[str, Any]:
    """Decode a JSON object payload or raise :class:`PayloadError` saying what is wrong."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise PayloadError(f"{what}: payload is not UTF-8 JSON") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise PayloadError(f"{what}: payload is not JSON ({error.msg} at position {error.pos})") from None
    if not isinstance(value, dict):
        raise PayloadError(f"{what}: expected a JSON object, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class JsonMessage:
    """Base of JSON messages: ``to_payload`` / ``from_payload`` round-trip every field."""

    TOPIC: ClassVar[Topic]

    def to_dict(self) -> dict[str, Any]:
        # The fields are plain values, lists and dicts, which JSON takes as they are: no copy.
        return {"schema": SCHEMA_VERSION, **{name: getattr(self, name) for name in _field_names(type(self))}}

    def to_payload(self) -> bytes:
        return _json(self.to_dict())

    @classmethod
    def from_payload(cls: type[T], payload: bytes) -> T:
        data = parse_json_object(payload, cls.__name__)
        data.pop("schema", None)
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise PayloadError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
        try:
            return cls(**data)
        except TypeError as error:
            raise PayloadError(f"{cls.__name__}: {error}") from None


# --- outbound --------------------------------------------------------------------------------


class Availability:
    """``{prefix}/{device}/availability``: retained ``online``; the last will sets ``offline``.

    Home Assistant, Zigbee2MQTT and ESPHome use the same two words.
    """

    TOPIC = Topic("{prefix}/{device}/availability")
    ONLINE = b"online"
    OFFLINE = b"offline"


@dataclass(frozen=True)
class DeviceInfo(JsonMessage):
    """``{prefix}/{device}/info``, retained: what this agent is and runs.

    Published after every connection; ``boot_id`` changes at every start, so consumers can
    tell a restart from a reconnect (as Sparkplug's bdSeq does).
    """

    TOPIC: ClassVar[Topic] = Topic("{prefix}/{device}/info")

    device: str
    name: str | None
    version: str
    boot_id: str
    started: str  # ISO 8601 UTC
    model: dict[str, Any]  # id, revision, backend, directory
    keywords: list[dict[str, Any]]  # text, threshold, min_duration, max_duration
    sources: list[dict[str, Any]]
    platform: dict[str, str]  # system, release, machine, python
    topics: dict[str, str]
    groups: list[str] = field(default_factory=list)
    muted: bool = False
    room: str | None = None  # device.room: the room arbiter ranks this device's detections in it


@dataclass(frozen=True)
class DetectionEvent(JsonMessage):
    """``{prefix}/{device}/detection``, QoS 1, not retained: one spoken keyword.

    ==============  ==========================================================================
    ``seq``         per-device sequence number, increasing, persisted across restarts
    ``start/end``   seconds from the start of the stream
    ``time``        wall-clock time of the keyword's end, ISO 8601 UTC
    ``delay_ms``    from the keyword's end to the moment this was first handed to the broker
    ``replayed``    true when sent from the outbox after an outage or restart: automations
                    should ignore it (live ones also carry an MQTT 5 message expiry)
    ``level_dbfs``  RMS level of the keyword's audio, dBFS (null when unknown)
    ``snr_db``      that level over the stream's recent background (a low percentile), dB
    ==============  ==========================================================================

    ``mosquitto_sub -t 'edge_agent/+/detection' -q 1``
    """

    TOPIC: ClassVar[Topic] = Topic("{prefix}/{device}/detection")

    device: str
    stream: str
    keyword: str
    confidence: float
    start: float
    end: float
    time: str
    seq: int
    boot_id: str
    delay_ms: float | None = None
    replayed: bool = False
    level_dbfs: float | None = None
    snr_db: float | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.confidence, (int, float)) and 0.0 <= self.confidence <= 1.0):
            raise PayloadError(f"DetectionEvent: confidence must be in [0, 1], got {self.confidence!r}")
        if not isinstance(self.seq, int) or self.seq < 0:
            raise PayloadError(f"DetectionEvent: seq must be a non-negative integer, got {self.seq!r}")

    # What is decided when an event is delivered, not when it is made: not stored with it.
    DELIVERY_FIELDS: ClassVar[frozenset[str]] = frozenset({"seq", "delay_ms", "replayed"})

    def stored_body(self) -> dict[str, Any]:
        """The event as the outbox keeps it: without its number and delivery fields."""
        return {name: getattr(self, name) for name in _stored_names()}

    @classmethod
    def from_stored(
        cls, body: dict[str, Any], seq: int, delivered_at: float | None = None, replayed: bool = False
    ) -> DetectionEvent:
        """The event of a stored body and its number (unknown keys of older bodies dropped);
        with ``delivered_at``, as it goes out then: its delay since the keyword's end, and
        whether it is a replay (made in one go: a burst of detections makes one per event)."""
        names = _stored_names()
        kept = {k: v for k, v in body.items() if k in names}
        delay = None
        if delivered_at is not None:
            delay = max(0.0, round((delivered_at - parse_iso_utc(kept["time"])) * 1000.0, 1))
        return cls(**kept, seq=seq, delay_ms=delay, replayed=replayed)


@functools.cache
def _stored_names() -> tuple[str, ...]:
    return tuple(name for name in _field_names(DetectionEvent) if name not in DetectionEvent.DELIVERY_FIELDS)


@dataclass(frozen=True)
class StreamHealth:
    audio_seconds: float
    chunks: int
    dropped_chunks: int
    rtf: float | None
    last_audio: str | None
    level_dbfs: float | None
    detections: int
    kind: str = "mqtt"
    errors: int = 0


@dataclass(frozen=True)
class HealthReport(JsonMessage):
    """``{prefix}/{device}/health``, retained, every ``health.interval`` seconds."""

    TOPIC: ClassVar[Topic] = Topic("{prefix}/{device}/health")

    device: str
    boot_id: str
    time: str
    uptime_s: float
    cpu_percent: float | None
    memory_rss_mb: float | None
    temperature_c: float | None
    detections: int
    mqtt_reconnects: int
    streams: dict[str, dict[str, Any]]
    outbox_depth: int = 0
    outbox_dropped: int = 0
    outbox_unwritten: int = 0
    outbox_skipped: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    muted: bool = False
    interval_s: float = 60.0
    worker: dict[str, Any] = field(default_factory=dict)
    # False-alarm telemetry over the last hour (docs/fleet.md): detections per hour, and per
    # keyword the best confidence of a match that stayed below its threshold (a near miss).
    detections_per_hour: float | None = None
    near_miss: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ErrorReport(JsonMessage):
    """``{prefix}/{device}/error``: an input the agent refused, and why. Never retained.

    ``code`` is stable for automations (``bad_payload``, ``bad_audio_format``, ``payload_too_large``,
    ``too_many_streams``, ``rate_limited``, ``queue_full``, ...); ``suppressed`` counts
    identical errors not published since the previous one (errors are rate-limited).
    """

    TOPIC: ClassVar[Topic] = Topic("{prefix}/{device}/error")

    device: str
    time: str
    code: str
    message: str
    topic: str | None = None
    stream: str | None = None
    suppressed: int = 0


@dataclass(frozen=True)
class DetectResponse(JsonMessage):
    """Answer to a whole-file request: MQTT 5 goes to the request's response topic with its
    correlation data; MQTT 3.1.1 clients publish to ``detect/request/{request_id}`` and read
    ``{prefix}/{device}/detect/response/{request_id}``."""

    TOPIC: ClassVar[Topic] = Topic("{prefix}/{device}/detect/response/{request_id}")

    device: str
    request_id: str | None
    ok: bool
    detected: bool = False
    detections: list[dict[str, Any]] = field(default_factory=list)
    duration_s: float | None = None
    processing_ms: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class CommandResult(JsonMessage):
    """The answer to a command: to the MQTT 5 response topic (with the correlation data) when the
    command had one, else to ``{prefix}/{device}/cmd_result``. ``id`` echoes the command's
    ``id`` field (Zigbee2MQTT's ``transaction``), so MQTT 3.1.1 callers can match answers.

    ``mosquitto_sub -t 'edge_agent/+/cmd_result'`` collects the fleet's answers.
    """

    TOPIC: ClassVar[Topic] = Topic("{prefix}/{device}/cmd_result")

    device: str
    command: str
    ok: bool
    id: str | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    restart_required: list[str] = field(default_factory=list)


# --- inbound ---------------------------------------------------------------------------------


class CommandTopic:
    """Commands: ``{prefix}/{device}/cmd/{command}`` for one device, ``{prefix}/all/cmd/{command}``
    for the whole fleet, ``{prefix}/group/{group}/cmd/{command}`` for a group (``device.groups``).

    The payload is a JSON object of arguments (empty for none), optionally with an ``id``.
    Retained commands are ignored: a command must never run again when a device reconnects.

    ``mosquitto_pub -t edge_agent/kitchen/cmd/set_config -m '{"keywords": ["小云小云", "如家酒店"]}'``
    """

    DEVICE = Topic("{prefix}/{device}/cmd/{command}")
    ALL = Topic("{prefix}/all/cmd/{command}")
    GROUP = Topic("{prefix}/group/{group}/cmd/{command}")


def response_topic_refusal(topic: str, prefix: str) -> str | None:
    """Why a request's MQTT 5 response topic must not be answered on, or None. An answer
    published into the fleet's command space would be a command: whoever may send requests
    could make a device mute, restart or reconfigure itself or another."""
    if not topic or topic.startswith("$") or any(c in topic for c in "+#\x00"):
        return f"response topic {topic!r} is not a topic one can publish to"
    for template in (CommandTopic.DEVICE, CommandTopic.ALL, CommandTopic.GROUP):
        if template.match(topic, prefix) is not None:
            return f"response topic {topic!r} lies in the fleet's command space ({prefix}/.../cmd/...)"
    return None


class AudioTopic:
    """``{prefix}/{device}/audio/{stream}``: raw PCM chunks of one stream.

    Default format: 16 kHz, mono, signed 16-bit little-endian. Declare another one with MQTT 5
    user properties on any chunk (``rate``, ``channels``, ``width`` in bytes: 1 = unsigned
    8-bit, 2 = s16le, 4 = s32le) or with an :class:`AudioControl` ``start``.

    ``mosquitto_pub -t edge_agent/kitchen/audio/door -f chunk.raw``
    """

    TOPIC = Topic("{prefix}/{device}/audio/{stream}")


_AUDIO_ACTIONS = ("start", "end")


@dataclass(frozen=True)
class AudioControl(JsonMessage):
    """``{prefix}/{device}/audio/{stream}/control``: ``{"action": "start", "rate": 48000, ...}``
    declares the format of the chunks that follow and starts the stream afresh; ``{"action":
    "end"}`` ends it, so the last second is scored at once instead of after the idle timeout."""

    TOPIC: ClassVar[Topic] = Topic("{prefix}/{device}/audio/{stream}/control")

    action: str
    rate: int | None = None
    channels: int | None = None
    width: int | None = None

    def __post_init__(self) -> None:
        if self.action not in _AUDIO_ACTIONS:
            raise PayloadError(
                f"AudioControl: action must be one of {', '.join(_AUDIO_ACTIONS)}, got {self.action!r}"
            )
        for name in ("rate", "channels", "width"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise PayloadError(f"AudioControl: {name} must be a positive integer, got {value!r}")


class ProbeTopic:
    """``{prefix}/{device}/probe``: empty QoS 1 publishes with a 1 s expiry, only for their
    acknowledgement (the agent checks a quiet link is alive before a detection goes out).
    Nothing to read there."""

    TOPIC = Topic("{prefix}/{device}/probe")


class DetectRequestTopic:
    """``{prefix}/{device}/detect/request`` (MQTT 5, with response topic and correlation data)
    or ``.../detect/request/{request_id}`` (MQTT 3.1.1): the payload is a whole WAV file."""

    TOPIC = Topic("{prefix}/{device}/detect/request")
    TOPIC_WITH_ID = Topic("{prefix}/{device}/detect/request/{request_id}")


def finite_or_none(value: float | None, digits: int = 3) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value, digits)

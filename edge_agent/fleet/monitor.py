"""What the fleet looks like, folded from the retained messages every agent publishes. No I/O.

:class:`FleetView` takes ``{prefix}/+/availability``, ``{prefix}/+/info`` and ``{prefix}/+/health``
messages (retained or live, in any order) and gives one :class:`DeviceRow` per device: online or
offline (the last will says ``offline`` after a crash or a power cut), what it runs, how it is
doing, and whether its health is **overdue**:

* a device with a health report is overdue when ``now - health.time > 2.5 x health.interval_s``
  (``health.time`` is the device's clock; a report that arrived live counts from its arrival,
  so a device whose clock is behind is not flagged while it keeps reporting);
* an online device with no health report at all is overdue once the grace period (10 s) has
  passed since it started (``info.started``) or since the view first saw it, whichever is older;
* an offline device is never overdue: ``offline`` already says why it is silent.

:class:`CommandRound` keeps the answers to one ``edge-agent fleet cmd`` and decides its exit
code. :func:`format_table` renders rows for a terminal (Chinese keywords count two columns).
The clock is injected, so everything here is tested with synthetic messages.
"""

from __future__ import annotations

import math
import statistics
import time
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from typing import Any, Literal, TypeVar

from edge_agent.fleet.rollout import poisson_tail
from edge_agent.mqtt.messages import (
    Availability,
    CommandResult,
    CommandTopic,
    DeviceInfo,
    HealthReport,
    JsonMessage,
    PayloadError,
    parse_json_object,
)

OVERDUE_FACTOR = 2.5  # health intervals without a report before a device is flagged
DEFAULT_GRACE_S = 10.0  # an online device without any health report is flagged after this
DEFAULT_INTERVAL_S = 60.0  # health.interval's default, for a report that does not say

ONLINE, OFFLINE, UNKNOWN = "online", "offline", "unknown"

# A device's detections per hour are flagged when they are more than this many times its
# group's median (or less than that share of it) beyond chance: its count over the hour (or
# the part of it the device has run) is a Poisson test at RATE_OUTLIER_SIGNIFICANCE. A few
# detections more than a quiet group, or a young device's first one, are noise.
RATE_OUTLIER_FACTOR = 3.0
RATE_OUTLIER_SIGNIFICANCE = 0.01
RATE_OUTLIER_MIN_PEERS = 3  # devices with a rate in the group, itself included
RATE_HIGH, RATE_LOW = "det-rate-high", "det-rate-low"

M = TypeVar("M", bound=JsonMessage)


def state_filters(prefix: str) -> list[str]:
    """The subscriptions that feed a :class:`FleetView`."""
    return [template.filter(prefix=prefix) for template in _STATE_TOPICS]


_STATE_TOPICS = (Availability.TOPIC, DeviceInfo.TOPIC, HealthReport.TOPIC)


def lenient_parse(cls: type[M], payload: bytes) -> M:
    """``cls.from_payload`` that ignores fields it does not know: a newer agent in the fleet adds
    fields, and the monitor must still show it. Missing required fields still raise."""
    data = parse_json_object(payload, cls.__name__)
    data.pop("schema", None)
    names = {f.name for f in fields(cls)}
    try:
        return cls(**{key: value for key, value in data.items() if key in names})
    except TypeError as error:
        raise PayloadError(f"{cls.__name__}: {error}") from None


def parse_time(value: Any) -> float | None:
    """An ISO 8601 time as epoch seconds (naive means UTC), or None when it is not one."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith("Z") else value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def iso_time(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    stamp = datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


# --- one device --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceRow:
    """One device as the monitor shows it; ``to_dict`` is what ``edge-agent fleet --json`` prints."""

    device: str
    status: str  # online | offline | unknown (no availability message)
    overdue: bool
    overdue_reason: str | None
    flags: list[str]
    last_seen: str | None  # the latest of health.time, info.started and live messages
    last_seen_age_s: float | None
    name: str | None
    version: str | None
    boot_id: str | None
    started: str | None
    model: str | None
    model_revision: str | None
    backend: str | None
    keywords: list[str]
    groups: list[str]
    muted: bool | None
    cpu_percent: float | None
    memory_rss_mb: float | None
    temperature_c: float | None
    rtf: float | None  # the slowest stream's real-time factor
    streams: int | None
    detections: int | None
    outbox_depth: int | None
    outbox_dropped: int | None
    mqtt_reconnects: int | None
    uptime_s: float | None
    health_time: str | None
    health_age_s: float | None
    health_interval_s: float | None
    worker_alive: bool | None
    problems: list[str] = field(default_factory=list)
    # False-alarm telemetry (health.detections_per_hour, health.near_miss) and the group's median
    # rate the outlier flags compare it with.
    detections_per_hour: float | None = None
    near_miss: dict[str, float] = field(default_factory=dict)
    group_detections_per_hour: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Device:
    device: str
    first_seen: float
    availability: str | None = None
    info: DeviceInfo | None = None
    health: HealthReport | None = None
    health_arrived: float | None = None  # view clock; only for reports that arrived live
    last_live: float | None = None  # view clock of the last live message (not the last will)
    problems: dict[str, str] = field(default_factory=dict)  # topic kind -> latest problem

    def empty(self) -> bool:
        return self.availability is None and self.info is None and self.health is None


class FleetView:
    """Per-device state under one topic prefix, from availability, info and health messages."""

    def __init__(
        self,
        prefix: str = "edge_agent",
        *,
        clock: Callable[[], float] = time.time,
        grace_s: float = DEFAULT_GRACE_S,
        overdue_factor: float = OVERDUE_FACTOR,
    ) -> None:
        self.prefix = prefix
        self.clock = clock
        self.grace_s = grace_s
        self.overdue_factor = overdue_factor
        self.ignored = 0  # messages on topics that are not ours
        self._devices: dict[str, _Device] = {}

    def filters(self) -> list[str]:
        return state_filters(self.prefix)

    # --- folding ---------------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes, retained: bool = False) -> str | None:
        """Fold one message in; returns the device it was about, or None if it was not ours.

        An empty payload clears that part (someone deleted the retained message); a device with
        nothing left is forgotten. A payload that cannot be read is kept as a problem of the
        device (shown in its row), never raised.
        """
        for template in _STATE_TOPICS:
            parts = template.match(topic, self.prefix)
            if parts is not None:
                break
        else:
            self.ignored += 1
            return None
        device_id = parts["device"]
        now = self.clock()
        device = self._devices.get(device_id)
        if device is None:
            device = self._devices[device_id] = _Device(device_id, first_seen=now)
        kind = topic.rsplit("/", 1)[1]
        device.problems.pop(kind, None)
        if not payload:
            self._clear(device, template)
            return device_id
        if not retained and payload != Availability.OFFLINE:
            device.last_live = now
        try:
            if template is Availability.TOPIC:
                text = payload.decode("utf-8", errors="replace").strip()
                device.availability = text
                if payload not in (Availability.ONLINE, Availability.OFFLINE):
                    device.problems[kind] = f"availability: unexpected payload {text[:40]!r}"
            elif template is DeviceInfo.TOPIC:
                device.info = lenient_parse(DeviceInfo, payload)
                self._check_device(device, kind, device.info.device)
            else:
                device.health = lenient_parse(HealthReport, payload)
                device.health_arrived = None if retained else now
                self._check_device(device, kind, device.health.device)
        except PayloadError as error:
            device.problems[kind] = str(error)
        return device_id

    def _clear(self, device: _Device, template: Any) -> None:
        if template is Availability.TOPIC:
            device.availability = None
        elif template is DeviceInfo.TOPIC:
            device.info = None
        else:
            device.health, device.health_arrived = None, None
        if device.empty() and not device.problems:
            del self._devices[device.device]

    @staticmethod
    def _check_device(device: _Device, kind: str, said: Any) -> None:
        if said != device.device:
            device.problems[kind] = f"{kind}: payload says device {said!r}"

    # --- reading ---------------------------------------------------------------------------
    def devices(self) -> list[str]:
        return sorted(self._devices)

    def status(self, device_id: str) -> str | None:
        device = self._devices.get(device_id)
        return None if device is None else _status(device)

    def groups(self, device_id: str) -> list[str]:
        device = self._devices.get(device_id)
        if device is None or device.info is None or not isinstance(device.info.groups, list):
            return []
        return [str(group) for group in device.info.groups]

    def rows(self) -> list[DeviceRow]:
        """Every device, with the rate-outlier flags (:func:`flag_rate_outliers`)."""
        now = self.clock()
        return flag_rate_outliers([self._row(self._devices[name], now) for name in sorted(self._devices)])

    def row(self, device_id: str) -> DeviceRow | None:
        device = self._devices.get(device_id)
        return None if device is None else self._row(device, self.clock())

    def expected(self, target: Target) -> set[str]:
        """Who should answer a command sent to ``target``: the device itself, or for ``all`` and
        groups every device known to be online (and in the group). Offline devices do not
        receive commands (retained commands are ignored), so they are not expected."""
        if target.kind == "device":
            return {target.name}
        online = {name for name, device in self._devices.items() if _status(device) == ONLINE}
        if target.kind == "all":
            return online
        return {name for name in online if target.name in self.groups(name)}

    def summary(self) -> dict[str, int]:
        rows = self.rows()
        return {
            "devices": len(rows),
            "online": sum(r.status == ONLINE for r in rows),
            "offline": sum(r.status == OFFLINE for r in rows),
            "unknown": sum(r.status == UNKNOWN for r in rows),
            "overdue": sum(r.overdue for r in rows),
        }

    def _row(self, device: _Device, now: float) -> DeviceRow:
        info, health = device.info, device.health
        status = _status(device)
        started = parse_time(info.started) if info is not None else None
        health_time = parse_time(health.time) if health is not None else None
        health_seen = _latest(health_time, device.health_arrived)
        interval = _number(health.interval_s) if health is not None else None
        overdue_reason = None
        if status != OFFLINE:
            if health is not None:
                limit = self.overdue_factor * (interval if interval and interval > 0 else DEFAULT_INTERVAL_S)
                if health_seen is None:
                    overdue_reason = "health report without a readable time"
                elif now - health_seen > limit:
                    overdue_reason = (
                        f"last health {format_age(now - health_seen)} ago, "
                        f"expected every {_number_text(interval or DEFAULT_INTERVAL_S)} s"
                    )
            else:
                since = min(t for t in (started, device.first_seen) if t is not None)
                if now - since > self.grace_s:
                    overdue_reason = "no health report"
        last_seen = _latest(health_time, started, device.last_live)
        streams = health.streams if health is not None and isinstance(health.streams, dict) else None
        worker = health.worker if health is not None and isinstance(health.worker, dict) else {}
        worker_alive = worker.get("alive") if isinstance(worker.get("alive"), bool) else None
        model = info.model if info is not None and isinstance(info.model, dict) else {}
        muted = _muted(info, health)
        flags = []
        if overdue_reason is not None:
            flags.append("OVERDUE")
        if worker_alive is False:
            flags.append("worker-dead")
        if muted:
            flags.append("muted")
        if health is not None and info is not None and health.boot_id != info.boot_id:
            flags.append("boot-mismatch")  # health and info from different starts: stale state
        if device.problems:
            flags.append("bad-payload")
        if health is not None and _integer(health.outbox_unwritten):
            flags.append("outbox-unwritable")  # detections held in memory only: disk full?
        return DeviceRow(
            device=device.device,
            status=status,
            overdue=overdue_reason is not None,
            overdue_reason=overdue_reason,
            flags=flags,
            last_seen=iso_time(last_seen),
            last_seen_age_s=None if last_seen is None else round(max(0.0, now - last_seen), 1),
            name=_text(info.name) if info is not None else None,
            version=_text(info.version) if info is not None else None,
            boot_id=_text(info.boot_id) if info is not None else _text(health.boot_id if health else None),
            started=iso_time(started),
            model=_text(model.get("id")),
            model_revision=_text(model.get("revision")),
            backend=_text(model.get("backend")),
            keywords=_keyword_texts(info),
            groups=self.groups(device.device),
            muted=muted,
            cpu_percent=_number(health.cpu_percent) if health else None,
            memory_rss_mb=_number(health.memory_rss_mb) if health else None,
            temperature_c=_number(health.temperature_c) if health else None,
            rtf=_worst_rtf(streams),
            streams=None if streams is None else len(streams),
            detections=_integer(health.detections) if health else None,
            outbox_depth=_integer(health.outbox_depth) if health else None,
            outbox_dropped=_integer(health.outbox_dropped) if health else None,
            mqtt_reconnects=_integer(health.mqtt_reconnects) if health else None,
            uptime_s=_number(health.uptime_s) if health else None,
            health_time=iso_time(health_time),
            health_age_s=None if health_seen is None else round(max(0.0, now - health_seen), 1),
            health_interval_s=interval,
            worker_alive=worker_alive,
            problems=[device.problems[k] for k in sorted(device.problems)],
            detections_per_hour=_number(health.detections_per_hour) if health else None,
            near_miss=_scores(health.near_miss) if health else {},
        )


def flag_rate_outliers(rows: list[DeviceRow]) -> list[DeviceRow]:
    """Flag online devices whose detections per hour are far from their group's median
    (``det-rate-high``: likely false alarms; ``det-rate-low``: deaf or muted by its room).
    A device's group is its first ``device.groups`` entry; devices without one form a group."""
    peers: dict[str, list[float]] = {}
    for row in rows:
        if row.status == ONLINE and row.detections_per_hour is not None:
            peers.setdefault(_rate_group(row), []).append(row.detections_per_hour)
    flagged = []
    for row in rows:
        rates = peers.get(_rate_group(row), [])
        rate = row.detections_per_hour
        if len(rates) < RATE_OUTLIER_MIN_PEERS or rate is None or row.status != ONLINE:
            flagged.append(row)
            continue
        median = statistics.median(rates)
        flags = list(row.flags)
        # The hour the rate covers: the device's uptime up to an hour (a minute at least).
        hours = min(3600.0, max(60.0, row.uptime_s or 0.0)) / 3600.0
        count = round(rate * hours)
        # The group's count over as long, one more (so that a silent group does not make one
        # detection damning), times the factor.
        high = RATE_OUTLIER_FACTOR * (median * hours + 1)
        low = median * hours / RATE_OUTLIER_FACTOR
        if poisson_tail(count, high) < RATE_OUTLIER_SIGNIFICANCE:
            flags.append(RATE_HIGH)
        elif 1.0 - poisson_tail(count + 1, low) < RATE_OUTLIER_SIGNIFICANCE:
            flags.append(RATE_LOW)
        flagged.append(replace(row, flags=flags, group_detections_per_hour=round(median, 1)))
    return flagged


def _rate_group(row: DeviceRow) -> str:
    return row.groups[0] if row.groups else ""


def _scores(value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        return {}
    return {str(k): v for k, raw in value.items() if (v := _number(raw)) is not None}


def _status(device: _Device) -> str:
    if device.availability == Availability.ONLINE.decode():
        return ONLINE
    if device.availability == Availability.OFFLINE.decode():
        return OFFLINE
    return UNKNOWN


def _latest(*times: float | None) -> float | None:
    known = [t for t in times if t is not None]
    return max(known) if known else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _muted(info: DeviceInfo | None, health: HealthReport | None) -> bool | None:
    # Health is newer than info most of the time; both are re-published after a mute command.
    for source in (health, info):
        if source is not None and isinstance(source.muted, bool):
            return source.muted
    return None


def _keyword_texts(info: DeviceInfo | None) -> list[str]:
    if info is None or not isinstance(info.keywords, list):
        return []
    return [str(k["text"]) for k in info.keywords if isinstance(k, dict) and "text" in k]


def _worst_rtf(streams: dict[str, Any] | None) -> float | None:
    values = [
        rtf
        for stream in (streams or {}).values()
        if isinstance(stream, dict) and (rtf := _number(stream.get("rtf"))) is not None
    ]
    return max(values) if values else None


# --- commands ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where a command goes: one device, ``all`` devices, or ``group:NAME``."""

    kind: Literal["device", "all", "group"]
    name: str = ""

    @classmethod
    def parse(cls, text: str) -> Target:
        if text == "all":
            return cls("all")
        kind: Literal["device", "group"] = "device"
        name = text
        if text.startswith("group:"):
            kind, name = "group", text[len("group:") :]
        if not name or any(c in name for c in "/#+") or name != name.strip():
            raise ValueError(f"{text!r} is not a device id, 'all' or 'group:NAME'")
        return cls(kind, name)

    def command_topic(self, prefix: str, command: str) -> str:
        if self.kind == "all":
            return CommandTopic.ALL.format(prefix=prefix, command=command)
        if self.kind == "group":
            return CommandTopic.GROUP.format(prefix=prefix, group=self.name, command=command)
        return CommandTopic.DEVICE.format(prefix=prefix, device=self.name, command=command)

    def __str__(self) -> str:
        return {"all": "all", "group": f"group:{self.name}"}.get(self.kind, self.name)


@dataclass
class CommandRound:
    """The answers to one command. Complete when every expected device has answered; exit code
    0 when every answer is ``ok`` and nobody expected is missing, else 1."""

    target: Target
    command: str
    answers: dict[str, CommandResult] = field(default_factory=dict)
    duplicates: int = 0

    def add(self, answer: CommandResult) -> bool:
        """Keep the first answer of each device; False for a repeat."""
        if answer.device in self.answers:
            self.duplicates += 1
            return False
        self.answers[answer.device] = answer
        return True

    def missing(self, expected: Iterable[str]) -> list[str]:
        return sorted(set(expected) - set(self.answers))

    def failed(self) -> list[str]:
        return sorted(name for name, answer in self.answers.items() if answer.ok is not True)

    def complete(self, expected: Iterable[str]) -> bool:
        return not self.missing(expected)

    def exit_code(self, expected: Iterable[str]) -> int:
        return 1 if self.failed() or self.missing(expected) else 0


# --- rendering -----------------------------------------------------------------------------------

COLUMNS = (
    # header, DeviceRow field, right-aligned
    ("DEVICE", "device", False),
    ("STATUS", "status", False),
    ("LAST SEEN", "last_seen_age_s", False),
    ("VERSION", "version", False),
    ("MODEL", "model", False),
    ("KEYWORDS", "keywords", False),
    ("CPU%", "cpu_percent", True),
    ("MEM MB", "memory_rss_mb", True),
    ("TEMP°C", "temperature_c", True),
    ("RTF", "rtf", True),
    ("DET", "detections", True),
    ("DET/H", "detections_per_hour", True),
    ("NEAR", "near_miss", True),
    ("OUTBOX", "outbox_depth", True),
    ("RECONN", "mqtt_reconnects", True),
    ("FLAGS", "flags", False),
)
_MODEL_WIDTH = 32
_KEYWORDS_WIDTH = 30


def format_age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def display_width(text: str) -> int:
    """Terminal columns: CJK characters take two, combining marks none."""
    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text
    )


def _clip(text: str, width: int, keep_end: bool = False) -> str:
    if display_width(text) <= width:
        return text
    chars = list(reversed(text)) if keep_end else list(text)
    kept: list[str] = []
    for char in chars:
        if display_width("".join(kept) + char) > width - 1:
            break
        kept.append(char)
    return "…" + "".join(reversed(kept)) if keep_end else "".join(kept) + "…"


def _number_text(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    text = f"{value:.{digits}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _cell(row: DeviceRow, name: str) -> str:
    value = getattr(row, name)
    if name == "last_seen_age_s":
        return "-" if value is None else f"{format_age(value)} ago"
    if name == "model":
        return "-" if value is None else _clip(value.rsplit("/", 1)[-1], _MODEL_WIDTH, keep_end=True)
    if name == "keywords":
        return _clip(",".join(value), _KEYWORDS_WIDTH) if value else "-"
    if name == "flags":
        return ",".join(value)
    if name == "rtf":
        return "-" if value is None else f"{value:.3f}"
    if name == "near_miss":  # the best near miss of any keyword
        return f"{max(value.values()):.2f}" if value else "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return "-" if value is None else str(value)


def format_table(rows: Iterable[DeviceRow]) -> str:
    """Rows as an aligned text table, one line per device, no trailing spaces."""
    cells = [[header for header, _, _ in COLUMNS]]
    cells += [[_cell(row, name) for _, name, _ in COLUMNS] for row in rows]
    widths = [max(display_width(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = []
    for line in cells:
        parts = []
        for (_, _, right), text, width in zip(COLUMNS, line, widths, strict=True):
            pad = " " * (width - display_width(text))
            parts.append(pad + text if right else text + pad)
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def format_summary(summary: dict[str, int]) -> str:
    text = f"{summary['devices']} device(s): {summary['online']} online, {summary['offline']} offline"
    if summary["unknown"]:
        text += f", {summary['unknown']} unknown"
    return text + f", {summary['overdue']} overdue"

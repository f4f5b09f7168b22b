"""One wake per room: the detections of one utterance by several devices become one ``wake``.

Devices declare their room (``device.room``, published in their retained ``info``). The
arbiter reads every agent's ``info`` and ``detection``. The first live detection of a keyword in
a room opens a *window* (``window_seconds``, 0.2 s by default); every detection of that keyword
in that room arriving within it is a *candidate*; when the window closes, one
:class:`~edge_agent.mqtt.arbiter_messages.RoomWake` names the winner: the loudest keyword
(``level_dbfs``), then the most confident, then the smallest device id (so every arbiter
decides alike). A detection that arrives within ``holdoff_seconds`` after a decision in the
same room and keyword is the same utterance heard late: counted, never a second wake.
Replayed detections (from an outbox after an outage) never wake anybody.

Several instances may run at once (for availability): each one announces itself with a
retained ``presence`` that its last will clears, every instance reads the others', and only the
live one with the smallest id publishes; the others decide alike and stay silent until its
presence disappears. Wakes carry the winning detection's identity (``id``), so a consumer that
sees the same wake twice (from two instances during a hand-over) can drop the repeat.

:class:`RoomArbiter` is the pure decision (an injected clock, no I/O); :class:`ArbiterService`
runs it over MQTT (:class:`~edge_agent.mqtt.client.MqttClient`) and publishes Home Assistant
discovery of a room-level ``event`` entity per room.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from edge_agent import __version__
from edge_agent.fleet.homeassistant import MANUFACTURER, DiscoveryTopic, origin_block
from edge_agent.fleet.monitor import lenient_parse
from edge_agent.mqtt.arbiter_messages import ArbiterPresence, RoomWake
from edge_agent.mqtt.client import MqttClient, MqttClientError
from edge_agent.mqtt.messages import DetectionEvent, DeviceInfo, PayloadError, iso_utc, parse_json_object
from edge_agent.mqtt.transport import InboundMessage

log = logging.getLogger(__name__)

# Collected after the first detection of an utterance before deciding (s).
WINDOW_SECONDS = 0.2
# After a decision, a detection of the same room and keyword this soon is the same utterance (s).
HOLDOFF_SECONDS = 1.5
# Live wakes expire on the broker after this long (MQTT 5): a stale wake must not act.
WAKE_EXPIRY_SECONDS = 30
# Discovery: the room event entity's object id.
ROOM_OBJECT_ID = "wake"


@dataclass(frozen=True)
class Candidate:
    """One device's detection of an utterance, as it arrived at the arbiter."""

    device: str
    event: DetectionEvent
    arrived: float

    def rank(self) -> tuple[float, float, str, str]:
        """Sort key: the best candidate first (loudest, most confident, smallest id)."""
        level = self.event.level_dbfs if self.event.level_dbfs is not None else -math.inf
        return (-level, -self.event.confidence, self.device, self.event.stream)

    def summary(self) -> dict[str, Any]:
        event = self.event
        return {
            "device": self.device,
            "stream": event.stream,
            "level_dbfs": event.level_dbfs,
            "snr_db": event.snr_db,
            "confidence": event.confidence,
        }


@dataclass
class _Window:
    room: str
    keyword: str
    opened: float
    candidates: list[Candidate] = field(default_factory=list)


@dataclass(frozen=True)
class Decision:
    """A closed window: the winner among its candidates."""

    room: str
    keyword: str
    winner: Candidate
    candidates: tuple[Candidate, ...]
    opened: float
    closed: float

    def wake(self, arbiter: str, window_seconds: float, now: float) -> RoomWake:
        event = self.winner.event
        return RoomWake(
            room=self.room,
            event_type=self.keyword,
            device=self.winner.device,
            stream=event.stream,
            level_dbfs=event.level_dbfs,
            snr_db=event.snr_db,
            confidence=event.confidence,
            time=event.time,
            id=f"{self.winner.device}:{event.boot_id}:{event.seq}",
            candidates=[c.summary() for c in self.candidates],
            window_ms=round(window_seconds * 1000.0, 1),
            added_delay_ms=round(max(0.0, now - self.opened) * 1000.0, 1),
            arbiter=arbiter,
        )


class RoomArbiter:
    """The decision, with no I/O: feed it rooms and detections with the time they arrived,
    ask it for the windows that are due."""

    def __init__(
        self,
        window_seconds: float = WINDOW_SECONDS,
        holdoff_seconds: float = HOLDOFF_SECONDS,
        rooms: Mapping[str, str] | None = None,
    ) -> None:
        if window_seconds < 0 or holdoff_seconds < 0:
            raise ValueError("window and hold-off must not be negative")
        self.window_seconds = window_seconds
        self.holdoff_seconds = holdoff_seconds
        # Fixed by the operator: "device" or "device/stream" -> room; wins over info.room.
        self._fixed_rooms = dict(rooms or {})
        self._device_rooms: dict[str, str] = {}
        self._keywords: dict[str, set[str]] = {}  # device -> keywords its info lists
        self._open: dict[tuple[str, str], _Window] = {}
        self._decided_at: dict[tuple[str, str], float] = {}
        self.counts = {"candidates": 0, "late": 0, "replayed": 0, "no_room": 0, "wakes": 0}

    # --- rooms ---------------------------------------------------------------------------------
    def set_device(self, device: str, room: str | None, keywords: set[str] | None = None) -> None:
        """What a device's ``info`` says: its room (None: none) and its keywords."""
        if room:
            self._device_rooms[device] = room
        else:
            self._device_rooms.pop(device, None)
        if keywords is not None:
            self._keywords[device] = set(keywords)

    def room_of(self, device: str, stream: str) -> str | None:
        return (
            self._fixed_rooms.get(f"{device}/{stream}")
            or self._fixed_rooms.get(device)
            or self._device_rooms.get(device)
        )

    def rooms(self) -> dict[str, list[str]]:
        """Every known room with the keywords its devices listen for (sorted)."""
        result: dict[str, set[str]] = {}
        for device, room in self._device_rooms.items():
            result.setdefault(room, set()).update(self._keywords.get(device, ()))
        for key, room in self._fixed_rooms.items():
            device = key.split("/", 1)[0]
            result.setdefault(room, set()).update(self._keywords.get(device, ()))
        return {room: sorted(words) for room, words in sorted(result.items())}

    # --- detections ----------------------------------------------------------------------------
    def offer(self, device: str, event: DetectionEvent, now: float) -> str:
        """One detection arrived at ``now``; returns what became of it: ``opened`` (a new
        window), ``joined``, ``late`` (its utterance was decided already), ``replayed`` or
        ``no_room`` (both ignored)."""
        if event.replayed:
            self.counts["replayed"] += 1
            return "replayed"
        room = self.room_of(device, event.stream)
        if room is None:
            self.counts["no_room"] += 1
            return "no_room"
        key = (room, event.keyword)
        window = self._open.get(key)
        if window is None:
            decided = self._decided_at.get(key)
            if decided is not None and now - decided < self.holdoff_seconds:
                self.counts["late"] += 1
                return "late"
            window = self._open[key] = _Window(room, event.keyword, now)
            outcome = "opened"
        else:
            outcome = "joined"
        window.candidates.append(Candidate(device, event, now))
        self.counts["candidates"] += 1
        return outcome

    def next_deadline(self) -> float | None:
        """When the earliest open window closes (None: none open)."""
        if not self._open:
            return None
        return min(window.opened for window in self._open.values()) + self.window_seconds

    def due(self, now: float) -> list[Decision]:
        """The windows that have closed by ``now``, decided (oldest first)."""
        decisions = []
        for key, window in sorted(self._open.items(), key=lambda item: item[1].opened):
            if now < window.opened + self.window_seconds:
                continue
            del self._open[key]
            self._decided_at[key] = now
            ranked = sorted(window.candidates, key=Candidate.rank)
            decisions.append(
                Decision(window.room, window.keyword, ranked[0], tuple(ranked), window.opened, now)
            )
            self.counts["wakes"] += 1
        return decisions


def parse_detection(message: InboundMessage, prefix: str) -> tuple[str, DetectionEvent] | None:
    """(device, event) of a ``{prefix}/{device}/detection`` message; raises PayloadError for a
    payload that is not one (fields a newer agent adds are ignored)."""
    parts = DetectionEvent.TOPIC.match(message.topic, prefix)
    if parts is None:
        return None
    event = lenient_parse(DetectionEvent, message.payload)
    for name in ("level_dbfs", "snr_db"):
        value = getattr(event, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise PayloadError(f"DetectionEvent: {name} must be a number or null, got {value!r}")
    if not isinstance(event.keyword, str) or not isinstance(event.stream, str):
        raise PayloadError("DetectionEvent: keyword and stream must be strings")
    return parts["device"], event


def room_discovery(prefix: str, discovery_prefix: str, room: str, keywords: list[str]) -> tuple[str, bytes]:
    """(topic, retained payload) of Home Assistant's discovery of a room's wake ``event``."""
    config = {
        "unique_id": f"edge_agent_room_{room}_{ROOM_OBJECT_ID}",
        "name": "Wake word",
        "state_topic": RoomWake.TOPIC.format(prefix=prefix, room=room),
        "qos": 1,
        "event_types": keywords,
        # The winner and its level as the event's attributes (the candidates stay in MQTT).
        "value_template": "{{ {'event_type': value_json.event_type, 'device': value_json.device, "
        "'stream': value_json.stream, 'level_dbfs': value_json.level_dbfs, "
        "'confidence': value_json.confidence, 'id': value_json.id} | tojson }}",
        "icon": "mdi:home-sound-in",
        "device": {
            "identifiers": [f"edge_agent_room_{room}"],
            "name": f"{room} (room)",
            "manufacturer": MANUFACTURER,
            "model": "Room wake-word arbiter",
            "sw_version": __version__,
        },
        "origin": origin_block(),
    }
    topic = DiscoveryTopic.CONFIG.format(
        prefix=discovery_prefix,
        component="event",
        node_id=f"edge_agent_room_{room}",
        object_id=ROOM_OBJECT_ID,
    )
    return topic, json.dumps(config, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class ArbiterService:
    """The arbiter over MQTT: one thread, one connection (see the module's documentation)."""

    def __init__(
        self,
        make_client: Callable[..., MqttClient],
        prefix: str,
        instance: str,
        arbiter: RoomArbiter,
        discovery_prefix: str | None = None,
        on_wake: Callable[[RoomWake], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.prefix = prefix
        self.instance = instance
        self.arbiter = arbiter
        self.discovery_prefix = discovery_prefix
        self._on_wake = on_wake
        self._clock = clock
        self._presence_topic = ArbiterPresence.TOPIC.format(prefix=prefix, instance=instance)
        self._peers: set[str] = set()
        self._ready = False  # our own presence came back: the others' retained ones came first
        self._announced: dict[str, list[str]] = {}  # room -> event types in its discovery
        self.published = 0
        self.bad_payloads = 0
        self._subscribed = False  # presence is announced only once the others' can come back
        # Not connected yet: run() connects. The last will clears this instance's presence.
        self.client = make_client(will=(self._presence_topic, b"", True), on_connected=self._announce)

    @property
    def active(self) -> bool:
        """This instance publishes: it knows the others, and none alive has a smaller id."""
        return self._ready and all(peer >= self.instance for peer in self._peers)

    def filters(self) -> list[str]:
        filters = [
            DeviceInfo.TOPIC.filter(prefix=self.prefix),
            DetectionEvent.TOPIC.filter(prefix=self.prefix),
            ArbiterPresence.TOPIC.filter(prefix=self.prefix),
        ]
        if self.discovery_prefix:
            filters.append(DiscoveryTopic.STATUS.format(prefix=self.discovery_prefix))
        return filters

    def _announce(self) -> None:
        """After every CONNACK (client thread): our presence again (the last will cleared it).
        Restored subscriptions go out before it, so the others' presence arrives first."""
        if not self._subscribed:
            return
        presence = ArbiterPresence(
            instance=self.instance, started=iso_utc(time.time()), window_ms=self.arbiter.window_seconds * 1000
        )
        try:
            self.client.publish(self._presence_topic, presence.to_payload(), qos=1, retain=True, wait=False)
        except MqttClientError as error:
            log.warning("arbiter %s: cannot announce itself: %s", self.instance, error)

    def run(self, stop: threading.Event, connect_timeout: float = 10.0) -> None:
        """Connect, subscribe and serve until ``stop`` is set; then clear the presence and
        close. Raises MqttClientError when the broker cannot be reached at first."""
        self.client.connect(connect_timeout)
        try:
            self.client.subscribe(*self.filters(), timeout=connect_timeout)
        except MqttClientError:
            self.client.close()
            raise
        self._subscribed = True
        self._announce()
        try:
            while not stop.is_set():
                deadline = self.arbiter.next_deadline()
                wait = 0.2 if deadline is None else min(0.2, max(0.0, deadline - self._clock()))
                message = self.client.receive(wait)
                if message is not None:
                    self.handle(message)
                for decision in self.arbiter.due(self._clock()):
                    self._decided(decision)
        finally:
            try:
                self.client.publish(self._presence_topic, b"", qos=1, retain=True, timeout=2.0)
            except MqttClientError as error:
                log.warning("arbiter %s: cannot clear its presence: %s", self.instance, error)
            self.client.close()

    def handle(self, message: InboundMessage) -> None:
        """One message; a bad one is logged and counted, never fatal."""
        now = self._clock()
        try:
            found = parse_detection(message, self.prefix)
            if found is not None:
                device, event = found
                outcome = self.arbiter.offer(device, event, now)
                if outcome == "late":
                    log.info("room detection from %s came after its utterance was decided", device)
                return
            parts = DeviceInfo.TOPIC.match(message.topic, self.prefix)
            if parts is not None:
                self._device_info(parts["device"], message.payload)
                return
            parts = ArbiterPresence.TOPIC.match(message.topic, self.prefix)
            if parts is not None:
                self._presence(parts["instance"], message.payload)
                return
            status = (
                DiscoveryTopic.STATUS.format(prefix=self.discovery_prefix) if self.discovery_prefix else None
            )
            if message.topic == status and message.payload == DiscoveryTopic.ONLINE:
                # Home Assistant (re)started: it forgets non-retained state; announce again.
                self._announced.clear()
                self._publish_discovery()
        except PayloadError as error:
            self.bad_payloads += 1
            log.warning("arbiter: ignored %s: %s", message.topic, error)
        except Exception:  # one message never stops the arbiter: logged with its traceback
            self.bad_payloads += 1
            log.exception("arbiter: failed on a message on %s", message.topic)

    def _device_info(self, device: str, payload: bytes) -> None:
        if not payload:  # the device's retained info was removed
            self.arbiter.set_device(device, None, set())
        else:
            data = parse_json_object(payload, "DeviceInfo")
            room = data.get("room")
            if room is not None and not isinstance(room, str):
                raise PayloadError(f"DeviceInfo: room must be a string, got {room!r}")
            listed = data.get("keywords")
            keywords = {
                k["text"]
                for k in (listed if isinstance(listed, list) else [])
                if isinstance(k, dict) and isinstance(k.get("text"), str)
            }
            self.arbiter.set_device(device, room, keywords)
        self._publish_discovery()

    def _presence(self, instance: str, payload: bytes) -> None:
        was_active = self.active
        if instance == self.instance:
            self._ready = bool(payload)
        elif payload:
            self._peers.add(instance)
        else:
            self._peers.discard(instance)
        if self.active != was_active:
            log.info("arbiter %s: %s", self.instance, "active" if self.active else "standing by")
            if self.active:
                self._announced.clear()
                self._publish_discovery()

    def _decided(self, decision: Decision) -> None:
        # A short timeout: while the broker is away, a wake is dropped (it would be stale), and
        # the loop goes on collecting.
        wake = decision.wake(self.instance, self.arbiter.window_seconds, self._clock())
        if not self.active:
            log.debug(
                "arbiter %s (standing by): %s in %s would wake %s",
                self.instance,
                wake.event_type,
                wake.room,
                wake.device,
            )
            return
        topic = RoomWake.TOPIC.format(prefix=self.prefix, room=wake.room)
        try:
            self.client.publish(
                topic, wake.to_payload(), qos=1, expiry_seconds=WAKE_EXPIRY_SECONDS, wait=False, timeout=1.0
            )
        except MqttClientError as error:
            log.warning("arbiter: cannot publish the wake of %s: %s", wake.room, error)
            return
        self.published += 1
        log.info(
            "%s in %s: %s wakes (%s dBFS, %d candidate(s))",
            wake.event_type,
            wake.room,
            wake.device,
            wake.level_dbfs,
            len(wake.candidates),
        )
        if self._on_wake is not None:
            self._on_wake(wake)

    def _publish_discovery(self) -> None:
        if not self.discovery_prefix or not self.active:
            return
        for room, keywords in self.arbiter.rooms().items():
            if not keywords or self._announced.get(room) == keywords:
                continue
            topic, payload = room_discovery(self.prefix, self.discovery_prefix, room, keywords)
            try:
                self.client.publish(topic, payload, qos=1, retain=True, wait=False, timeout=1.0)
            except MqttClientError as error:
                log.warning("arbiter: cannot publish discovery of %s: %s", room, error)
                continue
            self._announced[room] = keywords

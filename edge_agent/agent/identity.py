"""Two running agents with one device id: recognised, reported, and not left to loop.

Two agents with the same device id (two stock boards both called ``raspberrypi``) have the same
MQTT client id: each connection makes the broker drop the other's, whose last will says
``offline``; it reconnects a second later and drops the first, and so on, for ever. Each agent
sees only a lost connection.

The agent's retained ``info`` carries its ``boot_id``, and the agent subscribes to its own
``info`` topic. Once this agent's own ``info`` has come back from the broker, the retained
``info`` can only change if someone else publishes there: an ``info`` with another boot id
received after that is another agent claiming this device id. One sighting in a message
published while this agent is connected (not a retained copy), or two in retained copies (one
could be a broker restored from an older snapshot of its store), or an MQTT 5 DISCONNECT with
reason 142 "Session taken over", make a *conflict*:

* an ``error`` with code ``device_id_conflict`` names this boot and the other one, and the same
  goes to the log (once per other boot id);
* the transport waits at least :data:`CONFLICT_BACKOFF_SECONDS` before every reconnect, so the
  two agents stop knocking each other off: the other keeps the connection meanwhile;
* after a connection that lasted :data:`CONFLICT_CLEAR_SECONDS` without another sighting (the
  other agent was renamed or switched off), the normal back-off returns.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from edge_agent.agent.errors import ErrorReporter
from edge_agent.mqtt.messages import PayloadError, parse_json_object
from edge_agent.mqtt.transport import InboundMessage, MqttTransport

log = logging.getLogger(__name__)

# The shortest wait before reconnecting while another agent uses this device id (s).
CONFLICT_BACKOFF_SECONDS = 300.0
# A connection this long without a sighting ends the conflict (s).
CONFLICT_CLEAR_SECONDS = 600.0
# Retained copies of a foreign info that make a conflict.
RETAINED_SIGHTINGS = 2
# MQTT 5 DISCONNECT reason: another connection with this client id took the session over.
SESSION_TAKEN_OVER = 142
ERROR_CODE = "device_id_conflict"


class IdentityGuard:
    """Watches this device's own ``info`` topic and its disconnects (see the module doc)."""

    def __init__(
        self,
        device_id: str,
        boot_id: str,
        info_topic: str,
        transport: MqttTransport,
        errors: ErrorReporter,
        clock: Callable[[], float] = time.monotonic,
        backoff_seconds: float = CONFLICT_BACKOFF_SECONDS,
    ) -> None:
        self.device_id = device_id
        self.boot_id = boot_id
        self._info_topic = info_topic
        self._transport = transport
        self._errors = errors
        self._clock = clock
        self.backoff_seconds = backoff_seconds
        self._lock = threading.Lock()
        self._own_info_seen = False  # our info reached the broker's retained store once
        self._retained_sightings = 0
        self._connected_at: float | None = None
        self._sighted_since_connect = False
        self.conflict_with: str | None = None  # the other boot id ("unknown" from a takeover)
        self.reported: set[str] = set()
        self.takeovers = 0

    def attach(self) -> None:
        """Subscribe and listen (before the transport starts)."""
        self._transport.subscribe(self._info_topic, self._on_info, qos=1)
        self._transport.on_connected(self._on_connected)
        self._transport.on_disconnected(self._on_disconnected)

    @property
    def in_conflict(self) -> bool:
        return self.conflict_with is not None

    # --- network thread ------------------------------------------------------------------------
    def _on_connected(self) -> None:
        with self._lock:
            self._connected_at = self._clock()
            self._sighted_since_connect = False

    def _on_disconnected(self, code: int | None, reason: str) -> None:
        with self._lock:
            connected_at, self._connected_at = self._connected_at, None
            calm = (
                connected_at is not None
                and not self._sighted_since_connect
                and self._clock() - connected_at >= CONFLICT_CLEAR_SECONDS
            )
        if code == SESSION_TAKEN_OVER:
            self.takeovers += 1
            self._conflict("unknown", "the broker says another connection took this session over")
        elif calm and self.in_conflict:
            log.info("device id %s: no other agent seen for a while; normal reconnects again", self.device_id)
            with self._lock:
                self.conflict_with = None
                self._retained_sightings = 0
            self._transport.set_backoff_floor(0.0)

    def _on_info(self, message: InboundMessage) -> None:
        if not message.payload:
            return  # cleared by an operator: nobody's claim
        try:
            boot_id = parse_json_object(message.payload, "DeviceInfo").get("boot_id")
        except PayloadError as error:
            log.warning("device id %s: unreadable info on %s: %s", self.device_id, message.topic, error)
            return
        if not isinstance(boot_id, str) or not boot_id:
            return
        with self._lock:
            if boot_id == self.boot_id:
                self._own_info_seen = True
                return
            if not self._own_info_seen:
                return  # what a previous start of this device left: ours replaces it now
            self._sighted_since_connect = True
            if message.retain:
                self._retained_sightings += 1
                if self._retained_sightings < RETAINED_SIGHTINGS and not self.in_conflict:
                    return
        how = "retained info" if message.retain else "info published just now"
        self._conflict(boot_id, f"its {how} on {self._info_topic} carries boot {boot_id}")

    def _conflict(self, other: str, evidence: str) -> None:
        with self._lock:
            self.conflict_with = other
            first = other not in self.reported
            self.reported.add(other)
        self._transport.set_backoff_floor(self.backoff_seconds)
        if not first:
            return
        message = (
            f"device id {self.device_id!r} is used by another running agent (boot {other}; this is "
            f"boot {self.boot_id}): {evidence}. The two knock each other off the broker; give each "
            f"device its own device.id. Reconnecting at most every {self.backoff_seconds:g} s meanwhile."
        )
        log.error("%s", message)
        self._errors.report(ERROR_CODE, message, topic=self._info_topic)

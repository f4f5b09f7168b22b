"""The room arbiter's MQTT messages: one wake per utterance and room, and the arbiters' presence.

These are not the agent's own messages (those are in :mod:`edge_agent.mqtt.messages`): they are
published by ``edge-agent arbiter``, which reads the agents' ``info`` and ``detection``.

===================================  ======  ==================================================
topic                                retain  payload
===================================  ======  ==================================================
``{p}/room/{room}/wake``             no      :class:`RoomWake` JSON, QoS 1, 30 s expiry
``{p}/arbiter/{instance}/presence``  yes     :class:`ArbiterPresence` JSON; cleared (empty) by
                                             its last will and on a clean stop
===================================  ======  ==================================================

``mosquitto_sub -v -t 'edge_agent/room/+/wake'``
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from edge_agent.mqtt.messages import JsonMessage, PayloadError, Topic


@dataclass(frozen=True)
class RoomWake(JsonMessage):
    """``{prefix}/room/{room}/wake``, QoS 1, not retained: the one device of a room that answers.

    ===================  ======================================================================
    ``room``             the room (``device.room`` of the devices that heard it)
    ``event_type``       the keyword (Home Assistant's event entity reads this key)
    ``device``           the winner: the loudest (``level_dbfs``), then the most confident
    ``stream``           the winner's stream
    ``level_dbfs``       the winner's keyword level; ``snr_db`` its margin over its background
    ``confidence``       the winner's confidence
    ``time``             wall-clock time of the keyword's end on the winner (its clock)
    ``id``               ``{device}:{boot_id}:{seq}`` of the winning detection: the same wake
                         from another arbiter instance has the same id
    ``candidates``       every detection of the utterance: device, stream, level, confidence
    ``window_ms``        how long the arbiter collected after the first detection
    ``added_delay_ms``   from the first detection's arrival at the arbiter to this wake
    ``arbiter``          the instance that decided
    ===================  ======================================================================
    """

    TOPIC: ClassVar[Topic] = Topic("{prefix}/room/{room}/wake")

    room: str
    event_type: str
    device: str
    stream: str
    level_dbfs: float | None
    snr_db: float | None
    confidence: float
    time: str
    id: str
    candidates: list[dict[str, Any]] = field(default_factory=list)
    window_ms: float = 0.0
    added_delay_ms: float = 0.0
    arbiter: str = ""


@dataclass(frozen=True)
class ArbiterPresence(JsonMessage):
    """``{prefix}/arbiter/{instance}/presence``, retained while the instance runs.

    Every instance reads every other's: the live one with the smallest ``instance`` id publishes
    the wakes, the others decide alike and stay silent, ready to take over when its presence is
    cleared (its last will, an empty retained payload, clears it when it dies).
    """

    TOPIC: ClassVar[Topic] = Topic("{prefix}/arbiter/{instance}/presence")

    instance: str
    started: str
    window_ms: float

    def __post_init__(self) -> None:
        if not isinstance(self.instance, str) or not self.instance:
            raise PayloadError("ArbiterPresence: instance must be a non-empty string")

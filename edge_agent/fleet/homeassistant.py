"""Home Assistant MQTT discovery: the agent appears as a device with a wake-word event entity,
diagnostic sensors and a mute switch, all tied to the agent's availability topic.

Per-entity discovery (one retained config per entity; every Home Assistant since 2023.8, when
the ``event`` platform arrived), on
``{homeassistant.discovery_prefix}/{component}/{device_id}/{object_id}/config``:

================  ===========  ============================================================
component         object_id    what it shows
================  ===========  ============================================================
``event``         wake_word    a detection; event types = the configured keywords
``sensor``        cpu          the agent's CPU use (%), diagnostic
``sensor``        memory       resident memory (MB, ``data_size``), diagnostic
``sensor``        temperature  the board's temperature (°C), diagnostic
``sensor``        detections   detections since the agent started (``total_increasing``)
``sensor``        rtf          real-time factor, the slowest stream's, diagnostic
``switch``        mute         mute / unmute through the ``mute`` command
================  ===========  ============================================================

The state topics are the agent's own: ``detection`` for the event (replayed detections, and
QoS 1 repeats of the last one, are mapped to ``{}``, which Home Assistant ignores, so a stale
or repeated wake word never fires an automation)
and the retained ``health`` for the sensors and the switch (``expire_after`` = 3 health
intervals, so a silent agent's numbers go unavailable).

Discovery is published after every (re)connect, when Home Assistant announces ``online`` on
``{discovery_prefix}/status`` (after a short random delay, so a fleet does not answer at
once), and when keywords, the health interval or the command settings change. When
``homeassistant.enabled`` is false the same topics get empty retained payloads, which removes
whatever an earlier run published (and the device, once it has no entities left).
"""

from __future__ import annotations

import json
import logging
import math
import random
import threading
from dataclasses import dataclass
from typing import Any

from edge_agent import __version__
from edge_agent.agent.services import AgentServices, Integration
from edge_agent.mqtt.messages import Availability, CommandTopic, DetectionEvent, HealthReport, Topic
from edge_agent.mqtt.transport import InboundMessage

log = logging.getLogger(__name__)

# Health messages a sensor may miss before Home Assistant shows it unavailable.
EXPIRE_AFTER_INTERVALS = 3
# Upper bound of the random delay before answering Home Assistant's birth message (seconds).
BIRTH_JITTER_SECONDS = 3.0

ORIGIN_NAME = "edge_agent"
MANUFACTURER = "edge_agent"


class DiscoveryTopic:
    """``{discovery_prefix}/{component}/{node_id}/{object_id}/config``, retained: one entity's config;
    an empty retained payload removes it. ``{discovery_prefix}/status``: Home Assistant's birth
    (``online``) and last will (``offline``).

    ``mosquitto_sub -v -t 'homeassistant/+/+/+/config'``
    """

    CONFIG = Topic("{prefix}/{component}/{node_id}/{object_id}/config")
    STATUS = Topic("{prefix}/status")
    ONLINE = b"online"


# --- templates: rendered by Home Assistant (Jinja2) on the agent's own payloads -----------------

# A detection -> {"event_type": keyword, ...attributes}; a replayed one -> {} (ignored by HA's
# event platform, which drops "{}" payloads after rendering without a warning), and so is a
# repeat: after a reconnect the broker may deliver QoS 1 detections again (up to a window of
# them), and an automation must not run twice. ``this`` is the event entity's state, whose
# attributes are the previous event's: ``recent_seqs`` carries the numbers of the last events
# of the same boot, and a detection whose number is among them is a repeat. Numbers, not an
# order: a detection overtaken by a later one across a reconnect still fires.
RECENT_SEQS = 32
EVENT_VALUE_TEMPLATE = (
    "{% set last = this.attributes if this is defined and this.attributes is defined else {} %}"
    "{% set seen = last.get('recent_seqs', []) if last.get('boot_id') == value_json.boot_id else [] %}"
    "{% if value_json.replayed | default(false) or value_json.seq in seen %}{}"
    "{% else %}"
    "{{ {'event_type': value_json.keyword, 'confidence': value_json.confidence, "
    "'stream': value_json.stream, 'start': value_json.start, 'end': value_json.end, "
    "'seq': value_json.seq, 'boot_id': value_json.boot_id, "
    f"'recent_seqs': (seen + [value_json.seq])[-{RECENT_SEQS}:]"
    "} | tojson }}"
    "{% endif %}"
)
# Health fields; null renders as "None", which HA's sensor takes as "unknown".
CPU_TEMPLATE = "{{ value_json.cpu_percent }}"
MEMORY_TEMPLATE = "{{ value_json.memory_rss_mb }}"
TEMPERATURE_TEMPLATE = "{{ value_json.temperature_c }}"
DETECTIONS_TEMPLATE = "{{ value_json.detections }}"
# The slowest stream's real-time factor (processing time / audio time); None without streams.
RTF_TEMPLATE = (
    "{% set rtf = value_json.streams.values() | map(attribute='rtf', default=none) "
    "| select('number') | list %}{{ rtf | max if rtf else none }}"
)
# How far behind the engine is: the seconds of live audio waiting for the most loaded worker.
BACKLOG_TEMPLATE = (
    "{% set waiting = value_json.worker.workers | default([]) | map(attribute='queued_seconds') "
    "| select('number') | list %}{{ waiting | max if waiting else 0 }}"
)
MUTED_TEMPLATE = "{{ 'ON' if value_json.muted else 'OFF' }}"

MUTE_ON = json.dumps({"muted": True})
MUTE_OFF = json.dumps({"muted": False})


@dataclass(frozen=True)
class Entity:
    component: str
    object_id: str
    config: dict[str, Any]


OBJECT_IDS: tuple[tuple[str, str], ...] = (
    ("event", "wake_word"),
    ("sensor", "cpu"),
    ("sensor", "memory"),
    ("sensor", "temperature"),
    ("sensor", "detections"),
    ("sensor", "rtf"),
    ("sensor", "backlog"),
    ("switch", "mute"),
)


def unique_id(device_id: str, object_id: str) -> str:
    return f"edge_agent_{device_id}_{object_id}"


def device_block(services: AgentServices) -> dict[str, Any]:
    """The device every entity belongs to. Only keys Home Assistant has accepted since 2023.8:
    the nested device schema is strict, an unknown key rejects the entity."""
    config = services.config
    return {
        "identifiers": [f"edge_agent_{services.device_id}"],
        "name": config.device.name or services.device_id,
        "manufacturer": MANUFACTURER,
        "model": f"Wake-word agent ({config.model.id})",
        "sw_version": __version__,
    }


def origin_block() -> dict[str, Any]:
    return {"name": ORIGIN_NAME, "sw_version": __version__}


def mute_switch_usable(services: AgentServices, commands_attached: bool) -> bool:
    """The switch needs the command processor and the ``mute`` command allowed."""
    commands = services.config.commands
    return commands_attached and commands.enabled and "mute" in commands.allowed


def discovery_entities(services: AgentServices, commands_attached: bool) -> list[Entity]:
    """Every entity this agent announces, with its discovery config."""
    config = services.config
    device_id = services.device_id
    common = {
        "availability_topic": services.topic(Availability.TOPIC),
        "payload_available": Availability.ONLINE.decode(),
        "payload_not_available": Availability.OFFLINE.decode(),
        "device": device_block(services),
        "origin": origin_block(),
    }
    health = services.topic(HealthReport.TOPIC)
    expire_after = max(1, math.ceil(EXPIRE_AFTER_INTERVALS * config.health.interval))

    def entity(component: str, object_id: str, **options: Any) -> Entity:
        return Entity(
            component,
            object_id,
            {"unique_id": unique_id(device_id, object_id), **options, **common},
        )

    def health_sensor(object_id: str, name: str, template: str, **options: Any) -> Entity:
        return entity(
            "sensor",
            object_id,
            name=name,
            state_topic=health,
            value_template=template,
            expire_after=expire_after,
            **options,
        )

    entities = [
        entity(
            "event",
            "wake_word",
            name="Wake word",
            state_topic=services.topic(DetectionEvent.TOPIC),
            qos=1,
            event_types=[k.text for k in config.keywords],
            value_template=EVENT_VALUE_TEMPLATE,
            icon="mdi:account-voice",
        ),
        health_sensor(
            "cpu",
            "CPU",
            CPU_TEMPLATE,
            unit_of_measurement="%",
            state_class="measurement",
            suggested_display_precision=1,
            entity_category="diagnostic",
            icon="mdi:cpu-64-bit",
        ),
        health_sensor(
            "memory",
            "Memory",
            MEMORY_TEMPLATE,
            device_class="data_size",
            unit_of_measurement="MB",
            state_class="measurement",
            suggested_display_precision=1,
            entity_category="diagnostic",
        ),
        health_sensor(
            "temperature",
            "Temperature",
            TEMPERATURE_TEMPLATE,
            device_class="temperature",
            unit_of_measurement="°C",
            state_class="measurement",
            suggested_display_precision=1,
            entity_category="diagnostic",
        ),
        health_sensor(
            "detections",
            "Detections",
            DETECTIONS_TEMPLATE,
            state_class="total_increasing",
            icon="mdi:counter",
        ),
        health_sensor(
            "rtf",
            "Real-time factor",
            RTF_TEMPLATE,
            state_class="measurement",
            suggested_display_precision=3,
            entity_category="diagnostic",
            icon="mdi:speedometer",
        ),
        health_sensor(
            "backlog",
            "Engine backlog",
            BACKLOG_TEMPLATE,
            device_class="duration",
            unit_of_measurement="s",
            state_class="measurement",
            suggested_display_precision=1,
            entity_category="diagnostic",
            icon="mdi:timer-sand",
        ),
    ]
    if mute_switch_usable(services, commands_attached):
        entities.append(
            entity(
                "switch",
                "mute",
                name="Mute",
                command_topic=CommandTopic.DEVICE.format(
                    prefix=services.prefix, device=device_id, command="mute"
                ),
                payload_on=MUTE_ON,
                payload_off=MUTE_OFF,
                state_topic=health,
                value_template=MUTED_TEMPLATE,
                state_on="ON",
                state_off="OFF",
                qos=1,
                retain=False,
                entity_category="config",
                icon="mdi:microphone-off",
            )
        )
    return entities


class HomeAssistantDiscovery(Integration):
    """Announces the agent to Home Assistant, or removes it when ``homeassistant.enabled`` is false.

    ``commands_attached``: the agent answers commands (the mute switch needs them)."""

    def __init__(
        self, commands_attached: bool = False, birth_jitter_seconds: float = BIRTH_JITTER_SECONDS
    ) -> None:
        self._commands_attached = commands_attached
        self._birth_jitter = birth_jitter_seconds
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._status_topic: str | None = None  # subscribed while enabled
        self._published_prefix: str | None = None  # where the last configs went
        self._stopped = False
        self.publications = 0  # discovery rounds, for tests and logs

    # --- hooks -----------------------------------------------------------------------------------
    def attach(self, services: AgentServices) -> None:
        super().attach(services)
        if not services.mqtt_enabled:
            raise RuntimeError("Home Assistant discovery needs MQTT")
        self._follow_status()

    def on_connected(self) -> None:
        self.sync()

    def config_changed(self, keys: list[str]) -> None:
        relevant = ("keywords", "homeassistant.", "health.interval", "commands.")
        if any(key == "keywords" or key.startswith(relevant) for key in keys):
            self._follow_status()
            self.sync()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    # --- publishing --------------------------------------------------------------------------------
    def sync(self) -> None:
        """Publish every entity's config (or remove them all when disabled); entities that are not
        announced (the switch without the mute command) are removed."""
        services = self.services
        if not services.connected:
            return  # on_connected does it
        settings = services.config.homeassistant
        prefix = settings.discovery_prefix
        with self._lock:
            if self._published_prefix is not None and self._published_prefix != prefix:
                self._publish_removal(self._published_prefix)
            if not settings.enabled:
                # Repeated at every connection (and at every switch-off), so a clear lost with a
                # dropped connection is sent again: QoS 0. At QoS 1 these seven would count as
                # publishes a reconnect sends before the unacknowledged detections, and take
                # their room in the broker's window (see agent.sink.detection_window).
                self._publish_removal(prefix, qos=0)
                if self._published_prefix is not None:
                    log.info("Home Assistant discovery removed (homeassistant.enabled is false)")
                self._published_prefix = None
                return
            entities = discovery_entities(services, self._commands_attached)
            announced = {(e.component, e.object_id): e for e in entities}
            for component, object_id in OBJECT_IDS:
                topic = self.config_topic(prefix, component, object_id)
                entity = announced.get((component, object_id))
                payload = b"" if entity is None else _json(entity.config)
                services.publish(topic, payload, qos=1, retain=True)
            self._published_prefix = prefix
            self.publications += 1
        log.info(
            "Home Assistant discovery published under %s/+/%s/+/config (%d entities)",
            prefix,
            services.device_id,
            len(announced),
        )

    def config_topic(self, prefix: str, component: str, object_id: str) -> str:
        return DiscoveryTopic.CONFIG.format(
            prefix=prefix, component=component, node_id=self.services.device_id, object_id=object_id
        )

    def topics(self, prefix: str | None = None) -> list[str]:
        """Every discovery topic this agent may use under ``prefix`` (default: the configured one)."""
        prefix = prefix or self.services.config.homeassistant.discovery_prefix
        return [self.config_topic(prefix, component, object_id) for component, object_id in OBJECT_IDS]

    def _publish_removal(self, prefix: str, qos: int = 1) -> None:
        for topic in self.topics(prefix):
            self.services.publish(topic, b"", qos=qos, retain=True)
        # Every connection of an agent without Home Assistant does this: not worth an info line.
        log.debug("Home Assistant discovery cleared under %s", prefix)

    # --- Home Assistant's birth message -----------------------------------------------------------------
    def _follow_status(self) -> None:
        """Listen to ``{prefix}/status`` while enabled (any thread)."""
        settings = self.services.config.homeassistant
        wanted = DiscoveryTopic.STATUS.format(prefix=settings.discovery_prefix) if settings.enabled else None
        if wanted == self._status_topic:
            return
        if self._status_topic is not None:
            self.services.unsubscribe(self._status_topic)
        if wanted is not None:
            self.services.subscribe(wanted, self._on_status, qos=1)
        self._status_topic = wanted

    def _on_status(self, message: InboundMessage) -> None:
        if message.topic != self._status_topic or message.payload.strip() != DiscoveryTopic.ONLINE:
            return
        if message.retain:
            return  # a retained birth arrives on every subscription; on_connected has published
        delay = random.uniform(0.0, self._birth_jitter) if self._birth_jitter > 0 else 0.0
        log.info("Home Assistant is online: discovery again in %.1f s", delay)
        if delay <= 0:
            self._republish()
            return
        with self._lock:
            if self._stopped:
                return
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(delay, self._republish)
            self._timer.daemon = True
            self._timer.start()

    def _republish(self) -> None:
        """Configs, then the current state (Home Assistant's advice after its restart)."""
        try:
            self.sync()
            if self.services.config.homeassistant.enabled:
                self.services.publish_health()
        except Exception:
            log.exception("Home Assistant discovery failed")


def _json(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

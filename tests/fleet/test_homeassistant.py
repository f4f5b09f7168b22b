"""Home Assistant MQTT discovery against a real mosquitto, checked against HA's documented schema.

There is no Home Assistant here. Instead, ``discovery_errors`` restates the rules HA applies to a
per-entity discovery message, from its docs and source (cited where used), and every config the
agent publishes goes through it. The value templates are rendered with Jinja2 the way HA renders
them, on real health and detection payloads, and checked against what each platform accepts.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from edge_agent.agent.items import AudioChunk
from edge_agent.agent.sink import detection_window
from edge_agent.audio.wav import read_wav, to_mono_16k
from edge_agent.config import merge_update
from edge_agent.fleet.commands import CommandProcessor
from edge_agent.fleet.homeassistant import OBJECT_IDS, HomeAssistantDiscovery
from tests.agent.streaming import pcm16, stream_files
from tests.broker import Broker, Client, Received, free_port
from tests.conftest import require_module
from tests.fleet.helpers import command, wait_ready
from tests.support import agent_config, wait_until

PREFIX = "edge_agent/dev1"
DISCOVERY = "homeassistant"
CONFIG_FILTER = f"{DISCOVERY}/+/dev1/+/config"
TOPICS = {f"{DISCOVERY}/{component}/dev1/{object_id}/config" for component, object_id in OBJECT_IDS}

# --- what Home Assistant accepts ------------------------------------------------------------------

# homeassistant/components/mqtt/discovery.py: TOPIC_MATCHER, applied to the topic after the
# discovery prefix; a topic ending in "config" that does not match is dropped with a warning.
TOPIC_MATCHER = re.compile(
    r"(?P<component>\w+)/(?:(?P<node_id>[a-zA-Z0-9_-]+)/)?(?P<object_id>[a-zA-Z0-9_-]+)/config"
)

# mqtt/schemas.py MQTT_AVAILABILITY_SCHEMA (single + list forms, availability_topic and
# availability mutually exclusive) and MQTT_ENTITY_COMMON_SCHEMA; mqtt/config.py SCHEMA_BASE.
# Docs: source/_integrations/mqtt.markdown "Using abbreviations", "Discovery payload".
COMMON_KEYS = {
    "availability",
    "availability_mode",
    "availability_template",
    "availability_topic",
    "payload_available",
    "payload_not_available",
    "device",
    "origin",
    "enabled_by_default",
    "entity_category",
    "entity_picture",
    "icon",
    "json_attributes_topic",
    "json_attributes_template",
    "object_id",
    "default_entity_id",
    "unique_id",
    "qos",
    "encoding",
    "group",
}
# mqtt/config.py: MQTT_RO_SCHEMA (sensor-like platforms) and MQTT_RW_SCHEMA (switch-like).
RO_KEYS = {"state_topic", "value_template"}
RW_KEYS = {"command_topic", "optimistic", "retain", "state_topic"}
# The platforms' _PLATFORM_SCHEMA_BASE / PLATFORM_SCHEMA_MODERN (mqtt/event.py, sensor.py, switch.py).
PLATFORM_KEYS = {
    "event": COMMON_KEYS | RO_KEYS | {"device_class", "name", "event_types"},
    "sensor": COMMON_KEYS
    | RO_KEYS
    | {
        "device_class",
        "expire_after",
        "force_update",
        "last_reset_value_template",
        "name",
        "options",
        "suggested_display_precision",
        "state_class",
        "unit_of_measurement",
    },
    "switch": COMMON_KEYS
    | RW_KEYS
    | {
        "command_template",
        "name",
        "payload_off",
        "payload_on",
        "state_off",
        "state_on",
        "value_template",
        "device_class",
    },
}
REQUIRED_KEYS = {
    "event": {"state_topic", "event_types"},  # event.py: vol.Required(CONF_EVENT_TYPES), MQTT_RO_SCHEMA
    "sensor": {"state_topic"},  # MQTT_RO_SCHEMA
    "switch": {"command_topic"},  # MQTT_RW_SCHEMA
}
# mqtt/schemas.py MQTT_ENTITY_DEVICE_INFO_SCHEMA is a strict vol.Schema: an unknown key inside
# "device" rejects the entity ("extra keys not allowed @ data['device'][...]"). These are the keys
# every HA since 2023.8 (the event platform) knows; newer ones (model_id, serial_number) are not
# portable and therefore refused here too.
DEVICE_KEYS = {
    "identifiers",
    "connections",
    "manufacturer",
    "model",
    "name",
    "hw_version",
    "sw_version",
    "via_device",
    "suggested_area",
    "configuration_url",
}
# mqtt/schemas.py MQTT_ORIGIN_INFO_SCHEMA: strict, name required.
ORIGIN_KEYS = {"name", "sw_version", "support_url"}
# homeassistant/const.py EntityCategory; the sensor docs allow only "diagnostic" for sensors.
ENTITY_CATEGORIES = {
    "event": {"config", "diagnostic"},
    "sensor": {"diagnostic"},
    "switch": {"config", "diagnostic"},
}
# components/event/__init__.py EventDeviceClass.
EVENT_DEVICE_CLASSES = {"doorbell", "button", "motion"}
# components/switch/__init__.py SwitchDeviceClass.
SWITCH_DEVICE_CLASSES = {"outlet", "switch"}
# components/sensor/const.py SensorStateClass, and DEVICE_CLASS_UNITS / DEVICE_CLASS_STATE_CLASSES
# for the device classes this agent uses (an unknown device class rejects the entity; a unit
# that does not fit the class is logged as an error by HA and breaks statistics).
STATE_CLASSES = {"measurement", "total", "total_increasing"}
INFORMATION_UNITS = {
    *("bit", "kbit", "Mbit", "Gbit", "B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB"),
    *("KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB"),
}
SENSOR_DEVICE_CLASSES: dict[str, tuple[set[str | None], set[str]]] = {
    "temperature": ({"°C", "°F", "K"}, {"measurement"}),
    "data_size": (INFORMATION_UNITS, STATE_CLASSES),
    "duration": ({"d", "h", "min", "s", "ms", "µs"}, STATE_CLASSES),
}
# homeassistant/helpers/config_validation.py icon(): "prefix:name".
ICON = re.compile(r"^[a-z0-9-]+:[a-z0-9-]+$")
# mqtt/event.py: "{}" and "None" after rendering are ignored without a warning (PAYLOAD_EMPTY_JSON,
# PAYLOAD_NONE); event_type and event_types may not be attributes (MQTT_EVENT_ATTRIBUTES_BLOCKED).
IGNORED_EVENT_PAYLOADS = {"", "{}", "None"}
BLOCKED_EVENT_ATTRIBUTES = {"event_type", "event_types"}


def _valid_publish_topic(topic: Any) -> bool:
    # mqtt/util.py valid_publish_topic: a non-empty UTF-8 topic without wildcards or NUL.
    return isinstance(topic, str) and bool(topic) and not set(topic) & {"+", "#", "\0"}


def _valid_subscribe_topic(topic: Any) -> bool:
    # mqtt/util.py valid_subscribe_topic: "+" only as a whole level, "#" only as the last one.
    if not isinstance(topic, str) or not topic or "\0" in topic:
        return False
    levels = topic.split("/")
    for index, level in enumerate(levels):
        if "+" in level and level != "+":
            return False
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return False
    return True


def discovery_errors(topic: str, payload: dict[str, Any], prefix: str = DISCOVERY) -> list[str]:
    """Everything in a per-entity discovery message that HA would reject, or silently ignore."""
    errors: list[str] = []
    if not topic.startswith(prefix + "/"):
        return [f"{topic}: not under the discovery prefix {prefix}"]
    match = TOPIC_MATCHER.fullmatch(topic[len(prefix) + 1 :])
    if match is None:
        return [f"{topic}: illegal discovery topic"]
    component = match["component"]
    if component not in PLATFORM_KEYS:
        return [f"{topic}: component {component!r} is not checked here"]
    if "platform" in payload:
        errors.append("platform is only allowed in device discovery components")
    unknown = set(payload) - PLATFORM_KEYS[component] - {"~"}
    if unknown:
        # HA drops them (extra=vol.REMOVE_EXTRA at the top level): a typo would vanish silently.
        errors.append(f"keys {sorted(unknown)} are not {component} options")
    missing = REQUIRED_KEYS[component] - set(payload)
    if missing:
        errors.append(f"required keys {sorted(missing)} are missing")
    if not isinstance(payload.get("unique_id"), str) or not payload["unique_id"]:
        errors.append("unique_id is needed for the device link and editing in the UI")
    if "availability_topic" in payload and "availability" in payload:
        errors.append("availability_topic and availability are mutually exclusive")
    for key in ("state_topic", "availability_topic", "json_attributes_topic"):
        if key in payload and not _valid_subscribe_topic(payload[key]):
            errors.append(f"{key} {payload[key]!r} is not a valid subscribe topic")
    if "command_topic" in payload and not _valid_publish_topic(payload["command_topic"]):
        errors.append(f"command_topic {payload['command_topic']!r} is not a valid publish topic")
    for key in ("name",):
        if key in payload and payload[key] is not None and not isinstance(payload[key], str):
            errors.append(f"{key} must be a string or null")
    for key in (
        "payload_available",
        "payload_not_available",
        "payload_on",
        "payload_off",
        "state_on",
        "state_off",
        "unit_of_measurement",
        "value_template",
    ):
        if key in payload and not isinstance(payload[key], str):
            errors.append(f"{key} must be a string")
    if "qos" in payload and payload["qos"] not in (0, 1, 2):
        errors.append("qos must be 0, 1 or 2")
    for key in ("expire_after", "suggested_display_precision"):
        value = payload.get(key)
        if key in payload and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            errors.append(f"{key} must be a positive integer")  # cv.positive_int
    for key in ("enabled_by_default", "retain", "optimistic", "force_update"):
        if key in payload and not isinstance(payload[key], bool):
            errors.append(f"{key} must be a boolean")
    if "icon" in payload and not ICON.match(str(payload["icon"])):
        errors.append(f"icon {payload['icon']!r} is not prefix:name")
    category = payload.get("entity_category")
    if category is not None and category not in ENTITY_CATEGORIES[component]:
        errors.append(f"entity_category {category!r} is not allowed for a {component}")
    errors += _device_errors(payload.get("device"))
    if "origin" in payload:
        origin = payload["origin"]
        if not isinstance(origin, dict):
            errors.append("origin must be an object")
        else:
            if set(origin) - ORIGIN_KEYS:
                errors.append(f"origin: extra keys not allowed {sorted(set(origin) - ORIGIN_KEYS)}")
            if not isinstance(origin.get("name"), str):
                errors.append("origin: name is required")
    if "value_template" in payload:
        errors += _template_errors(payload["value_template"])
    if component == "event":
        types = payload.get("event_types")
        if not isinstance(types, list) or not types or not all(isinstance(t, str) for t in types):
            errors.append("event_types must be a non-empty list of strings")
        if "device_class" in payload and payload["device_class"] not in EVENT_DEVICE_CLASSES:
            errors.append(f"event device_class {payload['device_class']!r} is unknown")
        if "expire_after" in payload:
            errors.append("an event has no expire_after")
    if component == "sensor":
        errors += _sensor_errors(payload)
    if component == "switch":
        if "device_class" in payload and payload["device_class"] not in SWITCH_DEVICE_CLASSES:
            errors.append(f"switch device_class {payload['device_class']!r} is unknown")
        if "state_topic" not in payload:
            errors.append("without state_topic the switch is optimistic: it would not show the real state")
    return errors


def _device_errors(device: Any) -> list[str]:
    if device is None:
        return ["device is needed so the entities appear under one device"]
    if not isinstance(device, dict):
        return ["device must be an object"]
    errors = []
    if set(device) - DEVICE_KEYS:
        errors.append(f"device: extra keys not allowed {sorted(set(device) - DEVICE_KEYS)}")
    identifiers = device.get("identifiers")
    if isinstance(identifiers, str):
        identifiers = [identifiers]
    if not identifiers and not device.get("connections"):
        errors.append("device must have at least one identifying value in identifiers or connections")
    if identifiers and not all(isinstance(i, str) for i in identifiers):
        errors.append("device identifiers must be strings")
    for key in set(device) & (DEVICE_KEYS - {"identifiers", "connections"}):
        if not isinstance(device[key], str):
            errors.append(f"device {key} must be a string")
    return errors


def _sensor_errors(payload: dict[str, Any]) -> list[str]:
    errors = []
    device_class = payload.get("device_class")
    state_class = payload.get("state_class")
    unit = payload.get("unit_of_measurement")
    if state_class is not None and state_class not in STATE_CLASSES:
        errors.append(f"state_class {state_class!r} is unknown")
    if device_class is not None:
        if device_class not in SENSOR_DEVICE_CLASSES:
            errors.append(f"sensor device_class {device_class!r} is not one this test knows")
        else:
            units, state_classes = SENSOR_DEVICE_CLASSES[device_class]
            if unit not in units:
                errors.append(f"unit {unit!r} is not valid for device class {device_class}")
            if state_class is not None and state_class not in state_classes:
                errors.append(f"state class {state_class} is not valid for device class {device_class}")
    # sensor.py validate_sensor_state_and_device_class_config
    if "last_reset_value_template" in payload and state_class != "total":
        errors.append("last_reset_value_template needs state_class total")
    if "options" in payload and (device_class != "enum" or state_class or unit):
        errors.append("options need device_class enum and no state_class or unit")
    return errors


def _template_errors(source: str) -> list[str]:
    jinja2 = require_module("jinja2")
    try:
        environment().parse(source)
    except jinja2.TemplateSyntaxError as error:
        return [f"value_template does not compile: {error}"]
    return []


# --- rendering as Home Assistant does ------------------------------------------------------------


def environment():  # type: ignore[no-untyped-def]
    """HA renders templates in a sandbox (helpers/template.py TemplateEnvironment is an
    ImmutableSandboxedEnvironment); StrictUndefined makes a missing field fail here, where HA
    would only log a warning and render an empty string."""
    jinja2 = require_module("jinja2")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined)


class EntityState:
    """What a template sees as ``this`` (MqttValueTemplate(..., entity=self)): the entity's
    current state; an event entity's attributes are its last event's, with its type."""

    def __init__(self, attributes: dict[str, Any] | None = None) -> None:
        self.attributes = dict(attributes or {})


def render(template: str, payload: bytes, this: EntityState | None = None) -> str:
    """helpers/template.py async_render_with_possible_json_value: ``value`` is the payload text,
    ``value_json`` its JSON when it parses, ``this`` the entity's state, and the result is
    stripped."""
    text = payload.decode("utf-8")
    variables: dict[str, Any] = {"value": text, "this": this or EntityState()}
    with contextlib.suppress(ValueError):
        variables["value_json"] = json.loads(text)
    return environment().from_string(template).render(**variables).strip()


def event_outcome(
    config: dict[str, Any], payload: bytes, retained: bool = False, this: EntityState | None = None
) -> tuple[str, dict] | None:
    """What mqtt/event.py does with a message: None when ignored, else (event type, attributes).
    Anything HA would warn about fails the test. ``this``, if given, is the entity's state: an
    event that fires updates it, as EventEntity._trigger_event does."""
    if retained:
        return None  # "Ignoring event trigger from replayed retained payload"
    if "value_template" in config:
        rendered = render(config["value_template"], payload, this)
    else:
        rendered = payload.decode()
    if rendered in IGNORED_EVENT_PAYLOADS:
        return None
    attributes = json.loads(rendered)  # a JSONDecodeError is HA's "No valid JSON event payload"
    assert isinstance(attributes, dict), rendered
    event_type = attributes.pop("event_type")  # KeyError: "`event_type` missing in JSON event payload"
    assert event_type in config["event_types"], "HA: Invalid event type"
    assert not set(attributes) & BLOCKED_EVENT_ATTRIBUTES
    if this is not None:
        this.attributes = {"event_types": config["event_types"], "event_type": event_type, **attributes}
    return event_type, attributes


def sensor_state(config: dict[str, Any], payload: bytes) -> float | None:
    """mqtt/sensor.py _update_state for a numeric sensor: "None" is unknown, else a number."""
    rendered = render(config["value_template"], payload)
    if rendered == "None":
        return None
    return float(rendered)  # ValueError: HA would log a non-numeric state and drop it


def switch_state(config: dict[str, Any], payload: bytes) -> bool | None:
    """mqtt/switch.py _state_message_received: the rendered value must be state_on or state_off."""
    rendered = render(config["value_template"], payload)
    mapping = {
        config.get("state_on", config["payload_on"]): True,
        config.get("state_off", config["payload_off"]): False,
    }
    assert rendered in mapping or rendered == "None", rendered
    return mapping.get(rendered)


# --- helpers --------------------------------------------------------------------------------------


def ha_agent(  # type: ignore[no-untyped-def]
    make_agent,
    port: int,
    tmp_path: Path,
    commands: bool = True,
    enabled: bool = True,
    name: str | None = None,
):
    """A started agent with discovery (and the command processor, unless ``commands`` is
    false), its topics subscribed."""
    config = agent_config(port, tmp_path, homeassistant={"enabled": enabled})
    if name is not None:
        config = merge_update(config, {"device": {"name": name}})

    def integrations(agent):  # type: ignore[no-untyped-def]
        discovery = HomeAssistantDiscovery(commands_attached=commands, birth_jitter_seconds=0.0)
        return [CommandProcessor(agent), discovery] if commands else [discovery]

    agent = make_agent(config, integrations=integrations)
    wait_ready(port, agent)
    return agent


def handled_before(client: Client) -> None:
    """Returns once the agent (dev1, with commands) has run its on-connect hooks and handled
    what ``client`` sent it before: a ping's answer. One network thread runs the hooks at
    CONNACK and reads the agent's messages in order, and it reacts to Home Assistant's status
    at once (no jitter in these tests): a reaction would be in before the answer."""
    (answer,) = command(client, f"{PREFIX}/cmd/ping")
    assert answer["ok"]


def latest_configs(client: Client) -> dict[str, Received]:
    latest: dict[str, Received] = {}
    for message in client.on(CONFIG_FILTER):
        latest[message.topic] = message
    return latest


def wait_configs(client: Client, count: int = len(OBJECT_IDS), predicate=None) -> dict[str, Received]:  # type: ignore[no-untyped-def]
    def ready(messages: list[Received]) -> bool:
        latest = {m.topic: m for m in messages}
        return len(latest) >= count and (predicate is None or predicate(latest))

    client.wait_for(CONFIG_FILTER, ready)
    return latest_configs(client)


def by_object(configs: dict[str, Received]) -> dict[str, dict[str, Any]]:
    return {topic.split("/")[3]: json.loads(m.payload) for topic, m in configs.items() if m.payload}


def retained_under(port: int, topic_filter: str) -> list[Received]:
    """What a client joining now receives as retained (a marker ends the retained burst)."""
    marker = f"{DISCOVERY}/sensor/zz_marker/zz_marker/config"
    probe = Client(port).connect()
    try:
        probe.publish(marker, b"marker", qos=1, retain=True)
        probe.subscribe(topic_filter)
        probe.subscribe(marker)  # its retained marker comes after the first subscription's burst
        # The filter may match the marker too: then the burst holds a first copy.
        copies = 2 if paho.topic_matches_sub(topic_filter, marker) else 1
        probe.wait_for(marker, lambda m: len(m) >= copies)
        probe.publish(marker, b"", qos=1, retain=True)
        return [m for m in probe.messages if m.topic != marker and m.retain]
    finally:
        probe.close()


# --- the validator itself ------------------------------------------------------------------------


def test_the_validator_rejects_what_home_assistant_rejects() -> None:
    good = {
        "unique_id": "u1",
        "name": "Temperature",
        "state_topic": "a/health",
        "value_template": "{{ value_json.t }}",
        "device_class": "temperature",
        "unit_of_measurement": "°C",
        "state_class": "measurement",
        "device": {"identifiers": ["x"], "name": "X"},
        "origin": {"name": "o"},
        "availability_topic": "a/availability",
    }
    topic = f"{DISCOVERY}/sensor/dev1/temperature/config"
    assert discovery_errors(topic, good) == []
    cases = [
        ({"device": {"identifiers": ["x"], "support_url": "http://x"}}, "device: extra keys"),
        ({"device": {"name": "no identifiers"}}, "identifying value"),
        ({"origin": {"sw_version": "1"}}, "origin: name is required"),
        ({"unit_of_measurement": "C"}, "not valid for device class temperature"),
        ({"state_class": "total_increasing"}, "not valid for device class temperature"),
        ({"entity_category": "config"}, "not allowed for a sensor"),
        ({"icon": "thermometer"}, "prefix:name"),
        ({"stat_t": "abbreviated"}, "not sensor options"),
        ({"value_template": "{{ value_json.t "}, "does not compile"),
        ({"availability": [{"topic": "a/b"}]}, "mutually exclusive"),
        ({"expire_after": -1}, "positive integer"),
    ]
    for change, message in cases:
        errors = discovery_errors(topic, {**good, **change})
        assert any(message in e for e in errors), (change, errors)
    assert discovery_errors(topic, {k: v for k, v in good.items() if k != "state_topic"})
    assert discovery_errors(f"{DISCOVERY}/sensor/dev.1/temperature/config", good) == [
        f"{DISCOVERY}/sensor/dev.1/temperature/config: illegal discovery topic"
    ]
    event = {"unique_id": "e", "state_topic": "a/detection", "device": {"identifiers": "x"}}
    assert any("event_types" in e for e in discovery_errors(f"{DISCOVERY}/event/dev1/e/config", event))


# --- against the agent ---------------------------------------------------------------------------


def test_every_discovery_payload_passes_the_schema(broker, make_agent, client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client.subscribe(f"{DISCOVERY}/#")
    agent = ha_agent(make_agent, broker.port, tmp_path, name="Kitchen speaker")
    configs = wait_configs(client)
    assert set(configs) == TOPICS
    # Retained: a Home Assistant that starts later still finds them.
    assert {m.topic for m in retained_under(broker.port, CONFIG_FILTER)} == TOPICS
    for topic, message in configs.items():
        payload = json.loads(message.payload)
        assert discovery_errors(topic, payload) == [], (topic, payload)
        assert payload["availability_topic"] == f"{PREFIX}/availability"
        assert payload["device"] == configs[next(iter(TOPICS))].json()["device"]  # one device
    entities = by_object(configs)
    assert len({e["unique_id"] for e in entities.values()}) == len(entities)
    device = entities["wake_word"]["device"]
    assert device["name"] == "Kitchen speaker" and device["identifiers"] == ["edge_agent_dev1"]
    assert device["sw_version"] and device["manufacturer"] and device["model"]
    assert entities["wake_word"]["state_topic"] == f"{PREFIX}/detection"
    assert entities["wake_word"]["event_types"] == ["小云小云"]
    assert entities["mute"]["command_topic"] == f"{PREFIX}/cmd/mute"
    assert json.loads(entities["mute"]["payload_on"]) == {"muted": True}
    assert json.loads(entities["mute"]["payload_off"]) == {"muted": False}
    for name in ("cpu", "memory", "temperature", "detections", "rtf", "backlog"):
        assert entities[name]["state_topic"] == f"{PREFIX}/health"
        assert entities[name]["expire_after"] == 3  # 3 x health.interval (1 s in tests)
    assert entities["memory"]["device_class"] == "data_size"
    assert entities["temperature"]["device_class"] == "temperature"
    assert entities["detections"]["state_class"] == "total_increasing"
    discovery = agent.integrations[1]
    wait_until(lambda: discovery.publications >= 1)  # counted just after the configs went out
    assert discovery.publications == 1


def test_templates_give_home_assistant_what_it_expects(  # type: ignore[no-untyped-def]
    broker, make_agent, client, tmp_path: Path, example_wav: Path
) -> None:
    client.subscribe(f"{DISCOVERY}/#")
    client.subscribe(f"{PREFIX}/#")
    ha_agent(make_agent, broker.port, tmp_path)
    entities = by_object(wait_configs(client))
    stream_files(client, {"door": pcm16(example_wav)}, end=False)  # left open: health shows its rtf
    (detection,) = client.wait_for(f"{PREFIX}/detection")
    assert detection.json()["replayed"] is False
    health = client.wait_for(
        f"{PREFIX}/health", lambda m: any(h.json()["detections"] >= 1 and h.json()["streams"] for h in m)
    )
    health_payload = next(h for h in health if h.json()["detections"] >= 1 and h.json()["streams"]).payload

    # The live detection fires the event with its attributes.
    event_type, attributes = event_outcome(entities["wake_word"], detection.payload)
    assert event_type == "小云小云"
    body = detection.json()
    assert attributes == {
        **{k: body[k] for k in ("confidence", "stream", "start", "end", "seq", "boot_id")},
        "recent_seqs": [body["seq"]],
    }
    # A replayed one (same payload with replayed: true, as the outbox sends it) renders {}.
    replayed = json.dumps({**body, "replayed": True}, ensure_ascii=False).encode()
    assert render(entities["wake_word"]["value_template"], replayed) == "{}"
    assert event_outcome(entities["wake_word"], replayed) is None

    # QoS 1 is at least once: detections delivered again after a reconnect (same seq, same boot)
    # fire nothing, even a window of them; one overtaken by a later one still fires; so does
    # the first of a new boot, whatever its number (a new outbox numbers from 1 again).
    def numbered(seq: int, boot_id: str = body["boot_id"]) -> bytes:
        return json.dumps({**body, "seq": seq, "boot_id": boot_id}, ensure_ascii=False).encode()

    state = EntityState()
    first = body["seq"]
    for seq in (first, first + 2, first + 3):
        assert event_outcome(entities["wake_word"], numbered(seq), this=state) is not None
    for seq in (first, first + 2, first + 3):  # the resent window
        assert event_outcome(entities["wake_word"], numbered(seq), this=state) is None
    assert event_outcome(entities["wake_word"], numbered(first + 1), this=state) is not None  # overtaken
    assert event_outcome(entities["wake_word"], numbered(first + 1), this=state) is None
    assert event_outcome(entities["wake_word"], numbered(1, "0123456789ab"), this=state) is not None
    assert state.attributes["recent_seqs"] == [1]
    for seq in range(100, 140):  # remembered: the last few dozen
        event_outcome(entities["wake_word"], numbered(seq, "0123456789ab"), this=state)
    assert state.attributes["recent_seqs"] == list(range(108, 140))

    report = json.loads(health_payload)
    assert sensor_state(entities["cpu"], health_payload) == pytest.approx(report["cpu_percent"])
    assert sensor_state(entities["memory"], health_payload) == pytest.approx(report["memory_rss_mb"])
    assert sensor_state(entities["memory"], health_payload) > 10
    assert sensor_state(entities["detections"], health_payload) == report["detections"] >= 1
    temperature = sensor_state(entities["temperature"], health_payload)
    assert temperature == report["temperature_c"]  # None (unknown) where the board has no sensor
    rtf = sensor_state(entities["rtf"], health_payload)
    assert rtf == max(s["rtf"] for s in report["streams"].values() if s.get("rtf") is not None)
    assert 0 < rtf < 1
    assert switch_state(entities["mute"], health_payload) is False
    backlog = sensor_state(entities["backlog"], health_payload)
    assert backlog == max(w["queued_seconds"] for w in report["worker"]["workers"]) >= 0
    two_workers = [{"queued_seconds": 0.3}, {"queued_seconds": 2.5}]
    behind = {**report, "worker": {**report["worker"], "workers": two_workers}}
    assert sensor_state(entities["backlog"], json.dumps(behind).encode()) == 2.5
    # Health without streams (and without a temperature) gives unknown, not an error.
    idle = json.dumps({**report, "streams": {}, "temperature_c": None, "cpu_percent": None}).encode()
    assert sensor_state(entities["rtf"], idle) is None
    assert sensor_state(entities["temperature"], idle) is None
    assert sensor_state(entities["cpu"], idle) is None
    # A local source's entry carries no rtf: it is skipped.
    mixed = json.dumps({**report, "streams": {**report["streams"], "mic": {"kind": "microphone"}}}).encode()
    assert sensor_state(entities["rtf"], mixed) == rtf


def test_a_detection_replayed_after_an_outage_is_ignored_by_the_event(  # type: ignore[no-untyped-def]
    make_agent, tmp_path: Path, example_wav: Path
) -> None:
    """The real path: detected while no broker listens, kept in the outbox, sent on reconnect."""
    # Nobody listens on this port: the first agent can only store the detection.
    config = agent_config(free_port(), tmp_path, homeassistant={"enabled": True})
    first = make_agent(config, start=False)
    first.start()
    samples = to_mono_16k(read_wav(example_wav))
    assert first.ingest.submit(AudioChunk("door", "file", samples, time.time(), final=True))
    wait_until(lambda: first.outbox.depth() >= 1, timeout=30)
    assert first.outbox.depth() == 1
    first.stop(timeout=1)  # nothing to flush to: no broker
    broker = Broker(tmp_path).start()  # the next run of the same device finds a broker
    watcher = Client(broker.port).connect().subscribe(f"{PREFIX}/detection").subscribe(f"{DISCOVERY}/#")
    try:
        ha_agent(make_agent, broker.port, tmp_path)
        (detection,) = watcher.wait_for(f"{PREFIX}/detection")
        assert detection.json()["replayed"] is True
        entities = by_object(wait_configs(watcher))
        assert render(entities["wake_word"]["value_template"], detection.payload) == "{}"
        assert event_outcome(entities["wake_word"], detection.payload) is None
    finally:
        watcher.close()
        broker.stop()


def test_disabled_removes_what_an_earlier_run_published(broker, make_agent, client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first = ha_agent(make_agent, broker.port, tmp_path)
    client.subscribe(f"{DISCOVERY}/#")
    wait_configs(client)
    assert {m.topic for m in retained_under(broker.port, CONFIG_FILTER)} == TOPICS
    first.stop()
    client.messages.clear()
    ha_agent(make_agent, broker.port, tmp_path, enabled=False)
    removed = wait_configs(client, predicate=lambda latest: all(not m.payload for m in latest.values()))
    assert set(removed) == TOPICS
    assert retained_under(broker.port, f"{DISCOVERY}/#") == []
    # Disabled, the agent does not listen to Home Assistant's birth message.
    client.messages.clear()
    client.publish(f"{DISCOVERY}/status", b"online", qos=1)
    handled_before(client)
    assert client.on(CONFIG_FILTER) == []


def test_switching_off_at_run_time_removes_at_once_and_back_on_republishes(  # type: ignore[no-untyped-def]
    broker, make_agent, client, tmp_path: Path
) -> None:
    agent = ha_agent(make_agent, broker.port, tmp_path)
    client.subscribe(f"{DISCOVERY}/#")
    wait_configs(client)
    client.messages.clear()
    client.publish(f"{PREFIX}/cmd/set_config", json.dumps({"homeassistant": {"enabled": False}}), qos=1)
    removed = wait_configs(client, predicate=lambda latest: all(not m.payload for m in latest.values()))
    assert set(removed) == TOPICS
    assert retained_under(broker.port, CONFIG_FILTER) == []
    client.messages.clear()
    agent.apply_config(merge_update(agent.config, {"homeassistant": {"enabled": True}}))
    configs = wait_configs(client, predicate=lambda latest: all(m.payload for m in latest.values()))
    assert set(configs) == TOPICS


def test_home_assistant_birth_message_brings_discovery_and_state_again(  # type: ignore[no-untyped-def]
    broker, make_agent, client, tmp_path: Path
) -> None:
    ha_agent(make_agent, broker.port, tmp_path)
    client.subscribe(f"{DISCOVERY}/+/dev1/+/config")
    client.subscribe(f"{PREFIX}/health")
    wait_configs(client)
    client.messages.clear()
    client.publish(f"{DISCOVERY}/status", b"online")  # HA's birth: QoS 0, not retained
    configs = wait_configs(client)
    assert set(configs) == TOPICS
    client.wait_for(f"{PREFIX}/health")  # then the state, as HA's docs advise
    client.messages.clear()
    client.publish(f"{DISCOVERY}/status", b"offline")  # HA's last will: nothing to do
    handled_before(client)
    assert client.on(CONFIG_FILTER) == []


def test_discovery_is_published_again_after_a_broker_restart(  # type: ignore[no-untyped-def]
    broker, make_agent, client, tmp_path: Path
) -> None:
    ha_agent(make_agent, broker.port, tmp_path)
    client.subscribe(f"{DISCOVERY}/#")
    assert set(wait_configs(client)) == TOPICS
    broker.restart(downtime=0.5)  # no persistence: every retained config is gone
    watcher = Client(broker.port).connect().subscribe(f"{DISCOVERY}/#")
    try:
        configs = wait_configs(watcher)
        assert set(configs) == TOPICS
    finally:
        watcher.close()


def test_new_keywords_become_event_types(broker, make_agent, client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ha_agent(make_agent, broker.port, tmp_path)
    client.subscribe(f"{DISCOVERY}/event/dev1/wake_word/config")
    client.wait_for(f"{DISCOVERY}/event/dev1/wake_word/config")
    client.publish(f"{PREFIX}/cmd/set_config", json.dumps({"keywords": ["小云小云", "如家酒店"]}), qos=1)
    updated = client.wait_for(f"{DISCOVERY}/event/dev1/wake_word/config", lambda m: len(m) >= 2)[-1]
    payload = updated.json()
    assert payload["event_types"] == ["小云小云", "如家酒店"]
    assert discovery_errors(updated.topic, payload) == []


def test_the_mute_switch_mutes_the_agent(broker, make_agent, client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    agent = ha_agent(make_agent, broker.port, tmp_path)
    client.subscribe(f"{DISCOVERY}/switch/dev1/mute/config")
    client.subscribe(f"{PREFIX}/health")
    switch = client.wait_for(f"{DISCOVERY}/switch/dev1/mute/config")[-1].json()
    # What HA's switch does on "turn on": payload_on to command_topic with the configured
    # qos and retain (mqtt/switch.py async_turn_on -> async_publish_with_config).
    client.publish(switch["command_topic"], switch["payload_on"], qos=switch["qos"], retain=switch["retain"])
    on = client.wait_for(f"{PREFIX}/health", lambda m: any(h.json()["muted"] for h in m))
    assert agent.worker.muted is True
    assert switch_state(switch, next(h for h in on if h.json()["muted"]).payload) is True
    client.messages.clear()
    client.publish(switch["command_topic"], switch["payload_off"], qos=switch["qos"], retain=switch["retain"])
    off = client.wait_for(f"{PREFIX}/health", lambda m: any(not h.json()["muted"] for h in m))
    assert agent.worker.muted is False
    assert switch_state(switch, next(h for h in off if not h.json()["muted"]).payload) is False


def test_no_switch_without_the_mute_command(broker, make_agent, client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client.subscribe(f"{DISCOVERY}/#")
    ha_agent(make_agent, broker.port, tmp_path, commands=False)
    configs = wait_configs(client)
    assert configs[f"{DISCOVERY}/switch/dev1/mute/config"].payload == b""  # removed, not announced
    announced = sorted(by_object(configs))
    assert announced == ["backlog", "cpu", "detections", "memory", "rtf", "temperature", "wake_word"]


def test_the_runner_always_attaches_discovery() -> None:
    """Attached even when disabled: that is how it removes what an earlier run published."""
    from edge_agent.cli.run import build_integrations
    from edge_agent.config import parse_config

    control = object()  # the agent the command processor would control; never called here
    for enabled in (False, True):
        integrations = build_integrations(parse_config({"homeassistant": {"enabled": enabled}}), control)
        assert sum(isinstance(i, HomeAssistantDiscovery) for i in integrations) == 1


def test_detections_leave_room_in_the_broker_window_for_what_a_reconnect_sends_first(  # type: ignore[no-untyped-def]
    broker, make_agent, client, tmp_path: Path
) -> None:
    """After a reconnect, paho sends info, online and every discovery config, then resends the
    detections still unacknowledged: together within the broker's Receive Maximum (20)."""
    client.subscribe(f"{DISCOVERY}/#")
    agent = ha_agent(make_agent, broker.port, tmp_path)
    wait_configs(client)
    handled_before(client)  # the burst is counted once the on-connect hooks have returned
    assert agent.transport is not None
    on_connect = agent.transport.connect_burst
    assert on_connect == 2 + len(OBJECT_IDS)  # info, online, one config per entity
    assert detection_window(agent.transport) + on_connect == agent.transport.send_window == 20


def test_without_home_assistant_the_clears_at_each_connect_leave_detections_the_window(  # type: ignore[no-untyped-def]
    broker, make_agent, client, tmp_path: Path
) -> None:
    """Disabled, every connection clears the discovery topics again (QoS 0: a clear lost with
    the connection is sent at the next one): only info and online are sent before the resent
    detections, and detections keep 18 of mosquitto's 20 places."""
    client.subscribe(f"{DISCOVERY}/#")
    agent = ha_agent(make_agent, broker.port, tmp_path, enabled=False)
    removed = wait_configs(client, predicate=lambda latest: all(not m.payload for m in latest.values()))
    assert set(removed) == TOPICS
    handled_before(client)  # the burst is counted once the on-connect hooks have returned
    assert agent.transport is not None
    assert agent.transport.connect_burst == 2  # info, online
    assert detection_window(agent.transport) == 18
    broker.restart(downtime=0.5)
    wait_ready(broker.port, agent, timeout=20)  # reconnected: info again, from the on-connect hooks
    # A command is read after the on-connect hooks have returned (the same thread runs both).
    watcher = Client(broker.port).connect()
    try:
        handled_before(watcher)
    finally:
        watcher.close()
    assert agent.transport.stats.reconnects >= 1
    assert agent.transport.connect_burst == 2  # the largest on-connect burst seen, reconnect included

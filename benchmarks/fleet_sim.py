"""A simulated fleet: many lightweight MQTT clients that publish the agent's real messages.

Not whole agents (no audio, no engine): each simulated device keeps one MQTT 5 connection and
publishes what an agent publishes under ``{prefix}/{device}/`` (the retained ``availability``
with its last will, ``info`` and ``health``, live ``detection`` events) and answers the fleet
commands ``ping``, ``get_config`` and ``set_config`` on its own, ``all`` and group command
topics, as the agent does (answers to the response topic with the correlation data, else to
``cmd_result``; retained commands ignored). Every message is built with the classes of
``edge_agent.mqtt.messages``, so the tools under test read exactly what real agents send.

Detections follow a deterministic rate model: a device detects ``--rate`` times an hour at the
default threshold, and ``(default / threshold) ** 4`` times as often with a lower threshold (its
lowest keyword threshold), so that a ``set_config`` lowering a threshold raises its rate as it
would on a real device. ``--outlier-every K`` gives every K-th device ten times the rate.

All devices share one thread and one ``selectors`` loop (paho's external-loop API), so a
thousand of them cost one process::

    python -m benchmarks.fleet_sim --broker 127.0.0.1:1883 --devices 1000 --group-size 10

It prints ``ready N`` on stdout once every device is connected and has published its retained
state, and runs until SIGTERM or SIGINT (then publishes ``offline`` for every device).
"""

from __future__ import annotations

import argparse
import copy
import json
import selectors
import signal
import sys
import time
import uuid
from collections import deque
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.config.schema import DEFAULT_THRESHOLD
from edge_agent.mqtt.messages import (
    Availability,
    CommandResult,
    CommandTopic,
    DetectionEvent,
    DeviceInfo,
    HealthReport,
    iso_utc,
)
from edge_agent.mqtt.transport import publish_properties

KEYWORD = "小云小云"
# How strongly a lower threshold raises the rate of (false) detections in the rate model.
RATE_EXPONENT = 4.0
OUTLIER_FACTOR = 10.0
HOUR_S = 3600.0


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` merged into a copy of ``base`` (nested dicts merge, other values replace)."""
    result = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def keyword_list(value: Any) -> list[dict[str, Any]]:
    """``keywords`` as the agent reads it (strings or objects), or ValueError."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError(f"keywords must be a non-empty list, got {value!r}")
    keywords = []
    for item in value:
        entry = {"text": item} if isinstance(item, str) else item
        if not isinstance(entry, dict) or not isinstance(entry.get("text"), str):
            raise ValueError(f"a keyword must be a string or an object with a text, got {item!r}")
        threshold = entry.get("threshold", DEFAULT_THRESHOLD)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
        keywords.append({"text": entry["text"], "threshold": float(threshold)})
    return keywords


class SimDevice:
    """One simulated agent: its connection, its configuration and its counters."""

    def __init__(
        self, device_id: str, groups: list[str], args: argparse.Namespace, rate_per_hour: float, phase: float
    ) -> None:
        self.id = device_id
        self.prefix = args.prefix
        self.boot_id = uuid.uuid4().hex[:12]
        # --aged: as if the device had run for an hour already, at its rate, so that its
        # detections per hour are settled from the start (the fleet view's flags need that).
        age = HOUR_S if args.aged else 0.0
        self.started = time.time() - age
        self.started_monotonic = time.monotonic() - age
        self.base_rate = rate_per_hour
        self.config: dict[str, Any] = {
            "device": {"id": device_id, "groups": groups},
            "keywords": [{"text": KEYWORD, "threshold": DEFAULT_THRESHOLD}],
            "engine": {"muted": False},
            "health": {"interval": args.health_interval},
        }
        self.detections = 0
        self.recent: deque[float] = deque()  # monotonic times of the last hour's detections
        if args.aged:
            count = int(rate_per_hour)
            now = time.monotonic()
            self.recent.extend(now - HOUR_S + (i + 0.5) * HOUR_S / count for i in range(count))
            self.detections = count
        self.credit = phase  # fraction of a detection accumulated (phases spread the devices)
        self.last_tick = time.monotonic()
        self.next_health = self.last_tick + phase * args.health_interval
        self.publish_detections = args.detection_events
        self.seq = 0
        self.commands = 0
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"edge_agent-{device_id}", protocol=paho.MQTTv5
        )
        self.client.will_set(self.topic(Availability.TOPIC), Availability.OFFLINE, qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.connected = False

    def topic(self, template: Any) -> str:
        return str(template.format(prefix=self.prefix, device=self.id))

    @property
    def groups(self) -> list[str]:
        return list(self.config["device"]["groups"])

    @property
    def rate_per_hour(self) -> float:
        if self.config["engine"].get("muted"):
            return 0.0
        lowest = min(k["threshold"] for k in self.config["keywords"])
        return self.base_rate * (DEFAULT_THRESHOLD / lowest) ** RATE_EXPONENT

    # --- MQTT callbacks (the loop's thread) ----------------------------------------------
    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            return
        self.connected = True
        filters = [CommandTopic.DEVICE.filter(prefix=self.prefix, device=self.id, command="+")]
        filters.append(CommandTopic.ALL.filter(prefix=self.prefix, command="+"))
        filters += [
            CommandTopic.GROUP.filter(prefix=self.prefix, group=group, command="+") for group in self.groups
        ]
        client.subscribe([(topic_filter, 1) for topic_filter in filters])
        client.publish(self.topic(Availability.TOPIC), Availability.ONLINE, qos=1, retain=True)
        self.publish_info()
        self.publish_health()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        if message.retain:
            return  # as the agent: a retained command would run again at every reconnect
        command = message.topic.rsplit("/", 1)[-1]
        props = getattr(message, "properties", None)
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        request_id = None
        try:
            arguments = json.loads(message.payload or b"{}")
            if not isinstance(arguments, dict):
                raise ValueError("the payload must be a JSON object")
            request_id = arguments.pop("id", None)
            result = self._run(command, arguments)
            answer = CommandResult(self.id, command, True, request_id, result)
        except ValueError as error:
            answer = CommandResult(self.id, command, False, request_id, None, str(error))
        self.commands += 1
        topic = response_topic or self.topic(CommandResult.TOPIC)
        client.publish(
            topic, answer.to_payload(), qos=1, properties=publish_properties(correlation_data=correlation)
        )

    def _run(self, command: str, arguments: dict[str, Any]) -> dict[str, Any]:
        if command == "ping":
            return {"pong": True, "boot_id": self.boot_id, "uptime_s": round(self.uptime, 1)}
        if command == "get_config":
            return {"config": copy.deepcopy(self.config), "muted": self.config["engine"]["muted"]}
        if command == "set_config":
            if not arguments:
                raise ValueError("set_config needs the keys to change")
            new = merge(self.config, arguments)
            new["keywords"] = keyword_list(new["keywords"])
            unknown = set(new) - set(self.config)
            if unknown:
                raise ValueError(f"invalid configuration: unknown keys {sorted(unknown)}")
            self.config = new
            self.publish_info()
            self.publish_health()
            return {"applied": True, "persisted": False, "keywords": [k["text"] for k in new["keywords"]]}
        raise ValueError(f"unknown command {command!r}")

    # --- what an agent publishes --------------------------------------------------------
    @property
    def uptime(self) -> float:
        return time.monotonic() - self.started_monotonic

    def publish_info(self) -> None:
        info = DeviceInfo(
            device=self.id,
            name=None,
            version="sim",
            boot_id=self.boot_id,
            started=iso_utc(self.started),
            model={"id": "damo/speech_charctc_kws_phone-xiaoyun", "revision": "master", "backend": "sim"},
            keywords=[dict(k) for k in self.config["keywords"]],
            sources=[],
            platform={"system": "sim"},
            topics={},
            groups=self.groups,
            muted=bool(self.config["engine"]["muted"]),
        )
        self.client.publish(self.topic(DeviceInfo.TOPIC), info.to_payload(), qos=1, retain=True)

    def publish_health(self) -> None:
        now = time.monotonic()
        while self.recent and self.recent[0] < now - HOUR_S:
            self.recent.popleft()
        window = min(HOUR_S, max(self.uptime, 60.0))  # as the agent: a minute at least
        lowest = min(k["threshold"] for k in self.config["keywords"])
        health = HealthReport(
            device=self.id,
            boot_id=self.boot_id,
            time=iso_utc(time.time()),
            uptime_s=round(self.uptime, 1),
            cpu_percent=1.0,
            memory_rss_mb=60.0,
            temperature_c=None,
            detections=self.detections,
            mqtt_reconnects=0,
            streams={},
            muted=bool(self.config["engine"]["muted"]),
            interval_s=float(self.config["health"]["interval"]),
            worker={"alive": True},
            detections_per_hour=round(len(self.recent) * HOUR_S / window, 1),
            near_miss={KEYWORD: round(lowest * 0.8, 4)},
        )
        self.client.publish(self.topic(HealthReport.TOPIC), health.to_payload(), qos=1, retain=True)
        self.next_health = now + float(self.config["health"]["interval"])

    def tick(self, now: float) -> None:
        """Detections due since the last tick, and health when it is due."""
        self.credit += self.rate_per_hour / HOUR_S * (now - self.last_tick)
        self.last_tick = now
        while self.credit >= 1.0:
            self.credit -= 1.0
            self.detect()
        if now >= self.next_health:
            self.publish_health()

    def detect(self) -> None:
        self.detections += 1
        self.recent.append(time.monotonic())
        if not self.publish_detections:
            return
        end = self.uptime
        event = DetectionEvent(
            device=self.id,
            stream="mic",
            keyword=KEYWORD,
            confidence=0.5,
            start=round(max(0.0, end - 1.0), 2),
            end=round(end, 2),
            time=iso_utc(time.time()),
            seq=self.seq,
            boot_id=self.boot_id,
            delay_ms=0.0,
        )
        self.seq += 1
        self.client.publish(self.topic(DetectionEvent.TOPIC), event.to_payload(), qos=1)


class Fleet:
    """Every simulated device, driven by one selector loop."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.selector = selectors.DefaultSelector()
        self.devices: list[SimDevice] = []
        self.stopping = False
        for index in range(args.devices):
            # With --group-size: a room of its own first (the fleet view compares rates within
            # it), then the whole fleet's group (what a rollout targets).
            groups = [f"{args.group}-{index // args.group_size:03d}"] if args.group_size else []
            groups.append(args.group)
            rate = args.rate * (
                OUTLIER_FACTOR if args.outlier_every and index % args.outlier_every == 0 else 1
            )
            phase = (index * 0.618034) % 1.0  # spread over the interval, the same on every run
            self.devices.append(SimDevice(f"{args.device_prefix}{index:04d}", groups, args, rate, phase))

    def connect(self, host: str, port: int) -> None:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 0
        for device in self.devices:
            device.client.connect(host, port, keepalive=60, properties=properties)
            self.selector.register(device.client.socket(), selectors.EVENT_READ, device)
        deadline = time.monotonic() + 60
        while not all(device.connected for device in self.devices):
            if time.monotonic() > deadline:
                raise SystemExit("not every simulated device got connected within 60 s")
            self.step(0.05)
        # A last round so that every retained message is written before "ready".
        for _ in range(20):
            self.step(0.01)

    def step(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            key.data.client.loop_read()
        for device in self.devices:
            client = device.client
            if client.want_write():
                client.loop_write()
            client.loop_misc()

    def run(self) -> None:
        while not self.stopping:
            self.step(0.05)
            now = time.monotonic()
            for device in self.devices:
                device.tick(now)

    def stop(self) -> None:
        for device in self.devices:
            device.client.publish(device.topic(Availability.TOPIC), Availability.OFFLINE, qos=1, retain=True)
        for _ in range(20):
            self.step(0.01)
        for device in self.devices:
            device.client.disconnect()
            device.client.loop_write()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.fleet_sim", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--broker", default="127.0.0.1:1883", metavar="HOST:PORT")
    parser.add_argument("--prefix", default="edge_agent")
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--device-prefix", default="sim-")
    parser.add_argument("--group", default="sim", help="the group of every device")
    parser.add_argument(
        "--group-size", type=int, default=0, help="devices per room group {group}-NNN listed first (0: none)"
    )
    parser.add_argument(
        "--rate", type=float, default=2.0, help="detections per hour at the default threshold"
    )
    parser.add_argument("--outlier-every", type=int, default=0, help="every K-th device detects 10x as often")
    parser.add_argument("--health-interval", type=float, default=10.0, help="seconds between health reports")
    parser.add_argument("--detection-events", action="store_true", help="publish every detection too")
    parser.add_argument("--aged", action="store_true", help="start as if every device had run for an hour")
    args = parser.parse_args(argv)
    host, _, port = args.broker.rpartition(":")
    fleet = Fleet(args)

    def request_stop(signum: int, frame: Any) -> None:
        fleet.stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    fleet.connect(host or "127.0.0.1", int(port))
    print(f"ready {len(fleet.devices)}", flush=True)
    try:
        fleet.run()
    finally:
        fleet.stop()
    print(f"stopped; commands answered: {sum(d.commands for d in fleet.devices)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

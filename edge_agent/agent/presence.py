"""Presence: the retained state that says what the device is and whether it is there.

After every CONNACK: ``info`` first, then ``online``, then health. The broker handles one
client's packets in order, so whoever sees ``online`` can already read what the device is (Home
Assistant and fleet tools read both), even if the agent dies right after. The same state is
published again after every live change. ``offline`` is the last will, and the last message
of a clean stop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from edge_agent import __version__
from edge_agent.agent.health import HealthReporter
from edge_agent.agent.live_config import LiveConfig
from edge_agent.agent.worker import Engine
from edge_agent.audio.sources import AudioSource
from edge_agent.mqtt.messages import (
    AudioTopic,
    Availability,
    DetectionEvent,
    DetectRequestTopic,
    DeviceInfo,
    ErrorReport,
    HealthReport,
    iso_utc,
)
from edge_agent.mqtt.transport import MqttTransport
from edge_agent.system import platform_summary


class Presence:
    """Publishes ``info``, availability and health (retained) on connect and after changes."""

    def __init__(
        self,
        device_id: str,
        boot_id: str,
        topic: Callable[..., str],
        live: LiveConfig,
        worker: Engine,
        health: HealthReporter,
        sources: Sequence[AudioSource],
        transport: MqttTransport | None,
    ) -> None:
        self._device_id = device_id
        self._boot_id = boot_id
        self._topic = topic
        self._live = live
        self._worker = worker
        self._health = health
        self._sources = list(sources)
        self._transport = transport

    def device_info(self) -> DeviceInfo:
        config = self._live.config
        model = self._live.model
        prefix = config.mqtt.topic_prefix
        return DeviceInfo(
            device=self._device_id,
            name=config.device.name,
            version=__version__,
            boot_id=self._boot_id,
            started=iso_utc(self._health.started),
            model={
                "id": config.model.id,
                "revision": config.model.revision,
                "backend": model.backend,
                "directory": str(model.directory),
                "latency_s": round(model.latency_seconds, 3),
            },
            keywords=[
                {
                    "text": k.text,
                    "threshold": k.threshold,
                    "min_duration": k.min_duration,
                    "max_duration": k.max_duration,
                }
                for k in self._worker.keywords
            ],
            sources=[s.describe() for s in self._sources],
            platform=platform_summary(),
            topics={
                "detection": self._topic(DetectionEvent.TOPIC),
                "health": self._topic(HealthReport.TOPIC),
                "error": self._topic(ErrorReport.TOPIC),
                "audio": AudioTopic.TOPIC.filter(prefix=prefix, device=self._device_id),
                "detect_request": self._topic(DetectRequestTopic.TOPIC),
            },
            groups=list(config.device.groups),
            muted=self._worker.muted,
            room=config.device.room,
        )

    def on_connected(self) -> None:
        """Network thread, after every CONNACK."""
        transport = self._transport
        assert transport is not None
        transport.publish(self._topic(DeviceInfo.TOPIC), self.device_info().to_payload(), qos=1, retain=True)
        transport.publish(self._topic(Availability.TOPIC), Availability.ONLINE, qos=1, retain=True)
        self.publish_health(self._health.report())

    def publish_state(self) -> None:
        """The retained description and health again (after a change)."""
        transport = self._transport
        if transport is not None and transport.connected:
            transport.publish(
                self._topic(DeviceInfo.TOPIC), self.device_info().to_payload(), qos=1, retain=True
            )
            self.publish_health(self._health.report())

    def publish_health(self, report: HealthReport) -> None:
        if self._transport is not None:
            self._transport.publish(self._topic(HealthReport.TOPIC), report.to_payload(), qos=0, retain=True)

    def offline_message(self) -> tuple[str, bytes, bool]:
        """(topic, payload, retain) of the clean stop's last word."""
        return self._topic(Availability.TOPIC), Availability.OFFLINE, True

"""What an integration gets of the running agent: a narrow interface, and nothing else.

Integrations (fleet commands, Home Assistant discovery, the Rhasspy Hermes bridge, the
scale-out pool, the Wyoming server, the HTTP API) plug into the agent through
:class:`AgentServices`:

* **MQTT**: ``publish``, ``subscribe``, ``unsubscribe``, ``connected`` (handlers run on the
  network thread and must only check and queue);
* **audio in**: ``ingest`` an audio item (:mod:`edge_agent.agent.items`); ``score_recording``
  a whole WAV (on the engine worker, between live passes);
* **detections out**: :meth:`Integration.on_detection`, and :meth:`Integration.stream_closed`;
* **errors**: ``report_error`` (counted, logged, published on ``error``, rate-limited);
* **health**: ``health()``, ``publish_health()``, ``uptime_seconds``, ``device_info()``,
  ``transport_stats``, ``engine_alive``;
* **configuration**: ``config``, ``keywords``, ``muted``, ``model`` and ``decoder_settings``
  (read-only, for whole-file detection), and :meth:`Integration.config_changed` after every
  live change (raise there to reject it: the change is rolled back).

The fleet command processor also gets :class:`AgentControl` (apply a configuration, reload the
model, restart): the only way to change the agent from outside.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any, Protocol

from edge_agent.agent.errors import ErrorReporter
from edge_agent.agent.health import HealthReporter
from edge_agent.agent.ingest import Ingest
from edge_agent.agent.items import AudioItem, RecordingRequest
from edge_agent.agent.live_config import LiveConfig
from edge_agent.agent.mqtt_inbound import response_topic_refusal
from edge_agent.agent.worker import Engine, WorkQueue
from edge_agent.audio.wav import WavError
from edge_agent.config import AgentConfig, MqttConfig
from edge_agent.engine.decoder import CompiledKeyword, DecoderSettings
from edge_agent.engine.model import KwsModel
from edge_agent.mqtt.messages import DetectionEvent, DeviceInfo, HealthReport, Topic
from edge_agent.mqtt.transport import Handler, MqttTransport, TransportStats
from edge_agent.recording import RecordingBusy, RecordingResult


class AgentServices:
    """The running agent as integrations see it. Every method is safe on any thread."""

    def __init__(
        self,
        device_id: str,
        boot_id: str,
        transport: MqttTransport | None,
        ingest: Ingest,
        errors: ErrorReporter,
        health: HealthReporter,
        live: LiveConfig,
        worker: Engine,
        publish_health: Callable[[], None],
        device_info: Callable[[], DeviceInfo],
        work: WorkQueue,
    ) -> None:
        self.device_id = device_id
        self.boot_id = boot_id
        self._transport = transport
        self._ingest = ingest
        self._errors = errors
        self._health = health
        self._live = live
        self._worker = worker
        self._publish_health = publish_health
        self._device_info = device_info
        self._work = work

    # --- identity ---------------------------------------------------------------------------
    @property
    def prefix(self) -> str:
        return self._live.config.mqtt.topic_prefix

    def topic(self, template: Topic, **parts: str) -> str:
        """A topic of this device: ``{prefix}`` and ``{device}`` filled in."""
        return template.format(prefix=self.prefix, device=self.device_id, **parts)

    # --- MQTT -------------------------------------------------------------------------------
    @property
    def mqtt_enabled(self) -> bool:
        return self._transport is not None

    @property
    def connected(self) -> bool:
        return self._transport is not None and self._transport.connected

    @property
    def mqtt5(self) -> bool:
        return self._transport is not None and self._transport.mqtt5

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        retain: bool = False,
        *,
        correlation_data: bytes | None = None,
        user_properties: Iterable[tuple[str, str]] = (),
    ) -> int | None:
        """Queue a publish (dropped without MQTT, or at QoS 0 while disconnected)."""
        if self._transport is None:
            return None
        return self._transport.publish(
            topic,
            payload,
            qos=qos,
            retain=retain,
            correlation_data=correlation_data,
            user_properties=user_properties,
        )

    def subscribe(
        self, topic_filter: str, handler: Handler, qos: int = 0, retain_as_published: bool = False
    ) -> None:
        """Remembered across reconnects; ``handler`` runs on the network thread."""
        if self._transport is None:
            raise RuntimeError("MQTT is disabled (mqtt.enabled: false)")
        self._transport.subscribe(topic_filter, handler, qos=qos, retain_as_published=retain_as_published)

    def unsubscribe(self, topic_filter: str) -> None:
        if self._transport is not None:
            self._transport.unsubscribe(topic_filter)

    def response_topic_refusal(self, topic: str) -> str | None:
        """Why an answer must not go to a request's response topic (the fleet's command space,
        or a topic this agent itself listens to), or None."""
        return response_topic_refusal(topic, self.prefix, self._transport)

    @property
    def transport_stats(self) -> TransportStats | None:
        """Connection counters (a copy), or None without MQTT."""
        return replace(self._transport.stats) if self._transport is not None else None

    # --- audio, errors, health --------------------------------------------------------------
    def ingest(self, item: AudioItem) -> bool:
        """Queue audio for the engine (never blocks); False when refused (already reported)."""
        return self._ingest.submit(item)

    def score_recording(
        self,
        wav: bytes,
        source: str,
        keywords: Sequence[CompiledKeyword] | None = None,
        decoder: DecoderSettings | None = None,
        timeout: float = 120.0,
    ) -> RecordingResult:
        """A whole WAV scored by the engine worker, a block at a time between its passes over
        live streams (so it never holds them up); blocks the calling thread until done.
        Raises WavError (RecordingTooLong, RecordingBusy among them) or TimeoutError."""
        done = threading.Event()
        answers: list[RecordingResult | WavError] = []

        def reply(result: RecordingResult | WavError) -> None:
            answers.append(result)
            done.set()

        request = RecordingRequest(
            wav, source, reply, tuple(keywords) if keywords is not None else None, decoder
        )
        if not self._work.put(request):
            raise RecordingBusy(f"{source}: the engine's queue is full; try again")
        if not done.wait(timeout):
            raise TimeoutError(f"{source}: not scored within {timeout:g} s")
        answer = answers[0]
        if isinstance(answer, WavError):
            raise answer
        return answer

    def report_error(
        self, code: str, message: str, topic: str | None = None, stream: str | None = None
    ) -> None:
        self._errors.report(code, message, topic=topic, stream=stream)

    def health(self) -> HealthReport:
        """The agent's state now (without starting a new CPU measurement window)."""
        return self._health.report(measure_cpu=False)

    def publish_health(self) -> None:
        self._publish_health()

    @property
    def uptime_seconds(self) -> float:
        return self._health.uptime_seconds

    @property
    def started(self) -> float:
        """Wall-clock time of the agent's start."""
        return self._health.started

    @property
    def engine_alive(self) -> bool:
        return self._worker.alive

    @property
    def engine_error(self) -> str | None:
        return self._worker.last_error

    def device_info(self) -> DeviceInfo:
        """What the retained ``info`` message says now."""
        return self._device_info()

    # --- configuration ------------------------------------------------------------------------
    @property
    def config(self) -> AgentConfig:
        return self._live.config

    @property
    def keywords(self) -> list[CompiledKeyword]:
        return self._worker.keywords

    @property
    def muted(self) -> bool:
        return self._worker.muted

    @property
    def model(self) -> KwsModel:
        """The loaded model (read-only; shared by every detector)."""
        return self._live.model

    @property
    def decoder_settings(self) -> DecoderSettings:
        return self._worker.settings.decoder


class AgentControl(Protocol):
    """What remote commands may change: the configuration, the model, the process."""

    def apply_config(self, new: AgentConfig) -> list[str]:
        """Switch to ``new``; returns the keys that need a restart. Raises ConfigRejected,
        LexiconError or ValueError (nothing changed)."""

    def preflight(self, new: AgentConfig) -> None:
        """Check what can be checked of ``new`` on this device before it is kept (the model
        loads, paths can be written...); raises ConfigRejected."""

    def try_connection(self, mqtt: MqttConfig, timeout: float) -> bool:
        """Connect with ``mqtt``; keep it if back online within ``timeout``, else go back to the
        previous settings. Returns whether it was kept."""

    def reload_model(self) -> KwsModel: ...

    def request_restart(self) -> None: ...

    @property
    def config_path(self) -> Any:
        """Where remote changes are persisted (beside the config file), or None."""


class Integration:
    """Something that plugs into the agent: commands, Home Assistant, Hermes, pools, Wyoming.

    Subclasses override what they need; every hook runs on the thread named in its docstring and
    must not block (no inference, no waiting for a publish).
    """

    name = "integration"

    def attach(self, services: AgentServices) -> None:
        """Before the agent connects: keep ``services``, subscribe."""
        self.services = services

    def on_connected(self) -> None:
        """After every CONNACK (network thread): re-publish retained state."""

    def on_detection(self, event: DetectionEvent, stream_kind: str) -> None:
        """A detection, stored and handed to MQTT (the detection sink's thread)."""

    def stream_closed(self, stream: str, stream_kind: str) -> None:
        """A network stream ended or went quiet and was freed (the detection sink's thread)."""

    def config_changed(self, keys: list[str]) -> None:
        """A live change of these dotted keys was applied (the changing thread); raise to
        reject it (it is rolled back)."""

    def stop(self) -> None:
        """The agent stops; MQTT is still connected."""

"""The edge agent: builds its parts, joins them, starts and stops them in order.

The path of a detection (docs/architecture.md draws it with every function):

    audio in ─▶ Ingest ══queue══▶ EngineWorker ══queue══▶ DetectionSink ─▶ Outbox, MQTT, listeners

Threads, and what each one runs:

* ``mqtt-network`` (the transport): reads messages; handlers only check and queue
  (:mod:`edge_agent.agent.mqtt_inbound`, integrations); refills the window of detections;
* ``engine-worker``: converts audio and runs every stream's detector
  (:mod:`edge_agent.agent.worker`); with ``engine.workers`` > 1 it runs in as many worker
  processes, each on its share of the streams (:mod:`edge_agent.agent.engine_pool`);
* ``detection-sink``: stores, delivers and announces detections (:mod:`edge_agent.agent.sink`);
* ``health``: the retained health report on a tick (:mod:`edge_agent.agent.health`);
* one thread per local audio source (file player, microphone pump), and the integrations' own
  (the command processor's).

No part calls back into the one that made it: each gets what it needs (a queue, the error
reporter, the transport) when it is built, here. Integrations get
:class:`~edge_agent.agent.services.AgentServices`. The agent keeps detecting while the broker
is away: detections wait in the outbox.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from edge_agent import __version__
from edge_agent.agent.delivery import Delivery
from edge_agent.agent.engine_pool import EnginePool, ModelSource, PoolInbox
from edge_agent.agent.errors import ErrorReporter, Refusal
from edge_agent.agent.health import HealthReporter
from edge_agent.agent.identity import IdentityGuard
from edge_agent.agent.ingest import Ingest
from edge_agent.agent.items import StreamClosed
from edge_agent.agent.live_config import LiveConfig, engine_settings
from edge_agent.agent.mqtt_inbound import MqttInbound
from edge_agent.agent.outbox import Outbox
from edge_agent.agent.presence import Presence
from edge_agent.agent.services import AgentServices, Integration
from edge_agent.agent.sink import DetectionSink, DetectionWire, detection_window
from edge_agent.agent.worker import Engine, EngineWorker, WorkQueue
from edge_agent.audio.sources import AudioSource
from edge_agent.config import AgentConfig, MqttConfig
from edge_agent.engine.model import KwsModel
from edge_agent.keywords import compile_config_keywords
from edge_agent.mqtt.messages import (
    Availability,
    DetectionEvent,
    DeviceInfo,
    ErrorReport,
    ProbeTopic,
    iso_utc,
)
from edge_agent.mqtt.transport import MqttTransport
from edge_agent.system import give_back_free_memory

log = logging.getLogger(__name__)

_BYTES_PER_MB = 1024 * 1024


class Agent:
    """Wires configuration, model, transport, worker, sink and sources; ``start``/``stop``."""

    def __init__(
        self,
        config: AgentConfig,
        model: KwsModel,
        sources: Sequence[AudioSource] = (),
        *,
        transport_factory: Callable[..., MqttTransport] = MqttTransport,
        outbox: Outbox | None = None,
        config_path: Path | None = None,
    ) -> None:
        self.device_id = config.device_id
        self.boot_id = uuid.uuid4().hex[:12]
        self.config_path = config_path
        self.sources = list(sources)
        self.integrations: list[Integration] = []
        self.restart_requested = False
        self.stopped = threading.Event()  # set by a signal, a restart command, or stop()
        self._started = False
        prefix = config.mqtt.topic_prefix

        def topic(template: object, **parts: str) -> str:
            return template.format(prefix=prefix, device=self.device_id, **parts)  # type: ignore[attr-defined]

        self.transport: MqttTransport | None = None
        if config.mqtt.enabled:
            self.transport = transport_factory(
                config.mqtt,
                config.client_id,
                will_topic=topic(Availability.TOPIC),
                will_payload=Availability.OFFLINE,
            )
        self.errors = ErrorReporter(
            _error_publisher(self.transport, topic(ErrorReport.TOPIC), self.device_id)
        )
        self.outbox: Outbox | None = None
        delivery = None
        if self.transport is not None:
            transport = self.transport
            self.outbox = outbox or Outbox(
                config.outbox_path(), config.outbox.max_events, config.outbox.max_age
            )
            wire = DetectionWire(
                transport,
                qos=lambda: self.live.config.mqtt.qos,
                expiry_seconds=lambda: self.live.config.mqtt.detection_expiry,
                probe_topic=topic(ProbeTopic.TOPIC),
            )
            stored = self.outbox

            def delivery(wake: Callable[[], None]) -> Delivery:
                return Delivery(
                    stored,
                    wire.publish,
                    lambda: transport.connected,
                    self.boot_id,
                    window=lambda: detection_window(transport),
                    wake=wake,
                    last_heard=lambda: transport.last_heard,
                    probe=wire.probe,
                )

        self.sink = DetectionSink(
            self.device_id,
            self.boot_id,
            topic(DetectionEvent.TOPIC),
            self.errors,
            self.outbox,
            delivery,
            on_stall=self.transport.drop_connection if self.transport is not None else lambda reason: None,
        )
        keywords = compile_config_keywords(model, config)
        settings = engine_settings(config, keywords)
        max_bytes = int(config.engine.queue_mb * _BYTES_PER_MB)
        workers = config.engine.workers or os.cpu_count() or 1
        self.worker: Engine
        if workers > 1:
            # The same worker loop in as many processes, each on its share of the streams.
            engine = config.engine
            source = ModelSource(model.directory, engine.backend, engine.threads, engine.quantize)
            # This process scores no audio: it keeps what spells keywords and describes the
            # model, and lets the network's weights go (each engine process loads its own).
            model = model.without_network()
            self.worker = EnginePool(source, settings, workers, max_bytes, self.sink, self.errors)
            self.queue: WorkQueue | PoolInbox = self.worker.inbox
        else:
            self.queue = WorkQueue(max_bytes)
            self.worker = EngineWorker(model, settings, self.queue, self.sink, self.errors)
        self.ingest = Ingest(self.queue, self.errors, config.audio.mqtt.max_rate_factor)
        self.live = LiveConfig(
            config, model, self.worker, self.ingest, on_applied=lambda: self.presence.publish_state()
        )
        self.health = HealthReporter(
            self.device_id,
            self.boot_id,
            worker=self.worker,
            queue=self.queue,
            ingest=self.ingest,
            sink=self.sink,
            errors=self.errors,
            sources=self.sources,
            interval=lambda: self.live.config.health.interval,
            publish=lambda report: self.presence.publish_health(report),
            outbox=self.outbox,
            transport=self.transport,
        )
        self.presence = Presence(
            self.device_id,
            self.boot_id,
            topic,
            self.live,
            self.worker,
            self.health,
            self.sources,
            self.transport,
        )
        self.services = AgentServices(
            self.device_id,
            self.boot_id,
            self.transport,
            self.ingest,
            self.errors,
            self.health,
            self.live,
            self.worker,
            publish_health=self.health.publish,
            device_info=self.presence.device_info,
            work=self.queue,
        )
        self.inbound = (
            MqttInbound(self.device_id, self.transport, self.live, self.ingest, self.queue, self.errors)
            if self.transport is not None
            else None
        )
        self.sink.on_stream_closed(lambda closed: self.ingest.forget(closed.stream))
        self.identity: IdentityGuard | None = None
        if self.transport is not None:
            self.transport.on_connected(self.presence.on_connected)  # first: info, then online
            # Another running agent with this device id: reported, and no reconnect loop.
            self.identity = IdentityGuard(
                self.device_id, self.boot_id, topic(DeviceInfo.TOPIC), self.transport, self.errors
            )
            self.identity.attach()

    # --- what others use ---------------------------------------------------------------------
    @property
    def config(self) -> AgentConfig:
        return self.live.config

    @property
    def model(self) -> KwsModel:
        return self.live.model

    def add_integration(self, integration: Integration) -> None:
        """Attach ``integration`` (before :meth:`start`): it subscribes now, and hears every
        detection, closed stream, configuration change and connection from the start on."""
        if self._started:
            raise RuntimeError("integrations are added before the agent starts")
        integration.attach(self.services)
        self.integrations.append(integration)
        self.sink.on_detection(integration.on_detection)
        self.sink.on_stream_closed(_closed_hook(integration))
        self.live.subscribe(type(integration).__name__, integration.config_changed)
        if self.transport is not None:
            self.transport.on_connected(integration.on_connected)

    # --- AgentControl (for remote commands) --------------------------------------------------
    def apply_config(self, new: AgentConfig) -> list[str]:
        return self.live.apply(new)

    def reload_model(self) -> KwsModel:
        return self.live.reload_model()

    def preflight(self, new: AgentConfig) -> None:
        self.live.preflight(new)

    def try_connection(self, mqtt: MqttConfig, timeout: float) -> bool:
        """Connect with ``mqtt``; keep it if online (subscribed) within ``timeout``, else
        reconnect with the previous settings."""
        transport = self.transport
        if transport is None:
            return False
        previous = transport.config
        if transport.reconnect_with(mqtt, timeout):
            return True
        log.warning(
            "MQTT: not online with the new settings within %.0f s; back to the previous ones", timeout
        )
        transport.reconnect_with(previous, timeout)
        return False

    def request_restart(self) -> None:
        """Stop, and let the runner start the agent again (``edge-agent run`` re-executes itself)."""
        self.restart_requested = True
        self.stopped.set()

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        config = self.live.config
        # Naming the FFT library loads it, and scipy's is large: with engine processes, only they
        # load it (this process runs no front-end).
        fft = self.model.fft if isinstance(self.worker, EngineWorker) else "the engine processes' default"
        log.info(
            "edge-agent %s starting as %s (boot %s), model %s, backend %s (FFT: %s), keywords %s",
            __version__,
            self.device_id,
            self.boot_id,
            config.model.id,
            self.model.backend,
            fft,
            ", ".join(f"{k.text}@{k.threshold}" for k in self.worker.keywords),
        )
        self._started = True
        if not isinstance(self.worker, EngineWorker):
            # This process let the network's weights go when it kept the model without them (its
            # engine processes hold their own): their pages go back to the system.
            give_back_free_memory()
        self.sink.start()
        self.worker.start()
        if self.transport is not None:
            assert self.inbound is not None and self.sink.delivery is not None
            # After presence and integrations: what the last session left unacknowledged, then
            # the backlog.
            self.transport.on_connected(self.sink.delivery.new_session)
            self.transport.on_connected(self.sink.wake)
            self.transport.on_acknowledged(self.sink.delivery.acknowledged)
            self.transport.after_reading(self.sink.delivery.refill)
            self.inbound.subscribe()
            self.transport.start()
        for source in self.sources:
            try:
                source.start(self.ingest.submit)
            except Exception as error:  # noqa: BLE001 - a missing microphone must not stop the rest
                log.error("audio source %s did not start: %s", source.stream_id, error)
                self.errors.report(
                    "source_failed", f"audio source {source.stream_id}: {error}", stream=source.stream_id
                )
        self.health.start()
        if self.outbox is not None and self.outbox.recovered is not None:
            self.errors.report("outbox_recovered", self.outbox.recovered)  # sent once connected

    def stop(self, timeout: float = 10.0) -> None:
        """Stop sources, finish streams, flush detections, say ``offline``, disconnect. Once."""
        if not self._started:
            for integration in self.integrations:  # attached (their threads may run), never started
                integration.stop()
            self.integrations.clear()
            return
        self._started = False
        deadline = time.monotonic() + timeout
        self.stopped.set()
        for integration in self.integrations:
            try:
                integration.stop()
            except Exception:
                log.exception("%s failed to stop", type(integration).__name__)
        for source in self.sources:
            source.stop()
        self.health.stop()
        self.worker.stop(timeout=max(1.0, deadline - time.monotonic()))
        self.sink.stop(flush_seconds=max(0.0, min(3.0, deadline - time.monotonic())))
        if self.transport is not None:
            self.transport.stop(
                [self.presence.offline_message()], timeout=max(0.5, deadline - time.monotonic())
            )
        if self.outbox is not None:
            self.outbox.close()
        log.info("edge-agent stopped")

    def wait(self, keep_running: bool = False) -> None:
        """Block until :attr:`stopped` is set; without MQTT (and unless ``keep_running``, for a
        server), also when every source is finite and has finished."""
        while not self.stopped.wait(0.2):
            finite = self.sources and self.transport is None and not keep_running
            if finite and all(source.finished for source in self.sources):
                self.worker.drain()
                return


def _closed_hook(integration: Integration) -> Callable[[StreamClosed], None]:
    return lambda closed: integration.stream_closed(closed.stream, closed.kind)


def _error_publisher(
    transport: MqttTransport | None, topic: str, device_id: str
) -> Callable[[Refusal], None]:
    """Publishes refusals on the device's ``error`` topic (QoS 1, never retained)."""

    def publish(refusal: Refusal) -> None:
        if transport is None:
            return
        report = ErrorReport(
            device=device_id,
            time=iso_utc(refusal.time),
            code=refusal.code,
            message=refusal.message,
            topic=refusal.topic,
            stream=refusal.stream,
            suppressed=refusal.suppressed,
        )
        transport.publish(topic, report.to_payload(), qos=1)

    return publish

"""The edge agent: audio sources and MQTT streams in, detections and health out.

Threads, and who talks to whom:

* ``mqtt-network`` (transport): receives messages; handlers validate cheaply and *submit*
  work to the engine worker; never blocks, never infers.
* ``engine-worker``: runs every stream's detector; reports detections, which go into the
  on-disk outbox before anything is published.
* ``outbox-publisher``: publishes outbox events in order while connected, deletes them on PUBACK.
* ``health``: publishes retained health every ``health.interval`` seconds.
* one thread per local audio source (file player, microphone pump).

The agent keeps detecting while the broker is away; detections wait in the outbox.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil

from edge_agent import __version__
from edge_agent.agent.limits import AudioRateLimiter
from edge_agent.agent.outbox import Outbox, OutboxPublisher, StoredEvent
from edge_agent.agent.worker import (
    CallItem,
    EngineWorker,
    FileRequest,
    Found,
    PcmChunk,
    SampleChunk,
    StreamControlItem,
    StreamState,
)
from edge_agent.audio.pcm import AudioFormatError, PcmFormat
from edge_agent.audio.sources import AudioChunk, AudioSource
from edge_agent.config import (
    AgentConfig,
    changed_keys,
    to_dict,
)
from edge_agent.engine.decoder import CompiledKeyword, Detection
from edge_agent.engine.model import DecoderSettings, KwsModel
from edge_agent.keywords import compile_config_keywords, decoder_settings_from
from edge_agent.mqtt.messages import (
    AudioControl,
    AudioTopic,
    Availability,
    DetectionEvent,
    DetectRequestTopic,
    DetectResponse,
    DeviceInfo,
    ErrorReport,
    HealthReport,
    PayloadError,
    finite_or_none,
)
from edge_agent.mqtt.transport import InboundMessage, MqttTransport
from edge_agent.system import board_temperature, platform_summary

log = logging.getLogger(__name__)

# Identical errors (same code and topic) are published at most this often; the rest are counted.
ERROR_INTERVAL_SECONDS = 1.0
# After a batch of detections the engine worker waits at most this long for them to be handed to
# MQTT before analysing more audio (a hundred streams firing at once need several windows).
_HAND_OVER_WAIT_SECONDS = 0.1
# ... and after such a wait timed out, does not wait at all for this long.
_NO_WAIT_AFTER_TIMEOUT_SECONDS = 5.0
# Places of the broker's window of unacknowledged publishes left to QoS 1 messages other than
# detections (availability, info, command replies): they are few and rarely at the same time.
_OTHER_QOS1_RESERVE = 2


def detection_window(transport: MqttTransport | None) -> int:
    """Detections awaiting their PUBACK at a time: the broker's window, less room for the
    agent's other QoS 1 messages. At a reconnect, paho resends the unacknowledged detections
    right after what the on-connect hooks publish (info, online, discovery) without counting
    them, and together they must stay within the broker's Receive Maximum. In the middle of
    a session, the reserve keeps paho from holding a detection back: its network thread
    sends what it held back later, and a detection sent meanwhile could overtake it."""
    if transport is None:
        return 1
    reserve = max(_OTHER_QOS1_RESERVE, transport.connect_burst)
    return max(1, transport.send_window - reserve)


# Keys whose change takes effect at once; any other change waits for a restart.
_LIVE_PREFIXES = (
    "keywords",
    "engine.refractory",
    "engine.gap_tolerance",
    "engine.hold",
    "engine.pause",
    "engine.muted",
    "health.",
    "audio.mqtt.max_streams",
    "audio.mqtt.idle_timeout",
    "audio.mqtt.max_rate_factor",
    "mqtt.max_payload_bytes",
    "mqtt.detection_expiry",
    "commands.",
    "homeassistant.",
)


def _is_live(key: str) -> bool:
    return key.startswith(_LIVE_PREFIXES)


class Integration:
    """Something that plugs into the agent's MQTT life: commands, Home Assistant, Hermes, pools.

    Subclasses override what they need; every hook runs on the thread named in its docstring and
    must not block (no inference, no waiting for a publish).
    """

    def attach(self, agent: Agent) -> None:
        """Before the agent connects: keep the agent, subscribe (``agent.transport.subscribe``)."""
        self.agent = agent

    def on_connected(self) -> None:
        """After every CONNACK (network thread): re-publish retained state."""

    def on_detection(self, event: DetectionEvent, stream: StreamState) -> None:
        """A detection (worker thread), after it is stored in the outbox."""

    def config_changed(self, keys: list[str]) -> None:
        """``set_config`` changed these dotted keys (command thread)."""

    def stream_closed(self, stream: str) -> None:
        """A stream ended or went quiet and was freed (worker thread)."""

    def stop(self) -> None:
        """The agent stops; the transport is still connected."""


def iso_utc(epoch: float) -> str:
    return (
        datetime.fromtimestamp(epoch, tz=timezone.utc)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


class Agent:
    """Wires configuration, model, transport, worker, outbox and sources; ``start``/``stop``."""

    def __init__(
        self,
        config: AgentConfig,
        model: KwsModel,
        keywords: Sequence[CompiledKeyword],
        settings: DecoderSettings,
        sources: Sequence[AudioSource] = (),
        transport_factory: Callable[..., MqttTransport] = MqttTransport,
        outbox: Outbox | None = None,
    ) -> None:
        self.config = config
        self.model = model
        self.device_id = config.device_id
        self.prefix = config.mqtt.topic_prefix
        self.boot_id = uuid.uuid4().hex[:12]
        self.started = time.time()
        self._started_monotonic = time.monotonic()
        self.sources = list(sources)
        self._stop = threading.Event()
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # the first call only starts the measurement
        self._error_times: dict[tuple[str, str | None], float] = {}
        self._error_suppressed: dict[tuple[str, str | None], int] = {}
        self.refused: dict[str, int] = {}
        self.detections = 0
        self.detections_by_keyword: dict[str, int] = {}
        # Audio chunks refused before reaching the worker (queue full), per MQTT stream.
        self.dropped_by_stream: dict[str, int] = {}
        self.settings = settings
        self.config_path: Path | None = None  # set by the runner: where set_config persists changes
        self.integrations: list[Integration] = []
        self.restart_requested = False
        self.stop_event: threading.Event | None = None
        self._rate_limiter = AudioRateLimiter()
        self._health_thread: threading.Thread | None = None
        self.listeners: list[Callable[[DetectionEvent], None]] = []

        self.worker = EngineWorker(
            model,
            keywords,
            settings,
            self,
            max_streams=config.audio.mqtt.max_streams,
            idle_timeout=config.audio.mqtt.idle_timeout,
            max_queued_bytes=int(config.engine.queue_mb * 1024 * 1024),
        )
        self.transport: MqttTransport | None = None
        self.outbox: Outbox | None = None
        self.publisher: OutboxPublisher | None = None
        self._no_delivery_wait_until = 0.0  # monotonic; see _wait_for_delivery
        if config.mqtt.enabled:
            self.transport = transport_factory(
                config.mqtt,
                config.client_id,
                will_topic=self.topic(Availability.TOPIC),
                will_payload=Availability.OFFLINE,
            )
            self.outbox = outbox or Outbox(
                config.outbox_path(), config.outbox.max_events, config.outbox.max_age
            )
            self.publisher = OutboxPublisher(
                self.outbox,
                self._publish_event,
                lambda: self.transport is not None and self.transport.connected,
                self.boot_id,
                window=self._detection_window,
            )

    # --- topics ------------------------------------------------------------------------------
    def topic(self, template: Any, **parts: str) -> str:
        return template.format(prefix=self.prefix, device=self.device_id, **parts)

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        log.info(
            "edge-agent %s starting as %s (boot %s), model %s, backend %s (FFT: %s), keywords %s",
            __version__,
            self.device_id,
            self.boot_id,
            self.config.model.id,
            self.model.backend,
            self.model.fft,
            ", ".join(f"{k.text}@{k.threshold}" for k in self.worker.keywords),
        )
        if self.config.engine.muted:
            self.worker.muted = True
        self.worker.start()
        if self.transport is not None and self.publisher is not None:
            self.transport.on_connected(self._on_connected)
            self.transport.on_acknowledged(self.publisher.acknowledged)
            self.transport.after_reading(self.publisher.refill)
            self._subscribe()
            for integration in self.integrations:
                integration.attach(self)
            self.publisher.start()
            self.transport.start()
        for source in self.sources:
            try:
                source.start(self._source_sink(source))
            except Exception as error:  # noqa: BLE001 - a missing microphone must not stop the rest
                log.error("audio source %s did not start: %s", source.stream_id, error)
                self.refuse(
                    "source_failed", f"audio source {source.stream_id}: {error}", stream=source.stream_id
                )
        self._health_thread = threading.Thread(target=self._health_loop, name="health", daemon=True)
        self._health_thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop sources, finish streams, flush detections, say ``offline``, disconnect."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        for integration in self.integrations:
            try:
                integration.stop()
            except Exception:
                log.exception("%s failed to stop", type(integration).__name__)
        for source in self.sources:
            source.stop()
        self.worker.stop(timeout=max(1.0, deadline - time.monotonic()))
        if self.publisher is not None:
            flushed = self.publisher.flush(max(0.0, min(3.0, deadline - time.monotonic())))
            if not flushed and self.outbox is not None:
                log.warning("%d detections stay in the outbox until the next start", self.outbox.depth())
            self.publisher.stop()
        if self.transport is not None:
            self.transport.stop(
                [(self.topic(Availability.TOPIC), Availability.OFFLINE, True)],
                timeout=max(0.5, deadline - time.monotonic()),
            )
        if self.outbox is not None:
            self.outbox.close()
        log.info("edge-agent stopped")

    def wait(self, stop: threading.Event, keep_running: bool = False) -> None:
        """Block until ``stop`` is set; without MQTT (and unless ``keep_running``, for a server),
        also when every source is finite and has finished."""
        while not stop.wait(0.2):
            finite = self.sources and not self.transport and not keep_running
            if finite and all(s.finished for s in self.sources):
                self.worker.drain()
                return

    # --- connection hooks --------------------------------------------------------------------
    def _subscribe(self) -> None:
        assert self.transport is not None
        if self.config.audio.mqtt.enabled:
            prefix, device = self.prefix, self.device_id
            self.transport.subscribe(AudioTopic.TOPIC.filter(prefix=prefix, device=device), self._on_audio)
            self.transport.subscribe(
                AudioControl.TOPIC.filter(prefix=prefix, device=device), self._on_control
            )
        self.transport.subscribe(
            DetectRequestTopic.TOPIC.format(prefix=self.prefix, device=self.device_id),
            self._on_detect_request,
            qos=1,
        )
        self.transport.subscribe(
            DetectRequestTopic.TOPIC_WITH_ID.filter(prefix=self.prefix, device=self.device_id),
            self._on_detect_request,
            qos=1,
        )

    def _on_connected(self) -> None:
        """After every CONNACK: retained state first, then the outbox backlog.

        ``info`` goes before ``online``: the broker handles one client's packets in order, so
        whoever sees ``online`` can already read what the device is (Home Assistant and fleet
        tools read both), even if the agent dies right after.
        """
        assert self.transport is not None
        self.transport.publish(
            self.topic(DeviceInfo.TOPIC), self.device_info().to_payload(), qos=1, retain=True
        )
        self.transport.publish(self.topic(Availability.TOPIC), Availability.ONLINE, qos=1, retain=True)
        self.publish_health()
        for integration in self.integrations:
            try:
                integration.on_connected()
            except Exception:
                log.exception("%s failed after connecting", type(integration).__name__)
        if self.publisher is not None:
            self.publisher.notify()

    def device_info(self) -> DeviceInfo:
        return DeviceInfo(
            device=self.device_id,
            name=self.config.device.name,
            version=__version__,
            boot_id=self.boot_id,
            started=iso_utc(self.started),
            model={
                "id": self.config.model.id,
                "revision": self.config.model.revision,
                "backend": self.model.backend,
                "directory": str(self.model.directory),
                "latency_s": round(self.model.latency_seconds, 3),
            },
            keywords=[
                {
                    "text": k.text,
                    "threshold": k.threshold,
                    "min_duration": k.min_duration,
                    "max_duration": k.max_duration,
                }
                for k in self.worker.keywords
            ],
            sources=[s.describe() for s in self.sources],
            platform=platform_summary(),
            topics={
                "detection": self.topic(DetectionEvent.TOPIC),
                "health": self.topic(HealthReport.TOPIC),
                "error": self.topic(ErrorReport.TOPIC),
                "audio": AudioTopic.TOPIC.filter(prefix=self.prefix, device=self.device_id),
                "detect_request": self.topic(DetectRequestTopic.TOPIC),
            },
            groups=list(self.config.device.groups),
            muted=self.worker.muted,
        )

    # --- inbound (network thread: validate, enqueue, return) ---------------------------------
    def check_size(self, message: InboundMessage, stream: str | None = None) -> bool:
        limit = self.config.mqtt.max_payload_bytes
        if len(message.payload) > limit:
            self.refuse(
                "payload_too_large",
                f"payload of {len(message.payload)} bytes exceeds mqtt.max_payload_bytes ({limit})",
                topic=message.topic,
                stream=stream,
            )
            return False
        return True

    def _on_audio(self, message: InboundMessage) -> None:
        parts = AudioTopic.TOPIC.match(message.topic, self.prefix)
        if parts is not None:
            self.handle_audio(message, parts["stream"])

    def handle_audio(self, message: InboundMessage, stream: str) -> None:
        """Validate one PCM chunk of ``stream`` and queue it (network thread; never blocks)."""
        if not self.check_size(message, stream):
            return
        payload = message.payload
        if not payload:
            self.refuse("bad_audio_chunk", "empty audio payload", topic=message.topic, stream=stream)
            return
        if payload[:4] == b"RIFF":
            self.refuse(
                "bad_audio_chunk",
                "a WAV file was sent to a raw PCM topic: send raw samples, "
                "or the whole file to detect/request",
                topic=message.topic,
                stream=stream,
            )
            return
        if _looks_like_json(payload):
            self.refuse(
                "bad_audio_chunk",
                "JSON was sent to an audio topic; control messages go to audio/{stream}/control",
                topic=message.topic,
                stream=stream,
            )
            return
        fmt: PcmFormat | None = None
        if message.user_properties and any(
            k in message.user_properties for k in ("rate", "channels", "width")
        ):
            try:
                fmt = PcmFormat.from_properties(message.user_properties)
            except AudioFormatError as error:
                self.refuse("bad_audio_format", str(error), topic=message.topic, stream=stream)
                return
        frame_bytes = (fmt or PcmFormat()).frame_bytes
        if len(payload) % frame_bytes:
            self.refuse(
                "bad_audio_chunk",
                f"{len(payload)} bytes is not a whole number of {frame_bytes}-byte frames "
                f"({(fmt or PcmFormat()).describe()})",
                topic=message.topic,
                stream=stream,
            )
            return
        if not self.rate_ok(stream, len(payload) / (fmt or PcmFormat()).bytes_per_second, message.topic):
            return
        if not self.worker.submit(PcmChunk(stream, payload, message.received_at, message.topic, fmt)):
            self.dropped_by_stream[stream] = self.dropped_by_stream.get(stream, 0) + 1
            self.refuse(
                "queue_full", "the engine is behind; audio chunk dropped", topic=message.topic, stream=stream
            )

    def rate_ok(self, stream: str, seconds: float, topic: str) -> bool:
        """The inbound audio rate limit (audio.mqtt.max_rate_factor); refusals are reported."""
        factor = self.config.audio.mqtt.max_rate_factor
        if self._rate_limiter.allow(stream, seconds, factor):
            return True
        self.refuse(
            "rate_limited",
            f"stream sends faster than {factor:g}x real time (audio.mqtt.max_rate_factor); chunk refused",
            topic=topic,
            stream=stream,
        )
        return False

    def _on_control(self, message: InboundMessage) -> None:
        parts = AudioControl.TOPIC.match(message.topic, self.prefix)
        if parts is None or not self.check_size(message, parts["stream"]):
            return
        stream = parts["stream"]
        try:
            control = AudioControl.from_payload(message.payload)
            fmt = None
            if control.action == "start":
                fmt = PcmFormat(control.rate or 16_000, control.channels or 1, control.width or 2)
        except (PayloadError, AudioFormatError) as error:
            self.refuse("bad_payload", str(error), topic=message.topic, stream=stream)
            return
        if not self.worker.submit(StreamControlItem(stream, control.action, message.topic, fmt)):
            self.refuse(
                "queue_full",
                "the engine is behind; control message dropped",
                topic=message.topic,
                stream=stream,
            )

    def _on_detect_request(self, message: InboundMessage) -> None:
        parts = DetectRequestTopic.TOPIC_WITH_ID.match(message.topic, self.prefix)
        request_id = parts["request_id"] if parts else None
        respond = self._responder(message, request_id)
        if respond is None:
            self.refuse(
                "bad_request",
                "no way to answer: use MQTT 5 with a response topic, "
                "or publish to detect/request/{request_id}",
                topic=message.topic,
            )
            return
        if not self.check_size(message):
            respond(
                {
                    "ok": False,
                    "error": f"payload exceeds mqtt.max_payload_bytes ({self.config.mqtt.max_payload_bytes})",
                }
            )
            return

        def reply(result: dict[str, Any]) -> None:
            if not result.get("ok"):
                self.refuse("bad_wav", str(result.get("error")), topic=message.topic)
            respond(result)

        if not self.worker.submit(
            FileRequest(message.payload, f"request {request_id or message.topic}", reply)
        ):
            respond({"ok": False, "error": "the engine is busy; try again"})

    def _responder(
        self, message: InboundMessage, request_id: str | None
    ) -> Callable[[dict[str, Any]], None] | None:
        assert self.transport is not None
        transport = self.transport
        if message.response_topic:
            topic, correlation = message.response_topic, message.correlation_data
        elif request_id is not None:
            topic, correlation = self.topic(DetectResponse.TOPIC, request_id=request_id), None
        else:
            return None

        def respond(result: dict[str, Any]) -> None:
            response = DetectResponse(
                device=self.device_id,
                request_id=request_id,
                ok=bool(result.get("ok")),
                detected=bool(result.get("detected", False)),
                detections=list(result.get("detections", [])),
                duration_s=result.get("duration_s"),
                processing_ms=result.get("processing_ms"),
                error=result.get("error"),
            )
            transport.publish(topic, response.to_payload(), qos=1, correlation_data=correlation)

        return respond

    # --- local sources -----------------------------------------------------------------------
    def _source_sink(self, source: AudioSource) -> Callable[[AudioChunk], bool]:
        kind = source.describe().get("type", "local")

        def sink(chunk: AudioChunk) -> bool:
            return self.worker.submit(
                SampleChunk(chunk.stream_id, str(kind), chunk.samples, chunk.captured_at, chunk.final)
            )

        return sink

    # --- worker events (worker thread) -------------------------------------------------------
    def detected(self, found: list[Found]) -> None:
        """The detections of one engine pass, stored in the outbox together (one commit)."""
        for item in found:
            detection = item.detection
            self.detections += 1
            by_keyword = self.detections_by_keyword
            by_keyword[detection.keyword] = by_keyword.get(detection.keyword, 0) + 1
            log.info(
                "detected %s in %s: confidence %.3f, %.2f-%.2f s",
                detection.keyword,
                item.stream.id,
                detection.confidence,
                detection.start,
                detection.end,
            )
        if self.outbox is None:  # numbered in memory, from 1 at every start
            first = self.detections - len(found) + 1
            for seq, item in enumerate(found, start=first):
                self._announce(self._event(item.stream, item.detection, item.wall_end, seq), item)
            return
        stored = self.outbox.append_many(
            [(self.topic(DetectionEvent.TOPIC), self._body_maker(item)) for item in found], self.boot_id
        )
        if self.outbox.write_error is not None:
            self.refuse(
                "outbox_unwritable",
                f"cannot write the outbox {self.outbox.path} ({self.outbox.write_error}): "
                f"{self.outbox.unwritten} detection(s) held in memory, published as usual but lost "
                "if the agent stops before the file can be written",
            )
        if self.publisher is not None:
            self.publisher.notify()
        for item, event in zip(found, stored, strict=True):
            self._announce(_event_from_body(event.body), item)
        self._wait_for_delivery(stored[-1].seq)

    def _wait_for_delivery(self, seq: int) -> None:
        """Let the publisher hand this batch to MQTT before the engine goes on (bounded). After a
        wait that timed out (a broker that stopped acknowledging, a long replay ahead of them),
        the engine does not wait again for a while: it must not lose 0.1 s on every chunk."""
        if self.publisher is None or self.transport is None or not self.transport.connected:
            return
        now = time.monotonic()
        if now < self._no_delivery_wait_until:
            return
        if not self.publisher.wait_handed_over(seq, _HAND_OVER_WAIT_SECONDS):
            self._no_delivery_wait_until = now + _NO_WAIT_AFTER_TIMEOUT_SECONDS

    def _body_maker(self, found: Found) -> Callable[[int], dict[str, Any]]:
        def body(seq: int) -> dict[str, Any]:
            data = self._event(found.stream, found.detection, found.wall_end, seq).to_dict()
            data["_end_epoch"] = found.wall_end  # for delay_ms, computed when it is published
            return data

        return body

    def _announce(self, event: DetectionEvent, found: Found) -> None:
        """Tell the in-process listeners (HTTP, tests) and the integrations."""
        self._notify(event)
        for integration in self.integrations:
            try:
                integration.on_detection(event, found.stream)
            except Exception:
                log.exception("%s failed on a detection", type(integration).__name__)

    def _event(self, stream: StreamState, detection: Detection, wall_end: float, seq: int) -> DetectionEvent:
        return DetectionEvent(
            device=self.device_id,
            stream=stream.id,
            keyword=detection.keyword,
            confidence=round(float(detection.confidence), 4),
            start=round(detection.start, 3),
            end=round(detection.end, 3),
            time=iso_utc(wall_end),
            seq=seq,
            boot_id=self.boot_id,
        )

    def _notify(self, event: DetectionEvent) -> None:
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:
                log.exception("detection listener failed")

    def _detection_window(self) -> int:
        return detection_window(self.transport)

    def _publish_event(self, event: StoredEvent, replayed: bool) -> int | None:
        """Outbox publisher thread: one stored detection to MQTT, with its delay and flags."""
        assert self.transport is not None
        body = dict(event.body)
        end_epoch = body.pop("_end_epoch", None)
        if not replayed and isinstance(end_epoch, (int, float)):
            body["delay_ms"] = round((time.time() - end_epoch) * 1000.0, 1)
        body["replayed"] = replayed
        expiry = self.config.mqtt.detection_expiry if not replayed else None
        return self.transport.publish(
            event.topic,
            json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8"),
            qos=max(1, self.config.mqtt.qos),
            expiry_seconds=expiry or None,
        )

    def stream_closed(self, stream: str) -> None:
        """The worker finished a stream (end of stream or idle timeout)."""
        self._rate_limiter.forget(stream)
        for integration in self.integrations:
            try:
                integration.stream_closed(stream)
            except Exception:
                log.exception("%s failed on a closed stream", type(integration).__name__)

    def refuse(self, code: str, message: str, topic: str | None = None, stream: str | None = None) -> None:
        """Log, count and (rate-limited) publish an input the agent refused."""
        self.refused[code] = self.refused.get(code, 0) + 1
        key = (code, topic or stream)
        now = time.monotonic()
        last = self._error_times.get(key)
        if last is not None and now - last < ERROR_INTERVAL_SECONDS:
            self._error_suppressed[key] = self._error_suppressed.get(key, 0) + 1
            return
        self._error_times[key] = now
        suppressed = self._error_suppressed.pop(key, 0)
        log.warning("%s%s: %s", code, f" (stream {stream})" if stream else "", message)
        if self.transport is not None:
            report = ErrorReport(
                device=self.device_id,
                time=iso_utc(time.time()),
                code=code,
                message=message,
                topic=topic,
                stream=stream,
                suppressed=suppressed,
            )
            self.transport.publish(self.topic(ErrorReport.TOPIC), report.to_payload(), qos=1)

    # --- health --------------------------------------------------------------------------------
    def health_report(self) -> HealthReport:
        try:
            cpu = round(self._process.cpu_percent(None), 1)
            rss = round(self._process.memory_info().rss / 1e6, 1)
        except psutil.Error:
            cpu = rss = None
        streams = {}
        for stream in self.worker.streams():
            counters = stream.counters
            streams[stream.id] = {
                "kind": stream.kind,
                "audio_seconds": round(counters.audio_seconds, 2),
                "chunks": counters.chunks,
                "dropped_chunks": counters.dropped_chunks + self.dropped_by_stream.get(stream.id, 0),
                "rtf": finite_or_none(counters.rtf(), 5),
                "last_audio": iso_utc(counters.last_audio) if counters.last_audio else None,
                "level_dbfs": finite_or_none(stream.level(), 1),
                "detections": counters.detections,
                "gaps": counters.gaps,
                "gap_seconds": round(counters.gap_seconds, 1),
            }
        for source in self.sources:
            stats = source.stats()
            entry = streams.setdefault(source.stream_id, {"kind": str(source.describe().get("type"))})
            entry["dropped_chunks"] = stats.dropped_chunks
            entry["overflows"] = stats.overflows
            entry["running"] = stats.running
            if stats.error:
                entry["error"] = stats.error
        transport_stats = self.transport.stats if self.transport is not None else None
        worker = self.worker
        return HealthReport(
            device=self.device_id,
            boot_id=self.boot_id,
            time=iso_utc(time.time()),
            uptime_s=round(time.monotonic() - self._started_monotonic, 1),
            cpu_percent=cpu,
            memory_rss_mb=rss,
            temperature_c=board_temperature(),
            detections=self.detections,
            mqtt_reconnects=transport_stats.reconnects if transport_stats else 0,
            streams=streams,
            outbox_depth=self.outbox.depth() if self.outbox is not None else 0,
            outbox_dropped=self.outbox.dropped_this_run if self.outbox is not None else 0,
            outbox_unwritten=self.outbox.unwritten if self.outbox is not None else 0,
            refused=dict(self.refused),
            muted=worker.muted,
            interval_s=self.config.health.interval,
            worker={
                "alive": worker.alive,
                "queue_items": worker.queue_depth,
                "queue_bytes": worker.queued_bytes,
                "queue_high_water_bytes": worker.stats.queue_high_water,
                "refused_items": worker.stats.refused_items,
                "item_errors": worker.stats.item_errors,
                "last_error": worker.last_error,
                "streams_open": len(worker.streams()),
            },
        )

    def publish_health(self) -> None:
        if self.transport is None:
            return
        self.transport.publish(
            self.topic(HealthReport.TOPIC), self.health_report().to_payload(), qos=0, retain=True
        )

    def _health_loop(self) -> None:
        # The interval is read every time: set_config may change it.
        while not self._stop.wait(self.config.health.interval):
            try:
                if self.outbox is not None:
                    self.outbox.expire()
                self.publish_health()
            except Exception:
                log.exception("health report failed")

    # --- run-time changes ------------------------------------------------------------------------
    def call_on_worker(self, action: Callable[[], None]) -> bool:
        return self.worker.submit(CallItem(action))

    def apply_config(self, new: AgentConfig) -> list[str]:
        """Switch to ``new`` (already validated); returns the changed keys that need a restart.

        Keywords, thresholds, decoder policy, mute, health interval and input limits change at
        once, on every stream; connection, model and device settings wait for a restart.
        """
        changed = changed_keys(to_dict(self.config, include_secrets=True), to_dict(new, include_secrets=True))
        restart_required = [key for key in changed if not _is_live(key)]
        if any(key == "keywords" or key.startswith(("keywords", "engine.")) for key in changed):
            keywords = compile_config_keywords(self.model, new)  # raises before anything changes
            self.settings = decoder_settings_from(new)
            self.worker.set_keywords(keywords, self.settings)
        if new.engine.muted != self.worker.muted:
            self.worker.set_muted(new.engine.muted)
        self.worker.max_streams = new.audio.mqtt.max_streams
        self.worker.idle_timeout = new.audio.mqtt.idle_timeout
        self.config = new
        for integration in self.integrations:
            integration.config_changed(changed)
        self.worker.submit(CallItem(self.publish_state))
        return restart_required

    def reload_model(self) -> KwsModel:
        """Read the model files again (e.g. after an update) and give every stream a new detector."""
        model = KwsModel.load(
            self.model.directory,
            backend=self.config.engine.backend,
            threads=self.config.engine.threads,
            quantize=self.config.engine.quantize,
        )
        keywords = compile_config_keywords(model, self.config)
        self.worker.replace_model(model, keywords)
        self.model = model
        self.worker.submit(CallItem(self.publish_state))
        return model

    def publish_state(self) -> None:
        """Re-publish the retained description and health (after a change)."""
        if self.transport is not None and self.transport.connected:
            self.transport.publish(
                self.topic(DeviceInfo.TOPIC), self.device_info().to_payload(), qos=1, retain=True
            )
            self.publish_health()

    def request_restart(self) -> None:
        """Stop, and let the runner start the agent again (``edge-agent run`` re-executes itself)."""
        self.restart_requested = True
        if self.stop_event is not None:
            self.stop_event.set()


def _looks_like_json(payload: bytes) -> bool:
    head = payload[:1]
    if head not in (b"{", b"["):
        return False
    try:
        json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return False
    return True


def _event_from_body(body: dict[str, Any]) -> DetectionEvent:
    data = {k: v for k, v in body.items() if not k.startswith("_") and k != "schema"}
    return DetectionEvent(**data)


def default_environment() -> dict[str, str]:
    return dict(os.environ)

""":class:`AgentBackend`: the HTTP API over a running :class:`~edge_agent.agent.app.Agent`.

It reads the agent's public attributes (worker, transport, outbox, sources, counters) and adds
one detection listener to count live detections by keyword; it changes nothing in the agent.
It does not call ``Agent.health_report()``: that call also restarts the CPU-percent window of
the health messages published over MQTT, which a Prometheus scrape must not disturb.

``POST /detect`` runs on the request's thread with the agent's model and its current keywords
and decoder settings, not through the engine worker's queue: uploads then neither wait behind
live audio nor delay it, and the concurrency bound of :class:`DetectionService` protects the
live streams' CPU.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from edge_agent import __version__
from edge_agent.agent.app import Agent
from edge_agent.http.backend import DetectResult, KeywordRequest, MetricFamily, Sample
from edge_agent.http.detection import DEFAULT_MAX_CONCURRENT, DetectionService
from edge_agent.keywords import decoder_settings_from
from edge_agent.mqtt.messages import DetectionEvent

log = logging.getLogger(__name__)


class AgentBackend:
    """Create it before ``agent.start()`` so that every live detection is counted by keyword."""

    def __init__(self, agent: Agent, max_concurrent: int = DEFAULT_MAX_CONCURRENT) -> None:
        self.agent = agent
        self.service = DetectionService(
            agent.model,
            keywords=lambda: agent.worker.keywords,
            settings=lambda: decoder_settings_from(agent.config),
            max_concurrent=max_concurrent,
        )
        self._lock = threading.Lock()
        self._detections: dict[str, int] = {}
        agent.listeners.append(self._on_detection)

    def close(self) -> None:
        """Stop counting (the agent keeps running)."""
        if self._on_detection in self.agent.listeners:
            self.agent.listeners.remove(self._on_detection)

    def _on_detection(self, event: DetectionEvent) -> None:
        with self._lock:
            self._detections[event.keyword] = self._detections.get(event.keyword, 0) + 1

    # --- ApiBackend ----------------------------------------------------------------------------
    def ready(self) -> bool:
        return bool(self.agent.worker.alive)

    def status(self) -> dict[str, Any]:
        agent = self.agent
        transport = agent.transport
        body: dict[str, Any] = {
            "status": "ok",
            "model_loaded": True,
            "uptime_s": round(max(0.0, time.time() - agent.started), 1),
            "broker_connected": transport.connected if transport is not None else None,
            "mqtt_enabled": transport is not None,
            "version": __version__,
            "device": agent.device_id,
            "boot_id": agent.boot_id,
        }
        if not agent.worker.alive:
            if agent.worker.last_error:
                body["status"] = "error"
                body["error"] = f"the engine worker is not running: {agent.worker.last_error}"
            else:
                body["status"] = "starting"
                body["error"] = "the engine worker has not started yet"
        return body

    def info(self) -> dict[str, Any]:
        device = self.agent.device_info()
        return {
            "model": dict(device.model),
            "keywords": list(device.keywords),
            "version": device.version,
            "device": device.device,
            "boot_id": device.boot_id,
            "muted": device.muted,
        }

    def detect(
        self, wav: bytes, threshold: float | None, keywords: Sequence[KeywordRequest] | None
    ) -> DetectResult:
        return self.service.detect(wav, threshold, keywords)

    def metrics(self) -> list[MetricFamily]:
        agent = self.agent
        with self._lock:
            detections = dict(self._detections)
        families = [
            MetricFamily(
                "edge_agent_detections",
                "counter",
                "Keyword detections, by keyword and source (http: POST /detect; stream: live audio).",
                tuple(Sample(v, {"keyword": k, "source": "stream"}) for k, v in sorted(detections.items())),
            ),
            MetricFamily.single(
                "edge_agent_uptime_seconds",
                "gauge",
                "Seconds since the agent started.",
                time.time() - agent.started,
            ),
            *self._stream_metrics(),
            *self._mqtt_metrics(),
            *self._worker_metrics(),
            MetricFamily(
                "edge_agent_refused",
                "counter",
                "Inputs the agent refused, by reason code (as published on the error topic).",
                tuple(Sample(float(v), {"code": k}) for k, v in sorted(dict(agent.refused).items())),
            ),
        ]
        families.extend(self.service.metrics())
        return families

    def _stream_metrics(self) -> list[MetricFamily]:
        audio, rtf, chunks, dropped, level = [], [], [], [], []
        for stream in self.agent.worker.streams():
            labels = {"stream": stream.id, "kind": stream.kind}
            counters = stream.counters
            audio.append(Sample(counters.audio_seconds, labels))
            chunks.append(Sample(float(counters.chunks), labels))
            dropped.append(Sample(float(counters.dropped_chunks), {**labels, "stage": "engine"}))
            ratio = counters.rtf()
            if ratio is not None:
                rtf.append(Sample(ratio, labels))
            dbfs = stream.level()
            if dbfs is not None:
                level.append(Sample(dbfs, labels))
        overflows, running = [], []
        for source in self.agent.sources:
            stats = source.stats()
            labels = {"stream": source.stream_id, "kind": str(source.describe().get("type", "local"))}
            dropped.append(Sample(float(stats.dropped_chunks), {**labels, "stage": "source"}))
            overflows.append(Sample(float(stats.overflows), labels))
            running.append(Sample(float(stats.running), labels))
        return [
            MetricFamily(
                "edge_agent_stream_audio_seconds",
                "counter",
                "Audio processed per open stream (seconds); an MQTT stream's series ends when it closes.",
                tuple(audio),
            ),
            MetricFamily(
                "edge_agent_stream_chunks", "counter", "Audio chunks processed per stream.", tuple(chunks)
            ),
            MetricFamily(
                "edge_agent_stream_rtf",
                "gauge",
                "Real-time factor per stream: processing seconds per audio second.",
                tuple(rtf),
            ),
            MetricFamily(
                "edge_agent_stream_level_dbfs",
                "gauge",
                "Smoothed input level per stream (dBFS).",
                tuple(level),
            ),
            MetricFamily(
                "edge_agent_dropped_chunks",
                "counter",
                "Audio chunks lost, per stream and stage (source: capture buffer full or sink refused; "
                "engine: dropped by the worker).",
                tuple(dropped),
            ),
            MetricFamily(
                "edge_agent_source_overflows",
                "counter",
                "Driver overruns per local source.",
                tuple(overflows),
            ),
            MetricFamily(
                "edge_agent_source_running", "gauge", "1 while a local source produces audio.", tuple(running)
            ),
        ]

    def _mqtt_metrics(self) -> list[MetricFamily]:
        agent = self.agent
        transport = agent.transport
        stats = transport.stats if transport is not None else None
        depth: float | None = None
        dropped: float | None = None
        unwritten: float | None = None
        if agent.outbox is not None:
            try:
                depth = float(agent.outbox.depth())
                dropped = float(agent.outbox.dropped_this_run)
                unwritten = float(agent.outbox.unwritten)
            except Exception as error:  # noqa: BLE001 - a closed outbox must not break the scrape
                log.debug("outbox depth unavailable: %s", error)
        return [
            MetricFamily.single(
                "edge_agent_mqtt_enabled",
                "gauge",
                "1 when the agent uses a broker.",
                float(transport is not None),
            ),
            MetricFamily.single(
                "edge_agent_mqtt_connected",
                "gauge",
                "1 while connected to the broker.",
                float(transport.connected) if transport is not None else 0.0,
            ),
            MetricFamily.single(
                "edge_agent_mqtt_reconnects",
                "counter",
                "Reconnections to the broker.",
                stats.reconnects if stats else None,
            ),
            MetricFamily.single(
                "edge_agent_mqtt_messages_in",
                "counter",
                "MQTT messages received.",
                stats.messages_in if stats else None,
            ),
            MetricFamily.single(
                "edge_agent_mqtt_messages_out",
                "counter",
                "MQTT messages published.",
                stats.messages_out if stats else None,
            ),
            MetricFamily.single(
                "edge_agent_outbox_depth", "gauge", "Detections waiting in the outbox for the broker.", depth
            ),
            MetricFamily.single(
                "edge_agent_outbox_dropped",
                "counter",
                "Outbox events dropped (full or expired) this run.",
                dropped,
            ),
            MetricFamily.single(
                "edge_agent_outbox_unwritten",
                "gauge",
                "Detections held in memory only: the outbox file cannot be written (disk full?).",
                unwritten,
            ),
        ]

    def _worker_metrics(self) -> list[MetricFamily]:
        worker = self.agent.worker
        return [
            MetricFamily.single(
                "edge_agent_worker_alive", "gauge", "1 while the engine worker runs.", float(worker.alive)
            ),
            MetricFamily.single(
                "edge_agent_worker_queue_items",
                "gauge",
                "Items waiting for the engine worker.",
                float(worker.queue_depth),
            ),
            MetricFamily.single(
                "edge_agent_worker_queue_bytes",
                "gauge",
                "Bytes waiting for the engine worker.",
                float(worker.queued_bytes),
            ),
            MetricFamily.single(
                "edge_agent_worker_item_errors",
                "counter",
                "Work items that failed.",
                float(worker.stats.item_errors),
            ),
            MetricFamily.single(
                "edge_agent_muted", "gauge", "1 while detection is muted.", float(worker.muted)
            ),
        ]

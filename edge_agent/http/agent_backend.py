""":class:`AgentBackend`: the HTTP API over a running agent, plugged in as an integration.

It sees the agent through :class:`~edge_agent.agent.services.AgentServices` only: health
snapshots (taken without restarting the CPU-percent window of the published health reports,
which a Prometheus scrape must not disturb), connection counters, the current model, keywords
and decoder settings, and the detection feed, from which it counts live detections by keyword.

``POST /detect`` is scored by the engine worker (``AgentServices.score_recording``), a block
at a time between its passes over live streams, with the agent's current keywords and decoder
settings (or the request's own): an upload never delays a live detection by more than one
block, and its memory does not grow with its length.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from edge_agent import __version__
from edge_agent.agent.services import AgentServices, Integration
from edge_agent.http.backend import DetectResult, KeywordRequest, MetricFamily, NotReady, Sample
from edge_agent.http.detection import AUDIO_FIELD, DEFAULT_MAX_CONCURRENT, DetectionService
from edge_agent.mqtt.messages import DetectionEvent

log = logging.getLogger(__name__)


class AgentBackend(Integration):
    """Add it to the agent before ``start()`` so that every live detection is counted."""

    def __init__(self, max_concurrent: int = DEFAULT_MAX_CONCURRENT) -> None:
        self.max_concurrent = max_concurrent
        self.service: DetectionService | None = None
        self._lock = threading.Lock()
        self._detections: dict[str, int] = {}

    def attach(self, services: AgentServices) -> None:
        super().attach(services)
        self.service = DetectionService(
            lambda: services.model,
            keywords=lambda: services.keywords,
            settings=lambda: services.decoder_settings,
            max_concurrent=self.max_concurrent,
            scorer=lambda wav, keywords, settings: services.score_recording(
                wav, AUDIO_FIELD, keywords, settings
            ),
        )

    def on_detection(self, event: DetectionEvent, stream_kind: str) -> None:
        with self._lock:
            self._detections[event.keyword] = self._detections.get(event.keyword, 0) + 1

    # --- ApiBackend ----------------------------------------------------------------------------
    def ready(self) -> bool:
        return self.service is not None and self.services.engine_alive

    def status(self) -> dict[str, Any]:
        if self.service is None:
            return {"status": "starting", "model_loaded": False, "error": "the agent has not started yet"}
        services = self.services
        body: dict[str, Any] = {
            "status": "ok",
            "model_loaded": True,
            "uptime_s": round(max(0.0, time.time() - services.started), 1),
            "broker_connected": services.connected if services.mqtt_enabled else None,
            "mqtt_enabled": services.mqtt_enabled,
            "version": __version__,
            "device": services.device_id,
            "boot_id": services.boot_id,
        }
        if not services.engine_alive:
            if services.engine_error:
                body["status"] = "error"
                body["error"] = f"the engine worker is not running: {services.engine_error}"
            else:
                body["status"] = "starting"
                body["error"] = "the engine worker has not started yet"
        return body

    def info(self) -> dict[str, Any]:
        if self.service is None:
            raise NotReady("the agent has not started yet")
        device = self.services.device_info()
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
        if self.service is None:
            raise NotReady("the agent has not started yet")
        return self.service.detect(wav, threshold, keywords)

    def metrics(self) -> list[MetricFamily]:
        if self.service is None:
            return []
        services = self.services
        health = services.health()
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
                time.time() - services.started,
            ),
            *_stream_metrics(health.streams),
            *self._mqtt_metrics(health.outbox_depth, health.outbox_dropped, health.outbox_unwritten),
            *_worker_metrics(health.worker, health.muted),
            MetricFamily(
                "edge_agent_refused",
                "counter",
                "Inputs the agent refused, by reason code (as published on the error topic).",
                tuple(Sample(float(v), {"code": k}) for k, v in sorted(health.refused.items())),
            ),
        ]
        families.extend(self.service.metrics())
        return families

    def _mqtt_metrics(self, depth: int, dropped: int, unwritten: int) -> list[MetricFamily]:
        services = self.services
        stats = services.transport_stats
        enabled = stats is not None
        return [
            MetricFamily.single(
                "edge_agent_mqtt_enabled", "gauge", "1 when the agent uses a broker.", float(enabled)
            ),
            MetricFamily.single(
                "edge_agent_mqtt_connected",
                "gauge",
                "1 while connected to the broker.",
                float(services.connected),
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
                "edge_agent_outbox_depth",
                "gauge",
                "Detections waiting in the outbox for the broker.",
                float(depth) if enabled else None,
            ),
            MetricFamily.single(
                "edge_agent_outbox_dropped",
                "counter",
                "Outbox events dropped (full or expired) this run.",
                float(dropped) if enabled else None,
            ),
            MetricFamily.single(
                "edge_agent_outbox_unwritten",
                "gauge",
                "Detections held in memory only: the outbox file cannot be written (disk full?).",
                float(unwritten) if enabled else None,
            ),
        ]


def _stream_metrics(streams: dict[str, dict[str, Any]]) -> list[MetricFamily]:
    audio, rtf, chunks, dropped, level, overflows, running = [], [], [], [], [], [], []
    for stream_id, entry in sorted(streams.items()):
        labels = {"stream": stream_id, "kind": str(entry.get("kind", "local"))}
        local = "running" in entry  # a local source: it counts the chunks the agent refused
        if "audio_seconds" in entry:  # a stream the engine has open
            audio.append(Sample(float(entry["audio_seconds"]), labels))
            chunks.append(Sample(float(entry["chunks"]), labels))
            engine_dropped = 0.0 if local else float(entry.get("dropped_chunks", 0))
            dropped.append(Sample(engine_dropped, {**labels, "stage": "engine"}))
            if entry.get("rtf") is not None:
                rtf.append(Sample(float(entry["rtf"]), labels))
            if entry.get("level_dbfs") is not None:
                level.append(Sample(float(entry["level_dbfs"]), labels))
        if local:
            dropped.append(Sample(float(entry.get("dropped_chunks", 0)), {**labels, "stage": "source"}))
            overflows.append(Sample(float(entry.get("overflows", 0)), labels))
            running.append(Sample(float(entry["running"]), labels))
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
            "edge_agent_stream_level_dbfs", "gauge", "Smoothed input level per stream (dBFS).", tuple(level)
        ),
        MetricFamily(
            "edge_agent_dropped_chunks",
            "counter",
            "Audio chunks lost, per stream and stage (source: capture buffer full or sink refused; "
            "engine: refused by the agent's queue).",
            tuple(dropped),
        ),
        MetricFamily(
            "edge_agent_source_overflows", "counter", "Driver overruns per local source.", tuple(overflows)
        ),
        MetricFamily(
            "edge_agent_source_running", "gauge", "1 while a local source produces audio.", tuple(running)
        ),
    ]


def _worker_metrics(worker: dict[str, Any], muted: bool) -> list[MetricFamily]:
    return [
        MetricFamily.single(
            "edge_agent_worker_alive",
            "gauge",
            "1 while the engine worker runs.",
            float(bool(worker.get("alive"))),
        ),
        MetricFamily.single(
            "edge_agent_worker_queue_items",
            "gauge",
            "Items waiting for the engine worker.",
            float(worker.get("queue_items", 0)),
        ),
        MetricFamily.single(
            "edge_agent_worker_queue_bytes",
            "gauge",
            "Bytes waiting for the engine worker.",
            float(worker.get("queue_bytes", 0)),
        ),
        MetricFamily.single(
            "edge_agent_worker_item_errors",
            "counter",
            "Work items that failed.",
            float(worker.get("item_errors", 0)),
        ),
        MetricFamily(
            "edge_agent_engine_backlog_seconds",
            "gauge",
            "Seconds of live audio waiting, per engine worker (engine.workers): how far behind it is.",
            _per_worker(worker, "queued_seconds"),
        ),
        MetricFamily(
            "edge_agent_engine_worker_restarts",
            "counter",
            "Engine worker processes that died and were replaced, per worker.",
            _per_worker(worker, "restarts"),
        ),
        MetricFamily.single("edge_agent_muted", "gauge", "1 while detection is muted.", float(muted)),
    ]


def _per_worker(worker: dict[str, Any], field: str) -> tuple[Sample, ...]:
    """``field`` of each engine worker in health's ``worker.workers``, labelled by worker."""
    return tuple(
        Sample(float(entry.get(field, 0)), {"worker": str(entry.get("worker", 0))})
        for entry in worker.get("workers", [])
    )

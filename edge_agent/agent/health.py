"""Health: what the agent reports about itself, retained, every ``health.interval`` seconds.

:class:`HealthReporter` reads snapshots of the parts (streams, queue, outbox, refusals,
connection, local sources), never their private state, builds a
:class:`~edge_agent.mqtt.messages.HealthReport` and publishes it on a tick of its own thread.
The same tick drops outbox events older than their age bound.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence

import psutil

from edge_agent.agent.errors import ErrorReporter
from edge_agent.agent.ingest import Ingest
from edge_agent.agent.outbox import Outbox
from edge_agent.agent.sink import DetectionSink
from edge_agent.agent.worker import Engine, WorkQueue
from edge_agent.audio.sources import AudioSource
from edge_agent.mqtt.messages import HealthReport, finite_or_none, iso_utc
from edge_agent.mqtt.transport import MqttTransport
from edge_agent.system import board_temperature

log = logging.getLogger(__name__)


class HealthReporter:
    """Builds health reports from the agent's parts and publishes them on a tick."""

    def __init__(
        self,
        device_id: str,
        boot_id: str,
        *,
        worker: Engine,
        queue: WorkQueue,
        ingest: Ingest,
        sink: DetectionSink,
        errors: ErrorReporter,
        sources: Sequence[AudioSource],
        interval: Callable[[], float],
        publish: Callable[[HealthReport], None],
        outbox: Outbox | None = None,
        transport: MqttTransport | None = None,
    ) -> None:
        self.device_id = device_id
        self.boot_id = boot_id
        self.started = time.time()
        self._started_monotonic = time.monotonic()
        self._worker = worker
        self._queue = queue
        self._ingest = ingest
        self._sink = sink
        self._errors = errors
        self._sources = list(sources)
        self._interval = interval
        self._publish = publish
        self._outbox = outbox
        self._transport = transport
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # the first call only starts the measurement
        # The engine's worker processes (engine.workers > 1), by pid: the agent's CPU and memory
        # are theirs too.
        self._workers: dict[int, psutil.Process] = {}
        self._cpu_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def uptime_seconds(self) -> float:
        return time.monotonic() - self._started_monotonic

    def report(self, measure_cpu: bool = True) -> HealthReport:
        """The agent's state now. ``measure_cpu`` starts a new CPU window (the published reports
        do; an HTTP scrape between two of them must not)."""
        cpu: float | None = None
        rss: float | None = None
        processes = [self._process, *self._worker_processes()]
        try:
            if measure_cpu:
                with self._cpu_lock:
                    cpu = round(sum(_cpu_percent(process) for process in processes), 1)
            rss = round(sum(_rss(process) for process in processes) / 1e6, 1)
        except psutil.Error:
            cpu = rss = None
        worker = self._worker
        transport_stats = self._transport.stats if self._transport is not None else None
        outbox = self._outbox
        return HealthReport(
            device=self.device_id,
            boot_id=self.boot_id,
            time=iso_utc(time.time()),
            uptime_s=round(self.uptime_seconds, 1),
            cpu_percent=cpu,
            memory_rss_mb=rss,
            temperature_c=board_temperature(),
            detections=self._sink.detections,
            mqtt_reconnects=transport_stats.reconnects if transport_stats else 0,
            streams=self.streams(),
            outbox_depth=outbox.depth() if outbox is not None else 0,
            outbox_dropped=outbox.dropped_this_run if outbox is not None else 0,
            outbox_unwritten=outbox.unwritten if outbox is not None else 0,
            outbox_skipped=outbox.skipped_rows if outbox is not None else 0,
            refused=self._errors.counts(),
            muted=worker.muted,
            interval_s=self._interval(),
            worker={
                "alive": worker.alive,
                "queue_items": len(self._queue),
                "queue_bytes": self._queue.queued_bytes,
                "queue_high_water_bytes": self._queue.high_water,
                "refused_items": self._queue.refused,
                "item_errors": worker.stats.item_errors,
                "last_error": worker.last_error,
                "streams_open": len(worker.stream_ids()),
                # One entry per engine worker: how far behind it is (seconds of audio waiting).
                "workers": [dataclasses.asdict(backlog) for backlog in worker.backlog()],
            },
            detections_per_hour=worker.false_alarms.detections_per_hour(),
            near_miss=worker.false_alarms.near_misses(),
        )

    def _worker_processes(self) -> list[psutil.Process]:
        """The engine's worker processes now (a restarted one replaces the one that died)."""
        own = self._process.pid
        pids = {backlog.pid for backlog in self._worker.backlog() if backlog.pid and backlog.pid != own}
        with self._cpu_lock:
            for pid in set(self._workers) - pids:
                del self._workers[pid]
            for pid in pids - set(self._workers):
                try:
                    self._workers[pid] = psutil.Process(pid)
                    self._workers[pid].cpu_percent(None)  # starts its measurement
                except psutil.Error:
                    continue
            return list(self._workers.values())

    def streams(self) -> dict[str, dict[str, object]]:
        """Every open stream's counters, and every local source's."""
        streams: dict[str, dict[str, object]] = {}
        for stream in self._worker.snapshots():
            streams[stream.id] = {
                "kind": stream.kind,
                "audio_seconds": round(stream.audio_seconds, 2),
                "chunks": stream.chunks,
                "dropped_chunks": self._ingest.dropped(stream.id),
                "rtf": finite_or_none(stream.rtf, 5),
                "last_audio": iso_utc(stream.last_audio) if stream.last_audio else None,
                "level_dbfs": finite_or_none(stream.level_dbfs, 1),
                "detections": stream.detections,
                "gaps": stream.gaps,
                "gap_seconds": round(stream.gap_seconds, 1),
            }
        for source in self._sources:
            stats = source.stats()
            entry = streams.setdefault(source.stream_id, {"kind": str(source.describe().get("type"))})
            entry["dropped_chunks"] = stats.dropped_chunks
            entry["overflows"] = stats.overflows
            entry["running"] = stats.running
            if stats.error:
                entry["error"] = stats.error
        return streams

    def publish(self) -> None:
        self._publish(self.report())

    # --- the tick ----------------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="health", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None

    def _run(self) -> None:
        # The interval is read every time: set_config may change it.
        while not self._stop.wait(self._interval()):
            try:
                if self._outbox is not None:
                    self._outbox.expire()
                self.publish()
            except Exception:
                log.exception("health report failed")


def _cpu_percent(process: psutil.Process) -> float:
    """Since the last call (0 for a process that ended meanwhile: its time went with it)."""
    try:
        return float(process.cpu_percent(None))
    except psutil.NoSuchProcess:
        return 0.0


def _rss(process: psutil.Process) -> int:
    try:
        return int(process.memory_info().rss)
    except psutil.NoSuchProcess:
        return 0

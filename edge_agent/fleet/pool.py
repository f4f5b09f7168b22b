"""Server mode: several agents share the streams of many thin devices through the broker.

An MQTT shared subscription (``$share/{group}/...``) hands each message to one member of the
group, round-robin, per *message*: subscribing every worker to the audio topics that way would
scatter one stream's chunks over all workers and wreck each detector's state. So only the
*start* of a stream goes through the shared subscription; the worker that receives it claims
the stream and subscribes, alone, to that stream's audio until the stream ends:

1. the device publishes ``{"action": "start", ...}`` to ``{prefix}/pool/{pool}/start/{stream}``
   (MQTT 5: with a response topic; it gets ``{"worker": ..., "audio_topic": ...}`` back);
2. one worker (the broker picks) subscribes to ``{prefix}/pool/{pool}/audio/{stream}`` and its
   ``/control``, and publishes a retained claim ``{prefix}/pool/{pool}/claims/{stream}``;
3. the device streams to the audio topic (after the answer, or once the claim appears, so that
   no chunk precedes the subscription), and ends with ``{"action": "end"}`` on ``.../control``;
4. the worker finishes the stream, unsubscribes and clears the claim (also after the idle
   timeout).

Detections are published by the worker under its own device id (``{prefix}/{worker}/detection``,
field ``stream``): subscribe to ``{prefix}/+/detection``. When a worker dies, its streams have
no subscriber: the broker drops their audio until the device starts them again (its claim names
the worker, whose retained availability turns ``offline`` through its last will). See
docs/scale-out.md.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from edge_agent.agent.items import StreamStart
from edge_agent.agent.mqtt_inbound import Refused, pcm_chunk, stream_control
from edge_agent.agent.services import AgentServices, Integration
from edge_agent.audio.pcm import AudioFormatError, PcmFormat
from edge_agent.mqtt.messages import AudioControl, PayloadError, Topic, iso_utc
from edge_agent.mqtt.transport import InboundMessage

log = logging.getLogger(__name__)

# The pool's streams are a kind of their own: their ids and their limit are not those of the
# agent's own audio topics.
POOL_KIND = "pool"


class PoolTopics:
    """The pool's topics; ``pool`` is ``pool.name``."""

    START = Topic("{prefix}/pool/{pool}/start/{stream}")
    AUDIO = Topic("{prefix}/pool/{pool}/audio/{stream}")
    CONTROL = Topic("{prefix}/pool/{pool}/audio/{stream}/control")
    CLAIM = Topic("{prefix}/pool/{pool}/claims/{stream}")

    @staticmethod
    def shared_start(prefix: str, pool: str) -> str:
        # The share group is the pool name: every agent of the pool is one member.
        return f"$share/{pool}/{PoolTopics.START.filter(prefix=prefix, pool=pool)}"


class PoolWorker(Integration):
    """One member of a pool: claims streams handed to it and serves them until they end."""

    def __init__(self, pool: str) -> None:
        self.pool = pool
        self._owned: dict[str, float] = {}  # stream -> time claimed
        self._lock = threading.Lock()

    def attach(self, services: AgentServices) -> None:
        super().attach(services)
        services.subscribe(PoolTopics.shared_start(services.prefix, self.pool), self._on_start, qos=1)

    def on_connected(self) -> None:
        # The broker forgot our subscriptions if it restarted: the transport restores the shared
        # one; the per-stream ones are restored by the transport too (it remembers all filters).
        with self._lock:
            owned = list(self._owned)
        for stream in owned:
            self._publish_claim(stream)

    @property
    def owned_streams(self) -> list[str]:
        with self._lock:
            return sorted(self._owned)

    # --- network thread ----------------------------------------------------------------------------
    def _topic(self, template: Topic, stream: str) -> str:
        return template.format(prefix=self.services.prefix, pool=self.pool, stream=stream)

    def _on_start(self, message: InboundMessage) -> None:
        services = self.services
        parts = PoolTopics.START.match(message.topic, services.prefix)
        if parts is None or parts["pool"] != self.pool:
            return
        stream = parts["stream"]
        try:
            control = AudioControl.from_payload(message.payload) if message.payload.strip() else None
            if control is not None and control.action != "start":
                raise PayloadError(f"expected action 'start' on {message.topic}, got {control.action!r}")
            fmt = PcmFormat(
                (control and control.rate) or 16_000,
                (control and control.channels) or 1,
                (control and control.width) or 2,
            )
        except (PayloadError, AudioFormatError) as error:
            services.report_error("bad_payload", str(error), topic=message.topic, stream=stream)
            self._reply(message, {"ok": False, "stream": stream, "error": str(error)})
            return
        services.ingest(StreamStart(stream, POOL_KIND, fmt, message.topic))
        with self._lock:
            self._owned[stream] = time.time()
        services.subscribe(self._topic(PoolTopics.AUDIO, stream), self._on_audio)
        services.subscribe(self._topic(PoolTopics.CONTROL, stream), self._on_control, qos=1)
        self._publish_claim(stream)
        log.info("pool %s: claimed stream %s", self.pool, stream)
        self._reply(
            message,
            {
                "ok": True,
                "stream": stream,
                "worker": services.device_id,
                "audio_topic": self._topic(PoolTopics.AUDIO, stream),
            },
        )

    def _on_audio(self, message: InboundMessage) -> None:
        parts = PoolTopics.AUDIO.match(message.topic, self.services.prefix)
        if parts is None:
            return
        stream = parts["stream"]
        try:
            chunk = pcm_chunk(message, stream, POOL_KIND, self.services.config.mqtt.max_payload_bytes)
        except Refused as refused:
            self.services.report_error(refused.code, refused.message, topic=message.topic, stream=stream)
            return
        self.services.ingest(chunk)

    def _on_control(self, message: InboundMessage) -> None:
        parts = PoolTopics.CONTROL.match(message.topic, self.services.prefix)
        if parts is None:
            return
        stream = parts["stream"]
        try:
            control = stream_control(message, stream, POOL_KIND)
        except Refused as refused:
            self.services.report_error(refused.code, refused.message, topic=message.topic, stream=stream)
            return
        self.services.ingest(control)

    def _publish_claim(self, stream: str) -> None:
        services = self.services
        claim = {
            "schema": 1,
            "worker": services.device_id,
            "boot_id": services.boot_id,
            "since": iso_utc(time.time()),
        }
        services.publish(
            self._topic(PoolTopics.CLAIM, stream), json.dumps(claim).encode(), qos=1, retain=True
        )

    def _reply(self, message: InboundMessage, body: dict[str, Any]) -> None:
        if message.response_topic:
            refusal = self.services.response_topic_refusal(message.response_topic)
            if refusal is not None:
                self.services.report_error("bad_request", f"{refusal}: not answered", topic=message.topic)
                return
            self.services.publish(
                message.response_topic,
                json.dumps({"schema": 1, **body}, ensure_ascii=False).encode(),
                qos=1,
                correlation_data=message.correlation_data,
            )

    # --- detection sink's thread ------------------------------------------------------------------
    def stream_closed(self, stream: str, stream_kind: str) -> None:
        if stream_kind != POOL_KIND:
            return
        with self._lock:
            if self._owned.pop(stream, None) is None:
                return
        services = self.services
        services.unsubscribe(self._topic(PoolTopics.AUDIO, stream))
        services.unsubscribe(self._topic(PoolTopics.CONTROL, stream))
        services.publish(self._topic(PoolTopics.CLAIM, stream), b"", qos=1, retain=True)  # clears the claim
        log.info("pool %s: released stream %s", self.pool, stream)

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

from edge_agent.agent.app import Integration, iso_utc
from edge_agent.audio.pcm import AudioFormatError, PcmFormat
from edge_agent.mqtt.messages import AudioControl, PayloadError, Topic
from edge_agent.mqtt.transport import InboundMessage

log = logging.getLogger(__name__)


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

    def attach(self, agent: Any) -> None:
        super().attach(agent)
        agent.transport.subscribe(PoolTopics.shared_start(agent.prefix, self.pool), self._on_start, qos=1)

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
        return template.format(prefix=self.agent.prefix, pool=self.pool, stream=stream)

    def _on_start(self, message: InboundMessage) -> None:
        agent = self.agent
        parts = PoolTopics.START.match(message.topic, agent.prefix)
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
            agent.refuse("bad_payload", str(error), topic=message.topic, stream=stream)
            self._reply(message, {"ok": False, "stream": stream, "error": str(error)})
            return
        from edge_agent.agent.worker import StreamControlItem

        if not agent.worker.submit(StreamControlItem(stream, "start", message.topic, fmt)):
            agent.refuse(
                "queue_full", "the engine is behind; stream not claimed", topic=message.topic, stream=stream
            )
            self._reply(message, {"ok": False, "stream": stream, "error": "worker busy; start again"})
            return
        with self._lock:
            self._owned[stream] = time.time()
        agent.transport.subscribe(self._topic(PoolTopics.AUDIO, stream), self._on_audio)
        agent.transport.subscribe(self._topic(PoolTopics.CONTROL, stream), self._on_control, qos=1)
        self._publish_claim(stream)
        log.info("pool %s: claimed stream %s", self.pool, stream)
        self._reply(
            message,
            {
                "ok": True,
                "stream": stream,
                "worker": agent.device_id,
                "audio_topic": self._topic(PoolTopics.AUDIO, stream),
            },
        )

    def _on_audio(self, message: InboundMessage) -> None:
        parts = PoolTopics.AUDIO.match(message.topic, self.agent.prefix)
        if parts is not None:
            self.agent.handle_audio(message, parts["stream"])

    def _on_control(self, message: InboundMessage) -> None:
        parts = PoolTopics.CONTROL.match(message.topic, self.agent.prefix)
        if parts is None:
            return
        try:
            control = AudioControl.from_payload(message.payload)
        except PayloadError as error:
            self.agent.refuse("bad_payload", str(error), topic=message.topic, stream=parts["stream"])
            return
        from edge_agent.agent.worker import StreamControlItem

        self.agent.worker.submit(StreamControlItem(parts["stream"], control.action, message.topic))

    def _publish_claim(self, stream: str) -> None:
        agent = self.agent
        claim = {
            "schema": 1,
            "worker": agent.device_id,
            "boot_id": agent.boot_id,
            "since": iso_utc(time.time()),
        }
        agent.transport.publish(
            self._topic(PoolTopics.CLAIM, stream), json.dumps(claim).encode(), qos=1, retain=True
        )

    def _reply(self, message: InboundMessage, body: dict[str, Any]) -> None:
        if message.response_topic:
            self.agent.transport.publish(
                message.response_topic,
                json.dumps({"schema": 1, **body}, ensure_ascii=False).encode(),
                qos=1,
                correlation_data=message.correlation_data,
            )

    # --- worker thread -------------------------------------------------------------------------------
    def stream_closed(self, stream: str) -> None:
        with self._lock:
            if self._owned.pop(stream, None) is None:
                return
        transport = self.agent.transport
        transport.unsubscribe(self._topic(PoolTopics.AUDIO, stream))
        transport.unsubscribe(self._topic(PoolTopics.CONTROL, stream))
        transport.publish(self._topic(PoolTopics.CLAIM, stream), b"", qos=1, retain=True)  # clears the claim
        log.info("pool %s: released stream %s", self.pool, stream)

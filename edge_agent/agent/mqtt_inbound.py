"""The agent's own MQTT inputs: audio streams, their controls, whole-file requests.

Handlers run on the MQTT network thread: they check a message cheaply (size, framing, declared
format), turn it into an audio item or a recording request, and queue it; they never convert
audio, never infer and never wait for a publish. Every refusal is reported with its code. The
checks are plain functions (:func:`pcm_chunk`, :func:`stream_control`), shared with the
scale-out pool, whose audio arrives on its own topics.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from edge_agent.agent.errors import ErrorReporter
from edge_agent.agent.ingest import Ingest
from edge_agent.agent.items import PcmChunk, RecordingRequest, StreamEnd, StreamStart
from edge_agent.agent.live_config import LiveConfig
from edge_agent.agent.worker import WorkQueue
from edge_agent.audio.pcm import DEFAULT_PCM, AudioFormatError, PcmFormat
from edge_agent.audio.wav import WavError
from edge_agent.mqtt import messages
from edge_agent.mqtt.messages import (
    AudioControl,
    AudioTopic,
    DetectRequestTopic,
    DetectResponse,
    PayloadError,
)
from edge_agent.mqtt.transport import InboundMessage, MqttTransport
from edge_agent.recording import RecordingBusy, RecordingResult

log = logging.getLogger(__name__)

MQTT_KIND = "mqtt"
# Longest chunk of a live stream (seconds; at the fewest bytes per second a format allows when
# the chunk does not declare its own): streams send fractions of a second.
MAX_CHUNK_SECONDS = 30.0


class Refused(Exception):
    """An inbound message the agent refuses: ``code`` for the error topic, and why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def check_size(message: InboundMessage, limit: int) -> None:
    if len(message.payload) > limit:
        raise Refused(
            "payload_too_large",
            f"payload of {len(message.payload)} bytes exceeds mqtt.max_payload_bytes ({limit})",
        )


def pcm_chunk(message: InboundMessage, stream: str, kind: str, max_payload_bytes: int) -> PcmChunk:
    """One raw PCM chunk of ``stream`` as an audio item, or :class:`Refused` saying why not."""
    check_size(message, max_payload_bytes)
    payload = message.payload
    if not payload:
        raise Refused("bad_audio_chunk", "empty audio payload")
    if payload[:4] == b"RIFF":
        raise Refused(
            "bad_audio_chunk",
            "a WAV file was sent to a raw PCM topic: send raw samples, or the whole file to detect/request",
        )
    if _looks_like_json(payload):
        raise Refused(
            "bad_audio_chunk",
            "JSON was sent to an audio topic; control messages go to audio/{stream}/control",
        )
    fmt: PcmFormat | None = None
    if message.user_properties and any(k in message.user_properties for k in ("rate", "channels", "width")):
        try:
            fmt = PcmFormat.from_properties(message.user_properties)
        except AudioFormatError as error:
            raise Refused("bad_audio_format", str(error)) from None
    frame_bytes = (fmt or DEFAULT_PCM).frame_bytes
    if len(payload) % frame_bytes:
        raise Refused(
            "bad_audio_chunk",
            f"{len(payload)} bytes is not a whole number of {frame_bytes}-byte frames "
            f"({(fmt or DEFAULT_PCM).describe()})",
        )
    chunk = PcmChunk(stream, kind, payload, fmt, message.received_at, message.topic)
    if chunk.longest_seconds > MAX_CHUNK_SECONDS:
        raise Refused(
            "bad_audio_chunk",
            f"a chunk of {len(payload)} bytes may hold up to {chunk.longest_seconds:.0f} s of audio; live "
            f"streams send chunks of at most {MAX_CHUNK_SECONDS:g} s (whole files go to detect/request)",
        )
    return chunk


def stream_control(message: InboundMessage, stream: str, kind: str) -> StreamStart | StreamEnd:
    """An ``AudioControl`` message as a stream start (with its format) or end."""
    try:
        control = AudioControl.from_payload(message.payload)
        if control.action == "end":
            return StreamEnd(stream, kind, message.topic)
        fmt = PcmFormat(control.rate or 16_000, control.channels or 1, control.width or 2)
    except (PayloadError, AudioFormatError) as error:
        raise Refused("bad_payload", str(error)) from None
    return StreamStart(stream, kind, fmt, message.topic)


def response_topic_refusal(topic: str, prefix: str, transport: MqttTransport | None) -> str | None:
    """Why an answer must not be published to ``topic``: in the fleet's command space, or
    coming back to the agent's own subscriptions (it would act on its own answer)."""
    refusal = messages.response_topic_refusal(topic, prefix)
    if refusal is None and transport is not None and transport.delivers_to_self(topic):
        refusal = f"response topic {topic!r} is one this agent listens to"
    return refusal


def _looks_like_json(payload: bytes) -> bool:
    if payload[:1] not in (b"{", b"["):
        return False
    try:
        json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return False
    return True


class MqttInbound:
    """Subscribes to the agent's audio, control and request topics and queues what arrives."""

    def __init__(
        self,
        device_id: str,
        transport: MqttTransport,
        live: LiveConfig,
        ingest: Ingest,
        requests: WorkQueue,
        errors: ErrorReporter,
    ) -> None:
        self._device_id = device_id
        self._transport = transport
        self._live = live
        self._ingest = ingest
        self._requests = requests
        self._errors = errors
        self._prefix = live.config.mqtt.topic_prefix
        # The audio topics' common start: a stream's id is what follows (no regex per chunk).
        audio_filter = AudioTopic.TOPIC.filter(prefix=self._prefix, device=device_id)
        self._audio_topic_start = audio_filter.removesuffix("+")

    def subscribe(self) -> None:
        prefix, device = self._prefix, self._device_id
        if self._live.config.audio.mqtt.enabled:
            self._transport.subscribe(AudioTopic.TOPIC.filter(prefix=prefix, device=device), self.on_audio)
            self._transport.subscribe(
                AudioControl.TOPIC.filter(prefix=prefix, device=device), self.on_control
            )
        self._transport.subscribe(
            DetectRequestTopic.TOPIC.format(prefix=prefix, device=device), self.on_detect_request, qos=1
        )
        self._transport.subscribe(
            DetectRequestTopic.TOPIC_WITH_ID.filter(prefix=prefix, device=device),
            self.on_detect_request,
            qos=1,
        )

    # --- network thread ----------------------------------------------------------------------
    def on_audio(self, message: InboundMessage) -> None:
        topic, start = message.topic, self._audio_topic_start
        stream = topic[len(start) :] if topic.startswith(start) else ""
        if not stream or "/" in stream or "+" in stream or "#" in stream:
            parts = AudioTopic.TOPIC.match(topic, self._prefix)
            if parts is None:
                return
            stream = parts["stream"]
        try:
            chunk = pcm_chunk(message, stream, MQTT_KIND, self._live.config.mqtt.max_payload_bytes)
        except Refused as refused:
            self._errors.report(refused.code, refused.message, topic=message.topic, stream=stream)
            return
        self._ingest.submit(chunk)

    def on_control(self, message: InboundMessage) -> None:
        parts = AudioControl.TOPIC.match(message.topic, self._prefix)
        if parts is None:
            return
        stream = parts["stream"]
        try:
            check_size(message, self._live.config.mqtt.max_payload_bytes)
            control = stream_control(message, stream, MQTT_KIND)
        except Refused as refused:
            self._errors.report(refused.code, refused.message, topic=message.topic, stream=stream)
            return
        self._ingest.submit(control)

    def on_detect_request(self, message: InboundMessage) -> None:
        if message.response_topic:
            refusal = response_topic_refusal(message.response_topic, self._prefix, self._transport)
            if refusal is not None:
                self._errors.report("bad_request", f"{refusal}: request refused", topic=message.topic)
                return
        parts = DetectRequestTopic.TOPIC_WITH_ID.match(message.topic, self._prefix)
        request_id = parts["request_id"] if parts else None
        respond = self._responder(message, request_id)
        if respond is None:
            self._errors.report(
                "bad_request",
                "no way to answer: use MQTT 5 with a response topic, "
                "or publish to detect/request/{request_id}",
                topic=message.topic,
            )
            return
        limit = self._live.config.mqtt.max_payload_bytes
        if len(message.payload) > limit:
            respond(
                DetectResponse(
                    self._device_id,
                    request_id,
                    ok=False,
                    error=f"payload exceeds mqtt.max_payload_bytes ({limit})",
                )
            )
            return

        def reply(result: RecordingResult | WavError) -> None:
            if isinstance(result, WavError):
                code = "busy" if isinstance(result, RecordingBusy) else "bad_wav"
                self._errors.report(code, str(result), topic=message.topic)
                respond(DetectResponse(self._device_id, request_id, ok=False, error=str(result)))
                return
            respond(
                DetectResponse(
                    device=self._device_id,
                    request_id=request_id,
                    ok=True,
                    detected=bool(result.detections),
                    detections=result.detection_dicts(),
                    duration_s=round(result.audio_seconds, 3),
                    processing_ms=round(result.processing_seconds * 1000, 2),
                )
            )

        source = f"request {request_id or message.topic}"
        if not self._requests.put(RecordingRequest(message.payload, source, reply)):
            respond(
                DetectResponse(self._device_id, request_id, ok=False, error="the engine is busy; try again")
            )

    def _responder(
        self, message: InboundMessage, request_id: str | None
    ) -> Callable[[DetectResponse], None] | None:
        if message.response_topic:
            topic, correlation = message.response_topic, message.correlation_data
        elif request_id is not None:
            topic = DetectResponse.TOPIC.format(
                prefix=self._prefix, device=self._device_id, request_id=request_id
            )
            correlation = None
        else:
            return None
        transport = self._transport

        def respond(response: DetectResponse) -> None:
            transport.publish(topic, response.to_payload(), qos=1, correlation_data=correlation)

        return respond

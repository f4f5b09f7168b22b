"""Rhasspy Hermes compatibility: the agent as a drop-in Rhasspy wake-word service.

* Audio in: ``hermes/audioServer/{siteId}/audioFrame`` (every site, or the sites listed in
  ``hermes.site_ids``). Every frame is a complete WAV file; its header is parsed every time, so
  a satellite may change format. Each site is its own stream ``hermes-{siteId}`` with its own
  detector and state (rhasspy#209: one shared buffer mixed the satellites' audio up).
* Detections on a hermes stream: ``hermes/hotword/{hermes.wakeword_id}/detected`` with the
  fields Rhasspy's dialogue manager reads, at QoS 0, not retained, the moment the detector
  fires. Every detection also goes to the agent's own ``detection`` topic, as any other stream.
* ``hermes/hotword/toggleOff`` / ``toggleOn`` ``{siteId, reason}``: **per site**. Each site keeps
  a set of disable reasons and listens only while it is empty; a toggleOn with reason ``""``
  clears the set. Frames of a disabled site are dropped, not buffered. Rhasspy's own wake
  services keep a single flag for all their sites, so a dialogue on one satellite deafens the
  others; here it does not.
* ``rhasspy/hotword/getHotwords`` is answered on ``rhasspy/hotword/hotwords``.
* A frame whose header cannot be read: ``hermes/error/hotword`` (at most once a second per site)
  and the agent's ``error`` topic (``bad_wav``), counted in health; the agent keeps serving. A
  frame whose samples turn out bad when decoded (NaN floats) is reported on ``error`` only.

Threads: frames, toggles and requests arrive on the network thread and are only checked (the
WAV header is read, not decoded) and queued; the engine worker decodes and converts each site's
frames (a resampler only for sites not sending 16 kHz); detections arrive on the detection
sink's thread. A site that stops sending is a stream that went quiet: the worker finishes it
after ``audio.mqtt.idle_timeout`` like any network stream.

Health shows every site's stream (``hermes-{siteId}``: audio seconds, rtf, level, detections)
like any other stream. The bridge's own per-site state (disable reasons, frames dropped while
disabled, bad frames) is not in health yet: the agent has no hook for integrations to add to it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from edge_agent.agent.items import StreamEnd, WavChunk
from edge_agent.agent.services import AgentServices, Integration
from edge_agent.audio.wav import WavError, wav_info
from edge_agent.mqtt.hermes_messages import (
    DEFAULT_SITE_ID,
    AudioFrame,
    GetHotwords,
    Hotword,
    HotwordDetected,
    HotwordError,
    Hotwords,
    HotwordToggleOff,
    HotwordToggleOn,
    valid_site_id,
)
from edge_agent.mqtt.messages import DetectionEvent, PayloadError
from edge_agent.mqtt.transport import InboundMessage

log = logging.getLogger(__name__)

STREAM_KIND = "hermes"
STREAM_PREFIX = "hermes-"
# hermes/error/hotword is published at most this often per site (seconds); the rest are counted.
ERROR_INTERVAL_SECONDS = 1.0
# Sites remembered beyond the stream limit (for their toggles) at most.
MAX_TOGGLE_ONLY_SITES = 1024


def stream_id(site_id: str) -> str:
    return f"{STREAM_PREFIX}{site_id}"


@dataclass
class _Site:
    """What the bridge knows about one site; guarded by ``HermesBridge._lock``."""

    id: str
    disabled_reasons: set[str] = field(default_factory=set)
    frames: int = 0
    dropped_disabled: int = 0
    errors: int = 0

    @property
    def enabled(self) -> bool:
        return not self.disabled_reasons


class HermesBridge(Integration):
    """Speaks Rhasspy's wake-word side of Hermes for every (or every configured) site."""

    def __init__(self) -> None:
        self._sites: dict[str, _Site] = {}
        self._lock = threading.Lock()
        self._error_lock = threading.Lock()
        self._error_times: dict[str, float] = {}
        self._errors_suppressed: dict[str, int] = {}
        self.published = 0

    # --- wiring --------------------------------------------------------------------------------
    def attach(self, services: AgentServices) -> None:
        super().attach(services)
        if not services.mqtt_enabled:
            raise RuntimeError("the Hermes bridge needs MQTT")
        config = services.config.hermes
        self.wakeword_id = config.wakeword_id
        self.site_ids = frozenset(config.site_ids)
        if config.site_ids:
            for site in config.site_ids:
                services.subscribe(AudioFrame.TOPIC.format(site_id=site), self._on_audio_frame)
        else:
            services.subscribe(AudioFrame.TOPIC.filter(), self._on_audio_frame)
        services.subscribe(HotwordToggleOff.TOPIC.format(), self._on_toggle_off)
        services.subscribe(HotwordToggleOn.TOPIC.format(), self._on_toggle_on)
        services.subscribe(GetHotwords.TOPIC.format(), self._on_get_hotwords)
        log.info(
            "Hermes bridge: wake word id %s, sites %s",
            self.wakeword_id,
            ", ".join(sorted(self.site_ids)) if self.site_ids else "all",
        )

    # --- per-site state (not in health yet: see the module docstring) ---------------------------
    def site_enabled(self, site_id: str) -> bool:
        with self._lock:
            site = self._sites.get(site_id)
            return site is None or site.enabled

    def disabled_reasons(self, site_id: str) -> set[str]:
        with self._lock:
            site = self._sites.get(site_id)
            return set(site.disabled_reasons) if site is not None else set()

    def accepts(self, site_id: str) -> bool:
        return not self.site_ids or site_id in self.site_ids

    # --- audio (network thread) -------------------------------------------------------------
    def _on_audio_frame(self, message: InboundMessage) -> None:
        parts = AudioFrame.TOPIC.match(message.topic)
        if parts is None:
            return
        site_id = parts["site_id"]
        if not self.accepts(site_id):
            return
        services = self.services
        stream = stream_id(site_id)
        limit = services.config.mqtt.max_payload_bytes
        with self._lock:
            site = self._site(site_id, message.topic)
            if site is None:
                return
            if len(message.payload) > limit:
                error = (
                    f"audio frame of {len(message.payload)} bytes exceeds mqtt.max_payload_bytes ({limit})"
                )
                services.report_error("payload_too_large", error, topic=message.topic, stream=stream)
                self._hermes_error(site_id, error, message.topic)
                return
            if not site.enabled:
                # Rhasspy drops audio while disabled; nothing is buffered for later.
                site.dropped_disabled += 1
                return
            try:
                info = wav_info(message.payload, source=f"Hermes audio frame from site {site_id}")
            except WavError as error:
                site.errors += 1
                self._refuse_frame(site_id, stream, str(error), message.topic)
                return
            chunk = WavChunk(
                stream,
                STREAM_KIND,
                message.payload,
                info.duration_seconds,
                message.received_at or time.time(),
                message.topic,
            )
            if not services.ingest(chunk):
                return  # refused (rate limit, queue full): counted and reported
            site.frames += 1
            if site.frames == 1:
                log.info("Hermes site %s: first audio frame (%d Hz)", site_id, info.sample_rate)

    def _site(self, site_id: str, topic: str) -> _Site | None:
        """The site's state, created on first sight (lock held); boundedly many."""
        site = self._sites.get(site_id)
        if site is not None:
            return site
        if len(self._sites) >= MAX_TOGGLE_ONLY_SITES + self.services.config.audio.mqtt.max_streams:
            self.services.report_error(
                "too_many_streams", f"too many Hermes sites; {site_id!r} ignored", topic=topic
            )
            return None
        site = self._sites[site_id] = _Site(site_id)
        return site

    def _refuse_frame(self, site_id: str, stream: str, error: str, topic: str) -> None:
        self.services.report_error("bad_wav", error, topic=topic, stream=stream)
        self._hermes_error(site_id, error, topic)

    def _hermes_error(self, site_id: str, error: str, context: str) -> None:
        """``hermes/error/hotword``, at most once per ERROR_INTERVAL_SECONDS per site; the agent's
        own ``error`` topic (through ``refuse``) counts every one."""
        with self._error_lock:
            now = time.monotonic()
            last = self._error_times.get(site_id)
            if last is not None and now - last < ERROR_INTERVAL_SECONDS:
                self._errors_suppressed[site_id] = self._errors_suppressed.get(site_id, 0) + 1
                return
            if len(self._error_times) > MAX_TOGGLE_ONLY_SITES:
                self._error_times.clear()
            self._error_times[site_id] = now
            suppressed = self._errors_suppressed.pop(site_id, 0)
        if suppressed:
            error = f"{error} (and {suppressed} errors not reported in the last second)"
        self._publish(
            HotwordError.TOPIC.format(), HotwordError(error=error, site_id=site_id, context=context)
        )

    # --- toggles and requests (network thread) -----------------------------------------------
    def _on_toggle_off(self, message: InboundMessage) -> None:
        toggle = self._parse_toggle(message, HotwordToggleOff)
        if toggle is None:
            return
        with self._lock:
            site = self._site(toggle.site_id, message.topic)
            if site is None:
                return
            was_enabled = site.enabled
            site.disabled_reasons.add(toggle.reason)
            if was_enabled:
                # Score what was already queued, then start afresh: after toggleOn the detector
                # must not join old audio to new, nor report the pause as lost audio. (The worker
                # ignores the end of a stream it does not have.)
                self.services.ingest(StreamEnd(stream_id(site.id), STREAM_KIND, message.topic))
        log.info(
            "Hermes site %s: wake word off (%s); disabled for %s",
            toggle.site_id,
            toggle.reason or "no reason given",
            sorted(site.disabled_reasons),
        )

    def _on_toggle_on(self, message: InboundMessage) -> None:
        toggle = self._parse_toggle(message, HotwordToggleOn)
        if toggle is None:
            return
        with self._lock:
            site = self._sites.get(toggle.site_id)
            if site is None:
                return  # never disabled: already on
            if toggle.reason == "":
                site.disabled_reasons.clear()  # "unknown" overrides every other reason (Rhasspy)
            else:
                site.disabled_reasons.discard(toggle.reason)
            reasons = sorted(site.disabled_reasons)
        if reasons:
            log.info("Hermes site %s: still disabled for %s", toggle.site_id, reasons)
        else:
            log.info("Hermes site %s: wake word on", toggle.site_id)

    def _parse_toggle(
        self, message: InboundMessage, cls: type[HotwordToggleOn] | type[HotwordToggleOff]
    ) -> HotwordToggleOn | HotwordToggleOff | None:
        if message.retain:
            # A retained toggle would switch a site again at every reconnect (ghost switching).
            log.warning("ignored a retained %s: clear it with an empty retained message", message.topic)
            return None
        try:
            toggle = cls.from_payload(message.payload)
        except PayloadError as error:
            self.services.report_error("bad_payload", str(error), topic=message.topic)
            return None
        if not valid_site_id(toggle.site_id):
            self.services.report_error(
                "bad_payload", f"{toggle.site_id!r} cannot be a site id", topic=message.topic
            )
            return None
        if not self.accepts(toggle.site_id):
            return None
        return toggle

    def _on_get_hotwords(self, message: InboundMessage) -> None:
        if message.retain:
            return
        try:
            request = GetHotwords.from_payload(message.payload) if message.payload.strip() else GetHotwords()
        except PayloadError as error:
            self.services.report_error("bad_payload", str(error), topic=message.topic)
            self._hermes_error(DEFAULT_SITE_ID, str(error), message.topic)
            return
        if not self.accepts(request.site_id):
            return
        models = [Hotword(model_id=k.text, model_words=k.text) for k in self.services.keywords]
        self._publish(
            Hotwords.TOPIC.format(), Hotwords(models=models, site_id=request.site_id, id=request.id)
        )

    # --- detections (detection sink's thread) ------------------------------------------------
    def on_detection(self, event: DetectionEvent, stream_kind: str) -> None:
        if stream_kind != STREAM_KIND or not event.stream.startswith(STREAM_PREFIX):
            return
        site_id = event.stream[len(STREAM_PREFIX) :]
        if not self.site_enabled(site_id):
            # Audio from before a toggleOff, scored after it: the dialogue already moved on.
            log.info("Hermes site %s: %s detected while disabled; not announced", site_id, event.keyword)
            return
        threshold = next((k.threshold for k in self.services.keywords if k.text == event.keyword), 1.0)
        detected = HotwordDetected(
            model_id=event.keyword,
            current_sensitivity=float(threshold),
            site_id=site_id,
            level_dbfs=event.level_dbfs,
            snr_db=event.snr_db,
        )
        self._publish(HotwordDetected.TOPIC.format(wakeword_id=self.wakeword_id), detected)
        self.published += 1

    # --- publishing ----------------------------------------------------------------------------
    def _publish(self, topic: str, message: HotwordDetected | HotwordError | Hotwords) -> None:
        # QoS 0, not retained: what rhasspy-hermes' HermesClient does for every message.
        self.services.publish(topic, message.to_payload(), qos=0, retain=False)

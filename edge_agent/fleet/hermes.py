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
* A frame that cannot be decoded: ``hermes/error/hotword`` (at most once a second per site) and
  the agent's ``error`` topic (``bad_wav``), counted in health; the agent keeps serving.

Threads: frames, toggles and requests arrive on the network thread and are only checked,
converted (a header parse; a resampler only for sites not sending 16 kHz) and queued;
detections arrive on the worker thread; a small ``hermes-idle`` thread finishes the stream of a
site that stopped sending (its last second is scored, its detector starts afresh next time).

Health shows every site's stream (``hermes-{siteId}``: audio seconds, rtf, level, detections)
like any other stream. The bridge's own per-site state (disable reasons, frames dropped while
disabled, bad frames) is not in health yet: the agent has no hook for integrations to add to it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from edge_agent.agent.app import Integration
from edge_agent.agent.worker import SampleChunk, StreamState
from edge_agent.audio.pcm import AudioFormatError
from edge_agent.audio.resample import Resampler
from edge_agent.audio.wav import TARGET_SAMPLE_RATE_HZ, DecodedAudio, WavError, parse_wav, to_mono_16k
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

if TYPE_CHECKING:
    from edge_agent.agent.app import Agent

log = logging.getLogger(__name__)

STREAM_KIND = "hermes"
STREAM_PREFIX = "hermes-"
# hermes/error/hotword is published at most this often per site (seconds); the rest are counted.
ERROR_INTERVAL_SECONDS = 1.0
# How often the idle thread looks for sites that stopped sending (seconds).
IDLE_CHECK_SECONDS = 0.5
# Sites remembered only for their toggles (no audio yet) beyond this many are refused.
MAX_TOGGLE_ONLY_SITES = 1024


def stream_id(site_id: str) -> str:
    return f"{STREAM_PREFIX}{site_id}"


@dataclass
class _Site:
    """What the bridge knows about one site; guarded by ``HermesBridge._lock``."""

    id: str
    disabled_reasons: set[str] = field(default_factory=set)
    has_stream: bool = False  # the worker has (or will have) a stream for it
    open: bool = False  # audio was submitted since the stream was last finished
    last_frame_at: float = 0.0  # time.time() of the last frame submitted
    last_frame_monotonic: float = 0.0
    resampler: Resampler | None = None
    frames: int = 0
    dropped_disabled: int = 0
    errors: int = 0

    @property
    def enabled(self) -> bool:
        return not self.disabled_reasons


class HermesBridge(Integration):
    """Speaks Rhasspy's wake-word side of Hermes for every (or every configured) site."""

    def __init__(self, idle_check_seconds: float = IDLE_CHECK_SECONDS) -> None:
        self._sites: dict[str, _Site] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._idle_thread: threading.Thread | None = None
        self._idle_check_seconds = idle_check_seconds
        self._error_lock = threading.Lock()
        self._error_times: dict[str, float] = {}
        self._errors_suppressed: dict[str, int] = {}
        self.published = 0

    # --- wiring --------------------------------------------------------------------------------
    def attach(self, agent: Agent) -> None:
        super().attach(agent)
        transport = agent.transport
        assert transport is not None, "the Hermes bridge needs MQTT"
        config = agent.config.hermes
        self.wakeword_id = config.wakeword_id
        self.site_ids = frozenset(config.site_ids)
        if config.site_ids:
            for site in config.site_ids:
                transport.subscribe(AudioFrame.TOPIC.format(site_id=site), self._on_audio_frame)
        else:
            transport.subscribe(AudioFrame.TOPIC.filter(), self._on_audio_frame)
        transport.subscribe(HotwordToggleOff.TOPIC.format(), self._on_toggle_off)
        transport.subscribe(HotwordToggleOn.TOPIC.format(), self._on_toggle_on)
        transport.subscribe(GetHotwords.TOPIC.format(), self._on_get_hotwords)
        self._stop.clear()
        self._idle_thread = threading.Thread(target=self._idle_loop, name="hermes-idle", daemon=True)
        self._idle_thread.start()
        log.info(
            "Hermes bridge: wake word id %s, sites %s",
            self.wakeword_id,
            ", ".join(sorted(self.site_ids)) if self.site_ids else "all",
        )

    def stop(self) -> None:
        self._stop.set()
        if self._idle_thread is not None:
            self._idle_thread.join(2.0)
            self._idle_thread = None

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
        agent = self.agent
        stream = stream_id(site_id)
        limit = agent.config.mqtt.max_payload_bytes
        with self._lock:
            site = self._site(site_id, message.topic, audio=True)
            if site is None:
                return
            if len(message.payload) > limit:
                error = (
                    f"audio frame of {len(message.payload)} bytes exceeds mqtt.max_payload_bytes ({limit})"
                )
                agent.refuse("payload_too_large", error, topic=message.topic, stream=stream)
                self._hermes_error(site_id, error, message.topic)
                return
            if not site.enabled:
                # Rhasspy drops audio while disabled; nothing is buffered for later.
                site.dropped_disabled += 1
                return
            try:
                decoded = parse_wav(message.payload, source=f"Hermes audio frame from site {site_id}")
                rate = decoded.info.sample_rate
                samples = self._to_engine_rate(site, decoded)
            except (WavError, AudioFormatError, ValueError) as error:
                site.errors += 1
                self._refuse_frame(site_id, stream, str(error), message.topic)
                return
            if not agent.rate_ok(stream, samples.shape[0] / TARGET_SAMPLE_RATE_HZ, message.topic):
                return
            chunk = SampleChunk(stream, STREAM_KIND, samples, message.received_at or time.time())
            if not agent.worker.submit(chunk):
                agent.dropped_by_stream[stream] = agent.dropped_by_stream.get(stream, 0) + 1
                agent.refuse(
                    "queue_full", "the engine is behind; Hermes audio frame dropped", message.topic, stream
                )
                return
            site.frames += 1
            site.has_stream = site.open = True
            site.last_frame_at = chunk.captured_at
            site.last_frame_monotonic = time.monotonic()
            if site.frames == 1:
                log.info("Hermes site %s: first audio frame (%d Hz)", site_id, rate)

    @staticmethod
    def _to_engine_rate(site: _Site, decoded: DecodedAudio) -> np.ndarray:
        """16 kHz frames are converted exactly (no resampler); other rates go through one
        resampler per site that keeps its state between frames, so frame edges do not click."""
        rate = decoded.info.sample_rate
        if rate == TARGET_SAMPLE_RATE_HZ:
            site.resampler = None
            return to_mono_16k(decoded)
        frames = decoded.samples
        mono = frames[:, 0] if frames.shape[1] == 1 else frames.mean(axis=1, dtype=np.float64)
        if site.resampler is None or site.resampler.input_rate != rate:
            site.resampler = Resampler(rate, TARGET_SAMPLE_RATE_HZ)
        return np.ascontiguousarray(site.resampler.process(mono.astype(np.float32)), dtype=np.float32)

    def _site(self, site_id: str, topic: str, audio: bool) -> _Site | None:
        """The site's state, created on first sight within the agent's stream limits (lock held).
        A site that sends audio becomes a stream: at most ``audio.mqtt.max_streams`` of them."""
        site = self._sites.get(site_id)
        agent = self.agent
        if audio and (site is None or not site.has_stream):
            with_audio = sum(1 for s in self._sites.values() if s.has_stream)
            if with_audio >= agent.config.audio.mqtt.max_streams:
                agent.refuse(
                    "too_many_streams",
                    f"already {with_audio} Hermes sites (audio.mqtt.max_streams); site {site_id!r} refused",
                    topic=topic,
                    stream=stream_id(site_id),
                )
                return None
        if site is not None:
            return site
        if len(self._sites) >= MAX_TOGGLE_ONLY_SITES + agent.config.audio.mqtt.max_streams:
            agent.refuse("too_many_streams", f"too many Hermes sites; {site_id!r} ignored", topic=topic)
            return None
        site = self._sites[site_id] = _Site(site_id)
        return site

    def _refuse_frame(self, site_id: str, stream: str, error: str, topic: str) -> None:
        self.agent.refuse("bad_wav", error, topic=topic, stream=stream)
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
            site = self._site(toggle.site_id, message.topic, audio=False)
            if site is None:
                return
            was_enabled = site.enabled
            site.disabled_reasons.add(toggle.reason)
            if was_enabled:
                # Score what was already queued, then start afresh: after toggleOn the detector
                # must not join old audio to new, nor report the pause as lost audio.
                self._finish_stream(site)
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
            self.agent.refuse("bad_payload", str(error), topic=message.topic)
            return None
        if not valid_site_id(toggle.site_id):
            self.agent.refuse("bad_payload", f"{toggle.site_id!r} cannot be a site id", topic=message.topic)
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
            self.agent.refuse("bad_payload", str(error), topic=message.topic)
            self._hermes_error(DEFAULT_SITE_ID, str(error), message.topic)
            return
        if not self.accepts(request.site_id):
            return
        models = [Hotword(model_id=k.text, model_words=k.text) for k in self.agent.worker.keywords]
        self._publish(
            Hotwords.TOPIC.format(), Hotwords(models=models, site_id=request.site_id, id=request.id)
        )

    # --- detections (worker thread) ----------------------------------------------------------
    def on_detection(self, event: DetectionEvent, stream: StreamState) -> None:
        if stream.kind != STREAM_KIND or not stream.id.startswith(STREAM_PREFIX):
            return
        site_id = stream.id[len(STREAM_PREFIX) :]
        if not self.site_enabled(site_id):
            # Audio from before a toggleOff, scored after it: the dialogue already moved on.
            log.info("Hermes site %s: %s detected while disabled; not announced", site_id, event.keyword)
            return
        threshold = next((k.threshold for k in self.agent.worker.keywords if k.text == event.keyword), 1.0)
        detected = HotwordDetected(
            model_id=event.keyword, current_sensitivity=float(threshold), site_id=site_id
        )
        self._publish(HotwordDetected.TOPIC.format(wakeword_id=self.wakeword_id), detected)
        self.published += 1

    # --- idle sites (hermes-idle thread) -------------------------------------------------------
    def _idle_loop(self) -> None:
        while not self._stop.wait(self._idle_check_seconds):
            try:
                self._finish_idle_sites()
            except Exception:
                log.exception("Hermes idle check failed")

    def _finish_idle_sites(self) -> None:
        timeout = self.agent.config.audio.mqtt.idle_timeout
        now = time.monotonic()
        with self._lock:
            for site in self._sites.values():
                if site.open and now - site.last_frame_monotonic > timeout:
                    log.info("Hermes site %s: no audio for %.1f s; stream finished", site.id, timeout)
                    self._finish_stream(site)

    def _finish_stream(self, site: _Site) -> None:
        """Queue the end of the site's stream (lock held): its detector scores the audio it holds,
        then starts afresh. The end is stamped with the last frame's time, so the worker does not
        mistake the pause for lost audio."""
        if not site.open:
            return
        end = SampleChunk(
            stream_id(site.id), STREAM_KIND, np.zeros(0, np.float32), site.last_frame_at, final=True
        )
        if self.agent.worker.submit(end):
            site.open = False
            site.resampler = None

    # --- publishing ----------------------------------------------------------------------------
    def _publish(self, topic: str, message: HotwordDetected | HotwordError | Hotwords) -> None:
        transport = self.agent.transport
        if transport is not None:
            # QoS 0, not retained: what rhasspy-hermes' HermesClient does for every message.
            transport.publish(topic, message.to_payload(), qos=0, retain=False)

"""The agent as a Rhasspy wake-word service, fed the way Rhasspy's microphone service feeds one.

rhasspy-microphone-pyaudio-hermes reads 2,048-byte PCM chunks and publishes each one, wrapped
into a WAV file by Python's ``wave`` module in a BytesIO, to
``hermes/audioServer/{siteId}/audioFrame`` at QoS 0. ``rhasspy_frames`` does exactly that.
"""

from __future__ import annotations

import io
import json
import struct
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from edge_agent.agent.streams import GAP_SECONDS
from edge_agent.audio.resample import resample
from edge_agent.audio.wav import read_wav, to_mono_16k
from edge_agent.fleet.hermes import HermesBridge
from edge_agent.mqtt.hermes_messages import (
    GetHotwords,
    Hotword,
    HotwordDetected,
    HotwordError,
    Hotwords,
    HotwordToggleOff,
    HotwordToggleOn,
    camel_case,
)
from edge_agent.mqtt.messages import PayloadError
from tests.agent.streaming import pcm16
from tests.broker import Client, Received
from tests.fleet.helpers import wait_ready
from tests.support import agent_config, wait_until

PREFIX = "edge_agent/dev1"
DETECTED = "hermes/hotword/xiaoyun/detected"
CHUNK_BYTES = 2048  # rhasspy-microphone-pyaudio-hermes --chunk-size default
SILENCE_1S = bytes(32000)


def wav_frame(chunk: bytes, rate: int = 16000, width: int = 2, channels: int = 1) -> bytes:
    """One audioFrame payload, built as rhasspy-microphone-pyaudio-hermes builds it."""
    with io.BytesIO() as wav_buffer:
        with wave.open(wav_buffer, mode="wb") as wav_file:
            wav_file.setframerate(rate)
            wav_file.setsampwidth(width)
            wav_file.setnchannels(channels)
            wav_file.writeframes(chunk)
        return wav_buffer.getvalue()


def rhasspy_frames(pcm: bytes, chunk_bytes: int = CHUNK_BYTES, **fmt: int) -> list[bytes]:
    return [wav_frame(pcm[i : i + chunk_bytes], **fmt) for i in range(0, len(pcm), chunk_bytes)]


def publish_frames(client: Client, sites: dict[str, bytes], realtime: bool = False, **fmt: int) -> None:
    """Every site's PCM as Rhasspy audioFrames, the sites interleaved frame by frame; with
    ``realtime``, paced as satellites' microphones deliver them."""
    frames = {site: rhasspy_frames(pcm, **fmt) for site, pcm in sites.items()}
    seconds_per_frame = CHUNK_BYTES / 32000
    started = time.monotonic()
    for index in range(max(len(f) for f in frames.values())):
        if realtime:
            delay = started + index * seconds_per_frame - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        for site, site_frames in frames.items():
            if index < len(site_frames):
                client.publish(f"hermes/audioServer/{site}/audioFrame", site_frames[index], qos=0)


def hermes_agent(make_agent, port: int, tmp_path: Path, audio=None, **hermes):  # type: ignore[no-untyped-def]
    """A started agent with the bridge, its Hermes topics subscribed."""
    sections = {"audio": audio} if audio is not None else {}
    config = agent_config(port, tmp_path, hermes={"enabled": True, **hermes}, **sections)
    bridge = HermesBridge()
    agent = make_agent(config, integrations=lambda agent: [bridge])
    wait_ready(port, agent)
    return agent, bridge


def sentinel_site(client: Client, pcm: bytes, site: str = "sentinel") -> Received:
    """A keyword from one more site, and its detection awaited on DETECTED (the client must be
    subscribed). The engine worker handles frames in the order they arrived and detections go
    out in order: whatever the frames sent before were going to give is in by then."""
    publish_frames(client, {site: pcm + SILENCE_1S})
    found = client.wait_for(DETECTED, lambda m: any(x.json()["siteId"] == site for x in m), timeout=30)
    return next(x for x in found if x.json()["siteId"] == site)


def sites(client: Client) -> list[str]:
    return [m.json()["siteId"] for m in client.on(DETECTED)]


@pytest.fixture()
def positive(dev_audio: Path) -> bytes:
    return pcm16(sorted(dev_audio.glob("pos/*.wav"))[0])


# --- messages --------------------------------------------------------------------------------


def test_messages_round_trip_with_rhasspys_camel_case_keys() -> None:
    assert camel_case("send_audio_captured") == "sendAudioCaptured"
    detected = HotwordDetected(model_id="小云小云", current_sensitivity=0.3, site_id="kitchen")
    assert detected.to_dict() == {
        "modelId": "小云小云",
        "modelVersion": "",
        "modelType": "personal",
        "currentSensitivity": 0.3,
        "siteId": "kitchen",
        "sessionId": None,
        "sendAudioCaptured": None,
        "lang": None,
    }
    # How loud the keyword was, when known: two extra keys Rhasspy's clients ignore.
    loud = HotwordDetected(model_id="小云小云", site_id="kitchen", level_dbfs=-25.0, snr_db=34.4)
    assert (loud.to_dict()["levelDbfs"], loud.to_dict()["snrDb"]) == (-25.0, 34.4)
    assert HotwordDetected.from_payload(loud.to_payload()) == loud
    assert HotwordDetected.TOPIC.format(wakeword_id="xiaoyun") == DETECTED
    messages = [
        detected,
        HotwordToggleOff(site_id="kitchen", reason="dialogueSession"),
        HotwordToggleOn(site_id="kitchen", reason=""),
        HotwordError(error="bad", site_id="kitchen", context="hermes/audioServer/kitchen/audioFrame"),
        GetHotwords(site_id="kitchen", id="abc"),
    ]
    for message in messages:
        assert type(message).from_payload(message.to_payload()) == message
    hotwords = Hotwords(models=[Hotword(model_id="小云小云", model_words="小云小云")], site_id="s", id="1")
    assert Hotwords.from_dict(json.loads(hotwords.to_payload())) == hotwords
    # Rhasspy's defaults for what is left out; unknown keys are ignored; wrong types refused.
    assert HotwordToggleOff.from_payload(b"{}") == HotwordToggleOff(site_id="default", reason="")
    assert HotwordToggleOn.from_payload(b'{"siteId": "a", "reason": "ttsSay", "x": 1}').reason == "ttsSay"
    with pytest.raises(PayloadError, match="siteId must be str"):
        HotwordToggleOff.from_payload(b'{"siteId": 3}')
    with pytest.raises(PayloadError, match="not JSON"):
        GetHotwords.from_payload(b"{")


def test_rhasspy_frames_are_what_the_microphone_service_sends() -> None:
    frame = wav_frame(bytes(CHUNK_BYTES))
    assert len(frame) == CHUNK_BYTES + 44 and frame[:4] == b"RIFF"


# --- the bridge against a real broker ---------------------------------------------------------


def test_rhasspy_audio_frames_give_one_detection_per_keyword(  # type: ignore[no-untyped-def]
    broker, make_agent, client, tmp_path: Path, example_wav: Path, positive: bytes
) -> None:
    agent, bridge = hermes_agent(make_agent, broker.port, tmp_path)
    client.subscribe("hermes/hotword/#")
    client.subscribe(f"{PREFIX}/detection")
    # The model's example, a dev positive, then a second of silence: a microphone keeps sending.
    publish_frames(client, {"kitchen": pcm16(example_wav) + SILENCE_1S + positive + SILENCE_1S})
    found = client.wait_for(DETECTED, lambda m: len(m) >= 2, timeout=30)
    sentinel_site(client, pcm16(example_wav))  # a third one (a duplicate) would be in by now
    assert sites(client) == ["kitchen", "kitchen", "sentinel"]
    threshold = agent.worker.keywords[0].threshold
    for message in found:
        assert not message.retain
        body = message.json()
        # Our two extra fields: how loud the keyword was, and over what background.
        level, snr = body.pop("levelDbfs"), body.pop("snrDb")
        assert -60.0 < level < 0.0 and snr > 10.0
        assert body == {
            "modelId": "小云小云",
            "modelVersion": "",
            "modelType": "personal",
            "currentSensitivity": threshold,
            "siteId": "kitchen",
            "sessionId": None,
            "sendAudioCaptured": None,
            "lang": None,
        }
        assert HotwordDetected.from_payload(message.payload).site_id == "kitchen"
    # The same detections on the agent's own topic, from the site's own stream.
    own = client.wait_for(f"{PREFIX}/detection", lambda m: len(m) >= 3)
    assert [m.json()["stream"] for m in own] == ["hermes-kitchen", "hermes-kitchen", "hermes-sentinel"]
    kitchen = next(s for s in agent.worker.snapshots() if s.id == "hermes-kitchen")
    assert kitchen.kind == "hermes" and kitchen.detections == 2
    # Counted just after each publish: exactly the three received above, once the last is counted.
    wait_until(lambda: bridge.published == 3)


def test_two_sites_interleaved_in_real_time_keep_separate_state(  # type: ignore[no-untyped-def]
    broker, make_agent, client, tmp_path: Path, example_wav: Path, positive: bytes
) -> None:
    """rhasspy#209: one buffer for all satellites mixed their audio and broke detection."""
    hermes_agent(make_agent, broker.port, tmp_path)
    client.subscribe("hermes/hotword/#")
    pcm = pcm16(example_wav)
    middle = int(2.15 * 16000) * 2  # between the two 小云 of the example
    # Half a keyword on each site: neither may detect (one shared detector would).
    publish_frames(client, {"hall": pcm[:middle] + SILENCE_1S, "porch": SILENCE_1S + pcm[middle:]})
    # Then a whole keyword on each, interleaved in real time like two satellites.
    publish_frames(client, {"hall": pcm + SILENCE_1S, "porch": positive + SILENCE_1S}, realtime=True)
    found = client.wait_for(DETECTED, lambda m: len(m) >= 2, timeout=30)
    sentinel_site(client, pcm)
    assert sorted(sites(client)) == ["hall", "porch", "sentinel"]
    assert sorted(m.json()["siteId"] for m in found) == ["hall", "porch"]


def test_toggle_off_is_per_site_and_toggle_on_restores(  # type: ignore[no-untyped-def]
    broker, make_agent, client, tmp_path: Path, example_wav: Path, positive: bytes
) -> None:
    agent, bridge = hermes_agent(make_agent, broker.port, tmp_path)
    client.subscribe("hermes/hotword/#")
    pcm = pcm16(example_wav)

    def toggle(kind: str, site: str, reason: str) -> None:
        client.publish(f"hermes/hotword/{kind}", json.dumps({"siteId": site, "reason": reason}), qos=1)

    toggle("toggleOff", "hall", "dialogueSession")
    toggle("toggleOff", "hall", "ttsSay")
    wait_until(lambda: bridge.disabled_reasons("hall") == {"dialogueSession", "ttsSay"})
    assert bridge.site_enabled("porch")
    publish_frames(client, {"hall": pcm + SILENCE_1S, "porch": positive + SILENCE_1S})
    client.wait_for(DETECTED, timeout=30)
    sentinel_site(client, pcm)
    assert sites(client) == ["porch", "sentinel"]
    # hall's frames were dropped: no stream
    assert sorted(agent.worker.stream_ids()) == ["hermes-porch", "hermes-sentinel"]
    # One reason withdrawn: still off (Rhasspy's rule). The other one: on again.
    toggle("toggleOn", "hall", "dialogueSession")
    wait_until(lambda: bridge.disabled_reasons("hall") == {"ttsSay"})
    assert not bridge.site_enabled("hall")
    toggle("toggleOn", "hall", "ttsSay")
    wait_until(lambda: bridge.site_enabled("hall"))
    client.messages.clear()
    publish_frames(client, {"hall": pcm + SILENCE_1S})
    (restored,) = client.wait_for(DETECTED, timeout=30)
    assert restored.json()["siteId"] == "hall"
    # toggleOn with reason "" clears every reason at once.
    toggle("toggleOff", "hall", "playAudio")
    toggle("toggleOff", "hall", "dialogueSession")
    wait_until(lambda: bridge.disabled_reasons("hall") == {"playAudio", "dialogueSession"})
    toggle("toggleOn", "hall", "")
    wait_until(lambda: bridge.site_enabled("hall"))
    assert bridge.disabled_reasons("hall") == set()


def test_toggle_off_mid_keyword_does_not_join_old_and_new_audio(  # type: ignore[no-untyped-def]
    broker, make_agent, client, tmp_path: Path, example_wav: Path
) -> None:
    """Disabled between the two halves of a keyword: the toggleOff ends the site's stream, and
    the frames after toggleOn open a new one, whose detector starts afresh."""
    agent, bridge = hermes_agent(make_agent, broker.port, tmp_path)
    client.subscribe("hermes/hotword/#")
    client.subscribe(f"{PREFIX}/error")
    pcm = pcm16(example_wav)
    middle = int(2.15 * 16000) * 2
    publish_frames(client, {"hall": pcm[:middle]})
    client.publish("hermes/hotword/toggleOff", json.dumps({"siteId": "hall", "reason": "ttsSay"}), qos=1)
    wait_until(lambda: "hermes-hall" not in agent.worker.stream_ids() and not bridge.site_enabled("hall"))
    # The satellite speaks: a pause longer than the worker's gap detection (the scenario, not
    # a wait for anything), which must not be reported as lost audio.
    time.sleep(GAP_SECONDS + 0.5)
    client.publish("hermes/hotword/toggleOn", json.dumps({"siteId": "hall", "reason": "ttsSay"}), qos=1)
    publish_frames(client, {"hall": pcm[middle:] + SILENCE_1S})
    sentinel_site(client, pcm)  # the toggleOn was handled before these frames, as were hall's
    assert sites(client) == ["sentinel"]
    assert [m.json()["code"] for m in client.on(f"{PREFIX}/error")] == []
    (hall,) = [s for s in agent.worker.snapshots() if s.id == "hermes-hall"]
    assert hall.audio_seconds == pytest.approx((len(pcm) - middle + len(SILENCE_1S)) / 32000)  # a new stream


def test_a_broken_frame_is_reported_and_the_site_keeps_working(  # type: ignore[no-untyped-def]
    broker, make_agent, client, tmp_path: Path, example_wav: Path
) -> None:
    agent, _ = hermes_agent(make_agent, broker.port, tmp_path)
    client.subscribe("hermes/#")
    client.subscribe(f"{PREFIX}/error")
    frames = rhasspy_frames(pcm16(example_wav) + SILENCE_1S)
    broken = b"RIFF\x10\x00\x00\x00WAVEfmt \x10\x00\x00\x00" + frames[5][36:]  # a cut-off header
    topic = "hermes/audioServer/kitchen/audioFrame"
    for index, frame in enumerate(frames):
        client.publish(topic, frame)
        if index == 5:
            client.publish(topic, broken)
    (error,) = client.wait_for("hermes/error/hotword")
    report = error.json()
    assert report["siteId"] == "kitchen" and report["context"] == topic and report["error"]
    assert set(report) == {"error", "siteId", "context", "sessionId"}
    (own,) = client.wait_for(f"{PREFIX}/error")
    assert own.json()["code"] == "bad_wav" and own.json()["stream"] == "hermes-kitchen"
    (detected,) = client.wait_for(DETECTED, timeout=30)
    assert detected.json()["siteId"] == "kitchen"
    assert agent.worker.alive and agent.errors.count("bad_wav") == 1


def float_frame(samples: np.ndarray, rate: int = 16000) -> bytes:
    """A mono 32-bit IEEE float WAV (format 3), which Python's ``wave`` cannot write."""
    data = samples.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    body = (
        b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    )
    return b"RIFF" + struct.pack("<I", len(body)) + body


def test_a_frame_with_bad_samples_is_reported_on_the_agents_error_topic_only(  # type: ignore[no-untyped-def]
    broker, make_agent, client, tmp_path: Path, example_wav: Path
) -> None:
    """Only a frame's header is read when it arrives; the engine worker decodes it. A frame
    whose header is fine but whose samples are not (NaN floats) is refused there, counted and
    reported on the agent's own error topic; Hermes' error topic is not told (it is, for a
    header that cannot be read: see above). The site keeps working."""
    agent, _ = hermes_agent(make_agent, broker.port, tmp_path)
    client.subscribe("hermes/#")
    client.subscribe(f"{PREFIX}/error")
    topic = "hermes/audioServer/kitchen/audioFrame"
    client.publish(topic, float_frame(np.full(1024, np.nan, dtype=np.float32)))
    publish_frames(client, {"kitchen": pcm16(example_wav) + SILENCE_1S})
    (own,) = client.wait_for(f"{PREFIX}/error")
    assert own.json()["code"] == "bad_wav" and own.json()["stream"] == "hermes-kitchen"
    assert own.json()["topic"] == topic and "NaN" in own.json()["message"]
    # Detected from frames that arrived after the bad one: had the bridge answered it on
    # hermes/error/hotword (at once, when it arrived), that would be in too.
    (detected,) = client.wait_for(DETECTED, timeout=30)
    assert detected.json()["siteId"] == "kitchen"
    assert client.on("hermes/error/hotword") == []
    assert agent.errors.count("bad_wav") == 1


def test_get_hotwords_is_answered(broker, make_agent, client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    hermes_agent(make_agent, broker.port, tmp_path)
    client.subscribe("rhasspy/hotword/hotwords")
    client.publish("rhasspy/hotword/getHotwords", json.dumps({"siteId": "kitchen", "id": "req-1"}))
    (answer,) = client.wait_for("rhasspy/hotword/hotwords")
    assert answer.json() == {
        "models": [
            {"modelId": "小云小云", "modelWords": "小云小云", "modelVersion": "", "modelType": "personal"}
        ],
        "siteId": "kitchen",
        "id": "req-1",
    }


def test_configured_sites_only(broker, make_agent, client, tmp_path: Path, example_wav: Path) -> None:  # type: ignore[no-untyped-def]
    agent, _ = hermes_agent(make_agent, broker.port, tmp_path, site_ids=["kitchen"])
    client.subscribe("hermes/hotword/#")
    client.subscribe("rhasspy/hotword/hotwords")
    pcm = pcm16(example_wav) + SILENCE_1S
    publish_frames(client, {"garage": pcm, "kitchen": pcm})
    (found,) = client.wait_for(DETECTED, timeout=30)
    assert found.json()["siteId"] == "kitchen"
    assert agent.worker.stream_ids() == ["hermes-kitchen"]
    client.publish("rhasspy/hotword/getHotwords", json.dumps({"siteId": "garage", "id": "g"}))
    client.publish("rhasspy/hotword/getHotwords", json.dumps({"siteId": "kitchen", "id": "k"}))
    # Answered in the order asked: an answer to garage would come first.
    answers = client.wait_for("rhasspy/hotword/hotwords", lambda m: any(x.json()["id"] == "k" for x in m))
    assert [m.json()["id"] for m in answers] == ["k"]
    assert answers[0].json()["siteId"] == "kitchen"


def test_a_site_that_stops_sending_is_finished(  # type: ignore[no-untyped-def]
    broker, make_agent, client, tmp_path: Path, example_wav: Path
) -> None:
    """A keyword at the very end of what a site sent is still found once the site goes quiet:
    the engine worker closes its stream after audio.mqtt.idle_timeout, like any network stream."""
    agent, _ = hermes_agent(make_agent, broker.port, tmp_path, audio={"mqtt": {"idle_timeout": 1.0}})
    client.subscribe("hermes/hotword/#")
    pcm = pcm16(example_wav)
    keyword_end = int(2.6 * 16000) * 2  # right after the keyword: only the finish can find it
    publish_frames(client, {"kitchen": pcm[:keyword_end]})
    (found,) = client.wait_for(DETECTED, timeout=30)  # idle_timeout + the worker's check
    assert found.json()["siteId"] == "kitchen"
    assert "hermes-kitchen" not in agent.worker.stream_ids()  # closed before its last detection went out


def test_other_formats_are_converted(broker, make_agent, client, tmp_path: Path, example_wav: Path) -> None:  # type: ignore[no-untyped-def]
    """A satellite configured for 48 kHz stereo: every frame's header says so."""
    hermes_agent(make_agent, broker.port, tmp_path)
    client.subscribe("hermes/hotword/#")
    samples = resample(to_mono_16k(read_wav(example_wav)), 16000, 48000)
    stereo = np.repeat(np.clip(np.round(samples), -32768, 32767)[:, None], 2, axis=1).astype("<i2")
    pcm = stereo.tobytes() + bytes(48000 * 4)
    frames = rhasspy_frames(pcm, chunk_bytes=4096, rate=48000, channels=2)
    for frame in frames:
        client.publish("hermes/audioServer/attic/audioFrame", frame)
    (found,) = client.wait_for(DETECTED, timeout=30)
    assert found.json()["siteId"] == "attic"


def test_the_runner_attaches_the_bridge_when_enabled() -> None:
    from edge_agent.cli.run import build_integrations
    from edge_agent.config import parse_config

    control = object()  # the agent the command processor would control; never called here
    assert not any(isinstance(i, HermesBridge) for i in build_integrations(parse_config({}), control))
    enabled = build_integrations(parse_config({"hermes": {"enabled": True}}), control)
    assert sum(isinstance(i, HermesBridge) for i in enabled) == 1


def test_sites_are_streams_within_the_agents_limit(broker, make_agent, client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    agent, _ = hermes_agent(make_agent, broker.port, tmp_path, audio={"mqtt": {"max_streams": 1}})
    client.subscribe(f"{PREFIX}/error")
    # A toggle alone does not take a stream; audio does.
    client.publish("hermes/hotword/toggleOff", json.dumps({"siteId": "b", "reason": "ttsSay"}), qos=1)
    client.publish("hermes/audioServer/a/audioFrame", wav_frame(bytes(CHUNK_BYTES)))
    client.publish("hermes/hotword/toggleOn", json.dumps({"siteId": "b", "reason": "ttsSay"}), qos=1)
    client.publish("hermes/audioServer/b/audioFrame", wav_frame(bytes(CHUNK_BYTES)))
    # Reported by the engine worker, after it opened a's stream.
    (report,) = client.wait_for(f"{PREFIX}/error")
    assert report.json()["code"] == "too_many_streams" and report.json()["stream"] == "hermes-b"
    assert agent.worker.stream_ids() == ["hermes-a"]

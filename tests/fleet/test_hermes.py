"""The agent as a Rhasspy wake-word service, fed the way Rhasspy's microphone service feeds one.

rhasspy-microphone-pyaudio-hermes reads 2,048-byte PCM chunks and publishes each one, wrapped
into a WAV file by Python's ``wave`` module in a BytesIO, to
``hermes/audioServer/{siteId}/audioFrame`` at QoS 0. ``rhasspy_frames`` does exactly that.
"""

from __future__ import annotations

import io
import json
import time
import wave
from pathlib import Path

import numpy as np
import pytest

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
from tests.broker import Client
from tests.support import agent_config

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
    """Every site's PCM as Rhasspy audioFrames, the sites interleaved frame by frame."""
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


def hermes_agent(make_agent, port: int, tmp_path: Path, **hermes):  # type: ignore[no-untyped-def]
    config = agent_config(port, tmp_path, hermes={"enabled": True, **hermes})
    agent = make_agent(config, start=False)
    bridge = HermesBridge()
    agent.integrations = [bridge]
    agent.start()
    assert agent.transport.wait_connected(10)
    time.sleep(0.2)  # SUBACKs
    return agent, bridge


@pytest.fixture()
def positive(dev_audio: Path) -> bytes:
    return pcm16(sorted(dev_audio.glob("pos/*.wav"))[0])


def detections(client: Client) -> list[dict]:
    return [m.json() for m in client.on("hermes/hotword/+/detected")]


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
    time.sleep(1.0)  # a third one (a duplicate) would arrive now
    assert len(client.on(DETECTED)) == 2
    threshold = agent.worker.keywords[0].threshold
    for message in found:
        assert not message.retain
        assert message.json() == {
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
    own = client.wait_for(f"{PREFIX}/detection", lambda m: len(m) >= 2)
    assert [m.json()["stream"] for m in own] == ["hermes-kitchen", "hermes-kitchen"]
    (stream,) = agent.worker.streams()
    assert stream.id == "hermes-kitchen" and stream.kind == "hermes"
    assert bridge.published == 2


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
    time.sleep(1.0)
    assert sorted(m.json()["siteId"] for m in client.on(DETECTED)) == ["hall", "porch"]
    assert len(found) == 2


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
    time.sleep(0.3)
    assert bridge.disabled_reasons("hall") == {"dialogueSession", "ttsSay"}
    assert bridge.site_enabled("porch")
    publish_frames(client, {"hall": pcm + SILENCE_1S, "porch": positive + SILENCE_1S})
    client.wait_for(DETECTED, timeout=30)
    time.sleep(1.0)
    assert [m.json()["siteId"] for m in client.on(DETECTED)] == ["porch"]
    assert [s.id for s in agent.worker.streams()] == ["hermes-porch"]  # hall's frames were dropped
    # One reason withdrawn: still off (Rhasspy's rule). The other one: on again.
    toggle("toggleOn", "hall", "dialogueSession")
    time.sleep(0.3)
    assert not bridge.site_enabled("hall")
    toggle("toggleOn", "hall", "ttsSay")
    time.sleep(0.3)
    assert bridge.site_enabled("hall")
    client.messages.clear()
    publish_frames(client, {"hall": pcm + SILENCE_1S})
    (restored,) = client.wait_for(DETECTED, timeout=30)
    assert restored.json()["siteId"] == "hall"
    # toggleOn with reason "" clears every reason at once.
    toggle("toggleOff", "hall", "playAudio")
    toggle("toggleOff", "hall", "dialogueSession")
    toggle("toggleOn", "hall", "")
    time.sleep(0.3)
    assert bridge.site_enabled("hall") and bridge.disabled_reasons("hall") == set()


def test_toggle_off_mid_keyword_does_not_join_old_and_new_audio(  # type: ignore[no-untyped-def]
    broker, make_agent, client, tmp_path: Path, example_wav: Path
) -> None:
    """Disabled between the two halves of a keyword: after toggleOn the detector starts afresh."""
    agent, _ = hermes_agent(make_agent, broker.port, tmp_path)
    client.subscribe("hermes/hotword/#")
    client.subscribe(f"{PREFIX}/error")
    pcm = pcm16(example_wav)
    middle = int(2.15 * 16000) * 2
    publish_frames(client, {"hall": pcm[:middle]})
    agent.worker.drain()
    client.publish("hermes/hotword/toggleOff", json.dumps({"siteId": "hall", "reason": "ttsSay"}), qos=1)
    time.sleep(1.5)  # longer than the worker's gap detection: the pause is no "lost audio"
    client.publish("hermes/hotword/toggleOn", json.dumps({"siteId": "hall", "reason": "ttsSay"}), qos=1)
    time.sleep(0.2)
    publish_frames(client, {"hall": pcm[middle:] + SILENCE_1S})
    agent.worker.drain()
    time.sleep(1.0)
    assert client.on(DETECTED) == []
    assert [m.json()["code"] for m in client.on(f"{PREFIX}/error")] == []


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
    assert agent.worker.alive and agent.refused["bad_wav"] == 1


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
    assert [s.id for s in agent.worker.streams()] == ["hermes-kitchen"]
    client.publish("rhasspy/hotword/getHotwords", json.dumps({"siteId": "garage", "id": "g"}))
    client.publish("rhasspy/hotword/getHotwords", json.dumps({"siteId": "kitchen", "id": "k"}))
    (answer,) = client.wait_for("rhasspy/hotword/hotwords")
    time.sleep(0.3)
    assert [m.json()["id"] for m in client.on("rhasspy/hotword/hotwords")] == ["k"]
    assert answer.json()["siteId"] == "kitchen"


def test_a_site_that_stops_sending_is_finished(  # type: ignore[no-untyped-def]
    broker, make_agent, client, tmp_path: Path, example_wav: Path
) -> None:
    """A keyword at the very end of what a site sent is still found once the site goes quiet."""
    hermes_agent(make_agent, broker.port, tmp_path)
    client.subscribe("hermes/hotword/#")
    pcm = pcm16(example_wav)
    keyword_end = int(2.6 * 16000) * 2  # right after the keyword: only the finish can find it
    publish_frames(client, {"kitchen": pcm[:keyword_end]})
    (found,) = client.wait_for(DETECTED, timeout=40)  # idle_timeout (10 s) + the check
    assert found.json()["siteId"] == "kitchen"


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

    assert not any(isinstance(i, HermesBridge) for i in build_integrations(parse_config({})))
    enabled = build_integrations(parse_config({"hermes": {"enabled": True}}))
    assert sum(isinstance(i, HermesBridge) for i in enabled) == 1


def test_sites_are_streams_within_the_agents_limit(broker, make_agent, client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = agent_config(broker.port, tmp_path, hermes={"enabled": True}, audio={"mqtt": {"max_streams": 1}})
    agent = make_agent(config, start=False)
    agent.integrations = [HermesBridge()]
    agent.start()
    assert agent.transport.wait_connected(10)
    time.sleep(0.2)
    client.subscribe(f"{PREFIX}/error")
    # A toggle alone does not take a stream; audio does.
    client.publish("hermes/hotword/toggleOff", json.dumps({"siteId": "b", "reason": "ttsSay"}), qos=1)
    client.publish("hermes/audioServer/a/audioFrame", wav_frame(bytes(CHUNK_BYTES)))
    client.publish("hermes/hotword/toggleOn", json.dumps({"siteId": "b", "reason": "ttsSay"}), qos=1)
    client.publish("hermes/audioServer/b/audioFrame", wav_frame(bytes(CHUNK_BYTES)))
    (report,) = client.wait_for(f"{PREFIX}/error")
    assert report.json()["code"] == "too_many_streams" and report.json()["stream"] == "hermes-b"
    agent.worker.drain()
    assert [s.id for s in agent.worker.streams()] == ["hermes-a"]

"""MicrophoneAudioSource over the real PyAudio; only the stream object that ``open`` returns is fake.

The devices are real PortAudio ALSA devices: ALSA PCMs defined in an asound.conf loaded through
ALSA_CONFIG_PATH (null PCMs, so nothing is captured). PortAudio enumerates them, reports their
default rates and answers ``is_format_supported``; the test then drives the fake stream's callback
as PortAudio's thread would. One smoke test runs the whole real path, stream included, in a
subprocess against an ALSA ``file`` PCM that returns a raw recording.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.audio import microphone
from edge_agent.audio.microphone import (
    PA_COMPLETE,
    PA_CONTINUE,
    PA_INPUT_OVERFLOW,
    PA_INT16,
    InputDevice,
    MicrophoneAudioSource,
    MicrophoneError,
    list_input_devices,
    select_device,
)
from edge_agent.audio.sources import AudioChunk, AudioSource
from edge_agent.config import MicrophoneSource
from tests.conftest import REPO_ROOT, require_module

WAIT_SECONDS = 5.0

# ALSA PCMs PortAudio lists as input devices. The default one is a `plug` whose slave runs at
# 48 kHz, so PortAudio reports 48000 Hz as its default rate (the null PCMs report 44100 Hz).
DEVICES_CONF = """
pcm.!default { type plug; slave { pcm { type null }; rate 48000 } }
pcm.usb_mic_left { type null }
pcm.USB_Mic_Right { type null }
pcm.sysdefault { type null }
"""
# A PCM on a card that does not exist: PortAudio lists nothing. (PortAudio 19.6 aborts the process,
# `Assertion devIdx < numDeviceNames` in BuildDeviceList, when the configuration has no PCM at all,
# or only PCMs that open and no `default`: every configuration here defines a default or fails.)
NO_DEVICES_CONF = "pcm.missing_card { type hw; card 99 }\n"


def use_alsa_config(directory: Path, text: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = directory / "asound.conf"
    path.write_text(text)
    monkeypatch.setenv("ALSA_CONFIG_PATH", str(path))
    monkeypatch.setenv("JACK_NO_START_SERVER", "1")
    return path


class FakeStream:
    """What ``PyAudio.open`` returns, driven by the test in the role of PortAudio's thread."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.callback = kwargs["stream_callback"]
        self.active = False
        self.closed = False
        self.stop_calls = 0

    def start_stream(self) -> None:
        self.active = True

    def stop_stream(self) -> None:
        self.stop_calls += 1
        self.active = False

    def close(self) -> None:
        self.closed = True
        self.active = False

    def is_active(self) -> bool:
        return self.active

    def read(self, frames: int, exception_on_overflow: bool = True) -> bytes:
        raise AssertionError("the source uses callback mode; read() blocks the caller")

    def deliver(self, frames: np.ndarray, status: int = 0, time_info: dict[str, float] | None = None) -> int:
        """One PortAudio callback with these int16 frames ((n,) mono or (n, channels))."""
        data = np.ascontiguousarray(frames, dtype="<i2")
        info = time_info if time_info is not None else {"input_buffer_adc_time": 0.0, "current_time": 0.0}
        result = self.callback(data.tobytes(), data.shape[0], info, status)
        assert result[0] is None
        return int(result[1])


class PatchedPyAudio:
    """A factory making real ``pyaudio.PyAudio`` objects whose ``open`` returns a FakeStream."""

    def __init__(
        self,
        open_error: Exception | None = None,
        refused_channels: tuple[int, ...] = (),
        refusal: ValueError | None = None,
    ) -> None:
        self.pyaudio = require_module("pyaudio")
        self.open_error = open_error
        self.refused_channels = refused_channels
        # What CoreAudio/WASAPI say for a stereo-only device (PortAudio's ALSA host adapts the
        # channel count itself, so a real ALSA device never refuses mono).
        self.refusal = refusal or ValueError("Invalid number of channels", -9998)
        self.streams: list[FakeStream] = []
        self.format_queries: list[dict[str, Any]] = []

    def __call__(self) -> Any:
        pa = self.pyaudio.PyAudio()
        real_is_format_supported = pa.is_format_supported

        def is_format_supported(rate: float, **kwargs: Any) -> bool:
            self.format_queries.append({"rate": rate, **kwargs})
            if kwargs.get("input_channels") in self.refused_channels:
                raise self.refusal
            return bool(real_is_format_supported(rate, **kwargs))

        def fake_open(**kwargs: Any) -> FakeStream:
            if self.open_error is not None:
                raise self.open_error
            stream = FakeStream(**kwargs)
            self.streams.append(stream)
            return stream

        pa.is_format_supported = is_format_supported
        pa.open = fake_open
        return pa

    @property
    def stream(self) -> FakeStream:
        (stream,) = self.streams
        return stream


class Collector:
    def __init__(self, accept: Callable[[AudioChunk], bool] = lambda chunk: True) -> None:
        self.accept = accept
        self.chunks: list[AudioChunk] = []

    def __call__(self, chunk: AudioChunk) -> bool:
        if not self.accept(chunk):
            return False
        self.chunks.append(chunk)
        return True


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


@pytest.fixture()
def alsa_devices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    require_module("pyaudio")
    return use_alsa_config(tmp_path, DEVICES_CONF, monkeypatch)


@pytest.fixture()
def started() -> Iterator[list[MicrophoneAudioSource]]:
    """Sources to stop at the end of the test whatever happens."""
    sources: list[MicrophoneAudioSource] = []
    yield sources
    for source in sources:
        source.stop()


def start(
    sources: list[MicrophoneAudioSource],
    factory: PatchedPyAudio,
    sink: Callable[[AudioChunk], bool],
    **config: Any,
) -> MicrophoneAudioSource:
    source = MicrophoneAudioSource(MicrophoneSource(**config), pyaudio_factory=factory)
    sources.append(source)
    source.start(sink)
    return source


def by_name(name: str) -> InputDevice:
    (device,) = [d for d in list_input_devices() if d.name == name]
    return device


# --- device listing and selection ---------------------------------------------------------------


def test_list_input_devices_reports_what_portaudio_sees(alsa_devices: Path) -> None:
    devices = {d.name: d for d in list_input_devices()}
    assert set(devices) == {"default", "usb_mic_left", "USB_Mic_Right", "sysdefault"}
    assert [d.name for d in devices.values() if d.is_default] == ["default"]
    assert devices["default"].default_sample_rate == 48000
    assert devices["usb_mic_left"].default_sample_rate == 44100
    assert all(d.max_input_channels >= 1 for d in devices.values())


def test_list_input_devices_with_no_capture_device_is_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_module("pyaudio")
    use_alsa_config(tmp_path, NO_DEVICES_CONF, monkeypatch)
    assert list_input_devices() == []


DEVICES = [
    InputDevice(0, "HDA Intel PCH: ALC3246 Analog (hw:0,0)", 2, 44100, False),
    InputDevice(1, "hdmi", 8, 48000, False),
    InputDevice(3, "USB PnP Sound Device: Audio (hw:1,0)", 1, 48000, False),
    InputDevice(5, "sysdefault", 128, 48000, False),
    InputDevice(7, "default", 128, 44100, True),
]


@pytest.mark.parametrize(
    ("spec", "index"),
    [
        (None, 7),
        ("", 7),
        ("  ", 7),
        ("3", 3),
        (3, 3),
        (" 5 ", 5),
        ("usb pnp", 3),
        ("ALC3246", 0),
        ("default", 7),  # the exact name wins over 'sysdefault', which contains it
        ("SYSDEFAULT", 5),
    ],
)
def test_select_device(spec: str | int | None, index: int) -> None:
    assert select_device(DEVICES, spec).index == index


FULL_LISTING = (
    "0: 'HDA Intel PCH: ALC3246 Analog (hw:0,0)' (2 ch, 44100 Hz); 1: 'hdmi' (8 ch, 48000 Hz); "
    "3: 'USB PnP Sound Device: Audio (hw:1,0)' (1 ch, 48000 Hz); 5: 'sysdefault' (128 ch, 48000 Hz); "
    "7: 'default' (128 ch, 44100 Hz, default)"
)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("webcam", f"no input device name contains 'webcam'; input devices: {FULL_LISTING}"),
        ("4", f"no input device has index 4; input devices: {FULL_LISTING}"),
        (
            "hw:",
            "'hw:' matches 2 input devices: 0: 'HDA Intel PCH: ALC3246 Analog (hw:0,0)' (2 ch, 44100 Hz); "
            "3: 'USB PnP Sound Device: Audio (hw:1,0)' (1 ch, 48000 Hz); "
            "use the index or a longer part of the name",
        ),
        ("EFAULT", "'EFAULT' matches 2 input devices: 5: 'sysdefault'"),
    ],
)
def test_select_device_errors_list_the_candidates(spec: str, message: str) -> None:
    with pytest.raises(MicrophoneError) as caught:
        select_device(DEVICES, spec)
    assert str(caught.value).startswith(message)


def test_select_device_without_default_or_devices() -> None:
    no_default = [d for d in DEVICES if not d.is_default]
    with pytest.raises(MicrophoneError, match="no default input device; set device to one of: 0: "):
        select_device(no_default, None)
    with pytest.raises(MicrophoneError, match="no audio input devices found"):
        select_device([], "1")


# --- opening ------------------------------------------------------------------------------------


def test_start_opens_the_default_device_at_its_default_rate_in_mono_callback_mode(
    alsa_devices: Path, started: list[MicrophoneAudioSource]
) -> None:
    factory = PatchedPyAudio()
    source = start(started, factory, Collector(), id="kitchen", chunk_ms=50)

    kwargs = factory.stream.kwargs
    default = by_name("default")
    assert kwargs["input_device_index"] == default.index
    assert (kwargs["rate"], kwargs["channels"], kwargs["format"]) == (48000, 1, PA_INT16)
    assert kwargs["frames_per_buffer"] == 2400 and kwargs["input"] is True
    assert callable(kwargs["stream_callback"]) and factory.stream.active
    assert isinstance(source, AudioSource) and source.stats().running and not source.finished
    description = json.loads(json.dumps(source.describe()))
    assert description == {
        "type": "microphone",
        "id": "kitchen",
        "device": None,
        "device_index": default.index,
        "device_name": "default",
        "capture_rate_hz": 48000,
        "channels": 1,
        "sample_rate_hz": 16000,
        "chunk_ms": 50,
        "buffer_seconds": 2.0,
    }


def test_start_picks_a_device_by_name_or_index_and_honours_the_configured_rate(
    alsa_devices: Path, started: list[MicrophoneAudioSource]
) -> None:
    right = by_name("USB_Mic_Right")
    by_text = PatchedPyAudio()
    start(started, by_text, Collector(), id="a", device="mic_right", sample_rate=22050)
    by_index = PatchedPyAudio()
    start(started, by_index, Collector(), id="b", device=str(right.index))

    assert by_text.stream.kwargs["input_device_index"] == right.index
    assert by_text.stream.kwargs["rate"] == 22050
    assert by_index.stream.kwargs["input_device_index"] == right.index
    assert by_index.stream.kwargs["rate"] == 44100  # the device's default


def test_an_ambiguous_device_name_fails_start_with_the_list(
    alsa_devices: Path, started: list[MicrophoneAudioSource]
) -> None:
    factory = PatchedPyAudio()
    source = MicrophoneAudioSource(MicrophoneSource(device="usb_mic"), pyaudio_factory=factory)
    with pytest.raises(MicrophoneError, match="'usb_mic' matches 2 input devices") as caught:
        source.start(Collector())
    assert "usb_mic_left" in str(caught.value) and "USB_Mic_Right" in str(caught.value)
    stats = source.stats()
    assert stats.error == str(caught.value) and not stats.running
    assert factory.streams == []


def test_no_input_device_fails_start_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    factory = PatchedPyAudio()
    use_alsa_config(tmp_path, NO_DEVICES_CONF, monkeypatch)
    source = MicrophoneAudioSource(MicrophoneSource(), pyaudio_factory=factory)
    with pytest.raises(MicrophoneError, match="no audio input devices found"):
        source.start(Collector())
    assert "no audio input devices found" in (source.stats().error or "")


def test_an_open_error_names_the_device_and_portaudio_reason(alsa_devices: Path) -> None:
    factory = PatchedPyAudio(open_error=OSError(-9997, "Invalid sample rate"))
    source = MicrophoneAudioSource(MicrophoneSource(device="usb_mic_left"), pyaudio_factory=factory)
    with pytest.raises(MicrophoneError) as caught:
        source.start(Collector())
    message = str(caught.value)
    assert "'usb_mic_left' at 44100 Hz" in message
    assert "Invalid sample rate (PortAudio error -9997)" in message
    assert source.stats().error == message and not source.stats().running


def test_an_unsupported_rate_is_refused_before_opening(alsa_devices: Path) -> None:
    factory = PatchedPyAudio(refused_channels=(1, 2), refusal=ValueError("Invalid sample rate", -9997))
    source = MicrophoneAudioSource(MicrophoneSource(device="usb_mic_left"), pyaudio_factory=factory)
    with pytest.raises(MicrophoneError) as caught:
        source.start(Collector())
    message = str(caught.value)
    assert "'usb_mic_left' cannot capture 16-bit audio at 44100 Hz" in message
    assert "1 ch: Invalid sample rate (PortAudio error -9997)" in message
    assert "its default rate is 44100 Hz" in message
    assert factory.streams == [] and source.stats().error == message


# --- capture ------------------------------------------------------------------------------------


def tone(frequency_hz: float, rate_hz: int, frames: int, start_frame: int = 0) -> np.ndarray:
    t = (start_frame + np.arange(frames)) / rate_hz
    return np.rint(10_000 * np.sin(2 * np.pi * frequency_hz * t)).astype(np.int16)


def test_48k_capture_is_resampled_to_16k_chunks_of_chunk_ms(
    alsa_devices: Path, started: list[MicrophoneAudioSource]
) -> None:
    factory = PatchedPyAudio()
    sink = Collector()
    start(started, factory, sink, sample_rate=48000, chunk_ms=100)
    blocks = 10
    for i in range(blocks):
        assert factory.stream.deliver(tone(1000, 48000, 4800, i * 4800)) == PA_CONTINUE
    # 48000 frames make 16000 samples, minus the resampler's 2 ms look-ahead: 9 whole chunks.
    wait_until(lambda: len(sink.chunks) == 9, "9 chunks")

    assert [c.samples.size for c in sink.chunks] == [1600] * 9
    assert all(c.samples.dtype == np.float32 and c.stream == "mic" and not c.final for c in sink.chunks)
    stream = np.concatenate([c.samples for c in sink.chunks])
    assert peak_hz(stream[1600:]) == pytest.approx(1000, abs=2)
    assert np.max(np.abs(stream[1600:])) == pytest.approx(10_000, rel=0.01)
    captured = [c.captured_at for c in sink.chunks]
    assert captured == sorted(captured) and captured[-1] <= time.time()


def peak_hz(samples: np.ndarray, rate_hz: int = 16_000) -> float:
    """The frequency of the strongest FFT bin."""
    return float(np.argmax(np.abs(np.fft.rfft(samples))) * rate_hz / samples.size)


def test_a_device_that_refuses_mono_is_captured_in_stereo_and_downmixed(
    alsa_devices: Path, started: list[MicrophoneAudioSource]
) -> None:
    factory = PatchedPyAudio(refused_channels=(1,))
    sink = Collector()
    source = start(started, factory, sink, sample_rate=16000, chunk_ms=10, device="usb_mic_left")
    assert factory.stream.kwargs["channels"] == 2
    assert [q["input_channels"] for q in factory.format_queries] == [1, 2]
    left = np.full(160, 1000, dtype=np.int16)
    right = np.full(160, 3000, dtype=np.int16)
    factory.stream.deliver(np.stack([left, right], axis=1))
    wait_until(lambda: len(sink.chunks) == 1, "a chunk")

    np.testing.assert_array_equal(sink.chunks[0].samples, np.full(160, 2000, dtype=np.float32))
    assert source.describe()["channels"] == 2


def test_a_full_buffer_drops_the_newest_blocks_and_counts_them(
    alsa_devices: Path, started: list[MicrophoneAudioSource]
) -> None:
    release = threading.Event()
    in_sink = threading.Event()

    def slow_sink(chunk: AudioChunk) -> bool:
        # An engine stuck on one chunk (a real sink must not block; this one stands for a pump
        # that fell behind).
        in_sink.set()
        release.wait(WAIT_SECONDS)
        return True

    sink = Collector(accept=slow_sink)
    factory = PatchedPyAudio()
    # 16 kHz capture, no resampling: one 100 ms block is one chunk; the buffer holds 5 blocks.
    source = start(started, factory, sink, sample_rate=16000, chunk_ms=100, buffer_seconds=0.5)
    factory.stream.deliver(np.full(1600, 0, dtype=np.int16))
    assert in_sink.wait(WAIT_SECONDS)
    started_at = time.monotonic()
    for value in range(1, 11):
        assert factory.stream.deliver(np.full(1600, value, dtype=np.int16)) == PA_CONTINUE
    assert time.monotonic() - started_at < 0.5  # the callback never waited on the stuck sink
    assert source.stats().dropped_chunks == 5
    release.set()
    wait_until(lambda: len(sink.chunks) == 6, "the buffered chunks")

    assert [float(c.samples[0]) for c in sink.chunks] == [0, 1, 2, 3, 4, 5]
    stats = source.stats()
    assert (stats.chunks, stats.dropped_chunks, stats.overflows) == (6, 5, 0)


def test_portaudio_input_overflow_flags_are_counted(
    alsa_devices: Path, started: list[MicrophoneAudioSource]
) -> None:
    factory = PatchedPyAudio()
    source = start(started, factory, Collector(), sample_rate=16000, chunk_ms=10)
    silence = np.zeros(160, dtype=np.int16)
    factory.stream.deliver(silence, status=PA_INPUT_OVERFLOW)
    factory.stream.deliver(silence)
    factory.stream.deliver(silence, status=PA_INPUT_OVERFLOW | 1)  # with paInputUnderflow
    assert source.stats().overflows == 2


def test_a_refusing_sink_counts_dropped_chunks(
    alsa_devices: Path, started: list[MicrophoneAudioSource]
) -> None:
    factory = PatchedPyAudio()
    calls: list[AudioChunk] = []

    def full_sink(chunk: AudioChunk) -> bool:
        calls.append(chunk)
        return len(calls) != 2

    source = start(started, factory, full_sink, sample_rate=16000, chunk_ms=10)
    for _ in range(3):
        factory.stream.deliver(np.zeros(160, dtype=np.int16))
    wait_until(lambda: len(calls) == 3, "3 sink calls")
    stats = source.stats()
    assert (stats.chunks, stats.dropped_chunks) == (2, 1)


def test_captured_at_is_the_wall_time_of_the_last_sample_from_portaudio_timing(
    alsa_devices: Path, started: list[MicrophoneAudioSource]
) -> None:
    factory = PatchedPyAudio()
    sink = Collector()
    start(started, factory, sink, sample_rate=16000, chunk_ms=100)
    # The block's first frame reached the ADC 0.5 s ago (stream clock); it lasts 0.1 s, so its
    # last frame was captured about 0.4 s before the callback.
    before = time.time()
    factory.stream.deliver(
        np.zeros(1600, dtype=np.int16), time_info={"input_buffer_adc_time": 99.5, "current_time": 100.0}
    )
    after = time.time()
    wait_until(lambda: len(sink.chunks) == 1, "a chunk")
    assert before - 0.4 - 0.01 <= sink.chunks[0].captured_at <= after - 0.4 + 0.01


def test_stop_closes_the_stream_and_the_callback_then_asks_portaudio_to_complete(
    alsa_devices: Path,
) -> None:
    factory = PatchedPyAudio()
    source = MicrophoneAudioSource(MicrophoneSource(sample_rate=16000), pyaudio_factory=factory)
    source.start(Collector())
    stream = factory.stream
    started_at = time.monotonic()
    source.stop()
    assert time.monotonic() - started_at < 0.5
    assert stream.stop_calls == 1 and stream.closed and not source.stats().running
    assert stream.deliver(np.zeros(160, dtype=np.int16)) == PA_COMPLETE
    source.stop()  # idempotent
    assert stream.stop_calls == 1


def test_a_stream_that_dies_ends_the_stream_and_the_device_is_opened_again(
    alsa_devices: Path, started: list[MicrophoneAudioSource]
) -> None:
    factory = PatchedPyAudio()
    sink = Collector()
    source = start(started, factory, sink, sample_rate=16000, chunk_ms=100)
    first = factory.streams[0]
    first.deliver(np.full(2400, 7, dtype=np.int16))  # one whole chunk and half of the next
    wait_until(lambda: len(sink.chunks) == 1, "the whole chunk")
    first.active = False  # PortAudio ended the stream: device unplugged, sound server gone
    wait_until(lambda: len(sink.chunks) == 2, "the final chunk")

    final = sink.chunks[1]
    assert final.final and final.samples.size == 800 and float(final.samples[0]) == 7
    assert "stopped delivering audio" in (source.stats().error or "")
    assert first.closed
    wait_until(lambda: len(factory.streams) == 2 and source.stats().running, "the device opened again")
    factory.streams[1].deliver(np.full(1600, 9, dtype=np.int16))
    wait_until(lambda: len(sink.chunks) == 3, "a chunk from the reopened device")
    assert float(sink.chunks[2].samples[0]) == 9 and not sink.chunks[2].final
    # The error stays for health until the next one; the source is running again.
    stats = source.stats()
    assert stats.running and "stopped delivering audio" in (stats.error or "")


def test_a_device_still_away_is_tried_again_until_it_is_back(
    alsa_devices: Path, started: list[MicrophoneAudioSource], caplog: pytest.LogCaptureFixture
) -> None:
    factory = PatchedPyAudio()
    source = start(started, factory, Collector(), sample_rate=16000)
    factory.open_error = OSError(-9996, "Invalid device")
    attempts_before = len(factory.format_queries)
    factory.streams[0].active = False
    wait_until(lambda: len(factory.format_queries) >= attempts_before + 2, "two failed reopenings")

    stats = source.stats()
    assert not stats.running and "Invalid device (PortAudio error -9996)" in (stats.error or "")
    unavailable = [r for r in caplog.records if "still unavailable" in r.getMessage()]
    assert len(unavailable) == 1  # one line per new reason, not one per try
    factory.open_error = None
    wait_until(lambda: source.stats().running, "the device back")
    assert len(factory.streams) == 2 and factory.streams[1].active


def test_stop_while_the_device_is_away_ends_the_wait_for_it(
    alsa_devices: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A back-off far longer than stop's join: the pump ends only if stop wakes it.
    monkeypatch.setattr(microphone, "REOPEN_FIRST_SECONDS", 3600.0)
    factory = PatchedPyAudio(open_error=None)
    source = MicrophoneAudioSource(MicrophoneSource(id="away", sample_rate=16000), pyaudio_factory=factory)
    source.start(Collector())
    factory.open_error = OSError(-9996, "Invalid device")
    factory.streams[0].active = False
    wait_until(lambda: not source.stats().running, "the loss to be noticed")
    source.stop()
    assert not [t for t in threading.enumerate() if t.name == "audio-mic-away" and t.is_alive()]
    assert len(factory.streams) == 1 and not source.stats().running


def test_a_sink_that_raises_stops_capture_with_the_error_visible(
    alsa_devices: Path, started: list[MicrophoneAudioSource]
) -> None:
    factory = PatchedPyAudio()

    def broken_sink(chunk: AudioChunk) -> bool:
        raise KeyError("engine bug")

    source = start(started, factory, broken_sink, sample_rate=16000, chunk_ms=10)
    factory.stream.deliver(np.zeros(160, dtype=np.int16))
    wait_until(lambda: not source.stats().running, "the pump to stop")
    assert "engine bug" in (source.stats().error or "")
    assert factory.stream.deliver(np.zeros(160, dtype=np.int16)) == PA_COMPLETE


# --- without PyAudio ----------------------------------------------------------------------------


def test_missing_pyaudio_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyaudio", None)  # makes `import pyaudio` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'edge-agent\[mic\]'.*portaudio19-dev"):
        list_input_devices()
    source = MicrophoneAudioSource(MicrophoneSource())
    with pytest.raises(ImportError, match="needs PyAudio"):
        source.start(Collector())
    assert "edge-agent[mic]" in (source.stats().error or "")


def test_the_module_imports_without_pyaudio() -> None:
    code = (
        "import sys; sys.modules['pyaudio'] = None\n"
        "import edge_agent.audio.microphone, edge_agent.cli.devices\n"
        "print('ok')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_portaudio_constants_match_pyaudio() -> None:
    pyaudio = require_module("pyaudio")
    assert (pyaudio.paInt16, pyaudio.paContinue, pyaudio.paComplete, pyaudio.paInputOverflow) == (
        PA_INT16,
        PA_CONTINUE,
        PA_COMPLETE,
        PA_INPUT_OVERFLOW,
    )


# --- the real PortAudio stream, end to end ------------------------------------------------------

SMOKE_SCRIPT = """
import json, sys, threading
import numpy as np
from edge_agent.audio.microphone import MicrophoneAudioSource
from edge_agent.config import MicrophoneSource

chunks, enough = [], threading.Event()
def sink(chunk):
    chunks.append(chunk)
    if len(chunks) >= 10:
        enough.set()
    return True

source = MicrophoneAudioSource(MicrophoneSource(id="smoke", device="recording", sample_rate=48000))
source.start(sink)
enough.wait(20)
source.stop()
stats = source.stats()
np.save(sys.argv[1], np.concatenate([c.samples for c in chunks[:10]]))
print(json.dumps({"sizes": [c.samples.size for c in chunks[:10]], "error": stats.error,
                  "describe": source.describe()}))
"""


def test_real_portaudio_stream_from_an_alsa_file_pcm(tmp_path: Path) -> None:
    require_module("pyaudio")
    frames = 2 * 48000
    raw = tmp_path / "tone48k.raw"
    raw.write_bytes(tone(440, 48000, frames).astype("<i2").tobytes())
    # The ALSA `file` plugin reads capture data from `infile` (raw s16le, not paced in real time)
    # over a null slave. PortAudio lists it as a device named after the PCM. The `default` PCM is
    # there because PortAudio 19.6 aborts on a configuration without one (see NO_DEVICES_CONF).
    conf = tmp_path / "asound.conf"
    conf.write_text(
        "pcm.!default { type null }\n"
        "pcm.recording {\n"
        "    type file\n"
        "    slave.pcm { type null }\n"
        '    file "/dev/null"\n'
        f'    infile "{raw}"\n'
        '    format "raw"\n'
        "}\n"
    )
    output = tmp_path / "captured.npy"
    result = subprocess.run(
        [sys.executable, "-c", SMOKE_SCRIPT, str(output)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env={**os.environ, "ALSA_CONFIG_PATH": str(conf), "JACK_NO_START_SERVER": "1"},
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["sizes"] == [1600] * 10 and report["error"] is None
    assert report["describe"]["device_name"] == "recording" and report["describe"]["capture_rate_hz"] == 48000
    # The recording went through PortAudio, the pump and the resampler: a 440 Hz tone at 16 kHz.
    captured = np.load(output)[1600:]
    assert peak_hz(captured) == pytest.approx(440, abs=2)
    expected = tone(440, 16000, captured.size + 1600)[1600:].astype(np.float32)
    assert np.corrcoef(captured, expected)[0, 1] > 0.99

"""Microphone capture through PyAudio (PortAudio), converted to the agent's 16 kHz mono contract.

Threads and buffers::

    PortAudio callback thread          pump thread ("audio-mic-<id>")
    int16 block of chunk_ms  --put_nowait-->  bounded queue  --get-->  downmix, resample to
    (never blocks, never raises)       (buffer_seconds)          16 kHz, cut chunk_ms chunks -> sink

* The callback only timestamps the block and offers it to a queue holding ``buffer_seconds`` of
  audio. When the queue is full the newest block is dropped and counted as a dropped chunk (one
  block is one ``chunk_ms`` of capture); PortAudio's input-overflow flag counts an overflow.
* The pump converts: int16 -> float32 (16-bit units), channel average when the device had to be
  opened in stereo, :class:`~edge_agent.audio.resample.Resampler` to 16 kHz, then exact
  ``chunk_ms`` chunks. A sink refusal counts a dropped chunk: a live microphone cannot wait.
* ``captured_at`` is the wall time of the chunk's last sample: the callback's arrival time
  corrected by PortAudio's ADC timestamp when the host API provides one, carried through the
  resampler's delay.
* A device that goes away while capturing (a USB microphone unplugged, the sound server gone:
  PortAudio ends the stream) is logged and kept in :meth:`stats` as the error; the stream is
  ended (a final chunk) and the pump opens the device again, first after
  ``REOPEN_FIRST_SECONDS`` then at most every ``REOPEN_MAX_SECONDS``, with a fresh PortAudio
  (device lists are read when PortAudio initialises), until it is back or the source is stopped.
  The first opening, in :meth:`start`, is not retried: a wrong device name fails at once.

PyAudio is optional (the ``mic`` extra) and imported only when a PyAudio object is made; the
object comes from an injectable factory, so tests can hand in a real ``pyaudio.PyAudio`` whose
``open`` returns a fake stream.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from edge_agent.audio.resample import Resampler
from edge_agent.audio.sources import (
    JOIN_TIMEOUT_SECONDS,
    SAMPLE_RATE_HZ,
    AudioChunk,
    FixedChunker,
    LossLog,
    Sink,
    SourceStats,
)
from edge_agent.config import MicrophoneSource

logger = logging.getLogger(__name__)

PYAUDIO_INSTALL_HINT = (
    "pip install 'edge-agent[mic]' (PyAudio compiles against PortAudio: on Debian or Raspberry Pi OS "
    "run `sudo apt-get install portaudio19-dev` first)"
)

# PortAudio constants (portaudio.h, stable ABI), so this module runs without PyAudio installed
# when a factory is injected. A test checks they equal pyaudio's.
PA_INT16 = 8  # paInt16
PA_CONTINUE = 0  # paContinue
PA_COMPLETE = 1  # paComplete
PA_INPUT_OVERFLOW = 2  # paInputOverflow status flag

# How often the idle pump checks that the stream is still alive and that stop was not asked.
_POLL_SECONDS = 0.1
# Reopening a device that went away: the first try soon (a sound server restarting, a USB
# re-enumeration), then doubling to the maximum, so a long absence costs little.
REOPEN_FIRST_SECONDS = 0.5
REOPEN_MAX_SECONDS = 5.0
_INT16_MIN, _INT16_MAX = -32768.0, 32767.0
_INDEX_PATTERN = re.compile(r"\d+", re.ASCII)

PyAudioFactory = Callable[[], Any]


class MicrophoneError(RuntimeError):
    """The microphone cannot be opened or used; the message says which device and why."""


@dataclass(frozen=True)
class InputDevice:
    index: int  # PortAudio device index
    name: str
    max_input_channels: int
    default_sample_rate: int  # Hz
    is_default: bool

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def import_pyaudio() -> ModuleType:
    """The ``pyaudio`` module, or an ImportError that says how to install it."""
    try:
        import pyaudio
    except ImportError as error:
        raise ImportError(
            f"microphone capture needs PyAudio, which is not installed: {PYAUDIO_INSTALL_HINT}"
        ) from error
    return pyaudio


def default_pyaudio_factory() -> Any:
    """A new ``pyaudio.PyAudio()`` (initialises PortAudio; the caller terminates it)."""
    return import_pyaudio().PyAudio()


def list_input_devices(pyaudio_factory: PyAudioFactory = default_pyaudio_factory) -> list[InputDevice]:
    """Every PortAudio device with at least one input channel, in index order."""
    pa = pyaudio_factory()
    try:
        return input_devices(pa)
    finally:
        pa.terminate()


def input_devices(pa: Any) -> list[InputDevice]:
    """The input devices of an initialised PyAudio object."""
    try:
        default_index: int | None = int(pa.get_default_input_device_info()["index"])
    except OSError:  # PyAudio raises IOError when there is no default input device
        default_index = None
    devices = []
    for index in range(pa.get_device_count()):
        info: Mapping[str, Any] = pa.get_device_info_by_index(index)
        channels = int(info.get("maxInputChannels", 0))
        if channels < 1:
            continue
        devices.append(
            InputDevice(
                index=index,
                name=str(info.get("name", f"device {index}")),
                max_input_channels=channels,
                default_sample_rate=round(float(info.get("defaultSampleRate", SAMPLE_RATE_HZ))),
                is_default=index == default_index,
            )
        )
    return devices


def select_device(devices: Sequence[InputDevice], spec: str | int | None) -> InputDevice:
    """The device a ``device`` setting names.

    ``None`` (or blank) is the default input device; digits are a device index; anything else is
    a case-insensitive part of the name, which must match one device (a name equal to the text
    wins over names that merely contain it, so ``default`` is not ambiguous with ``sysdefault``).
    """
    if not devices:
        raise MicrophoneError(
            "no audio input devices found: PortAudio sees no capture device "
            "(check `arecord -l`, and that this user may use the sound card, e.g. is in the 'audio' group)"
        )
    text = "" if spec is None else str(spec).strip()
    if not text:
        for device in devices:
            if device.is_default:
                return device
        raise MicrophoneError(f"there is no default input device; set device to one of: {_listing(devices)}")
    if _INDEX_PATTERN.fullmatch(text):
        for device in devices:
            if device.index == int(text):
                return device
        raise MicrophoneError(f"no input device has index {text}; input devices: {_listing(devices)}")
    wanted = text.casefold()
    matches = [d for d in devices if wanted in d.name.casefold()]
    exact = [d for d in matches if d.name.casefold() == wanted]
    if len(exact) == 1:
        return exact[0]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise MicrophoneError(f"no input device name contains {text!r}; input devices: {_listing(devices)}")
    raise MicrophoneError(
        f"{text!r} matches {len(matches)} input devices: {_listing(matches)}; "
        "use the index or a longer part of the name"
    )


def _listing(devices: Sequence[InputDevice]) -> str:
    return "; ".join(
        f"{d.index}: {d.name!r} ({d.max_input_channels} ch, {d.default_sample_rate} Hz"
        f"{', default' if d.is_default else ''})"
        for d in devices
    )


def _portaudio_error_text(error: BaseException) -> str:
    """PyAudio's errors as words: ValueError(text, code) and OSError(code, text)."""
    args = error.args
    if len(args) == 2 and isinstance(args[0], str) and isinstance(args[1], int):
        return f"{args[0]} (PortAudio error {args[1]})"
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror} (PortAudio error {error.errno})"
    return str(error) or type(error).__name__


@dataclass(frozen=True)
class _Block:
    data: bytes  # interleaved int16 frames as PortAudio delivered them
    frames: int
    captured_at: float  # wall time of the block's last frame


class MicrophoneAudioSource:
    """A PortAudio input device as an :class:`~edge_agent.audio.sources.AudioSource`."""

    def __init__(
        self, config: MicrophoneSource, *, pyaudio_factory: PyAudioFactory = default_pyaudio_factory
    ) -> None:
        self.config = config
        self.stream_id = config.id
        self._pyaudio_factory = pyaudio_factory
        self._chunk_samples = SAMPLE_RATE_HZ * config.chunk_ms // 1000
        # The buffer holds whole blocks of chunk_ms: at least one, whatever the settings.
        self._buffer_blocks = max(1, round(config.buffer_seconds * 1000 / config.chunk_ms))
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._pa: Any = None
        self._stream: Any = None
        self._pump: threading.Thread | None = None
        # Blocks, or None: stop()'s wake-up call to an idle pump.
        self._queue: queue.Queue[_Block | None] = queue.Queue(maxsize=self._buffer_blocks)
        self._device: InputDevice | None = None
        self._capture_rate_hz: int | None = None
        self._channels: int | None = None
        # Counters with one writer each: the callback owns the first two, the pump the others.
        self._overflows = 0
        self._buffer_drops = 0
        self._sink_drops = 0
        self._chunks = 0
        self._running = False
        self._error: str | None = None

    # --- AudioSource ------------------------------------------------------------------------

    def start(self, sink: Sink) -> None:
        """Open the device and start capturing; raises :class:`MicrophoneError` (or ImportError)."""
        with self._lock:
            if self._running:
                raise RuntimeError(f"audio source {self.stream_id!r} is already running")
            self._stopping.clear()
        pa, stream = self._open_device()
        logger.info("microphone %s: capturing from %s", self.stream_id, self._device_text())
        pump = threading.Thread(
            target=self._run_pump, args=(sink,), name=f"audio-mic-{self.stream_id}", daemon=True
        )
        with self._lock:
            self._pa, self._stream, self._pump = pa, stream, pump
            self._running = True
        pump.start()

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            pa, stream, pump = self._pa, self._stream, self._pump
            self._pa = self._stream = self._pump = None
        self._close_stream(stream)
        with contextlib.suppress(queue.Full):  # a full queue wakes the pump anyway
            self._queue.put_nowait(None)
        if pump is not None and pump is not threading.current_thread():
            pump.join(timeout=JOIN_TIMEOUT_SECONDS)
            if pump.is_alive():
                logger.warning("microphone %s: pump still busy after stop (sink blocking?)", self.stream_id)
        if pa is not None:
            pa.terminate()
        with self._lock:
            self._running = False

    def stats(self) -> SourceStats:
        with self._lock:
            return SourceStats(
                chunks=self._chunks,
                dropped_chunks=self._buffer_drops + self._sink_drops,
                overflows=self._overflows,
                running=self._running,
                error=self._error,
            )

    def describe(self) -> dict[str, object]:
        device = self._device
        return {
            "type": "microphone",
            "id": self.stream_id,
            "device": self.config.device,
            "device_index": device.index if device else None,
            "device_name": device.name if device else None,
            "capture_rate_hz": self._capture_rate_hz,
            "channels": self._channels,
            "sample_rate_hz": SAMPLE_RATE_HZ,
            "chunk_ms": self.config.chunk_ms,
            "buffer_seconds": self.config.buffer_seconds,
        }

    @property
    def finished(self) -> bool:
        return False  # a microphone never runs out

    # --- opening ----------------------------------------------------------------------------

    def _open_device(self) -> tuple[Any, Any]:
        """A new PortAudio and the configured device's stream, started; a failure is kept in stats."""
        try:
            pa = self._pyaudio_factory()
        except ImportError as error:
            self._set_error(str(error))
            raise
        except OSError as error:
            message = f"cannot initialise PortAudio: {_portaudio_error_text(error)}"
            self._set_error(message)
            raise MicrophoneError(message) from error
        try:
            stream = self._open(pa)
        except (MicrophoneError, OSError) as error:
            message = str(error) if isinstance(error, MicrophoneError) else _portaudio_error_text(error)
            self._set_error(message)
            pa.terminate()
            if isinstance(error, MicrophoneError):
                raise
            raise MicrophoneError(f"cannot query the audio devices: {message}") from error
        return pa, stream

    def _close_stream(self, stream: Any) -> None:
        if stream is None:
            return
        # Stopping the stream first: PortAudio returns once the last callback has finished, so
        # nothing is added to the buffer after this. A stream that died may refuse: it is over.
        for action in (stream.stop_stream, stream.close):
            try:
                action()
            except OSError as error:
                logger.debug("microphone %s: %s", self.stream_id, _portaudio_error_text(error))

    def _device_text(self) -> str:
        device = self._device
        return (
            f"{device.index if device else '?'} {device.name if device else '?'!r} at "
            f"{self._capture_rate_hz} Hz, {self._channels} channel(s)"
        )

    def _open(self, pa: Any) -> Any:
        device = select_device(input_devices(pa), self.config.device)
        rate_hz = self.config.sample_rate or device.default_sample_rate
        channels = self._channels_for(pa, device, rate_hz)
        self._device, self._capture_rate_hz, self._channels = device, rate_hz, channels
        # One PortAudio buffer is one chunk_ms of capture, so a block dropped is a chunk dropped.
        frames_per_block = max(1, round(rate_hz * self.config.chunk_ms / 1000))
        self._queue = queue.Queue(maxsize=self._buffer_blocks)
        try:
            stream = pa.open(
                format=PA_INT16,
                channels=channels,
                rate=rate_hz,
                input=True,
                input_device_index=device.index,
                frames_per_buffer=frames_per_block,
                stream_callback=self._on_audio,
                start=False,
            )
        except (OSError, ValueError) as error:
            raise MicrophoneError(
                f"cannot open input device {device.index} {device.name!r} at {rate_hz} Hz, "
                f"{channels} channel(s): {_portaudio_error_text(error)}"
            ) from error
        try:
            stream.start_stream()
        except (OSError, ValueError) as error:
            stream.close()
            raise MicrophoneError(
                f"cannot start input device {device.index} {device.name!r}: {_portaudio_error_text(error)}"
            ) from error
        return stream

    def _channels_for(self, pa: Any, device: InputDevice, rate_hz: int) -> int:
        """1 if the device accepts mono 16-bit at this rate, else 2 (downmixed by the pump)."""
        reasons = []
        for channels in (1, 2):
            if channels > device.max_input_channels:
                break
            try:
                pa.is_format_supported(
                    rate_hz, input_device=device.index, input_channels=channels, input_format=PA_INT16
                )
            except ValueError as error:
                reasons.append(f"{channels} ch: {_portaudio_error_text(error)}")
                continue
            return channels
        raise MicrophoneError(
            f"input device {device.index} {device.name!r} cannot capture 16-bit audio at {rate_hz} Hz "
            f"({'; '.join(reasons)}); its default rate is {device.default_sample_rate} Hz"
        )

    # --- PortAudio's callback thread --------------------------------------------------------

    def _on_audio(
        self, in_data: bytes | None, frame_count: int, time_info: Mapping[str, float], status_flags: int
    ) -> tuple[None, int]:
        # Runs on PortAudio's thread: constant time, never blocks, never raises.
        arrived_at = time.time()
        try:
            if status_flags & PA_INPUT_OVERFLOW:
                self._overflows += 1
            if in_data:
                captured_at = self._last_frame_wall_time(arrived_at, frame_count, time_info)
                try:
                    self._queue.put_nowait(_Block(bytes(in_data), frame_count, captured_at))
                except queue.Full:
                    self._buffer_drops += 1  # the newest block goes: what is queued is older
        except Exception:
            logger.exception("microphone %s: error in the audio callback", self.stream_id)
        return None, PA_COMPLETE if self._stopping.is_set() else PA_CONTINUE

    def _last_frame_wall_time(self, arrived_at: float, frames: int, time_info: Mapping[str, float]) -> float:
        rate_hz = self._capture_rate_hz or SAMPLE_RATE_HZ
        adc_time = time_info.get("input_buffer_adc_time", 0.0) if time_info else 0.0
        now_stream_time = time_info.get("current_time", 0.0) if time_info else 0.0
        if adc_time > 0 and now_stream_time > 0 and 0 <= now_stream_time - adc_time < 1.0:
            # The ADC time is the block's first frame on the stream clock: move it to the wall clock.
            last_frame = arrived_at - (now_stream_time - adc_time) + (frames - 1) / rate_hz
            return min(last_frame, arrived_at)
        return arrived_at

    # --- pump thread ------------------------------------------------------------------------

    def _run_pump(self, sink: Sink) -> None:
        try:
            while True:
                self._pump_blocks(sink, Resampler(self._capture_rate_hz or SAMPLE_RATE_HZ, SAMPLE_RATE_HZ))
                if self._stopping.is_set() or not self._reopen():
                    return
        except Exception as error:
            logger.exception("microphone %s: capture stopped by an error", self.stream_id)
            self._set_error(f"stopped by an error: {error!r}")
            self._stopping.set()  # the callback returns paComplete: no capture into a dead pump
        finally:
            with self._lock:
                self._running = False

    def _pump_blocks(self, sink: Sink, resampler: Resampler) -> None:
        """Converts and hands on the device's blocks until stop, or until the stream dies."""
        rate_hz = self._capture_rate_hz or SAMPLE_RATE_HZ
        channels = self._channels or 1
        chunker = FixedChunker(self._chunk_samples)
        drop_log = LossLog(self.stream_id, "chunks dropped (capture buffer or consumer queue full)")
        overflow_log = LossLog(self.stream_id, "input overflows reported by the audio driver")
        input_frames = 0  # frames the pump has received (dropped blocks are not in the stream)
        output_samples = 0  # 16 kHz samples cut into chunks so far
        last_frame_wall = 0.0
        while not self._stopping.is_set():
            try:
                block = self._queue.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                if not self._stream_alive():
                    if not self._stopping.is_set():
                        self._lost(sink, resampler, chunker, last_frame_wall)
                    return
                continue
            if block is None:
                continue  # stop() woke us up
            frames = np.frombuffer(block.data, dtype="<i2")
            if channels > 1:
                frames = frames[: frames.size - frames.size % channels].reshape(-1, channels)
                mono = frames.mean(axis=1, dtype=np.float32)
            else:
                mono = frames.astype(np.float32)
            input_frames += mono.size
            last_frame_wall = block.captured_at
            converted = np.clip(resampler.process(mono), _INT16_MIN, _INT16_MAX)
            for samples in chunker.push(converted):
                output_samples += samples.size
                # The chunk's last sample sits at this input position; the newest input frame
                # was captured at last_frame_wall, and frames are 1/rate apart.
                position = (output_samples - 1) * rate_hz / SAMPLE_RATE_HZ
                age_seconds = max(0.0, input_frames - 1 - position) / rate_hz
                self._deliver(
                    sink, AudioChunk(self.stream_id, "microphone", samples, last_frame_wall - age_seconds)
                )
            # Logged here, not in the callback, which must stay constant-time.
            drop_log.update(self._buffer_drops + self._sink_drops)
            overflow_log.update(self._overflows)

    def _deliver(self, sink: Sink, chunk: AudioChunk) -> None:
        chunk.samples.flags.writeable = False
        if sink(chunk):
            self._chunks += 1
        else:
            self._sink_drops += 1

    def _lost(self, sink: Sink, resampler: Resampler, chunker: FixedChunker, last_frame_wall: float) -> None:
        """The stream died under us: say so, and end the stream with what was captured."""
        message = (
            f"input device {self._device_text()} stopped delivering audio (unplugged, or its driver "
            "or sound server went away)"
        )
        self._set_error(message)
        with self._lock:
            self._running = False
        logger.error(
            "microphone %s: %s; opening it again every %g s at most",
            self.stream_id,
            message,
            REOPEN_MAX_SECONDS,
        )
        # The engine finishes this stream (its last detections); the reopened device starts anew.
        tail = chunker.push(np.clip(resampler.flush(), _INT16_MIN, _INT16_MAX)) + chunker.finish()
        last = np.concatenate(tail) if tail else np.zeros(0, dtype=np.float32)
        self._deliver(
            sink, AudioChunk(self.stream_id, "microphone", last, last_frame_wall or time.time(), final=True)
        )

    def _reopen(self) -> bool:
        """Open the device again, with back-off, until it works (True) or stop is asked (False)."""
        with self._lock:
            pa, stream = self._pa, self._stream
            self._pa = self._stream = None
        self._close_stream(stream)
        if pa is not None:
            pa.terminate()  # the next PortAudio reads the device list afresh
        lost_at = time.monotonic()
        delay = REOPEN_FIRST_SECONDS
        reported = self._error
        while not self._stopping.wait(delay):
            delay = min(delay * 2, REOPEN_MAX_SECONDS)
            try:
                pa, stream = self._open_device()
            except MicrophoneError as error:
                if str(error) != reported:  # each new reason once, not every try
                    logger.warning("microphone %s: still unavailable: %s", self.stream_id, error)
                    reported = str(error)
                continue
            with self._lock:
                installed = not self._stopping.is_set()
                if installed:
                    self._pa, self._stream = pa, stream
            if not installed:  # stop() came while opening: it cannot see this stream
                self._close_stream(stream)
                pa.terminate()
                return False
            logger.warning(
                "microphone %s: capturing again from %s, after %.1f s without the device",
                self.stream_id,
                self._device_text(),
                time.monotonic() - lost_at,
            )
            with self._lock:  # after the log line: whoever sees running again finds it logged
                self._running = not self._stopping.is_set()
            return True
        return False

    def _stream_alive(self) -> bool:
        stream = self._stream
        if stream is None:
            return False
        try:
            return bool(stream.is_active())
        except OSError:  # closed under us by stop()
            return False

    def _set_error(self, text: str) -> None:
        with self._lock:
            self._error = text

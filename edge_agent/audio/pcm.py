"""Raw PCM from the network: declared formats, conversion to the engine's 16 kHz mono, levels.

One audio contract inside the agent: float32 samples at 16 kHz, mono, in 16-bit units. Every
stream converts at its edge with a :class:`PcmConverter`, which keeps the remainder of a
partial frame and the resampler's state between chunks, so chunk boundaries never matter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edge_agent.audio.resample import Resampler

ENGINE_RATE_HZ = 16_000
SUPPORTED_WIDTHS = (1, 2, 4)  # bytes: unsigned 8-bit, s16le, s32le
MIN_RATE_HZ = 8_000
MAX_RATE_HZ = 192_000
MAX_CHANNELS = 8
# Level reported for digital silence instead of minus infinity.
SILENCE_DBFS = -120.0


class AudioFormatError(ValueError):
    """A declared or received audio format the agent cannot use; the message says why."""


@dataclass(frozen=True)
class PcmFormat:
    rate: int = ENGINE_RATE_HZ
    channels: int = 1
    width: int = 2  # bytes per sample

    def __post_init__(self) -> None:
        if not MIN_RATE_HZ <= self.rate <= MAX_RATE_HZ:
            raise AudioFormatError(f"sample rate {self.rate} Hz is outside {MIN_RATE_HZ}..{MAX_RATE_HZ} Hz")
        if not 1 <= self.channels <= MAX_CHANNELS:
            raise AudioFormatError(f"{self.channels} channels is outside 1..{MAX_CHANNELS}")
        if self.width not in SUPPORTED_WIDTHS:
            raise AudioFormatError(
                f"sample width {self.width} bytes is not supported (1 = u8, 2 = s16le, 4 = s32le)"
            )

    @property
    def frame_bytes(self) -> int:
        return self.channels * self.width

    @property
    def bytes_per_second(self) -> int:
        return self.rate * self.frame_bytes

    def describe(self) -> str:
        kind = {1: "u8", 2: "s16le", 4: "s32le"}[self.width]
        return f"{self.rate} Hz {self.channels} ch {kind}"

    @classmethod
    def from_properties(cls, properties: dict[str, str], base: PcmFormat | None = None) -> PcmFormat:
        """Format from MQTT 5 user properties ``rate``, ``channels``, ``width``; others keep ``base``."""
        base = base or cls()
        values = {"rate": base.rate, "channels": base.channels, "width": base.width}
        for name in values:
            if name in properties:
                try:
                    values[name] = int(properties[name])
                except ValueError:
                    raise AudioFormatError(
                        f"user property {name}={properties[name]!r} is not an integer"
                    ) from None
        return cls(**values)


#: What a stream that declares nothing sends: 16 kHz mono s16le.
DEFAULT_PCM = PcmFormat()


def decode_pcm(data: bytes, fmt: PcmFormat) -> np.ndarray:
    """Whole frames of ``data`` as float32 (frames, channels) in 16-bit units."""
    if fmt.width == 2:
        samples = np.frombuffer(data, dtype="<i2").astype(np.float32)
    elif fmt.width == 1:
        samples = (np.frombuffer(data, dtype=np.uint8).astype(np.float32) - 128.0) * 256.0
    else:
        samples = np.frombuffer(data, dtype="<i4").astype(np.float32) / 65536.0
    return samples.reshape(-1, fmt.channels)


class PcmConverter:
    """Bytes of one stream, in its declared format, to 16 kHz mono float32 (16-bit units)."""

    def __init__(self, fmt: PcmFormat) -> None:
        self.format = fmt
        self._remainder = b""
        self._resampler = Resampler(fmt.rate, ENGINE_RATE_HZ) if fmt.rate != ENGINE_RATE_HZ else None

    def convert(self, data: bytes) -> np.ndarray:
        data = self._remainder + data
        usable = len(data) - len(data) % self.format.frame_bytes
        self._remainder = data[usable:]
        if self.format.channels == 1 and self.format.width == 2:
            mono = np.frombuffer(data, dtype="<i2", count=usable // 2).astype(np.float32)  # the usual case
        else:
            frames = decode_pcm(data[:usable], self.format)
            mono = frames.mean(axis=1, dtype=np.float32) if self.format.channels > 1 else frames[:, 0]
        if self._resampler is not None:
            mono = self._resampler.process(mono)
        return np.ascontiguousarray(mono, dtype=np.float32)

    def finish(self) -> np.ndarray:
        """The resampler's tail at the end of the stream (a partial frame is dropped)."""
        self._remainder = b""
        if self._resampler is None:
            return np.zeros(0, dtype=np.float32)
        return self._resampler.flush().astype(np.float32)

    @property
    def pending_bytes(self) -> int:
        return len(self._remainder)


def level_dbfs(samples: np.ndarray) -> float:
    """RMS level relative to full scale (16-bit units); :data:`SILENCE_DBFS` for silence."""
    if samples.size == 0:
        return SILENCE_DBFS
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))
    if rms <= 0.0:
        return SILENCE_DBFS
    return max(SILENCE_DBFS, 20.0 * math.log10(rms / 32768.0))

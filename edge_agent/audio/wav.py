"""Strict RIFF/WAVE decoding into float32 samples in 16-bit units, and a minimal int16 writer.

The stdlib ``wave`` module is not used: on Python 3.11 it rejects IEEE float and
WAVE_FORMAT_EXTENSIBLE files, which phones and DAWs produce. This parser accepts:

* PCM: 8-bit unsigned, 16-, 24- and 32-bit signed little-endian;
* IEEE float: 32 and 64 bits (NaN or infinite samples are refused);
* WAVE_FORMAT_EXTENSIBLE (0xFFFE) whose sub-format GUID is PCM or IEEE float (samples are read
  at the container size; ``wValidBitsPerSample`` is informational, as the samples are
  left-justified);
* any number of channels; unknown chunks (LIST, fact, cue, ...) are skipped, with the pad byte
  that follows an odd-sized chunk;
* a data chunk of unknown length, as written by a streaming writer before it knew the length:
  declared size 0xFFFFFFFF, or 0 while the RIFF header also says the file ends there (or has an
  unknown size itself). It runs to the end of the file; a trailing partial frame is dropped.

Everything else is refused with a :class:`WavError` whose message starts with the source name
and says precisely what is wrong. A data chunk whose real declared size exceeds the bytes present
is "truncated" (the file was cut short), never silently shortened. The byte-rate field is not
checked: writers get it wrong and nothing here depends on it.

Scaling to 16-bit units (full scale = 32768.0): int16 samples keep their exact integer values;
8-bit ``(x - 128) * 256``; 24-bit ``x / 256``; 32-bit ``x / 65536``; float ``x * 32768`` then
clipped to [-32768, 32767], so a float 1.0 becomes 32767.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from edge_agent.audio.resample import Resampler, resample

TARGET_SAMPLE_RATE_HZ = 16_000
MIN_SAMPLE_RATE_HZ = 1_000
MAX_SAMPLE_RATE_HZ = 384_000
FULL_SCALE = 32768.0  # 16-bit units per unit of float audio

_WAVE_FORMAT_PCM = 0x0001
_WAVE_FORMAT_IEEE_FLOAT = 0x0003
_WAVE_FORMAT_EXTENSIBLE = 0xFFFE
# KSDATAFORMAT_SUBTYPE_* GUIDs are the 16-bit format code followed by these 14 bytes.
_SUBFORMAT_GUID_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
# Placeholder RIFF/data sizes written by streaming writers that could not seek back.
_UNKNOWN_SIZES = (0, 0xFFFFFFFF)
_RIFF_HEADER_BYTES = 12
_CHUNK_HEADER_BYTES = 8
_FMT_MIN_BYTES = 16
_FMT_EXTENSIBLE_MIN_BYTES = 40

# Names for the refusal message; any other code is reported by number only.
_COMPRESSED_FORMAT_NAMES = {
    0x0000: "unknown",
    0x0002: "Microsoft ADPCM",
    0x0006: "A-law",
    0x0007: "mu-law",
    0x0011: "IMA ADPCM",
    0x0016: "ITU G.723 ADPCM",
    0x0031: "GSM 6.10",
    0x0040: "ITU G.721 ADPCM",
    0x0050: "MPEG audio",
    0x0055: "MP3",
    0x0092: "Dolby AC-3 SPDIF",
    0x0161: "Windows Media Audio",
    0x0162: "Windows Media Audio Pro",
    0x00FF: "AAC",
    0x1610: "AAC (HE)",
    0x2000: "Dolby AC-3",
    0x674F: "Ogg Vorbis",
    0xF1AC: "FLAC",
}

Encoding = Literal["pcm", "float"]


class WavError(ValueError):
    """A WAV payload that cannot be decoded; the message starts with the source's name."""


@dataclass(frozen=True)
class WavInfo:
    sample_rate: int  # Hz
    channels: int
    bits_per_sample: int  # container size: 24 for 24-bit, 32 for float32
    encoding: Encoding
    frames: int  # samples per channel

    @property
    def duration_seconds(self) -> float:
        return self.frames / self.sample_rate


@dataclass(frozen=True)
class DecodedAudio:
    samples: np.ndarray  # float32, (frames, channels), 16-bit units: full scale = 32768.0
    info: WavInfo


@dataclass(frozen=True)
class _Format:
    encoding: Encoding
    channels: int
    sample_rate: int
    bits_per_sample: int

    @property
    def frame_bytes(self) -> int:
        return self.channels * self.bits_per_sample // 8


def read_wav(path: str | os.PathLike[str]) -> DecodedAudio:
    """Read and decode a WAV file; unreadable files raise :class:`WavError` naming the path."""
    source = os.fspath(path)
    try:
        data = Path(source).read_bytes()
    except OSError as error:
        raise WavError(f"{source}: cannot read: {error.strerror or error}") from error
    return parse_wav(data, source=source)


def parse_wav(data: bytes | bytearray | memoryview, *, source: str = "<bytes>") -> DecodedAudio:
    """Decode a complete WAV payload; every refusal is a :class:`WavError` starting ``source: ``."""
    try:
        return _parse(memoryview(data).cast("B"))
    except _Refusal as refusal:
        raise WavError(f"{source}: {refusal}") from None


def wav_info(data: bytes | bytearray | memoryview, *, source: str = "<bytes>") -> WavInfo:
    """What a WAV payload holds (format, frames), checked as :func:`parse_wav` checks it but
    without decoding a sample: cheap enough for a network thread."""
    try:
        fmt, payload = _locate(memoryview(data).cast("B"))
    except _Refusal as refusal:
        raise WavError(f"{source}: {refusal}") from None
    return WavInfo(
        sample_rate=fmt.sample_rate,
        channels=fmt.channels,
        bits_per_sample=fmt.bits_per_sample,
        encoding=fmt.encoding,
        frames=len(payload) // fmt.frame_bytes,
    )


def wav_blocks(
    data: bytes | bytearray | memoryview, *, source: str = "<bytes>", block_seconds: float = 1.0
) -> tuple[WavInfo, Iterator[np.ndarray]]:
    """What a WAV payload holds, and its samples decoded ``block_seconds`` at a time
    (float32, ``(frames, channels)``, 16-bit units, as :func:`parse_wav` decodes them): a long
    recording is never decoded whole. Header errors raise here, sample errors (NaN floats) when
    their block is decoded; both are :class:`WavError` starting ``source: ``."""
    if block_seconds <= 0:
        raise ValueError(f"block_seconds must be positive, got {block_seconds}")
    try:
        fmt, payload = _locate(memoryview(data).cast("B"))
    except _Refusal as refusal:
        raise WavError(f"{source}: {refusal}") from None
    block_frames = max(1, int(block_seconds * fmt.sample_rate))
    frames = len(payload) // fmt.frame_bytes
    info = WavInfo(fmt.sample_rate, fmt.channels, fmt.bits_per_sample, fmt.encoding, frames)

    def blocks() -> Iterator[np.ndarray]:
        step = block_frames * fmt.frame_bytes
        for start in range(0, len(payload), step):
            try:
                yield _decode(payload[start : start + step], fmt).samples
            except _Refusal as refusal:
                raise WavError(f"{source}: {refusal}") from None

    return info, blocks()


def to_mono_16k(audio: DecodedAudio) -> np.ndarray:
    """The agent's audio contract: float32 mono at 16 kHz in 16-bit units.

    Channels are averaged (not summed, so a full-scale stereo file stays in range); other rates
    go through :func:`edge_agent.audio.resample.resample`.
    """
    samples = audio.samples
    if samples.shape[1] == 1:
        mono = samples[:, 0].astype(np.float32)
    else:
        mono = samples.mean(axis=1, dtype=np.float64).astype(np.float32)
    if audio.info.sample_rate == TARGET_SAMPLE_RATE_HZ:
        return mono
    return resample(mono, audio.info.sample_rate, TARGET_SAMPLE_RATE_HZ)


class WavFrameConverter:
    """A stream whose chunks are each a complete small WAV file (Rhasspy's Hermes audio frames)
    to the agent's 16 kHz mono. 16 kHz frames convert exactly; other rates go through one
    resampler that keeps its state from frame to frame (so frame edges do not click), made anew
    when the rate changes. Every frame's header is read: a sender may change its format."""

    def __init__(self) -> None:
        self._resampler: Resampler | None = None

    def convert(self, data: bytes, source: str) -> np.ndarray:
        """Raises :class:`WavError` for a frame that cannot be decoded."""
        decoded = parse_wav(data, source=source)
        rate = decoded.info.sample_rate
        if rate == TARGET_SAMPLE_RATE_HZ:
            self._resampler = None
            return to_mono_16k(decoded)
        frames = decoded.samples
        mono = frames[:, 0] if frames.shape[1] == 1 else frames.mean(axis=1, dtype=np.float64)
        if self._resampler is None or self._resampler.input_rate != rate:
            self._resampler = Resampler(rate, TARGET_SAMPLE_RATE_HZ)
        return np.ascontiguousarray(self._resampler.process(mono.astype(np.float32)), dtype=np.float32)

    def finish(self) -> np.ndarray:
        """The resampler's tail at the end of the stream."""
        resampler, self._resampler = self._resampler, None
        if resampler is None:
            return np.zeros(0, dtype=np.float32)
        return resampler.flush().astype(np.float32)


def encode_wav(samples: np.ndarray, sample_rate: int = TARGET_SAMPLE_RATE_HZ) -> bytes:
    """A mono 16-bit PCM WAV of ``samples`` (16-bit units; rounded half-to-even and clipped)."""
    values = np.asarray(samples)
    if values.ndim != 1:
        raise ValueError(f"expected mono samples as a 1-D array, got shape {values.shape}")
    if not MIN_SAMPLE_RATE_HZ <= sample_rate <= MAX_SAMPLE_RATE_HZ:
        raise ValueError(
            f"sample rate {sample_rate} Hz is outside {MIN_SAMPLE_RATE_HZ}..{MAX_SAMPLE_RATE_HZ} Hz"
        )
    if values.dtype.kind == "f":
        if not np.isfinite(values).all():
            raise ValueError("samples contain NaN or infinite values")
        values = np.rint(values)
    pcm = np.clip(values, -32768, 32767).astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", _WAVE_FORMAT_PCM, 1, sample_rate, sample_rate * 2, 2, 16)
    return b"".join(
        [
            b"RIFF",
            struct.pack("<I", 4 + (8 + len(fmt)) + (8 + len(pcm))),
            b"WAVE",
            b"fmt ",
            struct.pack("<I", len(fmt)),
            fmt,
            b"data",
            struct.pack("<I", len(pcm)),
            pcm,
        ]
    )


class _Refusal(Exception):
    """Internal: what is wrong, without the source name (added once, by parse_wav)."""


def _parse(data: memoryview) -> DecodedAudio:
    fmt, payload = _locate(data)
    return _decode(payload, fmt)


def _locate(data: memoryview) -> tuple[_Format, memoryview]:
    """The format and the whole frames of the data chunk, validated; nothing decoded yet."""
    riff_size = _check_riff_header(data)
    fmt: _Format | None = None
    position = _RIFF_HEADER_BYTES
    while position + _CHUNK_HEADER_BYTES <= len(data):
        chunk_id = bytes(data[position : position + 4])
        (size,) = struct.unpack_from("<I", data, position + 4)
        body = position + _CHUNK_HEADER_BYTES
        present = len(data) - body
        if chunk_id == b"data":
            if fmt is None:
                after = body + size + (size & 1) if size not in _UNKNOWN_SIZES else len(data)
                if _find_chunk(data, after, b"fmt "):
                    raise _Refusal("the 'fmt ' chunk comes after the 'data' chunk")
                raise _Refusal("no 'fmt ' chunk")
            return fmt, _data_payload(data, body, size, riff_size, fmt)
        if size > present:
            raise _Refusal(
                f"truncated: {_chunk_name(chunk_id)} chunk declares {size} bytes but {present} are present"
            )
        if chunk_id == b"fmt ":
            if fmt is not None:
                raise _Refusal("two 'fmt ' chunks")
            fmt = _parse_fmt(data[body : body + size])
        position = body + size + (size & 1)
    if fmt is None:
        raise _Refusal("no 'fmt ' chunk")
    raise _Refusal("no 'data' chunk")


def _check_riff_header(data: memoryview) -> int:
    """Validate the 12-byte RIFF header; returns the declared RIFF size."""
    magic = bytes(data[:4])
    if magic == b"RIFX":
        raise _Refusal("big-endian RIFX WAV files are not supported (only little-endian RIFF)")
    if magic == b"RF64":
        raise _Refusal("RF64 (64-bit WAV) files are not supported")
    if magic != b"RIFF":
        if not magic:
            raise _Refusal("not a WAV file: it is empty (0 bytes)")
        raise _Refusal(f"not a WAV file: starts with {magic!r} instead of b'RIFF'")
    if len(data) < _RIFF_HEADER_BYTES:
        raise _Refusal(
            f"truncated: {len(data)} bytes, shorter than the {_RIFF_HEADER_BYTES}-byte RIFF header"
        )
    form = bytes(data[8:12])
    if form != b"WAVE":
        raise _Refusal(f"not a WAV file: RIFF form type is {form!r} instead of b'WAVE'")
    (riff_size,) = struct.unpack_from("<I", data, 4)
    return int(riff_size)


def _find_chunk(data: memoryview, position: int, wanted: bytes) -> bool:
    """Whether a chunk `wanted` starts at or after `position` (a lenient walk, for messages)."""
    while position + _CHUNK_HEADER_BYTES <= len(data):
        if bytes(data[position : position + 4]) == wanted:
            return True
        (size,) = struct.unpack_from("<I", data, position + 4)
        position += _CHUNK_HEADER_BYTES + size + (size & 1)
    return False


def _chunk_name(chunk_id: bytes) -> str:
    if all(0x20 <= byte < 0x7F for byte in chunk_id):
        return f"'{chunk_id.decode('ascii')}'"
    return repr(chunk_id)


def _parse_fmt(body: memoryview) -> _Format:
    if len(body) < _FMT_MIN_BYTES:
        raise _Refusal(
            f"the 'fmt ' chunk is {len(body)} bytes, shorter than the {_FMT_MIN_BYTES}-byte minimum"
        )
    format_tag, channels, sample_rate, _byte_rate, block_align, bits = struct.unpack_from("<HHIIHH", body)
    code = format_tag
    if format_tag == _WAVE_FORMAT_EXTENSIBLE:
        if len(body) < _FMT_EXTENSIBLE_MIN_BYTES:
            raise _Refusal(
                f"WAVE_FORMAT_EXTENSIBLE 'fmt ' chunk is {len(body)} bytes, "
                f"shorter than the {_FMT_EXTENSIBLE_MIN_BYTES}-byte minimum"
            )
        guid = bytes(body[24:40])
        if guid[2:] != _SUBFORMAT_GUID_TAIL:
            raise _Refusal(f"unsupported encoding: WAVE_FORMAT_EXTENSIBLE with sub-format GUID {guid.hex()}")
        (code,) = struct.unpack_from("<H", guid)

    encoding: Encoding
    if code == _WAVE_FORMAT_PCM:
        encoding = "pcm"
        if bits not in (8, 16, 24, 32):
            raise _Refusal(f"unsupported encoding: {bits}-bit PCM (8, 16, 24 and 32 are supported)")
    elif code == _WAVE_FORMAT_IEEE_FLOAT:
        encoding = "float"
        if bits not in (32, 64):
            raise _Refusal(f"unsupported encoding: {bits}-bit float (32 and 64 are supported)")
    else:
        name = _COMPRESSED_FORMAT_NAMES.get(code, "compressed or unknown")
        width = f"{bits}-bit " if bits else ""
        raise _Refusal(f"unsupported encoding: {width}{name} (format {code})")

    if channels == 0:
        raise _Refusal("invalid format: 0 channels")
    if not MIN_SAMPLE_RATE_HZ <= sample_rate <= MAX_SAMPLE_RATE_HZ:
        raise _Refusal(
            f"invalid format: sample rate {sample_rate} Hz is outside "
            f"{MIN_SAMPLE_RATE_HZ}..{MAX_SAMPLE_RATE_HZ} Hz"
        )
    fmt = _Format(encoding=encoding, channels=channels, sample_rate=sample_rate, bits_per_sample=bits)
    if block_align != fmt.frame_bytes:
        raise _Refusal(
            f"invalid format: block align is {block_align} bytes but {channels} channel(s) "
            f"of {bits}-bit samples make {fmt.frame_bytes}-byte frames"
        )
    return fmt


def _data_payload(data: memoryview, body: int, size: int, riff_size: int, fmt: _Format) -> memoryview:
    """The whole frames of the data chunk starting at `body`, whose header declares `size`."""
    present = len(data) - body
    frame_bytes = fmt.frame_bytes
    # A size-0 header is a placeholder only if the RIFF header does not place more chunks after
    # it; otherwise it is a genuinely empty data chunk followed by other chunks.
    riff_ends_here = riff_size in _UNKNOWN_SIZES or riff_size + 8 <= body
    unknown_length = size == 0xFFFFFFFF or (size == 0 and present > 0 and riff_ends_here)
    if unknown_length:
        usable = present - present % frame_bytes
    else:
        if size > present:
            raise _Refusal(f"truncated: data chunk declares {size} bytes but {present} are present")
        if size % frame_bytes:
            raise _Refusal(
                f"truncated: data chunk holds {size} bytes, not a whole number of {frame_bytes}-byte frames"
            )
        usable = size
    if usable == 0:
        raise _Refusal("empty: the data chunk holds no samples")
    return data[body : body + usable]


def _decode(payload: memoryview, fmt: _Format) -> DecodedAudio:
    bits = fmt.bits_per_sample
    if fmt.encoding == "float":
        values = np.frombuffer(payload, dtype="<f4" if bits == 32 else "<f8")
        if not np.isfinite(values).all():
            raise _Refusal("invalid samples: the float data contains NaN or infinite samples")
        # Clip before scaling: x * 32768 could overflow float32 for huge (finite) values.
        clipped = np.clip(values, -1.0, (FULL_SCALE - 1) / FULL_SCALE)
        samples = (clipped * FULL_SCALE).astype(np.float32)
    elif bits == 8:
        samples = (np.frombuffer(payload, dtype=np.uint8).astype(np.float32) - 128.0) * 256.0
    elif bits == 16:
        samples = np.frombuffer(payload, dtype="<i2").astype(np.float32)
    elif bits == 24:
        # Put each 3-byte sample in the top of a 4-byte int: sign extension for free, and x * 256
        # has at most 24 significant bits, so the float32 conversion is exact.
        padded = np.zeros((len(payload) // 3, 4), dtype=np.uint8)
        padded[:, 1:] = np.frombuffer(payload, dtype=np.uint8).reshape(-1, 3)
        samples = padded.view("<i4")[:, 0].astype(np.float32) / np.float32(65536.0)
    else:
        samples = np.frombuffer(payload, dtype="<i4").astype(np.float32) / np.float32(65536.0)
    frames = samples.size // fmt.channels
    info = WavInfo(
        sample_rate=fmt.sample_rate,
        channels=fmt.channels,
        bits_per_sample=bits,
        encoding=fmt.encoding,
        frames=frames,
    )
    return DecodedAudio(samples=samples.reshape(frames, fmt.channels), info=info)

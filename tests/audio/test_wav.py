"""edge_agent.audio.wav: every supported layout decodes exactly; every refusal says what is wrong.

Test payloads are built here with struct, independently of ``encode_wav``, so a bug shared by the
writer and the parser cannot hide. Audio files are only ever written to tmp_path.
"""

from __future__ import annotations

import io
import re
import struct
import wave
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.audio.resample import resample
from edge_agent.audio.wav import WavError, encode_wav, parse_wav, read_wav, to_mono_16k

PCM = 0x0001
IEEE_FLOAT = 0x0003
EXTENSIBLE = 0xFFFE
GUID_TAIL = bytes.fromhex("000000001000800000aa00389b71")  # KSDATAFORMAT_SUBTYPE_* after the code


# ---------------------------------------------------------------------------------------------
# Independent WAV builders


def chunk(chunk_id: bytes, body: bytes, *, declared_size: int | None = None, pad: bool = True) -> bytes:
    size = len(body) if declared_size is None else declared_size
    pad_byte = b"\x00" if pad and len(body) % 2 else b""
    return chunk_id + struct.pack("<I", size) + body + pad_byte


def riff(*chunks: bytes, riff_size: int | None = None) -> bytes:
    body = b"WAVE" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body) if riff_size is None else riff_size) + body


def fmt_body(
    format_tag: int,
    channels: int,
    sample_rate: int,
    bits: int,
    *,
    block_align: int | None = None,
    extensible: bool = False,
    valid_bits: int | None = None,
    cb_size: bool = False,
) -> bytes:
    """A 'fmt ' chunk body; with `extensible` the tag goes into the sub-format GUID."""
    if block_align is None:
        block_align = channels * bits // 8
    tag = EXTENSIBLE if extensible else format_tag
    body = struct.pack("<HHIIHH", tag, channels, sample_rate, sample_rate * block_align, block_align, bits)
    if extensible:
        subformat = struct.pack("<H", format_tag) + GUID_TAIL
        return body + struct.pack("<HHI", 22, valid_bits or bits, 0) + subformat
    if cb_size:
        return body + struct.pack("<H", 0)
    return body


def wav_file(
    format_tag: int, channels: int, sample_rate: int, bits: int, payload: bytes, **fmt_options: Any
) -> bytes:
    return riff(
        chunk(b"fmt ", fmt_body(format_tag, channels, sample_rate, bits, **fmt_options)),
        chunk(b"data", payload),
    )


def pcm16(values: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(values)}h", *values)


# Six interleaved values per format (so 1, 2 or 3 channels all make whole frames), how to pack
# them, and the 16-bit-unit values the brief specifies.
FORMATS: dict[str, tuple[int, int, list[float], Callable[[list], bytes], list[float]]] = {
    "pcm8": (
        PCM,
        8,
        [0, 1, 127, 128, 129, 255],
        bytes,
        [(v - 128) * 256 for v in [0, 1, 127, 128, 129, 255]],
    ),
    "pcm16": (
        PCM,
        16,
        [-32768, -1, 0, 1, 12345, 32767],
        pcm16,
        [-32768, -1, 0, 1, 12345, 32767],
    ),
    "pcm24": (
        PCM,
        24,
        [-(2**23), -1, 0, 1, 123456, 2**23 - 1],
        lambda values: b"".join(v.to_bytes(3, "little", signed=True) for v in values),
        [v / 256 for v in [-(2**23), -1, 0, 1, 123456, 2**23 - 1]],
    ),
    "pcm32": (
        PCM,
        32,
        [-(2**31), -1, 0, 1, 123456789, 2**31 - 1],
        lambda values: struct.pack(f"<{len(values)}i", *values),
        [v / 65536 for v in [-(2**31), -1, 0, 1, 123456789, 2**31 - 1]],
    ),
    "float32": (
        IEEE_FLOAT,
        32,
        [-2.0, -1.0, -0.5, 2**-15, 32767 / 32768, 1.5],
        lambda values: struct.pack(f"<{len(values)}f", *values),
        [-32768, -32768, -16384, 1, 32767, 32767],
    ),
    "float64": (
        IEEE_FLOAT,
        64,
        [-2.0, -1.0, -0.5, 2**-15, 1.0, 0.1],
        lambda values: struct.pack(f"<{len(values)}d", *values),
        [-32768, -32768, -16384, 1, 32767, 0.1 * 32768],
    ),
}


def message(data: bytes, source: str = "<bytes>") -> str:
    with pytest.raises(WavError) as caught:
        parse_wav(data, source=source)
    return str(caught.value)


def valid_pcm16_file(samples: Sequence[int] = (1, -2, 3, -4)) -> bytes:
    return wav_file(PCM, 1, 16000, 16, pcm16(samples))


# ---------------------------------------------------------------------------------------------
# Supported layouts


@pytest.mark.parametrize("extensible", [False, True], ids=["plain", "extensible"])
@pytest.mark.parametrize("channels", [1, 2, 3])
@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_decodes_to_16_bit_units(name: str, channels: int, extensible: bool) -> None:
    format_tag, bits, values, pack, expected = FORMATS[name]
    data = wav_file(format_tag, channels, 22050, bits, pack(values), extensible=extensible)

    audio = parse_wav(data)

    assert audio.samples.dtype == np.float32
    assert audio.samples.shape == (6 // channels, channels)
    # Interleaved frames: row = frame, column = channel.
    want = np.asarray(expected, dtype=np.float64).astype(np.float32).reshape(-1, channels)
    np.testing.assert_array_equal(audio.samples, want)
    info = audio.info
    assert (info.sample_rate, info.channels, info.bits_per_sample) == (22050, channels, bits)
    assert info.encoding == ("float" if format_tag == IEEE_FLOAT else "pcm")
    assert info.frames == 6 // channels
    assert info.duration_seconds == pytest.approx(info.frames / 22050)


def test_int16_samples_keep_their_exact_values_over_the_whole_range() -> None:
    values = np.arange(-32768, 32768, dtype=np.int16)
    audio = parse_wav(wav_file(PCM, 1, 16000, 16, values.astype("<i2").tobytes()))
    np.testing.assert_array_equal(audio.samples[:, 0], values.astype(np.float32))


def test_extensible_24_bit_in_container_with_20_valid_bits() -> None:
    values = [-(2**23), 2**12 * 5, 2**23 - 2**4]  # 20-bit values are left-justified in 24 bits
    payload = b"".join(v.to_bytes(3, "little", signed=True) for v in values)
    audio = parse_wav(wav_file(PCM, 1, 48000, 24, payload, extensible=True, valid_bits=20))
    np.testing.assert_array_equal(audio.samples[:, 0], np.array(values, dtype=np.float32) / 256)
    assert audio.info.bits_per_sample == 24


def test_fmt_chunk_with_cb_size_as_sox_writes_it() -> None:
    data = riff(chunk(b"fmt ", fmt_body(PCM, 1, 16000, 16, cb_size=True)), chunk(b"data", pcm16([7, -7])))
    np.testing.assert_array_equal(parse_wav(data).samples[:, 0], [7, -7])


def test_unknown_chunks_are_skipped_including_the_pad_byte_after_an_odd_size() -> None:
    odd_list = chunk(b"LIST", b"INFOx")  # 5 bytes + pad byte
    fact = chunk(b"fact", struct.pack("<I", 3))
    data = riff(
        odd_list,
        chunk(b"fmt ", fmt_body(PCM, 2, 16000, 16)),
        chunk(b"junk", b"\x01\x02\x03"),  # odd again, between fmt and data
        fact,
        chunk(b"data", pcm16([1, 2, 3, 4, 5, 6])),
        chunk(b"LIST", b"trailing"),
    )
    audio = parse_wav(data)
    np.testing.assert_array_equal(audio.samples, [[1, 2], [3, 4], [5, 6]])


def test_odd_sized_data_chunk_followed_by_pad_and_another_chunk() -> None:
    data = riff(
        chunk(b"fmt ", fmt_body(PCM, 1, 8000, 8)), chunk(b"data", bytes([128, 255, 0])), chunk(b"id3 ", b"xy")
    )
    np.testing.assert_array_equal(parse_wav(data).samples[:, 0], [0, 127 * 256, -128 * 256])


def test_odd_sized_data_chunk_at_the_end_without_its_pad_byte() -> None:
    data = riff(chunk(b"fmt ", fmt_body(PCM, 1, 8000, 8)), chunk(b"data", bytes([1, 2, 3]), pad=False))
    assert parse_wav(data).info.frames == 3


@pytest.mark.parametrize("riff_size", [0xFFFFFFFF, 0, 1234])
def test_data_chunk_of_unknown_length_runs_to_the_end_and_drops_a_partial_frame(riff_size: int) -> None:
    payload = pcm16([1, -1, 2, -2, 3, -3]) + b"\x07\x00\x08"  # 3 stereo frames + 3 stray bytes
    data = riff(
        chunk(b"fmt ", fmt_body(PCM, 2, 16000, 16)),
        b"data" + struct.pack("<I", 0xFFFFFFFF) + payload,
        riff_size=riff_size,
    )
    audio = parse_wav(data)
    np.testing.assert_array_equal(audio.samples, [[1, -1], [2, -2], [3, -3]])


@pytest.mark.parametrize("riff_size", [0xFFFFFFFF, 0, 36])
def test_zero_size_data_chunk_of_a_streamed_file_uses_the_bytes_present(riff_size: int) -> None:
    # A writer that could not seek back leaves data size 0 (and RIFF size 0, -1 or 36: header only).
    data = riff(
        chunk(b"fmt ", fmt_body(PCM, 1, 16000, 16)),
        b"data" + struct.pack("<I", 0) + pcm16([5, 6, 7]) + b"\x01",
        riff_size=riff_size,
    )
    np.testing.assert_array_equal(parse_wav(data).samples[:, 0], [5, 6, 7])


def test_zero_size_data_chunk_followed_by_chunks_the_riff_size_covers_is_empty() -> None:
    data = riff(chunk(b"fmt ", fmt_body(PCM, 1, 16000, 16)), chunk(b"data", b""), chunk(b"LIST", b"INFO"))
    assert message(data) == "<bytes>: empty: the data chunk holds no samples"


@pytest.mark.parametrize("sample_rate", [1000, 8000, 44100, 384000])
def test_sample_rate_bounds_are_inclusive(sample_rate: int) -> None:
    assert parse_wav(wav_file(PCM, 1, sample_rate, 16, pcm16([1]))).info.sample_rate == sample_rate


def test_accepts_bytearray_and_memoryview() -> None:
    data = valid_pcm16_file()
    for view in (bytearray(data), memoryview(data)):
        np.testing.assert_array_equal(parse_wav(view).samples[:, 0], [1, -2, 3, -4])


def test_decoded_samples_are_writable() -> None:
    # Not a read-only view on the input bytes: callers may normalise in place.
    audio = parse_wav(valid_pcm16_file())
    assert audio.samples.flags.writeable
    audio.samples[0, 0] = 99.0


# ---------------------------------------------------------------------------------------------
# Refusals


def test_refuses_a_file_that_is_not_riff() -> None:
    data = b"ID3\x04" + bytes(100)
    assert message(data) == "<bytes>: not a WAV file: starts with b'ID3\\x04' instead of b'RIFF'"


def test_refuses_no_bytes_at_all() -> None:
    assert message(b"") == "<bytes>: not a WAV file: it is empty (0 bytes)"


def test_refuses_big_endian_rifx_clearly() -> None:
    assert "big-endian RIFX" in message(b"RIFX" + valid_pcm16_file()[4:])


def test_refuses_rf64() -> None:
    assert "RF64" in message(b"RF64" + valid_pcm16_file()[4:])


def test_refuses_riff_that_is_not_wave() -> None:
    data = b"RIFF" + struct.pack("<I", 4) + b"AVI "
    assert message(data) == "<bytes>: not a WAV file: RIFF form type is b'AVI ' instead of b'WAVE'"


def test_refuses_a_header_cut_short() -> None:
    assert message(b"RIFF\x10\x00") == "<bytes>: truncated: 6 bytes, shorter than the 12-byte RIFF header"


def test_refuses_a_missing_fmt_chunk() -> None:
    assert message(riff(chunk(b"LIST", b"INFO"), chunk(b"data", pcm16([1, 2])))) == "<bytes>: no 'fmt ' chunk"


def test_refuses_no_chunks_at_all() -> None:
    assert message(riff()) == "<bytes>: no 'fmt ' chunk"


def test_refuses_a_missing_data_chunk() -> None:
    data = riff(chunk(b"fmt ", fmt_body(PCM, 1, 16000, 16)), chunk(b"LIST", b"INFO"))
    assert message(data) == "<bytes>: no 'data' chunk"


def test_refuses_fmt_after_data() -> None:
    data = riff(chunk(b"data", pcm16([1, 2])), chunk(b"fmt ", fmt_body(PCM, 1, 16000, 16)))
    assert message(data) == "<bytes>: the 'fmt ' chunk comes after the 'data' chunk"


def test_refuses_two_fmt_chunks() -> None:
    fmt = chunk(b"fmt ", fmt_body(PCM, 1, 16000, 16))
    assert "two 'fmt ' chunks" in message(riff(fmt, fmt, chunk(b"data", pcm16([1]))))


def test_refuses_zero_channels() -> None:
    data = wav_file(PCM, 0, 16000, 16, pcm16([1, 2]), block_align=2)
    assert message(data) == "<bytes>: invalid format: 0 channels"


@pytest.mark.parametrize("sample_rate", [0, 999, 384001, 0xFFFFFFFF])
def test_refuses_zero_or_absurd_sample_rates(sample_rate: int) -> None:
    fmt = struct.pack("<HHIIHH", PCM, 1, sample_rate, 0, 2, 16)
    data = riff(chunk(b"fmt ", fmt), chunk(b"data", pcm16([1, 2])))
    assert message(data) == (
        f"<bytes>: invalid format: sample rate {sample_rate} Hz is outside 1000..384000 Hz"
    )


def test_refuses_block_align_inconsistent_with_channels_and_bits() -> None:
    data = wav_file(PCM, 2, 16000, 16, pcm16([1, 2, 3, 4]), block_align=2)
    assert message(data) == (
        "<bytes>: invalid format: block align is 2 bytes "
        "but 2 channel(s) of 16-bit samples make 4-byte frames"
    )


@pytest.mark.parametrize(
    ("format_tag", "bits", "expected"),
    [
        (0x0007, 8, "unsupported encoding: 8-bit mu-law (format 7)"),
        (0x0006, 8, "unsupported encoding: 8-bit A-law (format 6)"),
        (0x0002, 4, "unsupported encoding: 4-bit Microsoft ADPCM (format 2)"),
        (0x0011, 4, "unsupported encoding: 4-bit IMA ADPCM (format 17)"),
        (0x0055, 0, "unsupported encoding: MP3 (format 85)"),
        (0x1234, 16, "unsupported encoding: 16-bit compressed or unknown (format 4660)"),
    ],
)
def test_refuses_compressed_formats_naming_the_format_code(format_tag: int, bits: int, expected: str) -> None:
    data = wav_file(format_tag, 1, 8000, bits, bytes(64), block_align=1 if bits <= 8 else 2)
    assert message(data) == f"<bytes>: {expected}"


def test_refuses_compressed_sub_format_inside_extensible() -> None:
    data = wav_file(0x0007, 1, 8000, 8, bytes(16), extensible=True)
    assert message(data) == "<bytes>: unsupported encoding: 8-bit mu-law (format 7)"


def test_refuses_extensible_with_a_foreign_sub_format_guid() -> None:
    body = fmt_body(PCM, 1, 16000, 16, extensible=True)
    foreign = body[:24] + bytes(range(16))
    data = riff(chunk(b"fmt ", foreign), chunk(b"data", pcm16([1])))
    assert message(data) == (
        "<bytes>: unsupported encoding: WAVE_FORMAT_EXTENSIBLE with sub-format GUID "
        "000102030405060708090a0b0c0d0e0f"
    )


def test_refuses_an_extensible_fmt_chunk_too_short_for_its_guid() -> None:
    body = fmt_body(PCM, 1, 16000, 16, extensible=True)[:30]
    data = riff(chunk(b"fmt ", body), chunk(b"data", pcm16([1])))
    assert "WAVE_FORMAT_EXTENSIBLE 'fmt ' chunk is 30 bytes" in message(data)


def test_refuses_a_fmt_chunk_shorter_than_16_bytes() -> None:
    data = riff(chunk(b"fmt ", fmt_body(PCM, 1, 16000, 16)[:14]), chunk(b"data", pcm16([1])))
    assert message(data) == "<bytes>: the 'fmt ' chunk is 14 bytes, shorter than the 16-byte minimum"


@pytest.mark.parametrize(
    ("format_tag", "bits", "expected"),
    [
        (PCM, 12, "unsupported encoding: 12-bit PCM"),
        (PCM, 64, "unsupported encoding: 64-bit PCM"),
        (IEEE_FLOAT, 16, "unsupported encoding: 16-bit float"),
    ],
)
def test_refuses_unsupported_sample_sizes(format_tag: int, bits: int, expected: str) -> None:
    data = wav_file(format_tag, 1, 16000, bits, bytes(64), block_align=max(1, bits // 8))
    assert message(data).startswith(f"<bytes>: {expected}")


def test_refuses_an_empty_data_chunk() -> None:
    data = wav_file(PCM, 1, 16000, 16, b"")
    assert message(data) == "<bytes>: empty: the data chunk holds no samples"


def test_refuses_an_unknown_length_data_chunk_with_less_than_one_frame() -> None:
    data = riff(chunk(b"fmt ", fmt_body(PCM, 2, 16000, 16)), b"data" + b"\xff\xff\xff\xff" + b"\x01\x02\x03")
    assert message(data) == "<bytes>: empty: the data chunk holds no samples"


def test_refuses_a_data_chunk_declaring_more_bytes_than_present() -> None:
    data = riff(chunk(b"fmt ", fmt_body(PCM, 1, 16000, 16)), b"data" + struct.pack("<I", 64000) + bytes(1200))
    assert message(data) == "<bytes>: truncated: data chunk declares 64000 bytes but 1200 are present"


def test_refuses_a_real_data_size_that_is_not_whole_frames() -> None:
    data = wav_file(PCM, 2, 16000, 16, pcm16([1, 2, 3]))
    assert message(data) == (
        "<bytes>: truncated: data chunk holds 6 bytes, not a whole number of 4-byte frames"
    )


def test_refuses_a_chunk_before_data_that_runs_past_the_end() -> None:
    data = riff(chunk(b"fmt ", fmt_body(PCM, 1, 16000, 16)), b"LIST" + struct.pack("<I", 1000) + bytes(10))
    assert message(data) == "<bytes>: truncated: 'LIST' chunk declares 1000 bytes but 10 are present"


def test_refuses_a_fmt_chunk_cut_short() -> None:
    data = riff(b"fmt " + struct.pack("<I", 16) + fmt_body(PCM, 1, 16000, 16)[:9])
    assert message(data) == "<bytes>: truncated: 'fmt ' chunk declares 16 bytes but 9 are present"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize(("bits", "code"), [(32, "f"), (64, "d")])
def test_refuses_nan_or_infinite_float_samples(bad: float, bits: int, code: str) -> None:
    payload = struct.pack(f"<3{code}", 0.5, bad, -0.5)
    data = wav_file(IEEE_FLOAT, 1, 16000, bits, payload)
    assert "contains NaN or infinite samples" in message(data)


def test_huge_finite_floats_clip_without_overflow_warnings() -> None:
    payload = struct.pack("<2f", 3.0e38, -3.0e38)
    audio = parse_wav(wav_file(IEEE_FLOAT, 1, 16000, 32, payload))  # -W error turns warnings into failures
    np.testing.assert_array_equal(audio.samples[:, 0], [32767, -32768])


def test_messages_start_with_the_source_and_wav_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"^clip\.wav: not a WAV file"):
        parse_wav(b"OggS" + bytes(40), source="clip.wav")


def test_read_wav_wraps_os_errors_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "missing.wav"
    with pytest.raises(WavError, match=r"missing\.wav: cannot read") as caught:
        read_wav(missing)
    assert isinstance(caught.value.__cause__, OSError)
    with pytest.raises(WavError, match=r"cannot read"):
        read_wav(tmp_path)  # a directory


def test_read_wav_names_the_path_in_format_errors(tmp_path: Path) -> None:
    path = tmp_path / "song.mp3"
    path.write_bytes(b"ID3\x04" + bytes(64))
    with pytest.raises(WavError, match=f"^{re.escape(str(path))}: not a WAV file"):
        read_wav(str(path))


def test_read_wav_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "clip.wav"
    path.write_bytes(valid_pcm16_file([10, 20, -30]))
    np.testing.assert_array_equal(read_wav(path).samples[:, 0], [10, 20, -30])


# ---------------------------------------------------------------------------------------------
# encode_wav and to_mono_16k


def test_encode_wav_rounds_clips_and_is_readable_by_the_stdlib() -> None:
    samples = np.array([0.4, 0.6, -0.5, 1.5, 2.5, -1.6, 40000.0, -40000.0, 32767.4])
    data = encode_wav(samples, sample_rate=22050)

    with wave.open(io.BytesIO(data)) as reader:
        assert (reader.getnchannels(), reader.getsampwidth(), reader.getframerate()) == (1, 2, 22050)
        stdlib = np.frombuffer(reader.readframes(reader.getnframes()), dtype="<i2")
    np.testing.assert_array_equal(stdlib, [0, 1, 0, 2, 2, -2, 32767, -32768, 32767])  # half to even
    np.testing.assert_array_equal(parse_wav(data).samples[:, 0], stdlib)


def test_encode_wav_keeps_int16_exactly() -> None:
    values = np.array([-32768, -1, 0, 1, 32767], dtype=np.int16)
    np.testing.assert_array_equal(parse_wav(encode_wav(values)).samples[:, 0], values)


def test_encode_wav_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match=r"1-D"):
        encode_wav(np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"NaN"):
        encode_wav(np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match=r"sample rate"):
        encode_wav(np.zeros(4), sample_rate=0)


def test_to_mono_16k_passes_16k_mono_through_unchanged() -> None:
    audio = parse_wav(valid_pcm16_file([1, -2, 3]))
    mono = to_mono_16k(audio)
    assert mono.dtype == np.float32 and mono.shape == (3,)
    np.testing.assert_array_equal(mono, [1, -2, 3])


def test_to_mono_16k_averages_channels() -> None:
    audio = parse_wav(wav_file(PCM, 2, 16000, 16, pcm16([1000, -3000, 32767, 32767, -32768, -32767])))
    np.testing.assert_array_equal(to_mono_16k(audio), [-1000, 32767, -32767.5])


def test_to_mono_16k_resamples_other_rates() -> None:
    rate = 48000
    t = np.arange(rate // 2) / rate
    left = np.round(8000 * np.sin(2 * np.pi * 1000 * t)).astype(np.int16)
    right = np.round(4000 * np.sin(2 * np.pi * 1000 * t)).astype(np.int16)
    interleaved = np.stack([left, right], axis=1).astype("<i2").tobytes()
    audio = parse_wav(wav_file(PCM, 2, rate, 16, interleaved))

    mono = to_mono_16k(audio)

    assert mono.dtype == np.float32 and mono.shape == (8000,)
    expected = resample((left.astype(np.float64) + right) / 2, rate, 16000)
    np.testing.assert_allclose(mono, expected, atol=1e-3)
    ideal = 6000 * np.sin(2 * np.pi * 1000 * np.arange(8000) / 16000)
    assert np.abs(mono - ideal)[100:-100].max() < 2.0  # int16 rounding of the input, no more


# ---------------------------------------------------------------------------------------------
# Real recordings, speed, fuzzing


def test_a_real_recording_matches_the_stdlib_wave_module(dev_audio: Path) -> None:
    # dev_audio (tests/conftest.py) is ../shared/audio/dev: skipped when absent, a failure if CI=true.
    positives = dev_audio / "pos"
    path = sorted(positives.glob("*.wav"))[0]

    audio = read_wav(path)

    assert (audio.info.sample_rate, audio.info.channels, audio.info.bits_per_sample) == (16000, 1, 16)
    with wave.open(str(path)) as reader:
        stdlib = np.frombuffer(reader.readframes(reader.getnframes()), dtype="<i2")
    assert audio.info.frames == stdlib.size
    np.testing.assert_array_equal(audio.samples[:, 0], stdlib.astype(np.float32))
    np.testing.assert_array_equal(to_mono_16k(audio), stdlib.astype(np.float32))


@pytest.mark.parametrize(("bits", "dtype"), [(16, "<i2"), (32, "<f4")])
def test_a_ten_minute_file_decodes_whole(bits: int, dtype: str) -> None:
    frames = 10 * 60 * 16000
    values = np.random.default_rng(0).integers(-20000, 20000, frames)
    payload = (values if dtype == "<i2" else values / 32768).astype(dtype).tobytes()
    data = wav_file(PCM if dtype == "<i2" else IEEE_FLOAT, 1, 16000, bits, payload)

    audio = parse_wav(data)
    assert audio.info.frames == frames
    np.testing.assert_array_equal(audio.samples[:1000, 0], values[:1000])


def test_a_ten_minute_24_bit_file_decodes_exactly() -> None:
    frames = 10 * 60 * 16000
    values = np.random.default_rng(1).integers(-(2**23), 2**23, frames, dtype=np.int32)
    payload = values.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    data = wav_file(PCM, 1, 16000, 24, payload)

    audio = parse_wav(data)
    np.testing.assert_array_equal(audio.samples[:, 0], values.astype(np.float64) / 256)


VALID_TEMPLATES = [
    valid_pcm16_file(),
    wav_file(PCM, 2, 44100, 24, bytes(range(12))),
    wav_file(PCM, 1, 8000, 8, bytes([1, 2, 3])),
    wav_file(IEEE_FLOAT, 2, 48000, 32, struct.pack("<4f", 0.1, -0.2, 0.3, -0.4)),
    wav_file(IEEE_FLOAT, 1, 16000, 64, struct.pack("<2d", 0.5, -0.5)),
    wav_file(PCM, 2, 16000, 16, pcm16([1, 2, 3, 4]), extensible=True),
    riff(
        chunk(b"LIST", b"INFOx"),
        chunk(b"fmt ", fmt_body(PCM, 1, 16000, 32, cb_size=True)),
        chunk(b"data", bytes(8)),
    ),
    riff(chunk(b"fmt ", fmt_body(PCM, 1, 16000, 16)), b"data" + b"\xff" * 4 + bytes(7), riff_size=0xFFFFFFFF),
]
INTERESTING_U32 = [0, 1, 2, 3, 4, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF, 16, 18, 40, 1000, 384001]


@st.composite
def mutated_wav(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID_TEMPLATES)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["byte", "u16", "u32", "truncate", "insert", "delete"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "byte" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "u16":
            data[at : at + 2] = struct.pack("<H", draw(st.sampled_from([0, 1, 3, 7, 0xFFFE, 0xFFFF, 65535])))
        elif kind == "u32":
            data[at : at + 4] = struct.pack("<I", draw(st.sampled_from(INTERESTING_U32)))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[at : at + draw(st.integers(1, 16))]
    return bytes(data)


riff_prefixed = st.binary(max_size=300).map(
    lambda body: b"RIFF" + struct.pack("<I", len(body) + 4) + b"WAVE" + body
)


@settings(
    max_examples=2000,
    deadline=None,
    database=None,  # no .hypothesis directory in the tree
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.one_of(st.binary(max_size=300), riff_prefixed, mutated_wav()))
def test_fuzz_only_wav_error_escapes(data: bytes) -> None:
    try:
        audio = parse_wav(data)
    except WavError:
        return
    assert audio.samples.dtype == np.float32
    assert audio.samples.shape == (audio.info.frames, audio.info.channels)
    assert audio.info.frames > 0
    assert np.isfinite(audio.samples).all()
    assert np.abs(audio.samples).max() <= 32768.0

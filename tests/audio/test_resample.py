"""edge_agent.audio.resample: lengths, streaming == one-shot, no time shift, filter quality, speed."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.audio.resample import Resampler, resample

TARGET_RATE_HZ = 16_000
INPUT_RATES_HZ = [48000, 44100, 32000, 22050, 8000, 16000]
CHUNKINGS: list[int | str] = [1, 7, 160, 4801, "random"]
AMPLITUDE = 10000.0  # 16-bit units, well inside full scale
EDGE_SAMPLES = 200  # output samples at each end left out of quality measurements (start-up transient)


def tone(frequency_hz: float, rate_hz: int, seconds: float, phase: float = 0.0) -> np.ndarray:
    t = np.arange(round(rate_hz * seconds)) / rate_hz
    return AMPLITUDE * np.sin(2 * np.pi * frequency_hz * t + phase)


def interior(samples: np.ndarray) -> np.ndarray:
    return samples[EDGE_SAMPLES:-EDGE_SAMPLES].astype(np.float64)


def rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))


def fitted_tone(
    samples: np.ndarray, frequency_hz: float, rate_hz: int, first_index: int
) -> tuple[float, float]:
    """Amplitude and phase (at index 0) of the least-squares sinusoid of a known frequency."""
    t = (first_index + np.arange(samples.size)) / rate_hz
    basis = np.stack([np.sin(2 * np.pi * frequency_hz * t), np.cos(2 * np.pi * frequency_hz * t)], axis=1)
    (sin_weight, cos_weight), *_ = np.linalg.lstsq(basis, samples, rcond=None)
    return float(np.hypot(sin_weight, cos_weight)), float(np.arctan2(cos_weight, sin_weight))


def stream(resampler: Resampler, samples: np.ndarray, chunking: int | str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pieces = []
    position = 0
    while position < samples.size:
        size = int(rng.integers(0, 700)) if chunking == "random" else int(chunking)
        pieces.append(resampler.process(samples[position : position + size]))
        position += size
    pieces.append(resampler.flush())
    for piece in pieces:
        assert piece.dtype == np.float32 and piece.ndim == 1
    return np.concatenate(pieces)


def test_rates_are_reduced_by_their_gcd() -> None:
    assert (Resampler(44100, 16000).up, Resampler(44100, 16000).down) == (160, 441)
    assert (Resampler(96000, 32000).up, Resampler(96000, 32000).down) == (1, 3)
    assert (Resampler(8000, 16000).up, Resampler(8000, 16000).down) == (2, 1)
    assert (Resampler(16000, 16000).up, Resampler(16000, 16000).down) == (1, 1)


@pytest.mark.parametrize("input_rate", INPUT_RATES_HZ)
@pytest.mark.parametrize("length", [0, 1, 2, 3, 5, 159, 160, 161, 4801, 44101])
def test_one_shot_length_is_the_ceiling_of_length_times_ratio(input_rate: int, length: int) -> None:
    samples = np.random.default_rng(length).normal(0, 1000, length)
    output = resample(samples, input_rate, TARGET_RATE_HZ)
    expected = -(-length * TARGET_RATE_HZ // input_rate)
    assert output.shape == (expected,)
    assert output.dtype == np.float32
    assert Resampler(input_rate, TARGET_RATE_HZ).output_length(length) == expected


def test_one_second_gives_exactly_one_second() -> None:
    for input_rate in INPUT_RATES_HZ:
        assert resample(np.zeros(input_rate), input_rate, TARGET_RATE_HZ).size == TARGET_RATE_HZ


def test_identical_rates_return_a_float32_copy() -> None:
    samples = np.array([1, -2, 32767, -32768], dtype=np.int16)
    output = resample(samples, 16000, 16000)
    assert output.dtype == np.float32
    np.testing.assert_array_equal(output, samples)

    floats = np.array([0.5, -1.5], dtype=np.float32)
    copied = resample(floats, 16000, 16000)
    assert not np.shares_memory(copied, floats)
    np.testing.assert_array_equal(copied, floats)

    resampler = Resampler(16000, 16000)
    assert not np.shares_memory(resampler.process(floats), floats)
    assert resampler.flush().size == 0
    assert resampler.latency_input_samples == 0


@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize("input_rate", [*INPUT_RATES_HZ, 47999])
def test_streaming_in_any_chunks_equals_one_shot(input_rate: int, chunking: int | str) -> None:
    rng = np.random.default_rng(input_rate)
    seconds = 0.1 if chunking == 1 else 0.5  # chunks of one sample cost a Python call each
    samples = rng.normal(0, 6000, round(input_rate * seconds)) + tone(440, input_rate, seconds)
    samples = samples.astype(np.float32)

    one_shot = resample(samples, input_rate, TARGET_RATE_HZ)
    streamed = stream(Resampler(input_rate, TARGET_RATE_HZ), samples, chunking)

    assert streamed.shape == one_shot.shape
    np.testing.assert_allclose(streamed, one_shot, rtol=0, atol=1e-4)


def test_empty_chunks_change_nothing_and_flush_resets() -> None:
    samples = np.random.default_rng(5).normal(0, 5000, 4410).astype(np.float32)
    expected = resample(samples, 44100, TARGET_RATE_HZ)
    resampler = Resampler(44100, TARGET_RATE_HZ)

    for _ in range(2):  # the second stream must not see the first one's state
        pieces = [resampler.process(np.zeros(0, dtype=np.float32))]
        pieces += [resampler.process(samples[:1000]), resampler.process(samples[1000:1000])]
        pieces += [resampler.process(samples[1000:]), resampler.flush()]
        np.testing.assert_array_equal(np.concatenate(pieces), expected)
    assert resampler.flush().size == 0  # flushing an empty stream


def test_reset_discards_a_stream_without_flushing() -> None:
    resampler = Resampler(48000, TARGET_RATE_HZ)
    resampler.process(np.full(1000, 30000.0))
    resampler.reset()
    samples = np.random.default_rng(2).normal(0, 5000, 4800)
    output = np.concatenate([resampler.process(samples), resampler.flush()])
    np.testing.assert_array_equal(output, resample(samples, 48000, TARGET_RATE_HZ))


def test_streaming_holds_back_only_the_kernel_half_width() -> None:
    resampler = Resampler(48000, TARGET_RATE_HZ)
    emitted = resampler.process(np.zeros(48000))
    waiting = resampler.output_length(48000) - emitted.size
    # 32 periods of 16 kHz either side: 2 ms, i.e. 32 output samples still owed.
    assert resampler.latency_input_samples == 96
    assert waiting == 32


@pytest.mark.parametrize("input_rate", INPUT_RATES_HZ)
def test_an_impulse_lands_at_the_same_time(input_rate: int) -> None:
    for impulse_index in (input_rate // 10, input_rate // 10 + 1, input_rate // 7):
        samples = np.zeros(input_rate // 4)
        samples[impulse_index] = AMPLITUDE
        output = resample(samples, input_rate, TARGET_RATE_HZ)
        expected_position = impulse_index * TARGET_RATE_HZ / input_rate
        # The nearest output sample to the impulse's time is the peak: no group delay left.
        assert abs(int(np.argmax(output)) - expected_position) <= 0.5


@pytest.mark.parametrize("input_rate", INPUT_RATES_HZ)
def test_a_tone_keeps_its_phase_and_amplitude(input_rate: int) -> None:
    frequency_hz, phase = 1000.0, 0.7
    output = resample(tone(frequency_hz, input_rate, 1.0, phase), input_rate, TARGET_RATE_HZ)

    ideal = tone(frequency_hz, TARGET_RATE_HZ, 1.0, phase)
    amplitude, measured_phase = fitted_tone(interior(output), frequency_hz, TARGET_RATE_HZ, EDGE_SAMPLES)
    shift_output_samples = (measured_phase - phase) / (2 * np.pi * frequency_hz) * TARGET_RATE_HZ
    assert abs(shift_output_samples) < 0.01
    assert 20 * np.log10(amplitude / AMPLITUDE) == pytest.approx(0.0, abs=0.01)
    assert np.abs(interior(output) - interior(ideal)).max() < 1e-3 * AMPLITUDE


@pytest.mark.parametrize(
    ("input_rate", "frequency_hz"),
    [(48000, 12000), (48000, 9000), (44100, 12000), (44100, 20000), (32000, 12000), (22050, 10000)],
)
def test_downsampling_rejects_what_would_alias(input_rate: int, frequency_hz: int) -> None:
    output = resample(tone(frequency_hz, input_rate, 1.0), input_rate, TARGET_RATE_HZ)
    attenuation_db = 20 * np.log10(rms(interior(output)) / (AMPLITUDE / np.sqrt(2)))
    print(f"{input_rate} Hz -> 16 kHz: {frequency_hz} Hz tone at {attenuation_db:.1f} dB")
    assert attenuation_db <= -60.0


@pytest.mark.parametrize("input_rate", [48000, 44100, 32000, 22050])
@pytest.mark.parametrize("frequency_hz", [100, 1000, 3000, 6000])
def test_downsampling_passes_the_speech_band_flat(input_rate: int, frequency_hz: int) -> None:
    output = resample(tone(frequency_hz, input_rate, 1.0), input_rate, TARGET_RATE_HZ)
    gain_db = 20 * np.log10(rms(interior(output)) / rms(interior(tone(frequency_hz, TARGET_RATE_HZ, 1.0))))
    assert abs(gain_db) <= 0.1


def test_48k_to_16k_spectrum_has_only_the_wanted_tone() -> None:
    """A 1 kHz + 12 kHz mix: the 1 kHz bin is intact, the 12 kHz alias at 4 kHz is >= 60 dB down."""
    mixture = tone(1000, 48000, 1.0) + tone(12000, 48000, 1.0)
    output = interior(resample(mixture, 48000, TARGET_RATE_HZ))
    window = np.hanning(output.size)
    spectrum = np.abs(np.fft.rfft(output * window)) / (window.sum() / 2)
    frequencies = np.fft.rfftfreq(output.size, 1 / TARGET_RATE_HZ)

    def peak_near(frequency_hz: float) -> float:
        return float(spectrum[np.abs(frequencies - frequency_hz) < 20].max())

    assert 20 * np.log10(peak_near(1000) / AMPLITUDE) == pytest.approx(0.0, abs=0.1)
    assert 20 * np.log10(peak_near(4000) / AMPLITUDE) <= -60.0


@pytest.mark.parametrize("frequency_hz", [300, 1000, 3000])
def test_upsampling_8k_to_16k_is_clean(frequency_hz: int) -> None:
    output = resample(tone(frequency_hz, 8000, 1.0), 8000, TARGET_RATE_HZ)
    ideal = tone(frequency_hz, TARGET_RATE_HZ, 1.0)

    gain_db = 20 * np.log10(rms(interior(output)) / rms(interior(ideal)))
    # Whatever differs from the ideal 16 kHz tone (images above 4 kHz, delay, ripple) is small.
    error_db = 20 * np.log10(rms(interior(output) - interior(ideal)) / rms(interior(ideal)))
    assert abs(gain_db) <= 0.1
    assert error_db <= -60.0

    spectrum = np.abs(np.fft.rfft(interior(output) * np.hanning(interior(output).size)))
    frequencies = np.fft.rfftfreq(interior(output).size, 1 / TARGET_RATE_HZ)
    image = spectrum[np.abs(frequencies - (8000 - frequency_hz)) < 20].max()
    assert 20 * np.log10(image / spectrum.max()) <= -60.0


@pytest.mark.parametrize("input_rate", [48000, 44100, 32000, 22050, 8000])
def test_cutoff_is_0_92_of_the_lower_nyquist(input_rate: int) -> None:
    lower_nyquist_hz = min(input_rate, TARGET_RATE_HZ) / 2
    cutoff = Resampler(input_rate, TARGET_RATE_HZ).cutoff_hz / lower_nyquist_hz
    assert 0.9 <= cutoff <= 0.95


@pytest.mark.parametrize(("quality", "cutoff"), [("fast", 0.89), ("standard", 0.92), ("high", 0.95)])
def test_quality_levels_match_the_documented_table(quality: str, cutoff: float) -> None:
    resampler = Resampler(48000, TARGET_RATE_HZ, quality=quality)  # type: ignore[arg-type]
    assert resampler.cutoff_hz / 8000 == pytest.approx(cutoff, abs=0.005)
    output = resample(tone(12000, 48000, 0.5), 48000, TARGET_RATE_HZ, quality=quality)  # type: ignore[arg-type]
    assert 20 * np.log10(rms(interior(output)) / (AMPLITUDE / np.sqrt(2))) <= -60.0


def test_an_odd_rate_pair_without_a_phase_table_still_works() -> None:
    # 47999 Hz -> 16 kHz has 16000 phases: taps are computed per output instead of tabulated.
    output = resample(tone(1000, 47999, 0.3, 0.2), 47999, TARGET_RATE_HZ)
    assert output.size == -(-round(47999 * 0.3) * TARGET_RATE_HZ // 47999)
    ideal = AMPLITUDE * np.sin(2 * np.pi * 1000 * np.arange(output.size) / TARGET_RATE_HZ + 0.2)
    assert np.abs(interior(output) - interior(ideal)).max() < 1e-3 * AMPLITUDE


def test_accepts_int16_input() -> None:
    samples = np.round(tone(1000, 48000, 0.1)).astype(np.int16)
    np.testing.assert_allclose(
        resample(samples, 48000, TARGET_RATE_HZ), resample(samples.astype(np.float32), 48000, TARGET_RATE_HZ)
    )


def test_refuses_bad_arguments() -> None:
    for rates in [(0, 16000), (48000, -1), (44100.0, 16000), (True, 16000)]:
        with pytest.raises(ValueError, match=r"positive whole number of Hz"):
            Resampler(*rates)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"quality"):
        Resampler(48000, 16000, quality="ultra")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"1-D"):
        Resampler(48000, 16000).process(np.zeros((10, 2)))


def test_60_seconds_of_48k_resample_in_one_call_as_in_chunks() -> None:
    # Speed is measured in benchmarks (timing never decides a test); here: one long call gives
    # what a stream fed in chunks gives.
    samples = np.random.default_rng(0).normal(0, 5000, 60 * 48000).astype(np.float32)
    output = resample(samples, 48000, TARGET_RATE_HZ)
    assert output.size == 60 * TARGET_RATE_HZ
    resampler = Resampler(48000, TARGET_RATE_HZ)
    pieces = [resampler.process(samples[i : i + 4800]) for i in range(0, samples.size, 4800)]
    chunked = np.concatenate([*pieces, resampler.flush()])
    assert chunked.shape == output.shape
    np.testing.assert_allclose(chunked, output, rtol=0, atol=1e-2)

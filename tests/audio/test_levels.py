"""Keyword levels from a stream's frame-energy history: pure, synthetic audio."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.audio.levels import FRAME_SAMPLES, EnergyHistory, percentile, power_dbfs

RATE = 16000


def tone(seconds: float, amplitude: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (amplitude * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)


def noise(seconds: float, rms: float, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, rms, int(seconds * RATE)).astype(np.float32)


def test_a_full_scale_sine_is_minus_3_dbfs_and_its_snr_is_over_the_background() -> None:
    history = EnergyHistory()
    history.push(noise(2.0, 32768 * 10 ** (-60 / 20)))  # -60 dBFS background
    history.push(tone(1.0, 32767.0))
    level = history.keyword_level(2.0, 3.0)
    assert level is not None
    assert level.level_dbfs == pytest.approx(-3.0, abs=0.1)
    assert level.snr_db == pytest.approx(57.0, abs=1.5)


def test_chunk_boundaries_do_not_change_the_result() -> None:
    audio = np.concatenate([noise(1.5, 30.0), tone(0.8, 3000.0), noise(0.5, 30.0, seed=1)])
    whole, pieces = EnergyHistory(), EnergyHistory()
    whole.push(audio)
    for offset in range(0, audio.shape[0], 1237):  # chunks that split frames
        pieces.push(audio[offset : offset + 1237])
    assert whole.keyword_level(1.5, 2.3) == pieces.keyword_level(1.5, 2.3)


def test_a_scaled_copy_is_louder_by_the_scale_and_has_the_same_snr() -> None:
    audio = np.concatenate([noise(1.0, 50.0), tone(0.7, 2000.0)])
    levels = []
    for scale in (1.0, 0.5):
        history = EnergyHistory()
        history.push(audio * scale)
        levels.append(history.keyword_level(1.0, 1.7))
    loud, quiet = levels
    assert loud is not None and quiet is not None
    assert loud.level_dbfs - quiet.level_dbfs == pytest.approx(6.0, abs=0.1)
    assert loud.snr_db == pytest.approx(quiet.snr_db, abs=0.1)


def test_the_history_is_bounded_and_forgets_old_audio() -> None:
    history = EnergyHistory(seconds=2.0)
    history.push(tone(5.0, 1000.0))
    assert history.keyword_level(0.5, 1.0) is None  # gone
    assert history.keyword_level(4.0, 4.5) is not None
    assert history.keyword_level(6.0, 7.0) is None  # not heard yet
    assert history.nbytes == 2 * RATE // FRAME_SAMPLES * 4  # the bound itself: one float32 a frame


def test_digital_silence_has_a_finite_level() -> None:
    history = EnergyHistory()
    history.push(np.zeros(RATE, np.float32))
    level = history.keyword_level(0.2, 0.8)
    assert level is not None and level.level_dbfs == pytest.approx(power_dbfs(0.0)) and level.snr_db == 0.0


def test_reset_starts_the_frame_clock_again() -> None:
    history = EnergyHistory()
    history.push(noise(3.0, 30.0))
    history.reset()
    history.push(tone(1.0, 10000.0))
    level = history.keyword_level(0.0, 1.0)
    assert level is not None and level.level_dbfs > -15.0


@pytest.mark.parametrize("size", [1, 2, 3, 50, 1999, 2000])
@pytest.mark.parametrize("q", [0.0, 10.0, 37.5, 50.0, 100.0])
def test_the_percentile_is_numpys_linear_one(size: int, q: float) -> None:
    values = np.random.default_rng(size).random(size).astype(np.float32)
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-6, abs=0.0)


def test_a_keyword_across_the_rings_end_gets_the_level_of_the_same_audio_unwrapped() -> None:
    """The ring is read as slices: a keyword and a background that wrap round its end are read
    as the same audio held without wrapping."""
    audio = np.concatenate([noise(1.5, 40.0), tone(0.7, 2500.0), noise(0.8, 40.0, seed=2)])
    ring = EnergyHistory(seconds=2.0)  # 200 frames: the last 2 s of 3 s wrap round at 2 s
    ring.push(audio)
    unwrapped = EnergyHistory(seconds=2.0)
    unwrapped.push(audio[RATE:])  # the same last 2 s, from the ring's first row
    wrapped_level = ring.keyword_level(1.5, 2.2)
    assert wrapped_level is not None
    assert wrapped_level == unwrapped.keyword_level(0.5, 1.2)


def test_16_bit_integer_samples_get_the_level_of_the_same_samples_as_floats() -> None:
    """A loud keyword's squares overflow 16 bits: integer samples are squared as floats."""
    audio = np.concatenate([noise(1.0, 50.0), tone(0.7, 30000.0)])
    as_integers, as_floats = EnergyHistory(), EnergyHistory()
    as_integers.push(audio.astype(np.int16))
    as_floats.push(audio.astype(np.int16).astype(np.float32))
    level = as_integers.keyword_level(1.0, 1.7)
    assert level is not None and level.level_dbfs == pytest.approx(-3.8, abs=0.1)  # 30000 / sqrt(2)
    assert level == as_floats.keyword_level(1.0, 1.7)

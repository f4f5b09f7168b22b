"""Streaming Kaldi-compatible front-end: log mel filterbank, context, decimation, CMVN.

What the network was trained on (``kwsr.cfg``: ``FE_LOGFB+P+Dec3``): 80-bin log mel filterbank
energies computed exactly as Kaldi's ``compute-fbank-feats`` does (25 ms hamming window every
10 ms, DC removal, pre-emphasis 0.97, 512-point FFT, power spectrum, mel bins from 20 Hz to
Nyquist, ``snip_edges``), on samples in 16-bit units, then each frame spliced with 2 frames
of context on each side (the first and last frame repeated at the edges), every third spliced
frame kept, and ``(x + shift) * scale`` from ``kwsr.mvn``.

The filterbank is plain numpy, vectorised over frames. It matches kaldi-native-fbank (the C++
port of Kaldi's code; the tests compare the two) and needs no compiled dependency, so the
agent installs on boards for which no kaldi-native-fbank wheel exists (32-bit Raspberry Pi OS).

Streaming: :class:`FeatureStream` accepts audio in chunks of any size and yields exactly the
frames one call on the whole signal would, because every stage carries its remainder: samples
of an unfinished window, spliced frames still waiting for right context, the decimation phase.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

SAMPLE_RATE_HZ = 16_000
FRAME_LENGTH_SAMPLES = 400  # 25 ms
FRAME_SHIFT_SAMPLES = 160  # 10 ms
FFT_SIZE = 512
NUM_MEL_BINS = 80
LOW_FREQ_HZ = 20.0
PREEMPHASIS = 0.97
CONTEXT_LEFT = 2
CONTEXT_RIGHT = 2
DECIMATION = 3
# One network input frame every DECIMATION filterbank frames: 30 ms.
OUTPUT_FRAME_SECONDS = DECIMATION * FRAME_SHIFT_SAMPLES / SAMPLE_RATE_HZ
FEATURE_DIM = NUM_MEL_BINS * (CONTEXT_LEFT + 1 + CONTEXT_RIGHT)

# Kaldi floors mel energies at float32 epsilon before taking the log.
_ENERGY_FLOOR = float(np.finfo(np.float32).eps)


def _mel_scale(freq_hz: np.ndarray | float) -> np.ndarray | float:
    return 1127.0 * np.log(1.0 + np.asarray(freq_hz) / 700.0)


def kaldi_mel_banks(
    num_bins: int = NUM_MEL_BINS,
    fft_size: int = FFT_SIZE,
    sample_rate: int = SAMPLE_RATE_HZ,
    low_freq: float = LOW_FREQ_HZ,
) -> np.ndarray:
    """Kaldi's triangular mel filters as a (fft_size // 2 + 1, num_bins) matrix.

    Triangles are linear in the mel domain; the Nyquist bin gets no weight, as in Kaldi.
    """
    nyquist = sample_rate / 2.0
    mel_low, mel_high = _mel_scale(low_freq), _mel_scale(nyquist)
    delta = (mel_high - mel_low) / (num_bins + 1)
    fft_mels = _mel_scale(np.arange(fft_size // 2) * (sample_rate / fft_size))
    banks = np.zeros((fft_size // 2 + 1, num_bins), dtype=np.float64)
    for b in range(num_bins):
        left, center, right = (mel_low + (b + k) * delta for k in range(3))
        rising = (fft_mels > left) & (fft_mels <= center)
        falling = (fft_mels > center) & (fft_mels < right)
        banks[: fft_size // 2, b] = np.where(
            rising,
            (fft_mels - left) / (center - left),
            np.where(falling, (right - fft_mels) / (right - center), 0.0),
        )
    return banks


def _hamming(length: int) -> np.ndarray:
    n = np.arange(length)
    return 0.54 - 0.46 * np.cos(2.0 * math.pi * n / (length - 1))


@functools.lru_cache(maxsize=1)
def _fbank_constants() -> tuple[np.ndarray, np.ndarray]:
    """Window and mel matrix, computed once per process (every stream shares them)."""
    window = _hamming(FRAME_LENGTH_SAMPLES)
    banks = kaldi_mel_banks().astype(np.float32)
    window.setflags(write=False)
    banks.setflags(write=False)
    return window, banks


class KaldiFbank:
    """Stateless, vectorised log mel filterbank for whole blocks of frames (dither 0)."""

    def __init__(self) -> None:
        self._window, self._banks = _fbank_constants()

    def frames(self, samples: np.ndarray) -> np.ndarray:
        """Log mel energies of every complete frame in ``samples`` (16-bit sample units)."""
        return self.log_mel(self.windows(samples))

    def windows(self, samples: np.ndarray) -> np.ndarray:
        """Every complete frame, DC-removed, pre-emphasised and windowed: (count, 400) float64."""
        n = samples.shape[0]
        if n < FRAME_LENGTH_SAMPLES:
            return np.zeros((0, FRAME_LENGTH_SAMPLES), dtype=np.float64)
        count = 1 + (n - FRAME_LENGTH_SAMPLES) // FRAME_SHIFT_SAMPLES
        x = np.asarray(samples, dtype=np.float64)
        starts = np.arange(count) * FRAME_SHIFT_SAMPLES
        # Per frame, Kaldi removes the mean m, then pre-emphasises: e[0] = (x[0] - m) * (1 - k),
        # e[i] = (x[i] - m) - k * (x[i-1] - m) = (x[i] - k * x[i-1]) - m * (1 - k).
        # Pre-emphasising the whole signal once and subtracting m * (1 - k) per frame is the
        # same arithmetic in far fewer passes over the data.
        cumulative = np.concatenate(([0.0], np.cumsum(x)))
        means = (cumulative[starts + FRAME_LENGTH_SAMPLES] - cumulative[starts]) / FRAME_LENGTH_SAMPLES
        differences = x[1:] - PREEMPHASIS * x[:-1]
        emphasized = np.empty((count, FRAME_LENGTH_SAMPLES), dtype=np.float64)
        # Overlapping frames as a strided view (sliding_window_view's checks cost more than the
        # copy for short chunks); the view is only read, row by row, into ``emphasized``.
        step = differences.strides[0]
        emphasized[:, 1:] = np.lib.stride_tricks.as_strided(
            differences, shape=(count, FRAME_LENGTH_SAMPLES - 1), strides=(FRAME_SHIFT_SAMPLES * step, step)
        )
        emphasized[:, 0] = x[starts] * (1.0 - PREEMPHASIS)
        emphasized -= (means * (1.0 - PREEMPHASIS))[:, None]
        emphasized *= self._window
        return emphasized

    def log_mel(self, windows: np.ndarray) -> np.ndarray:
        """Log mel energies of windowed frames; rows may come from many streams at once."""
        if windows.shape[0] == 0:
            return np.zeros((0, NUM_MEL_BINS), dtype=np.float32)
        spectrum = np.fft.rfft(windows, n=FFT_SIZE, axis=1)
        # The power spectrum spans ~12 decades; float32 keeps 7 digits of each value, far more
        # than the 1e-4 the log mel energies need, and makes the mel product twice as fast.
        power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32)
        energies = power @ self._banks
        np.maximum(energies, _ENERGY_FLOOR, out=energies)
        return np.log(energies, out=energies)


@dataclass(frozen=True)
class Cmvn:
    """Per-dimension ``(x + shift) * scale``, as ``kwsr.mvn`` stores it."""

    shift: np.ndarray
    scale: np.ndarray

    def apply(self, features: np.ndarray) -> np.ndarray:
        return ((features + self.shift) * self.scale).astype(np.float32, copy=False)


class FeatureStream:
    """Turns one audio stream, chunk by chunk, into normalised network input frames.

    ``accept`` returns the frames that are final so far; ``finish`` returns the rest (the last
    frames, whose right context repeats the final filterbank frame) and resets for a new stream.
    """

    def __init__(self, cmvn: Cmvn, fbank: KaldiFbank | None = None) -> None:
        if cmvn.shift.shape != (FEATURE_DIM,) or cmvn.scale.shape != (FEATURE_DIM,):
            raise ValueError(
                f"CMVN must have {FEATURE_DIM} dimensions, found {cmvn.shift.shape[0]} shifts "
                f"and {cmvn.scale.shape[0]} scales"
            )
        self._cmvn = cmvn
        self._fbank = fbank or KaldiFbank()
        self.reset()

    def reset(self) -> None:
        self._pending_samples = np.zeros(0, dtype=np.float64)
        # Filterbank frames kept for context: the last CONTEXT_LEFT + CONTEXT_RIGHT frames.
        self._context = np.zeros((0, NUM_MEL_BINS), dtype=np.float32)
        self._fbank_frames_total = 0  # filterbank frames produced so far
        self._next_output_center = 0  # filterbank index of the next output frame's centre
        self._samples_total = 0

    @property
    def samples_seen(self) -> int:
        return self._samples_total

    def accept(self, samples: np.ndarray) -> np.ndarray:
        """Add samples (int16 or float in 16-bit units); return the new (n, 400) frames."""
        return self.complete(self._fbank.log_mel(self.prepare(samples)))

    def prepare(self, samples: np.ndarray) -> np.ndarray:
        """First half of :meth:`accept`: buffer samples, return the windows now complete.

        Split so that many streams can share one FFT and mel product (:func:`accept_many`).
        """
        samples = np.asarray(samples)
        if samples.ndim != 1:
            raise ValueError(f"expected mono samples as a 1-D array, got shape {samples.shape}")
        self._samples_total += samples.shape[0]
        buffered = np.concatenate([self._pending_samples, samples.astype(np.float64, copy=False)])
        windows = self._fbank.windows(buffered)
        self._pending_samples = buffered[windows.shape[0] * FRAME_SHIFT_SAMPLES :]
        return windows

    def complete(self, log_mel: np.ndarray) -> np.ndarray:
        """Second half of :meth:`accept`: the filterbank frames of :meth:`prepare`'s windows."""
        return self._splice(log_mel, final=False)

    def finish(self) -> np.ndarray:
        """Flush the end of the stream and reset; returns the last frames (maybe none)."""
        frames = self._splice(np.zeros((0, NUM_MEL_BINS), dtype=np.float32), final=True)
        self.reset()
        return frames

    def _splice(self, new_frames: np.ndarray, final: bool) -> np.ndarray:
        """Splice with +-2 frames of context and keep every third frame, carrying state."""
        first_index = self._fbank_frames_total - self._context.shape[0]
        frames = np.concatenate([self._context, new_frames]) if self._context.size else new_frames
        self._fbank_frames_total += new_frames.shape[0]
        total = self._fbank_frames_total
        if total == 0:
            return np.zeros((0, FEATURE_DIM), dtype=np.float32)

        # Centres that can be emitted: those with right context available (or all, at the end).
        last_center = total - 1 if final else total - 1 - CONTEXT_RIGHT
        centers = np.arange(self._next_output_center, last_center + 1, DECIMATION)
        if centers.size:
            offsets = np.arange(-CONTEXT_LEFT, CONTEXT_RIGHT + 1)
            # Clamping to [0, total-1] repeats the first and last frame at the edges.
            absolute = np.clip(centers[:, None] + offsets[None, :], 0, total - 1)
            spliced = frames[absolute - first_index].reshape(centers.size, FEATURE_DIM)
            self._next_output_center = int(centers[-1]) + DECIMATION
            output = self._cmvn.apply(spliced)
        else:
            output = np.zeros((0, FEATURE_DIM), dtype=np.float32)

        # Keep what later centres may still need as left context.
        keep_from = min(max(0, self._next_output_center - CONTEXT_LEFT), total)
        self._context = frames[keep_from - first_index :]
        return output


def accept_many(streams: list[FeatureStream], samples: list[np.ndarray]) -> list[np.ndarray]:
    """:meth:`FeatureStream.accept` for several streams, with one FFT for all their frames."""
    if not streams:
        return []
    windows = [stream.prepare(chunk) for stream, chunk in zip(streams, samples, strict=True)]
    counts = [w.shape[0] for w in windows]
    log_mel = streams[0]._fbank.log_mel(np.concatenate(windows))
    results, offset = [], 0
    for stream, count in zip(streams, counts, strict=True):
        results.append(stream.complete(log_mel[offset : offset + count]))
        offset += count
    return results

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
The FFT is scipy's when scipy is installed (the ``fast`` extra) and numpy's otherwise: numpy
transforms the frames one at a time, scipy's pocketfft several at once with SIMD, in float32:
the FFT was the front-end's largest cost (``python -m benchmarks.stages`` times the front-end
with each). The two agree to float32 rounding (the tests hold both to kaldi-native-fbank).

Streaming: :class:`FeatureStream` accepts audio in chunks of any size and yields exactly the
frames one call on the whole signal would, because every stage carries its remainder: samples
of an unfinished window, spliced frames still waiting for right context, the decimation phase.

A live chunk is a few frames (100 ms: ten), so what it costs is mostly the number of numpy calls
made for it, a microsecond or two each, not their arithmetic. Hence: a stream fed alone works in
arrays kept from chunk to chunk (one set per thread, ``_Scratch``), read through views made once
per chunk size, instead of concatenating its remainder and context anew, and a few frames take
one mel product instead of one per slice. (Calling scipy's pocketfft below ``scipy.fft``'s
dispatch would save a few more microseconds a chunk, but through a private module: not done.)
Many streams fed together (:func:`accept_many`) share every operation instead, in blocks of
frames small enough that each block goes from samples to log mel energies inside a core's cache
(a batch's whole frames, passed over once per step, would stream through memory every time).
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edge_agent.engine.arrays import sliding_view

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


# The mel product in this many slices: a triangular filter covers few FFT bins, so each group
# of consecutive filters multiplies only the bins under it (a quarter of the arithmetic).
_MEL_GROUPS = 4
# Up to this many frames (a live chunk of up to 80 ms), one product with the whole mel matrix
# instead: with so few rows a product costs its call more than its arithmetic. The two sum
# in different orders, so their energies differ in the last bits (a test bounds it).
_WHOLE_MEL_MAX_ROWS = 8
# The batched front-end's frames at a time (see KaldiFbank.log_mel_of_runs): as many as keep a
# block's windows and spectrum (4 KB a frame together) in one core's L2 cache with room to spare;
# fewer pay more in each block's numpy calls than the cache saves. Blocks this small also keep the
# mel products within the sizes OpenBLAS multiplies with its small-matrix kernels, which sum every
# row alike whatever the number of rows: a row's energies do not depend on the block it is in.
_BLOCK_ROWS = 160


@dataclass(frozen=True)
class _MelSlice:
    """Filters ``filters`` of the mel product, over the spectrum's real and imaginary parts side
    by side (columns ``parts``: bin b is columns 2b and 2b+1), each bin's weight repeated for
    both: the product of the squared parts then sums re^2 + im^2 itself."""

    parts: slice
    filters: slice
    weights: np.ndarray  # (2 * bins, filters) float32


@functools.lru_cache(maxsize=1)
def _fbank_constants() -> tuple[np.ndarray, np.ndarray]:
    """Window and mel matrix, computed once per process (every stream shares them)."""
    window = _hamming(FRAME_LENGTH_SAMPLES).astype(np.float32)
    banks = kaldi_mel_banks().astype(np.float32)
    window.setflags(write=False)
    banks.setflags(write=False)
    return window, banks


@functools.lru_cache(maxsize=2)
def _window_rows(count: int) -> np.ndarray:
    """The window as ``count`` rows of FFT_SIZE (zero after the frame), flat."""
    window, _ = _fbank_constants()
    rows = np.zeros((count, FFT_SIZE), dtype=np.float32)
    rows[:, :FRAME_LENGTH_SAMPLES] = window
    flat = rows.reshape(-1)
    flat.setflags(write=False)
    return flat


@functools.lru_cache(maxsize=1)
def _whole_mel_weights() -> np.ndarray:
    """The mel matrix over the spectrum's real and imaginary parts side by side (see _MelSlice)."""
    _, banks = _fbank_constants()
    weights = np.repeat(banks, 2, axis=0)
    weights.setflags(write=False)
    return weights


@functools.lru_cache(maxsize=1)
def _mel_slices() -> tuple[_MelSlice, ...]:
    _, banks = _fbank_constants()
    bounds = np.linspace(0, NUM_MEL_BINS, _MEL_GROUPS + 1).astype(int)
    slices = []
    for low, high in itertools.pairwise(bounds.tolist()):
        used = np.flatnonzero(banks[:, low:high].any(axis=1))
        first, last = int(used[0]), int(used[-1])
        weights = np.repeat(banks[first : last + 1, low:high], 2, axis=0)
        weights.setflags(write=False)
        slices.append(_MelSlice(slice(2 * first, 2 * last + 2), slice(int(low), int(high)), weights))
    return tuple(slices)


#: FFT libraries :class:`KaldiFbank` can use, the faster first.
FFT_LIBRARIES = ("scipy", "numpy")

# A row-wise real FFT. It never writes its input: a stream's windows keep their zero padding.
RealFft = Callable[[np.ndarray], np.ndarray]


@functools.cache
def _real_fft(library: str) -> RealFft | None:
    """The row-wise real FFT of ``library``, or None if it is not installed."""
    if library == "numpy":
        return functools.partial(np.fft.rfft, axis=1)
    if library == "scipy":
        try:
            # Imported on first use only: it costs ~0.3 s and ~20 MB, for agents with the extra.
            from scipy import fft as scipy_fft
        except ImportError:
            return None
        return functools.partial(scipy_fft.rfft, axis=1)
    raise ValueError(f"FFT library must be one of {', '.join(FFT_LIBRARIES)}, got {library!r}")


def installed_ffts() -> list[str]:
    """The FFT libraries :class:`KaldiFbank` can use here, the faster first (numpy always)."""
    return [library for library in FFT_LIBRARIES if _real_fft(library) is not None]


def default_fft() -> str:
    """The fastest FFT library installed: scipy with the ``fast`` extra, numpy otherwise."""
    return installed_ffts()[0]


class KaldiFbank:
    """Stateless, vectorised log mel filterbank for whole blocks of frames (dither 0).

    Computed in float32 throughout, as Kaldi and kaldi-native-fbank compute it: float32 halves
    the memory traffic of every pass. ``fft`` names the FFT library (see :data:`FFT_LIBRARIES`;
    default: :func:`default_fft`).
    """

    def __init__(self, fft: str | None = None) -> None:
        self._window, _ = _fbank_constants()
        self.fft = fft or default_fft()
        rfft = _real_fft(self.fft)
        if rfft is None:
            raise ValueError(f"FFT library {self.fft!r} is not installed (pip install 'edge-agent[fast]')")
        self._rfft = rfft

    def frames(self, samples: np.ndarray) -> np.ndarray:
        """Log mel energies of every complete frame in ``samples`` (16-bit sample units)."""
        return self.log_mel(self.windows(samples))

    def windows(self, samples: np.ndarray) -> np.ndarray:
        """Every complete frame of one signal, DC-removed, pre-emphasised and windowed, as rows
        of a (count, FFT_SIZE) float32 matrix zero-padded for the FFT."""
        signal = np.asarray(samples, dtype=np.float32)
        count = frame_count(signal.shape[0])
        if count == 0:
            return np.zeros((0, FFT_SIZE), dtype=np.float32)
        differences = _preemphasised_differences(signal)
        # Frames start every FRAME_SHIFT_SAMPLES: a strided view reads them without a copy.
        step = differences.strides[0]
        runs = sliding_view(
            differences, (count, FRAME_LENGTH_SAMPLES - 1), (FRAME_SHIFT_SAMPLES * step, step)
        )
        starts = np.arange(count) * FRAME_SHIFT_SAMPLES
        return self._finish_windows(signal[starts], signal[starts + FRAME_LENGTH_SAMPLES - 1], runs)

    def windows_at(self, signal: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """The windows starting at ``starts`` of a float32 ``signal`` (each one whole inside it).

        ``signal`` may hold several streams back to back: a window never crosses a stream's end,
        so one call serves every stream of a batch.
        """
        if starts.shape[0] == 0:
            return np.zeros((0, FFT_SIZE), dtype=np.float32)
        signal = np.asarray(signal, dtype=np.float32)
        differences = _preemphasised_differences(signal)
        # Every overlapping 399-sample run of ``differences`` as a strided view (read only), from
        # which the rows at ``starts`` are copied.
        step = differences.strides[0]
        runs = sliding_view(
            differences,
            (differences.shape[0] - (FRAME_LENGTH_SAMPLES - 1) + 1, FRAME_LENGTH_SAMPLES - 1),
            (step, step),
        )
        return self._finish_windows(signal[starts], signal[starts + FRAME_LENGTH_SAMPLES - 1], runs[starts])

    def log_mel_of_runs(
        self, signal: np.ndarray, runs: list[tuple[int, int, int]], energies: np.ndarray
    ) -> None:
        """Log mel energies of streams laid back to back in a float32 ``signal``, given as runs of
        (first sample, streams, samples per stream) of streams as long as each other, written into
        ``energies`` (a row per frame: every complete frame of each stream, the streams in order).

        Row for row the arithmetic of :meth:`windows_at` then :meth:`log_mel_into` at the same
        starts, done in blocks of at most _BLOCK_ROWS frames, each from its samples to its
        energies while its windows and spectrum stay in cache: one pass over the whole batch's
        frames for each step would take them through memory every time. (The mel product's sums
        may differ in the last bit from those of one product over the whole batch: a BLAS may
        sum a large product's rows in another order than a small one's.)
        """
        counts = [frame_count(length) for _, _, length in runs]
        total = sum(streams * count for (_, streams, _), count in zip(runs, counts, strict=True))
        if total == 0:
            return
        whole = total <= _WHOLE_MEL_MAX_ROWS  # as log_mel_into would decide for the batch at once
        # Reused by every block: the zero padding is written once (the FFT never writes it).
        windows = np.zeros((min(total, _BLOCK_ROWS), FFT_SIZE), dtype=np.float32)
        window_rows = _window_rows(_BLOCK_ROWS)
        row = 0
        for (first, streams, length), count in zip(runs, counts, strict=True):
            if count == 0:
                continue
            # Whole streams per block; a stream longer than a block in pieces of its frames. Blocks
            # as even as possible: no block much smaller than the others.
            per_block = max(1, _BLOCK_ROWS // count)
            stream_groups = _even_bounds(streams, -(-streams // per_block))
            frame_pieces = _even_bounds(count, -(-count // _BLOCK_ROWS))
            for low, high in itertools.pairwise(stream_groups):
                for start, end in itertools.pairwise(frame_pieces):
                    group, frames = high - low, end - start
                    # The samples these frames read, a row per stream (a window never crosses a
                    # stream's end): whole streams, or a piece of one.
                    span = (
                        length
                        if frames == count
                        else (frames - 1) * FRAME_SHIFT_SAMPLES + FRAME_LENGTH_SAMPLES
                    )
                    begin = first + low * length + start * FRAME_SHIFT_SAMPLES
                    samples = signal[begin : begin + group * span].reshape(group, span)
                    differences = _preemphasised_differences(samples)
                    step = differences.strides[1]
                    block = windows[: group * frames]
                    self._finish_windows(
                        samples[:, : frames * FRAME_SHIFT_SAMPLES : FRAME_SHIFT_SAMPLES],
                        samples[:, FRAME_LENGTH_SAMPLES - 1 :: FRAME_SHIFT_SAMPLES][:, :frames],
                        sliding_view(
                            differences,
                            (group, frames, FRAME_LENGTH_SAMPLES - 1),
                            (differences.strides[0], FRAME_SHIFT_SAMPLES * step, step),
                        ),
                        block.reshape(group, frames, FFT_SIZE),
                        apply_window=False,
                    )
                    # The window, as one product of the block with copies of the window laid out
                    # as its rows (zero in the padding): one long pass instead of one per row.
                    flat = block.reshape(-1)
                    np.multiply(flat, window_rows[: flat.shape[0]], out=flat)
                    self.log_mel_into(block, energies[row : row + group * frames], whole)
                    row += group * frames

    def _finish_windows(
        self,
        firsts: np.ndarray,
        lasts: np.ndarray,
        runs: np.ndarray,
        out: np.ndarray | None = None,
        apply_window: bool = True,
    ) -> np.ndarray:
        """Windows from ``runs`` (row i: x[s+1:s+400] - k * x[s:s+399] for frame i starting at s),
        ``firsts`` (x[s]) and ``lasts`` (x[s+399]); any leading shape, the same for ``firsts``,
        ``lasts``, ``runs`` but its last axis, and ``out`` (whose zero padding is already written).
        ``apply_window=False``: all but the window's product, which the caller makes.

        Per frame, Kaldi removes the mean m, then pre-emphasises: e[0] = (x[0] - m) * (1 - k),
        e[i] = (x[i] - m) - k * (x[i-1] - m) = run[i-1] - m * (1 - k). The offset c = m * (1 - k)
        follows from the run itself: sum(run) = (1 - k) * sum(x) - x[0] + k * x[399], so
        c = (sum(run) + x[0] - k * x[399]) / 400, one pass over the run instead of a running sum
        of the whole signal.
        """
        offsets = np.add.reduce(runs, axis=-1, dtype=np.float32)
        offsets += firsts
        offsets -= np.float32(PREEMPHASIS) * lasts
        offsets *= np.float32(1.0 / FRAME_LENGTH_SAMPLES)
        if out is None:
            windows = np.empty((*firsts.shape, FFT_SIZE), dtype=np.float32)
            windows[..., FRAME_LENGTH_SAMPLES:] = 0.0
        else:
            windows = out
        np.subtract(runs, offsets[..., None], out=windows[..., 1:FRAME_LENGTH_SAMPLES])
        windows[..., 0] = firsts * np.float32(1.0 - PREEMPHASIS) - offsets
        if apply_window:
            windows[..., :FRAME_LENGTH_SAMPLES] *= self._window
        return windows

    def log_mel(self, windows: np.ndarray) -> np.ndarray:
        """Log mel energies of windowed, zero-padded frames; rows may come from many streams."""
        if windows.shape[0] == 0:
            return np.zeros((0, NUM_MEL_BINS), dtype=np.float32)
        return self.log_mel_into(windows, np.empty((windows.shape[0], NUM_MEL_BINS), dtype=np.float32))

    def log_mel_into(
        self, windows: np.ndarray, energies: np.ndarray, whole: bool | None = None
    ) -> np.ndarray:
        """:meth:`log_mel` written into ``energies`` (float32, a row per window, rows C-ordered).

        ``whole``: the mel product in one with the whole mel matrix rather than by its slices
        (default: for up to _WHOLE_MEL_MAX_ROWS windows).
        """
        # numpy before 2.0 transforms in float64 whatever the input.
        spectrum = np.ascontiguousarray(self._rfft(windows), dtype=np.complex64)
        # Real and imaginary parts side by side, squared in place: the mel weights (repeated for
        # both) add them up in the product, with no separate power spectrum pass.
        squares = spectrum.view(np.float32)
        np.square(squares, out=squares)
        if whole is None:
            whole = squares.shape[0] <= _WHOLE_MEL_MAX_ROWS
        if whole:
            np.matmul(squares, _whole_mel_weights(), out=energies)
        elif squares.shape[0] > 1:
            for part in _mel_slices():
                np.matmul(squares[:, part.parts], part.weights, out=energies[:, part.filters])
        else:
            # numpy takes a one-row product as a matrix-vector product, which sums in another
            # order than a matrix product: the row is taken twice, so that a batch's row gets the
            # same bits in a block of its own as in a larger one.
            twice = np.concatenate([squares, squares])
            products = np.empty((2, NUM_MEL_BINS), dtype=np.float32)
            for part in _mel_slices():
                np.matmul(twice[:, part.parts], part.weights, out=products[:, part.filters])
            energies[:] = products[:1]
        np.maximum(energies, _ENERGY_FLOOR, out=energies)
        return np.log(energies, out=energies)


def frame_count(samples: int) -> int:
    """Complete 25 ms frames (every 10 ms) in ``samples`` samples."""
    return (
        1 + (samples - FRAME_LENGTH_SAMPLES) // FRAME_SHIFT_SAMPLES if samples >= FRAME_LENGTH_SAMPLES else 0
    )


def _even_bounds(total: int, parts: int) -> list[int]:
    """Bounds of ``parts`` consecutive ranges covering ``range(total)``, as even as can be."""
    return [total * part // parts for part in range(parts + 1)]


def _preemphasised_differences(signal: np.ndarray) -> np.ndarray:
    """x[i] - k * x[i-1] for i >= 1 along the last axis, float32."""
    differences = signal[..., :-1] * np.float32(-PREEMPHASIS)
    differences += signal[..., 1:]
    return differences


@dataclass(frozen=True)
class Cmvn:
    """Per-dimension ``(x + shift) * scale``, as ``kwsr.mvn`` stores it."""

    shift: np.ndarray
    scale: np.ndarray

    def apply(self, features: np.ndarray) -> np.ndarray:
        return ((features + self.shift) * self.scale).astype(np.float32, copy=False)

    def apply_copy(self, features: np.ndarray) -> np.ndarray:
        """:meth:`apply_in_place` into a new float32 matrix (``features`` may be a view)."""
        result = np.add(features, self.shift, dtype=np.float32)
        result *= self.scale
        return result

    def apply_in_place(self, features: np.ndarray) -> np.ndarray:
        """:meth:`apply` on a float32 matrix this caller owns, without temporaries."""
        features += self.shift
        features *= self.scale
        return features


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
        # The samples after the last frame's start; in a stream fed alone, a view of the front
        # of its thread's scratch samples (see _Scratch), which then need no copy.
        self._pending_samples = np.zeros(0, dtype=np.float32)
        # Filterbank frames kept for context: the last CONTEXT_LEFT + CONTEXT_RIGHT frames at
        # most (in a stream fed alone, a view of the front of its scratch rows).
        self._context = np.zeros((0, NUM_MEL_BINS), dtype=np.float32)
        self._fbank_frames_total = 0  # filterbank frames produced so far
        self._next_output_center = 0  # filterbank index of the next output frame's centre
        self._samples_total = 0

    @property
    def samples_seen(self) -> int:
        return self._samples_total

    def frames_after(self, samples: int) -> int:
        """How many network input frames :meth:`accept` would return for ``samples`` more
        samples (not the stream's last): as many as the centres with their right context."""
        fbank_frames = self._fbank_frames_total + frame_count(self._pending_samples.shape[0] + samples)
        last_center = fbank_frames - 1 - CONTEXT_RIGHT
        return max(0, (last_center - self._next_output_center) // DECIMATION + 1)

    def accept(self, samples: np.ndarray, final: bool = False) -> np.ndarray:
        """Add samples (int16 or float in 16-bit units); return the new (n, 400) frames.

        ``final=True``: these are the stream's last samples; the same as ``accept`` then
        :meth:`finish` (all remaining frames, then a reset), in one pass.
        """
        frames = _accept_one(self, samples, final)
        if final:
            self.reset()
        return frames

    def finish(self) -> np.ndarray:
        """Flush the end of the stream and reset; returns the last frames (maybe none)."""
        frames = _splice_one(self, np.zeros((0, NUM_MEL_BINS), dtype=np.float32), final=True)
        self.reset()
        return frames


def accept_many(
    streams: list[FeatureStream], samples: list[np.ndarray], final: bool = False
) -> list[np.ndarray]:
    """:meth:`FeatureStream.accept` for several streams in one pass: their samples are laid
    back to back, so framing, FFT, mel product, splicing and CMVN are one operation each for the
    whole batch instead of one per stream. Each stream keeps its own remainders."""
    if not streams:
        return []
    if len(streams) == 1:
        return [_accept_one(streams[0], samples[0], final)]
    fbank = streams[0]._fbank
    chunks = [np.asarray(chunk) for chunk in samples]
    for chunk in chunks:
        if chunk.ndim != 1:
            raise ValueError(f"expected mono samples as a 1-D array, got shape {chunk.shape}")
    lengths = [
        stream._pending_samples.shape[0] + chunk.shape[0]
        for stream, chunk in zip(streams, chunks, strict=True)
    ]
    if min(lengths) == max(lengths):
        order = None
        counts = [frame_count(lengths[0])] * len(streams)
    else:
        # Streams with as many frames side by side, so that each run's frames are read through
        # strided views (see KaldiFbank.log_mel_of_runs): streams fed in step have as many
        # samples, but streams whose chunks are not a whole number of frame shifts (1,024
        # samples, wyoming-satellite's default and a common PyAudio buffer) each keep another
        # remainder, and grouping by length would take their frames a stream at a time. A
        # stable order, undone at the end.
        order = sorted(range(len(streams)), key=lambda i: frame_count(lengths[i]))
        streams = [streams[i] for i in order]
        chunks = [chunks[i] for i in order]
        lengths = [lengths[i] for i in order]
        counts = [frame_count(length) for length in lengths]
    pieces: list[np.ndarray] = []
    for stream, chunk in zip(streams, chunks, strict=True):
        stream._samples_total += chunk.shape[0]
        pieces += (stream._pending_samples, chunk)
    # Every stream's remainder and new samples back to back, in float32 (which holds 16-bit
    # samples exactly, and is what Kaldi computes in), in one copy.
    signal = np.concatenate(pieces, dtype=np.float32)
    signal, runs = _frame_runs(signal, streams, lengths, counts)
    # The streams' context rows, then their new frames' log mel energies, written in place
    # below them: the rows the splicing reads, with no copy of the new frames.
    contexts = [stream._context for stream in streams]
    held = [context.shape[0] for context in contexts]
    held_total = sum(held)
    source = np.empty((held_total + sum(counts), NUM_MEL_BINS), dtype=np.float32)
    if held_total:
        np.concatenate(contexts, out=source[:held_total])
    fbank.log_mel_of_runs(signal, runs, source[held_total:])
    spliced = _splice_many(streams, source, held, counts, final=final)
    if order is None:
        return spliced
    results: list[np.ndarray] = [spliced[0]] * len(streams)
    for position, stream in enumerate(order):
        results[stream] = spliced[position]
    return results


def _frame_runs(
    signal: np.ndarray, streams: list[FeatureStream], lengths: list[int], counts: list[int]
) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """The signal and runs for :meth:`KaldiFbank.log_mel_of_runs` of streams laid back to back
    in ``signal`` (``lengths`` samples each, in order of their frame ``counts``); each stream
    keeps its remainder, the samples after its last frame's start.

    Streams with as many samples are one run in place. Otherwise each stream's samples up to
    the end of its last frame are copied into a signal of their own, with one run per number of
    frames: a copy of the audio costs far less than taking a run's frames apart.
    """
    if min(lengths) == max(lengths):
        length, count = lengths[0], counts[0]
        # One copy for every stream's remainder, each a row of it.
        remainders = signal.reshape(len(streams), length)[:, count * FRAME_SHIFT_SAMPLES :].copy()
        for stream, remainder in zip(streams, remainders, strict=True):
            stream._pending_samples = remainder
        return signal, [(0, len(streams), length)]
    pieces: list[np.ndarray] = []
    runs: list[tuple[int, int, int]] = []
    start = first = 0
    for stream, length, count in zip(streams, lengths, counts, strict=True):
        stream._pending_samples = signal[start + count * FRAME_SHIFT_SAMPLES : start + length].copy()
        if count:
            span = (count - 1) * FRAME_SHIFT_SAMPLES + FRAME_LENGTH_SAMPLES
            pieces.append(signal[start : start + span])
            if runs and runs[-1][2] == span:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1, span)
            else:
                runs.append((first, 1, span))
            first += span
        start += length
    framed = np.concatenate(pieces) if pieces else signal[:0]
    return framed, runs


def _accept_one(stream: FeatureStream, chunk: np.ndarray, final: bool) -> np.ndarray:
    """:func:`accept_many` for one stream (a live microphone's every chunk): the same frames,
    without the layout of a batch."""
    chunk = np.asarray(chunk)
    if chunk.ndim != 1:
        raise ValueError(f"expected mono samples as a 1-D array, got shape {chunk.shape}")
    total = stream._pending_samples.shape[0] + chunk.shape[0]
    if total <= _SCRATCH_MAX_SAMPLES:
        return _accept_into_scratch(stream, chunk, total, final)
    stream._samples_total += chunk.shape[0]
    signal = np.concatenate([stream._pending_samples, chunk], dtype=np.float32)
    count = frame_count(signal.shape[0])
    log_mel = stream._fbank.frames(signal)
    stream._pending_samples = signal[count * FRAME_SHIFT_SAMPLES :].copy()
    return _splice_one(stream, log_mel, final)


# A stream fed alone works in its thread's scratch arrays in calls that hold at most this many
# samples (its remainder and the chunk: a live microphone's chunks, up to a second); longer calls
# (whole recordings, in the detector's blocks) make arrays of their own.
_SCRATCH_MAX_SAMPLES = SAMPLE_RATE_HZ + FRAME_LENGTH_SAMPLES
# Rows of context a stream may keep (see _splice_frames): the left context of its next centre,
# which lies at most CONTEXT_RIGHT frames before its last frame.
_MAX_CONTEXT_ROWS = CONTEXT_LEFT + CONTEXT_RIGHT
# The float32 factors of _finish_windows, made once: a live chunk's every call would make them.
_MINUS_PREEMPHASIS = np.float32(-PREEMPHASIS)
_ONE_MINUS_PREEMPHASIS = np.float32(1.0 - PREEMPHASIS)
_MEAN_FACTOR = np.float32(1.0 / FRAME_LENGTH_SAMPLES)


@dataclass(frozen=True)
class _ScratchViews:
    """Views of a :class:`_Scratch` for one number of frames in a call."""

    runs: np.ndarray  # (frames, 399): the pre-emphasised runs of each frame (see _finish_windows)
    firsts: np.ndarray  # (frames,): each frame's first sample
    lasts: np.ndarray  # (frames,): each frame's last sample times -PREEMPHASIS
    windows: np.ndarray  # (frames, FFT_SIZE)
    window_bodies: np.ndarray  # windows[:, 1:FRAME_LENGTH_SAMPLES]
    window_firsts: np.ndarray  # windows[:, 0]
    window_frames: np.ndarray  # windows[:, :FRAME_LENGTH_SAMPLES]


class _Scratch:
    """The arrays streams fed alone work in, kept from call to call, one set per thread: in a
    live microphone's every chunk, writing into them and reading them through views made once
    per chunk size costs a fraction of making new arrays. The samples hold the remainder of the
    stream that used them last (their owner) at the front, the rows its context frames, and the
    owner's remainder and context are views of them; the windows' zero padding is written once.

    One set per thread rather than per stream: an agent's many streams, each fed alone now and
    then, hold no more memory for it than one.
    """

    def __init__(self, samples: int) -> None:
        frames = frame_count(samples)
        self.samples = np.empty(samples, dtype=np.float32)
        self.scaled = np.empty(samples, dtype=np.float32)  # samples * -PREEMPHASIS
        self.differences = np.empty(samples - 1, dtype=np.float32)
        self.windows = np.zeros((frames, FFT_SIZE), dtype=np.float32)
        self.rows = np.empty((_MAX_CONTEXT_ROWS + frames, NUM_MEL_BINS), dtype=np.float32)
        self._views: dict[int, _ScratchViews] = {}
        self._owner: weakref.ref[FeatureStream] | None = None

    def take(self, stream: FeatureStream) -> None:
        """Make ``stream`` the owner (its remainder and context are copied in by the caller)."""
        if self._owner is not None and self._owner() is stream:
            return
        self.release()
        self._owner = weakref.ref(stream)

    def release(self) -> None:
        """Give the owner copies of its remainder and context, which are views of these arrays."""
        owner = self._owner() if self._owner is not None else None
        self._owner = None
        if owner is None:
            return
        if owner._pending_samples.base is self.samples:
            owner._pending_samples = owner._pending_samples.copy()
        if owner._context.base is self.rows:
            owner._context = owner._context.copy()

    def views(self, frames: int) -> _ScratchViews:
        views = self._views.get(frames)
        if views is None:
            step = self.differences.strides[0]
            end = frames * FRAME_SHIFT_SAMPLES
            last = FRAME_LENGTH_SAMPLES - 1
            windows = self.windows[:frames]
            views = _ScratchViews(
                runs=sliding_view(
                    self.differences, (frames, FRAME_LENGTH_SAMPLES - 1), (FRAME_SHIFT_SAMPLES * step, step)
                ),
                firsts=self.samples[0:end:FRAME_SHIFT_SAMPLES],
                lasts=self.scaled[last : last + end : FRAME_SHIFT_SAMPLES],
                windows=windows,
                window_bodies=windows[:, 1:FRAME_LENGTH_SAMPLES],
                window_firsts=windows[:, 0],
                window_frames=windows[:, :FRAME_LENGTH_SAMPLES],
            )
            self._views[frames] = views
        return views


# Each thread's _Scratch (threads feed streams of their own: the agent's engine workers).
_thread_scratch = threading.local()


def _scratch_for(stream: FeatureStream, samples: int) -> _Scratch:
    """This thread's scratch arrays, with room for ``samples``, owned by ``stream``."""
    scratch: _Scratch | None = getattr(_thread_scratch, "scratch", None)
    if scratch is None or scratch.samples.shape[0] < samples:
        if scratch is not None:
            scratch.release()
        # Room for chunks a little longer than this one: chunk sizes that vary from call to call
        # (a resampled source) settle after a few calls.
        capacity = min(max(samples + samples // 4, FRAME_LENGTH_SAMPLES), _SCRATCH_MAX_SAMPLES)
        scratch = _thread_scratch.scratch = _Scratch(capacity)
    scratch.take(stream)
    return scratch


def _accept_into_scratch(stream: FeatureStream, chunk: np.ndarray, total: int, final: bool) -> np.ndarray:
    """:func:`_accept_one` in this thread's scratch arrays (``total``: remainder and chunk).

    The arithmetic of KaldiFbank.windows, log_mel and _splice_one, operation for operation (the
    same bits), with one difference of form: x[s+399] * k is subtracted from the frame offsets
    as x[s+399] * -k added, taken from the pre-emphasis products (negation is exact).
    """
    scratch = _scratch_for(stream, total)
    pending = stream._pending_samples
    held = pending.shape[0]
    context = stream._context
    samples = scratch.samples
    if held and pending.base is not samples:
        samples[:held] = pending
    # As np.concatenate(..., dtype=np.float32) would: complex samples are refused.
    np.copyto(samples[held:total], chunk, casting="same_kind")
    stream._samples_total += chunk.shape[0]
    rows = scratch.rows
    held_rows = context.shape[0]
    if held_rows and context.base is not rows:
        rows[:held_rows] = context
    count = frame_count(total)
    if count:
        scaled = scratch.scaled[:total]
        np.multiply(samples[:total], _MINUS_PREEMPHASIS, out=scaled)
        np.add(scaled[:-1], samples[1:total], out=scratch.differences[: total - 1])
        views = scratch.views(count)
        offsets = views.runs.sum(axis=-1, dtype=np.float32)
        offsets += views.firsts
        offsets += views.lasts
        offsets *= _MEAN_FACTOR
        np.subtract(views.runs, offsets[:, None], out=views.window_bodies)
        np.subtract(views.firsts * _ONE_MINUS_PREEMPHASIS, offsets, out=views.window_firsts)
        np.multiply(views.window_frames, stream._fbank._window, out=views.window_frames)
        stream._fbank.log_mel_into(views.windows, rows[held_rows : held_rows + count])
    rest = total - count * FRAME_SHIFT_SAMPLES
    samples[:rest] = samples[total - rest : total]
    stream._pending_samples = samples[:rest]
    spliced, keep_from = _splice_frames(stream, rows[: held_rows + count], count, final)
    kept = held_rows + count - keep_from
    rows[:kept] = rows[keep_from : held_rows + count]
    stream._context = rows[:kept]
    return spliced


# Offsets of a spliced frame's filterbank frames from its centre.
_SPLICE_OFFSETS = np.arange(-CONTEXT_LEFT, CONTEXT_RIGHT + 1)[None, :]


def _splice_one(stream: FeatureStream, log_mel: np.ndarray, final: bool) -> np.ndarray:
    """:func:`_splice_many` for one stream (a live microphone's every chunk): the same frames,
    without the bookkeeping that lays out a batch."""
    context = stream._context
    frames = np.concatenate([context, log_mel]) if context.shape[0] else log_mel
    spliced, keep_from = _splice_frames(stream, frames, log_mel.shape[0], final)
    stream._context = frames[keep_from:].copy()
    return spliced


def _splice_frames(
    stream: FeatureStream, frames: np.ndarray, new: int, final: bool
) -> tuple[np.ndarray, int]:
    """The spliced, normalised frames of ``frames`` (the stream's context rows, then its ``new``
    filterbank frames), and the first of its rows the stream keeps as context."""
    first_index = stream._fbank_frames_total - (frames.shape[0] - new)
    stream._fbank_frames_total += new
    total_frames = stream._fbank_frames_total
    last_center = total_frames - 1 if final else total_frames - 1 - CONTEXT_RIGHT
    first_center = stream._next_output_center
    emit = (
        (last_center - first_center) // DECIMATION + 1 if total_frames and last_center >= first_center else 0
    )
    stream._next_output_center = first_center + DECIMATION * emit
    keep_from = min(max(0, stream._next_output_center - CONTEXT_LEFT), total_frames) - first_index
    if emit == 0:
        return np.zeros((0, FEATURE_DIM), dtype=np.float32), keep_from
    low = first_center - CONTEXT_LEFT - first_index
    high = first_center + DECIMATION * (emit - 1) + CONTEXT_RIGHT
    if low >= 0 and high < total_frames and frames.flags.c_contiguous:
        # Every spliced frame inside the frames held (all but the stream's first and last ones):
        # the rows to splice are one strided view of them, normalised into a new matrix.
        step = frames.strides[0]
        rows = sliding_view(frames[low:], (emit, FEATURE_DIM), (DECIMATION * step, frames.strides[1]))
        return stream._cmvn.apply_copy(rows), keep_from
    centers = np.arange(first_center, first_center + DECIMATION * emit, DECIMATION)[:, None]
    absolute = np.minimum(np.maximum(centers + _SPLICE_OFFSETS, 0), total_frames - 1)
    spliced = frames[absolute - first_index].reshape(emit, FEATURE_DIM)
    return stream._cmvn.apply_in_place(spliced), keep_from


def _splice_many(
    streams: list[FeatureStream], source: np.ndarray, held_counts: list[int], counts: list[int], final: bool
) -> list[np.ndarray]:
    """Splice each stream's new filterbank frames with +-2 frames of context (repeating a
    stream's first and last frame at its edges) and keep every third, for all streams at once:
    the streams' positions are computed as arrays and the rows of every stream are gathered
    in one pass from ``source``: every stream's context rows (``held_counts`` of them), then
    every stream's new rows (``counts``)."""
    count = len(streams)
    held = np.array(held_counts, dtype=np.int64)
    before = np.array([stream._fbank_frames_total for stream in streams], dtype=np.int64)
    centers = np.array([stream._next_output_center for stream in streams], dtype=np.int64)
    new = np.array(counts, dtype=np.int64)
    # Absolute filterbank frames: a stream's context rows are frames [before - held, before),
    # its new rows [before, total).
    total = before + new
    # Centres that can be emitted: those with their right context (or all, at the end).
    last_center = total - 1 if final else total - 1 - CONTEXT_RIGHT
    emit = np.where((total > 0) & (last_center >= centers), (last_center - centers) // DECIMATION + 1, 0)
    next_centers = centers + DECIMATION * emit
    keep_from = np.minimum(np.maximum(0, next_centers - CONTEXT_LEFT), total)
    context_start = np.cumsum(held) - held
    new_start = sum(held_counts) + np.cumsum(new) - new

    def rows_of(stream: np.ndarray, absolute: np.ndarray) -> np.ndarray:
        """Rows of ``source`` holding absolute frames of the given streams (index arrays)."""
        old = absolute < before[stream]
        return np.where(
            old,
            context_start[stream] + absolute - (before[stream] - held[stream]),
            new_start[stream] + absolute - before[stream],
        )

    # The frames each stream keeps as context: from the left context of its next centre on.
    kept_counts = (total - keep_from).astype(np.intp)  # repeat counts: intp (see accept_many)
    kept_total = int(kept_counts.sum())
    kept_stream = np.repeat(np.arange(count), kept_counts)
    kept_firsts = np.cumsum(kept_counts) - kept_counts
    kept_absolute = np.repeat(keep_from, kept_counts) + (
        np.arange(kept_total) - np.repeat(kept_firsts, kept_counts)
    )
    # Rows of one small matrix: nothing of the batch's frames stays alive through them.
    kept = source[rows_of(kept_stream, kept_absolute)]
    for stream, frames_total, next_center, context in zip(
        streams, total.tolist(), next_centers.tolist(), _split_rows(kept, kept_counts), strict=True
    ):
        stream._fbank_frames_total = frames_total
        stream._next_output_center = next_center
        stream._context = context
    emitted_total = int(emit.sum())
    if emitted_total == 0:
        return [np.zeros((0, FEATURE_DIM), dtype=np.float32) for _ in streams]
    counts_array = emit.astype(np.intp)
    firsts = np.cumsum(counts_array) - counts_array
    within = np.arange(emitted_total) - np.repeat(firsts, counts_array)
    emitting = np.repeat(np.arange(count), counts_array)
    centers_emitted = centers[emitting] + DECIMATION * within
    absolute = centers_emitted[:, None] + _SPLICE_OFFSETS
    if final or int(centers.min()) < CONTEXT_LEFT:
        # Clamping to [0, last] repeats the first and last frame at a stream's edges.
        absolute = np.minimum(np.maximum(absolute, 0), total[emitting][:, None] - 1)
    spliced = source[rows_of(emitting[:, None], absolute)].reshape(emitted_total, FEATURE_DIM)
    normalised = streams[0]._cmvn.apply_in_place(spliced)
    return _split_rows(normalised, counts_array)


def _split_rows(rows: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    """``rows`` as consecutive views of ``counts`` rows each (counts: an intp array)."""
    if counts.shape[0] and counts.min() == counts.max():
        # Streams fed in step keep and emit as many rows each: the views come from iterating
        # over one reshaped view, without a Python slice per stream.
        return list(rows.reshape(counts.shape[0], int(counts[0]), *rows.shape[1:]))
    bounds = np.cumsum([0, *counts.tolist()]).tolist()
    return [rows[low:high] for low, high in itertools.pairwise(bounds)]

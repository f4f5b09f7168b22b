"""Band-limited rational resampling (Kaiser-windowed sinc, polyphase), one-shot or streaming.

Method
------
The two rates are reduced by their gcd to ``up / down`` (48000 -> 16000 is 1/3, 44100 -> 16000
is 160/441). Output sample ``m`` sits at time ``m * down / up``, measured in input samples, and is

    y[m] = sum_k x[k] * h(m * down / up - k)

where ``h`` is a low-pass kernel centred on zero: a sinc whose cutoff lies below the lower of the
two Nyquist frequencies, times a Kaiser window. Output sample 0 coincides with input sample 0 and
the kernel is symmetric about the output time (a zero-phase filter), so the group delay is
compensated: a tone or a click comes out at the time it went in. Input samples before the start
and after the end of the signal count as zeros.

Kernel design (``quality``): the window spans ``half_width`` periods of the lower rate on each
side of the centre and is designed for ``stopband_db`` of attenuation (Kaiser's
``beta = 0.1102 * (A - 8.7)``). Its transition band, ``(A - 7.95) / (14.36 * 2 * half_width)``
of the lower rate (Kaiser's length formula), is placed so that the stopband starts exactly at the
lower Nyquist frequency; the cutoff (the -6 dB point) is the middle of the transition band:

    quality     half_width  stopband  cutoff / lower Nyquist
    "fast"      16          60 dB     0.89
    "standard"  32          80 dB     0.92   (the default)
    "high"      64          100 dB    0.95

With "standard", 48 kHz -> 16 kHz is flat to 0.001 dB up to 6.7 kHz, 6 dB down at 7.4 kHz, and
everything from 8 kHz up (what would alias) is about 80 dB down (measured: 79.9 dB at 8.05 kHz,
88 dB at 8.5 kHz, 100 dB at 12 kHz).

Polyphase evaluation: the fractional part of ``m * down / up`` takes only ``up`` values, so the
kernel is sampled once into an ``(up, taps)`` table, one row per phase. Each row is normalised to
sum to 1, so every phase passes DC with gain exactly 1 (unequal phase gains would modulate the
output periodically). Every ``up`` outputs advance exactly ``down`` inputs, so a long run of
outputs is a few matrix products: the input reshaped into rows of ``P * down`` samples (with
``P * down`` at least the kernel length), times a fixed banded matrix of ``P * up`` columns built
from the table, split by how many rows each kernel overhangs into two or three
``(P * down, P * up)`` blocks (BLAS, no Python loop per sample). The outputs at the ragged ends
of a chunk take the same taps through a gather. For odd rate pairs whose table would be too
large (47999 Hz -> 16 kHz has 16000 phases) the taps are computed per output instead: the same
kernel, only slower. Arithmetic is float64 whatever the input dtype; the output is float32.

Length: ``n`` input samples give ``ceil(n * up / down)`` output samples, one for every output
time that falls within the input (one input sample gives one output; one second gives exactly one
second).

Streaming: :meth:`Resampler.process` returns each output as soon as its whole kernel lies on
input already seen, which holds back ``half_width`` periods of the lower rate (2 ms at 16 kHz
with "standard"); :meth:`Resampler.flush` supplies the zeros after the end, returns the rest and
resets. Every output depends only on its own time and the input, so any chunking gives the
one-shot result up to float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

Quality = Literal["fast", "standard", "high"]


@dataclass(frozen=True)
class _KernelDesign:
    half_width_periods: int  # kernel half-width, in periods of the lower of the two rates
    stopband_db: float


_DESIGNS: dict[str, _KernelDesign] = {
    "fast": _KernelDesign(half_width_periods=16, stopband_db=60.0),
    "standard": _KernelDesign(half_width_periods=32, stopband_db=80.0),
    "high": _KernelDesign(half_width_periods=64, stopband_db=100.0),
}

# Largest precomputed array (phase table or block matrix), in float64 entries: 8 MB. Common rate
# pairs need far less (44.1 kHz -> 16 kHz: 160 phases x 178 taps).
_MAX_TABLE_ENTRIES = 1 << 20
# Bounds on temporaries per step, in float64 entries (~2 MB), so a 10-minute one-shot call does
# not allocate a (outputs, taps) array.
_MAX_STEP_ENTRIES = 1 << 18


def _kaiser_beta(stopband_db: float) -> float:
    if stopband_db > 50.0:
        return 0.1102 * (stopband_db - 8.7)
    if stopband_db >= 21.0:
        return 0.5842 * (stopband_db - 21.0) ** 0.4 + 0.07886 * (stopband_db - 21.0)
    return 0.0


class Resampler:
    """Converts one stream of mono samples from ``input_rate`` to ``output_rate``.

    Feed chunks of any size to :meth:`process`; call :meth:`flush` at the end of the signal.
    Samples may be in any unit (the agent uses 16-bit units); the output is float32.
    """

    def __init__(self, input_rate: int, output_rate: int, *, quality: Quality = "standard") -> None:
        for name, rate in (("input_rate", input_rate), ("output_rate", output_rate)):
            if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
                raise ValueError(f"{name} must be a positive whole number of Hz, got {rate!r}")
        if quality not in _DESIGNS:
            raise ValueError(f"quality must be one of {sorted(_DESIGNS)}, got {quality!r}")
        self.input_rate = int(input_rate)
        self.output_rate = int(output_rate)
        self.quality: Quality = quality
        common = math.gcd(self.input_rate, self.output_rate)
        self._up = self.output_rate // common
        self._down = self.input_rate // common
        self._identity = self._up == self._down

        design = _DESIGNS[quality]
        # Lengths below are in input samples and frequencies in cycles per input sample.
        input_samples_per_low_period = max(1.0, self._down / self._up)
        transition = (design.stopband_db - 7.95) / (14.36 * 2 * design.half_width_periods)
        self._cutoff = (0.5 - transition / 2) / input_samples_per_low_period
        self._half_width = design.half_width_periods * input_samples_per_low_period
        self._beta = _kaiser_beta(design.stopband_db)
        # Output m reads inputs floor(t_m) - K + 1 ... floor(t_m) + K: all of |t_m - k| <= half width.
        self._taps_per_side = math.ceil(self._half_width)
        self._num_taps = 2 * self._taps_per_side

        self._table: np.ndarray | None = None
        if not self._identity and self._up * self._num_taps <= _MAX_TABLE_ENTRIES:
            self._table = self._kernel_taps(np.arange(self._up))
        self._block_parts = self._build_block_matrix()
        self.reset()

    @property
    def up(self) -> int:
        """Interpolation factor after reducing the rates by their gcd."""
        return self._up

    @property
    def down(self) -> int:
        """Decimation factor after reducing the rates by their gcd."""
        return self._down

    @property
    def cutoff_hz(self) -> float:
        """The -6 dB frequency of the anti-aliasing / anti-imaging filter (the Nyquist if identity)."""
        if self._identity:
            return self.input_rate / 2
        return self._cutoff * self.input_rate

    @property
    def latency_input_samples(self) -> int:
        """How many of the latest input samples :meth:`process` waits on before emitting output."""
        return 0 if self._identity else self._taps_per_side

    def output_length(self, input_samples: int) -> int:
        """Output samples the one-shot conversion of ``input_samples`` samples yields."""
        return -(-input_samples * self._up // self._down)

    def reset(self) -> None:
        """Forget the current stream (without flushing it)."""
        # Zeros before the start of the signal: output 0 reads K - 1 samples into the past.
        self._buffer = np.zeros(self._taps_per_side, dtype=np.float64)
        self._buffer_start = -self._taps_per_side  # absolute input index of self._buffer[0]
        self._received = 0  # input samples seen in this stream
        self._next_output = 0  # absolute index of the next output sample

    def process(self, samples: np.ndarray) -> np.ndarray:
        """Add a chunk of mono samples; return the output samples that are now complete."""
        chunk = np.asarray(samples)
        if chunk.ndim != 1:
            raise ValueError(f"expected mono samples as a 1-D array, got shape {chunk.shape}")
        if self._identity:
            return chunk.astype(np.float32)  # always a copy
        if chunk.size:
            self._buffer = np.concatenate([self._buffer, chunk.astype(np.float64, copy=False)])
            self._received += chunk.size
        # Ready: outputs m whose last input floor(m * down / up) + K has arrived.
        ready_inputs = self._received - self._taps_per_side
        end = -(-ready_inputs * self._up // self._down) if ready_inputs > 0 else 0
        return self._emit(end)

    def flush(self) -> np.ndarray:
        """Return the outputs still owed for the end of the signal (the tail reads zeros); reset."""
        if self._identity:
            return np.zeros(0, dtype=np.float32)
        total = self.output_length(self._received)
        if total > self._next_output:
            last_input_needed = (total - 1) * self._down // self._up + self._taps_per_side
            missing = last_input_needed + 1 - (self._buffer_start + self._buffer.size)
            if missing > 0:
                self._buffer = np.concatenate([self._buffer, np.zeros(missing)])
        output = self._emit(total)
        self.reset()
        return output

    def _emit(self, end: int) -> np.ndarray:
        start = self._next_output
        if end <= start:
            return np.zeros(0, dtype=np.float32)
        output = np.empty(end - start, dtype=np.float64)
        self._render(start, end, output)
        self._next_output = end
        # Keep only what output `end` onwards reads; copy so a huge chunk is not kept alive.
        first_needed = end * self._down // self._up - self._taps_per_side + 1
        drop = first_needed - self._buffer_start
        self._buffer = self._buffer[drop:].copy()
        self._buffer_start = first_needed
        return output.astype(np.float32)

    def _render(self, start: int, end: int, output: np.ndarray) -> None:
        """Fill output[0 : end - start] with outputs start ... end - 1."""
        position = start
        parts = self._block_parts
        if parts is not None:
            # The block matrix is built for runs that begin on a phase-0 output.
            aligned = min(end, -(-start // self._up) * self._up)
            self._render_gather(start, aligned, output[: aligned - start])
            position = aligned
            row_inputs, row_outputs = parts[0].shape
            first_input = position * self._down // self._up - self._taps_per_side + 1
            base = first_input - self._buffer_start
            rows_buffered = (self._buffer.size - base) // row_inputs - (len(parts) - 1)
            rows = min((end - position) // row_outputs, rows_buffered)
            if rows > 0:
                offset = position - start
                self._render_blocks(parts, base, rows, output[offset : offset + rows * row_outputs])
                position += rows * row_outputs
        self._render_gather(position, end, output[position - start :])

    def _render_blocks(self, parts: list[np.ndarray], base: int, rows: int, output: np.ndarray) -> None:
        """Outputs by matrix products; `base` is the buffer index of the first output's first input."""
        row_inputs, row_outputs = parts[0].shape
        rows_per_step = max(1, _MAX_STEP_ENTRIES // (row_inputs * len(parts) + row_outputs))
        for first_row in range(0, rows, rows_per_step):
            step_rows = min(rows_per_step, rows - first_row)
            begin = base + first_row * row_inputs
            inputs = self._buffer[begin : begin + (step_rows + len(parts) - 1) * row_inputs]
            inputs = inputs.reshape(-1, row_inputs)
            # Row j of the result reads input rows j ... j + len(parts) - 1 (the kernel overhangs).
            result = inputs[:step_rows] @ parts[0]
            for lag in range(1, len(parts)):
                result += inputs[lag : lag + step_rows] @ parts[lag]
            output[first_row * row_outputs : (first_row + step_rows) * row_outputs] = result.ravel()

    def _render_gather(self, start: int, end: int, output: np.ndarray) -> None:
        """Outputs one tap row each: for chunk edges and for rate pairs without a block matrix."""
        outputs_per_step = max(1, _MAX_STEP_ENTRIES // self._num_taps)
        tap_offsets = np.arange(self._num_taps)
        for first in range(start, end, outputs_per_step):
            count = min(outputs_per_step, end - first)
            # Relative to `first` so the int64 products stay small on streams of any length.
            whole, remainder = divmod(first * self._down, self._up)
            numerators = remainder + np.arange(count, dtype=np.int64) * self._down
            phases = numerators % self._up
            first_inputs = whole + numerators // self._up - self._taps_per_side + 1 - self._buffer_start
            windows = self._buffer[first_inputs[:, None] + tap_offsets]
            taps = self._table[phases] if self._table is not None else self._kernel_taps(phases)
            output[first - start : first - start + count] = np.einsum("ij,ij->i", windows, taps)

    def _kernel_taps(self, phases: np.ndarray) -> np.ndarray:
        """Tap rows for the given phases, aligned with inputs floor(t) - K + 1 ... floor(t) + K."""
        k = self._taps_per_side
        # Distance from the output time to each tap's input, in input samples: t - input.
        offsets = np.arange(k - 1, -k - 1, -1, dtype=np.float64)
        distance = phases.astype(np.float64)[:, None] / self._up + offsets[None, :]
        relative = distance / self._half_width
        window = np.i0(self._beta * np.sqrt(np.clip(1.0 - relative * relative, 0.0, None)))
        window = np.where(np.abs(relative) <= 1.0, window / np.i0(self._beta), 0.0)
        taps = np.sinc(2.0 * self._cutoff * distance) * window
        return taps / taps.sum(axis=1, keepdims=True)

    def _build_block_matrix(self) -> list[np.ndarray] | None:
        """The banded matrix mapping rows of P * down inputs to P * up outputs, split by row lag.

        P is chosen so that a row of inputs is at least as long as the kernel: then the overhang
        of each output's kernel past its row spans only a row or two, i.e. few matrix products.
        """
        if self._identity or self._table is None:
            return None
        periods = max(1, -(-self._num_taps // self._down))
        row_inputs, row_outputs = periods * self._down, periods * self._up
        span = row_inputs + self._num_taps - 1  # inputs read by the outputs of one row
        lags = -(-span // row_inputs)
        if lags * row_inputs * row_outputs > _MAX_TABLE_ENTRIES:
            return None
        matrix = np.zeros((lags * row_inputs, row_outputs))
        output_index = np.arange(row_outputs)
        first_inputs = output_index * self._down // self._up
        phases = output_index * self._down % self._up
        rows = first_inputs[:, None] + np.arange(self._num_taps)[None, :]
        matrix[rows, output_index[:, None]] = self._table[phases]
        return [
            np.ascontiguousarray(matrix[lag * row_inputs : (lag + 1) * row_inputs]) for lag in range(lags)
        ]


def resample(
    samples: np.ndarray, input_rate: int, output_rate: int, *, quality: Quality = "standard"
) -> np.ndarray:
    """Resample a whole mono signal; returns ``ceil(len * up / down)`` float32 samples.

    The same as ``Resampler.process(samples)`` followed by ``flush()``; the same rates return a
    float32 copy of the input.
    """
    resampler = Resampler(input_rate, output_rate, quality=quality)
    head = resampler.process(samples)
    return np.concatenate([head, resampler.flush()])

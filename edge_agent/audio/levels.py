"""How loud a keyword was: its RMS level and its margin over the stream's recent background.

A stream keeps the mean square of each short frame of its recent audio (:class:`EnergyHistory`,
a fixed ring of floats: never raw audio, so a hundred streams stay cheap). When the decoder
reports a keyword between two stream times, :meth:`EnergyHistory.keyword_level` gives

* ``level_dbfs``: the RMS of the keyword's frames relative to 16-bit full scale, and
* ``snr_db``: that power over a low percentile of the frames before the keyword (the quiet
  moments of the recent background), in dB.

Devices in one room that hear the same utterance can be ranked by ``level_dbfs`` (the closest
one is loudest); ``snr_db`` tells a loud keyword from a loud room. Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edge_agent.audio.pcm import SILENCE_DBFS

SAMPLE_RATE_HZ = 16_000
# One energy value per frame of this length (10 ms at 16 kHz).
FRAME_SAMPLES = 160
# Audio the history covers (s): a keyword (at most a few seconds) plus background before it.
HISTORY_SECONDS = 20.0
# The background is this percentile of the frame powers before the keyword.
BACKGROUND_PERCENTILE = 10.0
# Below this much background before the keyword (frames), the whole history is used.
MIN_BACKGROUND_FRAMES = 50
# Mean square of a 16-bit full-scale signal, and the floor every power is kept above.
_FULL_SCALE_POWER = 32768.0**2
_FLOOR_POWER = _FULL_SCALE_POWER * 10.0 ** (SILENCE_DBFS / 10.0)
_NO_SAMPLES = np.zeros(0, np.float32)


@dataclass(frozen=True)
class KeywordLevel:
    """The keyword segment's RMS level (dBFS) and its margin over the background (dB)."""

    level_dbfs: float
    snr_db: float

    def to_dict(self) -> dict[str, float]:
        return {"level_dbfs": self.level_dbfs, "snr_db": self.snr_db}


def percentile(values: np.ndarray, q: float) -> float:
    """The ``q``-th percentile of ``values`` (not empty), interpolated linearly between the two
    nearest ranks (numpy's default method) from a partial sort: a burst of detections takes one
    each, and ``np.percentile``'s generality costs several times the arithmetic here."""
    position = (values.shape[0] - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, values.shape[0] - 1)
    ranked = np.partition(values, (low, high))
    below, above = float(ranked[low]), float(ranked[high])
    return below + (above - below) * (position - low)


def power_dbfs(power: float) -> float:
    """A mean square in 16-bit units as dBFS."""
    return 10.0 * math.log10(max(power, _FLOOR_POWER) / _FULL_SCALE_POWER)


class EnergyHistory:
    """The mean square of each :data:`FRAME_SAMPLES`-sample frame of a stream's last
    ``seconds`` of audio; frame ``k`` covers samples ``k*FRAME_SAMPLES`` to ``(k+1)*FRAME_SAMPLES``
    from the start of the stream (or the last :meth:`reset`)."""

    def __init__(self, seconds: float = HISTORY_SECONDS) -> None:
        self._size = max(1, int(math.ceil(seconds * SAMPLE_RATE_HZ / FRAME_SAMPLES)))
        self._power = np.zeros(self._size, np.float32)  # float32: ample for a level in dB
        self._frames = 0  # frames pushed since the start: the next one's index
        self._tail = _NO_SAMPLES  # samples of a frame not yet complete

    @property
    def nbytes(self) -> int:
        """Memory the history holds (fixed at construction)."""
        return int(self._power.nbytes)

    def reset(self) -> None:
        self._frames = 0
        self._tail = _NO_SAMPLES

    def push(self, samples: np.ndarray) -> None:
        """The stream's next samples (16 kHz mono, 16-bit units)."""
        count = samples.shape[0]
        if count == 0:
            return
        if samples.dtype.kind != "f":
            samples = samples.astype(np.float32)  # 16-bit integers would overflow their squares
        if self._tail.shape[0]:
            samples = np.concatenate((self._tail, samples))
            count = samples.shape[0]
        whole = count // FRAME_SAMPLES
        end = whole * FRAME_SAMPLES
        # Chunks of whole 10 ms (the usual ones) leave no tail: nothing to copy.
        self._tail = samples[end:].copy() if end < count else _NO_SAMPLES
        if whole == 0:
            return
        frames = samples[:end].reshape(whole, FRAME_SAMPLES)
        # In the samples' own precision (float32 from the converters): ample for a level in dB,
        # and this runs on every chunk of every stream.
        power = np.einsum("ij,ij->i", frames, frames)
        power *= 1.0 / FRAME_SAMPLES
        if whole > self._size:
            self._frames += whole - self._size
            power = power[-self._size :]
            whole = self._size
        start = self._frames % self._size
        if start + whole <= self._size:
            self._power[start : start + whole] = power
        else:
            first = self._size - start
            self._power[start:] = power[:first]
            self._power[: whole - first] = power[first:]
        self._frames += whole

    def _window(self, begin: int, end: int) -> np.ndarray:
        """Powers of frames ``begin`` to ``end`` (both inside what the ring still holds): a view
        of the ring, or of a copy where the window wraps round its end (read only)."""
        if end <= begin:
            return np.zeros(0, np.float64)
        start = begin % self._size
        stop = start + end - begin
        if stop <= self._size:
            return self._power[start:stop]
        return np.concatenate((self._power[start:], self._power[: stop - self._size]))

    def keyword_level(self, start_seconds: float, end_seconds: float) -> KeywordLevel | None:
        """The level of the audio between two stream times, or None when the history no longer
        (or not yet) holds any of it."""
        oldest = max(0, self._frames - self._size)
        first = max(oldest, int(math.floor(start_seconds * SAMPLE_RATE_HZ / FRAME_SAMPLES)))
        last = min(self._frames, int(math.ceil(end_seconds * SAMPLE_RATE_HZ / FRAME_SAMPLES)))
        if last <= first:
            return None
        keyword = float(np.mean(self._window(first, last), dtype=np.float64))
        before = self._window(oldest, first)
        if before.shape[0] < MIN_BACKGROUND_FRAMES:
            before = self._window(oldest, self._frames)
        background = percentile(before, BACKGROUND_PERCENTILE)
        snr = 10.0 * math.log10(max(keyword, _FLOOR_POWER) / max(background, _FLOOR_POWER))
        return KeywordLevel(level_dbfs=round(power_dbfs(keyword), 1), snr_db=round(snr, 1))

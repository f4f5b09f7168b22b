"""The plain reference the benchmarks measure us against: the model run the straightforward way.

Whole recordings, one at a time, numpy float32, written from the model's description in
../shared/README.md and nothing else of ours but the Kaldi file reader: Kaldi's filterbank
(DC removal, pre-emphasis, hamming window, 512-point FFT, 80 mel bins, log), +-2 frames of
context with the edges repeated, every third frame, ``(x + shift) * scale``; every layer of the
network as one matrix product on the whole recording, the FSMN as its filter taps over a
zero-padded sequence, the softmax over all 2599 outputs on every frame; and the usual keyword
score: the geometric mean of the keyword's posteriors picked in order within 2.5 s.

This is what a careful user would write to run the model natively. It is the baseline for the
ratios in ``benchmarks.engine`` and ``benchmarks.throughput``, measured in the same run, so
that our figures hold on a noisy machine. It is not used by the agent.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edge_agent.engine.kaldi_nnet import (
    AddShift,
    AffineTransform,
    Component,
    Fsmn,
    LinearTransform,
    RectifiedLinear,
    Rescale,
    Softmax,
    read_nnet,
)

WINDOW, SHIFT, FFT, MELS = 400, 160, 512, 80


def _mel_matrix() -> np.ndarray:
    def mel(hz: np.ndarray | float) -> np.ndarray:
        return 1127.0 * np.log(1.0 + np.asarray(hz) / 700.0)

    low, high = mel(20.0), mel(8000.0)
    step = (high - low) / (MELS + 1)
    bins = mel(np.arange(FFT // 2) * 16000 / FFT)
    matrix = np.zeros((FFT // 2 + 1, MELS), dtype=np.float32)
    for m in range(MELS):
        left, centre, right = low + m * step, low + (m + 1) * step, low + (m + 2) * step
        rising = (bins - left) / (centre - left)
        falling = (right - bins) / (right - centre)
        matrix[: FFT // 2, m] = np.clip(np.minimum(rising, falling), 0.0, None)
    return matrix


class PlainReference:
    """Loads the model directory; :meth:`score` gives the keyword's best score in a recording."""

    def __init__(self, model_dir: Path, keyword_tokens: list[int], max_seconds: float = 2.5) -> None:
        self.layers: list[Component] = read_nnet(model_dir / "kwsr.net")
        normalisation = read_nnet(model_dir / "kwsr.mvn")
        self.shift = next(c.shift for c in normalisation if isinstance(c, AddShift)).astype(np.float32)
        self.scale = next(c.scale for c in normalisation if isinstance(c, Rescale)).astype(np.float32)
        self.window = np.hamming(WINDOW).astype(np.float32)
        self.mel = _mel_matrix()
        self.tokens = keyword_tokens
        self.span = int(max_seconds / 0.03)

    def features(self, samples: np.ndarray) -> np.ndarray:
        x = samples.astype(np.float32)
        count = 1 + (x.shape[0] - WINDOW) // SHIFT
        frames = np.lib.stride_tricks.sliding_window_view(x, WINDOW)[::SHIFT][:count].copy()
        frames -= frames.mean(axis=1, keepdims=True)
        frames[:, 1:] -= 0.97 * frames[:, :-1].copy()
        frames[:, 0] *= 1 - 0.97
        frames *= self.window
        power = np.abs(np.fft.rfft(frames, n=FFT, axis=1)) ** 2
        fbank = np.log(np.maximum(power.astype(np.float32) @ self.mel, np.finfo(np.float32).eps))
        padded = np.concatenate([fbank[:1], fbank[:1], fbank, fbank[-1:], fbank[-1:]])
        spliced = np.concatenate([padded[k : k + count] for k in range(5)], axis=1)[::3]
        return (spliced + self.shift) * self.scale

    def posteriors(self, features: np.ndarray) -> np.ndarray:
        x = features.astype(np.float32)
        for layer in self.layers:
            if isinstance(layer, AffineTransform):
                x = x @ layer.weight.T + layer.bias
            elif isinstance(layer, LinearTransform):
                x = x @ layer.weight.T
            elif isinstance(layer, RectifiedLinear):
                x = np.maximum(x, 0)
            elif isinstance(layer, Fsmn):
                history, ahead = layer.history_frames, layer.lookahead_frames
                padded = np.concatenate(
                    [
                        np.zeros((history, x.shape[1]), np.float32),
                        x,
                        np.zeros((ahead, x.shape[1]), np.float32),
                    ]
                )
                memory = x.copy()
                for i in range(layer.left.shape[0]):
                    memory += layer.left[i] * padded[history - i * layer.left_stride :][: x.shape[0]]
                for j in range(layer.right.shape[0]):
                    memory += layer.right[j] * padded[history + (j + 1) * layer.right_stride :][: x.shape[0]]
                x = memory
            elif isinstance(layer, Softmax):
                x = np.exp(x - x.max(axis=1, keepdims=True))
                x /= x.sum(axis=1, keepdims=True)
        return x

    def score(self, samples: np.ndarray) -> float:
        """Best geometric mean of the keyword tokens' posteriors picked in order, in windows of
        the allowed span every half span (so every keyword up to half the span is seen whole)."""
        logs = np.log(np.maximum(self.posteriors(self.features(samples))[:, self.tokens], 1e-10))
        best = -math.inf
        for start in range(0, max(1, logs.shape[0] - self.span // 2), max(1, self.span // 2)):
            window = logs[start : start + self.span]
            partial = window[:, 0]  # best pick of the first k tokens with the k-th at each frame
            for k in range(1, len(self.tokens)):
                previous = np.maximum.accumulate(partial)
                partial = np.concatenate([[-math.inf], previous[:-1] + window[1:, k]])
            best = max(best, float(partial.max()))
        return math.exp(best / len(self.tokens))


def reference_rtf(
    model_dir: Path,
    keyword_tokens: list[int],
    recordings: list[np.ndarray],
    repeat: int,
    clock: Callable[[], float] | None = None,
) -> float:
    """The reference's real-time factor over ``recordings`` (best of ``repeat`` passes), timed
    with ``clock`` (default: wall time, ``time.perf_counter``)."""
    import time

    clock = clock or time.perf_counter
    reference = PlainReference(model_dir, keyword_tokens)
    seconds = sum(r.shape[0] for r in recordings) / 16000
    best = math.inf
    for _ in range(repeat):
        started = clock()
        for samples in recordings:
            reference.score(samples)
        best = min(best, clock() - started)
    return best / seconds

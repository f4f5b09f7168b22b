"""The cFSMN acoustic network, run incrementally with per-stream state.

Every component but ``Fsmn`` works frame by frame, so a chunk of frames goes through it as one
matrix product. An ``Fsmn`` layer reads ``history_frames`` past and ``lookahead_frames`` future
inputs, so each stream keeps, per Fsmn layer, a buffer of recent inputs: the outputs of a
chunk's last ``lookahead_frames`` frames wait until the next chunk brings their future (the
model's latency: 2 frames x 4 layers x 30 ms = 240 ms) and :meth:`NetworkBackend.forward` with
``final=True`` supplies zeros for it, exactly as a whole-utterance pass treats frames past the
end. Chunked and whole-utterance outputs are therefore the same, which the tests check; we
never pad zeros at chunk edges as FunASR's streaming mode does.

Two backends implement :class:`NetworkBackend`: :class:`NumpyNetwork` here (the default, no
torch import: torch costs ~1.8 s and ~220 MB on import) and ``TorchNetwork`` in
``torch_network.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

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
    Splice,
)

# Given upper bounds of the selected posteriors, per stream, how many leading rows of each
# stream need no exact posteriors.
SkipRule = Callable[[list[np.ndarray]], list[int]]


class NetworkState(Protocol):
    """Opaque per-stream state of a backend."""


class NetworkBackend(Protocol):
    """What the engine needs from a network implementation."""

    name: str
    input_dim: int
    output_dim: int
    lookahead_frames: int

    def new_state(self) -> NetworkState:
        """State for a new stream (silence before its start)."""
        ...

    def forward(
        self,
        state: NetworkState,
        features: np.ndarray,
        final: bool = False,
        columns: np.ndarray | None = None,
    ) -> np.ndarray:
        """Feed (n, input_dim) frames; return the posteriors (m, output_dim) that are now final.

        ``columns`` selects the outputs to return (the softmax still normalises over all).
        With ``final=True`` the stream ends: every pending frame is returned and ``state`` must
        not be used again.
        """
        ...

    def forward_many(
        self,
        states: Sequence[NetworkState],
        features: Sequence[np.ndarray],
        columns: np.ndarray | None = None,
        skip: SkipRule | None = None,
    ) -> list[np.ndarray]:
        """:meth:`forward` for several streams at once; the same results, in one pass.

        ``skip`` (optional to honour) may waive exact posteriors for leading rows of a stream.
        """
        ...


@dataclass
class _FsmnBuffer:
    """Per-stream, per-layer inputs kept for the next chunk: history then pending frames."""

    frames: np.ndarray


class NumpyState:
    __slots__ = ("buffers", "finished")

    def __init__(self, buffers: list[_FsmnBuffer]) -> None:
        self.buffers = buffers
        self.finished = False


def validate_structure(components: Sequence[Component], source: str) -> None:
    """Refuse networks this engine cannot run correctly."""
    for component in components:
        if isinstance(component, (Splice, AddShift, Rescale)):
            raise ValueError(
                f"{source}: {type(component).__name__} inside the acoustic network is not supported "
                "(feature transforms belong in the .mvn file)"
            )
    if not isinstance(components[-1], Softmax):
        # The decoder needs posteriors; a network without a final Softmax gives logits.
        raise ValueError(f"{source}: the network must end with a Softmax component")


def fsmn_memory(
    layer: Fsmn, inputs: np.ndarray, first: int, count: int, out: np.ndarray | None = None
) -> np.ndarray:
    """Outputs of ``layer`` for ``inputs[first:first+count]``, reading neighbours in ``inputs``."""
    result = inputs[first : first + count].copy() if out is None else out
    if out is not None:
        result[...] = inputs[first : first + count]
    for i in range(layer.left.shape[0]):
        start = first - i * layer.left_stride
        result += layer.left[i] * inputs[start : start + count]
    for j in range(layer.right.shape[0]):
        start = first + (j + 1) * layer.right_stride
        result += layer.right[j] * inputs[start : start + count]
    return result


class NumpyNetwork:
    """numpy float32 implementation of :class:`NetworkBackend`."""

    name = "numpy"

    def __init__(self, components: Sequence[Component], source: str = "network") -> None:
        validate_structure(components, source)
        self.components = list(components)
        self.input_dim = components[0].input_dim
        self.output_dim = components[-1].output_dim
        self._fsmn_layers = [c for c in components if isinstance(c, Fsmn)]
        self.lookahead_frames = sum(layer.lookahead_frames for layer in self._fsmn_layers)
        # The output layer: the last affine transform before the final softmax.
        self._head: AffineTransform | None = (
            components[-2] if len(components) >= 2 and isinstance(components[-2], AffineTransform) else None
        )
        # Pre-transpose weights once so every chunk is a plain row-major x @ W.
        self._weights_t = {
            id(c): np.ascontiguousarray(c.weight.T, dtype=np.float32)
            for c in components
            if isinstance(c, (AffineTransform, LinearTransform))
        }

    def new_state(self) -> NumpyState:
        return NumpyState(
            [
                _FsmnBuffer(np.zeros((layer.history_frames, layer.input_dim), dtype=np.float32))
                for layer in self._fsmn_layers
            ]
        )

    def forward(  # type: ignore[override]
        self,
        state: NumpyState,
        features: np.ndarray,
        final: bool = False,
        columns: np.ndarray | None = None,
    ) -> np.ndarray:
        if state.finished:
            raise RuntimeError("this stream's network state was finished; create a new one")
        x = np.asarray(features, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"expected features of shape (n, {self.input_dim}), got {x.shape}")
        fsmn_index = 0
        for component in self.components:
            if isinstance(component, AffineTransform):
                x = x @ self._weights_t[id(component)]
                x += component.bias
            elif isinstance(component, LinearTransform):
                x = x @ self._weights_t[id(component)]
            elif isinstance(component, RectifiedLinear):
                np.maximum(x, 0.0, out=x)
            elif isinstance(component, Fsmn):
                x = self._fsmn_step(component, state.buffers[fsmn_index], x, final)
                fsmn_index += 1
            elif isinstance(component, Softmax):
                x = softmax(x, columns)
        if final:
            state.finished = True
        return x

    def forward_many(  # type: ignore[override]
        self,
        states: Sequence[NumpyState],
        features: Sequence[np.ndarray],
        columns: np.ndarray | None = None,
        skip: SkipRule | None = None,
    ) -> list[np.ndarray]:
        """All streams' new frames through every layer together: one matrix product per layer
        for all of them, and one gather per FSMN tap; each stream keeps its own memory.

        With ``columns`` and ``skip``: the output layer (2599 outputs, half of the network's
        work, and the softmax) runs only for the rows that need it. The logits of ``columns``
        alone give an upper bound of each of their posteriors (the softmax over a subset of the
        outputs); ``skip`` gets those bounds per stream and answers how many leading rows of each
        stream need no exact posteriors (a keyword decoder with nothing going on, whose first
        character's bound stays below its floor). Those rows get the bounds instead.
        """
        if any(state.finished for state in states):
            raise RuntimeError("a stream's network state was finished; create a new one")
        counts = [int(f.shape[0]) for f in features]
        x = np.concatenate([np.asarray(f, dtype=np.float32) for f in features]) if features else None
        if x is None or x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"expected features of shape (n, {self.input_dim})")
        fsmn_index = 0
        for component in self.components:
            if component is self._head and skip is not None and columns is not None:
                x = self._head_with_skip(x, counts, columns, skip)
                break  # the head includes the softmax
            if isinstance(component, AffineTransform):
                x = x @ self._weights_t[id(component)]
                x += component.bias
            elif isinstance(component, LinearTransform):
                x = x @ self._weights_t[id(component)]
            elif isinstance(component, RectifiedLinear):
                np.maximum(x, 0.0, out=x)
            elif isinstance(component, Fsmn):
                buffers = [state.buffers[fsmn_index] for state in states]
                x, counts = _fsmn_many(component, buffers, x, counts)
                fsmn_index += 1
            elif isinstance(component, Softmax):
                x = softmax(x, columns)
        bounds = np.cumsum([0, *counts])
        return [x[bounds[i] : bounds[i + 1]] for i in range(len(counts))]

    def _head_with_skip(
        self, hidden: np.ndarray, counts: list[int], columns: np.ndarray, skip: SkipRule
    ) -> np.ndarray:
        """The output layer and softmax for the rows ``skip`` does not waive (see forward_many)."""
        head = self._head
        assert head is not None
        weights = self._weights_t[id(head)]
        subset = hidden @ weights[:, columns]
        subset += head.bias[columns]
        bound = softmax(subset)
        starts = np.cumsum([0, *counts[:-1]])
        per_stream = [bound[start : start + count] for start, count in zip(starts, counts, strict=True)]
        waived = skip(per_stream)
        exact = np.ones(hidden.shape[0], dtype=bool)
        for start, rows in zip(starts, waived, strict=True):
            exact[start : start + rows] = False
        if exact.any():
            logits = hidden[exact] @ weights
            logits += head.bias
            bound[exact] = softmax(logits, columns)
        return bound

    @staticmethod
    def _fsmn_step(layer: Fsmn, buffer: _FsmnBuffer, new: np.ndarray, final: bool) -> np.ndarray:
        history = layer.history_frames
        lookahead = layer.lookahead_frames
        parts = [buffer.frames, new]
        if final and lookahead:
            parts.append(np.zeros((lookahead, layer.input_dim), dtype=np.float32))
        inputs = np.concatenate(parts) if new.shape[0] or final else buffer.frames
        ready = inputs.shape[0] - history - lookahead
        if ready <= 0:
            buffer.frames = inputs
            return np.zeros((0, layer.output_dim), dtype=np.float32)
        outputs = fsmn_memory(layer, inputs, history, ready)
        buffer.frames = inputs[ready:]
        return outputs


def _fsmn_many(
    layer: Fsmn, buffers: list[_FsmnBuffer], new: np.ndarray, counts: list[int]
) -> tuple[np.ndarray, list[int]]:
    """One FSMN layer for many streams: rows of ``new`` are the streams' frames, in order.

    Each stream's buffered inputs and new frames are laid out one after the other in one
    matrix; the outputs that are ready (their look-ahead has arrived) are computed with one
    gather per filter tap for all streams together, then each stream keeps its tail.
    """
    history, lookahead = layer.history_frames, layer.lookahead_frames
    pieces, starts, lengths, ready = [], [], [], []
    position = offset = 0
    for buffer, count in zip(buffers, counts, strict=True):
        pieces += [buffer.frames, new[offset : offset + count]]
        offset += count
        length = buffer.frames.shape[0] + count
        starts.append(position)
        lengths.append(length)
        ready.append(max(0, length - history - lookahead))
        position += length
    inputs = np.concatenate(pieces)
    if len(buffers) == 1:
        # One stream: its outputs are one contiguous run, and slices beat gathers.
        outputs = fsmn_memory(layer, inputs, history, ready[0]) if ready[0] else inputs[:0].copy()
    else:
        total = sum(ready)
        # Row index of every ready output frame: stream i's run starts at starts[i] + history.
        run_starts = np.asarray(starts, dtype=np.int64) + history
        index = np.repeat(run_starts - np.cumsum([0, *ready[:-1]]), ready) + np.arange(total)
        outputs = fsmn_memory_at(layer, inputs, index)
    for buffer, start, length, done in zip(buffers, starts, lengths, ready, strict=True):
        buffer.frames = inputs[start + done : start + length].copy()
    return outputs, ready


def fsmn_memory_at(layer: Fsmn, inputs: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Outputs of ``layer`` for the rows ``index`` of ``inputs`` (neighbours read around them)."""
    result = inputs[index]
    for i in range(layer.left.shape[0]):
        result += layer.left[i] * inputs[index - i * layer.left_stride]
    for j in range(layer.right.shape[0]):
        result += layer.right[j] * inputs[index + (j + 1) * layer.right_stride]
    return result


def softmax(logits: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
    """Row-wise softmax, in place; only ``columns`` are normalised and returned if given."""
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    totals = logits.sum(axis=1, keepdims=True)
    if columns is None:
        logits /= totals
        return logits
    return logits[:, columns] / totals

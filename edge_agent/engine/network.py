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

from collections.abc import Sequence
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


def softmax(logits: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
    """Row-wise softmax, in place; only ``columns`` are normalised and returned if given."""
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    totals = logits.sum(axis=1, keepdims=True)
    if columns is None:
        logits /= totals
        return logits
    return logits[:, columns] / totals

"""The cFSMN acoustic network, run incrementally with per-stream state.

The network is split where the engine's work splits. The **body** (every component up to the
last affine transform) turns features into 140-dimensional hidden rows, one per 30 ms output
frame; it runs on every frame. The **output layer** (:class:`OutputLayer`: the last affine
transform, 140 -> 2599, and the softmax) is half of the arithmetic, but a keyword decoder needs
exact posteriors only for the few frames where a keyword may be under way: it asks for those
rows, and gets cheap upper bounds for the others (see :mod:`edge_agent.engine.decoder`).

Every component but ``Fsmn`` works frame by frame, so a chunk of frames goes through it as one
matrix product. An ``Fsmn`` layer reads ``history_frames`` past and ``lookahead_frames`` future
inputs, so each stream keeps, per Fsmn layer, a buffer of recent inputs: the outputs of a
chunk's last ``lookahead_frames`` frames wait until the next chunk brings their future (the
model's latency: 2 frames x 4 layers x 30 ms = 240 ms) and :meth:`NetworkBackend.hidden` with
``final=True`` supplies zeros for it, exactly as a whole-utterance pass treats frames past the
end. Chunked and whole-utterance outputs are therefore the same, which the tests check; we
never pad zeros at chunk edges as FunASR's streaming mode does.

Two backends implement :class:`NetworkBackend`: :class:`NumpyNetwork` here (the default, no
torch import: torch costs ~1.8 s and ~220 MB on import) and ``TorchNetwork`` in
``torch_network.py``. Both share the numpy :class:`OutputLayer`.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import threading
import weakref
from collections.abc import Iterable, Sequence
from typing import NamedTuple, Protocol

import numpy as np

from edge_agent.engine.arrays import sliding_view
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
    output: OutputLayer

    def new_state(self) -> NetworkState:
        """State for a new stream (silence before its start)."""
        ...

    def hidden(self, state: NetworkState, features: np.ndarray, final: bool = False) -> np.ndarray:
        """Feed (n, input_dim) frames; return the hidden rows (m, output.input_dim) now final.

        With ``final=True`` the stream ends: every pending frame is returned and ``state`` must
        not be used again.
        """
        ...

    def hidden_many(self, states: Sequence[NetworkState], features: Sequence[np.ndarray]) -> list[np.ndarray]:
        """:meth:`hidden` for several streams at once; the same results, in one pass."""
        ...

    def forward(
        self,
        state: NetworkState,
        features: np.ndarray,
        final: bool = False,
        columns: np.ndarray | None = None,
    ) -> np.ndarray:
        """:meth:`hidden`, then the output layer on every row: the posteriors (m, output_dim),
        or only ``columns`` of them (still normalised over all outputs)."""
        ...


def validate_structure(components: Sequence[Component], source: str) -> None:
    """Refuse networks this engine cannot run correctly."""
    for component in components:
        if isinstance(component, (Splice, AddShift, Rescale)):
            raise ValueError(
                f"{source}: {type(component).__name__} inside the acoustic network is not supported "
                "(feature transforms belong in the .mvn file)"
            )
    if len(components) < 2 or not isinstance(components[-1], Softmax):
        # The decoder needs posteriors; a network without a final Softmax gives logits.
        raise ValueError(f"{source}: the network must end with a Softmax component")
    if not isinstance(components[-2], AffineTransform):
        raise ValueError(f"{source}: the network must end with an AffineTransform followed by a Softmax")


# Bounds needing at most this many differences of logits (rows x columns x columns) come from
# them, others from a softmax of the logits: the differences take columns times the arithmetic,
# which costs more than the numpy calls they save once there are more than a few rows.
_PAIRWISE_BOUND_VALUES = 288
# exp(80) times 16 (the most columns a bound by differences has) is finite in float32.
_DIFFERENCE_CAP = np.float32(80.0)


class _Subset(NamedTuple):
    """The output layer's weights and bias for some columns, and for the differences of their
    logits (:meth:`OutputLayer.bounds`)."""

    weights: np.ndarray
    bias: np.ndarray
    differences: np.ndarray
    difference_bias: np.ndarray


# Exact posteriors of up to this many rows are computed two rows at a time (see _selected).
_PAIRED_OUTPUT_ROWS = 6

# Rows of exact posteriors computed at a time (their logits: 2.7 MB).
_OUTPUT_BLOCK_ROWS = 256


class OutputLayer:
    """The last affine transform and the softmax, for the rows that need them.

    :meth:`posteriors` is exact. :meth:`bounds` computes only the logits of the selected
    columns and normalises over them alone: each value is then at least the true posterior
    (the true softmax divides by a larger sum), at a fraction of the cost.
    """

    def __init__(self, affine: AffineTransform) -> None:
        self.input_dim = affine.input_dim
        self.output_dim = affine.output_dim
        # Two extra input rows make the matrix product add the bias and subtract each row's
        # shift itself: hidden | 1 | -shift times weights ; bias ; 1. That saves two passes over
        # the (rows, 2599) logits, which cost as much as the product's arithmetic.
        augmented = np.empty((self.input_dim + 2, self.output_dim), dtype=np.float32)
        augmented[: self.input_dim] = affine.weight.T
        augmented[self.input_dim] = affine.bias
        augmented[self.input_dim + 1] = 1.0
        augmented.flags.writeable = False
        self._augmented = augmented
        # The weights (input, output) and the bias are its first rows: one copy in every
        # process (the agent's and each engine process), not two.
        self._weights = augmented[: self.input_dim]
        self._bias = augmented[self.input_dim]
        self._subsets: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}
        #: rows given bounds and rows given exact posteriors so far (statistics, all streams)
        self.rows_bounded = 0
        self.rows_exact = 0

    def affine(self) -> AffineTransform:
        """The layer's affine transform, its weight and bias views of this layer's matrix."""
        return AffineTransform(weight=self._weights.T, bias=self._bias)

    def _subset(self, columns: np.ndarray) -> _Subset:
        key = columns.tobytes()
        found = self._subsets.get(key)
        if found is None:
            weights = np.ascontiguousarray(self._weights[:, columns])
            bias = self._bias[columns].copy()
            count = columns.shape[0]
            # Column j * count + i: the logit of column i minus that of column j.
            differences = np.ascontiguousarray(
                (weights[:, None, :] - weights[:, :, None]).reshape(self.input_dim, count * count)
            )
            # The bias of the differences as rows (numpy adds arrays of one shape faster).
            difference_bias = (bias[None, :] - bias[:, None]).reshape(1, count * count)
            rows = _PAIRWISE_BOUND_VALUES // (count * count)
            found = _Subset(weights, bias, differences, np.repeat(difference_bias, max(rows, 1), axis=0))
            self._subsets[key] = found
        return found

    def logits(self, hidden: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """The logits of ``columns`` only."""
        subset = self._subset(np.asarray(columns, dtype=np.int64))
        logits = np.asarray(hidden, dtype=np.float32).dot(subset.weights)
        logits += subset.bias
        return logits

    def bounds(self, hidden: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """Upper bounds of the posteriors of ``columns`` (softmax over those columns alone)."""
        hidden = np.asarray(hidden, dtype=np.float32)
        rows = hidden.shape[0]
        self.rows_bounded += rows
        subset = self._subset(np.asarray(columns, dtype=np.int64))
        count = subset.bias.shape[0]
        if rows * count * count > _PAIRWISE_BOUND_VALUES:
            logits = hidden.dot(subset.weights)
            logits += subset.bias
            return softmax(logits)
        # Few rows: the same softmax in fewer numpy calls, as 1 / sum_i exp(logit_i - logit_j),
        # one product giving every difference. Capping them keeps exp finite (and the sum of at
        # most 16 of them); a cap only lowers a term, so the bound can only rise.
        differences = hidden.dot(subset.differences)
        np.add(differences, subset.difference_bias[:rows], out=differences)
        np.minimum(differences, _DIFFERENCE_CAP, out=differences)
        np.exp(differences, out=differences)
        sums = np.add.reduce(differences.reshape(rows, count, count), axis=2)
        return np.reciprocal(sums, out=sums)

    def posteriors(self, hidden: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
        """Exact posteriors of every output, or of ``columns`` (normalised over all outputs)."""
        hidden = np.asarray(hidden, dtype=np.float32)
        rows = hidden.shape[0]
        self.rows_exact += rows
        if columns is None:
            logits = hidden @ self._weights
            logits += self._bias
            return softmax(logits)
        columns = np.asarray(columns, dtype=np.int64)
        if rows <= _OUTPUT_BLOCK_ROWS:
            return self._selected(hidden, columns)
        # In blocks: the (rows, 2599) logits of a burst (every stream of a batch finding a
        # keyword at once) would otherwise take hundreds of MB for an instant.
        return np.concatenate(
            [
                self._selected(hidden[start : start + _OUTPUT_BLOCK_ROWS], columns)
                for start in range(0, rows, _OUTPUT_BLOCK_ROWS)
            ]
        )

    def posteriors_of(self, parts: Iterable[np.ndarray], columns: np.ndarray) -> np.ndarray:
        """:meth:`posteriors` of ``columns`` for the rows of ``parts`` one after the other: the
        same values as for their concatenation, in the same blocks, but each part is copied into
        the block being filled as it comes. A burst of requests (every stream of a batch
        resolving a keyword at once) then holds one block of rows, not all of them and their
        concatenation. A lone part is used as it is."""
        columns = np.asarray(columns, dtype=np.int64)
        lone: np.ndarray | None = None  # the first part, while no other came
        block: np.ndarray | None = None
        filled = 0
        results: list[np.ndarray] = []
        for part in parts:
            part = np.asarray(part, dtype=np.float32)
            if block is None:
                if lone is None:
                    lone = part
                    continue
                block = np.empty((_OUTPUT_BLOCK_ROWS, self.input_dim), dtype=np.float32)
                filled = self._fill(block, 0, lone, columns, results)
            filled = self._fill(block, filled, part, columns, results)
        if block is None:
            nothing = np.zeros((0, self.input_dim), dtype=np.float32)
            return self.posteriors(nothing if lone is None else lone, columns)
        if filled or not results:
            results.append(self._selected(block[:filled], columns))
        return results[0] if len(results) == 1 else np.concatenate(results)

    def _fill(
        self, block: np.ndarray, filled: int, part: np.ndarray, columns: np.ndarray, results: list[np.ndarray]
    ) -> int:
        """Copy ``part`` into ``block`` after its ``filled`` rows; each full block's posteriors
        go to ``results``. Returns the rows filled after."""
        self.rows_exact += part.shape[0]
        start = 0
        while start < part.shape[0]:
            count = min(block.shape[0] - filled, part.shape[0] - start)
            block[filled : filled + count] = part[start : start + count]
            filled += count
            start += count
            if filled == block.shape[0]:
                results.append(self._selected(block, columns))
                filled = 0
        return filled

    def _selected(self, hidden: np.ndarray, columns: np.ndarray) -> np.ndarray:
        rows = hidden.shape[0]
        if rows == 0:
            return np.zeros((0, columns.shape[0]), dtype=np.float32)
        # Shift each row by its largest selected logit rather than by its largest logit: the
        # product can then subtract it, and no pass is needed to find the maximum. The largest
        # logit exceeds the selected ones (which include blank) by less than 20 on audio/dev,
        # far from float32's exp overflow at 88; a row that overflows anyway is redone exactly.
        shift = self.logits(hidden, columns).max(axis=1)
        augmented = np.empty((rows, self.input_dim + 2), dtype=np.float32)
        augmented[:, : self.input_dim] = hidden
        augmented[:, self.input_dim] = 1.0
        np.negative(shift, out=augmented[:, self.input_dim + 1])
        if 2 < rows <= _PAIRED_OUTPUT_ROWS:
            # OpenBLAS multiplies one or two rows by this wide matrix in a path of its own,
            # without first copying the whole matrix as it does for a few rows more.
            shifted = np.empty((rows, self.output_dim), dtype=np.float32)
            for start in range(0, rows, 2):
                np.dot(augmented[start : start + 2], self._augmented, out=shifted[start : start + 2])
        else:
            shifted = augmented @ self._augmented
        with np.errstate(over="ignore"):
            np.exp(shifted, out=shifted)
        totals = shifted.sum(axis=1)
        result = shifted[:, columns] / totals[:, None]
        overflowed = ~np.isfinite(totals)
        if overflowed.any():
            result[overflowed] = softmax(hidden[overflowed] @ self._weights + self._bias)[:, columns]
        return result


class _FsmnBuffer:
    """Per-stream, per-layer inputs kept for the next chunk: history then pending frames.

    They live in a store with room for a few of a live microphone's chunks, over which the
    layer's windows are one view made once: a short chunk is written after the rows held (by the
    linear transform before the layer itself, in one stream's plan) and filtered through that
    view, and the rows held then start further on; they move to the front only when the room
    runs out (every few chunks of 100 ms). A chunk costs one filter pass, not a new matrix and
    copies per layer. Longer chunks (whole files, batches) replace the store's rows, as do
    chunks that do not fit a store without room (a tight slot of :class:`_SlotPool`).
    """

    __slots__ = ("_held", "_start", "_store", "_taps", "in_slot", "windows")

    # Rows a store holds beyond a layer's history and look-ahead: several 100 ms chunks between
    # moves to the front (fewer rows cost a live microphone a few percent). A batch needs none
    # (it reads and writes the rows held): the slots past a pool's first few have less.
    _ROOM = 32

    def __init__(self, frames: np.ndarray, taps: int, slot: np.ndarray | None = None) -> None:
        """``slot``, if given, is the store: a slot of a :class:`_SlotPool`, where a batch reads
        and writes the rows held by many streams at once."""
        self._taps = taps
        if slot is None or frames.shape[0] > slot.shape[0]:
            self._allocate(frames.shape[0] + self._ROOM, frames.shape[1])
        else:
            self._store = slot
            self.windows = _windows(slot, taps, slot.shape[0] - taps + 1)
            #: the store is still the pool's slot (a longer chunk replaces it with its own)
            self.in_slot = True
        self.frames = frames

    def _allocate(self, rows: int, width: int) -> None:
        self._store = np.zeros((max(rows, self._taps), width), dtype=np.float32)
        #: windows[t] reads store rows t .. t + taps - 1 (read only)
        self.windows = _windows(self._store, self._taps, self._store.shape[0] - self._taps + 1)
        self.in_slot = False

    @property
    def frames(self) -> np.ndarray:
        """The rows held (a view: copied by whoever keeps them)."""
        return self._store[self._start : self._start + self._held]

    @frames.setter
    def frames(self, rows: np.ndarray) -> None:
        count = rows.shape[0]
        if count > self._store.shape[0]:
            self._allocate(count + self._ROOM, rows.shape[1])
        self._store[:count] = rows
        self._start = 0
        self._held = count

    def room(self) -> int:
        """New rows that fit after the rows held, once they are at the front of the store."""
        return self._store.shape[0] - self._held

    def reserve(self, count: int, zeros: int) -> np.ndarray:
        """The store's rows for ``count`` new rows, to be written there by the caller, followed by
        ``zeros`` rows of zeros (``room()`` must allow); all of them count as held."""
        start, held = self._start, self._held
        end = start + held + count + zeros
        if end > self._store.shape[0]:
            # Out of room: the rows held go to the front (numpy copies overlapping rows safely).
            self._store[:held] = self._store[start : start + held]
            self._start = start = 0
            end = held + count + zeros
        if zeros:
            self._store[end - zeros : end] = 0.0
        self._held = end - start
        return self._store[end - count - zeros : end - zeros]

    def filter_held(self, taps: np.ndarray) -> np.ndarray:
        """The outputs of every window whose look-ahead is held; the rows only they needed are let go."""
        ready = self._held - (self._taps - 1)
        if ready <= 0:
            return np.zeros((0, self._store.shape[1]), dtype=np.float32)
        outputs = np.einsum("tkd,kd->td", self.windows[self._start : self._start + ready], taps)
        self._start += ready
        self._held -= ready
        return outputs

    def filter_chunk(
        self, x: np.ndarray, count: int, weights: np.ndarray | None, taps: np.ndarray, outs: list[np.ndarray]
    ) -> int:
        """:meth:`reserve` and :meth:`filter_held` for a live stream's short chunk, in one call
        (see NumpyNetwork._hidden_short): ``x @ weights`` (or ``x``) is written after the rows
        held, of which its first ``count`` rows are new ones and the others not held (the next
        chunk writes over them); the windows ready are filtered into ``outs[ready]`` (views of
        the first rows of one array, by number of rows). Returns their number, or -1 (and does
        nothing) if the store has no room for ``x``."""
        store = self._store
        start, held = self._start, self._held
        end = start + held
        rows = x.shape[0]
        if end + rows > store.shape[0]:
            if held + rows > store.shape[0]:
                return -1
            # Out of room: the rows held go to the front (numpy copies overlapping rows safely).
            store[:held] = store[start:end]
            start, end = 0, held
        if weights is None:
            store[end : end + rows] = x
        else:
            np.dot(x, weights, out=store[end : end + rows])  # the product ``x @ weights``, in place
        held += count
        ready = held - (self._taps - 1)
        if ready > 0:
            np.einsum("tkd,kd->td", self.windows[start : start + ready], taps, out=outs[ready])
            start += ready
            held -= ready
        else:
            ready = 0
        self._start, self._held = start, held
        return ready


class _SlotPool:
    """Stores for the FSMN buffers of many streams, a slot per stream: per layer, blocks of
    (slots, rows, dim), so that a batch reads the rows held by all its streams with one indexed
    read per block and layer and writes their tails back with one indexed write, instead of an
    array operation per stream and layer.

    Blocks double in size up to a limit (a lone microphone takes a small one) and never move: a
    stream's buffers are views of its slot, which any thread may create or use meanwhile. A slot
    is free again when its stream's state is collected. Slots are numbered across blocks.

    The first blocks' slots (``roomy``) have room for several of a live microphone's chunks
    (see :attr:`_FsmnBuffer._ROOM`). Only many streams at once reach the later blocks, whose
    slots (``tight``) hold a layer's history and look-ahead alone: a batch reads and writes
    only the rows held, and room would cost memory once per stream and layer. A stream of
    theirs fed alone takes the long chunks' path (a few array operations more), and its rows
    held stay in its slot.
    """

    _FIRST_BLOCK_SLOTS = 8
    _LARGEST_BLOCK_SLOTS = 64
    # Slots with the roomy shapes: the first two blocks'.
    _ROOMY_SLOTS = 24

    def __init__(self, roomy: list[tuple[int, int]], tight: list[tuple[int, int]]) -> None:
        self._roomy = roomy  # per layer: (rows, dim) of a slot of the first blocks
        self._tight = tight  # the same, in later blocks
        #: per block, per layer: (slots, rows, dim) float32
        self.blocks: list[list[np.ndarray]] = []
        #: per block: the number of its first slot
        self.starts: list[int] = []
        self._free: list[int] = []
        self._lock = threading.Lock()  # streams may be created on several threads

    def take(self) -> int:
        """A free slot (the lowest first)."""
        with self._lock:
            if not self._free:
                self._grow()
            return self._free.pop()

    def give_back(self, slot: int) -> None:
        self._free.append(slot)

    def store(self, layer: int, slot: int) -> np.ndarray:
        """The (rows, dim) store of ``slot`` for ``layer`` (a view)."""
        block = bisect.bisect_right(self.starts, slot) - 1
        return self.blocks[block][layer][slot - self.starts[block]]

    def _grow(self) -> None:
        size = min(self._LARGEST_BLOCK_SLOTS, self._FIRST_BLOCK_SLOTS << len(self.blocks))
        first = self.starts[-1] + self.blocks[-1][0].shape[0] if self.blocks else 0
        shapes = self._roomy if first < self._ROOMY_SLOTS else self._tight
        self.blocks.append([np.zeros((size, rows, dim), dtype=np.float32) for rows, dim in shapes])
        self.starts.append(first)
        self._free += range(first + size - 1, first - 1, -1)


class _SlotRun(NamedTuple):
    """``streams`` neighbouring streams of a batch bringing ``count`` new frames each, their
    rows from ``row`` of the batch's matrix on; ``parts``: per pool block, the streams' positions
    in the run, the block, and their slots' indices in the block."""

    count: int
    row: int
    streams: int
    parts: list[tuple[slice, int, slice | np.ndarray]]


class _ShortStep(NamedTuple):
    """A step of :meth:`NumpyNetwork._hidden_short`'s plan: as in the plan, with the bias and
    the ReLU's zeros (if any) as views of every number of rows."""

    kind: int
    weights: np.ndarray | None
    biases: list[np.ndarray] | None
    zeros: list[np.ndarray] | None
    taps: np.ndarray | None
    lookahead: int


class NumpyState:
    __slots__ = ("__weakref__", "buffers", "finished", "slot", "slotted")

    def __init__(self, buffers: list[_FsmnBuffer], slot: int | None = None) -> None:
        self.buffers = buffers
        self.finished = False
        #: this stream's slot in its network's :class:`_SlotPool`, if any
        self.slot = slot
        #: every FSMN buffer is the stream's slot, as a batch leaves it (:meth:`NumpyNetwork._in_slots`)
        self.slotted = False


# Chunks of up to this many frames (a live stream's) go through the network in scratch rows
# (one set per thread: NumpyNetwork._new_scratch) instead of new arrays at every step.
_SHORT_CHUNK_FRAMES = 8


def _product_rows(rows: int) -> int:
    """Rows to multiply for ``rows`` rows: one more when odd (but for a single row): OpenBLAS
    multiplies an even number of rows of these small matrices faster than one row fewer, and the
    extra row, whatever it holds, changes no other row of a product."""
    return rows + (rows & 1) if rows > 1 else rows


def fsmn_taps(layer: Fsmn) -> np.ndarray:
    """The layer as one dense filter over ``history + 1 + lookahead`` frames, oldest first,
    including the identity on the current frame: (taps, dim) float32."""
    history = layer.history_frames
    taps = np.zeros((history + 1 + layer.lookahead_frames, layer.input_dim), dtype=np.float64)
    for i in range(layer.left.shape[0]):
        taps[history - i * layer.left_stride] += layer.left[i]
    for j in range(layer.right.shape[0]):
        taps[history + (j + 1) * layer.right_stride] += layer.right[j]
    taps[history] += 1.0
    return taps.astype(np.float32)


def _windows(inputs: np.ndarray, taps: int, count: int) -> np.ndarray:
    """Read-only (count, taps, dim) view: row t holds inputs[t : t + taps]."""
    row, column = inputs.strides
    return sliding_view(inputs, (count, taps, inputs.shape[1]), (row, row, column))


def _stream_windows(padded: np.ndarray, taps: int) -> np.ndarray:
    """Read-only (streams, positions, taps, dim) view of (streams, frames, dim) rows."""
    stream, row, column = padded.strides
    count = padded.shape[1] - taps + 1
    return sliding_view(padded, (padded.shape[0], count, taps, padded.shape[2]), (stream, row, row, column))


def fsmn_outputs(taps: np.ndarray, inputs: np.ndarray, count: int) -> np.ndarray:
    """Outputs for the first ``count`` complete windows of contiguous ``inputs``: output t reads
    inputs[t : t + taps], its current frame at t + history. One einsum for every tap."""
    if count <= 0:
        return np.zeros((0, inputs.shape[1]), dtype=np.float32)
    return np.einsum("tkd,kd->td", _windows(inputs, taps.shape[0], count), taps)


# Rows of zeros kept per ReLU width (see _relu_in_place).
_RELU_BLOCK_ROWS = 256


def _relu_in_place(x: np.ndarray, zeros: np.ndarray) -> None:
    """``max(x, 0)`` in place, against ``zeros`` (rows of zeros as wide as ``x``): numpy's
    maximum against a scalar takes a loop several times slower than against an array."""
    rows = x.shape[0]
    if rows <= zeros.shape[0]:
        np.maximum(x, zeros[:rows], out=x)
        return
    for start in range(0, rows, zeros.shape[0]):
        block = x[start : start + zeros.shape[0]]
        np.maximum(block, zeros[: block.shape[0]], out=block)


# Streams whose FSMN inputs are filtered at a time in a batch.
_FILTER_STREAMS = 64

# The kinds of steps of NumpyNetwork's plan.
_AFFINE, _AFFINE_RELU, _LINEAR, _LINEAR_RELU, _RELU, _FSMN, _LINEAR_FSMN = range(7)


class NumpyNetwork:
    """numpy float32 implementation of :class:`NetworkBackend`."""

    name = "numpy"

    def __init__(self, components: Sequence[Component], source: str = "network") -> None:
        validate_structure(components, source)
        self.input_dim = components[0].input_dim
        self.output_dim = components[-1].output_dim
        self.output = OutputLayer(components[-2])  # type: ignore[arg-type]
        # One copy of each weight matrix: the transposed one (every chunk is then a plain
        # row-major x @ W), which the components kept here see as their weight (a view of its
        # transpose, the output layer's a view of its matrix); the matrices read from the file
        # are let go with the caller's components.
        self.components = [_transposed_once(c) for c in components[:-2]]
        self.components += [self.output.affine(), components[-1]]
        self._body = self.components[:-2]
        self._fsmn_layers = [c for c in self._body if isinstance(c, Fsmn)]
        self.lookahead_frames = sum(layer.lookahead_frames for layer in self._fsmn_layers)
        self._weights_t = {
            id(c): c.weight.T for c in self._body if isinstance(c, (AffineTransform, LinearTransform))
        }
        self._biases = {
            id(c): np.asarray(c.bias, dtype=np.float32) for c in self._body if isinstance(c, AffineTransform)
        }
        self._taps = {id(layer): fsmn_taps(layer) for layer in self._fsmn_layers}
        self._plan = self._compile_plan()
        widths = {c.output_dim for c in self._body if isinstance(c, RectifiedLinear)}
        #: per ReLU width, rows of zeros (read only)
        self._zeros = {width: np.zeros((_RELU_BLOCK_ROWS, width), dtype=np.float32) for width in widths}
        for zeros in self._zeros.values():
            zeros.flags.writeable = False
        self._short_plan = self._compile_short_plan()
        # Each thread's scratch rows for short chunks (_hidden_short): they hold nothing from
        # one call to the next, so every stream a thread feeds can share them.
        self._threads = threading.local()
        self._slots = _SlotPool(
            [(layer.history_frames + _FsmnBuffer._ROOM, layer.input_dim) for layer in self._fsmn_layers],
            [(layer.history_frames + layer.lookahead_frames, layer.input_dim) for layer in self._fsmn_layers],
        )

    def _compile_plan(self) -> list[tuple[int, np.ndarray | None, np.ndarray | None, np.ndarray | None, int]]:
        """The body as a list of steps for one stream's chunks: (kind, weights, bias, FSMN taps,
        FSMN look-ahead), each step an affine transform (with its ReLU when one follows), a
        linear transform, an FSMN layer, or a linear transform whose rows go straight into the
        next FSMN layer's store. A live microphone's chunks are a few frames, and the per-step
        dispatch and copies would cost as much as the arithmetic."""
        plan: list[tuple[int, np.ndarray | None, np.ndarray | None, np.ndarray | None, int]] = []
        for component in self._body:
            previous = plan[-1] if plan else None
            if isinstance(component, RectifiedLinear):
                if previous is not None and previous[0] in (_AFFINE, _LINEAR):
                    kind = _AFFINE_RELU if previous[0] == _AFFINE else _LINEAR_RELU
                    plan[-1] = (kind, *previous[1:])
                else:
                    plan.append((_RELU, None, None, None, 0))
            elif isinstance(component, AffineTransform):
                plan.append((_AFFINE, self._weights_t[id(component)], self._biases[id(component)], None, 0))
            elif isinstance(component, LinearTransform):
                plan.append((_LINEAR, self._weights_t[id(component)], None, None, 0))
            elif isinstance(component, Fsmn):
                taps, lookahead = self._taps[id(component)], component.lookahead_frames
                if previous is not None and previous[0] == _LINEAR:
                    plan[-1] = (_LINEAR_FSMN, previous[1], None, taps, lookahead)
                else:
                    plan.append((_FSMN, None, None, taps, lookahead))
        return plan

    def _compile_short_plan(self) -> list[_ShortStep]:
        """The plan for short chunks (:meth:`_hidden_short`): each bias tiled as rows (numpy
        adds two arrays of one shape faster than it broadcasts a row), and the views of the
        bias and of the ReLU's zeros for every number of rows, made once."""
        rows = _product_rows(_SHORT_CHUNK_FRAMES)
        steps = []
        width = self.input_dim
        for kind, weights, bias, taps, lookahead in self._plan:
            if kind in (_FSMN, _LINEAR_FSMN):
                width = taps.shape[1]  # type: ignore[union-attr]
            elif kind != _RELU:
                width = weights.shape[1]  # type: ignore[union-attr]
            biases = None
            if bias is not None:
                tiled = np.tile(bias, (rows, 1))
                biases = [tiled[:count] for count in range(rows + 1)]
            zeros = None
            if kind in (_AFFINE_RELU, _LINEAR_RELU, _RELU):
                zeros = [self._zeros[width][:count] for count in range(rows + 1)]
            steps.append(_ShortStep(kind, weights, biases, zeros, taps, lookahead))
        return steps

    def new_state(self) -> NumpyState:
        slot = self._slots.take()
        state = NumpyState(
            [
                _FsmnBuffer(
                    np.zeros((layer.history_frames, layer.input_dim), dtype=np.float32),
                    self._taps[id(layer)].shape[0],
                    self._slots.store(index, slot),
                )
                for index, layer in enumerate(self._fsmn_layers)
            ],
            slot,
        )
        weakref.finalize(state, self._slots.give_back, slot).atexit = False
        return state

    def forward(  # type: ignore[override]
        self,
        state: NumpyState,
        features: np.ndarray,
        final: bool = False,
        columns: np.ndarray | None = None,
    ) -> np.ndarray:
        return self.output.posteriors(self.hidden(state, features, final), columns)

    def hidden(self, state: NumpyState, features: np.ndarray, final: bool = False) -> np.ndarray:  # type: ignore[override]
        if state.finished:
            raise RuntimeError("this stream's network state was finished; create a new one")
        state.slotted = False
        x = self._check(features)
        if not final and x.shape[0] <= _SHORT_CHUNK_FRAMES:
            return self._hidden_short(state, x)
        buffers = iter(state.buffers)
        for kind, weights, bias, taps, lookahead in self._plan:
            if kind in (_FSMN, _LINEAR_FSMN):
                buffer = next(buffers)
                zeros = lookahead if final else 0
                if x.shape[0] + zeros <= buffer.room():
                    rows = buffer.reserve(x.shape[0], zeros)
                    if kind == _LINEAR_FSMN:
                        np.dot(x, weights, out=rows)  # the product ``x @ weights``, in place
                    else:
                        rows[...] = x
                    x = buffer.filter_held(taps)  # type: ignore[arg-type]
                else:
                    if kind == _LINEAR_FSMN:
                        x = x.dot(weights)
                    x = self._fsmn_long(taps, lookahead, buffer, x, final)  # type: ignore[arg-type]
                continue
            if kind != _RELU:
                # ndarray.dot: the product ``@`` computes, with less dispatch per call.
                x = x.dot(weights)
                if bias is not None:
                    x += bias
            if kind != _AFFINE and kind != _LINEAR:
                _relu_in_place(x, self._zeros[x.shape[1]])
        if final:
            state.finished = True
        return x

    def _hidden_short(self, state: NumpyState, x: np.ndarray) -> np.ndarray:
        """:meth:`hidden` for a short chunk (not the last): every step writes into the thread's
        scratch rows, and each product multiplies :func:`_product_rows` rows, of which the first
        ``count`` are the chunk's (the others are left over from earlier chunks, or zeros).
        Every view of a few rows it needs is made once (views cost as much as small ufuncs)."""
        scratch = getattr(self._threads, "scratch", None)
        if scratch is None:
            scratch = self._threads.scratch = self._new_scratch()
        count = x.shape[0]
        rows = _product_rows(count)
        if rows != count:
            padded = scratch[0][rows]
            padded[:count] = x
            x = padded
        buffers = iter(state.buffers)
        last = len(self._short_plan) - 1
        for step, (kind, weights, biases, zeros, taps, lookahead) in enumerate(self._short_plan):
            outs = scratch[step + 1]
            if kind in (_LINEAR_FSMN, _FSMN):
                buffer = next(buffers)
                ready = buffer.filter_chunk(x, count, weights, taps, outs)  # type: ignore[arg-type]
                if ready >= 0:
                    count = ready
                else:
                    new = x[:count].dot(weights) if kind == _LINEAR_FSMN else x[:count]
                    filtered = self._fsmn_long(taps, lookahead, buffer, new, False)  # type: ignore[arg-type]
                    count = filtered.shape[0]
                    outs[count][...] = filtered
                rows = _product_rows(count)
                x = outs[rows]
                continue
            if kind != _RELU:
                # The last step's rows are a new array: the caller keeps them.
                x = x.dot(weights) if step == last else np.dot(x, weights, out=outs[rows])
                if biases is not None:
                    np.add(x, biases[rows], out=x)
            if zeros is not None:
                np.maximum(x, zeros[rows], out=x)  # _relu_in_place, inline
        if self._short_plan[-1].kind in (_RELU, _FSMN, _LINEAR_FSMN):
            return x[:count].copy()  # scratch rows: the caller keeps them
        return x[:count] if rows != count else x

    def _new_scratch(self) -> list[list[np.ndarray]]:
        """A thread's rows for short chunks: for the features, then for the output of each step,
        zeros and their views of every number of rows."""
        rows = _product_rows(_SHORT_CHUNK_FRAMES)
        widths = [self.input_dim]
        for kind, weights, _bias, taps, _lookahead in self._plan:
            if kind in (_FSMN, _LINEAR_FSMN):
                widths.append(taps.shape[1])  # type: ignore[union-attr]
            elif kind == _RELU:
                widths.append(widths[-1])
            else:
                widths.append(weights.shape[1])  # type: ignore[union-attr]
        scratch = []
        for width in widths:
            block = np.zeros((rows, width), dtype=np.float32)
            scratch.append([block[:count] for count in range(rows + 1)])
        return scratch

    def hidden_many(  # type: ignore[override]
        self, states: Sequence[NumpyState], features: Sequence[np.ndarray]
    ) -> list[np.ndarray]:
        """All streams' new frames through every layer together: one matrix product per layer
        for all of them, and one filter pass per FSMN layer; each stream keeps its own memory."""
        if len(states) == 1:
            return [self.hidden(states[0], features[0])]
        if any(state.finished for state in states):
            raise RuntimeError("a stream's network state was finished; create a new one")
        counts_given = [len(chunk) for chunk in features]
        # Streams holding as many frames side by side, so that each FSMN layer filters them as
        # one matrix (see _fsmn_many), and among those in the order of their slots, so that the
        # streams of a pool block are neighbours (see _fsmn_slotted); undone at the end.
        first_held = [state.buffers[0]._held if state.buffers else 0 for state in states]
        slots = [-1 if state.slot is None else state.slot for state in states]
        order = np.lexsort((slots, np.add(first_held, counts_given))).tolist()
        states = [states[i] for i in order]
        counts = [counts_given[i] for i in order]
        x = self._check(np.concatenate([features[i] for i in order], dtype=np.float32))
        layout = self._slot_layout(states)
        # Every stream left in its slots by the previous batch is still there (see _in_slots).
        steady = layout is not None and all(state.slotted for state in states)
        runs = None if layout is None else self._slot_runs(layout, counts)
        slotted = True
        fsmn_index = 0
        for component in self._body:
            if isinstance(component, Fsmn):
                if runs is not None and (steady or self._in_slots(component, fsmn_index, states)):
                    x = self._fsmn_slotted(component, fsmn_index, runs, x)
                else:
                    buffers = [state.buffers[fsmn_index] for state in states]
                    x, counts = self._fsmn_many(component, buffers, x, counts)
                    slotted = False
                    if runs is not None:
                        runs = self._slot_runs(layout, counts)  # type: ignore[arg-type]
                fsmn_index += 1
            else:
                x = self._frame_wise(component, x)
        for state in states:
            state.slotted = slotted
        bounds = np.cumsum([0, *counts]).tolist()
        results: list[np.ndarray] = [x[:0]] * len(states)
        for position, stream in enumerate(order):
            results[stream] = x[bounds[position] : bounds[position + 1]]
        return results

    def _check(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"expected features of shape (n, {self.input_dim}), got {x.shape}")
        return x

    def _frame_wise(self, component: Component, x: np.ndarray) -> np.ndarray:
        if isinstance(component, AffineTransform):
            x = x @ self._weights_t[id(component)]
            x += self._biases[id(component)]
        elif isinstance(component, LinearTransform):
            x = x @ self._weights_t[id(component)]
        elif isinstance(component, RectifiedLinear):
            _relu_in_place(x, self._zeros[x.shape[1]])
        return x

    @staticmethod
    def _fsmn_long(
        taps: np.ndarray, lookahead: int, buffer: _FsmnBuffer, new: np.ndarray, final: bool
    ) -> np.ndarray:
        """One FSMN layer of :meth:`hidden` for a chunk longer than the buffer's room (a whole
        file's block)."""
        history = taps.shape[0] - 1 - lookahead
        parts = [buffer.frames, new]
        if final and lookahead:
            parts.append(np.zeros((lookahead, new.shape[1]), dtype=np.float32))
        inputs = np.concatenate(parts) if new.shape[0] or final else buffer.frames
        ready = inputs.shape[0] - history - lookahead
        if ready <= 0:
            buffer.frames = inputs
            return np.zeros((0, new.shape[1]), dtype=np.float32)
        outputs = fsmn_outputs(taps, inputs, ready)
        buffer.frames = inputs[ready:].copy()  # not a view: it would keep all of ``inputs``
        return outputs

    def _slot_layout(self, states: Sequence[NumpyState]) -> tuple[np.ndarray, np.ndarray] | None:
        """The streams' slots, in batch order, as pool blocks and indices in their blocks;
        None if a stream has none."""
        slots = [state.slot for state in states]
        if None in slots:
            return None
        numbers = np.array(slots, dtype=np.intp)
        starts = np.array(self._slots.starts, dtype=np.intp)
        blocks = np.searchsorted(starts, numbers, side="right") - 1
        return blocks, numbers - starts[blocks]

    @staticmethod
    def _slot_runs(layout: tuple[np.ndarray, np.ndarray], counts: list[int]) -> list[_SlotRun]:
        """The batch's runs of streams bringing as many frames (in batch order), each with its
        streams' slots per pool block: the same for every FSMN layer of a batch."""
        blocks, indices = layout
        runs: list[_SlotRun] = []
        row = stream = 0
        for count, run in itertools.groupby(counts):
            streams = len(list(run))
            # At most _FILTER_STREAMS streams at a time: their inputs stay in the core's cache
            # between the reads from the slots, the filter and the writes back.
            for first in range(stream, stream + streams, _FILTER_STREAMS):
                part = min(_FILTER_STREAMS, stream + streams - first)
                if count:
                    runs.append(NumpyNetwork._slot_run(blocks, indices, count, row, first, part))
                row += part * count
            stream += streams
        return runs

    @staticmethod
    def _slot_run(
        blocks: np.ndarray, indices: np.ndarray, count: int, row: int, stream: int, streams: int
    ) -> _SlotRun:
        """The run of ``streams`` streams from ``stream`` on (batch order), bringing ``count``
        frames each, with their slots per pool block."""
        in_blocks = blocks[stream : stream + streams]
        where = indices[stream : stream + streams]
        # Streams are ordered by slot within a run: a block's streams are neighbours.
        edges = (np.flatnonzero(in_blocks[1:] != in_blocks[:-1]) + 1).tolist()
        # gaps[i]: how many of the streams up to i have a slot not right after the previous one's.
        gaps = np.zeros(streams, dtype=np.intp)
        np.cumsum(where[1:] != where[:-1] + 1, out=gaps[1:])
        gap_counts = gaps.tolist()
        parts: list[tuple[slice, int, slice | np.ndarray]] = []
        for low, high in zip([0, *edges], [*edges, streams], strict=True):
            # Consecutive slots (streams started together) are read as one slice.
            if gap_counts[high - 1] == gap_counts[low]:
                slots: slice | np.ndarray = slice(int(where[low]), int(where[high - 1]) + 1)
            else:
                slots = where[low:high]
            parts.append((slice(low, high), int(in_blocks[low]), slots))
        return _SlotRun(count, row, streams, parts)

    def _in_slots(self, layer: Fsmn, index: int, states: Sequence[NumpyState]) -> bool:
        """Every stream's buffer for this layer (its ``index``-th) is its slot and holds one
        window's inputs but the newest (the steady state: every stream past its first chunk,
        fed chunks a slot can hold)."""
        held = self._taps[id(layer)].shape[0] - 1
        for state in states:
            buffer = state.buffers[index]
            if not buffer.in_slot or buffer._start or buffer._held != held:
                return False
        return True

    def _fsmn_slotted(
        self, layer: Fsmn, layer_index: int, runs: list[_SlotRun], new: np.ndarray
    ) -> np.ndarray:
        """:meth:`_fsmn_many` for streams whose buffers are slots (:meth:`_in_slots`), with the
        same arithmetic: each run of streams bringing as many new frames is one (streams,
        frames, dim) block for the filter, its rows held read from their slots at once (per pool
        block) and its tails written back at once. A stream holding one window's inputs but the
        newest completes a window per new frame, and holds as many rows after."""
        taps = self._taps[id(layer)]
        held = taps.shape[0] - 1
        width = layer.input_dim
        pool = self._slots.blocks
        filtered = np.empty((new.shape[0], width), dtype=np.float32)
        for count, row, streams, parts in runs:
            inputs = np.empty((streams, held + count, width), dtype=np.float32)
            inputs[:, held:] = new[row : row + streams * count].reshape(streams, count, width)
            for mine, block, slots in parts:
                inputs[mine, :held] = pool[block][layer_index][slots, :held]
            outputs = filtered[row : row + streams * count].reshape(streams, count, width)
            np.einsum("srkd,kd->srd", _stream_windows(inputs, taps.shape[0]), taps, out=outputs)
            for mine, block, slots in parts:
                pool[block][layer_index][slots, :held] = inputs[mine, count:]
        return filtered

    def _fsmn_many(
        self, layer: Fsmn, buffers: list[_FsmnBuffer], new: np.ndarray, counts: list[int]
    ) -> tuple[np.ndarray, list[int]]:
        """One FSMN layer for many streams: rows of ``new`` are the streams' frames, in order.

        Each stream's buffered inputs and new frames are laid out one after the other in one
        matrix. Consecutive streams holding as many frames (the usual batch: streams fed in step,
        ordered by :meth:`hidden_many`) are that matrix's rows reshaped to (streams, frames,
        dim): one filter pass for all of them, every window inside one stream, every window
        ready (its look-ahead has arrived). Then each stream keeps its tail.
        """
        taps = self._taps[id(layer)]
        taps_count, width = taps.shape[0], layer.input_dim
        held = [buffer.frames for buffer in buffers]
        if len(set(counts)) == 1 and len({frames.shape[0] for frames in held}) == 1:
            return self._fsmn_in_step(taps, buffers, held, new, counts[0], layer.output_dim)
        lengths = [frames.shape[0] + count for frames, count in zip(held, counts, strict=True)]
        edges = np.cumsum([0, *counts]).tolist()
        pieces: list[np.ndarray] = []
        for frames, low, high in zip(held, edges[:-1], edges[1:], strict=True):
            pieces += (frames, new[low:high])
        inputs = np.concatenate(pieces)
        filtered: list[np.ndarray] = []
        ready: list[int] = []
        row = 0
        for length, run in itertools.groupby(lengths):
            streams = len(list(run))
            # Windows of history + current + look-ahead frames inside each stream's row.
            windows = length - taps_count + 1
            if windows > 0:
                rows = inputs[row : row + streams * length].reshape(streams, length, width)
                outputs = np.einsum("srkd,kd->srd", _stream_windows(rows, taps_count), taps)
                filtered.append(outputs.reshape(streams * windows, width))
            ready += [max(0, windows)] * streams
            row += streams * length
        # Each stream keeps its tail (the setter copies it into the stream's own store).
        start = 0
        for buffer, length, done in zip(buffers, lengths, ready, strict=True):
            buffer.frames = inputs[start + done : start + length]
            start += length
        if not filtered:
            return np.zeros((0, layer.output_dim), dtype=np.float32), ready
        return (filtered[0] if len(filtered) == 1 else np.concatenate(filtered)), ready

    @staticmethod
    def _fsmn_in_step(
        taps: np.ndarray,
        buffers: list[_FsmnBuffer],
        held: list[np.ndarray],
        new: np.ndarray,
        count: int,
        output_dim: int,
    ) -> tuple[np.ndarray, list[int]]:
        """:meth:`_fsmn_many` when every stream holds as many frames and brings as many new ones
        (streams fed in step): one (streams, frames, dim) block built at once, and the tails
        kept in one block, rather than a piece and a copy per stream."""
        streams, width = len(buffers), new.shape[1]
        length = held[0].shape[0] + count
        inputs = np.empty((streams, length, width), dtype=np.float32)
        if held[0].shape[0]:
            np.stack(held, out=inputs[:, : held[0].shape[0]])
        inputs[:, held[0].shape[0] :] = new.reshape(streams, count, width)
        windows = max(0, length - taps.shape[0] + 1)
        # Copied: views of ``inputs`` would keep this batch's whole matrix alive meanwhile.
        tails = inputs[:, windows:].copy()
        for buffer, tail in zip(buffers, tails, strict=True):
            buffer.frames = tail
        if windows == 0:
            return np.zeros((0, output_dim), dtype=np.float32), [0] * streams
        outputs = np.einsum("srkd,kd->srd", _stream_windows(inputs, taps.shape[0]), taps)
        return outputs.reshape(streams * windows, width), [windows] * streams


def _transposed_once(component: Component) -> Component:
    """``component`` with its weight (if any) a view of the transpose of a row-major copy of
    its transpose: the same values, laid out for ``x @ W`` (see :class:`NumpyNetwork`)."""
    if isinstance(component, (AffineTransform, LinearTransform)):
        transposed = np.ascontiguousarray(component.weight.T, dtype=np.float32)
        return dataclasses.replace(component, weight=transposed.T)
    return component


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, in place."""
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    return logits

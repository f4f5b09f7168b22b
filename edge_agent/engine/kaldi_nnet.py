"""Reader for Kaldi nnet1 networks (binary and text), limited to what cFSMN models use.

The ModelScope model ships its acoustic network as ``kwsr.net`` in Kaldi's nnet1 *binary* format;
the feature normalisation ``kwsr.mvn`` uses the nnet1 *text* format. Both formats carry the same
token stream, so one parser walks it through a small tokenizer with a binary and a text flavour:

binary
    starts with ``\\0B``; tokens are ASCII words followed by one space; every integer is a size
    byte ``0x04`` plus a little-endian int32, every float ``0x04`` plus a little-endian float32;
    a matrix is ``FM rows cols`` then row-major float32 data, a vector ``FV dim`` then data.
text
    whitespace-separated tokens; matrices and vectors are written between ``[`` and ``]``.

Every error names the file, the byte offset where reading stopped and what was expected there,
because a truncated download or a file for another toolkit is the usual cause and the offset is
what tells them apart.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "AddShift",
    "AffineTransform",
    "Component",
    "Fsmn",
    "LinearTransform",
    "NnetFormatError",
    "RectifiedLinear",
    "Rescale",
    "Softmax",
    "Splice",
    "parse_nnet",
    "read_nnet",
]


class NnetFormatError(ValueError):
    """A network file could not be read; the message names file, byte offset and expectation."""

    def __init__(self, source: str, offset: int, message: str) -> None:
        super().__init__(f"{source}: byte {offset}: {message}")
        self.source = source
        self.offset = offset


@dataclass(frozen=True)
class AffineTransform:
    """``y = x @ weight.T + bias``; ``weight`` is (output_dim, input_dim)."""

    weight: np.ndarray
    bias: np.ndarray

    @property
    def input_dim(self) -> int:
        return int(self.weight.shape[1])

    @property
    def output_dim(self) -> int:
        return int(self.weight.shape[0])


@dataclass(frozen=True)
class LinearTransform:
    """``y = x @ weight.T``; ``weight`` is (output_dim, input_dim)."""

    weight: np.ndarray

    @property
    def input_dim(self) -> int:
        return int(self.weight.shape[1])

    @property
    def output_dim(self) -> int:
        return int(self.weight.shape[0])


@dataclass(frozen=True)
class Fsmn:
    """Feedforward sequential memory block: a per-dimension FIR filter over time.

    ``y[t] = x[t] + sum_i left[i] * x[t - i*left_stride] + sum_j right[j] * x[t + (j+1)*right_stride]``
    with frames outside the sequence counted as zero. Row 0 of ``left`` weighs the current frame.
    """

    left: np.ndarray  # (left_order, dim)
    right: np.ndarray  # (right_order, dim); shape (0, dim) when right_order == 0
    left_stride: int
    right_stride: int

    @property
    def input_dim(self) -> int:
        return int(self.left.shape[1])

    @property
    def output_dim(self) -> int:
        return self.input_dim

    @property
    def history_frames(self) -> int:
        """Past frames (not counting the current one) this layer reads."""
        return (self.left.shape[0] - 1) * self.left_stride

    @property
    def lookahead_frames(self) -> int:
        """Future frames this layer reads."""
        return self.right.shape[0] * self.right_stride


@dataclass(frozen=True)
class RectifiedLinear:
    dim: int

    @property
    def input_dim(self) -> int:
        return self.dim

    @property
    def output_dim(self) -> int:
        return self.dim


@dataclass(frozen=True)
class Softmax:
    dim: int

    @property
    def input_dim(self) -> int:
        return self.dim

    @property
    def output_dim(self) -> int:
        return self.dim


@dataclass(frozen=True)
class Splice:
    """Frame splicing by the given offsets; ``kwsr.mvn`` only uses ``[ 0 ]`` (identity)."""

    input_dim: int
    output_dim: int
    offsets: tuple[int, ...] = field(default=(0,))


@dataclass(frozen=True)
class AddShift:
    shift: np.ndarray

    @property
    def input_dim(self) -> int:
        return int(self.shift.shape[0])

    @property
    def output_dim(self) -> int:
        return self.input_dim


@dataclass(frozen=True)
class Rescale:
    scale: np.ndarray

    @property
    def input_dim(self) -> int:
        return int(self.scale.shape[0])

    @property
    def output_dim(self) -> int:
        return self.input_dim


Component = AffineTransform | LinearTransform | Fsmn | RectifiedLinear | Softmax | Splice | AddShift | Rescale

_SIZE_BYTE = 4
_INT = struct.Struct("<i")
_FLOAT = struct.Struct("<f")


class _Reader:
    """Token reader over nnet1 bytes; ``binary`` selects the flavour."""

    def __init__(self, data: bytes, source: str) -> None:
        self.source = source
        self.binary = data.startswith(b"\0B")
        self.data = data
        self.pos = 2 if self.binary else 0

    # --- errors --------------------------------------------------------------------------
    def fail(self, message: str, offset: int | None = None) -> NnetFormatError:
        return NnetFormatError(self.source, self.pos if offset is None else offset, message)

    # --- primitive tokens ----------------------------------------------------------------
    def _skip_space(self) -> None:
        data, n = self.data, len(self.data)
        while self.pos < n and data[self.pos] in b" \t\r\n":
            self.pos += 1

    def at_end(self) -> bool:
        self._skip_space()
        return self.pos >= len(self.data)

    def peek_token(self) -> str:
        saved = self.pos
        try:
            return self.token()
        finally:
            self.pos = saved

    def token(self) -> str:
        """Read one whitespace-delimited word (``<Tag>``, ``FM``, ``[``, a number in text)."""
        self._skip_space()
        start = self.pos
        data, n = self.data, len(self.data)
        while self.pos < n and data[self.pos] not in b" \t\r\n":
            self.pos += 1
        if self.pos == start:
            raise self.fail("unexpected end of file, expected a token")
        raw = data[start : self.pos]
        try:
            word = raw.decode("ascii")
        except UnicodeDecodeError:
            raise self.fail(f"expected an ASCII token, found bytes {raw[:16]!r}", start) from None
        if self.binary:
            if self.pos >= n:
                raise self.fail(f"unexpected end of file inside token {raw[:16]!r}", start)
            self.pos += 1  # the single space that ends a binary token
        return word

    def expect(self, expected: str) -> None:
        start = self.pos
        got = self.token()
        if got != expected:
            raise self.fail(f"expected {expected!r}, found {got!r}", start)

    def integer(self, what: str) -> int:
        if self.binary:
            return int(self._binary_scalar(_INT, what))
        start = self.pos
        word = self.token()
        try:
            return int(word)
        except ValueError:
            raise self.fail(f"expected an integer ({what}), found {word!r}", start) from None

    def real(self, what: str) -> float:
        if self.binary:
            return float(self._binary_scalar(_FLOAT, what))
        start = self.pos
        word = self.token()
        try:
            return float(word)
        except ValueError:
            raise self.fail(f"expected a number ({what}), found {word!r}", start) from None

    def _binary_scalar(self, fmt: struct.Struct, what: str) -> float | int:
        start = self.pos
        if self.pos + 1 + fmt.size > len(self.data):
            raise self.fail(f"unexpected end of file, expected {what}", start)
        size = self.data[self.pos]
        if size != _SIZE_BYTE:
            raise self.fail(f"expected {what} (size byte 4), found size byte {size}", start)
        (value,) = fmt.unpack_from(self.data, self.pos + 1)
        self.pos += 1 + fmt.size
        return value

    # --- matrices and vectors ------------------------------------------------------------
    def matrix(self, what: str) -> np.ndarray:
        if self.binary:
            self.expect_binary_header("FM", what)
            rows = self.integer(f"row count of {what}")
            cols = self.integer(f"column count of {what}")
            return self._binary_floats(rows * cols, what, (rows, cols))
        start = self.pos
        self.expect("[")
        rows: list[list[float]] = []
        current: list[float] = []
        while True:
            word_start = self.pos
            word = self.token()
            if word == "]":
                if current:
                    rows.append(current)
                break
            try:
                current.append(float(word))
            except ValueError:
                raise self.fail(f"expected a number or ']' in {what}, found {word!r}", word_start) from None
            # A newline (possibly after trailing spaces) ends a matrix row in Kaldi's text format.
            lookahead = self.pos
            while lookahead < len(self.data) and self.data[lookahead] in b" \t":
                lookahead += 1
            if lookahead < len(self.data) and self.data[lookahead] in b"\r\n":
                rows.append(current)
                current = []
        if not rows:
            return np.zeros((0, 0), dtype=np.float32)
        widths = {len(row) for row in rows}
        if len(widths) != 1:
            raise self.fail(f"rows of {what} have different lengths {sorted(widths)}", start)
        return np.asarray(rows, dtype=np.float32)

    def vector(self, what: str) -> np.ndarray:
        if self.binary:
            self.expect_binary_header("FV", what)
            dim = self.integer(f"length of {what}")
            return self._binary_floats(dim, what, (dim,))
        self.expect("[")
        values: list[float] = []
        while True:
            word_start = self.pos
            word = self.token()
            if word == "]":
                break
            try:
                values.append(float(word))
            except ValueError:
                raise self.fail(f"expected a number or ']' in {what}, found {word!r}", word_start) from None
        return np.asarray(values, dtype=np.float32)

    def expect_binary_header(self, header: str, what: str) -> None:
        start = self.pos
        word = self.token()
        if word != header:
            kind = "float matrix" if header == "FM" else "float vector"
            raise self.fail(f"expected {kind} {header!r} for {what}, found {word!r}", start)

    def _binary_floats(self, count: int, what: str, shape: tuple[int, ...]) -> np.ndarray:
        start = self.pos
        if count < 0 or any(d < 0 for d in shape):
            raise self.fail(f"negative size {shape} for {what}", start)
        end = self.pos + 4 * count
        if end > len(self.data):
            raise self.fail(
                f"unexpected end of file in {what}: needs {4 * count} bytes of float32 data, "
                f"{len(self.data) - self.pos} left",
                start,
            )
        array = np.frombuffer(self.data, dtype="<f4", count=count, offset=self.pos)
        self.pos = end
        return array.reshape(shape).astype(np.float32)

    # --- optional "<Tag> value" pairs --------------------------------------------------------
    def optional_real(self, tag: str) -> float | None:
        if self.peek_token() == tag:
            self.token()
            return self.real(tag)
        return None

    def optional_int(self, tag: str) -> int | None:
        if self.peek_token() == tag:
            self.token()
            return self.integer(tag)
        return None


def _check_shape(reader: _Reader, what: str, array: np.ndarray, shape: tuple[int, ...], offset: int) -> None:
    if array.shape != shape:
        raise reader.fail(f"{what} has shape {array.shape}, expected {shape}", offset)


def _read_component(reader: _Reader, tag: str, start: int) -> Component:
    out_dim = reader.integer(f"output dimension of {tag}")
    in_dim = reader.integer(f"input dimension of {tag}")
    if out_dim <= 0 or in_dim <= 0:
        raise reader.fail(f"{tag} has non-positive dimensions {out_dim}x{in_dim}", start)

    if tag == "<AffineTransform>":
        for name in ("<LearnRateCoef>", "<BiasLearnRateCoef>", "<MaxNorm>"):
            reader.optional_real(name)
        where = reader.pos
        weight = reader.matrix("AffineTransform weights")
        _check_shape(reader, "AffineTransform weights", weight, (out_dim, in_dim), where)
        where = reader.pos
        bias = reader.vector("AffineTransform bias")
        _check_shape(reader, "AffineTransform bias", bias, (out_dim,), where)
        return AffineTransform(weight=weight, bias=bias)

    if tag == "<LinearTransform>":
        reader.optional_real("<LearnRateCoef>")
        where = reader.pos
        weight = reader.matrix("LinearTransform weights")
        _check_shape(reader, "LinearTransform weights", weight, (out_dim, in_dim), where)
        return LinearTransform(weight=weight)

    if tag == "<Fsmn>":
        if out_dim != in_dim:
            raise reader.fail(f"Fsmn must keep its dimension, found {out_dim}x{in_dim}", start)
        reader.optional_real("<LearnRateCoef>")
        left_order = reader.optional_int("<LOrder>")
        right_order = reader.optional_int("<ROrder>")
        left_stride = reader.optional_int("<LStride>")
        right_stride = reader.optional_int("<RStride>")
        reader.optional_real("<MaxNorm>")
        if left_order is None or left_order < 1:
            raise reader.fail(f"Fsmn needs <LOrder> >= 1, found {left_order}", start)
        right_order = right_order or 0
        left_stride = left_stride or 1
        right_stride = right_stride or 1
        if right_order < 0 or left_stride < 1 or right_stride < 1:
            raise reader.fail(
                f"Fsmn has invalid orders/strides (ROrder {right_order}, LStride {left_stride}, "
                f"RStride {right_stride})",
                start,
            )
        where = reader.pos
        left = reader.matrix("Fsmn left filter")
        _check_shape(reader, "Fsmn left filter", left, (left_order, in_dim), where)
        if right_order > 0:
            where = reader.pos
            right = reader.matrix("Fsmn right filter")
            _check_shape(reader, "Fsmn right filter", right, (right_order, in_dim), where)
        else:
            right = np.zeros((0, in_dim), dtype=np.float32)
        return Fsmn(left=left, right=right, left_stride=left_stride, right_stride=right_stride)

    if tag in ("<RectifiedLinear>", "<Softmax>"):
        if out_dim != in_dim:
            raise reader.fail(f"{tag} must keep its dimension, found {out_dim}x{in_dim}", start)
        return RectifiedLinear(in_dim) if tag == "<RectifiedLinear>" else Softmax(in_dim)

    if tag == "<Splice>":
        where = reader.pos
        offsets = reader.vector("Splice offsets")
        if offsets.size == 0 or out_dim != in_dim * offsets.size:
            raise reader.fail(
                f"Splice offsets {offsets.tolist()} do not match dimensions {out_dim}x{in_dim}", where
            )
        return Splice(input_dim=in_dim, output_dim=out_dim, offsets=tuple(int(o) for o in offsets))

    if tag in ("<AddShift>", "<Rescale>"):
        reader.optional_real("<LearnRateCoef>")
        where = reader.pos
        values = reader.vector(f"{tag} values")
        _check_shape(reader, f"{tag} values", values, (out_dim,), where)
        return AddShift(values) if tag == "<AddShift>" else Rescale(values)

    raise AssertionError(tag)  # guarded by _KNOWN_TAGS


_KNOWN_TAGS = (
    "<AffineTransform>",
    "<LinearTransform>",
    "<Fsmn>",
    "<RectifiedLinear>",
    "<Softmax>",
    "<Splice>",
    "<AddShift>",
    "<Rescale>",
)


def parse_nnet(data: bytes, source: str = "<bytes>") -> list[Component]:
    """Parse nnet1 bytes (binary or text) into components, checking that dimensions chain."""
    reader = _Reader(data, source)
    if reader.at_end():
        raise reader.fail("empty file, expected '<Nnet>'")
    reader.expect("<Nnet>")
    components: list[Component] = []
    while True:
        if reader.at_end():
            raise reader.fail("unexpected end of file, expected a component or '</Nnet>'")
        start = reader.pos
        tag = reader.token()
        if tag == "</Nnet>":
            break
        if tag == "<!EndOfComponent>":
            continue
        if tag not in _KNOWN_TAGS:
            raise reader.fail(
                f"unknown component {tag!r}; this reader supports {', '.join(_KNOWN_TAGS)}", start
            )
        component = _read_component(reader, tag, start)
        if components and components[-1].output_dim != component.input_dim:
            raise reader.fail(
                f"{tag} expects input dimension {component.input_dim} but the previous component "
                f"outputs {components[-1].output_dim}",
                start,
            )
        components.append(component)
    if not components:
        raise reader.fail("network has no components")
    if not reader.at_end():
        raise reader.fail("unexpected data after '</Nnet>'")
    return components


def read_nnet(path: str | Path) -> list[Component]:
    """Read a Kaldi nnet1 file; raises :class:`NnetFormatError` or ``OSError``."""
    path = Path(path)
    return parse_nnet(path.read_bytes(), str(path))

"""Writes small Kaldi nnet1 networks for tests, byte by byte, independently of the reader."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Layer:
    tag: str  # "AffineTransform", "LinearTransform", "Fsmn", "RectifiedLinear", "Softmax"
    out_dim: int
    in_dim: int
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    left: np.ndarray | None = None
    right: np.ndarray | None = None
    strides: tuple[int, int] = (1, 1)
    extra: dict[str, float] = field(default_factory=dict)


def random_fsmn_network(seed: int = 0, dim_in: int = 6, hidden: int = 5, outputs: int = 4) -> list[Layer]:
    """A miniature of kwsr.net: affine, relu, linear, fsmn(l3 r2), affine, relu, affine, softmax."""
    rng = np.random.default_rng(seed)
    proj = 3
    return [
        Layer("AffineTransform", hidden, dim_in, rng.normal(size=(hidden, dim_in)), rng.normal(size=hidden)),
        Layer("RectifiedLinear", hidden, hidden),
        Layer("LinearTransform", proj, hidden, rng.normal(size=(proj, hidden))),
        Layer("Fsmn", proj, proj, left=rng.normal(size=(3, proj)), right=rng.normal(size=(2, proj))),
        Layer("AffineTransform", hidden, proj, rng.normal(size=(hidden, proj)), rng.normal(size=hidden)),
        Layer("RectifiedLinear", hidden, hidden),
        Layer("LinearTransform", proj, hidden, rng.normal(size=(proj, hidden))),
        Layer(
            "Fsmn",
            proj,
            proj,
            left=rng.normal(size=(2, proj)),
            right=rng.normal(size=(1, proj)),
            strides=(2, 1),
        ),
        Layer("AffineTransform", outputs, proj, rng.normal(size=(outputs, proj)), rng.normal(size=outputs)),
        Layer("Softmax", outputs, outputs),
    ]


def _int(value: int) -> bytes:
    return b"\x04" + struct.pack("<i", value)


def _float(value: float) -> bytes:
    return b"\x04" + struct.pack("<f", value)


def _token(word: str) -> bytes:
    return word.encode("ascii") + b" "


def _matrix(m: np.ndarray) -> bytes:
    m = np.asarray(m, dtype="<f4")
    return _token("FM") + _int(m.shape[0]) + _int(m.shape[1]) + m.tobytes()


def _vector(v: np.ndarray) -> bytes:
    v = np.asarray(v, dtype="<f4")
    return _token("FV") + _int(v.shape[0]) + v.tobytes()


def binary_nnet(layers: list[Layer]) -> bytes:
    out = [b"\0B", _token("<Nnet>")]
    for layer in layers:
        out.append(_token(f"<{layer.tag}>") + _int(layer.out_dim) + _int(layer.in_dim))
        if layer.tag == "AffineTransform":
            out.append(_token("<LearnRateCoef>") + _float(1.0) + _token("<BiasLearnRateCoef>") + _float(1.0))
            out.append(_token("<MaxNorm>") + _float(0.0) + _matrix(layer.weight) + _vector(layer.bias))
        elif layer.tag == "LinearTransform":
            out.append(_token("<LearnRateCoef>") + _float(1.0) + _matrix(layer.weight))
        elif layer.tag == "Fsmn":
            out.append(_token("<LearnRateCoef>") + _float(1.0))
            out.append(
                _token("<LOrder>")
                + _int(layer.left.shape[0])
                + _token("<ROrder>")
                + _int(layer.right.shape[0])
            )
            out.append(
                _token("<LStride>") + _int(layer.strides[0]) + _token("<RStride>") + _int(layer.strides[1])
            )
            out.append(_token("<MaxNorm>") + _float(0.0) + _matrix(layer.left))
            if layer.right.shape[0]:
                out.append(_matrix(layer.right))
    out.append(_token("</Nnet>"))
    return b"".join(out)


def _text_matrix(m: np.ndarray) -> str:
    rows = "\n".join(
        "  " + " ".join(f"{x:.9g}" for x in row) + " " for row in np.asarray(m, dtype=np.float32)
    )
    return f" [\n{rows} ]\n"


def _text_vector(v: np.ndarray) -> str:
    return " [ " + " ".join(f"{x:.9g}" for x in np.asarray(v, dtype=np.float32)) + " ]\n"


def text_nnet(layers: list[Layer]) -> bytes:
    out = ["<Nnet>\n"]
    for layer in layers:
        out.append(f"<{layer.tag}> {layer.out_dim} {layer.in_dim}\n")
        if layer.tag == "AffineTransform":
            out.append("<LearnRateCoef> 1 <BiasLearnRateCoef> 1 <MaxNorm> 0" + _text_matrix(layer.weight))
            out.append(_text_vector(layer.bias))
        elif layer.tag == "LinearTransform":
            out.append("<LearnRateCoef> 1" + _text_matrix(layer.weight))
        elif layer.tag == "Fsmn":
            out.append(
                f"<LearnRateCoef> 1 <LOrder> {layer.left.shape[0]} <ROrder> {layer.right.shape[0]} "
                f"<LStride> {layer.strides[0]} <RStride> {layer.strides[1]} <MaxNorm> 0"
            )
            out.append(_text_matrix(layer.left))
            if layer.right.shape[0]:
                out.append(_text_matrix(layer.right))
        out.append("<!EndOfComponent>\n")
    out.append("</Nnet>\n")
    return "".join(out).encode("ascii")


def reference_forward(layers: list[Layer], x: np.ndarray) -> np.ndarray:
    """The network's maths written plainly, frame by frame (float64), as ../shared documents it."""
    x = np.asarray(x, dtype=np.float64)
    for layer in layers:
        if layer.tag == "AffineTransform":
            x = x @ layer.weight.T + layer.bias
        elif layer.tag == "LinearTransform":
            x = x @ layer.weight.T
        elif layer.tag == "RectifiedLinear":
            x = np.maximum(x, 0)
        elif layer.tag == "Softmax":
            e = np.exp(x - x.max(axis=1, keepdims=True))
            x = e / e.sum(axis=1, keepdims=True)
        elif layer.tag == "Fsmn":
            frames = x.shape[0]
            y = x.copy()
            for t in range(frames):
                for i in range(layer.left.shape[0]):
                    u = t - i * layer.strides[0]
                    if 0 <= u < frames:
                        y[t] += layer.left[i] * x[u]
                for j in range(layer.right.shape[0]):
                    u = t + (j + 1) * layer.strides[1]
                    if 0 <= u < frames:
                        y[t] += layer.right[j] * x[u]
            x = y
    return x

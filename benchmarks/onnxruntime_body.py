"""The network body on onnxruntime next to numpy, for one live stream on one thread.

    python -m benchmarks.onnxruntime_body [--repeat 5] [--shared]

Needs onnxruntime and onnx (``pip install onnxruntime onnx``); neither is a dependency of the
agent, whose network runs on numpy (see "Backends" in docs/engine.md for why).

The body (every component of ``kwsr.net`` up to the output layer) is written here as ONNX
graphs from the loaded weights with the ``onnx`` package's public helper API, no file shipped,
and run by an onnxruntime CPU session (one thread, sequential, every graph optimisation). The
FSMN layers' memory (the rows each layer keeps between chunks, as in ``NumpyNetwork``) is an
explicit input and output of the graphs, so one ``run`` per chunk gives the chunk's hidden rows
and the next memory: :class:`OnnxNetwork` follows ``NumpyNetwork``'s streaming contract (same
rows per chunk, including the first chunks and ``final=True``) and shares its output layer.

The 120-second clip of ``benchmarks/streaming.py`` is cut into chunks of 20, 100 and 1000 ms as
a microphone would give them; then, in one process, alternating the backends round after round:

* the body alone (``hidden`` on each chunk's features, the last with ``final=True``): CPU time
  per chunk, and the largest difference between the two backends' hidden rows;
* the whole single-stream path (a detector fed the clip's chunks: features, body, output layer,
  decoder): the real-time factor of each backend, whether they find the same detections, and,
  as a control, the numpy path with one empty onnxruntime run (a one-node graph on a few rows)
  after each chunk: what merely calling onnxruntime costs the rest of the path.

Times are CPU time of this process (``time.process_time``), best and median of ``--repeat``
rounds, and the ratio to numpy per round (median). Results:
benchmarks/results/onnxruntime_body.json, naming the machine and the onnxruntime version.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"

import numpy as np  # noqa: E402

from benchmarks.common import machine, model_dir, write_result  # noqa: E402
from benchmarks.streaming import CHUNKS_MS, clip  # noqa: E402
from edge_agent.engine.features import FeatureStream  # noqa: E402
from edge_agent.engine.kaldi_nnet import (  # noqa: E402
    AffineTransform,
    Component,
    Fsmn,
    LinearTransform,
    RectifiedLinear,
    read_nnet,
)
from edge_agent.engine.model import NETWORK_FILE, KeywordSpec, KwsModel  # noqa: E402
from edge_agent.engine.network import NetworkBackend, OutputLayer, fsmn_taps, validate_structure  # noqa: E402
from edge_agent.system import tune_allocator  # noqa: E402

SAMPLES_PER_MS = 16

# Opset 17 and IR version 8: read by every onnxruntime since 1.13, so that an older wheel (the
# newest one an aarch64 board's glibc can install) loads the graphs too.
OPSET = 17
IR_VERSION = 8

FEATURES = "features"
HIDDEN = "hidden"
# ``steady``: every FSMN layer holds a window's rows but the newest and the chunk brings a frame
# or more, so each layer outputs one row per new frame (one set of window indices serves them
# all); ``start``: a layer may hold fewer rows (the first chunks), so each layer counts its
# complete windows (none, perhaps); ``final``: as ``start``, each layer's pending frames
# completed with look-ahead zeros, as ``NumpyNetwork.hidden(..., final=True)`` does.
GRAPH_KINDS = ("steady", "start", "final")
_INT64_MAX = np.iinfo(np.int64).max


def import_onnx() -> tuple[Any, Any]:
    """The ``onnx`` and ``onnxruntime`` modules, or an ImportError saying how to get them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise ImportError(
            f"this benchmark needs onnxruntime and onnx ({error.name} is missing): "
            "pip install onnxruntime onnx"
        ) from error
    return onnx, onnxruntime


def memory_name(index: int) -> str:
    """The graph input holding FSMN layer ``index``'s memory (rows, dim)."""
    return f"memory{index}"


def next_memory_name(index: int) -> str:
    """The graph output holding FSMN layer ``index``'s memory after the chunk."""
    return f"next_memory{index}"


class GraphWriter:
    """Nodes and initialisers of one graph, with fresh value names."""

    def __init__(self, onnx: Any) -> None:
        self._helper = onnx.helper
        self._from_array = onnx.numpy_helper.from_array
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._count = 0

    def name(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def constant(self, stem: str, array: np.ndarray) -> str:
        name = self.name(stem)
        self.initializers.append(self._from_array(np.ascontiguousarray(array), name))
        return name

    def node(
        self, op: str, inputs: list[str], stem: str, output: str | None = None, **attributes: Any
    ) -> str:
        output = output or self.name(stem)
        self.nodes.append(self._helper.make_node(op, inputs, [output], **attributes))
        return output


def body_graph(components: Sequence[Component], kind: str) -> Any:
    """The body (``components`` without the output layer and softmax) as an ONNX model on rows:
    inputs ``features`` (frames, input_dim) and each FSMN layer's memory, outputs ``hidden``
    (rows, hidden_dim) and each layer's next memory. Rows, not (dim, frame) columns: onnxruntime
    multiplies a few rows by a constant matrix (packed once) far faster than a matrix by a few
    columns, and its grouped convolution is slower than the gather below."""
    if kind not in GRAPH_KINDS:
        raise ValueError(f"kind must be one of {', '.join(GRAPH_KINDS)}, got {kind!r}")
    onnx, _ = import_onnx()
    helper = onnx.helper
    float32 = onnx.TensorProto.FLOAT
    graph = GraphWriter(onnx)
    inputs = [helper.make_tensor_value_info(FEATURES, float32, ["frames", components[0].input_dim])]
    outputs = []
    x = FEATURES
    last = len(components) - 1
    fsmn_index = 0
    steady_windows: dict[int, str] = {}  # by number of taps
    for position, component in enumerate(components):
        output = HIDDEN if position == last else None
        if isinstance(component, AffineTransform):
            weights = graph.constant("weights", np.asarray(component.weight, dtype=np.float32).T)
            product = graph.node("MatMul", [x, weights], "product")
            bias = graph.constant("bias", np.asarray(component.bias, dtype=np.float32))
            x = graph.node("Add", [product, bias], "affine", output=output)
        elif isinstance(component, LinearTransform):
            weights = graph.constant("weights", np.asarray(component.weight, dtype=np.float32).T)
            x = graph.node("MatMul", [x, weights], "product", output=output)
        elif isinstance(component, RectifiedLinear):
            x = graph.node("Relu", [x], "relu", output=output)
        elif isinstance(component, Fsmn):
            dim = component.input_dim
            inputs.append(
                helper.make_tensor_value_info(memory_name(fsmn_index), float32, [f"held{fsmn_index}", dim])
            )
            outputs.append(
                helper.make_tensor_value_info(
                    next_memory_name(fsmn_index), float32, [f"kept{fsmn_index}", dim]
                )
            )
            windows = None
            if kind == "steady":
                count = fsmn_taps(component).shape[0]
                if count not in steady_windows:
                    frames = graph.node("Shape", [FEATURES], "frames", start=0, end=1)
                    steady_windows[count] = window_indices(graph, frames, count)
                windows = steady_windows[count]
            x = fsmn_layer(graph, component, fsmn_index, x, kind == "final", windows, output)
            fsmn_index += 1
        else:
            raise ValueError(f"cannot write {type(component).__name__} in the body as ONNX")
    outputs.insert(0, helper.make_tensor_value_info(HIDDEN, float32, ["rows", components[last].output_dim]))
    body = helper.make_graph(graph.nodes, f"cfsmn_body_{kind}", inputs, outputs, graph.initializers)
    model = helper.make_model(body, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


def window_indices(graph: GraphWriter, count: str, taps: int) -> str:
    """(count, taps) int64 whose row t is t, t + 1, ..., t + taps - 1 (``count``: a 1-element tensor)."""
    starts = graph.node(
        "Range",
        [
            graph.constant("zero", np.array(0, np.int64)),
            graph.node("Squeeze", [count, graph.constant("axis", np.array([0], np.int64))], "count"),
            graph.constant("one", np.array(1, np.int64)),
        ],
        "starts",
    )
    column = graph.node("Unsqueeze", [starts, graph.constant("axis", np.array([1], np.int64))], "starts")
    offsets = graph.constant("offsets", np.arange(taps, dtype=np.int64)[None, :])
    return graph.node("Add", [column, offsets], "windows")


def fsmn_layer(
    graph: GraphWriter,
    layer: Fsmn,
    index: int,
    x: str,
    final: bool,
    windows: str | None,
    output: str | None,
) -> str:
    """One FSMN layer: its memory, then the new rows (then look-ahead zeros if ``final``),
    filtered by every complete window (given ``windows``, or counted here); the last
    ``taps - 1`` rows, or all if fewer, are the next memory."""
    taps = fsmn_taps(layer)  # (taps, dim), oldest first
    count, dim = taps.shape
    parts = [memory_name(index), x]
    if final and layer.lookahead_frames:
        parts.append(graph.constant("lookahead_zeros", np.zeros((layer.lookahead_frames, dim), np.float32)))
    joined = graph.node("Concat", parts, "joined", axis=0)
    axis = graph.constant("axis", np.array([0], np.int64))
    keep_from = graph.constant("keep_from", np.array([-(count - 1)], np.int64))
    end = graph.constant("end", np.array([_INT64_MAX], np.int64))
    graph.node("Slice", [joined, keep_from, end, axis], "kept", output=next_memory_name(index))
    if windows is None:
        length = graph.node("Shape", [joined], "length", start=0, end=1)
        surplus = graph.node(
            "Sub", [length, graph.constant("held", np.array([count - 1], np.int64))], "surplus"
        )
        ready = graph.node("Max", [surplus, graph.constant("zero", np.array([0], np.int64))], "ready")
        windows = window_indices(graph, ready, count)
    gathered = graph.node("Gather", [joined, windows], "gathered", axis=0)  # (windows, taps, dim)
    weighted = graph.node("Mul", [gathered, graph.constant("taps", taps)], "weighted")
    sum_axis = graph.constant("axis", np.array([1], np.int64))
    return graph.node("ReduceSum", [weighted, sum_axis], "fsmn", output=output, keepdims=0)


class OnnxState:
    __slots__ = ("finished", "memory", "steady")

    def __init__(self, memory: list[np.ndarray]) -> None:
        #: per FSMN layer, the rows it keeps (rows, dim)
        self.memory = memory
        self.finished = False
        #: every layer holds a window's rows but the newest (the ``steady`` graph applies)
        self.steady = False


class OnnxNetwork:
    """``NetworkBackend`` with its body on onnxruntime (CPU, one thread, sequential) and the
    numpy output layer."""

    name = "onnxruntime"

    def __init__(self, components: Sequence[Component], source: str = "network") -> None:
        validate_structure(components, source)
        _, onnxruntime = import_onnx()
        self.input_dim = components[0].input_dim
        self.output_dim = components[-1].output_dim
        self.output = OutputLayer(components[-2])  # type: ignore[arg-type]
        body = list(components[:-2])
        self._fsmn_layers = [c for c in body if isinstance(c, Fsmn)]
        self.lookahead_frames = sum(layer.lookahead_frames for layer in self._fsmn_layers)
        self._steady_rows = [fsmn_taps(layer).shape[0] - 1 for layer in self._fsmn_layers]
        self._memory_names = [memory_name(i) for i in range(len(self._fsmn_layers))]
        self._no_rows = np.zeros((0, self.output.input_dim), np.float32)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._sessions = {
            kind: onnxruntime.InferenceSession(
                body_graph(body, kind).SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
            for kind in GRAPH_KINDS
        }

    def new_state(self) -> OnnxState:
        return OnnxState(
            [np.zeros((layer.history_frames, layer.input_dim), np.float32) for layer in self._fsmn_layers]
        )

    def forward(
        self, state: OnnxState, features: np.ndarray, final: bool = False, columns: np.ndarray | None = None
    ) -> np.ndarray:
        return self.output.posteriors(self.hidden(state, features, final), columns)

    def hidden(self, state: OnnxState, features: np.ndarray, final: bool = False) -> np.ndarray:
        if state.finished:
            raise RuntimeError("this stream's network state was finished; create a new one")
        x = np.asarray(features, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"expected features of shape (n, {self.input_dim}), got {x.shape}")
        if final:
            kind = "final"
        elif x.shape[0] == 0:
            return self._no_rows  # no frame completes a window: nothing changes
        else:
            kind = "steady" if state.steady else "start"
        feeds = dict(zip(self._memory_names, state.memory, strict=True))
        feeds[FEATURES] = x
        hidden, *memory = self._sessions[kind].run(None, feeds)
        if final:
            state.finished = True
            state.memory = []
        else:
            state.memory = memory
            if not state.steady:
                state.steady = [rows.shape[0] for rows in memory] == self._steady_rows
        return hidden

    def hidden_many(self, states: Sequence[OnnxState], features: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [self.hidden(state, chunk) for state, chunk in zip(states, features, strict=True)]


def empty_run(onnx: Any, onnxruntime: Any, width: int) -> Callable[[], None]:
    """One run of a one-node graph (a ReLU of 4 rows): what calling onnxruntime costs at least."""
    helper = onnx.helper
    float32 = onnx.TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", float32, ["rows", width])],
        [helper.make_tensor_value_info("y", float32, ["rows", width])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    feeds = {"x": np.ones((4, width), np.float32)}
    return lambda: session.run(None, feeds)


def feature_chunks(model: KwsModel, audio: np.ndarray, chunk_ms: int) -> list[np.ndarray]:
    """The features a live stream's front-end gives for each chunk of ``chunk_ms``, and its last."""
    stream = FeatureStream(model.cmvn)
    chunk = chunk_ms * SAMPLES_PER_MS
    chunks = [stream.accept(audio[offset : offset + chunk]) for offset in range(0, audio.shape[0], chunk)]
    return [*chunks, stream.finish()]


def body_pass(network: NetworkBackend, chunks: list[np.ndarray]) -> tuple[float, np.ndarray, list[int]]:
    """CPU seconds for every chunk through the body (the last with ``final=True``), the rows,
    and how many each chunk gave."""
    state = network.new_state()
    rows = []
    started = time.process_time()
    for features in chunks[:-1]:
        rows.append(network.hidden(state, features))
    rows.append(network.hidden(state, chunks[-1], final=True))
    seconds = time.process_time() - started
    return seconds, np.concatenate(rows), [part.shape[0] for part in rows]


def stream_pass(
    model: KwsModel, audio: np.ndarray, chunk_ms: int, after_chunk: Callable[[], None] | None = None
) -> tuple[float, list[tuple[float, float, float]]]:
    """CPU seconds for the clip through one detector in chunks of ``chunk_ms`` (calling
    ``after_chunk`` after each), and its detections."""
    detector = model.detector([KeywordSpec("小云小云")])
    chunk = chunk_ms * SAMPLES_PER_MS
    found = []
    started = time.process_time()
    for offset in range(0, audio.shape[0], chunk):
        found += detector.feed(audio[offset : offset + chunk])
        if after_chunk is not None:
            after_chunk()
    found += detector.finish()
    seconds = time.process_time() - started
    return seconds, [(round(d.confidence, 4), round(d.start, 3), round(d.end, 3)) for d in found]


def summary(values: list[float], scale: float, digits: int) -> dict[str, float]:
    return {
        "best": round(min(values) * scale, digits),
        "median": round(statistics.median(values) * scale, digits),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--shared", action="store_true", help="record that other work shared the machine")
    args = parser.parse_args()
    tune_allocator()
    onnx, onnxruntime = import_onnx()
    numpy_model = KwsModel.load(model_dir())
    network = OnnxNetwork(read_nnet(numpy_model.directory / NETWORK_FILE), NETWORK_FILE)
    onnx_model = KwsModel(
        numpy_model.directory,
        network,
        numpy_model.cmvn,
        numpy_model.lexicon,
        numpy_model.default_min_duration,
        numpy_model.default_max_duration,
    )
    audio = clip()
    seconds = audio.shape[0] / (SAMPLES_PER_MS * 1000)

    body: dict[str, object] = {}
    for chunk_ms in CHUNKS_MS:
        chunks = feature_chunks(numpy_model, audio, chunk_ms)
        times: dict[str, list[float]] = {"numpy": [], "onnxruntime": []}
        rows: dict[str, np.ndarray] = {}
        counts: dict[str, list[int]] = {}
        for _ in range(args.repeat):
            for name, model in (("numpy", numpy_model), ("onnxruntime", onnx_model)):
                elapsed, rows[name], counts[name] = body_pass(model.network, chunks)
                times[name].append(elapsed)
        ratios = [ours / base for ours, base in zip(times["onnxruntime"], times["numpy"], strict=True)]
        body[f"{chunk_ms} ms"] = {
            "chunks": len(chunks),
            "rows": int(rows["numpy"].shape[0]),
            "us_per_chunk": {name: summary(values, 1e6 / len(chunks), 1) for name, values in times.items()},
            "onnxruntime_over_numpy_median": round(statistics.median(ratios), 3),
            "rounds": [round(ratio, 3) for ratio in ratios],
            "same_rows_per_chunk": counts["numpy"] == counts["onnxruntime"],
            "max_abs_difference": float(np.abs(rows["numpy"] - rows["onnxruntime"]).max()),
            "max_abs_hidden": float(np.abs(rows["numpy"]).max()),
        }
        print(f"body, {chunk_ms} ms chunks: {body[f'{chunk_ms} ms']}")

    control = empty_run(onnx, onnxruntime, numpy_model.network.output.input_dim)
    streaming: dict[str, object] = {}
    for chunk_ms in CHUNKS_MS:
        variants: dict[str, tuple[KwsModel, Callable[[], None] | None]] = {
            "numpy": (numpy_model, None),
            "onnxruntime": (onnx_model, None),
            "numpy_and_empty_onnxruntime_run": (numpy_model, control),
        }
        times = {name: [] for name in variants}
        found: dict[str, list[tuple[float, float, float]]] = {}
        for _ in range(args.repeat):
            for name, (model, after_chunk) in variants.items():
                elapsed, found[name] = stream_pass(model, audio, chunk_ms, after_chunk)
                times[name].append(elapsed)
        streaming[f"{chunk_ms} ms"] = {
            "rtf": {name: summary(values, 1 / seconds, 6) for name, values in times.items()},
            "over_numpy_median": {
                name: round(statistics.median(a / b for a, b in zip(values, times["numpy"], strict=True)), 3)
                for name, values in times.items()
                if name != "numpy"
            },
            "detections": len(found["numpy"]),
            "same_detections": found["numpy"] == found["onnxruntime"],
        }
        print(f"single stream, {chunk_ms} ms chunks: {streaming[f'{chunk_ms} ms']}")

    result = {
        "benchmark": "onnxruntime_body",
        "machine": machine(),
        "shared_machine": args.shared,
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "clip_seconds": seconds,
        "repeat": args.repeat,
        "threads": 1,
        "body_per_chunk": body,
        "single_stream": streaming,
    }
    print(write_result("onnxruntime_body", result))


if __name__ == "__main__":
    main()

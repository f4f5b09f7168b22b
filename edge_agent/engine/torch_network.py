"""The cFSMN network on torch (``backend: torch``), for boards where torch is already installed
or where its int8 kernels pay off. Same streaming contract and outputs as :class:`NumpyNetwork`
(the tests hold them within 1e-4 of each other).

torch is imported only when this backend is chosen: importing it costs seconds and ~220 MB.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from edge_agent.engine.kaldi_nnet import (
    AffineTransform,
    Component,
    Fsmn,
    LinearTransform,
    RectifiedLinear,
    Softmax,
)
from edge_agent.engine.network import validate_structure


def import_torch() -> Any:
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            "the torch backend needs PyTorch: pip install 'edge-agent[torch]' "
            "(on x86-64 add --index-url https://download.pytorch.org/whl/cpu for the CPU build)"
        ) from error
    return torch


class TorchState:
    __slots__ = ("buffers", "finished")

    def __init__(self, buffers: list[Any]) -> None:
        self.buffers = buffers
        self.finished = False


class TorchNetwork:
    """torch float32 implementation of ``NetworkBackend``, inference mode, fixed threads."""

    name = "torch"

    def __init__(
        self,
        components: Sequence[Component],
        source: str = "network",
        threads: int = 1,
        quantize: bool = False,
    ) -> None:
        validate_structure(components, source)
        torch = import_torch()
        self._torch = torch
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        # torch's thread pool is process-wide; a small board wants it pinned, not one per core.
        torch.set_num_threads(threads)
        self.threads = threads
        self.input_dim = components[0].input_dim
        self.output_dim = components[-1].output_dim
        self._layers: list[tuple[str, Any]] = []
        fsmn_layers = []
        for component in components:
            if isinstance(component, AffineTransform):
                layer = torch.nn.Linear(component.input_dim, component.output_dim)
                layer.weight.data = torch.from_numpy(component.weight.copy())
                layer.bias.data = torch.from_numpy(component.bias.copy())
                self._layers.append(("linear", layer))
            elif isinstance(component, LinearTransform):
                layer = torch.nn.Linear(component.input_dim, component.output_dim, bias=False)
                layer.weight.data = torch.from_numpy(component.weight.copy())
                self._layers.append(("linear", layer))
            elif isinstance(component, RectifiedLinear):
                self._layers.append(("relu", None))
            elif isinstance(component, Fsmn):
                fsmn_layers.append(component)
                self._layers.append(
                    (
                        "fsmn",
                        (
                            component,
                            torch.from_numpy(component.left.copy()),
                            torch.from_numpy(component.right.copy()),
                        ),
                    )
                )
            elif isinstance(component, Softmax):
                self._layers.append(("softmax", None))
        self._fsmn_components = fsmn_layers
        self.lookahead_frames = sum(layer.lookahead_frames for layer in fsmn_layers)
        self.quantized = quantize
        if quantize:
            self._quantize_linear_layers()
        self.name = "torch-int8" if quantize else "torch"

    def _quantize_linear_layers(self) -> None:
        """int8 weights, activations quantised per call (dynamic): about twice as fast for the
        big layers on x86 (fbgemm) and ARM (qnnpack). The FSMN filters stay float32."""
        torch = self._torch
        positions = [i for i, (kind, _) in enumerate(self._layers) if kind == "linear"]
        # The output layer stays float32: it decides 2599 posteriors; int8 there raised the
        # scores of non-keywords on audio/dev (false alarms), for little speed.
        positions = positions[:-1]
        container = torch.nn.ModuleList([self._layers[i][1] for i in positions])
        with warnings.catch_warnings():
            # torch 2.x marks torch.ao.quantization (and its quantized tensors) deprecated in
            # favour of the separate torchao package; the eager API still works through torch
            # 2.13, without another dependency.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings(
                "ignore", message=".*quantized tensor creation functions.*", category=UserWarning
            )
            # One scale per output channel: finer than one per tensor, for the same speed.
            spec = {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}
            quantized = torch.ao.quantization.quantize_dynamic(container, spec, dtype=torch.qint8)
        for position, module in zip(positions, quantized, strict=True):
            self._layers[position] = ("linear", module)

    def new_state(self) -> TorchState:
        torch = self._torch
        return TorchState(
            [torch.zeros((layer.history_frames, layer.input_dim)) for layer in self._fsmn_components]
        )

    def forward(
        self,
        state: TorchState,
        features: np.ndarray,
        final: bool = False,
        columns: np.ndarray | None = None,
    ) -> np.ndarray:
        if state.finished:
            raise RuntimeError("this stream's network state was finished; create a new one")
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != self.input_dim:
            raise ValueError(f"expected features of shape (n, {self.input_dim}), got {features.shape}")
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(features))
            fsmn_index = 0
            for kind, payload in self._layers:
                if kind == "linear":
                    x = payload(x)
                elif kind == "relu":
                    x = torch.relu(x)
                elif kind == "fsmn":
                    x = self._fsmn_step(payload, state, fsmn_index, x, final)
                    fsmn_index += 1
                else:  # softmax
                    x = torch.softmax(x, dim=1)
                    if columns is not None:
                        x = x[:, torch.from_numpy(np.asarray(columns, dtype=np.int64))]
            if final:
                state.finished = True
            return x.numpy().astype(np.float32, copy=False)

    def forward_many(
        self,
        states: Sequence[TorchState],
        features: Sequence[np.ndarray],
        columns: np.ndarray | None = None,
        skip: object = None,
    ) -> list[np.ndarray]:
        # torch's per-call overhead is small next to its kernels; one stream at a time is fine.
        # ``skip`` is an optional saving that this backend does not take: it computes every row.
        return [self.forward(state, f, columns=columns) for state, f in zip(states, features, strict=True)]

    def _fsmn_step(self, payload: Any, state: TorchState, index: int, new: Any, final: bool) -> Any:
        torch = self._torch
        layer, left, right = payload
        history = layer.history_frames
        lookahead = layer.lookahead_frames
        parts = [state.buffers[index], new]
        if final and lookahead:
            parts.append(torch.zeros((lookahead, layer.input_dim)))
        inputs = torch.cat(parts)
        ready = inputs.shape[0] - history - lookahead
        if ready <= 0:
            state.buffers[index] = inputs
            return torch.zeros((0, layer.output_dim))
        result = inputs[history : history + ready].clone()
        for i in range(left.shape[0]):
            start = history - i * layer.left_stride
            result += left[i] * inputs[start : start + ready]
        for j in range(right.shape[0]):
            start = history + (j + 1) * layer.right_stride
            result += right[j] * inputs[start : start + ready]
        state.buffers[index] = inputs[ready:].clone()
        return result

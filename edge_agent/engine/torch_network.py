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
)
from edge_agent.engine.network import OutputLayer, fsmn_taps, validate_structure


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
    """torch float32 implementation of ``NetworkBackend``'s body (inference mode, fixed threads);
    the output layer is the numpy :class:`OutputLayer` both backends share."""

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
        self.output = OutputLayer(components[-2])  # type: ignore[arg-type]
        self._layers: list[tuple[str, Any]] = []
        fsmn_layers = []
        for component in components[:-2]:
            if isinstance(component, AffineTransform):
                layer = torch.nn.Linear(component.input_dim, component.output_dim)
                layer.weight.data = torch.from_numpy(component.weight.astype(np.float32))
                layer.bias.data = torch.from_numpy(component.bias.astype(np.float32))
                self._layers.append(("linear", layer))
            elif isinstance(component, LinearTransform):
                layer = torch.nn.Linear(component.input_dim, component.output_dim, bias=False)
                layer.weight.data = torch.from_numpy(component.weight.astype(np.float32))
                self._layers.append(("linear", layer))
            elif isinstance(component, RectifiedLinear):
                self._layers.append(("relu", None))
            elif isinstance(component, Fsmn):
                fsmn_layers.append(component)
                # Depthwise convolution: one filter per dimension, oldest frame first.
                taps = torch.from_numpy(np.ascontiguousarray(fsmn_taps(component).T[:, None, :]))
                self._layers.append(("fsmn", (component, taps)))
        self._fsmn_components = fsmn_layers
        self.lookahead_frames = sum(layer.lookahead_frames for layer in fsmn_layers)
        self.quantized = quantize
        if quantize:
            self._quantize_linear_layers()
        self.name = "torch-int8" if quantize else "torch"

    def _quantize_linear_layers(self) -> None:
        """int8 weights, activations quantised per call (dynamic): about twice as fast for the
        big layers on x86 (fbgemm) and ARM (qnnpack). The FSMN filters stay float32, and so does
        the output layer (numpy, shared with the numpy backend): it decides 2599 posteriors, and
        int8 there raised the scores of non-keywords on audio/dev (false alarms), for little speed."""
        torch = self._torch
        positions = [i for i, (kind, _) in enumerate(self._layers) if kind == "linear"]
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
        return self.output.posteriors(self.hidden(state, features, final), columns)

    def hidden(self, state: TorchState, features: np.ndarray, final: bool = False) -> np.ndarray:
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
                else:
                    x = self._fsmn_step(payload, state, fsmn_index, x, final)
                    fsmn_index += 1
            if final:
                state.finished = True
            return x.numpy()

    def hidden_many(self, states: Sequence[TorchState], features: Sequence[np.ndarray]) -> list[np.ndarray]:
        # torch's per-call overhead is small next to its kernels; one stream at a time is fine.
        return [self.hidden(state, f) for state, f in zip(states, features, strict=True)]

    def _fsmn_step(self, payload: Any, state: TorchState, index: int, new: Any, final: bool) -> Any:
        torch = self._torch
        layer, taps = payload
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
        # (1, dim, time) through the depthwise filter: output t reads inputs[t : t + taps].
        result = torch.nn.functional.conv1d(inputs.T.unsqueeze(0), taps, groups=layer.input_dim)
        state.buffers[index] = inputs[ready:].clone()
        return result[0].T[:ready]

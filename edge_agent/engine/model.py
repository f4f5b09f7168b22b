"""Loading the model directory and making per-stream detectors from it.

A model directory is what ModelScope's ``snapshot_download`` lays out for
``damo/speech_charctc_kws_phone-xiaoyun``; inference reads four files from it:

==============  =========================================================================
``kwsr.net``    acoustic network, Kaldi nnet1 binary (cFSMN, 400 -> 2599)
``kwsr.mvn``    feature normalisation, Kaldi nnet1 text (``AddShift`` + ``Rescale``)
``kwsr.phn``    output token names; line N is output N, ``sil`` is the CTC blank
``kwsr.lex``    characters to tokens
==============  =========================================================================

and, when present, ``keywords.json`` for the default keyword durations.
"""

from __future__ import annotations

import copy
import json
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.engine.decoder import CompiledKeyword, DecoderSettings, KeywordDecoder

# The decoder's defaults live with the decoder; re-exported for the code that imports them from here.
from edge_agent.engine.decoder.settings import (  # noqa: F401
    DEFAULT_GAP_TOLERANCE,
    DEFAULT_HOLD_SECONDS,
    DEFAULT_PAUSE_SECONDS,
    DEFAULT_REFRACTORY_SECONDS,
    DEFAULT_SETTLE_RATIO,
)
from edge_agent.engine.detector import KeywordDetector
from edge_agent.engine.features import (
    FEATURE_DIM,
    FRAME_LENGTH_SAMPLES,
    OUTPUT_FRAME_SECONDS,
    SAMPLE_RATE_HZ,
    Cmvn,
    FeatureStream,
    default_fft,
)
from edge_agent.engine.kaldi_nnet import AddShift, NnetFormatError, Rescale, Splice, read_nnet
from edge_agent.engine.lexicon import Lexicon, LexiconError
from edge_agent.engine.network import NetworkBackend, NumpyNetwork

NETWORK_FILE = "kwsr.net"
CMVN_FILE = "kwsr.mvn"
TOKEN_FILE = "kwsr.phn"
LEXICON_FILE = "kwsr.lex"
KEYWORDS_FILE = "keywords.json"
REQUIRED_FILES = (NETWORK_FILE, CMVN_FILE, TOKEN_FILE, LEXICON_FILE)

BACKENDS = ("numpy", "torch")
DEFAULT_THRESHOLD = 0.05
DEFAULT_MIN_DURATION = 0.25
DEFAULT_MAX_DURATION = 2.5


class ModelError(RuntimeError):
    """The model directory is missing files or holds files this engine cannot use."""


@dataclass(frozen=True)
class KeywordSpec:
    """A keyword as a user writes it; durations default to the model's ``keywords.json``."""

    text: str
    threshold: float = DEFAULT_THRESHOLD
    min_duration: float | None = None
    max_duration: float | None = None


class KwsModel:
    """A loaded model: network backend, CMVN and lexicon. Shared by all streams (read-only)."""

    def __init__(
        self,
        directory: Path,
        network: NetworkBackend,
        cmvn: Cmvn,
        lexicon: Lexicon,
        default_min_duration: float,
        default_max_duration: float,
    ) -> None:
        self.directory = directory
        self.network = network
        self.cmvn = cmvn
        self.lexicon = lexicon
        self.default_min_duration = default_min_duration
        self.default_max_duration = default_max_duration
        # How load() read the network (backend, threads, quantize), to read it again.
        self._loaded_as: tuple[str, int, bool] | None = None

    @property
    def backend(self) -> str:
        return self.network.name

    @property
    def fft(self) -> str:
        """The FFT library of the front-end: scipy with the ``fast`` extra, else numpy."""
        return default_fft()

    @property
    def latency_seconds(self) -> float:
        """Audio the model must hear after a frame before it can score it (look-ahead)."""
        feature_context = 2 * 0.01 + FRAME_LENGTH_SAMPLES / SAMPLE_RATE_HZ
        return self.network.lookahead_frames * OUTPUT_FRAME_SECONDS + feature_context

    @classmethod
    def load(
        cls,
        directory: str | Path,
        backend: str = "numpy",
        threads: int = 1,
        quantize: bool = False,
        spelling: bool = True,
    ) -> KwsModel:
        """Read and check the model files; raises :class:`ModelError` naming what is wrong.

        ``spelling=False``: the lexicon's characters are not read (the token table is): for an
        engine process, whose keywords come compiled; :meth:`compile` then raises."""
        directory = Path(directory)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if not directory.is_dir():
            raise ModelError(f"model directory {directory} does not exist")
        missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
        if missing:
            raise ModelError(
                f"model directory {directory} lacks {', '.join(missing)}; it should hold the files of "
                "ModelScope's damo/speech_charctc_kws_phone-xiaoyun"
            )
        network = _load_network(directory, backend, threads, quantize)
        try:
            cmvn = _read_cmvn(directory / CMVN_FILE)
            lexicon = Lexicon.load(directory / TOKEN_FILE, directory / LEXICON_FILE if spelling else None)
        except (NnetFormatError, LexiconError) as error:
            raise ModelError(str(error)) from None
        except OSError as error:
            raise ModelError(f"cannot read model file: {error}") from None
        if network.output_dim != len(lexicon.token_names):
            raise ModelError(
                f"{directory / NETWORK_FILE}: network has {network.output_dim} outputs but {TOKEN_FILE} "
                f"lists {len(lexicon.token_names)} tokens"
            )
        min_duration, max_duration = _default_durations(directory / KEYWORDS_FILE)
        model = cls(directory, network, cmvn, lexicon, min_duration, max_duration)
        model._loaded_as = (backend, threads, quantize)
        return model

    def without_network(self) -> KwsModel:
        """This model without its network's weights, for a process that scores no live audio
        (the agent's own when engine processes run the engine): it spells keywords and says
        what the model is (backend, latency); should it score a recording after all (the HTTP
        API's scores), the network is read from the model's files again then. A model not made
        by :meth:`load` is returned as it is."""
        if self._loaded_as is None or isinstance(self.network, NetworkOnDemand):
            return self
        light = copy.copy(self)
        light.network = NetworkOnDemand(self.network, self.directory, *self._loaded_as)  # type: ignore[assignment]
        return light

    def compile(self, spec: KeywordSpec, homophones: bool = False) -> CompiledKeyword:
        """Spell a keyword with the lexicon; raises ``LexiconError`` for unknown characters."""
        expander = None
        if homophones:
            from edge_agent.engine.homophones import homophone_expander

            expander = homophone_expander(self.lexicon)
        groups = self.lexicon.spell(spec.text, expander)
        return CompiledKeyword(
            text=spec.text,
            token_groups=groups,
            threshold=spec.threshold,
            min_duration=self.default_min_duration if spec.min_duration is None else spec.min_duration,
            max_duration=self.default_max_duration if spec.max_duration is None else spec.max_duration,
        )

    def decoder(
        self,
        keywords: Sequence[CompiledKeyword],
        settings: DecoderSettings | None = None,
        first_frame: int = 0,
    ) -> KeywordDecoder:
        settings = settings or DecoderSettings()
        return KeywordDecoder(
            keywords,
            blank_id=self.lexicon.blank_id,
            frame_seconds=OUTPUT_FRAME_SECONDS,
            frame_center_seconds=FRAME_LENGTH_SAMPLES / 2 / SAMPLE_RATE_HZ,
            gap_tolerance=settings.gap_tolerance,
            refractory_seconds=settings.refractory_seconds,
            hold_seconds=settings.hold_seconds,
            pause_seconds=settings.pause_seconds,
            settle_ratio=settings.settle_ratio,
            first_frame=first_frame,
        )

    def posteriors(self, samples: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
        """Posteriors of a whole 16 kHz mono signal (for tools that try several decoders)."""
        stream = FeatureStream(self.cmvn)
        features = np.concatenate([stream.accept(samples), stream.finish()])
        return self.network.forward(self.network.new_state(), features, final=True, columns=columns)

    def detector(
        self,
        keywords: Sequence[KeywordSpec | CompiledKeyword],
        settings: DecoderSettings | None = None,
        homophones: bool = False,
    ) -> KeywordDetector:
        """A detector for one audio stream."""
        compiled = [k if isinstance(k, CompiledKeyword) else self.compile(k, homophones) for k in keywords]
        return KeywordDetector(self, compiled, settings or DecoderSettings())


class NetworkOnDemand:
    """The network of a model without it (:meth:`KwsModel.without_network`): the backend's
    name, the dimensions and the look-ahead are here; anything else reads the network from
    the model's files first (once), and it must have the same shape."""

    def __init__(self, network: NetworkBackend, directory: Path, backend: str, threads: int, quantize: bool):
        self.name = network.name
        self.input_dim = network.input_dim
        self.output_dim = network.output_dim
        self.lookahead_frames = network.lookahead_frames
        self._load = (directory, backend, threads, quantize)
        self._network: NetworkBackend | None = None
        self._lock = threading.Lock()

    @property
    def held(self) -> bool:
        """Whether the network was read (something asked for more than its shape)."""
        return self._network is not None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._loaded(), name)

    def _loaded(self) -> NetworkBackend:
        with self._lock:
            if self._network is None:
                network = _load_network(*self._load)
                shape = (network.input_dim, network.output_dim, network.lookahead_frames)
                if shape != (self.input_dim, self.output_dim, self.lookahead_frames):
                    raise ModelError(
                        f"{self._load[0] / NETWORK_FILE} changed since the model was loaded: reload the model"
                    )
                self._network = network
            return self._network


def _load_network(directory: Path, backend: str, threads: int, quantize: bool) -> NetworkBackend:
    """The network of ``directory`` on ``backend``; raises :class:`ModelError`."""
    source = str(directory / NETWORK_FILE)
    try:
        components = read_nnet(directory / NETWORK_FILE)
    except NnetFormatError as error:
        raise ModelError(str(error)) from None
    except OSError as error:
        raise ModelError(f"cannot read model file: {error}") from None
    try:
        if backend == "torch":
            from edge_agent.engine.torch_network import TorchNetwork

            network: NetworkBackend = TorchNetwork(components, source, threads=threads, quantize=quantize)
        else:
            if quantize:
                raise ValueError("int8 quantization needs the torch backend (engine.backend: torch)")
            network = NumpyNetwork(components, source)
    except ValueError as error:
        raise ModelError(str(error)) from None
    if network.input_dim != FEATURE_DIM:
        raise ModelError(
            f"{source}: network input is {network.input_dim}-dimensional, expected {FEATURE_DIM}"
        )
    return network


def _read_cmvn(path: Path) -> Cmvn:
    components = read_nnet(path)
    shift = next((c.shift for c in components if isinstance(c, AddShift)), None)
    scale = next((c.scale for c in components if isinstance(c, Rescale)), None)
    if shift is None or scale is None:
        raise ModelError(f"{path}: expected <AddShift> and <Rescale> components")
    for component in components:
        if isinstance(component, Splice) and component.offsets != (0,):
            raise ModelError(
                f"{path}: <Splice> offsets {component.offsets} are not supported, expected [ 0 ]"
            )
    if shift.shape != (FEATURE_DIM,) or scale.shape != (FEATURE_DIM,):
        raise ModelError(
            f"{path}: expected {FEATURE_DIM}-dimensional shift and scale, found {shift.shape[0]}"
        )
    return Cmvn(shift=shift.astype(np.float32), scale=scale.astype(np.float32))


def _default_durations(path: Path) -> tuple[float, float]:
    """min_dur / max_dur of the model's main keyword, or the documented defaults."""
    if not path.is_file():
        return DEFAULT_MIN_DURATION, DEFAULT_MAX_DURATION
    try:
        words = json.loads(path.read_text(encoding="utf-8")).get("word_list", [])
        main = next((w for w in words if w.get("is_main")), words[0] if words else {})
        low = float(main.get("min_dur", DEFAULT_MIN_DURATION))
        high = float(main.get("max_dur", DEFAULT_MAX_DURATION))
    except (ValueError, AttributeError, TypeError) as error:
        raise ModelError(f"{path}: not a keywords file this engine understands ({error})") from None
    if not (math.isfinite(low) and math.isfinite(high) and 0 <= low < high):
        raise ModelError(f"{path}: invalid min_dur/max_dur {low}/{high}")
    return low, high

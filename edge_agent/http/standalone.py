""":class:`StandaloneBackend`: the HTTP API without an agent, for ``edge-agent serve``.

The model is loaded on a background thread so that the server answers at once: ``/healthz``
says 503 ``loading`` (and ``/detect`` 503) until the model is ready, which is what container
health checks and load balancers expect. A first start that downloads the model from ModelScope
can take minutes; a server that did not listen meanwhile would look dead.

The loading step is a plain callable returning a :class:`LoadedEngine`, so tests (and other
front-ends) can gate or replace it; :func:`config_loader` is the one ``serve`` uses.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from edge_agent import __version__
from edge_agent.config import AgentConfig
from edge_agent.engine.decoder import CompiledKeyword, DecoderSettings
from edge_agent.engine.lexicon import LexiconError
from edge_agent.engine.model import KwsModel, ModelError
from edge_agent.http.backend import DetectResult, KeywordRequest, MetricFamily, NotReady
from edge_agent.http.detection import DEFAULT_MAX_CONCURRENT, DetectionService
from edge_agent.keywords import compile_config_keywords, decoder_settings_from
from edge_agent.model_store import ModelSource, resolve_model_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedEngine:
    model: KwsModel
    keywords: tuple[CompiledKeyword, ...]
    settings: DecoderSettings


class LoadError(RuntimeError):
    """The model or the keywords could not be loaded; the message says what to fix."""


def config_loader(config: AgentConfig) -> Callable[[], LoadedEngine]:
    """Resolve (or download) the model, load it and compile the configured keywords."""

    def load() -> LoadedEngine:
        source = ModelSource(
            model_id=config.model.id,
            revision=config.model.revision,
            directory=config.model.dir,
            cache_dir=config.model.cache_dir,
            download=config.model.download,
        )
        try:
            directory = resolve_model_dir(source)
            model = KwsModel.load(
                directory,
                backend=config.engine.backend,
                threads=config.engine.threads,
                quantize=config.engine.quantize,
            )
        except (ModelError, ImportError) as error:
            raise LoadError(str(error)) from None
        try:
            keywords = tuple(compile_config_keywords(model, config))
        except (LexiconError, ValueError, ImportError) as error:
            raise LoadError(f"keywords: {error}") from None
        return LoadedEngine(model, keywords, decoder_settings_from(config))

    return load


class StandaloneBackend:
    """States: ``loading`` -> ``ok``, or ``loading`` -> ``failed`` (with the error)."""

    def __init__(
        self,
        load: Callable[[], LoadedEngine],
        model_id: str,
        revision: str,
        max_concurrent: int = DEFAULT_MAX_CONCURRENT,
        show_paths: bool = False,
    ) -> None:
        self._load = load
        self.model_id = model_id
        self.revision = revision
        self.max_concurrent = max_concurrent
        # A load error names directories; unauthenticated answers give it only when allowed.
        self.show_paths = show_paths
        self._started = time.monotonic()
        self._ready = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self.engine: LoadedEngine | None = None
        self.service: DetectionService | None = None
        self.error: str | None = None
        self.load_seconds: float | None = None

    @classmethod
    def from_config(
        cls, config: AgentConfig, max_concurrent: int = DEFAULT_MAX_CONCURRENT
    ) -> StandaloneBackend:
        return cls(
            config_loader(config),
            config.model.id,
            config.model.revision,
            max_concurrent,
            show_paths=config.http.show_paths,
        )

    # --- loading -------------------------------------------------------------------------------
    def start(self) -> StandaloneBackend:
        """Load on a background thread; returns at once."""
        self._thread = threading.Thread(target=self._run_load, name="model-loader", daemon=True)
        self._thread.start()
        return self

    def _run_load(self) -> None:
        started = time.perf_counter()
        try:
            engine = self._load()
            self.service = DetectionService(
                lambda: engine.model,
                keywords=lambda: engine.keywords,
                settings=lambda: engine.settings,
                max_concurrent=self.max_concurrent,
            )
            self.engine = engine
            self.load_seconds = time.perf_counter() - started
            log.info(
                "model loaded in %.2f s from %s (backend %s), keywords %s",
                self.load_seconds,
                engine.model.directory,
                engine.model.backend,
                ", ".join(f"{k.text}@{k.threshold}" for k in engine.keywords),
            )
            self._ready.set()
        except LoadError as error:
            self.error = str(error)
            log.error("cannot load the model: %s", error)
        except Exception as error:
            self.error = f"{type(error).__name__}: {error}"
            log.exception("loading the model failed")
        finally:
            self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until loading has finished (either way); True when it succeeded."""
        self._done.wait(timeout)
        return self._ready.is_set()

    @property
    def failed(self) -> bool:
        return self._done.is_set() and not self._ready.is_set()

    # --- ApiBackend ----------------------------------------------------------------------------
    def ready(self) -> bool:
        return self._ready.is_set()

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "status": "ok",
            "model_loaded": self.ready(),
            "uptime_s": round(time.monotonic() - self._started, 1),
            "broker_connected": None,
            "mqtt_enabled": False,
            "version": __version__,
            "device": None,
        }
        if self.failed:
            body["status"] = "failed"
            body["error"] = self._failure()
        elif not self.ready():
            body["status"] = "loading"
            body["error"] = "the model is loading"
        return body

    def info(self) -> dict[str, Any]:
        engine = self._engine()
        model = engine.model
        return {
            "model": {
                "id": self.model_id,
                "revision": self.revision,
                "backend": model.backend,
                "directory": str(model.directory),  # the HTTP layer drops it unless show_paths
                "latency_s": round(model.latency_seconds, 3),
            },
            "keywords": [
                {
                    "text": k.text,
                    "threshold": k.threshold,
                    "min_duration": k.min_duration,
                    "max_duration": k.max_duration,
                }
                for k in engine.keywords
            ],
            "version": __version__,
            "device": None,
        }

    def detect(
        self, wav: bytes, threshold: float | None, keywords: Sequence[KeywordRequest] | None
    ) -> DetectResult:
        self._engine()
        assert self.service is not None  # set before _ready
        return self.service.detect(wav, threshold, keywords)

    def metrics(self) -> list[MetricFamily]:
        families = [
            MetricFamily.single(
                "edge_agent_uptime_seconds",
                "gauge",
                "Seconds since the server started.",
                time.monotonic() - self._started,
            ),
            MetricFamily.single("edge_agent_mqtt_enabled", "gauge", "1 when the agent uses a broker.", 0.0),
            MetricFamily.single(
                "edge_agent_mqtt_connected", "gauge", "1 while connected to the broker.", 0.0
            ),
            MetricFamily.single("edge_agent_outbox_depth", "gauge", "Detections waiting in the outbox.", 0.0),
            MetricFamily.single(
                "edge_agent_model_load_seconds", "gauge", "Time the model took to load.", self.load_seconds
            ),
        ]
        if self.service is not None:
            families.extend(self.service.metrics())
        return families

    def _failure(self) -> str:
        if self.show_paths:
            return f"the model failed to load: {self.error}"
        return "the model failed to load; the server's log says why (http.show_paths: true shows it here)"

    def _engine(self) -> LoadedEngine:
        if self.engine is None:
            if self.failed:
                raise NotReady(self._failure(), retry_after_seconds=60)
            raise NotReady("the model is loading; try again shortly")
        return self.engine

"""Live reconfiguration: the running configuration and how a change reaches every part.

A change (``set_config``, ``mute``, a reloaded model) is validated first, then applied where
the state lives: keywords, decoder settings, mute and stream limits on the engine worker's own
thread (:meth:`EngineWorker.apply` waits for it), the rate limit in the ingest, and then the
listeners (integrations) are told which keys changed. A listener that raises rejects the change:
everything is put back as it was, the listeners already told are told again, and the caller
gets :class:`ConfigRejected`. Changes are applied one at a time.

Keys outside :data:`LIVE_PREFIXES` (connection, model, device) are kept in the configuration
but take effect at the next start: :meth:`LiveConfig.apply` returns them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from edge_agent.agent.ingest import Ingest
from edge_agent.agent.items import EngineSettings
from edge_agent.agent.worker import Engine, EngineWorker
from edge_agent.config import AgentConfig, changed_keys, to_dict
from edge_agent.engine.decoder import CompiledKeyword
from edge_agent.engine.lexicon import LexiconError
from edge_agent.engine.model import KwsModel, ModelError
from edge_agent.keywords import compile_config_keywords, decoder_settings_from
from edge_agent.model_store import ModelSource, resolve_model_dir
from edge_agent.system import give_back_free_memory

log = logging.getLogger(__name__)

# Keys whose change takes effect at once; any other change waits for a restart.
LIVE_PREFIXES = (
    "keywords",
    "engine.refractory",
    "engine.gap_tolerance",
    "engine.hold",
    "engine.pause",
    "engine.near_misses",
    "engine.muted",
    "health.",
    "audio.mqtt.max_streams",
    "audio.mqtt.idle_timeout",
    "audio.mqtt.max_rate_factor",
    "mqtt.max_payload_bytes",
    "mqtt.detection_expiry",
    "commands.",
    "homeassistant.",
)
# How long a change waits for the engine worker to take it (seconds).
APPLY_TIMEOUT_SECONDS = 10.0

ConfigListener = Callable[[list[str]], None]


class ConfigRejected(Exception):
    """A change that was not applied (nothing changed); the message says why."""


def is_live(key: str) -> bool:
    return key.startswith(LIVE_PREFIXES)


def engine_settings(
    config: AgentConfig, keywords: list[CompiledKeyword] | tuple[CompiledKeyword, ...]
) -> EngineSettings:
    """What the engine worker needs of a configuration."""
    return EngineSettings(
        keywords=tuple(keywords),
        decoder=decoder_settings_from(config),
        muted=config.engine.muted,
        max_streams=config.audio.mqtt.max_streams,
        idle_timeout=config.audio.mqtt.idle_timeout,
        near_misses=config.engine.near_misses,
    )


class LiveConfig:
    """The running configuration and model; the one way to change them while running."""

    def __init__(
        self,
        config: AgentConfig,
        model: KwsModel,
        worker: Engine,
        ingest: Ingest,
        on_applied: Callable[[], None] = lambda: None,
    ) -> None:
        """``on_applied()`` runs after every applied change (the agent re-publishes its state)."""
        self._config = config
        self._model = model
        self._worker = worker
        self._ingest = ingest
        self._on_applied = on_applied
        self._listeners: list[tuple[str, ConfigListener]] = []
        self._lock = threading.Lock()

    @property
    def config(self) -> AgentConfig:
        return self._config

    @property
    def model(self) -> KwsModel:
        return self._model

    def subscribe(self, name: str, listener: ConfigListener) -> None:
        """``listener(changed_keys)`` after each change (the caller's thread); it may raise to
        reject the change. ``name`` is what a rejection is attributed to."""
        self._listeners.append((name, listener))

    def apply(self, new: AgentConfig) -> list[str]:
        """Switch to ``new`` (already validated); returns the changed keys that need a restart.

        Raises ConfigRejected (nothing changed), or the compiler's own errors for keywords the
        model cannot say (LexiconError, ValueError), before anything changed."""
        with self._lock:
            old = self._config
            changed = changed_keys(to_dict(old, include_secrets=True), to_dict(new, include_secrets=True))
            if not changed:
                return []
            restart_required = [key for key in changed if not is_live(key)]
            previous = self._worker.settings
            keywords = previous.keywords
            if any(key.startswith(("keywords", "engine.")) for key in changed):
                keywords = tuple(compile_config_keywords(self._model, new))
            self._switch(new, engine_settings(new, keywords))
            notified: list[ConfigListener] = []
            for name, listener in self._listeners:
                try:
                    listener(changed)
                except Exception as error:
                    log.warning(
                        "%s rejected the change of %s: %s; rolled back", name, ", ".join(changed), error
                    )
                    self._switch(old, previous)
                    for undo in notified:
                        try:
                            undo(changed)
                        except Exception:
                            log.exception("could not roll %s back", name)
                    raise ConfigRejected(f"{name} rejected the change: {error}") from error
                notified.append(listener)
        self._applied()
        return restart_required

    def preflight(self, new: AgentConfig) -> None:
        """What can be checked of a change before it is kept for the next start: the backend
        imports, the model loads, the keywords are in its lexicon, the outbox can be written,
        played files exist. Raises ConfigRejected naming the key (nothing changed)."""
        old = self._config
        changed = changed_keys(to_dict(old, include_secrets=True), to_dict(new, include_secrets=True))
        model = self._model
        if any(key.startswith("model.") for key in changed):
            model = _load_model(new, None)
        elif any(key.startswith(("engine.backend", "engine.threads", "engine.quantize")) for key in changed):
            model = _load_model(new, self._model.directory)
        try:
            compile_config_keywords(model, new)
        except (LexiconError, ValueError, ImportError) as error:
            raise ConfigRejected(f"keywords: {error}") from None
        if any(key.startswith("outbox.path") for key in changed):
            _check_writable(new.outbox_path(), "outbox.path")
        if any(key.startswith("audio.sources") for key in changed):
            for index, source in enumerate(new.audio.sources):
                path = getattr(source, "path", None)
                if path is not None and not Path(path).exists():
                    raise ConfigRejected(f"audio.sources[{index}].path: {path} does not exist on this device")

    def reload_model(self) -> KwsModel:
        """Read the model files again (e.g. after an update); every stream gets a new detector.
        Raises (ModelError, LexiconError, ...) before anything changed."""
        with self._lock:
            config = self._config
            model = KwsModel.load(
                self._model.directory,
                backend=config.engine.backend,
                threads=config.engine.threads,
                quantize=config.engine.quantize,
            )
            keywords = compile_config_keywords(model, config)
            if not self._worker.replace_model(model, keywords, APPLY_TIMEOUT_SECONDS):
                raise ConfigRejected("the engine worker did not take the new model (is it running?)")
            scored_elsewhere = not isinstance(self._worker, EngineWorker)
            if scored_elsewhere:
                # Engine processes loaded the model themselves: as at start, this process keeps
                # what spells keywords and describes the model, not the network's weights.
                model = model.without_network()
            self._model = model
        if scored_elsewhere:
            give_back_free_memory()
        self._applied()
        return model

    def _switch(self, config: AgentConfig, settings: EngineSettings) -> None:
        if not self._worker.apply(settings, APPLY_TIMEOUT_SECONDS):
            raise ConfigRejected("the engine worker did not take the change (is it running?)")
        self._ingest.max_rate_factor = config.audio.mqtt.max_rate_factor
        self._config = config

    def _applied(self) -> None:
        try:
            self._on_applied()
        except Exception:
            log.exception("could not publish the new state")


def _load_model(config: AgentConfig, directory: Path | None) -> KwsModel:
    """The model a configuration names (or the one in ``directory``, with the configuration's
    engine settings), from this device's disk only: never downloaded here."""
    source = ModelSource(
        model_id=config.model.id,
        revision=config.model.revision,
        directory=config.model.dir,
        cache_dir=config.model.cache_dir,
        download=False,
    )
    try:
        if directory is None:
            directory = resolve_model_dir(source)
        return KwsModel.load(
            directory,
            backend=config.engine.backend,
            threads=config.engine.threads,
            quantize=config.engine.quantize,
        )
    except ImportError as error:
        raise ConfigRejected(
            f"engine.backend: {config.engine.backend} cannot be used here: {error}"
        ) from None
    except ModelError as error:
        raise ConfigRejected(f"model: {error}") from None


def _check_writable(path: Path, key: str) -> None:
    """Whether a file can be created at ``path`` (its folder made if needed)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.with_name(f".{path.name}.probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ConfigRejected(f"{key}: cannot write {path} ({error.strerror or error})") from None

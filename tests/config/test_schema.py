"""The schema's own defaults agree with the engine's, and the tree's derived values."""

from __future__ import annotations

from pathlib import Path

from edge_agent import model_store
from edge_agent.config import EngineConfig, KeywordConfig, ModelConfig, parse_config, schema
from edge_agent.engine.model import (
    DEFAULT_GAP_TOLERANCE,
    DEFAULT_HOLD_SECONDS,
    DEFAULT_MAX_DURATION,
    DEFAULT_MIN_DURATION,
    DEFAULT_PAUSE_SECONDS,
    DEFAULT_REFRACTORY_SECONDS,
    DEFAULT_THRESHOLD,
    DecoderSettings,
    KeywordSpec,
)


def test_defaults_equal_the_engines_constants() -> None:
    assert schema.DEFAULT_THRESHOLD == DEFAULT_THRESHOLD
    assert schema.DEFAULT_MIN_DURATION == DEFAULT_MIN_DURATION
    assert schema.DEFAULT_MAX_DURATION == DEFAULT_MAX_DURATION
    assert schema.DEFAULT_REFRACTORY_SECONDS == DEFAULT_REFRACTORY_SECONDS
    assert schema.DEFAULT_GAP_TOLERANCE == DEFAULT_GAP_TOLERANCE
    assert schema.DEFAULT_HOLD_SECONDS == DEFAULT_HOLD_SECONDS
    assert schema.DEFAULT_PAUSE_SECONDS == DEFAULT_PAUSE_SECONDS
    assert schema.DEFAULT_MODEL_ID == model_store.DEFAULT_MODEL_ID
    assert schema.DEFAULT_REVISION == model_store.DEFAULT_REVISION


def test_field_defaults_equal_the_engines_own_defaults() -> None:
    engine, settings = EngineConfig(), DecoderSettings()
    assert engine.refractory == settings.refractory_seconds
    assert engine.gap_tolerance == settings.gap_tolerance
    assert engine.hold == settings.hold_seconds
    assert engine.pause == settings.pause_seconds
    keyword, spec = KeywordConfig(text="小云小云"), KeywordSpec("小云小云")
    assert (keyword.threshold, keyword.min_duration, keyword.max_duration) == (
        spec.threshold,
        spec.min_duration,
        spec.max_duration,
    )
    model = ModelConfig()
    assert (model.id, model.revision) == (model_store.DEFAULT_MODEL_ID, model_store.DEFAULT_REVISION)


def test_outbox_path_defaults(tmp_path: Path) -> None:
    config = parse_config({"device": {"id": "d1"}})
    assert config.outbox_path({"STATE_DIRECTORY": "/var/lib/edge-agent"}) == Path(
        "/var/lib/edge-agent/outbox.db"
    )
    assert config.outbox_path({"HOME": str(tmp_path)}) == tmp_path / ".local/state/edge-agent/d1/outbox.db"
    explicit = parse_config({"outbox": {"path": str(tmp_path / "o.db")}})
    assert explicit.outbox_path({}) == tmp_path / "o.db"

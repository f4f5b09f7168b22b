"""The configured keywords and decoder settings, compiled for the engine.

The configuration is a leaf that knows nothing of the engine; this module is where the two meet:
it turns the validated ``engine`` and ``keywords`` sections into the engine's own objects.
"""

from __future__ import annotations

from edge_agent.config import AgentConfig
from edge_agent.engine.decoder import CompiledKeyword, DecoderSettings
from edge_agent.engine.model import KeywordSpec, KwsModel


def decoder_settings_from(config: AgentConfig) -> DecoderSettings:
    """The decoder's detection policy from the ``engine`` section."""
    return DecoderSettings(
        refractory_seconds=config.engine.refractory,
        gap_tolerance=config.engine.gap_tolerance,
        hold_seconds=config.engine.hold,
        pause_seconds=config.engine.pause,
    )


def compile_config_keywords(model: KwsModel, config: AgentConfig) -> list[CompiledKeyword]:
    """The configured keywords spelled with ``model``; LexiconError names an unknown character."""
    return [
        model.compile(KeywordSpec(k.text, k.threshold, k.min_duration, k.max_duration), k.homophones)
        for k in config.keywords
    ]

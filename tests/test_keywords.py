"""The configuration compiled for the engine: decoder settings from the engine section."""

from __future__ import annotations

from edge_agent.config import parse_config
from edge_agent.engine.decoder import DecoderSettings
from edge_agent.keywords import decoder_settings_from


def test_decoder_policy_keys_reach_the_decoder_settings() -> None:
    config = parse_config({"engine": {"hold": 0.8, "pause": 0.4, "refractory": 2, "gap_tolerance": 0.3}})
    assert decoder_settings_from(config) == DecoderSettings(
        refractory_seconds=2.0, gap_tolerance=0.3, hold_seconds=0.8, pause_seconds=0.4
    )


def test_default_configuration_gives_the_default_decoder_settings() -> None:
    assert decoder_settings_from(parse_config({})) == DecoderSettings()

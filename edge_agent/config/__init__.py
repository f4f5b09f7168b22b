"""The agent's configuration: one typed, frozen tree, validated once at start-up.

=============  ===============================================================================
``schema``     the tree: frozen dataclasses whose fields carry their description and bounds
``parse``      parsed YAML to a validated tree; every error names the key
``load``       the sources (file, remote overrides, environment), updates, plain-data output
``reference``  docs/configuration.md and config.yaml, generated from the schema
=============  ===============================================================================

The package is a leaf: it imports nothing from the engine, so reading or checking a
configuration never loads the model code or numpy. ``edge_agent.keywords`` turns the configured
keywords and decoder policy into the engine's objects.

Import from here; the modules are how the code is organised, not separate interfaces.
"""

from __future__ import annotations

from edge_agent.config.load import (
    ENV_PREFIX,
    changed_keys,
    keep_last_good,
    last_good_overrides_path,
    load_config,
    merge_update,
    read_config_file,
    read_password,
    rejected_overrides_path,
    remote_overrides_path,
    revert_remote_overrides,
    save_remote_overrides,
    to_dict,
)
from edge_agent.config.parse import parse_config
from edge_agent.config.reference import config_reference, example_yaml
from edge_agent.config.schema import (
    COMMAND_NAMES,
    AgentConfig,
    AudioConfig,
    AudioSourceConfig,
    CommandsConfig,
    ConfigError,
    DeviceConfig,
    EngineConfig,
    FileSource,
    HealthConfig,
    HermesConfig,
    HomeAssistantConfig,
    HttpConfig,
    KeywordConfig,
    LoggingConfig,
    MicrophoneSource,
    ModelConfig,
    MqttAudioConfig,
    MqttConfig,
    OutboxConfig,
    PoolConfig,
    TlsConfig,
    WyomingConfig,
    default_device_id,
    option,
)

__all__ = [
    "COMMAND_NAMES",
    "ENV_PREFIX",
    "AgentConfig",
    "AudioConfig",
    "AudioSourceConfig",
    "CommandsConfig",
    "ConfigError",
    "DeviceConfig",
    "EngineConfig",
    "FileSource",
    "HealthConfig",
    "HermesConfig",
    "HomeAssistantConfig",
    "HttpConfig",
    "KeywordConfig",
    "LoggingConfig",
    "MicrophoneSource",
    "ModelConfig",
    "MqttAudioConfig",
    "MqttConfig",
    "OutboxConfig",
    "PoolConfig",
    "TlsConfig",
    "WyomingConfig",
    "changed_keys",
    "config_reference",
    "default_device_id",
    "example_yaml",
    "keep_last_good",
    "last_good_overrides_path",
    "load_config",
    "merge_update",
    "option",
    "parse_config",
    "read_config_file",
    "read_password",
    "rejected_overrides_path",
    "remote_overrides_path",
    "revert_remote_overrides",
    "save_remote_overrides",
    "to_dict",
]

"""Where the configuration comes from, and how it goes back out as plain data.

Sources, later wins: built-in defaults, the YAML file (``-c FILE``), the remote overrides file
that ``set_config`` writes beside it, then environment variables ``EDGE_AGENT_<SECTION>__<KEY>``
(double underscore between levels, values parsed as YAML scalars, e.g.
``EDGE_AGENT_MQTT__PORT=8883``, ``EDGE_AGENT_MQTT__TLS__CA_FILE=/etc/ca.pem``), and
``EDGE_AGENT_MODEL_DIR`` for ``model.dir`` when nothing else sets it. The sources
are merged as plain mappings and validated once, together, by
:func:`~edge_agent.config.parse.parse_config`. Secrets can be read from files
(``mqtt.password_file``) and are never printed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from edge_agent.config.parse import parse_config
from edge_agent.config.schema import AgentConfig, ConfigError, MqttConfig

ENV_PREFIX = "EDGE_AGENT_"
# The model directory, also settable as model.dir (or EDGE_AGENT_MODEL__DIR); the file wins.
MODEL_DIR_ENV = "EDGE_AGENT_MODEL_DIR"


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> AgentConfig:
    """Defaults <- file <- remote overrides (set_config) <- environment, validated."""
    env = os.environ if env is None else env
    data = read_config_file(path) if path is not None else {}
    if path is not None and remote_overrides_path(path).exists():
        data = _merge(data, read_config_file(remote_overrides_path(path)))
    data = _merge(data, _env_overrides(env))
    if env.get(MODEL_DIR_ENV) and not (data.get("model") or {}).get("dir"):
        # The short variable is the documented way to point at the model: the loaded config says
        # so, so that `config check` and `get_config` show the directory actually used.
        data = _merge(data, {"model": {"dir": env[MODEL_DIR_ENV]}})
    return parse_config(data, str(path) if path else "defaults")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The YAML mapping in ``path``, unvalidated; an empty file is an empty mapping."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError("", f"cannot read config file {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ConfigError("", f"config file {path} is not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError("", f"config file {path} is not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"config file {path}: the top level must be a mapping")
    return data


def remote_overrides_path(path: str | Path) -> Path:
    """Where changes made with the ``set_config`` command are kept, beside the config file.

    The user's file is never rewritten (its comments survive); ``config.remote.yaml`` is layered
    over it at start-up, and the environment over both.
    """
    path = Path(path)
    return path.with_name(f"{path.stem}.remote.yaml")


def last_good_overrides_path(path: str | Path) -> Path:
    """The remote overrides of the last start that worked (see :func:`revert_remote_overrides`)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.remote.last-good.yaml")


def rejected_overrides_path(path: str | Path) -> Path:
    """Where remote overrides that stopped the agent from starting are kept, for a look."""
    path = Path(path)
    return path.with_name(f"{path.stem}.remote.rejected.yaml")


def keep_last_good(path: str | Path) -> None:
    """The agent started with the current overrides: they become the ones to go back to."""
    current, kept = remote_overrides_path(path), last_good_overrides_path(path)
    if current.exists():
        write_private(kept, current.read_text(encoding="utf-8"))
    else:
        kept.unlink(missing_ok=True)


def revert_remote_overrides(path: str | Path) -> Path | None:
    """The agent did not start with its remote overrides: set them aside (returned, for the
    report) and restore those of the last start that worked (or none). None when there were no
    overrides to blame."""
    current = remote_overrides_path(path)
    if not current.exists():
        return None
    rejected = rejected_overrides_path(path)
    os.replace(current, rejected)
    kept = last_good_overrides_path(path)
    if kept.exists():
        write_private(current, kept.read_text(encoding="utf-8"))
    return rejected


def save_remote_overrides(path: str | Path, update: Mapping[str, Any]) -> Path:
    """Merge ``update`` into the overrides file, atomically; raises OSError when not writable."""
    target = remote_overrides_path(path)
    current = read_config_file(target) if target.exists() else {}
    merged = _merge(current, update)
    text = (
        "# Written by edge-agent's set_config/mute commands; layered over the config file.\n"
        + yaml.safe_dump(merged, allow_unicode=True, sort_keys=False)
    )
    write_private(target, text)
    return target


def write_private(target: Path, text: str) -> None:
    """Replace ``target`` atomically with ``text``, readable by its owner only (it may hold
    connection settings)."""
    temporary = target.with_name(target.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temporary, target)


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    """The nested mapping that the ``EDGE_AGENT_<SECTION>__<KEY>`` variables of ``env`` spell."""
    overrides: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        if not all(path):
            raise ConfigError(name, "empty key in environment variable name")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as error:
            if not raw.startswith("*"):
                raise ConfigError(
                    ".".join(path), f"cannot parse environment variable {name}: {error}"
                ) from None
            value = raw  # `*` (any origin, any host) is a YAML alias marker, but meant as text here
        target = overrides
        for part in path[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(".".join(path), f"conflicts with another environment variable ({name})")
        target[path[-1]] = value
    return overrides


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` laid over it, mapping by mapping; lists are replaced whole."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def merge_update(config: AgentConfig, update: Mapping[str, Any]) -> AgentConfig:
    """Apply a partial update (as ``set_config`` sends it), validated exactly like a file."""
    return parse_config(_merge(to_dict(config, include_secrets=True), update), "update")


def to_dict(config: Any, include_secrets: bool = False) -> Any:
    """Plain data for YAML/JSON; secrets become ``"***"`` unless asked for."""
    if dataclasses.is_dataclass(config):
        result: dict[str, Any] = {}
        for spec in dataclasses.fields(config):
            value = getattr(config, spec.name)
            if spec.metadata.get("secret") and value is not None and not include_secrets:
                result[spec.name] = "***"
            else:
                result[spec.name] = to_dict(value, include_secrets)
        return result
    if isinstance(config, tuple):
        return [to_dict(item, include_secrets) for item in config]
    return config


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two ``to_dict`` trees (lists compare whole)."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys: list[str] = []
        for name in dict.fromkeys([*old, *new]):
            keys += changed_keys(old.get(name), new.get(name), f"{prefix}{name}.")
        return keys
    return [] if old == new else [prefix.rstrip(".")]


def read_password(config: MqttConfig) -> str | None:
    """The MQTT password from the config or its file; file errors name the key."""
    if config.password_file:
        try:
            lines = Path(config.password_file).read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise ConfigError(
                "mqtt.password_file", f"cannot read {config.password_file}: {error.strerror or error}"
            ) from None
        return lines[0] if lines else ""
    return config.password

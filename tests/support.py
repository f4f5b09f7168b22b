"""Helpers shared by the agent, MQTT and HTTP tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge_agent.config import AgentConfig, parse_config


def agent_config(port: int, tmp_path: Path, device: str = "dev1", **sections: Any) -> AgentConfig:
    data: dict[str, Any] = {
        "device": {"id": device},
        "mqtt": {"host": "127.0.0.1", "port": port, "reconnect_min_delay": 0.2, "reconnect_max_delay": 2.0},
        "outbox": {"path": str(tmp_path / f"{device}-outbox.db")},
        "health": {"interval": 1.0},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return parse_config(data)

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent.app import Agent
from edge_agent.config import AgentConfig, parse_config
from tests.broker import Broker, Client


@pytest.fixture()
def broker(tmp_path: Path) -> Iterator[Broker]:
    instance = Broker(tmp_path).start()
    yield instance
    instance.stop()


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


@pytest.fixture()
def make_agent(numpy_model, tmp_path: Path) -> Iterator[Callable[..., Agent]]:  # type: ignore[no-untyped-def]
    from edge_agent.cli.common import compile_keywords, decoder_settings

    agents: list[Agent] = []

    def make(config: AgentConfig, sources: list[Any] | None = None, start: bool = True) -> Agent:
        agent = Agent(
            config,
            numpy_model,
            compile_keywords(numpy_model, config),
            decoder_settings(config),
            sources or [],
        )
        agents.append(agent)
        if start:
            agent.start()
            if agent.transport is not None:
                assert agent.transport.wait_connected(10), "agent did not connect"
        return agent

    yield make
    for agent in agents:
        if not agent._stop.is_set():
            agent.stop(timeout=5)


@pytest.fixture()
def client(broker: Broker) -> Iterator[Client]:
    instance = Client(broker.port).connect()
    yield instance
    instance.close()

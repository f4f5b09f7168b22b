"""Shared fixtures: where the real model and recordings are, and loaded models.

The model and recordings live in ../shared beside the repository (or EDGE_AGENT_MODEL_DIR /
EDGE_AGENT_DEV_AUDIO). Tests that need them skip on a developer machine without them, and
fail in CI (CI=true), where skipping would hide that they never ran.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent.app import Agent
from edge_agent.config import AgentConfig
from tests.broker import Broker, Client

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared"
MODEL_NAME = "speech_charctc_kws_phone-xiaoyun"


def _require(path: Path | None, what: str) -> Path:
    if path is not None and path.exists():
        return path
    message = f"{what} not found (looked at {path}); see README 'Running the tests'"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def require_module(name: str):  # type: ignore[no-untyped-def]
    """Import an optional dependency: skip locally when missing, fail in CI where it is installed."""
    if os.environ.get("CI", "").lower() == "true":
        return importlib.import_module(name)
    return pytest.importorskip(name)


def shared_model_dir() -> Path | None:
    env = os.environ.get("EDGE_AGENT_MODEL_DIR")
    return Path(env) if env else SHARED / "models" / MODEL_NAME


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return _require(shared_model_dir(), "model directory")


@pytest.fixture(scope="session")
def dev_audio() -> Path:
    env = os.environ.get("EDGE_AGENT_DEV_AUDIO")
    return _require(Path(env) if env else SHARED / "audio" / "dev", "dev recordings (audio/dev)")


@pytest.fixture(scope="session")
def example_wav(model_dir: Path) -> Path:
    return _require(model_dir / "example" / "kws_xiaoyunxiaoyun.wav", "the model's example recording")


@pytest.fixture(scope="session")
def numpy_model(model_dir: Path):  # type: ignore[no-untyped-def]
    from edge_agent.engine.model import KwsModel

    return KwsModel.load(model_dir, backend="numpy")


@pytest.fixture(scope="session")
def torch_model(model_dir: Path):  # type: ignore[no-untyped-def]
    require_module("torch")
    from edge_agent.engine.model import KwsModel

    return KwsModel.load(model_dir, backend="torch", threads=1)


@pytest.fixture(scope="session")
def transcripts(dev_audio: Path) -> dict[str, str]:
    """Relative path (pos/x.wav) -> transcript without spaces."""
    result = {}
    for line in (dev_audio / "trans.txt").read_text(encoding="utf-8").splitlines():
        if line.strip():
            path, _, text = line.partition("\t")
            result[path] = text.replace(" ", "").strip()
    return result


@pytest.fixture()
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("EDGE_AGENT_") or name == "MODELSCOPE_CACHE":
            monkeypatch.delenv(name, raising=False)
    yield


# --- a broker and in-process agents (integration tests) ---------------------------------------


@pytest.fixture()
def broker(tmp_path: Path) -> Iterator[Broker]:
    instance = Broker(tmp_path).start()
    yield instance
    instance.stop()


@pytest.fixture()
def make_agent(numpy_model, tmp_path: Path) -> Iterator[Callable[..., Agent]]:  # type: ignore[no-untyped-def]
    agents: list[Agent] = []

    def make(
        config: AgentConfig,
        sources: list[Any] | None = None,
        start: bool = True,
        integrations: Callable[[Agent], list[Any]] | None = None,
    ) -> Agent:
        """An agent on the shared model; ``integrations(agent)`` makes what plugs into it."""
        agent = Agent(config, numpy_model, sources or [])
        for integration in integrations(agent) if integrations is not None else []:
            agent.add_integration(integration)
        agents.append(agent)
        if start:
            agent.start()
            if agent.transport is not None:
                # Subscribed, not only connected: what a test publishes next reaches the agent.
                assert agent.transport.wait_subscribed(10), "agent did not connect and subscribe"
        return agent

    yield make
    for agent in agents:
        agent.stop(timeout=5)


@pytest.fixture()
def client(broker: Broker) -> Iterator[Client]:
    instance = Client(broker.port).connect()
    yield instance
    instance.close()

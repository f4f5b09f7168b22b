"""Fixtures for the HTTP API: the real model loaded once, servers on free loopback ports."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edge_agent.config import HttpConfig, parse_config
from edge_agent.http.backend import ApiBackend
from edge_agent.http.server import HttpServerHandle, start_http_server
from edge_agent.http.standalone import LoadedEngine, StandaloneBackend, config_loader
from tests.http.client import Client

StartServer = Callable[..., tuple[HttpServerHandle, Client]]


@pytest.fixture(scope="session")
def engine(model_dir: Path) -> LoadedEngine:
    """The model and default keywords, loaded by the same code as `edge-agent serve`."""
    return config_loader(parse_config({"model": {"dir": str(model_dir)}}))()


@pytest.fixture()
def start_server() -> Iterator[StartServer]:
    """start(backend, **http settings) -> (handle, client); every server is stopped afterwards."""
    handles: list[HttpServerHandle] = []

    def start(backend: ApiBackend, **settings: Any) -> tuple[HttpServerHandle, Client]:
        config = dataclasses.replace(HttpConfig(), port=0, **settings)
        handle = start_http_server(config, backend)
        handles.append(handle)
        return handle, Client(handle.port, handle.api.document)

    yield start
    for handle in handles:
        handle.stop()


def ready_backend(engine: LoadedEngine) -> StandaloneBackend:
    backend = StandaloneBackend(lambda: engine, "damo/speech_charctc_kws_phone-xiaoyun", "master").start()
    assert backend.wait(30)
    return backend


@pytest.fixture()
def client(engine: LoadedEngine, start_server: StartServer) -> Client:
    """A standalone server with the model loaded (default limits)."""
    _, client = start_server(ready_backend(engine))
    return client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def edge_agent_env(**extra: str) -> dict[str, str]:
    """The environment without the developer's EDGE_AGENT_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    env.update(extra)
    return env


@dataclass
class ServeProcess:
    process: subprocess.Popen[str]
    client: Client
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


def start_serve(
    model_dir: Path, log_path: Path, *args: str, timeout: float = 60, port: int | None = None
) -> ServeProcess:
    """`edge-agent serve` in a subprocess, as a user runs it; returns once /healthz says 200."""
    port = port or free_port()
    log_file = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - handed to the process
    process = subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "serve", "--port", str(port), *args],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        text=True,
        env=edge_agent_env(EDGE_AGENT_MODEL_DIR=str(model_dir)),
    )
    log_file.close()
    client = Client(port)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, log_path.read_text(encoding="utf-8", errors="replace")
        try:
            if client.get("/healthz").status == 200:
                client.document = client.get("/openapi.json").json()
                return ServeProcess(process, client, log_path)
        except OSError:
            pass
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"serve did not become ready: {log_path.read_text(encoding='utf-8')}")


def stop_serve(serve: ServeProcess) -> int:
    serve.process.terminate()
    return serve.process.wait(timeout=20)


@pytest.fixture(scope="module")
def serve_process(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    serve = start_serve(model_dir, tmp_path_factory.mktemp("serve") / "serve.log")
    yield serve
    stop_serve(serve)

"""`edge-agent serve` and `edge-agent healthcheck` as an operator (or Docker) runs them."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

from edge_agent.http.standalone import LoadedEngine, StandaloneBackend
from tests.broker import Broker
from tests.broker import Client as MqttClient
from tests.http.client import Client
from tests.http.conftest import ServeProcess, StartServer, edge_agent_env, free_port, start_serve, stop_serve
from tests.support import start_agent_process


def healthcheck(*args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", "healthcheck", *args, *(["-c", str(config)] if config else [])],
        capture_output=True,
        text=True,
        timeout=60,
        env=edge_agent_env(),
    )


def test_serve_answers_and_stops_cleanly_on_sigterm(
    model_dir: Path, tmp_path: Path, example_wav: Path
) -> None:
    serve = start_serve(model_dir, tmp_path / "serve.log")
    try:
        assert serve.client.get("/healthz").json()["status"] == "ok"
        assert serve.client.detect(example_wav.read_bytes()).json()["keyword"] == "小云小云"
    finally:
        code = stop_serve(serve)
    assert code == 0, serve.log()
    log = serve.log()
    assert "HTTP API on http://127.0.0.1:" in log and "model loaded" in log and "received SIGTERM" in log
    assert "Traceback" not in log


def test_healthcheck_exit_codes(serve_process: ServeProcess, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{serve_process.client.port}"
    ok = healthcheck("--url", url)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["status"] == "ok"
    # The health URL itself works too (not /healthz/healthz).
    for full in (f"{url}/healthz", f"{url}/healthz/"):
        assert healthcheck("--url", full).returncode == 0
    # The address from the config file, as the Docker HEALTHCHECK does (0.0.0.0 means loopback).
    config = tmp_path / "config.yaml"
    config.write_text(f"http:\n  host: 0.0.0.0\n  port: {serve_process.client.port}\n", encoding="utf-8")
    assert healthcheck(config=config).returncode == 0
    down = healthcheck("--url", f"http://127.0.0.1:{free_port()}", "--timeout", "2")
    assert down.returncode == 1 and json.loads(down.stdout)["status"] == "unreachable"


def test_healthcheck_fails_while_loading(engine: LoadedEngine, start_server: StartServer) -> None:
    gate = threading.Event()

    def gated_load() -> LoadedEngine:
        gate.wait(30)
        return engine

    backend = StandaloneBackend(gated_load, "m", "r")
    handle, _ = start_server(backend)
    backend.start()
    try:
        loading = healthcheck("--url", f"http://127.0.0.1:{handle.port}")
    finally:
        gate.set()
    assert loading.returncode == 1 and json.loads(loading.stdout)["status"] == "loading"
    assert backend.wait(30)
    assert healthcheck("--url", f"http://127.0.0.1:{handle.port}").returncode == 0


def test_serve_exits_1_when_the_model_cannot_load(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent", "serve", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
        env=edge_agent_env(EDGE_AGENT_MODEL_DIR=str(tmp_path / "nowhere")),
    )
    assert result.returncode == 1
    assert "cannot load the model" in result.stderr and "nowhere" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_a_busy_port(serve_process: ServeProcess, model_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent", "serve", "--port", str(serve_process.client.port)],
        capture_output=True,
        text=True,
        timeout=60,
        env=edge_agent_env(EDGE_AGENT_MODEL_DIR=str(model_dir)),
    )
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{serve_process.client.port}" in result.stderr


def test_serve_options_are_validated_like_the_config(model_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent", "serve", "--port", "70000"],
        capture_output=True,
        text=True,
        timeout=60,
        env=edge_agent_env(EDGE_AGENT_MODEL_DIR=str(model_dir)),
    )
    assert result.returncode == 2 and "http.port" in result.stderr


def test_run_with_the_http_api_logs_its_address_once(model_dir: Path, broker: Broker, tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "agent.log"
    mqtt = MqttClient(broker.port).connect()
    mqtt.subscribe("edge_agent/http-log/availability")
    with open(log_path, "w", encoding="utf-8") as log_file:
        process = start_agent_process(
            model_dir,
            broker.port,
            "http-log",
            tmp_path / "outbox.db",
            env={"EDGE_AGENT_HTTP__ENABLED": "true", "EDGE_AGENT_HTTP__PORT": str(port)},
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        # The HTTP server is up before the agent starts, so `online` comes after its log line.
        mqtt.wait_for(
            "edge_agent/http-log/availability", lambda m: bool(m) and m[-1].payload == b"online", timeout=60
        )
        assert Client(port).get("/healthz").status == 200
    finally:
        process.terminate()
        process.wait(timeout=30)
        mqtt.close()
    log = log_path.read_text(encoding="utf-8")
    assert log.count(f":{port} (docs at /docs") == 1, log

"""The HTTP API over a live agent: a real mosquitto, a file source playing 小云小云, real model."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent.app import Agent
from edge_agent.audio.sources import create_source
from edge_agent.cli.detect import detect_file
from edge_agent.config import parse_config
from edge_agent.http.agent_backend import AgentBackend
from edge_agent.http.standalone import LoadedEngine
from edge_agent.keywords import decoder_settings_from
from tests.broker import Broker
from tests.conftest import require_module
from tests.http.client import Client
from tests.http.conftest import StartServer

WAKE = "小云小云"


def metric_values(client: Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    parser = require_module("prometheus_client.parser")
    text = client.get("/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in parser.text_string_to_metric_families(text)
        for s in family.samples
    }


def wait_until(condition: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


@pytest.fixture()
def broker(tmp_path: Path):  # type: ignore[no-untyped-def]
    instance = Broker(tmp_path).start()
    yield instance
    instance.stop()


def test_agent_backend_reports_the_live_agent(
    broker: Broker, engine: LoadedEngine, start_server: StartServer, tmp_path: Path, dev_audio: Path
) -> None:
    positive = sorted(dev_audio.glob("pos/*.wav"))[0]
    config = parse_config(
        {
            "device": {"id": "http1"},
            "mqtt": {
                "host": "127.0.0.1",
                "port": broker.port,
                "reconnect_min_delay": 0.2,
                "reconnect_max_delay": 1,
            },
            "outbox": {"path": str(tmp_path / "outbox.db")},
            "audio": {"sources": [{"type": "file", "id": "door", "path": str(positive), "realtime": False}]},
        }
    )
    agent = Agent(config, engine.model, [create_source(entry) for entry in config.audio.sources])
    backend = AgentBackend()
    agent.add_integration(backend)  # before start: every live detection is counted
    _, client = start_server(backend)
    try:
        starting = client.get("/healthz")
        assert starting.status == 503 and starting.json()["status"] == "starting"
        assert starting.json()["broker_connected"] is False

        agent.start()
        assert agent.transport is not None and agent.transport.wait_connected(10)
        values = wait_until(
            lambda: (
                v
                if (v := metric_values(client)).get(
                    ("edge_agent_detections_total", (("keyword", WAKE), ("source", "stream")))
                )
                else None
            )
        )
        health = client.get("/healthz").json()
        assert (
            health["status"] == "ok" and health["broker_connected"] is True and health["mqtt_enabled"] is True
        )
        assert health["device"] == "http1" and health["model_loaded"] is True

        door = (("kind", "file"), ("stream", "door"))
        assert values[("edge_agent_stream_audio_seconds_total", door)] > 1.0
        assert 0 < values[("edge_agent_stream_rtf", door)] < 1
        assert values[("edge_agent_dropped_chunks_total", (*door[:1], ("stage", "source"), door[1]))] == 0
        assert values[("edge_agent_mqtt_connected", ())] == 1
        assert values[("edge_agent_mqtt_enabled", ())] == 1
        assert values[("edge_agent_worker_alive", ())] == 1
        assert values[("edge_agent_engine_backlog_seconds", (("worker", "0"),))] >= 0
        assert values[("edge_agent_engine_worker_restarts_total", (("worker", "0"),))] == 0
        assert ("edge_agent_outbox_depth", ()) in values
        assert values[("edge_agent_outbox_unwritten", ())] == 0
        assert values[("edge_agent_ready", ())] == 1

        info = client.get("/info").json()
        assert info["device"] == "http1" and info["keywords"] == [WAKE]
        assert info["keyword_settings"][0]["text"] == WAKE and "directory" not in info["model"]
        assert (
            info["model"]["id"] == "damo/speech_charctc_kws_phone-xiaoyun"
            and info["model"]["backend"] == "numpy"
        )

        # /detect with the agent's model and keywords gives what the CLI's code path gives.
        reference = detect_file(engine.model, engine.keywords, positive, decoder_settings_from(config))
        result = client.detect(positive.read_bytes()).json()
        assert result["detections"] == reference.to_dict()["detections"]
        assert result["detections"][0]["level_dbfs"] < 0.0
        after = metric_values(client)
        assert after[("edge_agent_detections_total", (("keyword", WAKE), ("source", "http")))] == 1
        assert after[("edge_agent_detections_total", (("keyword", WAKE), ("source", "stream")))] == 1

        # The broker going away does not make the agent unhealthy: it keeps detecting.
        broker.stop()
        wait_until(lambda: client.get("/healthz").json()["broker_connected"] is False, timeout=15)
        assert client.get("/healthz").status == 200
        assert metric_values(client)[("edge_agent_mqtt_connected", ())] == 0
    finally:
        agent.stop(timeout=5)

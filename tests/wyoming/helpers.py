"""An agent with the Wyoming server, and what it announces of its Wyoming streams."""

from __future__ import annotations

import threading
from pathlib import Path

from edge_agent.agent.services import Integration
from edge_agent.fleet.commands import CommandProcessor
from edge_agent.mqtt.messages import DetectionEvent
from edge_agent.wyoming.server import WyomingServer
from tests.fleet.helpers import wait_ready
from tests.support import agent_config

KEYWORD = "小云小云"


class StreamEvents(Integration):
    """What the agent announces of its Wyoming streams (the detection sink's thread), for tests
    to wait on instead of time."""

    name = "stream-events"

    def __init__(self) -> None:
        self.closed: list[str] = []
        self.detections: list[DetectionEvent] = []
        self._changed = threading.Condition()

    def on_detection(self, event: DetectionEvent, stream_kind: str) -> None:
        if stream_kind == "wyoming":
            with self._changed:
                self.detections.append(event)
                self._changed.notify_all()

    def stream_closed(self, stream: str, stream_kind: str) -> None:
        if stream_kind == "wyoming":
            with self._changed:
                self.closed.append(stream)
                self._changed.notify_all()

    def wait_closed(self, count: int, timeout: float = 30.0) -> list[str]:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.closed) >= count, timeout), self.closed
            return list(self.closed)


def wyoming_agent(  # type: ignore[no-untyped-def]
    make_agent,
    tmp_path: Path,
    mqtt_port: int | None = None,
    commands: bool = False,
    audio: dict | None = None,
    **wyoming,
):
    """A started agent with the Wyoming server on a free port (MQTT only with ``mqtt_port``);
    ``wyoming`` are keys of its section."""
    sections = {"wyoming": {"enabled": True, "port": 0, "zeroconf": False, **wyoming}}
    if audio is not None:
        sections["audio"] = audio
    if mqtt_port is None:
        config = agent_config(1, tmp_path, mqtt={"enabled": False}, **sections)
    else:
        config = agent_config(mqtt_port, tmp_path, **sections)
    server = WyomingServer()
    events = StreamEvents()

    def integrations(agent):  # type: ignore[no-untyped-def]
        extra = [CommandProcessor(agent)] if commands else []
        return [server, events, *extra]

    agent = make_agent(config, integrations=integrations)
    if mqtt_port is not None:
        wait_ready(mqtt_port, agent)
    return agent, server, events

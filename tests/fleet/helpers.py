"""Waiting on in-process agents in the fleet tests: on their messages, never on time.

Two facts about the broker make these waits exact:

* it handles one client's packets in order, and forwards what one client publishes to each
  subscriber in order;
* the agent subscribes to every topic (its own and its integrations') right after each CONNACK,
  and only then publishes its retained ``info``.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from edge_agent.agent.app import Agent
from edge_agent.mqtt.messages import DeviceInfo
from tests.agent.streaming import stream_files
from tests.broker import Client, Received


def wait_ready(port: int, agent: Agent, timeout: float = 15.0) -> None:
    """Return once ``agent``'s subscriptions are in place at the broker on ``port``: a probe
    sees this boot's ``info``, which the agent publishes after subscribing. From then on a
    message published to the agent reaches it. Also after a broker restart without persistence
    (the retained ``info`` seen then is the one published on reconnection)."""
    topic = DeviceInfo.TOPIC.format(prefix=agent.config.mqtt.topic_prefix, device=agent.device_id)
    probe = Client(port).connect()
    try:
        probe.subscribe(topic)
        probe.wait_for(topic, lambda m: any(x.json()["boot_id"] == agent.boot_id for x in m), timeout)
    finally:
        probe.close()


def command(
    client: Client,
    topic: str,
    arguments: dict[str, Any] | None = None,
    expect: int = 1,
    timeout: float = 15.0,
) -> list[dict[str, Any]]:
    """Send a command with an MQTT 5 response topic and correlation data; return the answers
    once ``expect`` of them are in."""
    reply_topic = f"replies/{uuid.uuid4().hex}"
    correlation = uuid.uuid4().bytes
    client.subscribe(reply_topic)
    payload = json.dumps(arguments or {}, ensure_ascii=False)
    client.publish(topic, payload, qos=1, ResponseTopic=reply_topic, CorrelationData=correlation)
    answers = client.wait_for(reply_topic, lambda m: len(m) >= expect, timeout)
    assert all(a.properties.CorrelationData == correlation for a in answers)
    return [a.json() for a in answers]


def sentinel_detection(
    client: Client, pcm: bytes, stream: str = "sentinel", prefix: str = "edge_agent/dev1"
) -> Received:
    """Stream a recording with a keyword and wait for its detection on ``{prefix}/detection``
    (the client must be subscribed to it). The engine worker handles a device's audio in the
    order it arrived and the detection sink publishes in order: whatever audio sent before this
    was going to be detected has been by the time this returns, so an absence can be asserted."""
    stream_files(client, {stream: pcm}, prefix=prefix)
    topic = f"{prefix}/detection"
    found = client.wait_for(topic, lambda m: any(x.json()["stream"] == stream for x in m), timeout=30)
    return next(x for x in found if x.json()["stream"] == stream)

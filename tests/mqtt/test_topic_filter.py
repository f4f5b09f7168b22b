"""TopicFilter against paho's own matcher, the reference for MQTT's wildcard rules."""

from __future__ import annotations

import itertools

import paho.mqtt.client as paho
import pytest

from edge_agent.mqtt.transport import TopicFilter, topic_matches

FILTERS = ["a/b", "a/+", "a/#", "#", "+", "+/+", "a/+/c", "$SYS/#", "+/b", "a/b/#", "/+", "+/", "a//b", "$x"]
TOPICS = ["a", "a/b", "a/c", "a/b/c", "b", "$SYS/x", "$SYS", "a/b/c/d", "/b", "a/", "", "/", "a//b", "$x"]
TOPICS += ["x/b"]


@pytest.mark.parametrize(("topic_filter", "topic"), list(itertools.product(FILTERS, TOPICS)))
def test_matches_as_paho_does(topic_filter: str, topic: str) -> None:
    assert TopicFilter(topic_filter).matches(topic) == paho.topic_matches_sub(topic_filter, topic)


def test_shared_subscriptions_deliver_the_filter_after_the_group() -> None:
    assert topic_matches("$share/agents/edge_agent/+/audio", "edge_agent/k/audio")
    assert not topic_matches("$share/agents/edge_agent/+/audio", "edge_agent/k/health")

"""Live reconfiguration: applied where the state lives, rolled back when an integration says no,
serialised when several threads change the agent at once."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.agent.app import Agent
from edge_agent.agent.live_config import ConfigRejected
from edge_agent.agent.services import Integration
from edge_agent.config import merge_update, parse_config
from edge_agent.engine.lexicon import LexiconError


class Listener(Integration):
    def __init__(self, reject: str | None = None) -> None:
        self.reject = reject
        self.heard: list[list[str]] = []

    def config_changed(self, keys: list[str]) -> None:
        self.heard.append(keys)
        if (
            self.reject is not None
            and self.reject in keys
            and self.services.config.keywords[0].text != "小云小云"
        ):
            raise ValueError(f"cannot take {self.reject}")


@pytest.fixture()
def agent(numpy_model, tmp_path: Path) -> Iterator[Agent]:  # type: ignore[no-untyped-def]
    config = parse_config({"device": {"id": "live"}, "mqtt": {"enabled": False}})
    instance = Agent(config, numpy_model)
    yield instance
    instance.stop()


def test_a_change_reaches_the_worker_and_reports_what_needs_a_restart(agent: Agent) -> None:
    listener = Listener()
    agent.add_integration(listener)
    agent.start()
    new = merge_update(
        agent.config, {"keywords": ["如家酒店"], "engine": {"muted": True}, "mqtt": {"host": "elsewhere"}}
    )
    assert agent.apply_config(new) == ["mqtt.host"]
    assert agent.config is new
    assert [k.text for k in agent.worker.keywords] == ["如家酒店"] and agent.worker.muted
    assert agent.ingest.max_rate_factor == new.audio.mqtt.max_rate_factor
    assert listener.heard == [["engine.muted", "keywords", "mqtt.host"]]
    assert agent.apply_config(new) == [] and len(listener.heard) == 1  # no change, no news


def test_an_integration_that_rejects_a_change_rolls_it_back_for_everyone(agent: Agent) -> None:
    first, rejecting, last = Listener(), Listener(reject="keywords"), Listener()
    for listener in (first, rejecting, last):
        agent.add_integration(listener)
    agent.start()
    old = agent.config
    with pytest.raises(ConfigRejected, match="Listener rejected the change: cannot take keywords"):
        agent.apply_config(merge_update(old, {"keywords": ["如家酒店"]}))
    assert agent.config is old
    assert [k.text for k in agent.worker.keywords] == ["小云小云"]
    assert first.heard == [["keywords"], ["keywords"]]  # told of the change, then of its undoing
    assert last.heard == []  # never saw it


def test_keywords_the_model_cannot_say_change_nothing(agent: Agent) -> None:
    agent.start()
    old = agent.config
    with pytest.raises(LexiconError):
        agent.apply_config(merge_update(old, {"keywords": ["小云龘"]}))
    assert agent.config is old and [k.text for k in agent.worker.keywords] == ["小云小云"]


def test_changes_from_many_threads_are_applied_one_at_a_time(agent: Agent) -> None:
    agent.start()
    start = threading.Barrier(4)
    failures: list[BaseException] = []

    def toggle(thread: int) -> None:
        start.wait()
        try:
            for index in range(25):
                muted = (thread + index) % 2 == 0
                streams = 2 + (thread * 25 + index) % 7
                agent.apply_config(
                    merge_update(
                        agent.config,
                        {"engine": {"muted": muted}, "audio": {"mqtt": {"max_streams": streams}}},
                    )
                )
                # Whatever another thread did since, what is in force is one whole change.
                config, settings = agent.config, agent.worker.settings
                assert isinstance(config.engine.muted, bool) and settings.max_streams >= 2
        except BaseException as error:  # noqa: BLE001 - reported by the test
            failures.append(error)

    threads = [threading.Thread(target=toggle, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert failures == []
    settings = agent.worker.settings
    assert settings.muted == agent.config.engine.muted
    assert settings.max_streams == agent.config.audio.mqtt.max_streams

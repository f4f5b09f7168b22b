"""`edge-agent fleet rollout` as a subprocess against real mosquitto and 50 simulated devices.

The simulated fleet (benchmarks/fleet_sim.py) publishes the agent's real availability, info and
health messages and answers get_config/set_config; its devices detect 3,600 times an hour at the
default threshold, and a lower threshold raises that (as it does on a real device). A 10% canary
that lowers the threshold is rolled back; one that raises it completes; Ctrl-C during the watch
restores the canary. After each, every device's configuration is read back with `fleet cmd`.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.config.schema import DEFAULT_THRESHOLD
from tests.broker import Broker

REPO = Path(__file__).resolve().parents[2]
DEVICES = 50
GROUP = "hall"

# 3,600 detections an hour at the default threshold: a few a second over the fleet.
SIMULATION = ["--devices", str(DEVICES), "--group", GROUP, "--rate", "3600", "--health-interval", "0.5"]

pytestmark = pytest.mark.slow


@pytest.fixture()
def fleet(broker: Broker) -> Iterator[Broker]:
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.fleet_sim", "--broker", f"127.0.0.1:{broker.port}", *SIMULATION],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == f"ready {DEVICES}"  # every retained state is out
        yield broker
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)  # closes the pipe too


def fleet_cli(broker: Broker, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", "fleet", *args, "--broker", f"127.0.0.1:{broker.port}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def rollout_args(threshold: float, watch: str) -> list[str]:
    keywords = json.dumps([{"text": "小云小云", "threshold": threshold}], ensure_ascii=False)
    change = ["--group", GROUP, "--set", f"keywords={keywords}", "--canary", "10%"]
    return ["rollout", *change, "--watch", watch, "--wait", "1", "--json"]


def thresholds(broker: Broker) -> dict[str, float]:
    """Every device's threshold now, from its own get_config answer."""
    result = fleet_cli(broker, "cmd", f"group:{GROUP}", "get_config", "--json", "--wait", "1")
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    return {a["device"]: a["result"]["config"]["keywords"][0]["threshold"] for a in answers}


def test_a_canary_that_raises_the_detection_rate_is_rolled_back(fleet: Broker) -> None:
    result = fleet_cli(fleet, *rollout_args(DEFAULT_THRESHOLD / 2, "20s"))
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["outcome"] == "rolled back"
    assert len(report["canary"]) == 5 and len(report["rest"]) == 45
    assert "detection rate" in report["verdict"]["reasons"][0]
    assert report["counts"]["restored"] == 5 and report["counts"]["unchanged"] == 45
    assert {report["devices"][name]["state"] for name in report["canary"]} == {"restored"}
    assert set(thresholds(fleet).values()) == {DEFAULT_THRESHOLD}
    assert len(thresholds(fleet)) == DEVICES


def test_a_canary_that_does_not_raise_it_completes(fleet: Broker) -> None:
    raised = DEFAULT_THRESHOLD * 1.2
    result = fleet_cli(fleet, *rollout_args(raised, "3s"))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["outcome"] == "completed" and report["verdict"]["passed"]
    assert report["counts"]["changed"] == DEVICES
    assert report["verdict"]["canary"]["detections"] > 0 and report["verdict"]["rest"]["detections"] > 0
    assert set(thresholds(fleet).values()) == {raised}


def test_ctrl_c_during_the_watch_restores_the_canary_and_prints_every_device(fleet: Broker) -> None:
    broker = ["--broker", f"127.0.0.1:{fleet.port}"]
    process = subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "fleet", *rollout_args(DEFAULT_THRESHOLD * 1.5, "10m"), *broker],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    for line in process.stderr:
        if line.startswith("canary changed; watching"):
            break
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 130
    report = json.loads(out)
    assert report["outcome"] == "interrupted"
    assert report["counts"]["restored"] == 5 and report["counts"]["unchanged"] == 45
    assert len(report["devices"]) == DEVICES
    assert set(thresholds(fleet).values()) == {DEFAULT_THRESHOLD}

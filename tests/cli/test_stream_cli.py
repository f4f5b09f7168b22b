"""`edge-agent stream` against a real agent and broker, both as subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.broker import Broker, Client
from tests.support import start_agent_process


def test_stream_sends_a_file_and_prints_the_detection(
    model_dir: Path, example_wav: Path, tmp_path: Path
) -> None:
    broker = Broker(tmp_path).start()
    watcher = Client(broker.port).connect().subscribe("edge_agent/streamed/availability")
    agent = start_agent_process(model_dir, broker.port, "streamed", tmp_path / "outbox.db")
    try:
        watcher.wait_for("edge_agent/streamed/availability", lambda m: m and m[-1].payload == b"online", 60)
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "edge_agent",
                "stream",
                "--broker",
                f"127.0.0.1:{broker.port}",
                "--device",
                "streamed",
                "--stream",
                "cli-test",
                "--fast",
                "--wait",
                "3",
                str(example_wav),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        (line,) = result.stdout.splitlines()
        event = json.loads(line)
        assert (event["keyword"], event["stream"], event["device"]) == ("小云小云", "cli-test", "streamed")
        assert "1 detection(s) on stream cli-test" in result.stderr
    finally:
        agent.terminate()
        agent.wait(30)
        watcher.close()
        broker.stop()


def test_stream_reports_an_unreachable_broker(example_wav: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_agent",
            "stream",
            "--broker",
            "127.0.0.1:1",
            "--device",
            "x",
            str(example_wav),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "cannot connect to the broker 127.0.0.1:1" in result.stderr

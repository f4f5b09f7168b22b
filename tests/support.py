"""Helpers shared by the agent, MQTT and HTTP tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from edge_agent.config import AgentConfig, parse_config


def agent_config(port: int, tmp_path: Path, device: str = "dev1", **sections: Any) -> AgentConfig:
    data: dict[str, Any] = {
        "device": {"id": device},
        "mqtt": {"host": "127.0.0.1", "port": port, "reconnect_min_delay": 0.2, "reconnect_max_delay": 2.0},
        "outbox": {"path": str(tmp_path / f"{device}-outbox.db")},
        "health": {"interval": 1.0},
        "engine": {"workers": int(os.environ.get("EDGE_AGENT_TEST_WORKERS", "1"))},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return parse_config(data)


def start_agent_process(
    model_dir: Path,
    port: int,
    device: str,
    outbox: Path,
    *options: str,
    env: Mapping[str, str] | None = None,
    **popen: Any,
) -> subprocess.Popen[Any]:
    """``edge-agent run`` as a real process against the broker on 127.0.0.1:``port``.

    ``options`` are extra command-line options, ``env`` extra environment (config overrides);
    output is discarded unless ``stdout``/``stderr`` are given.
    """
    command = [sys.executable, "-m", "edge_agent", "run", "--model-dir", str(model_dir)]
    command += ["--broker", f"127.0.0.1:{port}", "--device-id", device, *options]
    popen.setdefault("stdout", subprocess.DEVNULL)
    popen.setdefault("stderr", subprocess.DEVNULL)
    environment = {**os.environ, "EDGE_AGENT_OUTBOX__PATH": str(outbox), **(env or {})}
    return subprocess.Popen(command, env=environment, **popen)


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)

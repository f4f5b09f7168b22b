"""``edge-agent wyoming``: the agent as a Wyoming service alone, as a real process."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from tests.agent.streaming import pcm16
from tests.wyoming.clients import describe, detect, run, types
from tests.wyoming.helpers import KEYWORD

LISTENING = re.compile(r"Wyoming wake-word service on [0-9.]+:(\d+)")


def test_edge_agent_wyoming_serves_without_mqtt_and_stops_on_sigterm(
    model_dir: Path, dev_audio: Path, tmp_path: Path
) -> None:
    command = [sys.executable, "-m", "edge_agent", "wyoming", "--model-dir", str(model_dir)]
    command += [
        "--wyoming-host",
        "127.0.0.1",
        "--wyoming-port",
        "0",
        "--no-zeroconf",
        "--keywords",
        "小云小云,如家酒店",
    ]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    try:
        assert process.stderr is not None
        port = None
        for line in process.stderr:  # the log, line by line, until the server listens
            log.append(line)
            if match := LISTENING.search(line):
                port = int(match.group(1))
                break
        assert port is not None, "".join(log)
        rest = threading.Thread(target=lambda: log.extend(process.stderr), daemon=True)  # type: ignore[arg-type]
        rest.start()
        models = run(describe(port)).wake[0].models
        assert [m.name for m in models] == [KEYWORD, "如家酒店"]
        positive = pcm16(sorted(dev_audio.glob("pos/*.wav"))[0])
        assert types(run(detect(port, positive, names=[KEYWORD]))) == ["detection"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        rest.join(10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()
    text = "".join(log)
    assert "detected 小云小云 in wyoming-127_0_0_1-1" in text
    assert "edge-agent stopped" in text

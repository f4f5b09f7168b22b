"""The README's main-job command, run as a newcomer would: it must end with a detection."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_quickstart_streams_the_example_and_shows_the_detection(model_dir: Path) -> None:
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "quickstart.sh")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "EDGE_AGENT_MODEL_DIR": str(model_dir)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "OK: 小云小云 detected and published over MQTT." in result.stdout
    assert "edge_agent/quickstart/availability online" in result.stdout
    assert "edge_agent/quickstart/availability offline" in result.stdout
    assert '"keyword": "小云小云"' in result.stdout

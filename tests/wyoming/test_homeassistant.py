"""Home Assistant 2024.3.3's own Wyoming integration and Assist pipeline against the agent.

Runs ``scripts/homeassistant-wyoming.sh``: Home Assistant in a virtual environment of its own
(installed on first use into ~/.cache/edge-agent, or ``EDGE_AGENT_HA_VENV``), the agent as
``edge-agent wyoming`` on loopback, the service added as discovered over mDNS and by host and
port, an Assist pipeline woken on 小云小云 in real time and not on other speech.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent


@pytest.mark.slow
def test_home_assistant_adds_the_service_and_its_assist_pipeline_wakes_on_the_keyword(
    model_dir: Path, dev_audio: Path, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "EDGE_AGENT_MODEL_DIR": str(model_dir),
        "EDGE_AGENT_DEV_AUDIO": str(dev_audio),
        "HA_CHECK_OUTPUT": str(tmp_path),
    }
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "homeassistant-wyoming.sh")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    for name in ("discovered", "added-by-host"):
        report = json.loads((tmp_path / f"{name}.json").read_text(encoding="utf-8"))
        assert report["home_assistant"] == "2024.3.3" and report["wyoming_package"] == "1.5.3"
        assert report["entity"]["entity_id"] == "wake_word.edge_agent"
        assert [w["id"] for w in report["wake_words"]] == ["小云小云"]
        woke = report["positive"]["wake_word_output"]
        assert woke["wake_word_id"] == "小云小云" and woke["wake_word_phrase"] == "小云小云"
        assert "wake_word_output" not in report["negative"]
    discovered = json.loads((tmp_path / "discovered.json").read_text(encoding="utf-8"))
    assert discovered["service"]["discovered"].startswith("edge-agent-ha-check-")

"""The README's main-job command, run as a newcomer would: it must end with a detection."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_quickstart(model_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "quickstart.sh")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "EDGE_AGENT_MODEL_DIR": str(model_dir)},
    )


@pytest.mark.slow
def test_quickstart_streams_the_example_and_shows_the_detection(model_dir: Path) -> None:
    result = run_quickstart(model_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "OK: 小云小云 detected and published over MQTT." in result.stdout
    assert "edge_agent/quickstart/availability online" in result.stdout
    assert "edge_agent/quickstart/availability offline" in result.stdout
    assert '"keyword": "小云小云"' in result.stdout


@pytest.mark.slow
def test_quickstart_stops_with_the_agents_log_when_the_agent_cannot_come_online(
    model_dir: Path, tmp_path: Path
) -> None:
    """A newcomer whose agent fails to start sees why, not a claim that it is online: here the
    network file is corrupt, which only loading the model (in ``edge-agent run``) finds out."""
    broken = tmp_path / "model"
    for source in [*model_dir.glob("*"), *model_dir.glob("example/*")]:
        if source.is_file():  # plain copies: the shared files are read-only
            (broken / source.relative_to(model_dir)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, broken / source.relative_to(model_dir))
    (broken / "kwsr.net").write_bytes(b"<Nnet> this is not a Kaldi network")
    result = run_quickstart(broken)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "agent: online" not in result.stdout
    assert "FAILED: the agent did not come online" in result.stderr
    assert "kwsr.net" in result.stderr  # the agent's own error, naming the file

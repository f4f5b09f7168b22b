"""benchmarks.fleet_scale still runs and its rollouts decide as they must (no timing checked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_fleet_scale_quick_sees_every_device_and_rolls_back_only_the_raising_change(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "benchmarks.fleet_scale", "--quick"],
        cwd=REPO,
        env={**os.environ, "EDGE_AGENT_BENCH_RESULTS": str(tmp_path)},
        check=True,
        capture_output=True,
        timeout=600,
    )
    result = json.loads((tmp_path / "fleet_scale-quick.json").read_text(encoding="utf-8"))
    snapshot = result["fleet_snapshot"]
    assert snapshot["devices"] == snapshot["online"] == snapshot["with_info"] == result["devices"] == 100
    assert (
        snapshot["outliers_flagged"] == snapshot["outliers_simulated"] == 2
        and result["fleet_watch"]["refreshes"] >= 1
    )
    assert result["rollout_rolled_back"]["outcome"] == "rolled back"
    assert result["rollout_rolled_back"]["counts"] == {"unchanged": 90, "restored": 10}
    assert result["rollout_completed"]["outcome"] == "completed"
    assert result["rollout_completed"]["counts"] == {"changed": 100}
    assert result["machine"]["cpu"]

"""benchmarks.network_calls still runs, alone and against another checkout (no timing checked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent

pytestmark = pytest.mark.slow


def test_the_network_call_benchmark_measures_every_figure_in_both_checkouts(
    tmp_path: Path, model_dir: Path, dev_audio: Path
) -> None:
    subprocess.run(
        [sys.executable, "-m", "benchmarks.network_calls", "--rounds", "1", "--against", str(REPO)],
        cwd=REPO,
        env={**os.environ, "EDGE_AGENT_BENCH_RESULTS": str(tmp_path)},
        check=True,
        capture_output=True,
        timeout=600,
    )
    report = json.loads((tmp_path / "network_calls.json").read_text(encoding="utf-8"))
    figures = report["this"]
    assert {"hidden µs/call", "hidden, 20 ms µs/call", "bounds µs/call"} <= set(figures)
    assert "posteriors, 3 rows µs/call" in figures and "hidden_many, 256 streams spread µs/step" in figures
    assert all(value > 0 for value in figures.values())
    assert set(report["ratio_this_over_against"]) == set(figures) == set(report["against"]["figures"])
    assert report["machine"]["cpu"]

"""benchmarks.frontend still runs, against another checkout too (no timing is checked here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_front_end_benchmark_times_one_stream_and_batches_against_another_checkout(
    tmp_path: Path, model_dir: Path, dev_audio: Path
) -> None:
    env = {
        **os.environ,
        "EDGE_AGENT_BENCH_RESULTS": str(tmp_path),
        "EDGE_AGENT_MODEL_DIR": str(model_dir),
        "EDGE_AGENT_DEV_AUDIO": str(dev_audio),
    }
    subprocess.run(
        [sys.executable, "-m", "benchmarks.frontend", "--rounds", "1", "--against", str(REPO)],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    result = json.loads((tmp_path / "frontend.json").read_text())
    assert result["machine"]["cpu"]
    rows = result["front_end"]
    assert set(rows) == {
        "1 stream, 10 ms",
        "1 stream, 20 ms",
        "1 stream, 100 ms",
        "1 stream, 1000 ms",
        "32 streams, 100 ms",
        "256 streams, 100 ms",
    }
    assert all(row["this_median_us"] > 0 and row["against_median_us"] > 0 for row in rows.values())
    assert all(row["ratio_median"] > 0 for row in rows.values())

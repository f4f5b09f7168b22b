"""`edge-agent eval --curve`: a subprocess over real recordings, and the threshold it suggests."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from edge_agent.cli.curve import suggest, sweep_thresholds
from tests.cli.test_detect_cli import WAKE, edge_agent
from tests.conftest import require_module


def test_the_sweep_covers_a_log_grid_and_the_configured_threshold() -> None:
    grid = sweep_thresholds(0.05)
    assert grid[0] == 1e-4 and grid[-1] == 1.0 and 0.05 in grid
    assert grid == sorted(set(grid)) and len(grid) == 4 * 12 + 2


def test_the_suggested_threshold_meets_the_target_with_the_lowest_miss_rate() -> None:
    points = [
        {"threshold": 0.001, "miss_rate": 0.0, "fa_per_hour": 2.0},
        {"threshold": 0.01, "miss_rate": 0.0, "fa_per_hour": 0.1},
        {"threshold": 0.04, "miss_rate": 0.0, "fa_per_hour": 0.0},
        {"threshold": 0.1, "miss_rate": 0.04, "fa_per_hour": 0.0},
    ]
    assert suggest(points, 0.1) == 0.02  # the middle of 0.01 .. 0.04 on a log scale
    assert suggest(points, 0.01) == 0.04
    assert suggest(points[:1], 0.1) is None


def test_eval_curve_writes_a_det_curve_with_background_audio(
    model_dir: Path, dev_audio: Path, tmp_path: Path
) -> None:
    require_module("matplotlib")
    folders = {name: tmp_path / name for name in ("pos", "neg", "background")}
    for folder in folders.values():
        folder.mkdir()
    for source in sorted(dev_audio.glob("pos/*.wav"))[:3]:
        (folders["pos"] / source.name).symlink_to(source)
    negatives = sorted(dev_audio.glob("neg/*.wav"))
    for source in negatives[:3]:
        (folders["neg"] / source.name).symlink_to(source)
    for source in negatives[3:6]:
        (folders["background"] / source.name).symlink_to(source)
    prefix = tmp_path / "out" / "curve"
    result = edge_agent(
        "eval",
        "--keywords",
        WAKE,
        "--positives",
        str(folders["pos"]),
        "--negatives",
        str(folders["neg"]),
        "--background",
        str(folders["background"]),
        "--curve",
        str(prefix),
        "--target-fa-per-hour",
        "1",
        env={"EDGE_AGENT_MODEL_DIR": str(model_dir)},
    )
    assert result.returncode == 0, result.stderr
    assert "keyword 小云小云: at 0.05 miss rate 0.0, 0 false alarms" in result.stdout
    report = json.loads(prefix.with_suffix(".json").read_text(encoding="utf-8"))
    assert prefix.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["hours"]["background"] > 0 and report["negative_hours"] > report["hours"]["negatives"]
    (keyword,) = report["keywords"]
    assert keyword["positives"] == 3
    points = keyword["points"]
    # Higher thresholds: never fewer misses, never more false alarms.
    assert [p["threshold"] for p in points] == sorted(p["threshold"] for p in points)
    assert all(a["miss_rate"] <= b["miss_rate"] for a, b in itertools.pairwise(points))
    assert all(a["false_alarms"] >= b["false_alarms"] for a, b in itertools.pairwise(points))
    assert points[0]["false_alarms"] > 0 and points[-1]["miss_rate"] > 0  # the sweep spans the trade-off
    suggested = keyword["suggested_threshold"]
    at = min(points, key=lambda p: abs(p["threshold"] - suggested))
    assert at["fa_per_hour"] <= 1 and at["miss_rate"] == 0.0


@pytest.mark.parametrize("argument", ["--background", "--target-fa-per-hour"])
def test_eval_curve_refuses_bad_options_clearly(
    argument: str, model_dir: Path, dev_audio: Path, tmp_path: Path
) -> None:
    value = str(tmp_path / "missing") if argument == "--background" else "-1"
    result = edge_agent(
        "eval",
        "--keywords",
        WAKE,
        "--positives",
        str(dev_audio / "pos"),
        "--negatives",
        str(dev_audio / "neg"),
        argument,
        value,
        "--curve",
        str(tmp_path / "curve"),
        env={"EDGE_AGENT_MODEL_DIR": str(model_dir)},
    )
    assert result.returncode == 2
    assert argument in result.stderr and "Traceback" not in result.stderr

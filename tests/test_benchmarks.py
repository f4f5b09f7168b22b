"""The benchmark scripts still run (no timing is checked here: numbers belong in benchmarks/)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def bench(module: str, *arguments: str, results: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *arguments],
        cwd=REPO,
        env={**os.environ, "EDGE_AGENT_BENCH_RESULTS": str(results)},
        check=True,
        capture_output=True,
        timeout=600,
    )


def test_throughput_latency_and_plot_produce_their_files(
    tmp_path: Path, model_dir: Path, dev_audio: Path
) -> None:
    bench("throughput", "--streams", "1,4", "--seconds", "2", results=tmp_path)
    bench("mqtt_latency", "--streams", "2", "--seconds", "12", results=tmp_path)
    bench("plot", results=tmp_path)
    throughput = json.loads((tmp_path / "throughput-numpy.json").read_text(encoding="utf-8"))
    assert [r["streams"] for r in throughput["results"]] == [1, 4]
    assert throughput["machine"]["cores"] >= 1 and throughput["baseline"]["rtf"] > 0
    for row in throughput["results"]:
        steps = row["step_ms"]
        assert 0 < steps["p50"] <= steps["p95"] <= steps["p99"] <= steps["max"]
        # present only if the streams detected the wake word they all played
        assert row["burst"]["firing_step_ms"] > 0
    latency = json.loads((tmp_path / "mqtt_latency.json").read_text(encoding="utf-8"))
    (row,) = latency["results"]
    assert row["detections_received"] >= row["detections_expected_at_least"] > 0
    assert row["duplicates"] == 0
    assert row["agent_delay_ms_p95"] > 0 and row["rounds_delay_ms_p95"] == [row["delay_ms_p95"]]
    assert (tmp_path / "scaling.png").stat().st_size > 10_000


def test_the_qos1_burst_benchmark_times_every_broker_and_client_pairing(tmp_path: Path) -> None:
    bench("qos1_burst", "--messages", "40", "--repeat", "1", results=tmp_path)
    report = json.loads((tmp_path / "qos1_burst.json").read_text(encoding="utf-8"))
    pairings = {(r["broker"], r["client"]) for r in report["results"]}
    assert pairings == {
        (broker, client)
        for broker in ("mosquitto defaults", "set_tcp_nodelay true")
        for client in ("agent outbox", "agent, delayed ACKs", "plain paho")
    }
    for row in report["results"]:
        assert row["messages"] == 40
        assert 0 < row["all_acknowledged_ms_median"] <= row["all_acknowledged_ms_max"]


def test_the_stage_benchmark_times_every_stage_and_both_batch_layouts(
    tmp_path: Path, model_dir: Path, dev_audio: Path
) -> None:
    bench("stages", "--repeat", "1", "--streams", "8", results=tmp_path)
    report = json.loads((tmp_path / "stages.json").read_text(encoding="utf-8"))
    stages = report["stages"]
    # numpy's FFT always; scipy's too where the `fast` extra is installed (CI installs it).
    assert "features (numpy FFT)" in stages and {"body", "bounds"} <= set(stages)
    assert ("features (scipy FFT)" in stages) == (importlib.util.find_spec("scipy") is not None)
    assert any(name.startswith("whole (") for name in stages)
    assert all(0 < row["rtf_best"] <= row["rtf_median"] for row in stages.values())
    assert report["hidden_many"]["streams"] == 8
    for layout in ("fed in step", "phases spread"):
        assert 0 < report["hidden_many"][layout]["ms_best"] <= report["hidden_many"][layout]["ms_median"]
